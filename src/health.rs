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

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Readiness, metrics: Metrics) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz and /readyz");
    }
    loop {
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
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
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
        });
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
