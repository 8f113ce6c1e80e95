//! The checks over the run's record and the summary table: no two active
//! terms overlapped, two hosts never held the VIP at once (leftovers of a
//! killed, frozen or powered-off host excused), every client gap within its
//! fault's bound, no byte corrupted, every halo-lb process's descriptors and
//! RSS flat over its life.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use crate::clients::{Attempt, Break, Seen};
use crate::fault::Fault;
use crate::pair::{ProcStat, Soak, TermRec};
use crate::{ms, started};

/// Growth over a process's life beyond which its descriptors or RSS are
/// not flat: generous, since a process that starts as a standby and ends
/// as the active holds listeners, connections and their buffers.
const FD_GROWTH: usize = 64;
const RSS_GROWTH_KIB: u64 = 32 * 1024;
/// A stream's last echo comes up to a chunk's round trip (and the 10 ms
/// between chunks) before the fault that broke it: a break counts for the
/// fault that started within this long after its last echo. Faults are
/// seconds apart, with the client steady before each.
const BREAK_SLACK: Duration = Duration::from_millis(250);

/// The client's gap around a fault at `from`: the longest time between the
/// starts of two successive successful connections, from the last success
/// before `from` through the successes started in `[from, to)`.
fn gap(attempts: &[Attempt], from: Instant, to: Instant) -> Option<Duration> {
    let mut prev = attempts
        .iter()
        .filter(|p| p.ok && p.at < from)
        .map(|p| p.at)
        .next_back()?;
    let mut worst = None;
    for p in attempts.iter().filter(|p| p.ok && p.at >= from && p.at < to) {
        worst = Some(worst.unwrap_or(Duration::ZERO).max(p.at - prev));
        prev = p.at;
    }
    worst
}

/// Pairs of terms of different processes that overlap or share an epoch.
fn overlaps(terms: &[TermRec], end: u64) -> Vec<String> {
    let mut bad = Vec::new();
    for (n, a) in terms.iter().enumerate() {
        for b in &terms[n + 1..] {
            if a.who == b.who {
                continue;
            }
            let (a_to, b_to) = (a.to.unwrap_or(end), b.to.unwrap_or(end));
            if a_to > b.from && b_to > a.from {
                bad.push(format!(
                    "two actives at once: {a:?} and {b:?} overlap by {} ms",
                    (a_to.min(b_to) - a.from.max(b.from)) / 1000
                ));
            }
            if a.epoch == b.epoch {
                bad.push(format!("two processes with one epoch: {a:?} {b:?}"));
            }
        }
    }
    bad
}

