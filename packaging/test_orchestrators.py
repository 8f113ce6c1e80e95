#!/usr/bin/env python3
"""Checks halo's Nomad job files and Kubernetes manifests without a cluster.

    python3 packaging/test_orchestrators.py

The files under packaging/nomad/ and packaging/kubernetes/ have never been
run against a real Nomad or Kubernetes; this is what is checked instead:

- well-formed: every .nomad.hcl parses as HCL2 and holds one job whose tasks
  all name a driver and an image; every .yaml parses, and each document is
  valid against the Kubernetes API schema (strict: unknown fields fail) of
  K8S_VERSIONS (PyPI kubernetes-validate);
- images: each is localhost/halo-lb:<v> or localhost/halo-sidecar:<v> with <v>
  the workspace version in Cargo.toml, or APP_IMAGE_PLACEHOLDER; a halo
  image's container or task sets its command explicitly, and runs that
  image's own binary (/usr/bin/halo-lb or /usr/bin/halo-sidecar);
- command lines: every halo-lb / halo-sidecar command line in the files uses
  only subcommands and flags in CLI below; with a binary at hand, the binary
  also parses it (the arguments plus --help: clap exits 2 on anything it
  does not know), except for NOT_YET_BUILT entries the binary lacks;
- configs: the halo-lb.toml and sidecar.toml each file renders pass
  `halo-lb check` / `halo-sidecar check` (with a binary; Nomad template
  variables and the pod's HALO_* environment filled with sample values);
- the shutdown design: stop order and timeouts (see each check's text).

Binaries: HALO_LB_BIN and HALO_SIDECAR_BIN, else the newer of
target/release/<name> and target/debug/<name>; without one, the checks that
need it are skipped.
Packages: pinned in PINNED and installed with pip into
target/tools/python<X.Y>-packages on first use (PyPI only).
Prints one line per check and `N passed, N failed, N skipped`; exits 1 if
anything failed.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ---- The halo command-line interface the files may use. ------------------
# Subcommand -> its own flags (flag -> number of values). None is the bare
# program (run the daemon). Global flags may stand anywhere.
# NOT_YET_BUILT: subcommands that were being written elsewhere (the
# sd-notify / healthcheck / drain work, landed in 8903c6a). While a binary
# lacks one (an older build), a command line using it is checked against this
# table alone; a binary that has it decides (and the entry can then go).
GLOBAL_FLAGS = {"--config": 1, "-c": 1}
CLI = {
    "halo-lb": {None: {}, "check": {}, "release-vip": {}, "healthcheck": {"--timeout": 1}},
    "halo-sidecar": {
        None: {},
        "check": {},
        "healthcheck": {"--live": 0, "--timeout": 1},
        "drain": {"--wait": 0, "--timeout": 1},
    },
}
NOT_YET_BUILT = {
    ("halo-lb", "healthcheck"): "GET the local admin API's /health, exit 0 or 1",
    ("halo-sidecar", "healthcheck"): "GET the local admin API's /health/ready, exit 0 or 1",
    ("halo-sidecar", "drain"): "POST /drain; with --wait, return once the instance is out of Consul",
}
# Where the images keep the binaries (FROM scratch images, see the packaging).
IMAGE_BINARY = {"halo-lb": "/usr/bin/halo-lb", "halo-sidecar": "/usr/bin/halo-sidecar"}
# The app image in the examples: a placeholder for the operator's own.
APP_IMAGE_PLACEHOLDER = "localhost/example-app:latest"
# Kubernetes API versions the manifests must be valid for: the oldest they
# support (native sidecars 1.29, preStop sleep 1.30) and the newest schema
# kubernetes-validate knows.
K8S_VERSIONS = ["1.30.0", "latest"]
# halo-sidecar's deregistration budget after drain.grace (sidecar/src/lib.rs
# SHUTDOWN_MARGIN), and halo-lb's drain_timeout default.
SIDECAR_SHUTDOWN_MARGIN = 3.0
LB_DEFAULT_DRAIN_TIMEOUT = 30.0
SIDECAR_DEFAULT_GRACE = 10.0
# Nomad client's default max_kill_timeout: a kill_timeout above it is cut.
NOMAD_MAX_KILL_TIMEOUT = 30.0

PINNED = [
    "python-hcl2==8.1.4",
    "lark==1.3.1",
    "regex==2026.11.19",
    "PyYAML==6.0.3",
    "kubernetes-validate==1.37.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "attrs==26.1.0",
    "importlib-resources==7.1.0",
    "packaging==26.4",
    "typing-extensions==4.16.0",
]


def bootstrap():
    """Installs PINNED (no other versions, no unpinned dependency) into a
    directory of the build tree and puts it first on sys.path."""
    target = os.path.join(REPO, "target", "tools", "python%d.%d-packages" % sys.version_info[:2])
    marker = os.path.join(target, ".pinned")
    want = "\n".join(PINNED) + "\n"
    have = open(marker).read() if os.path.exists(marker) else None
    if have != want:
        print("== installing %s into %s" % (", ".join(PINNED), target), flush=True)
        os.makedirs(target, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--upgrade", "--target", target] + PINNED
        if subprocess.run(cmd).returncode != 0:
            print("FAIL: pip could not install the pinned packages")
            print("0 passed, 1 failed")
            sys.exit(1)
        with open(marker, "w") as f:
            f.write(want)
    sys.path.insert(0, target)


bootstrap()
import hcl2  # noqa: E402
import kubernetes_validate  # noqa: E402
import yaml  # noqa: E402
from hcl2.utils import SerializationOptions  # noqa: E402

# ---- Results --------------------------------------------------------------
RESULTS = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, ok, detail=""):
    RESULTS["passed" if ok else "failed"] += 1
    print("%s: %s%s" % ("PASS" if ok else "FAIL", name, ("  (%s)" % detail) if detail else ""))
    return ok


def skip(name, why):
    RESULTS["skipped"] += 1
    print("SKIP: %s  (%s)" % (name, why))


# ---- Helpers ---------------------------------------------------------------
def workspace_version():
    text = open(os.path.join(REPO, "Cargo.toml")).read()
    m = re.search(r"^\[workspace\.package\][^\[]*?^version\s*=\s*\"([^\"]+)\"", text, re.M | re.S)
    return m.group(1) if m else None


def seconds(text):
    """A Go-style duration ("1m30s", "500ms", "10s") or a bare number."""
    if isinstance(text, (int, float)):
        return float(text)
    total, rest = 0.0, text.strip()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", rest):
        total += float(num) * units[unit]
    if not re.fullmatch(r"(\d+(?:\.\d+)?(ms|s|m|h))+", rest):
        raise ValueError("not a duration: %r" % text)
    return total


def toml_value(text, section, key):
    """The value of KEY in [SECTION] (None: top level) of a small TOML text;
    None if absent. Enough for the few scalars the timing checks need."""
    current = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"\[+([^\]]+)\]+", line)
        if m:
            current = m.group(1).strip()
            continue
        m = re.fullmatch(r"([A-Za-z0-9_]+)\s*=\s*(.+)", line)
        if m and m.group(1) == key and current == section:
            return m.group(2).strip().strip('"')
    return None


def find_bin(name, env):
    """ENV if set, else the newer of target/release/NAME and target/debug/NAME."""
    if os.environ.get(env):
        return os.environ[env]
    found = [os.path.join(REPO, "target", p, name) for p in ("release", "debug")]
    found = [p for p in found if os.access(p, os.X_OK)]
    return max(found, key=os.path.getmtime) if found else None


BINS = {"halo-lb": find_bin("halo-lb", "HALO_LB_BIN"), "halo-sidecar": find_bin("halo-sidecar", "HALO_SIDECAR_BIN")}


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HALO_") and not k.startswith("CONSUL_")}
    env.update(extra or {})
    return env


# ---- Command lines ---------------------------------------------------------
def static_parse(argv):
    """Checks argv against CLI; returns (subcommand, problem or None)."""
    prog = os.path.basename(argv[0])
    table = CLI[prog]
    sub, i = None, 1
    while i < len(argv):
        tok = argv[i]
        flag = tok.split("=", 1)[0]
        if flag in GLOBAL_FLAGS:
            i += 1 + (GLOBAL_FLAGS[flag] if "=" not in tok else 0)
            continue
        if sub is not None and flag in table[sub]:
            i += 1 + table[sub][flag]
            continue
        if tok.startswith("-"):
            return sub, "unknown flag %s%s" % (tok, " for %s" % sub if sub else "")
        if sub is None and tok in table and tok is not None:
            sub = tok
            i += 1
            continue
        return sub, "unexpected argument %r" % tok
    if i > len(argv):
        return sub, "a flag is missing its value"
    return sub, None


def check_command(where, argv):
    """One halo command line (a list of strings): the static table, then the
    binary when there is one."""
    prog = os.path.basename(argv[0])
    name = "%s: `%s`" % (where, " ".join(argv))
    if prog not in CLI:
        return check(name, False, "not a halo program")
    sub, problem = static_parse(argv)
    if not check(name + " uses known subcommands and flags", problem is None, problem or "subcommand %s" % (sub or "(none: the daemon)")):
        return
    binary = BINS[prog]
    if not binary:
        skip(name + " parsed by the binary", "no %s binary" % prog)
        return
    run = subprocess.run([binary] + argv[1:] + ["--help"], capture_output=True, text=True, env=clean_env(), timeout=30)
    if run.returncode == 0:
        if (prog, sub) in NOT_YET_BUILT:
            print("note: %s %s is now in the binary; its NOT_YET_BUILT entry can go" % (prog, sub))
        check(name + " parsed by " + binary, True)
    elif (prog, sub) in NOT_YET_BUILT and "unrecognized subcommand" in run.stderr:
        check(name + " parsed by " + binary, True,
              "%s %s is not in this binary yet; accepted from NOT_YET_BUILT: %s" % (prog, sub, NOT_YET_BUILT[(prog, sub)]))
    else:
        check(name + " parsed by " + binary, False, (run.stderr or run.stdout).strip().splitlines()[0:3])


def is_halo_argv(value):
    return (isinstance(value, list) and value and all(isinstance(v, str) for v in value)
            and os.path.basename(value[0]) in CLI)


def walk(node, path=""):
    """Every (path, value) in a tree of dicts and lists."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, "%s.%s" % (path, k) if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, "%s[%d]" % (path, i))


