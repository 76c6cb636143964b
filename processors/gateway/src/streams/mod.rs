//! Live event streams for clients (`GET /v1/runs/{run_id}/events`,
//! `GET /v1/workflows/{workflow_id}/events`): the in-memory fan-out of one gateway instance.
//!
//! How a stream works: it subscribes here first, then reads what it sends from Postgres (the
//! coordinator's run state, the materializer's patch log), and reads again whenever this
//! instance's Kafka feed ([`feed`]) sees a record of its key (a run id on
//! `weir.run-events.v1` / `weir.node-ready.v1`, a workflow id on `weir.workflows.v1`) or its
//! heartbeat ticks. A notification carries no data: every message a client gets comes from
//! Postgres, after the commit that the record announces (processors publish through the
//! outbox, so the row is committed before the record exists). Hence:
//!
//! - any gateway instance serves any run or workflow: each instance reads every partition
//!   from the end with no consumer group, so no sticky sessions and no rebalances;
//! - no gap between history and live: the subscription exists before the first read, so a
//!   change committed after that read is announced to it; a lost notification (the feed
//!   reconnecting) is repaired by the next heartbeat's read;
//! - no repeat: every message has an id that orders (a run's progress number, a workflow's
//!   version) and a stream never sends an id at or below one it sent or the client's
//!   `Last-Event-ID`.
//!
//! Bounds: at most `gateway.max_streams` streams per instance and
//! `gateway.max_streams_per_workspace` per workspace (a [`Slot`] holds the place); each
//! subscription is a channel of `gateway.stream_buffer` notifications, and a stream whose
//! channel is full (its client does not read, so the stream is not polled) is closed and its
//! place freed at once. Notifications for keys nobody watches cost one map lookup.

pub mod feed;
pub mod patch_log;
pub mod run_state;
pub mod sse;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::metrics;

/// What a stream follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A run (Kafka key: the run id).
    Run,
    /// A workflow (Kafka key: the workflow id, the same in every workspace that has one of
    /// that name: each stream reads only its own workspace's rows, so a notification for
    /// another workspace's workflow costs a read and reveals nothing).
    Workflow,
}

/// A change was announced for a stream's key.
#[derive(Debug, Clone, Copy)]
pub struct Notice {
    /// The announcing record's timestamp (ms since the epoch).
    pub at_ms: i64,
}

/// The bounds of the fan-out (from `[gateway]`).
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most open streams of this instance.
    pub max_streams: usize,
    /// Most open streams of one workspace on this instance.
    pub max_per_workspace: usize,
    /// Heartbeat (and re-read) interval.
    pub heartbeat: Duration,
    /// Pending notifications per stream before it is closed.
    pub buffer: usize,
}

impl StreamLimits {
    /// The limits of `g`.
    pub fn from_config(g: &weir_runtime::config::GatewayConfig) -> Self {
        Self {
            max_streams: g.max_streams,
            max_per_workspace: g.max_streams_per_workspace,
            heartbeat: Duration::from_millis(g.stream_heartbeat_ms.max(100)),
            buffer: g.stream_buffer.max(1),
        }
    }
}

/// Why a stream was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The instance holds `max_streams` streams (503: another instance may have room).
    #[error("this gateway instance holds its maximum of open streams")]
    Instance,
    /// The workspace holds `max_per_workspace` streams on this instance (429).
    #[error("this workspace holds its maximum of open streams")]
    Workspace,
}

type Key = (Kind, String);
/// Each watched key's subscribers: (subscription id, its channel).
type Subscribers = HashMap<Key, Vec<(u64, mpsc::Sender<Notice>)>>;

struct Inner {
    limits: StreamLimits,
    open: AtomicUsize,
    per_workspace: Mutex<HashMap<String, usize>>,
    subscribers: Mutex<Subscribers>,
    next_id: AtomicU64,
}

/// The fan-out of one gateway instance (cheap to clone).
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

/// A stream's place under the limits; dropping it frees the place (once).
pub struct Slot {
    hub: Hub,
    workspace: String,
}

/// A live subscription: notifications for one key until dropped (which unsubscribes), or
/// until the hub closes it because its channel was full.
pub struct Subscription {
    hub: Hub,
    key: Key,
    id: u64,
    rx: mpsc::Receiver<Notice>,
    _slot: Slot,
}

impl Hub {
    /// A hub with `limits` and no subscriber.
    pub fn new(limits: StreamLimits) -> Self {
        Self(Arc::new(Inner {
            limits,
            open: AtomicUsize::new(0),
            per_workspace: Mutex::new(HashMap::new()),
            subscribers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }))
    }

    /// The limits.
    pub fn limits(&self) -> &StreamLimits {
        &self.0.limits
    }

    /// Open streams of this instance.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    /// Takes a place for a stream of `workspace`, or says which limit refuses it.
    pub fn admit(&self, workspace: &str) -> Result<Slot, Refused> {
        let mut per = self
            .0
            .per_workspace
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if self.0.open.load(Ordering::Relaxed) >= self.0.limits.max_streams {
            ::metrics::counter!(metrics::STREAMS_REFUSED, "reason" => "instance").increment(1);
            return Err(Refused::Instance);
        }
        let n = per.entry(workspace.to_string()).or_insert(0);
        if *n >= self.0.limits.max_per_workspace {
            ::metrics::counter!(metrics::STREAMS_REFUSED, "reason" => "workspace").increment(1);
            return Err(Refused::Workspace);
        }
        *n += 1;
        let open = self.0.open.fetch_add(1, Ordering::Relaxed) + 1;
        ::metrics::gauge!(metrics::OPEN_STREAMS).set(open as f64);
        Ok(Slot {
            hub: self.clone(),
            workspace: workspace.to_string(),
        })
    }

