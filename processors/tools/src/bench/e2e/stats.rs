//! The pure parts of `weir bench e2e`: latency samples and their percentiles, the open-loop
//! schedule, the measured window, and the pairing of a request with the output that answers it.
//!
//! Invariants:
//! - a latency runs from the request's *intended* send time (its slot in the schedule), never
//!   from when it was actually sent: a generator that falls behind adds its lag to the figures
//!   instead of hiding it (no coordinated omission);
//! - the schedule's slots depend on the start, the rate and the index only (no drift from
//!   summing intervals), and the generator never issues a slot before its time;
//! - a percentile is the sample at rank `round((n - 1) · q)` of the sorted samples
//!   ([`crate::common::percentile`]), 0 when there is none.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::common::{percentile, round};

/// Latency samples, in µs (a u32 holds 71 minutes).
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    us: Vec<u32>,
}

/// Count and percentiles of [`Latencies`], in ms rounded to µs.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Latencies {
    /// Adds one sample.
    pub fn add(&mut self, d: Duration) {
        self.us
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    /// Samples so far.
    pub fn len(&self) -> usize {
        self.us.len()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.us.is_empty()
    }

    /// Count, p50, p99, p99.9 and maximum.
    pub fn summary(&self) -> Summary {
        let mut v = self.us.clone();
        v.sort_unstable();
        let ms = |q: f64| round(percentile(&v, q) / 1000.0, 3);
        Summary {
            count: v.len() as u64,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: ms(1.0),
        }
    }
}

/// An open-loop schedule: `rate` sends per second from `start` until `end` (exclusive).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    rate: f64,
    total: u64,
}

impl Schedule {
    /// `rate` per second over `[start, start + length)`.
    pub fn new(start: Instant, rate: f64, length: Duration) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            0.0
        };
        // Slot i is at i / rate; the slots before the end are ceil(length · rate).
        let total = (length.as_secs_f64() * rate).ceil().max(0.0) as u64;
        Self { start, rate, total }
    }

    /// Slots in the schedule.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The intended send time of slot `i`.
    pub fn at(&self, i: u64) -> Instant {
        if self.rate == 0.0 {
            return self.start;
        }
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// How many slots are due at `now` (their time is at or before it), at most [`Self::total`].
    pub fn due(&self, now: Instant) -> u64 {
        let Some(since) = now.checked_duration_since(self.start) else {
            return 0;
        };
        let n = (since.as_secs_f64() * self.rate).floor() as u64 + 1;
        // Floating point may put slot n's computed time a hair after `now`: never issue early.
        let n = if n > 0 && n <= self.total && self.at(n - 1) > now {
            n - 1
        } else {
            n
        };
        n.min(self.total)
    }
}

/// The measured part of a phase, `[from, to)`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// First instant measured (the warm-up is before it).
    pub from: Instant,
    /// First instant not measured.
    pub to: Instant,
}

impl Window {
    /// Whether `t` is inside.
    pub fn contains(&self, t: Instant) -> bool {
        t >= self.from && t < self.to
    }

    /// Its length in seconds.
    pub fn seconds(&self) -> f64 {
        self.to.duration_since(self.from).as_secs_f64()
    }
}

#[derive(Debug, Clone, Copy)]
enum Side<M> {
    /// The request's answer (its id) is known; the output not yet seen.
    Sent(Instant),
    /// The output was seen (with what else was learnt from it) before the request's answer
    /// arrived.
    Seen(Instant, M),
}

/// Pairs requests with the outputs that answer them, by id, whichever arrives first: the
/// output of a request can be read from Kafka before the HTTP answer that names its id.
/// `M` is what an output carries besides its arrival (e.g. when it was published).
#[derive(Debug)]
pub struct Correlator<K, M = ()> {
    open: HashMap<K, Side<M>>,
}

impl<K, M> Default for Correlator<K, M> {
    fn default() -> Self {
        Self {
            open: HashMap::new(),
        }
    }
}

/// A request paired with its output: when it was meant to be sent, the latency from then,
/// and what the output carried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair<M = ()> {
    /// The request's intended send time.
    pub intended: Instant,
    /// From the intended send time to the output's receipt (zero if the clocks cross).
    pub latency: Duration,
    /// What the output carried.
    pub meta: M,
}

impl<K: Hash + Eq, M: Copy> Correlator<K, M> {
    /// The request `k` meant to be sent at `intended` was acknowledged; the pair if its output
    /// was already seen.
    pub fn sent(&mut self, k: K, intended: Instant) -> Option<Pair<M>> {
        match self.open.remove(&k) {
            Some(Side::Seen(at, meta)) => Some(Pair {
                intended,
                latency: at.saturating_duration_since(intended),
                meta,
            }),
            // Sent twice (a retry answered with the same id): the first send counts.
            Some(Side::Sent(first)) => {
                self.open.insert(k, Side::Sent(first));
                None
            }
            None => {
                self.open.insert(k, Side::Sent(intended));
                None
            }
        }
    }

