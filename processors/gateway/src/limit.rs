//! Token buckets: `rate` tokens per second up to `burst`; a request takes one.
//!
//! Two limiters use them: one per workspace (after authentication, `gateway.rate_limit_*`)
//! and two per client address (before authentication: every request, and the key lookups
//! that found no key; see [`crate::auth`]). The map is bounded: when it reaches its capacity,
//! full buckets are dropped (a full bucket is the state of a new one, so that loses nothing);
//! if it is still full, a key without a bucket is refused until buckets refill. That fails
//! closed, which is right for the per-client maps an attacker can try to grow.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Most buckets kept by default.
pub const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by `K` (a workspace id, a client address).
#[derive(Debug)]
pub struct RateLimiter<K = String> {
    rate: f64,
    burst: f64,
    capacity: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `rate` requests per second sustained, `burst` at once, at most [`MAX_KEYS`] keys.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self::with_capacity(rate, burst, MAX_KEYS)
    }

    /// As [`RateLimiter::new`], with at most `capacity` keys.
    pub fn with_capacity(rate: u32, burst: u32, capacity: usize) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            capacity: capacity.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key` at `now`; false when the bucket is empty.
    pub fn allow(&self, key: &K, now: Instant) -> bool {
        self.with_bucket(key, now, |b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// Whether `key` has a token at `now`, without taking it.
    pub fn has_token(&self, key: &K, now: Instant) -> bool {
        self.with_bucket(key, now, |b| b.tokens >= 1.0)
    }

    /// Takes a token for `key` if there is one (a cost found out after the fact).
    pub fn charge(&self, key: &K, now: Instant) {
        self.with_bucket(key, now, |b| {
            b.tokens = (b.tokens - 1.0).max(0.0);
            true
        });
    }

    /// Refills `key`'s bucket to `now` and runs `f` on it; false when there is no room
    /// for a new bucket.
    fn with_bucket(&self, key: &K, now: Instant, f: impl FnOnce(&mut Bucket) -> bool) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = buckets.get_mut(key) {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
            b.at = now;
            return f(b);
        }
        if buckets.len() >= self.capacity {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
            if buckets.len() >= self.capacity {
                return false;
            }
        }
        let mut b = Bucket {
            tokens: self.burst,
            at: now,
        };
        let answer = f(&mut b);
        buckets.insert(key.clone(), b);
        answer
    }
}

/// Who a client is for the per-client limits: its IP address, IPv6 addresses by their /64
/// (one host usually has a whole /64, so per-address buckets would be free to multiply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(IpAddr);

impl ClientId {
    /// The client behind `ip`.
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let mut s = v6.segments();
                    s[4..].fill(0);
                    Self(IpAddr::V6(s.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buckets_refill_at_the_rate_and_are_per_workspace() {
        let l = RateLimiter::new(10, 3);
        let t0 = Instant::now();
        let (a, b) = ("a".to_string(), "b".to_string());
        assert!((0..3).all(|_| l.allow(&a, t0)), "the burst is allowed");
        assert!(!l.allow(&a, t0), "then the bucket is empty");
        assert!(l.allow(&b, t0), "another workspace has its own bucket");
        assert!(!l.allow(&a, t0 + Duration::from_millis(50)), "half a token");
        assert!(
            l.allow(&a, t0 + Duration::from_millis(100)),
            "one token after 100 ms"
        );
        assert!(!l.allow(&a, t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            (0..5).filter(|_| l.allow(&a, later)).count(),
            3,
            "capped at the burst"
        );
    }

    #[test]
    fn peeking_and_charging() {
        let l = RateLimiter::new(1, 2);
        let t0 = Instant::now();
        let k = "c".to_string();
        assert!(l.has_token(&k, t0));
        assert!(l.has_token(&k, t0), "peeking takes nothing");
        l.charge(&k, t0);
        l.charge(&k, t0);
        assert!(!l.has_token(&k, t0), "two charges empty a burst of two");
        l.charge(&k, t0);
        assert!(
            l.has_token(&k, t0 + Duration::from_secs(1)),
            "charging an empty bucket does not go into debt"
        );
    }

    #[test]
    fn a_full_map_drops_full_buckets_then_refuses_new_keys() {
        let l = RateLimiter::with_capacity(1, 1, 2);
        let t0 = Instant::now();
        assert!(l.allow(&1, t0) && l.allow(&2, t0));
        assert!(!l.allow(&3, t0), "both buckets are in use: a new key waits");
        assert!(
            l.allow(&3, t0 + Duration::from_secs(5)),
            "refilled buckets are pruned, making room"
        );
    }

    #[test]
    fn ipv6_clients_are_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientId::new(a), ClientId::new(b));
        assert_ne!(ClientId::new(a), ClientId::new(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            ClientId::new(mapped),
            ClientId::new("10.0.0.1".parse().unwrap())
        );
        assert_eq!(ClientId::new(a).to_string(), "2001:db8:1:2::/64");
    }
}
