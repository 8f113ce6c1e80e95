//! DNS discovery: the SRV records of a name become a VIP's backends.
//!
//! One task per VIP asks the configured server (normally a Consul agent's
//! DNS interface) for the SRV records of the name on an interval. Each
//! record gives a port, a weight and a target; the target's addresses come
//! from the answer's additional section (where Consul puts them) or, for
//! targets it lacks, from A then AAAA lookups. Only the records of the
//! lowest SRV priority are used, as RFC 2782 asks (Consul gives all the
//! same priority). The VIP's builder swaps a new table only when the
//! resulting backend list changed.
//!
//! Transport: always TCP, on a fresh connection per refresh. Consul cuts
//! large UDP answers to a few records without setting the TC bit, so over
//! UDP a cut answer looks complete and the table would churn between random
//! subsets; and servers close idle TCP connections (Consul after a few
//! seconds), so a kept connection would fail the first query after each
//! close. One connect per interval costs nothing.
//!
//! Fail static, as every source (see [`crate::sources`]): a timeout, a
//! refused connection, a server failure (SERVFAIL, REFUSED, …) or an answer
//! that cannot be trusted (truncated, answering another question, answer
//! records but no SRV record, SRV records none of which has an address,
//! more targets to look up than [`MAX_TARGET_LOOKUPS`] or more backends
//! than [`MAX_BACKENDS`]) keeps the last good table and shows in `/status`
//! and `halo_discovery_up`. An answer that the name has no records
//! (NXDOMAIN, or NOERROR with no record, or only SRV records with the
//! target "." that RFC 2782 uses for "not available") is a real answer and
//! empties the table: it is how Consul's DNS says that no instance passes,
//! just as an empty `?passing` list is. Consul's DNS leaves out critical
//! instances but, unlike `?passing`, keeps those in warning (its
//! `only_passing` setting changes that). DNS answers carry no zone, so these
//! backends never count as local to the balancer's zone.
//!
//! Reading answers is [`Resolution`], free of I/O, so that property tests
//! can feed it random and garbled answers; [`resolve`] only carries queries
//! and replies between it and the server.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_net::proto::op::{DnsRequestOptions, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_net::proto::rr::rdata::SRV;
use hickory_net::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::xfer::{DnsExchange, DnsHandle, FirstAnswer};
use hickory_net::NetError;
use tokio::time::Instant;

use super::Source;
use crate::settings::{Backend, DnsTarget};

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DnsError {
    /// The server could not be reached, or its reply could not be read.
    #[error("DNS server {server}: {source}")]
    Lookup {
        /// The server asked.
        server: SocketAddr,
        /// What went wrong.
        source: NetError,
    },
    /// The server's answer is a failure or cannot be trusted.
    #[error("DNS server {server}: {source}")]
    Answer {
        /// The server asked.
        server: SocketAddr,
        /// Why the answer was refused.
        source: AnswerError,
    },
    /// The refresh took longer than its deadline.
    #[error("DNS server {server}: no answer within {timeout:?}")]
    Timeout {
        /// The server asked.
        server: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
}

/// A VIP's DNS discovery: one refresh per interval, the first at once.
#[derive(Debug)]
pub(crate) struct DnsSource {
    target: DnsTarget,
    name: Name,
    next: Instant,
}

impl DnsSource {
    /// Looks `target` up on its interval.
    pub(crate) fn new(target: DnsTarget) -> DnsSource {
        DnsSource {
            name: Name::from_ascii(&target.name).expect("validated as a DNS name"),
            target,
            next: Instant::now(),
        }
    }
}

impl Source for DnsSource {
    async fn next(&mut self) -> super::Answer {
        tokio::time::sleep_until(self.next).await;
        self.next = Instant::now() + self.target.interval;
        let (server, timeout) = (self.target.server, self.target.timeout);
        let refreshed = tokio::time::timeout(timeout, resolve(server, &self.name, timeout))
            .await
            .unwrap_or(Err(DnsError::Timeout { server, timeout }));
        match refreshed {
            Ok(answer) => super::Answer::Backends {
                backends: answer.backends,
                skipped: answer.skipped,
                index: None,
            },
            Err(e) => super::Answer::Failed {
                error: e.to_string(),
                acl_filter_suspected: false,
            },
        }
    }
}

/// What one refresh found.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Answer {
    /// The backends, sorted.
    pub backends: Vec<Backend>,
    /// SRV records left out: their target has no address, or their port
    /// is 0.
    pub skipped: usize,
}

