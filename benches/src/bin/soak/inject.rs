//! Injecting a fault against the active ([`Soak::fault`]) and recovering
//! from it: the pair whole and the client served steadily again.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::fault::{Fault, FaultRec};
use crate::pair::{role, Excuse, Soak};
use crate::{log, ms, other, unix_us, Res, PROBE_PORT, READY};

impl Soak<'_> {
    /// Injects `kind` against the active and recovers.
    pub(crate) async fn fault(&mut self, kind: Fault, rng: &mut fastrand::Rng) -> Res<()> {
        let a = self.active().await?;
        let s = other(a);
        let host = format!("lb{a}");
        // Hold times are drawn for every kind so that a seed names one
        // sequence whatever the kinds do.
        let hold = Duration::from_millis(rng.u64(2000..=6000));
        let freeze = Duration::from_millis(rng.u64(2000..=4000));
        let mut rec = FaultRec {
            kind,
            victim: a,
            at: Instant::now(),
            wall: unix_us(),
            held: Duration::ZERO,
            recovered: None,
            note: String::new(),
        };
        log(&format!(
            "fault {}: {} (lb{a} active)",
            self.faults.len() + 1,
            kind.describe()
        ));
        match kind {
            Fault::Kill => {
                rec.at = Instant::now();
                rec.wall = unix_us();
                self.retire(a, "killed (SIGKILL)", |lb, _| lb.process.kill()).await?;
                self.release_vip(a);
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                self.launch(a);
                self.wait_role(a, "standby").await?;
                if self.holds_vip(a) {
                    self.violations
                        .push(format!("the restarted lb{a} holds the VIP as a standby"));
                }
                self.excuses.push(Excuse {
                    lb: a,
                    from: rec.at,
                    until: Instant::now(),
                });
            }
            Fault::Sigstop => {
                rec.held = freeze;
                let lb = self.lbs[a - 1].as_mut().ok_or("no active process")?;
                lb.process.pause();
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                tokio::time::sleep(freeze.saturating_sub(rec.at.elapsed())).await;
                let lb = self.lbs[a - 1].as_mut().ok_or("no active process")?;
                lb.process.resume();
                let thawed = Instant::now();
                self.wait("the woken instance to remove the VIP", READY, || async {
                    (!self.holds_vip(a)).then_some(())
                })
                .await?;
                rec.note = format!("removed the VIP {} after SIGCONT", ms(thawed.elapsed()));
                self.excuses.push(Excuse {
                    lb: a,
                    from: rec.at,
                    until: Instant::now(),
                });
                self.wait_role(a, "standby").await?;
            }
            Fault::PowerOff => {
                rec.held = hold;
                rec.at = Instant::now();
                rec.wall = unix_us();
                self.retire(a, "powered off", |_, dc| dc.power_off(&format!("lb{a}")))
                    .await?;
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                tokio::time::sleep(hold.saturating_sub(rec.at.elapsed())).await;
                self.dc.power_on(&host).await;
                self.excuses.push(Excuse {
                    lb: a,
                    from: rec.at,
                    until: Instant::now(),
                });
                self.launch(a);
                self.wait_role(a, "standby").await?;
            }
            Fault::Cable => {
                rec.held = hold;
                self.dc.unplug(&host);
                self.wait_role(s, "active").await?;
                self.served_after(rec.at).await?;
                let cut_off = self
                    .wait("the cut-off active to stop serving", READY, || async {
                        let st = self.status(a).await?;
                        (role(&st) != "active").then_some(())
                    })
                    .await;
                if let Err(e) = cut_off {
                    self.violations.push(format!("cable pull of lb{a}: {e}"));
                }
                rec.note = format!("the cut-off lb{a} stopped serving after {}", ms(rec.at.elapsed()));
                tokio::time::sleep(hold.saturating_sub(rec.at.elapsed())).await;
                let plugged = Instant::now();
                self.dc.plug(&host);
                // Its agent is a member again only after the servers retry
                // it (serf's reconnect interval, 30 s) or it pushes its state.
                self.wait_role(a, "standby").await?;
                let _infallible = write!(rec.note, "; standby again {} after the re-plug", ms(plugged.elapsed()));
            }
            Fault::CutApart => {
                rec.held = hold;
                self.dc.cut("lb1", "lb2");
                self.hold_watching(hold, rec.at).await;
                self.dc.heal("lb1", "lb2");
            }
            Fault::ProbeDrop => {
                rec.held = hold;
                self.dc.cut_udp("lb1", "lb2", PROBE_PORT);
                self.hold_watching(hold, rec.at).await;
                self.dc.heal_udp("lb1", "lb2", PROBE_PORT);
            }
            Fault::LeaderKill => {
                let old = self.dc.kill_leader().await;
                rec.note = format!("{old} was the leader");
                let dc = self.dc;
                let leader = self
                    .wait("a new Consul leader", READY, || async {
                        let l = dc.leader().await?;
                        (l != old).then_some(l)
                    })
                    .await?;
                let _infallible = write!(rec.note, "; {leader} leader after {}", ms(rec.at.elapsed()));
                self.served_after(Instant::now()).await?;
                self.dc.start_agent(&old).await;
            }
            Fault::ForgedIcmp => {
                rec.held = Duration::from_secs(3);
                let note = self.forge_icmp(a, s, rec.held).await?;
                rec.note = note;
            }
        }
        self.make_whole().await?;
        rec.recovered = Some(Instant::now());
        self.faults.push(rec);
        Ok(())
    }

    /// Holds a network fault for `hold`, polling both instances' status
    /// meanwhile (their terms are recorded as they go).
    async fn hold_watching(&self, hold: Duration, from: Instant) {
        while from.elapsed() < hold {
            for i in 1..=2 {
                self.status(i).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends forged ICMP port-unreachable messages, quoting the standby's
    /// probe socket, from the client host every 50 ms for `how_long`.
    async fn forge_icmp(&self, a: usize, s: usize, how_long: Duration) -> Res<String> {
        let active = self.status(a).await.ok_or("the active's /status")?;
        let probe: std::net::SocketAddrV4 = active["ha"]["probe"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("no IPv4 probe address in {}", active["ha"]))?;
        let netns = self.dc.lb(s).netns().to_owned();
        let port = self
            .wait("the standby's probe socket", Duration::from_secs(10), || async {
                halo_testkit::forge::connected_udp_port(&netns, "halo-lb", probe.into())
            })
            .await?;
        let before = metric(&self.metrics(s).await.unwrap_or_default(), UNCORROBORATED);
        let victim_ip = self.dc.lb(s).ip();
        let icmp = halo_testkit::forge::icmp_port_unreachable(victim_ip, port, probe);
        let victim = SocketAddr::from((victim_ip, 0));
        let sent = self
            .dc
            .client()
            .within(move || {
                use socket2::{Domain, Protocol, Socket, Type};
                let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
                let start = Instant::now();
                let mut sent = 0u32;
                while start.elapsed() < how_long {
                    raw.send_to(&icmp, &victim.into())?;
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(sent)
            })
            .map_err(|e| format!("send the forged ICMP messages: {e}"))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = metric(&self.metrics(s).await.unwrap_or_default(), UNCORROBORATED);
        Ok(format!(
            "{sent} sent quoting lb{s}'s port {port}; {} counted uncorroborated",
            after.saturating_sub(before)
        ))
    }
}

const UNCORROBORATED: &str = "halo_ha_probe_refusals_uncorroborated_total";

/// A counter's value in a Prometheus text page (0 when absent).
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
