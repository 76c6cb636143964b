//! What the relay knows about the topics its rows go to, and which rows of a batch it may
//! delete. Pure logic (no I/O), driven by [`crate::Relay`]'s batches.
//!
//! # Blocked destinations
//! A topic the broker reports as missing (unknown topic or partition) or unauthorized (topic
//! authorization failed) is *blocked*: no row of it is published, every other topic flows. It
//! stays blocked until a row of it is acknowledged; meanwhile it is re-checked with a capped
//! backoff (a metadata request, one per topic) and its rows are left out of the batches between
//! checks, so a large backlog of a missing topic never fills the batches of healthy ones. When
//! a blocked topic is still missing or unauthorized `relay.missing_destination_dead_after_ms`
//! after it was first seen so, its rows go to `weir_outbox_dead` ([`Verdict::Dead`]).
//!
//! A sighting after a silence longer than the bound (no rows of the topic, so no checks)
//! starts a new episode: nothing says the topic was missing all along.
//!
//! A check that finds the topic back only *clears* it for a try: the episode ends (and the
//! bound restarts) only when the broker acknowledges a row of it, so a topic that flaps between
//! "exists" in metadata and "unknown" on produce still reaches its bound.
//!
//! Transient errors (broker down, timeouts, leader elections) never block a topic: a metadata
//! check that cannot answer is [`Check::Unknown`] and the rows are published as before.
//!
//! # Invariant
//! Blocking is per topic, and every row of a blocked topic is held back, so per (topic, key)
//! nothing is published out of id order; [`deletable`] keeps what is deleted from a batch a
//! per-(topic, key) prefix of it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

/// Why a destination cannot take rows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Problem {
    /// The topic (or its partition) does not exist.
    Missing,
    /// The relay's principal may not write to it.
    Unauthorized,
}

impl Problem {
    /// The `reason` label of `weir_relay_dead_total` for rows dead-lettered for this problem.
    pub fn label(self) -> &'static str {
        match self {
            Problem::Missing => crate::metrics::REASON_MISSING_TOPIC,
            Problem::Unauthorized => crate::metrics::REASON_UNAUTHORIZED_TOPIC,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Problem::Missing => "does not exist",
            Problem::Unauthorized => "is not authorized for the relay",
        }
    }
}

/// What a metadata check of one topic said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The topic exists and has partitions.
    Exists,
    /// The topic is missing or unauthorized; the broker's error code as text.
    Problem(Problem, String),
    /// No answer that says either (broker unreachable, leader election, ...): transient.
    Unknown,
}

