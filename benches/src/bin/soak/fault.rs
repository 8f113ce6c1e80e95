//! The kinds of fault the soak injects, with the client gap each may cost
//! and the handovers it may cause, and the record of one injected fault.
//! Injecting them is [`crate::inject`]'s.

use std::time::{Duration, Instant};

/// A kind of fault, as `SOAK_FAULTS` names it ([`Fault::key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fault {
    Kill,
    Sigstop,
    PowerOff,
    Cable,
    CutApart,
    LeaderKill,
    ProbeDrop,
    ForgedIcmp,
}

impl Fault {
    pub(crate) const ALL: [Fault; 8] = [
        Fault::Kill,
        Fault::Sigstop,
        Fault::PowerOff,
        Fault::Cable,
        Fault::CutApart,
        Fault::LeaderKill,
        Fault::ProbeDrop,
        Fault::ForgedIcmp,
    ];

    pub(crate) fn key(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Sigstop => "sigstop",
            Fault::PowerOff => "power-off",
            Fault::Cable => "cable",
            Fault::CutApart => "cut-apart",
            Fault::LeaderKill => "leader-kill",
            Fault::ProbeDrop => "probe-drop",
            Fault::ForgedIcmp => "forged-icmp",
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9 of the active halo-lb",
            Fault::Sigstop => "SIGSTOP of the active halo-lb",
            Fault::PowerOff => "power-off of the active host",
            Fault::Cable => "cable pull of the active host",
            Fault::CutApart => "the two balancers cut apart",
            Fault::LeaderKill => "the Consul leader killed",
            Fault::ProbeDrop => "probe traffic between the balancers dropped",
            Fault::ForgedIcmp => "forged ICMP port-unreachable at the standby's probe socket",
        }
    }

    /// The longest client gap allowed around it: several times halo's goals
    /// for the failovers (as lb/tests/it/production.rs bounds them), an
    /// election plus a confirmation for the leader kill, and for the faults
    /// that must not cost a failover of their own (or one handover at
    /// most), a few hundred milliseconds.
    pub(crate) fn bound(self) -> Duration {
        match self {
            Fault::Kill => Duration::from_secs(2),
            Fault::Sigstop => Duration::from_secs(5),
            Fault::PowerOff | Fault::Cable => Duration::from_secs(4),
            Fault::LeaderKill => Duration::from_secs(30),
            Fault::CutApart | Fault::ProbeDrop => Duration::from_millis(800),
            Fault::ForgedIcmp => Duration::from_millis(300),
        }
    }

    /// The most handovers (a term of another process than the last one)
    /// that may start while it lasts, where it has a limit.
    pub(crate) fn max_handovers(self) -> Option<usize> {
        match self {
            Fault::CutApart | Fault::ProbeDrop => Some(1),
            Fault::ForgedIcmp => Some(0),
            _ => None,
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
pub(crate) struct FaultRec {
    pub(crate) kind: Fault,
    pub(crate) victim: usize,
    pub(crate) at: Instant,
    pub(crate) wall: u64,
    /// How long it was held (frozen, off, unplugged, cut).
    pub(crate) held: Duration,
    /// Recovery done: the pair whole and steady again.
    pub(crate) recovered: Option<Instant>,
    pub(crate) note: String,
}
