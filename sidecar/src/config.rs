//! tandemd's configuration: every flag is also an environment variable.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tandem_transport::tls::{PemSource, TlsSources};

use crate::app_channel::AppProtocol;
use crate::discovery::EtcdTls;
use crate::invoke::balance::{ConcurrencyLimit, LbPolicy};

/// Flags of `tandemd`. A port of 0 binds a free port; the bound address is logged.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tandemd",
    version,
    about = "Tandem sidecar: discovery and service invocation over gRPC, Dapr-compatible"
)]
pub struct Config {
    /// Id of the app this sidecar fronts (letters, digits, '.', '_', '-').
    #[arg(long, env = "TANDEM_APP_ID")]
    pub app_id: String,

    /// Port of the app's callback gRPC server (AppCallback). Leave out for an app that only calls out.
    #[arg(long, env = "TANDEM_APP_PORT")]
    pub app_port: Option<u16>,

    /// The protocol the app speaks: http (Dapr's default: invoked at its paths, subscriptions
    /// from GET /dapr/subscribe, events POSTed as CloudEvents) or grpc (Dapr's AppCallback).
    #[arg(long, env = "TANDEM_APP_PROTOCOL", value_enum, default_value_t = AppProtocol::Http)]
    pub app_protocol: AppProtocol,

    /// With --enable-app-health-check: the path an HTTP app's health is probed at (GET, 2xx
    /// is healthy).
    #[arg(long, env = "TANDEM_APP_HEALTH_CHECK_PATH", default_value = "/healthz")]
    pub app_health_check_path: String,

    /// Probe an HTTP app's health at --app-health-check-path (without it, an HTTP app that
    /// accepts connections is healthy; a gRPC app's AppCallbackHealthCheck is always probed).
    #[arg(long, env = "TANDEM_ENABLE_APP_HEALTH_CHECK", default_value_t = false)]
    pub enable_app_health_check: bool,

    /// Host of the app's callback server.
    #[arg(long, env = "TANDEM_APP_HOST", default_value = "127.0.0.1")]
    pub app_host: String,

    /// With a token, every call of the app-facing API (gRPC and HTTP) must carry it in its
    /// `dapr-api-token` header (Dapr's `DAPR_API_TOKEN`; prefer the variable: a flag shows in
    /// the process list). The health paths stay open.
    #[arg(long, env = "DAPR_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,

    /// A token sent in the `dapr-api-token` header of every call into the app, so that it can
    /// tell its sidecar's calls from anyone else's (Dapr's `APP_API_TOKEN`).
    #[arg(long, env = "APP_API_TOKEN", hide_env_values = true)]
    pub app_api_token: Option<String>,

    /// Port of the app-facing Dapr gRPC API.
    #[arg(long, env = "DAPR_GRPC_PORT", default_value_t = 50001)]
    pub grpc_port: u16,

    /// Port of the app-facing Dapr HTTP API (`/v1.0/...`).
    #[arg(long, env = "DAPR_HTTP_PORT", default_value_t = 3500)]
    pub http_port: u16,

    /// Port of the sidecar-to-sidecar API (tandem.internal.v1).
    #[arg(long, env = "TANDEM_INTERNAL_PORT", default_value_t = 50002)]
    pub internal_port: u16,

    /// Port of the admin HTTP server (/healthz, /readyz, Dapr's /v1.0/healthz).
    #[arg(long, env = "TANDEM_ADMIN_PORT", default_value_t = 9090)]
    pub admin_port: u16,

    /// Address every listener binds to.
    #[arg(long, env = "TANDEM_LISTEN_ADDRESS", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub listen_address: IpAddr,

    /// Address peers use to reach this sidecar's internal port (defaults to the bound address).
    #[arg(long, env = "TANDEM_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// etcd client endpoints, comma-separated.
    #[arg(long, env = "TANDEM_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,

    /// TLS to etcd (use https:// endpoints): the CA that signed etcd's server certificate (PEM).
    #[arg(long, env = "TANDEM_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// A client certificate for etcd's --client-cert-auth (PEM), with --etcd-key-file.
    #[arg(long, env = "TANDEM_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,