    /// The output of `k` was read at `at`, carrying `meta`; the pair if its request was
    /// already acknowledged.
    pub fn seen(&mut self, k: K, at: Instant, meta: M) -> Option<Pair<M>> {
        match self.open.remove(&k) {
            Some(Side::Sent(intended)) => Some(Pair {
                intended,
                latency: at.saturating_duration_since(intended),
                meta,
            }),
            // A second output for the same id (a redelivery): the first counts.
            Some(Side::Seen(first, m)) => {
                self.open.insert(k, Side::Seen(first, m));
                None
            }
            None => {
                self.open.insert(k, Side::Seen(at, meta));
                None
            }
        }
    }

    /// Acknowledged requests meant to be sent inside `w` whose output is not seen yet.
    pub fn waiting(&self, w: &Window) -> u64 {
        self.open
            .values()
            .filter(|s| matches!(s, Side::Sent(t) if w.contains(*t)))
            .count() as u64
    }

    /// Forgets everything (between phases: a late output of an earlier phase is then a
    /// lone `seen`, never paired).
    pub fn clear(&mut self) {
        self.open.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_latencies() {
        let mut l = Latencies::default();
        assert_eq!(l.summary(), Summary::default());
        for ms in (1..=1000).rev() {
            l.add(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, 501.0);
        assert_eq!(s.p99_ms, 990.0);
        assert_eq!(s.p999_ms, 999.0);
        assert_eq!(s.max_ms, 1000.0);
        l.add(Duration::from_secs(1 << 40));
        assert_eq!(l.summary().max_ms, round(f64::from(u32::MAX) / 1000.0, 3));
    }

    #[test]
    fn schedule_slots_are_fixed_and_never_early() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0, Duration::from_secs(2));
        assert_eq!(s.total(), 2000);
        assert_eq!(s.at(0), t0);
        assert_eq!(s.at(1000), t0 + Duration::from_secs(1));
        assert_eq!(s.due(t0), 1);
        assert_eq!(s.due(t0 + Duration::from_micros(999)), 1);
        assert_eq!(s.due(t0 + Duration::from_millis(1)), 2);
        assert_eq!(s.due(t0 + Duration::from_secs(60)), 2000);
        if let Some(before) = t0.checked_sub(Duration::from_millis(1)) {
            assert_eq!(s.due(before), 0);
        }
        for i in [0u64, 1, 7, 333, 1999] {
            let at = s.at(i);
            assert!(s.due(at) > i, "slot {i} is due at its own time");
            assert!(s.at(s.due(at) - 1) <= at, "no slot is due before its time");
        }
        // A fractional rate: 2.5 per second over 2 s is 5 slots, 0.4 s apart.
        let s = Schedule::new(t0, 2.5, Duration::from_secs(2));
        assert_eq!(s.total(), 5);
        assert_eq!(s.at(4), t0 + Duration::from_millis(1600));
        assert_eq!(
            Schedule::new(t0, f64::NAN, Duration::from_secs(2)).total(),
            0
        );
        assert_eq!(Schedule::new(t0, -1.0, Duration::from_secs(2)).due(t0), 0);
    }

    #[test]
    fn window_is_half_open() {
        let t0 = Instant::now();
        let w = Window {
            from: t0 + Duration::from_secs(1),
            to: t0 + Duration::from_secs(3),
        };
        assert!(!w.contains(t0));
        assert!(w.contains(w.from));
        assert!(!w.contains(w.to));
        assert_eq!(w.seconds(), 2.0);
    }

    #[test]
    fn correlation_pairs_in_either_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut c: Correlator<&str, u8> = Correlator::default();
        // Answer first, then the output.
        assert_eq!(c.sent("a", t0), None);
        assert_eq!(
            c.seen("a", t0 + ms(7), 1),
            Some(Pair {
                intended: t0,
                latency: ms(7),
                meta: 1
            })
        );
        // Output first (read from Kafka before the HTTP answer was parsed).
        assert_eq!(c.seen("b", t0 + ms(9), 2), None);
        assert_eq!(
            c.sent("b", t0 + ms(1)),
            Some(Pair {
                intended: t0 + ms(1),
                latency: ms(8),
                meta: 2
            })
        );
        // Redeliveries and retries keep the first time.
        assert_eq!(c.sent("c", t0), None);
        assert_eq!(c.sent("c", t0 + ms(5)), None);
        assert_eq!(
            c.seen("c", t0 + ms(10), 3).map(|p| (p.latency, p.meta)),
            Some((ms(10), 3))
        );
        assert_eq!(
            c.seen("c", t0 + ms(11), 4),
            None,
            "a second output is unpaired"
        );
        // Waiting counts acknowledged requests of the window only.
        let w = Window {
            from: t0 + ms(100),
            to: t0 + ms(200),
        };
        c.sent("d", t0 + ms(150));
        c.sent("e", t0 + ms(250));
        c.seen("f", t0 + ms(150), 5);
        assert_eq!(c.waiting(&w), 1);
        c.clear();
        assert_eq!(c.waiting(&w), 0);
    }
}