    /// Subscribes to notifications of `key`, holding `slot`.
    pub fn subscribe(&self, kind: Kind, key: &str, slot: Slot) -> Subscription {
        let (tx, rx) = mpsc::channel(self.0.limits.buffer);
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (kind, key.to_string());
        self.0
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push((id, tx));
        Subscription {
            hub: self.clone(),
            key,
            id,
            rx,
            _slot: slot,
        }
    }

    /// Announces a change of `key` to its subscribers; a subscriber whose channel is full is
    /// dropped (its stream ends when next polled). Returns how many were notified.
    pub fn notify(&self, kind: Kind, key: &str, notice: Notice) -> usize {
        let mut subs = self.0.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        // Only keys someone watches are looked up by value; the rest cost this lookup.
        let k = (kind, key.to_string());
        let Some(list) = subs.get_mut(&k) else {
            return 0;
        };
        let mut sent = 0;
        list.retain(|(_, tx)| match tx.try_send(notice) {
            Ok(()) => {
                sent += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                ::metrics::counter!(metrics::STREAMS_DROPPED, "reason" => "slow").increment(1);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if list.is_empty() {
            subs.remove(&k);
        }
        ::metrics::counter!(metrics::STREAM_NOTICES).increment(sent as u64);
        sent
    }

    /// Ends every stream (at shutdown): their channels close, so each stream ends at its
    /// next wait instead of holding its connection through the server's grace period.
    pub fn close_all(&self) {
        self.0
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn unsubscribe(&self, key: &Key, id: u64) {
        let mut subs = self.0.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = subs.get_mut(key) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                subs.remove(key);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per = self
            .hub
            .0
            .per_workspace
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.workspace) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.workspace);
            }
        }
        let open = self.hub.0.open.fetch_sub(1, Ordering::Relaxed) - 1;
        ::metrics::gauge!(metrics::OPEN_STREAMS).set(open as f64);
    }
}

/// What waiting on a subscription gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A change was announced (several pending ones count as one: a read covers them all);
    /// the latest record's timestamp.
    Changed(i64),
    /// The heartbeat interval passed without a notice.
    Heartbeat,
    /// The hub closed the subscription (its client did not keep up).
    Closed,
}

impl Subscription {
    /// Waits for the next notice or heartbeat.
    pub async fn wait(&mut self, heartbeat: Duration) -> Wake {
        match tokio::time::timeout(heartbeat, self.rx.recv()).await {
            Err(_) => Wake::Heartbeat,
            Ok(None) => Wake::Closed,
            Ok(Some(mut n)) => {
                while let Ok(more) = self.rx.try_recv() {
                    n = more;
                }
                Wake::Changed(n.at_ms)
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.key, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(max: usize, per_ws: usize, buffer: usize) -> Hub {
        Hub::new(StreamLimits {
            max_streams: max,
            max_per_workspace: per_ws,
            heartbeat: Duration::from_millis(50),
            buffer,
        })
    }

    #[test]
    fn limits_per_workspace_and_instance_and_places_come_back() {
        let h = hub(3, 2, 4);
        let a1 = h.admit("a").unwrap();
        let _a2 = h.admit("a").unwrap();
        assert_eq!(h.admit("a").err(), Some(Refused::Workspace));
        let _b1 = h.admit("b").unwrap();
        assert_eq!(h.admit("c").err(), Some(Refused::Instance));
        drop(a1);
        assert_eq!(h.open(), 2);
        assert!(h.admit("a").is_ok());
    }

    #[tokio::test]
    async fn a_full_channel_closes_the_stream_and_frees_nothing_twice() {
        let h = hub(10, 10, 2);
        let mut s = h.subscribe(Kind::Run, "r1", h.admit("a").unwrap());
        let mut other = h.subscribe(Kind::Run, "r2", h.admit("a").unwrap());
        assert_eq!(h.notify(Kind::Run, "r1", Notice { at_ms: 1 }), 1);
        assert_eq!(h.notify(Kind::Run, "r1", Notice { at_ms: 2 }), 1);
        // Pending notices coalesce into one wake with the latest timestamp.
        assert_eq!(s.wait(Duration::from_secs(1)).await, Wake::Changed(2));
        assert_eq!(other.wait(Duration::from_millis(20)).await, Wake::Heartbeat);
        for i in 0..3 {
            h.notify(Kind::Run, "r1", Notice { at_ms: i });
        }
        // The third notice found the channel full: the subscription is gone.
        assert_eq!(h.notify(Kind::Run, "r1", Notice { at_ms: 9 }), 0);
        assert_eq!(s.wait(Duration::from_secs(1)).await, Wake::Changed(1));
        assert_eq!(s.wait(Duration::from_secs(1)).await, Wake::Closed);
        assert_eq!(h.notify(Kind::Workflow, "r2", Notice { at_ms: 1 }), 0);
        drop(s);
        drop(other);
        assert_eq!(h.open(), 0);
    }

    #[tokio::test]
    async fn closing_all_ends_every_stream() {
        let h = hub(10, 10, 2);
        let mut s = h.subscribe(Kind::Workflow, "w", h.admit("a").unwrap());
        h.close_all();
        assert_eq!(s.wait(Duration::from_secs(1)).await, Wake::Closed);
        assert_eq!(h.notify(Kind::Workflow, "w", Notice { at_ms: 1 }), 0);
        drop(s);
        assert_eq!(h.open(), 0);
    }
}