/// Most SRV targets looked up (A, then AAAA) in one refresh because the
/// answer's additional section lacks their addresses. Consul puts every
/// target's address there, so lookups are the exception; an answer that
/// needs more is refused (fail static) rather than trusted to end.
pub(crate) const MAX_TARGET_LOOKUPS: usize = 256;

/// Most backends one answer may give. A TCP answer holds at most 64 KiB,
/// a few thousand records, but every SRV record pairs its port with every
/// address of its target, so a hostile answer could multiply the two into
/// millions; one over this bound is refused.
pub(crate) const MAX_BACKENDS: usize = 10_000;

/// Why a DNS answer was refused. Each names the question and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AnswerError {
    /// The server answered with a failure code (SERVFAIL, REFUSED, …).
    #[error("{qtype} {name}: the server answered {code}")]
    Code {
        /// The name asked.
        name: String,
        /// The record type asked.
        qtype: RecordType,
        /// The response code.
        code: ResponseCode,
    },
    /// The message is not an answer to a standard query.
    #[error("{qtype} {name}: the reply is not an answer to a query (QR bit or opcode)")]
    NotAnAnswer {
        /// The name asked.
        name: String,
        /// The record type asked.
        qtype: RecordType,
    },
    /// The answer's question section asks something else.
    #[error("{qtype} {name}: the reply answers another question ({other})")]
    OtherQuestion {
        /// The name asked.
        name: String,
        /// The record type asked.
        qtype: RecordType,
        /// The question in the reply.
        other: String,
    },
    /// The TC bit is set: the answer may lack records.
    #[error("{qtype} {name}: the answer is truncated (TC bit set)")]
    Truncated {
        /// The name asked.
        name: String,
        /// The record type asked.
        qtype: RecordType,
    },
    /// NXDOMAIN with records in the answer section.
    #[error("{qtype} {name}: NXDOMAIN with {records} answer records")]
    Contradictory {
        /// The name asked.
        name: String,
        /// The record type asked.
        qtype: RecordType,
        /// Records in the answer section.
        records: usize,
    },
    /// Answer records, but none of the type asked for the name asked.
    #[error("SRV {name}: {records} answer records, none an SRV record of the name")]
    NoSrv {
        /// The name asked.
        name: String,
        /// Records in the answer section.
        records: usize,
    },
    /// More targets lack addresses than one refresh looks up.
    #[error("SRV {name}: {targets} targets lack an address in the additional section, more than the {MAX_TARGET_LOOKUPS} looked up per refresh")]
    TooManyLookups {
        /// The name asked.
        name: String,
        /// Distinct targets without addresses.
        targets: usize,
    },
    /// The answer gives more backends than a table takes.
    #[error("SRV {name}: more than {MAX_BACKENDS} backends (SRV records × target addresses)")]
    TooManyBackends {
        /// The name asked.
        name: String,
    },
    /// SRV records, but none gives a usable backend: not the same as "no
    /// instance", so it does not empty the table.
    #[error("SRV {name}: none of the {records} SRV records has a target with an address and a port")]
    NoUsableRecord {
        /// The name asked.
        name: String,
        /// The SRV records (of the lowest priority).
        records: usize,
    },
}

/// One SRV record of the lowest priority.
#[derive(Debug)]
struct Srv {
    weight: u16,
    port: u16,
    target: Name,
}

/// An A or AAAA query the resolution needs answered; see
/// [`Resolution::next_lookup`].
#[derive(Debug, Clone)]
pub(crate) struct Lookup {
    /// The SRV target.
    pub target: Name,
    /// A, or AAAA after an A query found nothing.
    pub rtype: RecordType,
}

/// Turning DNS answers into backends, without any I/O: the part of a
/// refresh that reads untrusted bytes, so it is what the property tests
/// feed with random answers.
///
/// [`Resolution::start`] reads the answer to the SRV query; while
/// [`Resolution::next_lookup`] names a query, its answer goes to
/// [`Resolution::feed`]; [`Resolution::finish`] gives the backends.
#[derive(Debug)]
pub(crate) struct Resolution {
    name: Name,
    /// The SRV records of the lowest priority, targets other than ".".
    records: Vec<Srv>,
    /// Addresses by target ([`key`]): from the SRV answer, then lookups.
    addresses: HashMap<String, Vec<IpAddr>>,
    /// Lookups still to make, last first.
    pending: Vec<Lookup>,
}

