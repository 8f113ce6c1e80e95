//! The client's log: `failover.py probe` on the client host opens a TCP
//! connection to the VIP every 5 ms and writes one line per attempt, on
//! CLOCK_MONOTONIC ([`crate::mono_ns`]); [`ProbeLog`] reads it as it grows
//! and answers what a round asks: is the client served steadily, by whom,
//! since when, and the longest gap around an event.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{log, mono_ns, Res, PROBE_DEADLINE};

/// The client's log (`<end ns> ok|fail <who> <start ns>` per attempt), read
/// as it grows.
#[derive(Debug)]
pub(crate) struct ProbeLog {
    path: PathBuf,
    pos: u64,
    rest: String,
    ok_t: Vec<i64>,
    ok_who: Vec<String>,
    fail_start: Vec<i64>,
    fail_end: Vec<i64>,
}

impl ProbeLog {
    pub(crate) fn new(path: PathBuf) -> ProbeLog {
        ProbeLog {
            path,
            pos: 0,
            rest: String::new(),
            ok_t: Vec::new(),
            ok_who: Vec::new(),
            fail_start: Vec::new(),
            fail_end: Vec::new(),
        }
    }

    fn poll(&mut self) {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        // At most 16 MiB per poll: the log grows by ~200 lines a second.
        match f.take(16 << 20).read_to_end(&mut buf) {
            Ok(n) => self.pos += n as u64,
            Err(e) => {
                log(&format!("cannot read {}: {e}", self.path.display()));
                return;
            }
        }
        let text = std::mem::take(&mut self.rest) + &String::from_utf8_lossy(&buf);
        let mut lines: Vec<&str> = text.split('\n').collect();
        self.rest = lines.pop().unwrap_or_default().to_owned();
        for line in lines {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [end, status, who, start] = parts[..] else { continue };
            let (Ok(end), Ok(start)) = (end.parse::<i64>(), start.parse::<i64>()) else {
                continue;
            };
            if status == "ok" {
                self.ok_t.push(end);
                self.ok_who.push(who.to_owned());
            } else {
                self.fail_end.push(end);
                self.fail_start.push(start);
            }
        }
    }

    pub(crate) fn last_who(&mut self) -> Option<String> {
        self.poll();
        self.ok_who.last().cloned()
    }

    /// Answers in the last 300 ms and no failure in the last 1.2 s.
    pub(crate) fn steady(&mut self) -> bool {
        self.poll();
        let now = mono_ns();
        let recent_ok = self.ok_t.last().is_some_and(|t| *t > now - 300_000_000);
        let recent_fail = self
            .fail_end
            .last()
            .is_some_and(|t| *t > now - (PROBE_DEADLINE.as_nanos() as i64 + 200_000_000));
        recent_ok && !recent_fail
    }

    /// When the host that answers now began answering (ns): the first of
    /// the unbroken run of its answers at the end of the log.
    pub(crate) fn answering_since(&mut self) -> Option<i64> {
        self.poll();
        let who = self.ok_who.last()?;
        let run = self.ok_who.iter().rev().take_while(|w| *w == who).count();
        Some(self.ok_t[self.ok_t.len() - run])
    }

    fn first_ok_after(&self, t: i64, who: &str) -> Option<usize> {
        let i = self.ok_t.partition_point(|x| *x <= t);
        (i..self.ok_t.len()).find(|j| self.ok_who[*j] == who)
    }

    /// Waits for an answer from `who` after `t_event`: the longest time
    /// between consecutive answers from the last one before the event to
    /// that one (ms), and when that answer came (ns).
    pub(crate) async fn gap(&mut self, t_event: i64, who: &str, timeout: Duration) -> Res<(f64, i64)> {
        let deadline = Instant::now() + timeout;
        let j = loop {
            self.poll();
            if let Some(j) = self.first_ok_after(t_event, who) {
                break j;
            }
            if Instant::now() > deadline {
                return Err(format!("no answer from {who} within {timeout:?} of the event"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let i = self.ok_t.partition_point(|x| *x <= t_event);
        if i == 0 {
            return Err("no answer before the event".into());
        }
        let times = &self.ok_t[i - 1..=j];
        let worst = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Ok((worst as f64 / 1e6, self.ok_t[j]))
    }

    /// Failed attempts that started between `from` and `to` (call a probe
    /// deadline after `to`).
    pub(crate) fn fails_between(&mut self, from: i64, to: i64) -> usize {
        self.poll();
        self.fail_start.iter().filter(|t| **t > from && **t < to).count()
    }
}
