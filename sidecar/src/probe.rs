//! `tandemd probe`: asks a running tandemd's admin server whether it is ready (or alive) and
//! turns the answer into an exit code, for container health checks.
//!
//! Container images of tandemd are `FROM scratch` (no shell, no curl), so Docker's
//! `HEALTHCHECK`/compose `healthcheck` runs `tandemd probe` instead: one HTTP/1.0 GET to
//! `127.0.0.1:$TANDEM_ADMIN_PORT/readyz`, exit 0 on a 2xx answer and 1 on anything else
//! (the status line and body are printed, so `docker inspect` shows why). It reads the same
//! `--admin-port`/`TANDEM_ADMIN_PORT` as the sidecar, so the probe needs no extra configuration.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use clap::Parser;

use crate::config::parse_duration;

/// Flags of `tandemd probe`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tandemd probe",
    about = "Exit 0 when a local tandemd's admin endpoint answers 2xx (for container health checks)"
)]
pub struct ProbeArgs {
    /// Admin port of the tandemd to probe (the sidecar's --admin-port).
    #[arg(long, env = "TANDEM_ADMIN_PORT", default_value_t = 9090)]
    pub admin_port: u16,

    /// Host the admin server is reached on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Path to ask: /readyz (readiness, the default) or /healthz (liveness).
    #[arg(long, default_value = "/readyz")]
    pub path: String,

    /// How long connecting and reading the answer may take in all.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// What the admin server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub status: u16,
    pub body: String,
}

impl ProbeAnswer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends one `GET path` and reads the whole answer (HTTP/1.0: the server closes after it).
pub fn probe(args: &ProbeArgs) -> Result<ProbeAnswer, String> {
    if !args.path.starts_with('/') {
        return Err(format!("--path '{}' must start with '/'", args.path));
    }
    let target = format!("{}:{}", args.host, args.admin_port);
    let address: SocketAddr = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&address, args.timeout).map_err(|e| format!("cannot connect to {address}: {e}"))?;
    stream.set_read_timeout(Some(args.timeout)).and_then(|_| stream.set_write_timeout(Some(args.timeout))).ok();
    let request = format!("GET {} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n", args.path, args.host);
    stream.write_all(request.as_bytes()).map_err(|e| format!("cannot send to {address}: {e}"))?;
    let mut raw = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut raw).map_err(|e| format!("no answer from {address}: {e}"))?;
    parse_answer(&String::from_utf8_lossy(&raw)).ok_or_else(|| format!("{address} did not answer HTTP"))
}

fn parse_answer(raw: &str) -> Option<ProbeAnswer> {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some(ProbeAnswer { status, body: body.trim().to_string() })
}

/// `tandemd probe ...`: prints what happened and returns the process exit code.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match ProbeArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match probe(&args) {
        Ok(answer) if answer.is_success() => {
            println!("{} {}: {} {}", args.admin_port, args.path, answer.status, answer.body);
            0
        }
        Ok(answer) => {
            println!("{} {}: {} {}", args.admin_port, args.path, answer.status, answer.body);
            1
        }
        Err(e) => {
            println!("probe failed: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot HTTP server answering `response` to the first connection.
    fn serve_once(response: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            conn.write_all(response.as_bytes()).unwrap();
        });
        port
    }

    fn args(port: u16) -> Vec<String> {
        vec!["tandemd probe".into(), "--admin-port".into(), port.to_string(), "--timeout".into(), "2s".into()]
    }

    #[test]
    fn a_2xx_answer_exits_0_and_anything_else_exits_1() {
        assert_eq!(run(args(serve_once("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"))), 0);
        assert_eq!(run(args(serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: x\n"))), 1);
        assert_eq!(run(args(serve_once("garbage"))), 1);
    }

    #[test]
    fn nothing_listening_exits_1_and_bad_flags_exit_2() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert_eq!(run(args(port)), 1);
        assert_eq!(run(["tandemd probe", "--admin-port", "not-a-port"]), 2);
        let bad_path = ProbeArgs::try_parse_from(["p", "--path", "readyz"]).unwrap();
        assert!(probe(&bad_path).unwrap_err().contains("must start with '/'"));
    }

    #[test]
    fn the_answer_is_parsed_into_status_and_body() {
        let answer =
            parse_answer("HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\nnot ready: app unhealthy\n").unwrap();
        assert_eq!(answer, ProbeAnswer { status: 503, body: "not ready: app unhealthy".into() });
        assert!(parse_answer("SSH-2.0-OpenSSH").is_none());
    }
}