impl Resolution {
    /// Reads `response`, the answer to the SRV query for `name`. An answer
    /// that the name has no records (NXDOMAIN, or NOERROR without any) is
    /// a resolution with no backends; every failure code, a truncated
    /// answer and answer records without an SRV record are errors.
    pub(crate) fn start(name: &Name, response: &Message) -> Result<Resolution, AnswerError> {
        let records = answer_records(name, RecordType::SRV, response)?;
        let srv_of_name: Vec<&SRV> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(s) if r.name.eq_ignore_root(name) => Some(s),
                _ => None,
            })
            .collect();
        if !records.is_empty() && srv_of_name.is_empty() {
            return Err(AnswerError::NoSrv {
                name: name.to_ascii(),
                records: records.len(),
            });
        }
        // A target of "." says "decidedly not available" (RFC 2782): such
        // records are dropped before the lowest priority is chosen, so only
        // an answer of nothing else is "no instance".
        let usable: Vec<_> = srv_of_name.into_iter().filter(|s| !s.target.is_root()).collect();
        let lowest = usable.iter().map(|s| s.priority).min();
        let srv: Vec<Srv> = usable
            .into_iter()
            .filter(|s| Some(s.priority) == lowest)
            .map(|s| Srv {
                weight: s.weight,
                port: s.port,
                target: s.target.clone(),
            })
            .collect();
        let addresses = addresses_in(response);
        let mut missing = HashSet::new();
        let mut pending: Vec<Lookup> = Vec::new();
        for s in &srv {
            let k = key(&s.target);
            if !addresses.contains_key(&k) && missing.insert(k) {
                pending.push(Lookup {
                    target: s.target.clone(),
                    rtype: RecordType::A,
                });
            }
        }
        if pending.len() > MAX_TARGET_LOOKUPS {
            return Err(AnswerError::TooManyLookups {
                name: name.to_ascii(),
                targets: pending.len(),
            });
        }
        pending.reverse();
        Ok(Resolution {
            name: name.clone(),
            records: srv,
            addresses,
            pending,
        })
    }

    /// The next A or AAAA query to make; `None` when all are answered.
    pub(crate) fn next_lookup(&mut self) -> Option<Lookup> {
        self.pending.pop()
    }

    /// Reads `response`, the answer to `lookup`. An A query that finds no
    /// address queues the AAAA query for the same target.
    pub(crate) fn feed(&mut self, lookup: Lookup, response: &Message) -> Result<(), AnswerError> {
        let records = answer_records(&lookup.target, lookup.rtype, response)?;
        let mut found: Vec<IpAddr> = Vec::new();
        for r in records {
            if !r.name.eq_ignore_root(&lookup.target) {
                continue;
            }
            let ip = match (&r.data, lookup.rtype) {
                (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
                (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
                _ => continue,
            };
            if !found.contains(&ip) {
                found.push(ip);
            }
        }
        if found.is_empty() && lookup.rtype == RecordType::A {
            self.pending.push(Lookup {
                target: lookup.target.clone(),
                rtype: RecordType::AAAA,
            });
        }
        self.addresses.entry(key(&lookup.target)).or_default().extend(found);
        Ok(())
    }

    /// The backends: each usable SRV record's port with each address of
    /// its target.
    pub(crate) fn finish(self) -> Result<Answer, AnswerError> {
        let mut skipped = 0;
        let mut backends = Vec::new();
        for s in &self.records {
            let ips: Vec<IpAddr> = self
                .addresses
                .get(&key(&s.target))
                .map(|ips| ips.iter().copied().filter(|ip| !ip.is_unspecified()).collect())
                .unwrap_or_default();
            if ips.is_empty() || s.port == 0 {
                skipped += 1;
                continue;
            }
            if backends.len() + ips.len() > MAX_BACKENDS {
                return Err(AnswerError::TooManyBackends {
                    name: self.name.to_ascii(),
                });
            }
            for ip in ips {
                backends.push(Backend {
                    addr: SocketAddr::new(ip, s.port),
                    // Weight 0 means "rarely" in RFC 2782; here the least share.
                    weight: u32::from(s.weight).clamp(1, 1000),
                    zone: None,
                    region: None,
                    rack: None,
                });
            }
        }
        if backends.is_empty() && !self.records.is_empty() {
            return Err(AnswerError::NoUsableRecord {
                name: self.name.to_ascii(),
                records: self.records.len(),
            });
        }
        backends.sort();
        backends.dedup_by(|a, b| a.addr == b.addr);
        Ok(Answer { backends, skipped })
    }
}

/// The answer section of `response` to the question (`name`, `qtype`),
/// class IN only; empty for a negative answer (NXDOMAIN, or NOERROR
/// without records). Every other response code is an error, and so is a
/// reply that is not an answer, answers another question, or is truncated.
fn answer_records<'m>(name: &Name, qtype: RecordType, response: &'m Message) -> Result<Vec<&'m Record>, AnswerError> {
    let asked = || name.to_ascii();
    if response.message_type != MessageType::Response || response.op_code != OpCode::Query {
        return Err(AnswerError::NotAnAnswer { name: asked(), qtype });
    }
    if let Some(q) = response
        .queries
        .iter()
        .find(|q| !(q.name().eq_ignore_root(name) && q.query_type() == qtype))
    {
        return Err(AnswerError::OtherQuestion {
            name: asked(),
            qtype,
            other: format!("{} {}", q.query_type(), q.name().to_ascii()),
        });
    }
    if response.truncation {
        return Err(AnswerError::Truncated { name: asked(), qtype });
    }
    match response.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain if response.answers.is_empty() => {}
        ResponseCode::NXDomain => {
            return Err(AnswerError::Contradictory {
                name: asked(),
                qtype,
                records: response.answers.len(),
            })
        }
        code => {
            return Err(AnswerError::Code {
                name: asked(),
                qtype,
                code,
            })
        }
    }
    Ok(response
        .answers
        .iter()
        .filter(|r| r.dns_class == DNSClass::IN)
        .collect())
}

