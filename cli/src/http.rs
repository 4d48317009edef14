//! A tiny HTTP/1.1 GET, enough for etcd's `/health` and tandemd's `/readyz` (no HTTP client
//! crate for two probes).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `path` from `address`; the status code and body, or why there is none.
pub async fn get(address: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(address).await.map_err(|e| format!("connect {address}: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        parse_response(&raw)
    };
    tokio::time::timeout(Duration::from_secs(3), exchange).await.map_err(|_| format!("GET {path}: timed out"))?
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_string()).unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_body_are_read() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready\n";
        assert_eq!(parse_response(raw).unwrap(), (503, "not ready".to_string()));
        assert!(parse_response(b"garbage").is_err());
    }
}
