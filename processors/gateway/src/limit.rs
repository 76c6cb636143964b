//! Per-workspace token buckets: `rate` tokens per second up to `burst`; a request takes one.
//! The map is bounded: when it grows past [`MAX_WORKSPACES`] idle buckets (full ones) are
//! dropped, which loses nothing since a full bucket is the state of a new one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Most buckets kept before full ones are pruned.
pub const MAX_WORKSPACES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by workspace.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `rate` requests per second sustained, `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `workspace` at `now`; false when the bucket is empty.
    pub fn allow(&self, workspace: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = buckets.get_mut(workspace) {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
            b.at = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                return true;
            }
            return false;
        }
        if buckets.len() >= MAX_WORKSPACES {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        buckets.insert(
            workspace.to_string(),
            Bucket {
                tokens: self.burst - 1.0,
                at: now,
            },
        );
        true
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
        assert!((0..3).all(|_| l.allow("a", t0)), "the burst is allowed");
        assert!(!l.allow("a", t0), "then the bucket is empty");
        assert!(l.allow("b", t0), "another workspace has its own bucket");
        assert!(
            !l.allow("a", t0 + Duration::from_millis(50)),
            "half a token"
        );
        assert!(
            l.allow("a", t0 + Duration::from_millis(100)),
            "one token after 100 ms"
        );
        assert!(!l.allow("a", t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            (0..5).filter(|_| l.allow("a", later)).count(),
            3,
            "capped at the burst"
        );
    }
}
