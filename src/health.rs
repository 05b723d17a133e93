//! `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1, for kubelet
//! probes and Prometheus.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::metrics::Metrics;

const SINGLE: u8 = 0;
const STANDBY: u8 = 1;
const LEADER: u8 = 2;

/// What `/readyz` reports: caches synced, and with leader election whether
/// this replica leads or stands by. A standby is ready: it is healthy and
/// takes over when the leader goes.
#[derive(Clone, Default)]
pub struct Readiness {
    synced: Arc<AtomicBool>,
    role: Arc<AtomicU8>,
}

impl Readiness {
    pub fn set_ready(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
    /// Leader election is on and this replica waits for the lease.
    pub fn set_standby(&self) {
        self.role.store(STANDBY, Ordering::Relaxed);
    }
    pub fn set_leader(&self) {
        self.role.store(LEADER, Ordering::Relaxed);
    }
}

/// Connections served at once: kubelet's probes and a scraper or two need
/// a handful; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

/// The longest a connection may take, from accepting it to the last byte
/// of the answer: a client that sends nothing, or reads nothing, is cut off.
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Readiness, metrics: Metrics) {
    serve_within(listener, readiness, metrics, MAX_CONNECTIONS, CONNECTION_TIMEOUT).await
}

/// [`serve`], with at most `max_connections` served at once, each for at
/// most `timeout`: idle or slow clients (the port may be reachable from
/// other pods) can neither pile up tasks nor hold the probes off for long.
async fn serve_within(
    listener: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
    max_connections: usize,
    timeout: std::time::Duration,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz and /readyz");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: don't spin.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let readiness = readiness.clone();
        let metrics = metrics.clone();
        tokio::spawn(tokio::time::timeout(timeout, async move {
            let _slot = slot;
            let mut buf = [0u8; 1024];
            let Ok(n) = stream.read(&mut buf).await else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body) = match path {
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ),
                _ => {
                    let (status, body) = respond(path, &readiness);
                    (status, "text/plain", body.to_string())
                }
            };
            debug!(%peer, path, status, "health request");
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }));
    }
}

fn respond(path: &str, readiness: &Readiness) -> (&'static str, &'static str) {
    match path {
        "/healthz" => ("200 OK", "ok\n"),
        "/readyz" => match readiness.role.load(Ordering::Relaxed) {
            STANDBY => ("200 OK", "standby: another replica holds the lease\n"),
            LEADER if readiness.is_ready() => ("200 OK", "ready: leading\n"),
            SINGLE if readiness.is_ready() => ("200 OK", "ready\n"),
            _ => ("503 Service Unavailable", "caches not synced yet\n"),
        },
        _ => ("404 Not Found", "not found\n"),
    }
}

/// Binds the health listener; `None` when disabled (address `0`).
pub async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => TcpListener::bind(addr).await.map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_clients_are_cut_off_and_cannot_hold_more_than_their_slots() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = std::time::Duration::from_millis(500);
        tokio::spawn(serve_within(listener, Readiness::default(), Metrics::new(), 2, timeout));
        // Two clients that connect and send nothing take both slots.
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
        probe.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(std::time::Duration::from_secs(10), probe.read_to_string(&mut answer))
            .await
            .expect("the probe is answered once an idle client is cut off")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        // It was: the idle clients were closed by the server.
        for mut client in idle {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(std::time::Duration::from_secs(1), client.read_to_end(&mut rest)).await;
            assert!(matches!(read, Ok(Ok(0))), "an idle client was cut off: {read:?}");
        }
    }

    #[test]
    fn readyz_follows_readiness() {
        let r = Readiness::default();
        assert_eq!(respond("/healthz", &r).0, "200 OK");
        assert_eq!(respond("/readyz", &r).0, "503 Service Unavailable");
        r.set_ready();
        assert_eq!(respond("/readyz", &r).0, "200 OK");
        assert_eq!(respond("/other", &r).0, "404 Not Found");
    }

    #[test]
    fn readyz_with_leader_election() {
        let r = Readiness::default();
        r.set_standby();
        assert_eq!(
            respond("/readyz", &r),
            ("200 OK", "standby: another replica holds the lease\n")
        );
        r.set_leader();
        assert_eq!(
            respond("/readyz", &r).0,
            "503 Service Unavailable",
            "leading, caches not synced"
        );
        r.set_ready();
        assert_eq!(respond("/readyz", &r), ("200 OK", "ready: leading\n"));
    }
}