/// Looks up `name`'s SRV records on `server` over one TCP connection and
/// resolves their targets.
pub(crate) async fn resolve(server: SocketAddr, name: &Name, timeout: Duration) -> Result<Answer, DnsError> {
    let lookup_error = |source| DnsError::Lookup { server, source };
    let answer_error = |source| DnsError::Answer { server, source };
    // The provider owns the connection's background task (a JoinSet that
    // aborts it when the last clone drops): it lives until the refresh ends,
    // which closes the connection. One query in flight at a time.
    let provider = TokioRuntimeProvider::new();
    let exchange = TcpClientStream::exchange(server, None, timeout, Some(1), provider.clone())
        .await
        .map_err(lookup_error)?;
    let srv = query(&exchange, name.clone(), RecordType::SRV)
        .await
        .map_err(lookup_error)?;
    let mut resolution = Resolution::start(name, &srv).map_err(answer_error)?;
    while let Some(lookup) = resolution.next_lookup() {
        let response = query(&exchange, lookup.target.clone(), lookup.rtype)
            .await
            .map_err(lookup_error)?;
        resolution.feed(lookup, &response).map_err(answer_error)?;
    }
    let answer = resolution.finish().map_err(answer_error);
    drop(provider);
    answer
}

/// One query, its reply as it came.
async fn query(
    exchange: &DnsExchange<TokioRuntimeProvider>,
    name: Name,
    rtype: RecordType,
) -> Result<Message, NetError> {
    let mut options = DnsRequestOptions::default();
    // Consul answers for its own domain; nothing to recurse into.
    options.recursion_desired = false;
    let response = exchange
        .lookup(Query::query(name, rtype), options)
        .first_answer()
        .await?;
    Ok(response.into_message())
}

/// Names compare without case.
fn key(name: &Name) -> String {
    name.to_lowercase().to_ascii()
}