/// What to do with the rows of a topic just found missing or unauthorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Hold its rows; check again later.
    Wait,
    /// The bound passed: move its rows to `weir_outbox_dead` with this reason.
    Dead {
        /// The `reason` column of `weir_outbox_dead`.
        reason: String,
        /// The `reason` label of the dead metric.
        label: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Blocked {
    problem: Problem,
    since: Instant,
    /// The latest sighting. A sighting after a longer silence than the bound (no rows, so no
    /// checks) starts a new episode: nothing says the topic was missing all along.
    last_seen: Instant,
    checks: u32,
    retry_at: Instant,
    /// A check found the topic back: its rows are tried again, the episode stays open until
    /// one of them is acknowledged.
    cleared: bool,
}

/// A topic verified to exist needs no new check for this long (a topic deleted meanwhile is
/// noticed by the producer, which then refuses its rows).
const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// Most verified topics remembered (benchmarks and tests create many short-lived topics).
const MAX_VERIFIED: usize = 4_096;
/// Shortest pause between two checks of one blocked topic.
const MIN_RECHECK: Duration = Duration::from_millis(50);

/// The relay's view of its destinations. See the module docs.
#[derive(Debug)]
pub struct Destinations {
    dead_after: Duration,
    verified: HashMap<String, Instant>,
    blocked: HashMap<String, Blocked>,
}

impl Destinations {
    /// Destinations that go to the dead table after `dead_after` of being missing.
    pub fn new(dead_after: Duration) -> Self {
        Self {
            dead_after,
            verified: HashMap::new(),
            blocked: HashMap::new(),
        }
    }

    /// Topics whose rows the next batch leaves out: blocked, not cleared, not due for a check.
    pub fn excluded(&self, now: Instant) -> Vec<String> {
        let mut v: Vec<String> = self
            .blocked
            .iter()
            .filter(|(_, b)| !b.cleared && b.retry_at > now)
            .map(|(t, _)| t.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether `topic` needs a metadata check before its rows are published.
    pub fn needs_check(&self, topic: &str, now: Instant) -> bool {
        match self.blocked.get(topic) {
            Some(b) => !b.cleared,
            None => self
                .verified
                .get(topic)
                .is_none_or(|at| now.duration_since(*at) >= VERIFIED_FOR),
        }
    }

    /// Whether the rows of `topic` are held back now.
    pub fn is_blocked(&self, topic: &str) -> bool {
        self.blocked.get(topic).is_some_and(|b| !b.cleared)
    }

    /// How often `topic` was found missing or unauthorized in its current episode (0: not
    /// blocked). The first sighting is worth a warning, the re-checks are not.
    pub fn sightings(&self, topic: &str) -> u32 {
        self.blocked.get(topic).map_or(0, |b| b.checks)
    }

    /// Topics blocked now (the gauge).
    pub fn blocked_count(&self) -> usize {
        self.blocked.values().filter(|b| !b.cleared).count()
    }

    /// A check found `topic` to exist. Returns true if it was blocked (now cleared for a try).
    pub fn exists(&mut self, topic: &str, now: Instant) -> bool {
        if self.verified.len() >= MAX_VERIFIED {
            self.verified
                .retain(|_, at| now.duration_since(*at) < VERIFIED_FOR);
            if self.verified.len() >= MAX_VERIFIED {
                self.verified.clear();
            }
        }
        self.verified.insert(topic.to_owned(), now);
        match self.blocked.get_mut(topic) {
            Some(b) if !b.cleared => {
                b.cleared = true;
                true
            }
            _ => false,
        }
    }

    /// The broker acknowledged a row of `topic`: any episode of it is over.
    pub fn acknowledged(&mut self, topic: &str) {
        self.blocked.remove(topic);
    }

    /// `topic` was found missing or unauthorized (by a check, or by the producer refusing or
    /// failing a row of it). `backoff(n)` is the pause before the n-th re-check. Returns
    /// whether to hold its rows or to dead-letter them.
    pub fn problem(
        &mut self,
        topic: &str,
        problem: Problem,
        detail: &str,
        now: Instant,
        backoff: impl Fn(u32) -> Duration,
    ) -> Verdict {
        self.verified.remove(topic);
        if self.blocked.len() >= MAX_VERIFIED {
            let keep = self.dead_after.max(VERIFIED_FOR);
            self.blocked
                .retain(|_, b| now.duration_since(b.last_seen) < keep);
        }
        let b = self.blocked.entry(topic.to_owned()).or_insert(Blocked {
            problem,
            since: now,
            last_seen: now,
            checks: 0,
            retry_at: now,
            cleared: false,
        });
        if now.duration_since(b.last_seen) > self.dead_after {
            b.since = now;
            b.checks = 0;
        }
        b.last_seen = now;
        b.problem = problem;
        b.cleared = false;
        b.checks = b.checks.saturating_add(1);
        let deadline = b.since + self.dead_after;
        // Check again after the backoff, but not later than the bound, so that the rows go to
        // the dead table close to it.
        let next = (now + backoff(b.checks).max(MIN_RECHECK)).min(deadline.max(now + MIN_RECHECK));
        b.retry_at = next;
        let missing_for = now.duration_since(b.since);
        if missing_for >= self.dead_after {
            Verdict::Dead {
                reason: format!(
                    "destination topic {topic:?} {} ({detail}) for {} ms, longer than relay.missing_destination_dead_after_ms ({} ms)",
                    problem.describe(),
                    missing_for.as_millis(),
                    self.dead_after.as_millis()
                ),
                label: problem.label(),
            }
        } else {
            Verdict::Wait
        }
    }
}

/// What became of one row of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowStatus {
    /// The broker acknowledged it.
    Acked,
    /// The broker can never accept it as it is: to `weir_outbox_dead` with this reason.
    Dead(String),
    /// Not published (held back, failed, or not queued): it stays in the outbox.
    Held,
}

/// The ids of a batch that may be deleted: per (topic, key), the acknowledged rows before the
/// first row that stays. `rows` are `(id, topic, key)` in id order, `status` one per row.
///
/// Per partition the idempotent, gap-less producer only acknowledges an in-order prefix of what
/// was queued, so this normally deletes every acknowledged row. If an acknowledged row ever
/// follows a held one of its (topic, key), it is kept: the held row is published again first
/// and the kept one after it (a duplicate), so the last occurrences in Kafka keep id order.
pub fn deletable<'a>(
    rows: impl IntoIterator<Item = (i64, &'a str, Option<&'a [u8]>)>,
    status: &[RowStatus],
) -> Vec<i64> {
    let mut stopped: HashSet<(&str, Option<&[u8]>)> = HashSet::new();
    let mut out = Vec::new();
    for ((id, topic, key), st) in rows.into_iter().zip(status) {
        match st {
            RowStatus::Acked if !stopped.contains(&(topic, key)) => out.push(id),
            RowStatus::Acked | RowStatus::Dead(_) => {}
            RowStatus::Held => {
                stopped.insert((topic, key));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(n: u32) -> Duration {
        Duration::from_millis(100 * u64::from(n))
    }

    #[test]
    fn deletes_a_prefix_per_topic_and_key() {
        let rows = [
            (1, "a", Some(&b"k1"[..])),
            (2, "b", Some(&b"k1"[..])),
            (3, "a", Some(&b"k2"[..])),
            (4, "a", Some(&b"k1"[..])),
            (5, "b", Some(&b"k1"[..])),
            (6, "a", None),
            (7, "a", Some(&b"k1"[..])),
            (8, "a", None),
        ];
        let st = [
            RowStatus::Acked,
            RowStatus::Held, // b/k1 stops at 2
            RowStatus::Acked,
            RowStatus::Dead("too large".into()), // dead rows neither block nor get deleted here
            RowStatus::Acked,                    // b/k1 after a held row: kept
            RowStatus::Held,                     // keyless a stops
            RowStatus::Acked,                    // a/k1 goes on after its dead row
            RowStatus::Acked,                    // keyless a after a held one: kept
        ];
        assert_eq!(deletable(rows, &st), vec![1, 3, 7]);
        assert!(
            deletable(rows, &[]).is_empty(),
            "no status, nothing deleted"
        );
    }

    #[test]
    fn missing_topic_waits_then_dies_at_the_bound() {
        let t0 = Instant::now();
        let mut d = Destinations::new(Duration::from_secs(10));
        assert!(d.needs_check("t", t0));
        assert_eq!(
            d.problem(
                "t",
                Problem::Missing,
                "UnknownTopicOrPartition",
                t0,
                backoff
            ),
            Verdict::Wait
        );
        assert!(d.is_blocked("t"));
        assert_eq!(d.blocked_count(), 1);
        assert_eq!(d.sightings("t"), 1);
        assert_eq!(d.sightings("u"), 0);
        // Left out of batches until its re-check is due.
        assert_eq!(d.excluded(t0), vec!["t".to_string()]);
        assert!(d.excluded(t0 + Duration::from_millis(100)).is_empty());
        // Re-checks never wait past the bound.
        let late = t0 + Duration::from_secs(9);
        assert_eq!(
            d.problem("t", Problem::Missing, "x", late, |_| Duration::from_secs(
                60
            )),
            Verdict::Wait
        );
        assert!(d.excluded(t0 + Duration::from_secs(10)).is_empty());
        match d.problem(
            "t",
            Problem::Missing,
            "UnknownTopicOrPartition",
            t0 + Duration::from_secs(10),
            backoff,
        ) {
            Verdict::Dead { reason, label } => {
                assert_eq!(label, "missing_topic");
                assert!(reason.contains("\"t\" does not exist"), "{reason}");
                assert!(reason.contains("UnknownTopicOrPartition"), "{reason}");
            }
            v => panic!("expected dead, got {v:?}"),
        }
    }

    #[test]
    fn a_topic_back_in_metadata_ends_its_episode_only_when_a_row_is_acknowledged() {
        let t0 = Instant::now();
        let mut d = Destinations::new(Duration::from_secs(10));
        d.problem(
            "t",
            Problem::Unauthorized,
            "TopicAuthorizationFailed",
            t0,
            backoff,
        );
        assert!(d.needs_check("t", t0 + Duration::from_secs(1)));
        assert!(d.exists("t", t0 + Duration::from_secs(1)), "was blocked");
        assert!(!d.is_blocked("t"));
        assert!(!d.needs_check("t", t0 + Duration::from_secs(1)));
        assert!(d.excluded(t0).is_empty());
        // The producer still refuses it, the metadata still shows it, again and again: the
        // bound counts from the first sighting.
        for s in [4, 8] {
            let at = t0 + Duration::from_secs(s);
            assert_eq!(
                d.problem("t", Problem::Unauthorized, "x", at, backoff),
                Verdict::Wait
            );
            assert!(d.exists("t", at));
        }
        match d.problem(
            "t",
            Problem::Unauthorized,
            "x",
            t0 + Duration::from_secs(11),
            backoff,
        ) {
            Verdict::Dead { label, .. } => assert_eq!(label, "unauthorized_topic"),
            v => panic!("expected dead, got {v:?}"),
        }
        // An acknowledgement ends the episode: a new problem starts a new bound.
        d.acknowledged("t");
        assert_eq!(
            d.problem(
                "t",
                Problem::Missing,
                "x",
                t0 + Duration::from_secs(12),
                backoff
            ),
            Verdict::Wait
        );
    }

    #[test]
    fn verified_topics_are_rechecked_after_a_while_and_bounded() {
        let t0 = Instant::now();
        let mut d = Destinations::new(Duration::from_secs(10));
        assert!(!d.exists("t", t0), "was not blocked");
        assert!(!d.needs_check("t", t0 + Duration::from_secs(1)));
        assert!(d.needs_check("t", t0 + VERIFIED_FOR));
        for i in 0..(MAX_VERIFIED + 10) {
            d.exists(&format!("x{i}"), t0);
        }
        assert!(d.verified.len() <= MAX_VERIFIED);
    }

    #[test]
    fn a_sighting_after_a_long_silence_starts_a_new_episode() {
        let t0 = Instant::now();
        let mut d = Destinations::new(Duration::from_secs(10));
        d.problem("t", Problem::Missing, "x", t0, backoff);
        // Rows keep coming and the topic stays missing: one episode, dead at the bound.
        for s in 1..10 {
            d.problem(
                "t",
                Problem::Missing,
                "x",
                t0 + Duration::from_secs(s),
                backoff,
            );
        }
        assert!(matches!(
            d.problem(
                "t",
                Problem::Missing,
                "x",
                t0 + Duration::from_secs(10),
                backoff
            ),
            Verdict::Dead { .. }
        ));
        assert!(matches!(
            d.problem(
                "t",
                Problem::Missing,
                "x",
                t0 + Duration::from_secs(15),
                backoff
            ),
            Verdict::Dead { .. }
        ));
        // No sighting for longer than the bound (no rows of it): a new row waits again.
        assert_eq!(
            d.problem(
                "t",
                Problem::Missing,
                "x",
                t0 + Duration::from_secs(26),
                backoff
            ),
            Verdict::Wait
        );
        assert_eq!(d.sightings("t"), 1);
    }

    #[test]
    fn zero_bound_dead_letters_at_the_first_sighting() {
        let t0 = Instant::now();
        let mut d = Destinations::new(Duration::ZERO);
        assert!(matches!(
            d.problem("t", Problem::Missing, "x", t0, backoff),
            Verdict::Dead { .. }
        ));
    }
}
