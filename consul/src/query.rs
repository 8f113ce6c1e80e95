//! Read options, response metadata, and the blocking-query loop every watcher
//! uses.
//!
//! Consul's blocking queries are long polls: send the `X-Consul-Index` of the
//! last answer as `?index=` and Consul holds the request until the result's
//! index moves past it or `wait` runs out. Getting the loop right takes a few
//! rules that [`Watch`] applies so callers don't have to (see Consul's
//! "blocking queries" docs):
//! - an answer does not mean a change, so callers compare bodies;
//! - if the index goes backwards (a snapshot restore, a new leader with an
//!   older view) it is reset to 0 so the next call returns at once;
//! - an index of 0 is never sent after the first call (it would return at once,
//!   every time: a hot loop), it is raised to 1;
//! - the loop is rate limited, since unrelated writes can move a health
//!   query's index many times a second;
//! - failures back off exponentially (capped, with jitter) instead of spinning,
//!   and the next call after a failure does not block: the server may have
//!   restarted with a lower index, on which a blocking read would wait out
//!   the whole `wait`.

use std::time::Duration;

use http::header::HeaderMap;
use tokio::time::Instant;

use crate::Error;

/// How a read is served, traded off between freshness and availability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Served by the leader without a quorum check; may be stale by a few
    /// milliseconds around a leader change.
    #[default]
    Default,
    /// Served by any server, even one without a leader. Look at
    /// [`QueryMeta::last_contact`] to bound staleness.
    Stale,
    /// The leader first confirms with a quorum that it still leads. Use it to
    /// watch locks.
    Consistent,
}

/// Options of one read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryOptions {
    /// Consistency mode.
    pub consistency: Consistency,
    /// Block until the result's index passes this one. Unset: answer at once.
    pub index: Option<u64>,
    /// Longest time to block; only used with `index`. Unset: Consul's default
    /// of 5 minutes ([`crate::DEFAULT_WAIT`]).
    pub wait: Option<Duration>,
}

impl QueryOptions {
    /// A read in the given consistency mode that answers at once.
    pub fn with_consistency(consistency: Consistency) -> Self {
        QueryOptions {
            consistency,
            ..QueryOptions::default()
        }
    }

    /// A blocking read: wait up to `wait` for the index to pass `index`.
    pub fn blocking(index: u64, wait: Duration) -> Self {
        QueryOptions {
            index: Some(index),
            wait: Some(wait),
            ..QueryOptions::default()
        }
    }

    /// The wait this read may block for, if it blocks at all.
    pub(crate) fn blocking_wait(&self) -> Option<Duration> {
        self.index
            .filter(|&i| i > 0)
            .map(|_| self.wait.unwrap_or(crate::DEFAULT_WAIT))
    }

    pub(crate) fn apply(&self, query: &mut Vec<(&'static str, String)>) {
        match self.consistency {
            Consistency::Default => {}
            Consistency::Stale => query.push(("stale", String::new())),
            Consistency::Consistent => query.push(("consistent", String::new())),
        }
        if let Some(index) = self.index.filter(|&i| i > 0) {
            query.push(("index", index.to_string()));
            if let Some(wait) = self.wait {
                // Consul reads whole milliseconds at best; never send "0s"
                // for a sub-millisecond wait, which would mean "default".
                query.push(("wait", format!("{}ms", wait.as_millis().max(1))));
            }
        }
    }
}

/// What Consul says about the answer itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryMeta {
    /// `X-Consul-Index`: pass it back to block for the next change. 0 if absent.
    pub index: u64,
    /// `X-Consul-KnownLeader`: false when the answering server knows of no
    /// leader (only possible with stale reads, or during an election).
    pub known_leader: bool,
    /// `X-Consul-LastContact`: how long since the answering server last heard
    /// from the leader. Zero when the leader answered.
    pub last_contact: Duration,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: Consul left out entries
    /// the token may not read. False when the header is absent, which proves
    /// nothing: Consul 1.8 never sends it, and later versions not for the
    /// anonymous token (see [`crate::TokenStatus::empty_may_be_acl_filter`]).
    pub results_filtered_by_acls: bool,
    /// `X-Consul-Default-ACL-Policy` (`allow` or `deny`), sent by later
    /// Consul versions; `None` when absent (always on Consul 1.8) or unknown.
    pub default_acl_policy: Option<AclPolicy>,
}

/// An ACL default policy, as `X-Consul-Default-ACL-Policy` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclPolicy {
    /// Whatever no rule denies is allowed.
    Allow,
    /// Whatever no rule allows is denied (and filtered out of lists).
    Deny,
}

