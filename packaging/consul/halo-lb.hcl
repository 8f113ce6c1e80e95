# ACL policy for halo-lb (Consul 1.8 and later; legacy-free rule syntax).
#
#   consul acl policy create -name halo-lb -rules @halo-lb.hcl
#   consul acl token create -description "halo-lb on $(hostname)" -policy-name halo-lb
#
# Put the token's SecretID in a file readable by the halo-lb user only, and
# name it in [consul] token_file (or CONSUL_HTTP_TOKEN_FILE). A new token:
# replace the file and `systemctl reload halo-lb` (SIGHUP).
#
# Tested against Consul 1.8.7 with default_policy = "deny" by
# lb/tests/it/production_consul.rs: discovery and an elected pair work with
# exactly this policy.

# Discovery: GET /v1/health/service/<name> lists an instance only if the
# token may read its service and its node; without these Consul answers
# 200 [] (a filter that looks like "no instance").
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}

# [ha]: each instance registers itself as service "halo-lb" (with the TTL
# check its session is bound to) and heartbeats that check.
service "halo-lb" {
  policy = "write"
}

# [ha]: the lock, halo/<cluster>/leader (acquire, release, consistent reads),
# and the pair key that authenticates the balancers' probes,
# halo/<cluster>/probe-key (created by the first instance, read by all).
# Narrow it to key_prefix "halo/<cluster>/" if the token serves one pair.
key_prefix "halo/" {
  policy = "write"
}

# [ha]: sessions are created on the instance's own node, and a standby
# destroys the active's session (on the active's node) for a forced
# takeover, so write on every node's sessions. Narrow to the pair's two
# nodes with session "<node>" { policy = "write" } blocks if you prefer.
session_prefix "" {
  policy = "write"
}

# [ha] without probe_listen: each instance asks its local agent which
# address it advertises for the node (GET /v1/agent/self) and answers its
# peers' probes there. Narrow to agent "<node>" { policy = "read" } if the
# token is per host.
agent_prefix "" {
  policy = "read"
}

# Not needed: acl (GET /v1/acl/token/self answers any token, the
# anonymous one included, about itself: consul/tests/it/acl.rs), operator,
# keyring.
