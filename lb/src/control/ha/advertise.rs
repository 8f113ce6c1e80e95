//! Where this instance answers probes, and what it tells its peers.
//!
//! The failure detector only works if a standby on another host can reach
//! the active's probe address. `ha.probe_listen` says it outright; unset,
//! the admin address is used when it is a specific address other than
//! loopback (the operator made it reachable), and otherwise — the secure
//! default, admin API on loopback — the node's address as the local Consul
//! agent advertises it to the cluster (`Member.Addr` of `/v1/agent/self`,
//! its LAN gossip address), on the admin port, over UDP. That is the
//! address every other agent, hence every peer's host, already reaches
//! this node at; a dev agent on loopback advertises 127.0.0.1, which is
//! what a pair on one host needs.
//!
//! When the agent's address is not one this host can bind (halo-lb in a
//! container network namespace beside an agent on the host's network), or
//! the agent refuses to say (an ACL token without `agent:read`), the admin
//! address is left: the peers then fall back on Consul's own detection,
//! and the start-up log says so at ERROR with what to set.
//!
//! Every peer also learns this instance's Consul node name (in the lock's
//! value), so that a standby never probes a loopback probe address that an
//! active on another node advertised: that would reach the standby's own
//! host, and whatever answered or refused there says nothing about the
//! active.

use std::net::SocketAddr;
use std::time::Duration;

use halo_consul::{AgentSelf, Client, Error as ConsulError};
use tokio_util::sync::CancellationToken;

use crate::settings::ProbeListen;

/// The probe address an instance advertises, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Advertised {
    pub addr: SocketAddr,
    pub why: String,
    /// Whether peers on other hosts can be expected to reach it.
    pub reachable: bool,
}

/// What the local agent says about this node, or why it cannot say.
pub(crate) type AgentView = Result<AgentSelf, ConsulError>;

/// The address to advertise for `listen`, given what the agent says.
pub(crate) fn choose(listen: ProbeListen, agent: &AgentView) -> Advertised {
    match listen {
        ProbeListen::Configured(addr) => Advertised {
            addr,
            why: "ha.probe_listen".to_owned(),
            reachable: !addr.ip().is_loopback(),
        },
        ProbeListen::Admin(addr) => Advertised {
            addr,
            why: "the admin address (admin.listen is not loopback; ha.probe_listen unset)".to_owned(),
            reachable: true,
        },
        ProbeListen::AgentAddress { port, admin } => match agent {
            Ok(agent) if agent.address.is_loopback() => Advertised {
                addr: SocketAddr::new(agent.address, port),
                why: format!(
                    "the local Consul agent advertises node {} at {}, a loopback address: peers on this host only",
                    agent.node_name, agent.address
                ),
                reachable: false,
            },
            Ok(agent) => Advertised {
                addr: SocketAddr::new(agent.address, port),
                why: format!(
                    "the address the local Consul agent advertises for node {}, on the admin port (admin.listen is loopback; ha.probe_listen unset)",
                    agent.node_name
                ),
                reachable: true,
            },
            Err(e) => Advertised {
                addr: admin,
                why: format!(
                    "the admin address, because the local Consul agent would not say its address ({e}); set ha.probe_listen, or grant agent:read"
                ),
                reachable: false,
            },
        },
    }
}

/// Asks the agent about this node, retrying while Consul is unreachable
/// (the election cannot start without it anyway); a refusal (an ACL that
/// lacks `agent:read`) is returned at once. `None` if `stop` came first.
pub(crate) async fn ask_agent(
    leadership: &super::Leadership,
    client: &Client,
    stop: &CancellationToken,
) -> Option<AgentView> {
    let mut retry = Duration::from_millis(100);
    let mut said = false;
    loop {
        match client.agent_self().await {
            Ok(agent) => {
                leadership.set_consul_error(None);
                return Some(Ok(agent));
            }
            Err(e) if e.is_unavailable() => {
                leadership.set_consul_error(Some(e.to_string()));
                if !said {
                    tracing::warn!(error = %e, "cannot ask the local Consul agent about this node yet; retrying");
                    said = true;
                }
            }
            Err(e) => return Some(Err(e)),
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(address: &str) -> AgentView {
        Ok(AgentSelf {
            node_name: "lb1".into(),
            datacenter: "dc1".into(),
            address: address.parse().unwrap(),
        })
    }

    #[test]
    fn each_rule_and_its_reason() {
        let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        let auto = ProbeListen::AgentAddress { port: 9901, admin };
        let a = choose(auto, &agent("198.18.0.11"));
        assert_eq!(a.addr, "198.18.0.11:9901".parse().unwrap());
        assert!(a.reachable);
        assert!(a.why.contains("node lb1"), "{}", a.why);

        let a = choose(auto, &agent("127.0.0.1"));
        assert_eq!(a.addr, admin);
        assert!(!a.reachable);
        assert!(a.why.contains("loopback"), "{}", a.why);

        let refused = Err(ConsulError::Config("no".into()));
        let a = choose(auto, &refused);
        assert_eq!(a.addr, admin);
        assert!(a.why.contains("ha.probe_listen"), "{}", a.why);

        let set: SocketAddr = "198.18.0.11:9902".parse().unwrap();
        assert_eq!(choose(ProbeListen::Configured(set), &refused).addr, set);
        let open: SocketAddr = "198.18.0.11:9901".parse().unwrap();
        assert_eq!(choose(ProbeListen::Admin(open), &refused).addr, open);
    }
}
