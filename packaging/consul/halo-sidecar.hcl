# ACL policy for halo-sidecar (Consul 1.8 and later).
#
# One policy per service: replace WEB with the [service] name the sidecar
# registers (service.name), e.g. with
#
#   sed 's/WEB/billing-api/' halo-sidecar.hcl > halo-sidecar-billing-api.hcl
#   consul acl policy create -name halo-sidecar-billing-api -rules @halo-sidecar-billing-api.hcl
#   consul acl token create -description "billing-api sidecar" -policy-name halo-sidecar-billing-api
#
# Put the token's SecretID in a file readable by the sidecar's user only, and
# name it in [consul] token_file (or CONSUL_HTTP_TOKEN_FILE). A new token:
# replace the file and `systemctl reload halo-sidecar` (SIGHUP).
#
# Tested against Consul 1.8.7 with default_policy = "deny" by
# sidecar/tests/it/production_consul.rs: the sidecar registers, pushes its
# checks, drains and deregisters with exactly this policy.

# Register and deregister the instance, update its TTL checks, put it in
# and out of maintenance, read it back from the local agent.
service "WEB" {
  policy = "write"
}

# Read on nodes. Consul 1.8.7 does not need it for anything the sidecar
# does (a token with only the service rule above registers, pushes, sets
# maintenance and deregisters: consul/tests/it/acl.rs,
# service_write_alone_runs_a_sidecar_and_any_token_reads_itself); it is in
# Consul's own recommended policy for registering services, is read-only,
# and is kept for newer Consul versions.
node_prefix "" {
  policy = "read"
}