def halo_mentions_outside_argv(tree, argv_paths):
    """Strings that mention halo-lb/halo-sidecar followed by arguments but are
    not a checked argv (a shell command, say): none are allowed, since they
    would escape the command-line check."""
    found = []
    for path, value in walk(tree):
        if isinstance(value, str) and re.search(r"(^|[\s/])halo-(lb|sidecar)\s+-", value):
            if not any(path.startswith(p) for p in argv_paths):
                found.append(path)
    return found


# ---- Images ----------------------------------------------------------------
IMAGE_RE = re.compile(r"^localhost/(halo-lb|halo-sidecar):(.+)$")


def check_image(where, image, argv, version):
    m = IMAGE_RE.match(image or "")
    if not m:
        check("%s: image %s is the app placeholder" % (where, image), image == APP_IMAGE_PLACEHOLDER,
              "images must be localhost/halo-lb:*, localhost/halo-sidecar:* or %s" % APP_IMAGE_PLACEHOLDER)
        if image == APP_IMAGE_PLACEHOLDER and is_halo_argv(argv):
            check("%s: the app placeholder runs no halo binary" % where, False)
        return
    name, tag = m.groups()
    check("%s: image %s has the workspace version" % (where, image), tag == version, "Cargo.toml: %s" % version)
    check("%s: %s sets its command explicitly and runs %s" % (where, image, IMAGE_BINARY[name]),
          bool(argv) and argv[0] == IMAGE_BINARY[name],
          "command: %s" % (argv,))


