# An app with halo-sidecar beside it, as a Nomad service job: the sidecar
# registers each allocation with the node's Consul agent, probes the app,
# and drains it out of Consul before the app is stopped.
#
# NOT RUN AGAINST A REAL NOMAD: packaging/test_orchestrators.py parses this
# file in CI and checks its images, its halo command lines (against the
# binaries' --help), the sidecar config it renders (`halo-sidecar check`)
# and the ordering and timing below. Nomad itself has never seen it:
# validate with `nomad job validate` / `nomad job plan` before a real run.
#
# var.app_image is a placeholder (localhost/example-app:latest): put the
# app's image there. The app must listen on NOMAD_PORT_http (env PORT) on
# every address of the host, and answer GET /healthz.
#
# ---- Stop order: why the sidecar is the group's `leader`.
# Wanted: when an allocation stops (deploy, scale-in, node drain), the
# sidecar drains first (Consul maintenance, so balancers stop sending new
# connections; drain.grace for live ones to finish; deregistration) while
# the app still serves, and only then does the app get SIGTERM.
#   - lifecycle { hook = "prestart", sidecar = true } is the wrong order:
#     Nomad stops the leader first, then the main tasks, then sidecar tasks
#     last, so the app would be gone before the drain even began.
#   - a poststop task runs after the main tasks are dead: too late as well.
#   - shutdown_delay only delays the kill after Nomad deregisters the
#     services *Nomad* registered; halo-sidecar registers with Consul
#     itself, and a delay alone would not start its drain.
#   - leader = true on the sidecar (a main task, no lifecycle block): Nomad
#     kills the leader first and waits for it to exit (up to its
#     kill_timeout) before it signals the other tasks. SIGTERM is the
#     sidecar's drain, so the app gets SIGTERM only once the instance is
#     out of Consul. This is the arrangement used here.
# What leader also means: when the leader task is dead for good, Nomad
# stops the whole allocation. The restart block below never gives up
# (mode "delay"), so a crashing sidecar is restarted rather than taking the
# app down. And `POST /drain` on the sidecar's admin API (from loopback with
# `X-Halo-Request: 1`, or with the admin token) makes it drain and
# exit 0, after which Nomad restarts it (service jobs restart tasks whatever
# their exit code) and it registers again: to take one allocation out, use
# `nomad alloc stop`, which drains it through this ordering.

variable "halo_version" {
  type        = string
  description = "Tag of localhost/halo-sidecar to run (the workspace version)."
  default     = "0.1.0"
}

variable "app_image" {
  type        = string
  description = "The app's image (placeholder)."
  default     = "localhost/example-app:latest"
}

job "web" {
  type        = "service"
  datacenters = ["*"]

  # Deployments judge health by task states: Nomad does not see the Consul
  # registration the sidecar makes.
  update {
    max_parallel     = 1
    health_check     = "task_states"
    min_healthy_time = "15s"
  }

  group "web" {
    count = 3

    # Host networking: the sidecar reaches the app and the node's Consul
    # agent on 127.0.0.1; each allocation gets its own app and admin ports.
    network {
      mode = "host"
      port "http" {}
      port "admin" {}
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "delay"
    }

    task "halo-sidecar" {
      leader = true
      driver = "podman"
      user   = "65532"

      config {
        image           = "localhost/halo-sidecar:${var.halo_version}"
        entrypoint      = ["/usr/bin/halo-sidecar"]
        args            = ["--config", "/local/sidecar.toml"]
        network_mode    = "host"
        cap_drop        = ["all"]
        readonly_rootfs = true
      }

      # Per-allocation values come from Nomad's environment at render time.
      template {
        destination = "local/sidecar.toml"
        data        = <<-EOT
          [service]
          name = "web"
          id = "web-{{ env "NOMAD_ALLOC_ID" }}"
          address = "{{ env "NOMAD_IP_http" }}"
          port = {{ env "NOMAD_PORT_http" }}
          tags = ["nomad"]
          meta = { zone = "{{ env "meta.zone" }}" }

          [[check]]
          name = "http"
          type = "http"
          url = "http://127.0.0.1:{{ env "NOMAD_PORT_http" }}/healthz"
          interval = "1s"
          timeout = "500ms"

          [admin]
          listen = "127.0.0.1:{{ env "NOMAD_PORT_admin" }}"

          [drain]
          grace = "10s"
        EOT
      }

      # SIGTERM is the drain: drain.grace (10s) + deregistration (at most
      # 3s) + exit. kill_timeout must cover it (SIGKILL would leave the
      # instance in Consul, critical, until reaped) and stay within the
      # client's max_kill_timeout (default 30s).
      kill_signal  = "SIGTERM"
      kill_timeout = "20s"

      resources {
        cpu    = 100
        memory = 64
      }
    }

    task "app" {
      driver = "podman"

      config {
        image        = var.app_image
        network_mode = "host"
      }

      env {
        PORT = "${NOMAD_PORT_http}"
      }

      # Signalled only after the sidecar has drained and exited (see the
      # top of this file): by then no balancer sends it new connections.
      kill_timeout = "10s"

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
