//! The HTTP/1.1 server under the router, with the bounds axum's `serve` does not have.
//!
//! - At most `max_connections` open connections, and `max_connections_per_client` per client
//!   address; a connection over either is closed at once (before any byte is read).
//! - Header timeout: once a client started sending a request head it has
//!   `header_read_timeout` to finish it, else the connection is closed (a slowloris client
//!   sending a byte now and then holds a connection for that long, not forever).
//!   A new connection must send its first request within that time too.
//! - Idle timeout: a connection with no request in flight and no byte of a new one is closed
//!   `idle_timeout` after its last request (above a load balancer's own idle timeout, so the balancer, not the
//!   gateway, closes pooled connections and never sends on one the gateway just closed).
//! - Body timeout: the body of a request must arrive within `body_read_timeout` of its head;
//!   reading it later fails with [`BodyTimeout`], which the handlers answer 408.
//! - Head size: at most `max_header_bytes` (hyper answers 431 above it).
//!
//! hyper's own header timeout is not used: it starts when the connection waits for a head,
//! so it is also an idle timeout, and one value cannot serve both.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::limit::ClientId;
use crate::metrics;

/// How long a shutdown waits for open connections to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// The server's bounds (from `[gateway]`).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Most open connections.
    pub max_connections: usize,
    /// Most open connections per client address.
    pub max_connections_per_client: usize,
    /// Time to finish a request head once started.
    pub header_read_timeout: Duration,
    /// Time a connection may wait for a new request.
    pub idle_timeout: Duration,
    /// Time to receive a body after its head.
    pub body_read_timeout: Duration,
    /// Largest request head, in bytes (at least 8192).
    pub max_header_bytes: usize,
}

impl ServerLimits {
    /// The limits of `cfg.gateway`.
    pub fn from_config(g: &weir_runtime::config::GatewayConfig) -> Self {
        Self {
            max_connections: g.max_connections,
            // Behind a trusted proxy every TCP peer is the proxy, and one client's share of
            // its connections is not knowable here: only the total cap applies.
            max_connections_per_client: if g.client_ip_from_forwarded_for {
                g.max_connections
            } else {
                g.max_connections_per_client
            },
            header_read_timeout: Duration::from_millis(g.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(g.idle_timeout_ms),
            body_read_timeout: Duration::from_millis(g.body_read_timeout_ms),
            max_header_bytes: g.max_header_bytes,
        }
    }
}

/// The TCP peer of a request (a request extension set by this server).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A request body did not arrive within `gateway.body_read_timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(pub Duration);

/// Open connections, in total and per client.
#[derive(Default)]
struct Connections {
    total: AtomicUsize,
    per_client: Mutex<HashMap<ClientId, usize>>,
    closed: Notify,
}

/// One admitted connection; leaving frees its place.
struct Slot {
    table: Arc<Connections>,
    client: ClientId,
}

impl Connections {
    fn admit(self: &Arc<Self>, client: ClientId, limits: &ServerLimits) -> Option<Slot> {
        let mut per = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if self.total.load(Ordering::Relaxed) >= limits.max_connections {
            return None;
        }
        let n = per.entry(client).or_insert(0);
        if *n >= limits.max_connections_per_client {
            return None;
        }
        *n += 1;
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        ::metrics::gauge!(metrics::OPEN_CONNECTIONS).set(total as f64);
        Some(Slot {
            table: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per = self
            .table
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.client);
            }
        }
        let total = self.table.total.fetch_sub(1, Ordering::Relaxed) - 1;
        ::metrics::gauge!(metrics::OPEN_CONNECTIONS).set(total as f64);
        self.table.closed.notify_waiters();
    }
}

/// Binds the gateway's listening socket with an accept queue of `backlog` connections
/// (`gateway.listen_backlog`; the kernel caps it at `net.core.somaxconn`). `TcpListener::bind`
/// would fix it at the runtime's default whatever the host allows. Accepted connections get
/// TCP_NODELAY in [`serve`]: responses are small and must not wait for Nagle's timer.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted gateway rebinds at once while the old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.max(1))
}