# ---- Configs ---------------------------------------------------------------
def check_config(where, prog, text, env=None):
    binary = BINS[prog]
    if not binary:
        skip("%s: config passes `%s check`" % (where, prog), "no %s binary" % prog)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        run = subprocess.run([binary, "--config", path, "check"], capture_output=True, text=True,
                             env=clean_env(env), timeout=30)
    finally:
        os.unlink(path)
    out = (run.stdout + run.stderr).strip()
    warned = "warning" in run.stderr.lower()
    check("%s: config passes `%s check`%s" % (where, prog, " with its HALO_* environment" if env else ""),
          run.returncode == 0 and not warned, out.replace("\n", " | ")[:400])


# ---- Nomad -----------------------------------------------------------------
HCL_OPTS = SerializationOptions(with_comments=False, explicit_blocks=False, preserve_heredocs=True, strip_string_quotes=True)
NOMAD_SAMPLE_ENV = {
    "NOMAD_ALLOC_ID": str(uuid.UUID(int=0x5EED)),
    "NOMAD_IP_http": "10.0.0.12",
    "NOMAD_PORT_http": "24000",
    "NOMAD_PORT_admin": "24001",
    "meta.zone": "zone-a",
}


def heredoc(value):
    m = re.fullmatch(r"<<(-?)(\w+)\n(.*)\n\s*\2", value, re.S)
    if not m:
        return value
    body = m.group(3) + "\n"
    return textwrap.dedent(body) if m.group(1) else body


