#!/usr/bin/env bash
# Builds halo's release artifacts from this checkout:
#
#   packaging/build.sh binaries   static release binaries of halo-lb and halo-sidecar
#   packaging/build.sh debs       + both Debian packages in target/debian/
#   packaging/build.sh images     + both container images (localhost/halo-lb:<version>,
#                                   localhost/halo-sidecar:<version>), with buildah
#   packaging/build.sh all        all of it (the default)
#
# The binaries are linked statically against glibc (`-C
# target-feature=+crt-static`): the same files go into the packages and
# into `FROM scratch` images, which have no libc to load. (musl would do as
# well, but its standard library cannot be fetched here.) A static glibc
# cannot load NSS modules, so inside an image give Consul's address as an
# IP, not a host name.
#
# Tools: cargo-deb (pinned below) is built into target/tools when missing
# (scripts/cargo-tool.sh, as for cargo-deny); buildah and podman come from
# Debian (apt-get install buildah podman runc) and are installed when
# missing.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
what=${1:-all}
case "$what" in binaries | debs | images | all) ;; *)
    echo "usage: $0 [binaries|debs|images|all]" >&2
    exit 2
    ;;
esac

target=$(rustc -vV | sed -n 's/^host: //p')
target_dir=${CARGO_TARGET_DIR:-$root/target}
bin="$target_dir/$target/release"
version=$(cargo metadata --format-version 1 --no-deps --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "halo-lb"))')

echo "== static release binaries ($target, crt-static)"
start=$SECONDS
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --locked --target "$target" -p halo-lb -p halo-sidecar
for b in halo-lb halo-sidecar; do
    # A dynamically linked binary names its loader (PT_INTERP).
    if readelf -l "$bin/$b" | grep -q 'program interpreter'; then
        echo "$bin/$b is dynamically linked; a scratch image could not run it" >&2
        exit 1
    fi
done
echo "   built in $((SECONDS - start)) s: $bin/halo-lb, $bin/halo-sidecar"
[ "$what" = binaries ] && exit 0

if [ "$what" = debs ] || [ "$what" = all ]; then
    deb=$(scripts/cargo-tool.sh cargo-deb "$CARGO_DEB_VERSION")
    echo "== Debian packages"
    mkdir -p "$target_dir/debian"
    # The man pages, from the CLI definitions of the binaries just built
    # (the packages' assets take them from here).
    rm -rf "$bin/man" && mkdir -p "$bin/man"
    "$bin/halo-lb" generate-man "$bin/man"
    "$bin/halo-sidecar" generate-man "$bin/man"
    # Compressed as Debian policy wants, without a name or time stamp in
    # the header (the same pages give the same bytes).
    gzip -9n "$bin"/man/*.1
    for p in halo-lb halo-sidecar; do
        # --no-build: the static binaries above. --dbgsym: the debug
        # symbols (release has debug = 1) go into <package>-dbgsym.ddeb,
        # the binary in the .deb is stripped.
        "$deb" --no-build --locked --target "$target" -p "$p" --dbgsym --output "$target_dir/debian/"
    done
    ls -l "$target_dir"/debian/*"$version"*
fi

if [ "$what" = images ] || [ "$what" = all ]; then
    missing=()
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || missing+=(runc)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$root/packaging/container/containers.conf}
    # Docker's image format, not OCI's: only it carries HEALTHCHECK, which
    # podman runs (`podman healthcheck run`).
    export BUILDAH_FORMAT=docker
    stripped=$(mktemp -d)
    trap 'rm -rf "$stripped"' EXIT
    echo "== container images (buildah, FROM scratch)"
    revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
    created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    image() { # NAME CONFIG-SOURCE CONFIG-PATH PORT HEALTH-ARGS DESCRIPTION
        local name=$1 config_src=$2 config=$3 port=$4 health=$5 description=$6
        local ctr
        ctr=$(buildah from scratch)
        # Owned by root, readable by all: the process runs as 65532 and
        # can change neither its binary nor its default config.
        # Without the debug sections (the -dbgsym packages keep them).
        strip -o "$stripped/$name" "$bin/$name"
        buildah copy --chown 0:0 --chmod 0755 "$ctr" "$stripped/$name" "/usr/bin/$name" >/dev/null
        buildah copy --chown 0:0 --chmod 0644 "$ctr" "$config_src" "$config" >/dev/null
        buildah config \
            --user 65532:65532 \
            --workingdir / \
            --entrypoint "[\"/usr/bin/$name\", \"--config\", \"$config\"]" \
            --cmd '[]' \
            --port "$port/tcp" \
            --env RUST_LOG=info \
            --stop-signal SIGTERM \
            --healthcheck "CMD /usr/bin/$name --config $config healthcheck$health" \
            --healthcheck-interval 10s --healthcheck-timeout 3s --healthcheck-retries 3 \
            --label "org.opencontainers.image.title=$name" \
            --label "org.opencontainers.image.description=$description" \
            --label "org.opencontainers.image.version=$version" \
            --label "org.opencontainers.image.revision=$revision" \
            --label "org.opencontainers.image.created=$created" \
            --label "org.opencontainers.image.licenses=Apache-2.0" \
            --label "org.opencontainers.image.source=https://example.invalid/halo" \
            "$ctr"
        buildah commit --quiet --rm "$ctr" "localhost/$name:$version" >/dev/null
        buildah tag "localhost/$name:$version" "localhost/$name:latest"
        echo "   localhost/$name:$version ($(podman image inspect --format '{{.Size}}' "localhost/$name:$version") bytes)"
    }
    image halo-lb packaging/examples/lb.toml /etc/halo/halo-lb.toml 9901 "" \
        "halo's layer-4 load balancer for virtual IPs"
    image halo-sidecar packaging/examples/sidecar.toml /etc/halo/sidecar.toml 9902 "" \
        "halo's sidecar: registers an app with Consul, probes it, drains it"
fi