    /// The key of --etcd-cert-file (PEM).
    #[arg(long, env = "TANDEM_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,

    /// Namespace: sidecars see only the apps of their own namespace.
    #[arg(long, env = "TANDEM_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Mutual TLS on the sidecar-to-sidecar port: every connection between sidecars is TLS 1.3
    /// with an X.509 SVID on both sides (`spiffe://TRUST_DOMAIN/ns/NAMESPACE/APP_ID`), checked
    /// against the trust anchors; the caller's app-id comes from its certificate.
    #[arg(long, env = "TANDEM_ENABLE_MTLS", default_value_t = false)]
    pub enable_mtls: bool,

    /// The trust domain of the SPIFFE ids (Dapr's default: public).
    #[arg(long, env = "TANDEM_TRUST_DOMAIN", default_value = "public")]
    pub trust_domain: String,

    /// This sidecar's SVID (PEM; then any intermediates). Read again when it changes.
    #[arg(long, env = "TANDEM_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// The SVID's private key (PEM). Read again when it changes.
    #[arg(long, env = "TANDEM_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// The roots accepted for peers (PEM, one or several: an old and a new root while a root is
    /// rotated). Read again when it changes.
    #[arg(long, env = "TANDEM_TRUST_ANCHORS_FILE")]
    pub trust_anchors_file: Option<PathBuf>,

    /// A Dapr `Configuration` file: its `spec.accessControl` decides which callers may invoke
    /// which of the app's operations; its `spec.mtls.enabled` turns mutual TLS on, and a
    /// `trustDomain` in either section is this sidecar's.
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,

    /// Dapr's variables holding the PEM itself, used where the file flags are not given.
    #[arg(long, env = "DAPR_CERT_CHAIN", hide = true, hide_env_values = true)]
    pub cert_chain_pem: Option<String>,
    #[arg(long, env = "DAPR_CERT_KEY", hide = true, hide_env_values = true)]
    pub cert_key_pem: Option<String>,
    #[arg(long, env = "DAPR_TRUST_ANCHORS", hide = true, hide_env_values = true)]
    pub trust_anchors_pem: Option<String>,

    /// Directory for this sidecar's data (state, outbox); created when missing.
    #[arg(long, env = "TANDEM_DATA_DIR", default_value = "./tandem-data")]
    pub data_dir: PathBuf,

    /// Writes to the data dir (state.sled, pubsub.embedded) are refused with RESOURCE_EXHAUSTED
    /// while less free space than this would be left (e.g. 64Mi), and /readyz reports it.
    #[arg(long, env = "TANDEM_MIN_FREE_DISK", default_value = "64Mi", value_parser = parse_size)]
    pub min_free_disk: usize,

    /// Space kept in reserve in the data dir (`.tandem-reserve`) and released when tandemd
    /// starts on a full disk, so that its stores can open and serve reads (0: none).
    #[arg(long, env = "TANDEM_DISK_RESERVE", default_value = "16Mi", value_parser = parse_size_or_zero)]
    pub disk_reserve: usize,

    /// Directory of Dapr-format component files (state stores, ...). Without it, a sled state
    /// store named `statestore` under --data-dir is there by default.
    #[arg(long, env = "TANDEM_RESOURCES_PATH")]
    pub resources_path: Option<PathBuf>,

    /// Largest payload accepted in one request (a state value, an invocation body), e.g.
    /// 16Mi, 512Ki or a number of bytes.
    #[arg(long, env = "TANDEM_MAX_BODY_SIZE", default_value = "16Mi", value_parser = parse_size)]
    pub max_body_size: usize,

    /// TTL of the discovery lease in seconds: a dead instance leaves routing within about this long.
    #[arg(long, env = "TANDEM_LEASE_TTL", default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..=3600))]
    pub lease_ttl: i64,

    /// The longest a training-group operation (all-reduce, broadcast) waits for another
    /// member's piece before it fails with DEADLINE_EXCEEDED (e.g. 60s). A member that dies is
    /// noticed sooner, within --lease-ttl; this bounds a member that hangs.
    #[arg(long, env = "TANDEM_GROUP_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub group_timeout: Duration,