def resolve(value, variables, local_values):
    """${var.x} and ${local.x} of a parsed HCL string (the rest is left to Nomad)."""
    if not isinstance(value, str):
        return value
    m = re.fullmatch(r"\$\{local\.(\w+)\}", value)
    if m:
        return local_values[m.group(1)]
    value = re.sub(r"\$\{var\.(\w+)\}", lambda mm: str(variables[mm.group(1)]), value)
    return heredoc(value)


def render_template(where, text):
    """Nomad's {{ env "X" }} with NOMAD_SAMPLE_ENV; any other template action fails."""
    unknown = []

    def sub(m):
        if m.group(1) in NOMAD_SAMPLE_ENV:
            return NOMAD_SAMPLE_ENV[m.group(1)]
        unknown.append(m.group(0))
        return ""

    out = re.sub(r'\{\{\s*env\s+"([^"]+)"\s*\}\}', sub, text)
    unknown += re.findall(r"\{\{.*?\}\}", out)
    check("%s: template uses only sampled variables" % where, not unknown,
          "unknown: %s (add a sample to NOMAD_SAMPLE_ENV)" % unknown if unknown else "")
    return out


def blocks(node, key):
    """HCL blocks KEY under NODE, as (label, body) pairs or bodies."""
    return node.get(key, []) if isinstance(node, dict) else []


def labelled(node, key):
    for item in blocks(node, key):
        for label, body in item.items():
            yield label, body


def nomad_file(path, version):
    rel = os.path.relpath(path, REPO)
    try:
        doc = hcl2.load(open(path), serialization_options=HCL_OPTS)
    except Exception as e:  # any parse error
        check("%s parses as HCL2" % rel, False, str(e)[:300])
        return
    check("%s parses as HCL2" % rel, True)
    variables = {name: body.get("default") for name, body in labelled(doc, "variable")}
    local_values = {}
    for item in blocks(doc, "locals"):
        for k, v in item.items():
            local_values[k] = heredoc(v) if isinstance(v, str) else v
    jobs = list(labelled(doc, "job"))
    if not check("%s holds exactly one job" % rel, len(jobs) == 1, "%d jobs" % len(jobs)):
        return
    job_name, job = jobs[0]
    job_type = job.get("type", "service")
    tasks = {}
    for group_name, group in labelled(job, "group"):
        for task_name, task in labelled(group, "task"):
            where = "%s task %s.%s" % (rel, group_name, task_name)
            tasks[task_name] = (group, task)
            configs = blocks(task, "config")
            ok = check("%s names a driver and one config block" % where, bool(task.get("driver")) and len(configs) == 1)
            if not ok:
                continue
            config = configs[0]
            image = resolve(config.get("image"), variables, local_values)
            entry = config.get("entrypoint") or ([config["command"]] if isinstance(config.get("command"), str) else [])
            argv = [resolve(a, variables, local_values) for a in list(entry) + list(config.get("args", []))]
            check_image(where, image, argv, version)
            if is_halo_argv(argv):
                check_command(where, argv)
            for tpl in blocks(task, "template"):
                data = resolve(tpl.get("data", ""), variables, local_values)
                rendered = render_template(where, data)
                prog = os.path.basename(argv[0]) if is_halo_argv(argv) else None
                if prog:
                    check_config("%s template %s" % (where, tpl.get("destination")), prog, rendered)
                task.setdefault("_rendered", []).append(rendered)
    # Templates and locals hold configs, not command lines.
    stray = [p for p in halo_mentions_outside_argv(doc, []) if "template" not in p and "locals" not in p]
    check("%s: no halo command line hides in a string" % rel, not stray, ", ".join(stray))
    return job_name, job_type, job, tasks


