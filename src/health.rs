//! `/healthz` and `/readyz` over plain HTTP/1.1, for kubelet probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// Whether the operator is ready to serve: caches synced.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Serves the health endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, readiness: Readiness) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz and /readyz");
    }
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            continue;
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = respond(path, &readiness);
            debug!(%peer, path, status, "health request");
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

fn respond(path: &str, readiness: &Readiness) -> (&'static str, &'static str) {
    match path {
        "/healthz" => ("200 OK", "ok\n"),
        "/readyz" if readiness.is_ready() => ("200 OK", "ready\n"),
        "/readyz" => ("503 Service Unavailable", "caches not synced yet\n"),
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
}