/// Handovers (a term of another process than the term before it) that
/// started in `[from, to)`, unix µs.
fn handovers(terms: &[TermRec], from: u64, to: u64) -> usize {
    terms
        .windows(2)
        .filter(|w| w[0].who != w[1].who && w[1].from >= from && w[1].from < to)
        .count()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `N (how: n, …)`.
fn render_breaks(breaks: &[Break]) -> String {
    let mut by: BTreeMap<Break, usize> = BTreeMap::new();
    for b in breaks {
        *by.entry(*b).or_default() += 1;
    }
    if by.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = by.iter().map(|(b, n)| format!("{}: {n}", b.key())).collect();
    format!("{} ({})", breaks.len(), parts.join(", "))
}

fn render_stat(s: Option<ProcStat>) -> String {
    s.map_or("-".into(), |s| {
        format!("{} fds, {:.1} MiB", s.fds, s.rss_kib as f64 / 1024.0)
    })
}

/// Runs every check and renders the table; the table ends with a
/// `**FAILED**` line listing the violations if there are any.
pub(crate) fn check_and_render(
    st: &Soak<'_>,
    seen: &Seen,
    samples: &[(Instant, [bool; 2])],
    ended: Instant,
    end_wall: u64,
    desc: &str,
) -> String {
    let s = st.s;
    let mut violations = st.violations.clone();
    let mut attempts = seen.attempts().clone();
    // Pushed as they end; the gaps want them by start.
    attempts.sort_by_key(|a| a.at);
    let corruptions = seen.corruptions.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let breaks = seen.breaks.lock().unwrap_or_else(PoisonError::into_inner).clone();

    // Terms.
    let mut terms: Vec<TermRec> = st
        .terms
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|((who, epoch, from), to)| TermRec {
            who: who.clone(),
            epoch: *epoch,
            from: *from,
            to: *to,
        })
        .collect();
    terms.sort_by_key(|t| t.from);
    let overlapping = overlaps(&terms, end_wall);
    violations.extend(overlapping.iter().cloned());

    // VIP holders.
    let mut two = 0usize;
    let mut excused = 0usize;
    for (at, h) in samples {
        if h[0] && h[1] {
            let counted = (1..=2)
                .filter(|lb| {
                    !st.excuses
                        .iter()
                        .any(|e| e.lb == *lb && e.from <= *at && *at <= e.until)
                })
                .count();
            if counted > 1 {
                two += 1;
                if two <= 5 {
                    violations.push(format!(
                        "two hosts hold the VIP at +{:.2} s",
                        at.duration_since(started()).as_secs_f64()
                    ));
                }
            } else {
                excused += 1;
            }
        }
    }
    if two > 5 {
        violations.push(format!("… {two} samples with two holders in all"));
    }

    // Gaps, handovers and breaks per fault.
    #[derive(Default)]
    struct PerKind {
        gaps: Vec<Duration>,
        handovers: Vec<usize>,
        breaks: Vec<Break>,
    }
    let mut per: BTreeMap<Fault, PerKind> = BTreeMap::new();
    let mut detail = String::new();
    for (n, f) in st.faults.iter().enumerate() {
        let until = st.faults.get(n + 1).map_or(ended, |g| g.at);
        let until_wall = st.faults.get(n + 1).map_or(end_wall, |g| g.wall);
        let g = gap(&attempts, f.at, until);
        let h = handovers(&terms, f.wall, until_wall);
        let in_window: Vec<Break> = breaks
            .iter()
            .filter(|(t, _)| *t + BREAK_SLACK >= f.at && *t + BREAK_SLACK < until)
            .map(|(_, how)| *how)
            .collect();
        let b = in_window.len();
        let p = per.entry(f.kind).or_default();
        match g {
            Some(g) => {
                p.gaps.push(g);
                if g > f.kind.bound() {
                    violations.push(format!(
                        "fault {} ({}, lb{} active): client gap {} beyond its bound {}",
                        n + 1,
                        f.kind.key(),
                        f.victim,
                        ms(g),
                        ms(f.kind.bound())
                    ));
                }
            }
            None => violations.push(format!(
                "fault {} ({}): the client was never served after it",
                n + 1,
                f.kind.key()
            )),
        }
        if f.kind == Fault::ForgedIcmp && b > 0 {
            violations.push(format!(
                "fault {} (forged-icmp): {b} stream(s) broke without a handover",
                n + 1
            ));
        }
        if let Some(max) = f.kind.max_handovers() {
            if h > max {
                violations.push(format!(
                    "fault {} ({}): {h} handovers, at most {max} allowed",
                    n + 1,
                    f.kind.key()
                ));
            }
        }
        p.handovers.push(h);
        p.breaks.extend(in_window);
        let _infallible = writeln!(
            detail,
            "{:>3}. +{:>7.1} s {:<12} lb{} active; held {}; gap {}; {h} handover(s); {b} stream break(s); recovered after {}{}{}",
            n + 1,
            f.at.duration_since(started()).as_secs_f64(),
            f.kind.key(),
            f.victim,
            ms(f.held),
            g.map_or("-".into(), ms),
            f.recovered.map_or("-".into(), |r| ms(r - f.at)),
            if f.note.is_empty() { "" } else { "; " },
            f.note
        );
    }
    let first = st.faults.first().map_or(ended, |f| f.at);
    let steady_breaks = breaks.iter().filter(|(t, _)| *t + BREAK_SLACK < first).count();

    // Descriptors and RSS.
    let mut lives = String::new();
    for l in &st.lives {
        if let (Some(a), Some(b)) = (l.start, l.end) {
            if b.fds > a.fds + FD_GROWTH {
                violations.push(format!("{}: descriptors grew {} → {}", l.who, a.fds, b.fds));
            }
            if b.rss_kib > a.rss_kib + RSS_GROWTH_KIB {
                violations.push(format!("{}: RSS grew {} → {} KiB", l.who, a.rss_kib, b.rss_kib));
            }
        }
        let _infallible = writeln!(
            lives,
            "| {} | {:.0} s | {} | {} | {} | {} |",
            l.who,
            l.died.unwrap_or(ended).duration_since(l.born).as_secs_f64(),
            render_stat(l.start),
            render_stat(l.end),
            render_stat(l.peak),
            l.how
        );
    }
    violations.extend(corruptions.iter().take(10).cloned());
    if corruptions.len() > 10 {
        violations.push(format!("… {} corruptions in all", corruptions.len()));
    }

    let mut out = String::new();
    let ok_conns = attempts.iter().filter(|a| a.ok).count();
    let _infallible = writeln!(
        out,
        "## Soak: {} s, seed {}, {} faults\n",
        s.seconds,
        s.seed,
        st.faults.len()
    );
    let _infallible = writeln!(
        out,
        "| fault | count | client gap p50 | gap max | bound | handovers (max) | streams broken |\n|---|---|---|---|---|---|---|"
    );
    for (kind, p) in &per {
        let mut g = p.gaps.clone();
        g.sort();
        let _infallible = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {}{} | {} |",
            kind.describe(),
            p.handovers.len(),
            ms(percentile(&g, 0.5)),
            ms(g.last().copied().unwrap_or_default()),
            ms(kind.bound()),
            p.handovers.iter().max().copied().unwrap_or(0),
            kind.max_handovers().map_or(String::new(), |m| format!(" (≤ {m})")),
            render_breaks(&p.breaks)
        );
    }
    let _infallible = writeln!(
        out,
        "\n| check | figure |\n|---|---|\n\
         | overlapping active terms | {} (of {} terms, {} processes) |\n\
         | samples with two VIP holders | {two} (of {}; {excused} excused: a killed, frozen or powered-off host's leftover) |\n\
         | new connections | {} ok, {} failed (of {}, {} per second) |\n\
         | corrupted answers / stream bytes | {} |\n\
         | bytes checked end to end | {} in streams, {} in new connections |\n\
         | streams opened / broken | {} / {} ({} before the first fault) |\n\
         | damped standbys restarted in recovery | {} |",
        overlapping.len(),
        terms.len(),
        st.lives.len(),
        samples.len(),
        ok_conns,
        attempts.len() - ok_conns,
        attempts.len(),
        s.rate,
        corruptions.len(),
        seen.stream_bytes.load(Ordering::Relaxed),
        seen.conn_bytes.load(Ordering::Relaxed),
        seen.stream_opens.load(Ordering::Relaxed),
        breaks.len(),
        steady_breaks,
        st.restarts_damped
    );
    let _infallible = writeln!(
        out,
        "\n| halo-lb process | life | start (ready) | end | peak | ended |\n|---|---|---|---|---|---|\n{lives}"
    );
    let _infallible = writeln!(out, "Faults in order:\n\n```\n{detail}```\n");
    for n in &st.notes {
        let _infallible = writeln!(out, "Note: {n}");
    }
    let _infallible = writeln!(
        out,
        "\nRun by benches/soak.sh; halo-lb {}; Consul timing: {desc}; halo [ha] defaults; {} streams; bounds: fds +{FD_GROWTH}, RSS +{} MiB over a process's life. Raw output: {}.",
        s.halo_commit,
        s.streams,
        RSS_GROWTH_KIB / 1024,
        s.out.display()
    );
    if violations.is_empty() {
        let _infallible = writeln!(out, "\nPASSED: no violation.");
    } else {
        let _infallible = writeln!(out, "\n**FAILED**: {} violation(s):", violations.len());
        for v in &violations {
            let _infallible = writeln!(out, "- {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handovers_count_changes_of_process_only() {
        let t = |who: &str, from: u64| TermRec {
            who: who.into(),
            epoch: from,
            from,
            to: Some(from + 5),
        };
        let terms = [t("lb1#1", 0), t("lb1#1", 10), t("lb2#1", 20), t("lb1#2", 30)];
        assert_eq!(handovers(&terms, 5, 100), 2);
        assert_eq!(handovers(&terms, 5, 25), 1);
        assert_eq!(handovers(&terms, 0, 15), 0, "a new term of the same process");
    }

    #[test]
    fn overlaps_find_two_actives_and_shared_epochs() {
        let t = |who: &str, epoch: u64, from: u64, to: Option<u64>| TermRec {
            who: who.into(),
            epoch,
            from,
            to,
        };
        assert!(overlaps(&[t("a", 1, 0, Some(10)), t("b", 2, 10, None)], 20).is_empty());
        assert_eq!(overlaps(&[t("a", 1, 0, None), t("b", 2, 10, Some(12))], 20).len(), 1);
        assert_eq!(overlaps(&[t("a", 1, 0, Some(5)), t("b", 1, 10, Some(12))], 20).len(), 1);
    }

    #[test]
    fn gap_is_the_longest_run_between_successes() {
        let t0 = Instant::now();
        let a = |ms: u64, ok: bool| Attempt {
            at: t0 + Duration::from_millis(ms),
            ok,
        };
        let attempts = [
            a(0, true),
            a(10, true),
            a(20, false),
            a(200, false),
            a(410, true),
            a(420, true),
        ];
        let g = gap(
            &attempts,
            t0 + Duration::from_millis(15),
            t0 + Duration::from_millis(500),
        );
        assert_eq!(g, Some(Duration::from_millis(400)));
    }
}