def nomad_design_lb(rel, job_type, job, tasks):
    check("%s: a system job (one halo-lb per balancer node)" % rel, job_type == "system")
    for group_name, group in labelled(job, "group"):
        nets = blocks(group, "network")
        check("%s: group %s uses host networking" % (rel, group_name), bool(nets) and nets[0].get("mode") == "host")
    _, lb = tasks.get("halo-lb", (None, None))
    if not check("%s: has a halo-lb task" % rel, lb is not None):
        return
    config = blocks(lb, "config")[0]
    caps = {c.lower() for c in config.get("cap_add", [])}
    check("%s: halo-lb gets exactly NET_ADMIN, NET_RAW, NET_BIND_SERVICE" % rel,
          caps == {"net_admin", "net_raw", "net_bind_service"} and [c.lower() for c in config.get("cap_drop", [])] == ["all"],
          "cap_add %s" % sorted(caps))
    check("%s: halo-lb uses the host's network namespace" % rel, config.get("network_mode") == "host")
    rendered = lb.get("_rendered", [""])[0]
    drain = seconds(toml_value(rendered, None, "drain_timeout") or "%ds" % LB_DEFAULT_DRAIN_TIMEOUT)
    kill = seconds(lb.get("kill_timeout", "5s"))
    check("%s: kill_timeout (%gs) > drain_timeout (%gs) and <= Nomad's default max_kill_timeout (%gs)"
          % (rel, kill, drain, NOMAD_MAX_KILL_TIMEOUT), drain < kill <= NOMAD_MAX_KILL_TIMEOUT)
    post = [t for _, t in tasks.values() if any(lc.get("hook") == "poststop" for lc in blocks(t, "lifecycle"))]
    releases = [t for t in post if "release-vip" in blocks(t, "config")[0].get("args", [])]
    check("%s: a poststop task runs release-vip (the unit's ExecStopPost)" % rel, len(releases) == 1)


def nomad_design_app(rel, job_type, job, tasks):
    check("%s: a service job" % rel, job_type == "service")
    _, sidecar = tasks.get("halo-sidecar", (None, None))
    if not check("%s: has a halo-sidecar task" % rel, sidecar is not None):
        return
    check("%s: halo-sidecar is the group's leader (killed first, and waited for, before the app)" % rel,
          sidecar.get("leader") is True)
    check("%s: halo-sidecar has no lifecycle block (a lifecycle sidecar is killed last, after the app)" % rel,
          not blocks(sidecar, "lifecycle"))
    others = [n for n, (_, t) in tasks.items() if t is not sidecar and t.get("leader")]
    check("%s: no other task is a leader" % rel, not others, ", ".join(others))
    check("%s: halo-sidecar drops every capability" % rel,
          [c.lower() for c in blocks(sidecar, "config")[0].get("cap_drop", [])] == ["all"]
          and not blocks(sidecar, "config")[0].get("cap_add"))
    rendered = sidecar.get("_rendered", [""])[0]
    grace = seconds(toml_value(rendered, "drain", "grace") or "%ds" % SIDECAR_DEFAULT_GRACE)
    kill = seconds(sidecar.get("kill_timeout", "5s"))
    check("%s: sidecar kill_timeout (%gs) > drain.grace (%gs) + deregistration (%gs), <= max_kill_timeout (%gs)"
          % (rel, kill, grace, SIDECAR_SHUTDOWN_MARGIN, NOMAD_MAX_KILL_TIMEOUT),
          grace + SIDECAR_SHUTDOWN_MARGIN < kill <= NOMAD_MAX_KILL_TIMEOUT)
    restarts = [r.get("mode") for _, g in labelled(job, "group") for r in blocks(g, "restart")]
    check("%s: restart mode is delay (a leader that is dead for good stops the allocation)" % rel,
          restarts == ["delay"], "modes: %s" % restarts)