impl QueryMeta {
    pub(crate) fn from_headers(headers: &HeaderMap) -> QueryMeta {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        QueryMeta {
            index: header("X-Consul-Index").and_then(|v| v.parse().ok()).unwrap_or(0),
            known_leader: header("X-Consul-KnownLeader") == Some("true"),
            last_contact: Duration::from_millis(
                header("X-Consul-LastContact").and_then(|v| v.parse().ok()).unwrap_or(0),
            ),
            results_filtered_by_acls: header("X-Consul-Results-Filtered-By-ACLs") == Some("true"),
            default_acl_policy: match header("X-Consul-Default-ACL-Policy") {
                Some("allow") => Some(AclPolicy::Allow),
                Some("deny") => Some(AclPolicy::Deny),
                _ => None,
            },
        }
    }
}

/// A decoded answer with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response<T> {
    /// The decoded body.
    pub value: T,
    /// Index, leader and staleness headers.
    pub meta: QueryMeta,
}

/// Default token-bucket size of a [`Watch`]: answers it may take back to back.
pub const DEFAULT_WATCH_BURST: u32 = 5;
/// Default sustained rate of a [`Watch`], in calls per second.
pub const DEFAULT_WATCH_RATE: f64 = 5.0;
/// First back-off after a failed call.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest back-off between failed calls.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The state of one blocking-query loop: index, rate limit and back-off.
///
/// ```no_run
/// # async fn demo(client: halo_consul::Client) -> Result<(), halo_consul::Error> {
/// use std::time::Duration;
/// use halo_consul::{Watch, HealthQuery};
///
/// let mut watch = Watch::new(Duration::from_secs(30));
/// let mut last = None;
/// loop {
///     let answer = watch
///         .next(|opts| client.health_service("web", HealthQuery::passing(), opts))
///         .await?;
///     if last.as_ref() != Some(&answer.value) {
///         // rebuild the table...
///         last = Some(answer.value);
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Watch {
    index: u64,
    wait: Duration,
    consistency: Consistency,
    bucket: TokenBucket,
    backoff_min: Duration,
    backoff_max: Duration,
    failures: u32,
}

impl Watch {
    /// A watch that blocks up to `wait` per call, starting with a non-blocking
    /// read.
    pub fn new(wait: Duration) -> Self {
        Watch {
            index: 0,
            wait,
            consistency: Consistency::Default,
            bucket: TokenBucket::new(DEFAULT_WATCH_BURST, DEFAULT_WATCH_RATE),
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            failures: 0,
        }
    }

    /// Reads in this consistency mode.
    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Allows `burst` calls back to back and `per_second` sustained.
    pub fn rate_limit(mut self, burst: u32, per_second: f64) -> Self {
        self.bucket = TokenBucket::new(burst, per_second);
        self
    }

    /// Backs off from `min` doubling up to `max` after consecutive failures.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// The index the next call blocks on (0: it will not block).
    pub fn index(&self) -> u64 {
        self.index
    }

    /// Consecutive failed calls so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The options of the next call.
    pub fn options(&self) -> QueryOptions {
        QueryOptions {
            consistency: self.consistency,
            index: (self.index > 0).then_some(self.index),
            wait: Some(self.wait),
        }
    }

    /// Records the index of an answer, applying the reset and floor rules.
    pub fn observe(&mut self, meta: &QueryMeta) {
        self.index = if meta.index < self.index {
            // Went backwards: start over with a non-blocking read.
            0
        } else {
            // Never 0 after a call: that would not block.
            meta.index.max(1)
        };
    }

    /// Makes the next call at once (no back-off) and non-blocking: for a
    /// caller that abandoned a call because it learned the server answers
    /// again.
    pub fn retry_now(&mut self) {
        self.failures = 0;
        self.index = 0;
    }

    /// Waits for the rate limit and any back-off, runs one call with the
    /// watch's options, and records its index. Errors are returned, and the
    /// next call backs off.
    pub async fn next<T, F, Fut>(&mut self, call: F) -> Result<Response<T>, Error>
    where
        F: FnOnce(QueryOptions) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Error>>,
    {
        if self.failures > 0 {
            tokio::time::sleep(self.backoff_delay()).await;
        }
        self.bucket.take().await;
        match call(self.options()).await {
            Ok(answer) => {
                self.failures = 0;
                self.observe(&answer.meta);
                Ok(answer)
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                // After a failure we no longer know what the server has seen
                // (an agent may have restarted with a fresh, lower index, and
                // a blocking read on our old index would then hang for the
                // whole wait): start over with a non-blocking read.
                self.index = 0;
                Err(e)
            }
        }
    }

    /// Capped exponential back-off with up to 25 % jitter either way.
    fn backoff_delay(&self) -> Duration {
        let exp = self.failures.saturating_sub(1).min(16);
        let base = self.backoff_min.saturating_mul(1 << exp).min(self.backoff_max);
        let jitter = 0.75 + fastrand::f64() * 0.5;
        base.mul_f64(jitter).min(self.backoff_max)
    }
}

/// A token bucket on tokio's clock (so paused-clock tests can drive it).
#[derive(Debug, Clone)]
struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    refilled: Option<Instant>,
}

