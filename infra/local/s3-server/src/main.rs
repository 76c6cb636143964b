//! The local stack's S3 server: s3s-fs's service over a directory, with TCP_NODELAY.
//!
//! Same command line as the `s3s-fs` binary (host, port, access and secret key, root). The
//! only behavioural difference is `set_nodelay(true)` on each accepted socket: without it a
//! small response body written after its head waits for the peer's delayed ACK (~40 ms on
//! Linux) whenever the client reuses a pooled connection, which is how every SDK talks to S3.

use std::path::PathBuf;

use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use s3s_fs::FileSystem;
use tokio::net::TcpListener;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "S3 API over a local directory (the local stack's S3 server)"
)]
struct Opt {
    /// Host name to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port number to listen on.
    #[arg(long, default_value = "8014")]
    port: u16,
    /// Access key used for authentication (with --secret-key).
    #[arg(long, requires = "secret_key")]
    access_key: Option<String>,
    /// Secret key used for authentication (with --access-key).
    #[arg(long, requires = "access_key")]
    secret_key: Option<String>,
    /// Root directory of stored data.
    root: PathBuf,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opt = Opt::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_ansi(false)
        .init();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(opt))
}

async fn run(opt: Opt) -> Result<(), Box<dyn std::error::Error>> {
    let fs = FileSystem::new(&opt.root)
        .map_err(|e| format!("cannot use {}: {e:?}", opt.root.display()))?;
    let service = {
        let mut b = S3ServiceBuilder::new(fs);
        if let (Some(ak), Some(sk)) = (opt.access_key, opt.secret_key) {
            b.set_auth(SimpleAuth::from_single(ak, sk));
            info!("authentication is enabled");
        }
        b.build()
    };

    let listener = TcpListener::bind((opt.host.as_str(), opt.port)).await?;
    info!("server is running at http://{}", listener.local_addr()?);
    let http = ConnBuilder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        let socket = tokio::select! {
            res = listener.accept() => match res {
                Ok((socket, _)) => socket,
                Err(err) => {
                    tracing::error!("error accepting connection: {err}");
                    continue;
                }
            },
            _ = ctrl_c.as_mut() => break,
            _ = term.recv() => break,
        };
        // The reason this binary exists; see the module doc.
        if let Err(err) = socket.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY: {err}");
        }
        let conn = http.serve_connection(TokioIo::new(socket), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }

    // Drain in-flight requests, bounded.
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
    }
    info!("server is stopped");
    Ok(())
}