/// Serves `app` on `listener` until `shutdown`, then lets open connections finish (at most
/// [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let table = Arc::new(Connections::default());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = table.admit(ClientId::new(peer.ip()), &limits) else {
            ::metrics::counter!(metrics::CLIENT_LIMITED, "reason" => "connections").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            shutdown.clone(),
            slot,
        ));
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while table.total.load(Ordering::Relaxed) > 0 {
        let closed = table.closed.notified();
        if table.total.load(Ordering::Relaxed) == 0 {
            break;
        }
        if tokio::time::timeout_at(deadline, closed).await.is_err() {
            tracing::warn!(
                open = table.total.load(Ordering::Relaxed),
                "connections still open after the shutdown grace period"
            );
            break;
        }
    }
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
    _slot: Slot,
) {
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        clock: clock.clone(),
    });
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let in_flight = InFlight::begin(&clock);
            let deadline = Instant::now() + limits.body_read_timeout;
            let mut req = req.map(|b| {
                Body::new(TimedBody {
                    inner: b,
                    deadline,
                    timeout: limits.body_read_timeout,
                    sleep: None,
                })
            });
            req.extensions_mut().insert(PeerAddr(peer));
            let response = app.clone().oneshot(req);
            async move {
                // The request stays in flight until its response body is sent: a streamed
                // answer (server-sent events) keeps the connection busy, not idle.
                let r = response.await;
                r.map(|res| {
                    res.map(|inner| {
                        Body::new(HeldBody {
                            inner,
                            _in_flight: in_flight,
                        })
                    })
                })
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(None::<Duration>)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192).max(64 * 1024));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            return;
        }
        reason = clock.watchdog(limits.header_read_timeout, limits.idle_timeout) => {
            ::metrics::counter!(metrics::CONNECTIONS_CLOSED, "reason" => reason).increment(1);
            tracing::debug!(%peer, reason, "closing a connection");
            return;
        }
        _ = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = clock.watchdog(limits.header_read_timeout, limits.idle_timeout) => {}
    }
}

const UNSET: u64 = u64::MAX;

/// What a connection is doing, for its watchdog: milliseconds since `epoch` when the current
/// request head started arriving ([`UNSET`] if none) and when the last request ended.
struct Clock {
    epoch: Instant,
    head_started: AtomicU64,
    idle_since: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether a request arrived on this connection yet.
    served: AtomicBool,
    wake: Notify,
}