# ---- Kubernetes ------------------------------------------------------------
def pod_spec(doc):
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec")
    if kind in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        return doc.get("spec", {}).get("template", {}).get("spec")
    return None


POD_SAMPLE_FIELDS = {
    "metadata.name": "web-5d8f7c9b6-x2x7q",
    "metadata.namespace": "default",
    "status.podIP": "10.244.1.17",
    "status.hostIP": "10.0.0.21",
}


def container_env(where, container):
    """The container's environment as the kubelet would make it, with
    POD_SAMPLE_FIELDS for the downward API; None if something is unknown."""
    env, problems = {}, []
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            field = item["valueFrom"]["fieldRef"]["fieldPath"]
            if field in POD_SAMPLE_FIELDS:
                env[item["name"]] = POD_SAMPLE_FIELDS[field]
            else:
                problems.append(field)
        else:
            problems.append(item["name"])
    unresolved = [k for k, v in env.items() if "$(" in v]
    check("%s: environment resolves" % where, not problems and not unresolved,
          "unknown: %s" % (problems + unresolved) if problems or unresolved else "")
    return env


def config_from_mounts(docs, spec, container, filename):
    """The text of FILENAME as the container sees it through a ConfigMap volume."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    maps = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ConfigMap"}
    for mount in container.get("volumeMounts", []):
        vol = volumes.get(mount["name"], {})
        cm = maps.get(vol.get("configMap", {}).get("name"))
        if cm and os.path.dirname(filename) == mount["mountPath"].rstrip("/"):
            return cm.get("data", {}).get(os.path.basename(filename))
    return None


def config_path(argv):
    for i, tok in enumerate(argv):
        if tok in ("--config", "-c") and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith("--config="):
            return tok.split("=", 1)[1]
    return None


def kubernetes_file(path, version):
    rel = os.path.relpath(path, REPO)
    try:
        docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
    except yaml.YAMLError as e:
        check("%s parses as YAML" % rel, False, str(e)[:300])
        return []
    check("%s parses as YAML (%d documents)" % (rel, len(docs)), bool(docs))
    for doc in docs:
        name = "%s %s/%s" % (rel, doc.get("kind"), (doc.get("metadata") or {}).get("name"))
        for v in K8S_VERSIONS:
            want = kubernetes_validate.latest_version() if v == "latest" else v
            try:
                got = kubernetes_validate.validate(doc, want, strict=True)
                check("%s is valid for Kubernetes %s (strict schema)" % (name, got), True)
            except Exception as e:  # ValidationError, SchemaNotFoundError
                check("%s is valid for Kubernetes %s (strict schema)" % (name, want), False, str(e).splitlines()[0][:300])
        spec = pod_spec(doc)
        if not spec:
            continue
        argv_paths = []
        for kind in ("initContainers", "containers"):
            for i, c in enumerate(spec.get(kind, [])):
                where = "%s %s" % (name, c["name"])
                argv = list(c.get("command", [])) + list(c.get("args", []))
                check_image(where, c.get("image"), argv, version)
                for sub, value in walk(c):
                    if is_halo_argv(value):
                        check_command("%s %s" % (where, sub or "command"), value)
                        argv_paths.append("%s[%d].%s" % (kind, i, sub) if sub else "%s[%d]" % (kind, i))
                if is_halo_argv(argv):
                    if c.get("args"):  # the walk above saw command and args apart
                        check_command(where + " command+args", argv)
                    prog = os.path.basename(argv[0])
                    cfg = config_path(argv)
                    text = config_from_mounts(docs, spec, c, cfg) if cfg else None
                    if check("%s: its --config %s comes from a ConfigMap in this file" % (where, cfg), text is not None):
                        env = container_env(where, c)
                        check_config(where, prog, text, {k: v for k, v in env.items() if k.startswith(("HALO_", "CONSUL_"))})
                        c["_config"] = text
        stray = halo_mentions_outside_argv(spec, argv_paths)
        check("%s: no halo command line hides in a string" % name, not stray, ", ".join(stray))
    return docs


def find_container(spec, image_name):
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind, []):
            if (c.get("image") or "").startswith("localhost/%s:" % image_name):
                return kind, c
    return None, None


def k8s_design_sidecar(rel, docs):
    deployments = [d for d in docs if pod_spec(d) and find_container(pod_spec(d), "halo-sidecar")[1]]
    if not check("%s: a workload with halo-sidecar" % rel, len(deployments) == 1):
        return
    spec = pod_spec(deployments[0])
    kind, sc = find_container(spec, "halo-sidecar")
    check("%s: halo-sidecar is a native sidecar (initContainer, restartPolicy Always)" % rel,
          kind == "initContainers" and sc.get("restartPolicy") == "Always")
    pre = (sc.get("lifecycle") or {}).get("preStop", {}).get("exec", {}).get("command", [])
    sub, _ = static_parse(pre) if is_halo_argv(pre) else (None, None)
    check("%s: the sidecar's preStop runs `halo-sidecar drain --wait`" % rel,
          is_halo_argv(pre) and os.path.basename(pre[0]) == "halo-sidecar" and sub == "drain" and "--wait" in pre)
    check("%s: no startupProbe on the sidecar (it would wait for the app, which waits for it)" % rel,
          "startupProbe" not in sc)
    text = sc.get("_config", "")
    admin = toml_value(text, "admin", "listen") or "127.0.0.1:9902"
    admin_port = int(admin.rsplit(":", 1)[1])
    ports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
    for probe, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
        get = (sc.get(probe) or {}).get("httpGet", {})
        port = ports.get(get.get("port"), get.get("port"))
        check("%s: sidecar %s is GET %s on the admin port %d" % (rel, probe, path, admin_port),
              get.get("path") == path and port == admin_port, "httpGet %s" % get)
    check("%s: the admin API listens where the kubelet's probes reach it (not loopback)" % rel,
          not admin.startswith("127.") and not admin.startswith("[::1]"), admin)
    sec = sc.get("securityContext", {})
    pod_sec = spec.get("securityContext", {})
    check("%s: sidecar runs as non-root, read-only root, no privilege escalation, no capabilities" % rel,
          (sec.get("runAsNonRoot") or pod_sec.get("runAsNonRoot")) is True and sec.get("readOnlyRootFilesystem") is True
          and sec.get("allowPrivilegeEscalation") is False and sec.get("capabilities", {}).get("drop") == ["ALL"]
          and not sec.get("capabilities", {}).get("add"))
    env = {e["name"]: e for e in sc.get("env", [])}
    check("%s: HALO_SERVICE_ADDRESS is the pod IP (downward API)" % rel,
          env.get("HALO_SERVICE_ADDRESS", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP")
    check("%s: enableServiceLinks is false (a Service named halo would inject HALO_* variables)" % rel,
          spec.get("enableServiceLinks") is False)
    grace = seconds(toml_value(text, "drain", "grace") or "%ds" % SIDECAR_DEFAULT_GRACE)
    apps = spec.get("containers", [])
    sleeps = [((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds") for c in apps]
    check("%s: every app container's preStop sleeps longer than drain.grace (%gs) + deregistration (%gs)"
          % (rel, grace, SIDECAR_SHUTDOWN_MARGIN),
          bool(apps) and all(isinstance(s, int) and s > grace + SIDECAR_SHUTDOWN_MARGIN for s in sleeps), "sleeps %s" % sleeps)
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    longest = max([s for s in sleeps if isinstance(s, int)] or [0])
    check("%s: terminationGracePeriodSeconds (%ds) >= the app's preStop sleep (%ds) + 10s for its shutdown"
          % (rel, tgps, longest), tgps >= longest + 10)


def k8s_design_lb(rel, docs):
    sets = [d for d in docs if d.get("kind") == "DaemonSet"]
    if not check("%s: one DaemonSet" % rel, len(sets) == 1):
        return
    spec = pod_spec(sets[0])
    _, lb = find_container(spec, "halo-lb")
    if not check("%s: runs halo-lb" % rel, lb is not None):
        return
    check("%s: host networking" % rel, spec.get("hostNetwork") is True)
    caps = lb.get("securityContext", {}).get("capabilities", {})
    check("%s: exactly NET_ADMIN, NET_RAW, NET_BIND_SERVICE, everything else dropped" % rel,
          sorted(caps.get("add", [])) == ["NET_ADMIN", "NET_BIND_SERVICE", "NET_RAW"] and caps.get("drop") == ["ALL"])
    sec = lb.get("securityContext", {})
    check("%s: no privilege escalation, read-only root" % rel,
          sec.get("allowPrivilegeEscalation") is False and sec.get("readOnlyRootFilesystem") is True)
    text = lb.get("_config", "")
    drain = seconds(toml_value(text, None, "drain_timeout") or "%ds" % LB_DEFAULT_DRAIN_TIMEOUT)
    tgps = spec.get("terminationGracePeriodSeconds", 30)
    check("%s: terminationGracePeriodSeconds (%ds) > drain_timeout (%gs)" % (rel, tgps, drain), tgps > drain)


# ---- Main ------------------------------------------------------------------
def guarded(what, fn, *args):
    """Runs one group of checks; an exception (a value that does not parse,
    a missing key) is a failed check, and the other groups still run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, never swallowed
        check(what, False, "%s: %s" % (type(e).__name__, e))
        return None