/// The A and AAAA records of a response (answers and additionals), by name.
fn addresses_in(response: &Message) -> HashMap<String, Vec<IpAddr>> {
    let mut by_name: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for r in response.answers.iter().chain(&response.additionals) {
        let ip = match &r.data {
            RData::A(a) if r.dns_class == DNSClass::IN => IpAddr::V4(a.0),
            RData::AAAA(a) if r.dns_class == DNSClass::IN => IpAddr::V6(a.0),
            _ => continue,
        };
        let ips = by_name.entry(key(&r.name)).or_default();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    by_name
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_not_an_empty_answer() {
        // A port nobody listens on: the TCP connect is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let name = Name::from_ascii("web.service.consul.").unwrap();
        let e = resolve(addr, &name, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(e, DnsError::Lookup { .. }), "{e}");
    }

    // Reading answers: example cases, then random answers (proptest).

    use hickory_net::proto::rr::rdata::{A, AAAA, TXT};
    use std::collections::BTreeSet;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn web() -> Name {
        n("web.service.consul.")
    }

    fn reply(question: &Name, qtype: RecordType, code: ResponseCode) -> Message {
        let mut m = Message::response(7, OpCode::Query);
        m.metadata.response_code = code;
        m.add_query(Query::query(question.clone(), qtype));
        m
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> Record {
        Record::from_rdata(web(), 0, RData::SRV(SRV::new(priority, weight, port, n(target))))
    }

    fn a(owner: &str, ip: [u8; 4]) -> Record {
        Record::from_rdata(n(owner), 0, RData::A(A(Ipv4Addr::from(ip))))
    }

    /// Runs a resolution to the end, answering lookups with `answer`.
    fn run_with(
        srv_reply: &Message,
        mut answer: impl FnMut(&Lookup) -> Message,
    ) -> Result<(Answer, Vec<Lookup>), AnswerError> {
        let mut r = Resolution::start(&web(), srv_reply)?;
        let mut asked = Vec::new();
        while let Some(lookup) = r.next_lookup() {
            assert!(asked.len() < 2 * MAX_TARGET_LOOKUPS, "lookups do not end");
            let m = answer(&lookup);
            asked.push(lookup.clone());
            r.feed(lookup, &m)?;
        }
        Ok((r.finish()?, asked))
    }

    fn nxdomain(l: &Lookup) -> Message {
        reply(&l.target, l.rtype, ResponseCode::NXDomain)
    }

    #[test]
    fn glue_gives_backends_and_only_the_lowest_priority_counts() {
        let mut m = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        m.add_answer(srv(1, 3, 9001, "a.node.consul."));
        m.add_answer(srv(1, 0, 9002, "B.node.consul."));
        m.add_answer(srv(2, 5, 9003, "c.node.consul."));
        m.add_additional(a("a.node.consul.", [10, 0, 0, 1]));
        m.add_additional(a("b.NODE.consul.", [10, 0, 0, 2]));
        let (answer, asked) = run_with(&m, nxdomain).unwrap();
        assert!(asked.is_empty(), "all glue present: {asked:?}");
        let got: Vec<(String, u32)> = answer.backends.iter().map(|b| (b.addr.to_string(), b.weight)).collect();
        assert_eq!(got, [("10.0.0.1:9001".to_owned(), 3), ("10.0.0.2:9002".to_owned(), 1)]);
        assert_eq!(answer.skipped, 0);
    }

    #[test]
    fn missing_glue_is_looked_up_a_then_aaaa() {
        let mut m = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        m.add_answer(srv(0, 1, 80, "v6.node.consul."));
        let (answer, asked) = run_with(&m, |l| {
            let mut r = reply(&l.target, l.rtype, ResponseCode::NoError);
            if l.rtype == RecordType::AAAA {
                r.add_answer(Record::from_rdata(
                    l.target.clone(),
                    0,
                    RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
                ));
            }
            r
        })
        .unwrap();
        let types: Vec<RecordType> = asked.iter().map(|l| l.rtype).collect();
        assert_eq!(types, [RecordType::A, RecordType::AAAA]);
        assert_eq!(answer.backends[0].addr, "[::1]:80".parse().unwrap());
    }

    #[test]
    fn negative_answers_are_empty_and_failures_are_errors() {
        for code in [ResponseCode::NXDomain, ResponseCode::NoError] {
            let (answer, _) = run_with(&reply(&web(), RecordType::SRV, code), nxdomain).unwrap();
            assert_eq!(answer, Answer::default(), "{code}");
        }
        // RFC 2782's "decidedly not available".
        let mut m = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        m.add_answer(srv(0, 1, 0, "."));
        assert_eq!(run_with(&m, nxdomain).unwrap().0, Answer::default());
        // ... but not when a record of a later priority has a target.
        m.add_answer(srv(1, 1, 80, "a.node.consul."));
        m.add_additional(a("a.node.consul.", [10, 0, 0, 1]));
        assert_eq!(run_with(&m, nxdomain).unwrap().0.backends.len(), 1);

        let mut good = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        good.add_answer(srv(0, 1, 80, "a.node.consul."));
        good.add_additional(a("a.node.consul.", [10, 0, 0, 1]));
        for code in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
            ResponseCode::NotImp,
        ] {
            let mut m = good.clone();
            m.metadata.response_code = code;
            assert!(
                matches!(run_with(&m, nxdomain), Err(AnswerError::Code { .. })),
                "{code}"
            );
        }
        let mut m = good.clone();
        m.metadata.truncation = true;
        assert!(matches!(run_with(&m, nxdomain), Err(AnswerError::Truncated { .. })));
        let mut m = good.clone();
        m.metadata.message_type = MessageType::Query;
        assert!(matches!(run_with(&m, nxdomain), Err(AnswerError::NotAnAnswer { .. })));
        let mut m = good.clone();
        m.queries = vec![Query::query(n("db.service.consul."), RecordType::SRV)];
        let e = run_with(&m, nxdomain).unwrap_err();
        assert!(
            e.to_string().contains("another question (SRV db.service.consul.)"),
            "{e}"
        );
        let mut m = good.clone();
        m.metadata.response_code = ResponseCode::NXDomain;
        assert!(matches!(run_with(&m, nxdomain), Err(AnswerError::Contradictory { .. })));
        let mut m = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        m.add_answer(a("web.service.consul.", [10, 0, 0, 1]));
        assert!(matches!(run_with(&m, nxdomain), Err(AnswerError::NoSrv { .. })));
        // SRV records, none with an address: not "no instance".
        let mut m = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        m.add_answer(srv(0, 1, 80, "gone.node.consul."));
        let e = run_with(&m, nxdomain).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SRV web.service.consul.: none of the 1 SRV records has a target with an address and a port"
        );
        // A failed lookup fails the refresh.
        let e = run_with(&m, |l| reply(&l.target, l.rtype, ResponseCode::ServFail)).unwrap_err();
        assert_eq!(e.to_string(), "A gone.node.consul.: the server answered Server Failure");
    }

    #[test]
    fn oversized_answers_are_refused() {
        let mut m = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        for i in 0..=MAX_TARGET_LOOKUPS {
            m.add_answer(srv(0, 1, 80, &format!("t{i}.node.consul.")));
        }
        assert!(
            matches!(run_with(&m, nxdomain), Err(AnswerError::TooManyLookups { targets, .. }) if targets == MAX_TARGET_LOOKUPS + 1)
        );
        // 101 ports × 100 addresses of one target > MAX_BACKENDS.
        let mut m = reply(&web(), RecordType::SRV, ResponseCode::NoError);
        for port in 1..=101 {
            m.add_answer(srv(0, 1, port, "big.node.consul."));
        }
        for i in 0..100u8 {
            m.add_additional(a("big.node.consul.", [10, 0, 1, i]));
        }
        assert!(matches!(
            run_with(&m, nxdomain),
            Err(AnswerError::TooManyBackends { .. })
        ));
    }

    /// A record of a random answer: from a small pool of names, so that
    /// SRV targets and address records meet often enough.
    #[derive(Debug, Clone)]
    enum Rec {
        Srv {
            own: bool,
            priority: u16,
            weight: u16,
            port: u16,
            target: usize,
        },
        A {
            owner: usize,
            ip: u32,
        },
        Aaaa {
            owner: usize,
            ip: u128,
        },
        Txt {
            own: bool,
        },
    }

    const TARGETS: [&str; 6] = [
        ".",
        "a.node.consul.",
        "A.Node.Consul.",
        "b.addr.dc1.consul.",
        "c.node.consul.",
        "web.service.consul.",
    ];

    fn rec() -> impl Strategy<Value = Rec> {
        prop_oneof![
            4 => (prop::bool::weighted(0.9), 0u16..3, any::<u16>(), prop_oneof![Just(0u16), any::<u16>()], 0..TARGETS.len())
                .prop_map(|(own, priority, weight, port, target)| Rec::Srv { own, priority, weight, port, target }),
            3 => (0..TARGETS.len(), any::<u32>()).prop_map(|(owner, ip)| Rec::A { owner, ip }),
            1 => (0..TARGETS.len(), any::<u128>()).prop_map(|(owner, ip)| Rec::Aaaa { owner, ip }),
            1 => any::<bool>().prop_map(|own| Rec::Txt { own }),
        ]
    }

    fn to_record(r: &Rec, class_in: bool) -> Record {
        let mut record = match r {
            Rec::Srv {
                own,
                priority,
                weight,
                port,
                target,
            } => Record::from_rdata(
                if *own { web() } else { n("other.service.consul.") },
                0,
                RData::SRV(SRV::new(*priority, *weight, *port, n(TARGETS[*target]))),
            ),
            Rec::A { owner, ip } => Record::from_rdata(n(TARGETS[*owner]), 0, RData::A(A(Ipv4Addr::from(*ip)))),
            Rec::Aaaa { owner, ip } => {
                Record::from_rdata(n(TARGETS[*owner]), 0, RData::AAAA(AAAA(Ipv6Addr::from(*ip))))
            }
            Rec::Txt { own } => Record::from_rdata(
                if *own { web() } else { n("x.consul.") },
                0,
                RData::TXT(TXT::new(vec!["garbage".into()])),
            ),
        };
        if !class_in {
            record.dns_class = DNSClass::CH;
        }
        record
    }

    /// The shape of a reply: its header, question and sections.
    #[derive(Debug, Clone)]
    struct Shape {
        code: ResponseCode,
        truncated: bool,
        is_response: bool,
        question: u8, // 0: ours, 1: none, 2: another
        answers: Vec<(Rec, bool)>,
        additionals: Vec<(Rec, bool)>,
    }

    fn code() -> impl Strategy<Value = ResponseCode> {
        prop_oneof![
            6 => Just(ResponseCode::NoError),
            2 => Just(ResponseCode::NXDomain),
            1 => Just(ResponseCode::ServFail),
            1 => Just(ResponseCode::Refused),
            1 => (1u16..4096).prop_map(<ResponseCode as From<u16>>::from),
        ]
    }

    fn section(max: usize) -> impl Strategy<Value = Vec<(Rec, bool)>> {
        prop_oneof![
            4 => prop::collection::vec((rec(), prop::bool::weighted(0.95)), 0..8),
            1 => prop::collection::vec((rec(), prop::bool::weighted(0.95)), 0..max),
        ]
    }

    fn shape() -> impl Strategy<Value = Shape> {
        (
            code(),
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.97),
            prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
            section(300),
            section(300),
        )
            .prop_map(|(code, truncated, is_response, question, answers, additionals)| Shape {
                code,
                truncated,
                is_response,
                question,
                answers,
                additionals,
            })
    }

    fn build(shape: &Shape, asked: &Name, qtype: RecordType) -> Message {
        let mut m = Message::new(
            9,
            if shape.is_response {
                MessageType::Response
            } else {
                MessageType::Query
            },
            OpCode::Query,
        );
        m.metadata.response_code = shape.code;
        m.metadata.truncation = shape.truncated;
        match shape.question {
            0 => m.queries.push(Query::query(asked.clone(), qtype)),
            1 => {}
            _ => m.queries.push(Query::query(n("elsewhere.consul."), qtype)),
        }
        m.answers = shape
            .answers
            .iter()
            .map(|(r, class_in)| to_record(r, *class_in))
            .collect();
        m.additionals = shape
            .additionals
            .iter()
            .map(|(r, class_in)| to_record(r, *class_in))
            .collect();
        m
    }

    /// What a reply must look like for the answer to be "no records":
    /// written apart from the code under test.
    fn is_real_none(m: &Message, asked: &Name) -> bool {
        let header_ok = m.message_type == MessageType::Response
            && m.op_code == OpCode::Query
            && !m.truncation
            && m.queries
                .iter()
                .all(|q| q.name().eq_ignore_root(asked) && q.query_type() == RecordType::SRV);
        let answers: Vec<&Record> = m.answers.iter().filter(|r| r.dns_class == DNSClass::IN).collect();
        let usable_srv = answers
            .iter()
            .any(|r| matches!(&r.data, RData::SRV(s) if r.name.eq_ignore_root(asked) && !s.target.is_root()));
        let any_srv = answers
            .iter()
            .any(|r| matches!(&r.data, RData::SRV(_) if r.name.eq_ignore_root(asked)));
        let code_ok = match m.response_code {
            ResponseCode::NoError => true,
            ResponseCode::NXDomain => m.answers.is_empty(),
            _ => false,
        };
        header_ok && code_ok && !usable_srv && (answers.is_empty() || any_srv)
    }

    fn is_failure(m: &Message) -> bool {
        m.truncation
            || m.message_type != MessageType::Response
            || !matches!(m.response_code, ResponseCode::NoError | ResponseCode::NXDomain)
    }

    /// Flips bytes of the wire form; `None` if the result does not decode
    /// (which the transport reports as an error before any answer is read).
    fn garble(m: &Message, flips: &[(usize, u8)]) -> Option<Message> {
        let mut bytes = m.to_vec().ok()?;
        if bytes.is_empty() {
            return None;
        }
        for &(at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        Message::from_vec(&bytes).ok()
    }

    proptest::proptest! {
        // Cases: proptest's default (256), or PROPTEST_CASES; see docs/testing.md.
        #[test]
        fn random_answers_never_panic_stay_bounded_and_never_turn_errors_into_an_empty_table(
            srv_shape in shape(),
            flips in prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec((any::<usize>(), any::<u8>()), 1..12)],
            lookup_shapes in prop::collection::vec(shape(), 1..6),
        ) {
            let asked = web();
            let built = build(&srv_shape, &asked, RecordType::SRV);
            let srv_reply = if flips.is_empty() { Some(built) } else { garble(&built, &flips) };
            let Some(srv_reply) = srv_reply else { return Ok(()) };

            let mut lookups = 0usize;
            let mut failed_lookup = false;
            let mut seen_ips: BTreeSet<IpAddr> = addresses_in(&srv_reply).into_values().flatten().collect();
            let result = run_with(&srv_reply, |l| {
                let m = build(&lookup_shapes[lookups % lookup_shapes.len()], &l.target, l.rtype);
                lookups += 1;
                failed_lookup |= is_failure(&m);
                seen_ips.extend(addresses_in(&m).into_values().flatten());
                m
            });
            prop_assert!(lookups <= 2 * MAX_TARGET_LOOKUPS);
            if is_failure(&srv_reply) || failed_lookup {
                prop_assert!(result.is_err(), "a failure became an answer: {:?}", result);
            }
            if let Ok((answer, _)) = result {
                prop_assert!(answer.backends.len() <= MAX_BACKENDS);
                if answer.backends.is_empty() {
                    prop_assert!(is_real_none(&srv_reply, &asked), "an empty table from {:?}", srv_reply);
                }
                let lowest = srv_reply.answers.iter().filter_map(|r| match &r.data {
                    RData::SRV(s) if r.name.eq_ignore_root(&asked) && r.dns_class == DNSClass::IN && !s.target.is_root() => Some(s.priority),
                    _ => None,
                }).min();
                let ports: BTreeSet<u16> = srv_reply.answers.iter().filter_map(|r| match &r.data {
                    RData::SRV(s) if r.name.eq_ignore_root(&asked) && r.dns_class == DNSClass::IN && !s.target.is_root() && Some(s.priority) == lowest => Some(s.port),
                    _ => None,
                }).collect();
                for (i, b) in answer.backends.iter().enumerate() {
                    prop_assert!(ports.contains(&b.addr.port()) && b.addr.port() != 0, "{b:?} from no SRV record");
                    prop_assert!(seen_ips.contains(&b.addr.ip()) && !b.addr.ip().is_unspecified(), "{b:?} from no address record");
                    prop_assert!((1..=1000).contains(&b.weight));
                    if i > 0 {
                        prop_assert!(answer.backends[i - 1].addr < b.addr, "sorted, one per address");
                    }
                }
            }
        }
    }
}