    /// How long a training group's round waits for more members once its minimum wait, unless
    /// the app sets its own (e.g. 2s).
    #[arg(long, env = "TANDEM_GROUP_LAST_CALL", default_value = "2s", value_parser = parse_duration)]
    pub group_last_call: Duration,

    /// How often the app's health check is probed (e.g. 500ms, 5s).
    #[arg(long, env = "TANDEM_APP_HEALTH_PROBE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub app_health_probe_interval: Duration,

    /// How an invocation picks among the target's instances: p2c (of two picked at random, the
    /// one with fewer calls in flight from this sidecar) or round-robin.
    #[arg(long, env = "TANDEM_LB_POLICY", value_enum, default_value_t = LbPolicy::P2c)]
    pub lb_policy: LbPolicy,

    /// How many calls this sidecar keeps in flight to one instance: adaptive (learned from the
    /// instance's refusals as busy; calls beyond it are shed here at once, RESOURCE_EXHAUSTED)
    /// or off (every call is sent, and the instance refuses what it cannot take).
    #[arg(long, env = "TANDEM_CONCURRENCY_LIMIT", value_enum, default_value_t = ConcurrencyLimit::Adaptive)]
    pub concurrency_limit: ConcurrencyLimit,

    /// How long an instance that failed a call (UNAVAILABLE, or a connection that could not be
    /// made or broke) is left out of balancing; doubled for each ejection in a row.
    #[arg(long, env = "TANDEM_EJECTION_BASE_TIME", default_value = "1s", value_parser = parse_duration)]
    pub ejection_base_time: Duration,

    /// The longest an instance stays ejected.
    #[arg(long, env = "TANDEM_EJECTION_MAX_TIME", default_value = "30s", value_parser = parse_duration)]
    pub ejection_max_time: Duration,

    /// How long a graceful shutdown waits for in-flight calls.
    #[arg(long, env = "TANDEM_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Threads that run the sidecar. One suits a sidecar beside a busy app (less CPU per call,
    /// no cross-thread wake-ups); raise it for a sidecar that must carry more than one core.
    #[arg(long, env = "TANDEM_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,

    /// Log filter (tracing's EnvFilter syntax, e.g. info or tandem_sidecar=debug).
    #[arg(long, env = "TANDEM_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log lines as human-readable text or as one JSON object per line.
    #[arg(long, env = "TANDEM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How tandemd writes its logs (stdout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    /// Checks what clap cannot: names that end up in etcd keys.
    pub fn validate(&self) -> Result<(), String> {
        validate_name("app-id", &self.app_id)?;
        validate_name("namespace", &self.namespace)?;
        validate_name("trust domain", &self.trust_domain)?;
        if self.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err("--etcd-endpoints: at least one endpoint is needed".into());
        }
        for endpoint in self.etcd_endpoints.iter().filter(|e| !e.trim().is_empty()) {
            validate_endpoint(endpoint.trim())?;
        }
        Ok(())
    }

    /// TLS to etcd, when any of its files is given; every endpoint must then be https://.
    pub fn etcd_tls(&self) -> Result<Option<EtcdTls>, String> {
        let tls =
            EtcdTls::read(self.etcd_ca_file.as_deref(), self.etcd_cert_file.as_deref(), self.etcd_key_file.as_deref())?;
        if tls.is_some()
            && let Some(plain) = self.etcd_endpoints.iter().find(|endpoint| endpoint.trim().starts_with("http://"))
        {
            return Err(format!("--etcd-endpoints: '{plain}' is plaintext, but TLS to etcd is set up; use https://"));
        }
        Ok(tls)
    }

    /// With --enable-mtls: where the SVID, its key and the trust anchors come from (a file
    /// flag, else Dapr's variable).
    pub fn tls_sources(&self) -> Result<Option<TlsSources>, String> {
        if !self.enable_mtls {
            return Ok(None);
        }
        let source = |file: &Option<PathBuf>, pem: &Option<String>, flag: &str, variable: &str| match (
            file,
            pem.as_ref().filter(|pem| !pem.trim().is_empty()),
        ) {
            (Some(path), _) => Ok(PemSource::File(path.clone())),
            (None, Some(pem)) => Ok(PemSource::Env { name: variable.into(), pem: pem.clone() }),
            (None, None) => Err(format!("--enable-mtls needs {flag} (or {variable})")),
        };
        Ok(Some(TlsSources {
            cert_chain: source(&self.cert_file, &self.cert_chain_pem, "--cert-file", "DAPR_CERT_CHAIN")?,
            key: source(&self.key_file, &self.cert_key_pem, "--key-file", "DAPR_CERT_KEY")?,
            trust_anchors: source(
                &self.trust_anchors_file,
                &self.trust_anchors_pem,
                "--trust-anchors-file",
                "DAPR_TRUST_ANCHORS",
            )?,
        }))
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen_address, self.grpc_port)
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen_address, self.http_port)
    }

    pub fn internal_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen_address, self.internal_port)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.listen_address, self.admin_port)
    }
}

