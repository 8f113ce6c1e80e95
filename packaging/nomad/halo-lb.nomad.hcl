# halo-lb on every balancer node, as a Nomad system job.
#
# NOT RUN AGAINST A REAL NOMAD: packaging/test_orchestrators.py parses this
# file in CI and checks its images, its halo command lines (against the
# binaries' --help), the config it renders (`halo-lb check`) and the timing
# relations below. Nomad itself has never seen it: validate with
# `nomad job validate` / `nomad job plan` before the first real run.
#
# Driver: podman (nomad-driver-podman >= 0.5, for `entrypoint` as a list),
# running the image localhost/halo-lb:<version>, whose binary is
# /usr/bin/halo-lb and whose user is 65532. Why podman:
#   - the images are built for it (localhost/ names) and are the same
#     artifact as everywhere else;
#   - Podman gives the capabilities named in cap_add to a non-root user
#     (as ambient capabilities), so halo-lb runs as 65532 with exactly
#     NET_ADMIN, NET_RAW and NET_BIND_SERVICE, like the systemd unit.
#     (Docker and containerd do not: they leave a non-root user without them.)
#   - raw_exec would run it as root with every capability and no isolation;
#     exec would need /usr/bin/halo-lb installed on every client (the Debian
#     package) and NET_ADMIN added to the exec plugin's allow_caps.
# The client needs, in its podman plugin block:
#   allow_caps = ["net_admin", "net_raw", "net_bind_service", ...]
# (net_admin is not in the default list), and node meta halo_lb = "true" on
# the balancer nodes.

variable "halo_version" {
  type        = string
  description = "Tag of localhost/halo-lb to run (the workspace version)."
  default     = "0.1.0"
}

locals {
  # /etc/halo/halo-lb.toml of this job, rendered into each task's local/
  # directory. Every key and its default: packaging/examples/lb.toml.
  lb_config = <<-EOT
    # Shorter than the 30s default so that kill_timeout (below) fits under
    # Nomad's default client max_kill_timeout of 30s.
    drain_timeout = "20s"

    [admin]
    listen = "127.0.0.1:9901"

    # [consul] unset: the node's agent at CONSUL_HTTP_ADDR, else 127.0.0.1:8500
    # (this job uses the host's network).

    [ha]
    cluster = "edge"
    # id: default <hostname>-<admin port>-<netns inode>, unique per node.
    vip_address = "198.18.0.100/24"
    vip_interface = "eth0"

    [[vip]]
    name = "web"
    listen = "198.18.0.100:80"
    algorithm = "least_conn"
    service = "web"
    connect_timeout = "1s"
  EOT
}

job "halo-lb" {
  type        = "system"
  datacenters = ["*"]

  # Only the nodes meant to be balancers. All of them join one election
  # ([ha] cluster): one is active, the others are warm standbys.
  constraint {
    attribute = "${meta.halo_lb}"
    value     = "true"
  }

  # One node at a time: a standby keeps serving while the other restarts.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "halo-lb" {
    # The VIPs and the floating address live on the host's interfaces.
    network {
      mode = "host"
    }

    # Keep restarting (mode "delay"), never give up: a standby that is down
    # is a pair that cannot fail over.
    restart {
      attempts = 10
      interval = "5m"
      delay    = "2s"
      mode     = "delay"
    }

    task "halo-lb" {
      driver = "podman"
      user   = "65532"

      config {
        image           = "localhost/halo-lb:${var.halo_version}"
        entrypoint      = ["/usr/bin/halo-lb"]
        args            = ["--config", "/local/halo-lb.toml"]
        network_mode    = "host"
        cap_drop        = ["all"]
        cap_add         = ["net_admin", "net_raw", "net_bind_service"]
        readonly_rootfs = true
        # Two descriptors per proxied connection (four with splice), per VIP
        # up to max_connections (default 10000).
        ulimit {
          nofile = "1048576:1048576"
        }
      }

      template {
        data        = local.lb_config
        destination = "local/halo-lb.toml"
        # halo-lb reloads on SIGHUP; a bad file is logged and the running
        # config keeps serving.
        change_mode   = "signal"
        change_signal = "SIGHUP"
      }

      # SIGTERM: stop serving, hand the VIP over, drain for up to
      # drain_timeout (20s above). kill_timeout must be longer, and at most
      # the client's max_kill_timeout (default 30s), or Nomad cuts it.
      kill_signal  = "SIGTERM"
      kill_timeout = "25s"

      resources {
        cpu    = 1000
        memory = 256
      }
    }

    # The systemd unit's ExecStopPost: once the allocation's main task is
    # dead (also after kill_timeout ran out and it was SIGKILLed), remove a
    # floating address it could not remove itself. release-vip does nothing
    # if the address is not there, and refuses while the admin address is
    # in use (a halo-lb with this config still running). A halo-lb that
    # crashes and is restarted in place does not need it: the new process
    # starts as a standby and removes a leftover address itself.
    task "release-vip" {
      lifecycle {
        hook = "poststop"
      }

      driver = "podman"
      user   = "65532"

      config {
        image           = "localhost/halo-lb:${var.halo_version}"
        entrypoint      = ["/usr/bin/halo-lb"]
        args            = ["--config", "/local/halo-lb.toml", "release-vip"]
        network_mode    = "host"
        cap_drop        = ["all"]
        cap_add         = ["net_admin", "net_raw", "net_bind_service"]
        readonly_rootfs = true
      }

      template {
        data        = local.lb_config
        destination = "local/halo-lb.toml"
      }

      resources {
        cpu    = 100
        memory = 32
      }
    }
  }
}