impl Clock {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            head_started: AtomicU64::new(UNSET),
            idle_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(UNSET - 1)
    }

    /// Bytes arrived: with no request in flight they start a request head.
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == UNSET
        {
            self.head_started.store(self.now_ms(), Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// Resolves with the reason once the connection overstayed a timeout.
    async fn watchdog(&self, header: Duration, idle: Duration) -> &'static str {
        let (header, idle) = (header.as_millis() as u64, idle.as_millis() as u64);
        loop {
            let now = self.now_ms();
            let (deadline, reason) = if self.in_flight.load(Ordering::Acquire) > 0 {
                // The request's own bounds (body timeout, Kafka and Postgres timeouts) apply;
                // look again when it ends.
                (now.saturating_add(idle), None)
            } else {
                match self.head_started.load(Ordering::Acquire) {
                    // A new connection is expected to send its first request at once.
                    UNSET if !self.served.load(Ordering::Acquire) => {
                        (header, Some("header_timeout"))
                    }
                    UNSET => (
                        self.idle_since.load(Ordering::Acquire).saturating_add(idle),
                        Some("idle_timeout"),
                    ),
                    started => (started.saturating_add(header), Some("header_timeout")),
                }
            };
            if let Some(reason) = reason {
                if now >= deadline {
                    return reason;
                }
            }
            let at = self.epoch + Duration::from_millis(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// A request being served: the head is complete; dropping it marks the connection idle.
struct InFlight(Arc<Clock>);

impl InFlight {
    fn begin(clock: &Arc<Clock>) -> Self {
        clock.in_flight.fetch_add(1, Ordering::AcqRel);
        clock.served.store(true, Ordering::Release);
        // No wake-up: a watchdog sleeping on an earlier deadline looks at the state again
        // when it fires, and only a head starting can make the deadline earlier.
        clock.head_started.store(UNSET, Ordering::Release);
        Self(clock.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.0;
        c.idle_since.store(c.now_ms(), Ordering::Release);
        c.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body holding its request's [`InFlight`]: dropped once sent (or abandoned).
struct HeldBody {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, telling the clock when bytes arrive.
struct Watched {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that fails with [`BodyTimeout`] once its deadline passed.
struct TimedBody {
    inner: Incoming,
    deadline: Instant,
    timeout: Duration,
    /// Armed the first time the body is not ready (most bodies never need it).
    sleep: Option<Pin<Box<Sleep>>>,
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(axum::BoxError::from)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        if sleep.as_mut().poll(cx).is_ready() {
            ::metrics::counter!(metrics::BODY_TIMEOUTS).increment(1);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e` (or any error it wraps) is a [`BodyTimeout`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> ServerLimits {
        ServerLimits {
            max_connections: 8,
            max_connections_per_client: 3,
            header_read_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(900),
            body_read_timeout: Duration::from_millis(300),
            max_header_bytes: 8192,
        }
    }

    /// The accept queue is `gateway.listen_backlog`, not the runtime's default: a listening
    /// socket's Send-Q in `ss` is its backlog (iproute2; the check is skipped without `ss`).
    #[tokio::test]
    async fn listen_backlog_is_the_configured_one() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 77).unwrap();
        let port = listener.local_addr().unwrap().port();
        let Ok(out) = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
        else {
            eprintln!("ss not found: backlog not checked");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let columns: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(columns.get(2), Some(&"77"), "ss -ltn: {text}");
        // And it accepts.
        let client = TcpStream::connect(("127.0.0.1", port));
        let (accepted, connected) = tokio::join!(listener.accept(), client);
        assert!(accepted.is_ok() && connected.is_ok());
    }

    async fn start() -> (SocketAddr, CancellationToken) {
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow-stream",
                // A streamed answer lasting longer than the idle timeout.
                get(|| async {
                    let chunks = futures::stream::unfold(0u8, |i| async move {
                        if i == 4 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(400)).await;
                        Some((
                            Ok::<_, std::convert::Infallible>(Bytes::from("tick\n")),
                            i + 1,
                        ))
                    });
                    Body::from_stream(chunks)
                }),
            )
            .route(
                "/echo",
                post(
                    |b: Result<Bytes, axum::extract::rejection::BytesRejection>| async move {
                        match b {
                            Ok(b) => (axum::http::StatusCode::OK, b.len().to_string()),
                            Err(e) if is_body_timeout(&e) => {
                                (axum::http::StatusCode::REQUEST_TIMEOUT, "slow".into())
                            }
                            Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()),
                        }
                    },
                ),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, app, limits(), stop.clone()));
        (addr, stop)
    }

    /// Reads until the peer closes or `wait` passes; returns what arrived and whether it
    /// closed.
    async fn read_all(s: &mut TcpStream, wait: Duration) -> (String, bool) {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let end = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(end, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => return (String::from_utf8_lossy(&out).into(), false),
            }
        }
    }

    /// A response body still being sent keeps its connection busy: a stream is never cut
    /// off as idle, and the idle timeout counts from its end.
    #[tokio::test]
    async fn a_streamed_answer_is_not_idle() {
        let (addr, stop) = start().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow-stream HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // 4 chunks 400 ms apart: 1.6 s, beyond the 900 ms idle timeout.
        let (answer, closed) = read_all(&mut s, Duration::from_millis(2000)).await;
        assert!(!closed, "cut off while streaming: {answer}");
        assert_eq!(answer.matches("tick").count(), 4, "{answer}");
        let (_, closed) = read_all(&mut s, Duration::from_secs(2)).await;
        assert!(closed, "idle after the stream ended");
        stop.cancel();
    }

    #[tokio::test]
    async fn slow_headers_idle_connections_and_slow_bodies_are_cut_off() {
        let (addr, stop) = start().await;

        // A head sent byte by byte, slower than the header timeout allows.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut closed = false;
        for b in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n".iter() {
            if slow.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if started.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        let (_, eof) = read_all(&mut slow, Duration::from_secs(2)).await;
        assert!(closed || eof, "a slow head is cut off");
        assert!(started.elapsed() < Duration::from_secs(3));

        // A kept-alive connection: served, then closed after the idle timeout, not before
        // the header timeout would have.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (answer, eof) = read_all(&mut idle, Duration::from_millis(500)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!eof, "still open after more than the header timeout");
        let (_, eof) = read_all(&mut idle, Duration::from_secs(2)).await;
        assert!(eof, "closed after the idle timeout");

        // A body promised but not sent: 408 from the handler.
        let mut body = TcpStream::connect(addr).await.unwrap();
        body.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
            .await
            .unwrap();
        let (answer, _) = read_all(&mut body, Duration::from_secs(2)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

        // An oversized head: 431.
        let mut big = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(9000)
        );
        let _ = big.write_all(head.as_bytes()).await;
        let (answer, _) = read_all(&mut big, Duration::from_secs(2)).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

        // Still serving.
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_all(&mut ok, Duration::from_secs(2)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_per_client_are_capped() {
        let (addr, stop) = start().await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut fourth = TcpStream::connect(addr).await.unwrap();
        let (_, eof) = read_all(&mut fourth, Duration::from_secs(1)).await;
        assert!(eof, "the fourth connection of one client is closed at once");
        held.pop();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = TcpStream::connect(addr).await.unwrap();
        again
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (answer, _) = read_all(&mut again, Duration::from_secs(2)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.cancel();
    }
}