impl TokenBucket {
    fn new(burst: u32, per_second: f64) -> Self {
        let capacity = f64::from(burst.max(1));
        TokenBucket {
            capacity,
            per_second: if per_second > 0.0 { per_second } else { 1.0 },
            tokens: capacity,
            refilled: None,
        }
    }

    async fn take(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.refilled {
            let earned = now.duration_since(last).as_secs_f64() * self.per_second;
            self.tokens = (self.tokens + earned).min(self.capacity);
        }
        self.refilled = Some(now);
        if self.tokens < 1.0 {
            let short = (1.0 - self.tokens) / self.per_second;
            tokio::time::sleep(Duration::from_secs_f64(short)).await;
            self.refilled = Some(Instant::now());
            self.tokens = 1.0;
        }
        self.tokens -= 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(index: u64) -> QueryMeta {
        QueryMeta {
            index,
            ..QueryMeta::default()
        }
    }

    #[test]
    fn index_rules() {
        let mut w = Watch::new(Duration::from_secs(10));
        assert_eq!(w.options().index, None, "the first read does not block");
        w.observe(&meta(42));
        assert_eq!(w.options().index, Some(42));
        w.observe(&meta(40));
        assert_eq!(w.index(), 0, "an index that goes backwards resets");
        assert_eq!(w.options().index, None);
        w.observe(&meta(0));
        assert_eq!(w.index(), 1, "never below 1 after a call");
        w.observe(&meta(7));
        assert_eq!(w.index(), 7);
    }

    #[test]
    fn options_render_blocking_parameters() {
        let mut q = Vec::new();
        QueryOptions {
            consistency: Consistency::Consistent,
            index: Some(9),
            wait: Some(Duration::from_millis(1500)),
        }
        .apply(&mut q);
        assert_eq!(
            q,
            vec![
                ("consistent", String::new()),
                ("index", "9".to_owned()),
                ("wait", "1500ms".to_owned())
            ]
        );
        let mut q = Vec::new();
        QueryOptions::with_consistency(Consistency::Stale).apply(&mut q);
        assert_eq!(q, vec![("stale", String::new())]);
    }

    #[test]
    fn meta_reads_consul_headers() {
        let mut h = HeaderMap::new();
        h.insert("X-Consul-Index", "123".parse().unwrap());
        h.insert("X-Consul-KnownLeader", "true".parse().unwrap());
        h.insert("X-Consul-LastContact", "250".parse().unwrap());
        assert_eq!(
            QueryMeta::from_headers(&h),
            QueryMeta {
                index: 123,
                known_leader: true,
                last_contact: Duration::from_millis(250),
                results_filtered_by_acls: false,
                default_acl_policy: None,
            }
        );
        assert_eq!(QueryMeta::from_headers(&HeaderMap::new()), QueryMeta::default());
        // What later Consul versions add.
        h.insert("X-Consul-Results-Filtered-By-ACLs", "true".parse().unwrap());
        h.insert("X-Consul-Default-ACL-Policy", "deny".parse().unwrap());
        let meta = QueryMeta::from_headers(&h);
        assert!(meta.results_filtered_by_acls);
        assert_eq!(meta.default_acl_policy, Some(crate::AclPolicy::Deny));
    }

    #[tokio::test(start_paused = true)]
    async fn a_moving_index_cannot_become_a_hot_loop() {
        // Every call "changes": without the limiter this would spin.
        let mut w = Watch::new(Duration::from_secs(10)).rate_limit(5, 5.0);
        let start = Instant::now();
        for i in 1..=25 {
            w.next(|_| async move {
                Ok(Response {
                    value: (),
                    meta: meta(i),
                })
            })
            .await
            .unwrap();
        }
        // 5 from the burst, then 20 more at 5 per second.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(4) - Duration::from_millis(1),
            "{elapsed:?}"
        );
        assert!(elapsed <= Duration::from_secs(5), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_up_to_the_cap() {
        let mut w = Watch::new(Duration::from_secs(10))
            .rate_limit(1000, 1000.0)
            .backoff(Duration::from_millis(100), Duration::from_secs(1));
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let start = Instant::now();
            let r: Result<Response<()>, Error> = w.next(|_| async { Err(Error::Config("down".into())) }).await;
            assert!(r.is_err());
            gaps.push(start.elapsed());
        }
        assert_eq!(gaps[0], Duration::ZERO, "the first failure is not delayed");
        assert!(gaps[1] >= Duration::from_millis(75) && gaps[1] <= Duration::from_millis(125));
        assert!(gaps[2] >= Duration::from_millis(150) && gaps[2] <= Duration::from_millis(250));
        assert!(gaps[7] <= Duration::from_secs(1), "capped: {:?}", gaps[7]);
        assert!(gaps[7] >= Duration::from_millis(750));
        assert_eq!(w.options().index, None, "after a failure the next read does not block");
        // A success resets the back-off.
        w.next(|_| async {
            Ok(Response {
                value: (),
                meta: meta(3),
            })
        })
        .await
        .unwrap();
        assert_eq!(w.failures(), 0);
    }
}