def main():
    version = workspace_version()
    check("Cargo.toml has a workspace version", bool(version), version or "")
    for prog, path in BINS.items():
        print("== %s: %s" % (prog, path or "none (binary checks skipped)"))
        if path and not os.access(path, os.X_OK):
            check("%s binary %s is executable" % (prog, path), False, "from %s" % ("HALO_LB_BIN" if prog == "halo-lb" else "HALO_SIDECAR_BIN"))
            BINS[prog] = None

    nomad_dir = os.path.join(HERE, "nomad")
    nomad_files = sorted(os.path.join(nomad_dir, f) for f in os.listdir(nomad_dir) if f.endswith(".hcl"))
    check("packaging/nomad has job files", bool(nomad_files))
    for path in nomad_files:
        print("== %s" % os.path.relpath(path, REPO))
        rel = os.path.relpath(path, REPO)
        parsed = guarded("%s: checks ran to the end" % rel, nomad_file, path, version)
        if not parsed:
            continue
        job_name, job_type, job, tasks = parsed
        if "halo-lb" in tasks:
            guarded("%s: halo-lb design checks ran to the end" % rel, nomad_design_lb, rel, job_type, job, tasks)
        if "halo-sidecar" in tasks:
            guarded("%s: sidecar design checks ran to the end" % rel, nomad_design_app, rel, job_type, job, tasks)

    k8s_dir = os.path.join(HERE, "kubernetes")
    k8s_files = sorted(os.path.join(k8s_dir, f) for f in os.listdir(k8s_dir) if f.endswith((".yaml", ".yml")))
    check("packaging/kubernetes has manifests", bool(k8s_files))
    for path in k8s_files:
        print("== %s" % os.path.relpath(path, REPO))
        rel = os.path.relpath(path, REPO)
        docs = guarded("%s: checks ran to the end" % rel, kubernetes_file, path, version) or []
        if any(pod_spec(d) and find_container(pod_spec(d), "halo-sidecar")[1] for d in docs):
            guarded("%s: sidecar design checks ran to the end" % rel, k8s_design_sidecar, rel, docs)
        if any(d.get("kind") == "DaemonSet" for d in docs):
            guarded("%s: halo-lb design checks ran to the end" % rel, k8s_design_lb, rel, docs)

    print()
    print("%d passed, %d failed, %d skipped" % (RESULTS["passed"], RESULTS["failed"], RESULTS["skipped"]))
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