/// App-ids and namespaces become etcd key segments, so they may not contain '/'.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > 128 {
        return Err(format!("{what} '{name}' is longer than 128 characters"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("{what} '{name}' contains '{c}'; use letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// An etcd endpoint is `http://host:port`, `https://host:port` or `host:port`.
fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let with_scheme = if endpoint.contains("://") { endpoint.to_string() } else { format!("http://{endpoint}") };
    let bad = |why: &str| format!("--etcd-endpoints: '{endpoint}' {why} (want http://host:port)");
    let uri: http::Uri = with_scheme.parse().map_err(|_| bad("is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("has a scheme other than http or https"));
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.host().is_empty() || authority.port_u16().is_none() {
        return Err(bad("needs a host and a port"));
    }
    Ok(())
}

/// [`parse_size`], or 0.
pub fn parse_size_or_zero(s: &str) -> Result<usize, String> {
    if s.trim() == "0" { Ok(0) } else { parse_size(s) }
}

/// Parses a size: a number of bytes, or with Ki, Mi or Gi (powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (number, factor) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => match &s[i..] {
            "Ki" => (&s[..i], 1usize << 10),
            "Mi" => (&s[..i], 1 << 20),
            "Gi" => (&s[..i], 1 << 30),
            unit => return Err(format!("'{s}': unknown unit '{unit}' (use Ki, Mi, Gi or a number of bytes)")),
        },
        None => (s, 1),
    };
    let value: usize = number.parse().map_err(|_| format!("'{s}' is not a size (try 16Mi)"))?;
    value
        .checked_mul(factor)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{s}' must be a positive size that fits in memory"))
}

/// Parses `250ms`, `5s`, `2m`, `24h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = number.parse().map_err(|_| format!("'{s}' is not a duration (try 500ms or 5s)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("'{s}' must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(24 * 3600));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("0s").is_err());
    }

    #[test]
    fn names_that_would_break_etcd_keys_are_rejected() {
        assert!(validate_name("app-id", "svc-a.v2_x").is_ok());
        assert!(validate_name("app-id", "").unwrap_err().contains("empty"));
        assert!(validate_name("app-id", "a/b").unwrap_err().contains("'/'"));
        assert!(validate_name("app-id", "a b").is_err());
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("16Mi").unwrap(), 16 << 20);
        assert_eq!(parse_size("512Ki").unwrap(), 512 << 10);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("16MB").unwrap_err().contains("unknown unit 'MB'"));
        assert!(parse_size("0").is_err());
        assert!(parse_size("Mi").is_err());
    }

    #[test]
    fn etcd_endpoints_are_checked_at_start() {
        for good in ["http://127.0.0.1:2379", "https://etcd.example:2379", "etcd-0.etcd:2379"] {
            assert!(validate_endpoint(good).is_ok(), "{good}");
        }
        for bad in ["http://", "ftp://h:1", "h", "http://h", "not a url"] {
            let err = validate_endpoint(bad).unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn every_flag_has_an_env_var() {
        let cmd = <Config as clap::CommandFactory>::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_env().is_some(), "flag --{id} has no environment variable");
        }
    }
}
