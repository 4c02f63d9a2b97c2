//! `parleyd proxy`: a small TCP load balancer for the workers of one homeserver, the one the
//! devnet runs in front of its workers and the reference compose file runs as a service.
//!
//! Each route listens on one address and hands every accepted connection to the next backend
//! in turn (round robin); a backend that refuses or does not answer within
//! [`CONNECT_TIMEOUT`] is skipped for that connection, so a dead worker only costs the
//! connections that were on it. Bytes are copied both ways untouched: TLS (federation) ends
//! at the worker, and a WebSocket stays on the worker it was accepted by. Nothing in Parley
//! needs a client to come back to the same worker (no sticky sessions): every worker reads
//! and writes the shared database, and live traffic between workers goes over NATS.
//!
//! Backends are `host:port` and are resolved at every connection, so a restarted container
//! with a new address is found again.

use anyhow::{bail, Context as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// How long a backend may take to accept a connection before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a failed `accept` (out of file descriptors): the listener is retried, not lost.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// `parleyd proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// A route: LISTEN=BACKEND[,BACKEND...], e.g. 0.0.0.0:8008=worker1:8008,worker2:8008.
    /// Repeat for each listener.
    #[arg(long = "route", value_name = "LISTEN=BACKENDS", required = true, value_parser = Route::parse)]
    pub routes: Vec<Route>,
}

/// One listener and the backends it spreads connections over.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Where it listens.
    pub listen: SocketAddr,
    /// `host:port` of each backend, tried in turn.
    pub backends: Vec<String>,
}

impl Route {
    /// Parses `LISTEN=BACKEND[,BACKEND...]`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (listen, backends) = text.split_once('=').context("a route is LISTEN=BACKEND[,BACKEND...]")?;
        let listen: SocketAddr = listen.parse().with_context(|| format!("{listen:?} is not an address like 0.0.0.0:8008"))?;
        let backends: Vec<String> = backends.split(',').map(|b| b.trim().to_owned()).collect();
        for backend in &backends {
            match backend.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
                _ => bail!("backend {backend:?} is not host:port"),
            }
        }
        Ok(Self { listen, backends })
    }
}

/// Runs `parleyd proxy` until Ctrl-C or SIGTERM.
pub fn main(args: ProxyArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for route in args.routes {
            let listener = TcpListener::bind(route.listen).await.with_context(|| format!("binding {}", route.listen))?;
            println!("parleyd proxy listening on {} for {}", listener.local_addr()?, route.backends.join(", "));
            tasks.spawn(serve(listener, route.backends));
        }
        tokio::select! {
            () = crate::cli::shutdown_signal() => Ok(()),
            Some(ended) = tasks.join_next() => ended.context("a route's task failed"),
        }
    })
}

/// Accepts connections on `listener` forever and forwards each to a backend.
pub async fn serve(listener: TcpListener, backends: Vec<String>) {
    let backends: Arc<[String]> = backends.into();
    let next = AtomicUsize::new(0);
    loop {
        let inbound = match listener.accept().await {
            Ok((inbound, _)) => inbound,
            Err(error) => {
                tracing::warn!(%error, "proxy: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let first = next.fetch_add(1, Ordering::Relaxed);
        let backends = backends.clone();
        tokio::spawn(async move {
            if let Err(error) = forward(inbound, &backends, first).await {
                tracing::debug!(%error, "proxy: connection ended");
            }
        });
    }
}

/// Connects to the first backend (from `first`, in turn) that answers and copies bytes both
/// ways until either side closes. With none answering, the client's connection is closed.
async fn forward(mut inbound: TcpStream, backends: &[String], first: usize) -> anyhow::Result<()> {
    let _ = inbound.set_nodelay(true);
    for k in 0..backends.len() {
        let backend = &backends[(first + k) % backends.len()];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend.as_str())).await {
            Ok(Ok(mut outbound)) => {
                let _ = outbound.set_nodelay(true);
                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
                return Ok(());
            }
            Ok(Err(error)) => tracing::debug!(%backend, %error, "proxy: backend refused"),
            Err(_) => tracing::debug!(%backend, "proxy: backend did not answer"),
        }
    }
    bail!("no backend answered")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[test]
    fn routes_parse_and_bad_ones_are_refused() {
        let route = Route::parse("0.0.0.0:8008=worker1:8008,10.0.0.2:8008").unwrap();
        assert_eq!(route.listen, SocketAddr::from(([0, 0, 0, 0], 8008)));
        assert_eq!(route.backends, ["worker1:8008", "10.0.0.2:8008"]);
        for bad in ["0.0.0.0:8008", "nonsense=w:1", "0.0.0.0:8008=w", "0.0.0.0:8008=w:0", "0.0.0.0:8008=:80", "0.0.0.0:8008=w:1,"]
        {
            assert!(Route::parse(bad).is_err(), "{bad}");
        }
    }

    /// A backend that answers every connection with its name.
    async fn named_backend(name: &'static str) -> (String, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4];
                    if stream.read_exact(&mut request).await.is_ok() {
                        let _ = stream.write_all(format!("{name}:{}", String::from_utf8_lossy(&request)).as_bytes()).await;
                    }
                });
            }
        });
        (address, task)
    }

    async fn ask(proxy: SocketAddr) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(proxy).await?;
        stream.write_all(b"ping").await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn connections_go_round_robin_and_skip_a_dead_backend() {
        let (a, a_task) = named_backend("a").await;
        let (b, _b_task) = named_backend("b").await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, vec![a.clone(), b]));
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(ask(proxy).await.unwrap());
        }
        assert_eq!(answers, ["a:ping", "b:ping", "a:ping", "b:ping"], "bytes both ways, backends in turn");

        // `a` dies (its port now refuses): every connection goes to `b`.
        a_task.abort();
        let _ = a_task.await;
        for _ in 0..3 {
            assert_eq!(ask(proxy).await.unwrap(), "b:ping");
        }
    }
}
