//! The command line: global flags and one struct per subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tandem_sidecar::config::parse_duration;
use tandem_sidecar::discovery::EtcdTls;

use crate::error::CliError;
use crate::registry::EtcdAccess;

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem's command line: run the AI pipeline locally, call apps, publish events, read state",
    after_help = "Exit codes: 0 ok, 1 failed, 2 bad arguments or input, 3 etcd or sidecar unreachable, \
                  4 unknown app or key, 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// etcd endpoints, comma-separated (not used by `up`, which starts its own etcd).
    #[arg(
        long,
        global = true,
        env = "TANDEM_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,

    /// TLS to etcd (with https:// endpoints): the CA of etcd's server certificate (PEM).
    #[arg(long, global = true, env = "TANDEM_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// A client certificate for etcd's --client-cert-auth (PEM), with --etcd-key-file.
    #[arg(long, global = true, env = "TANDEM_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,

    /// The key of --etcd-cert-file (PEM).
    #[arg(long, global = true, env = "TANDEM_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,

    /// Namespace of the apps.
    #[arg(long, global = true, env = "TANDEM_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// The sidecar API to go through (`http://HOST:PORT`) for invoke, publish and state get.
    /// Default: a sidecar found through etcd, else http://127.0.0.1:50001.
    #[arg(long, global = true, env = "TANDEM_SIDECAR")]
    pub sidecar: Option<String>,
}

impl Global {
    /// The etcd endpoints and, when its files are given, TLS to them.
    pub fn etcd_access(&self) -> Result<EtcdAccess, CliError> {
        let tls =
            EtcdTls::read(self.etcd_ca_file.as_deref(), self.etcd_cert_file.as_deref(), self.etcd_key_file.as_deref())
                .map_err(CliError::usage)?;
        Ok(EtcdAccess { endpoints: self.etcd.clone(), tls })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the AI pipeline here: etcd, then tandemd + service for ingest, preprocess, train and
    /// serve, until Ctrl-C (a train replica that dies is restarted).
    Up(Box<UpArgs>),
    /// Invoke METHOD on app APP through the mesh and print the answer.
    Invoke(InvokeArgs),
    /// Publish a JSON event to TOPIC of pub/sub component PUBSUB.
    Publish(PublishArgs),
    /// Read an app's state.
    #[command(subcommand)]
    State(StateCommand),
    /// List the apps and their live instances registered in etcd.
    Ls(LsArgs),
    /// Remove app APP's subscription to TOPIC of pub/sub PUBSUB, for an app that is gone for
    /// good: publishers then release the events they kept for it.
    Unsubscribe(UnsubscribeArgs),
    /// Datasets for the pipeline.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Certificates for mutual TLS between sidecars, for local use: a root and SPIFFE SVIDs.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a root (DIR/ca.crt, the trust anchor; DIR/ca.key, its key).
    Init(CertsInitArgs),
    /// Issue an SVID for an app (OUT/APP_ID.crt and OUT/APP_ID.key), signed by DIR's root.
    Issue(CertsIssueArgs),
    /// Keep the SVIDs of several apps fresh: OUT/APP_ID/tls.crt, tls.key and ca.crt (the names
    /// cert-manager's csi-driver-spiffe uses), signed by DIR's root (created when there is
    /// none), issued again once less than half of --ttl is left or when they do not chain to
    /// the root. With --every it keeps doing so (compose's `certs` service).
    Renew(CertsRenewArgs),
    /// Exit 0 when every directory under OUT holds a usable SVID (its key, a chain to the
    /// ca.crt beside it, a SPIFFE id, not expired); 1, naming what is wrong, otherwise.
    Check(CertsCheckArgs),
}

#[derive(Debug, Args)]
pub struct CertsRenewArgs {
    /// An app to keep an SVID for (repeat the flag for several).
    #[arg(long = "app-id", required = true)]
    pub app_ids: Vec<String>,
    #[command(flatten)]
    pub svid: SvidArgs,
    /// How long a root created here is valid.
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub root_ttl: Duration,
    /// Where the apps' directories go.
    #[arg(long)]
    pub out: PathBuf,
    /// Give the SVID files to this user (UID:GID), e.g. the sidecars' when this runs as root.
    #[arg(long, value_parser = parse_owner)]
    pub owner: Option<(u32, u32)>,
    /// Keep running, checking again at this interval (e.g. 10m).
    #[arg(long, value_parser = parse_duration)]
    pub every: Option<Duration>,
}

fn parse_owner(value: &str) -> Result<(u32, u32), String> {
    let invalid = || format!("'{value}' is not UID:GID (two numbers, e.g. 65532:65532)");
    let (uid, gid) = value.split_once(':').ok_or_else(invalid)?;
    Ok((uid.parse().map_err(|_| invalid())?, gid.parse().map_err(|_| invalid())?))
}

#[derive(Debug, Args)]
pub struct CertsCheckArgs {
    /// The directory of the apps' SVID directories (`tandem certs renew --out`).
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CertsInitArgs {
    /// Where the root's files go.
    #[arg(long, default_value = "tandem-certs")]
    pub dir: PathBuf,
    /// How long the root is valid (e.g. 8760h: a year).
    #[arg(long, default_value = "8760h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The root's common name.
    #[arg(long, default_value = "Tandem root")]
    pub name: String,
    /// Replace a root that exists.
    #[arg(long)]
    pub force: bool,
}

/// What every SVID `tandem certs` issues shares: its trust domain, its life and its root.
#[derive(Debug, Args)]
pub struct SvidArgs {
    /// The trust domain of the SPIFFE ids.
    #[arg(long, default_value = "public")]
    pub trust_domain: String,
    /// How long an SVID is valid (e.g. 24h).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The directory of the root (`tandem certs init --dir`; `renew` creates one there when
    /// it holds none).
    #[arg(long, default_value = "tandem-certs")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct CertsIssueArgs {
    /// The app the SVID is for.
    #[arg(long)]
    pub app_id: String,
    #[command(flatten)]
    pub svid: SvidArgs,
    /// Where the SVID's files go (default: --dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Write a seeded, learnable synthetic classification dataset (the rows of
    /// `--dataset synthetic:ROWS:FEATURES:CLASSES` with that seed) to a Parquet or CSV file,
    /// in bounded memory whatever its size: columns f0..fN and label.
    Synth(SynthArgs),
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Rows to write.
    #[arg(long)]
    pub rows: usize,
    /// Feature columns.
    #[arg(long)]
    pub features: usize,
    /// Classes (labels 0..CLASSES).
    #[arg(long)]
    pub classes: usize,
    /// Seed the rows are drawn from.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The file to write: FILE.parquet (snappy-compressed row groups) or FILE.csv.
    #[arg(long)]
    pub out: PathBuf,
}

/// A JSON payload, given inline or as a file.
#[derive(Debug, Clone, Args)]
#[group(multiple = false)]
pub struct DataArgs {
    /// The payload, JSON.
    #[arg(long, short = 'd')]
    pub data: Option<String>,

    /// Read the JSON payload from this file (`-` for stdin).
    #[arg(long)]
    pub data_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// App-id to call.
    pub app: String,
    /// Method to call.
    pub method: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Deadline of the call (e.g. 500ms, 10s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Pub/sub component name (e.g. `pubsub`).
    pub pubsub: String,
    /// Topic.
    pub topic: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Deadline of the call.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print the value of KEY in APP's state (read from a sidecar of APP).
    Get(StateGetArgs),
}

#[derive(Debug, Args)]
pub struct StateGetArgs {
    /// App-id whose state to read.
    pub app: String,
    /// Key, as the app wrote it.
    pub key: String,
    /// State store name.
    #[arg(long, default_value = "statestore")]
    pub store: String,
    /// Which instance of the app to ask (its id, as `tandem ls` shows it); default the first.
    #[arg(long)]
    pub instance: Option<String>,
    /// Also print the value's ETag (on stderr).
    #[arg(long)]
    pub etag: bool,
    /// Deadline of the call.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct UnsubscribeArgs {
    /// Pub/sub component name (e.g. `pubsub`).
    pub pubsub: String,
    /// Topic.
    pub topic: String,
    /// The subscribed app-id.
    pub app: String,
    /// Remove it even though the app has live instances (their sidecars record the
    /// subscription again when the app restarts or opens a stream for the topic).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `tandem up`. The service options are passed to the services only when given,
/// so each service's own default stays the one default.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Directory holding tandemd and the service binaries (default: the directory of this
    /// `tandem` executable, i.e. target/debug/ or target/release/).
    #[arg(long, env = "TANDEM_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Directory for every process's data and log (default: a new temp dir, removed after a
    /// clean stop and kept after a failure).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,

    /// Component files: `DIR/APP/` for an app that has its own, else the YAML files in DIR
    /// itself (default: the pipeline's own, built into `tandem`: the repository's components/).
    #[arg(long, env = "TANDEM_COMPONENTS")]
    pub components: Option<PathBuf>,

    /// Client port of the etcd it starts (default 2379 when free, so other `tandem` commands
    /// find it without --etcd; 0 for any free port).
    #[arg(long)]
    pub etcd_port: Option<u16>,

    /// How many preprocess replicas to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub preprocess_replicas: u16,

    /// How many train replicas to run (one training group: they average their gradients).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub train_replicas: u16,

    /// How many serve replicas to run (callers' sidecars balance predictions over them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub serve_replicas: u16,

    /// Pause before a train or serve replica that died (its service or its tandemd) is started again.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub restart_delay: Duration,

    /// Restarts of one train or serve replica before `tandem up` gives up and stops everything.
    #[arg(long, default_value_t = 5)]
    pub max_restarts: u32,

    /// How long each process may take to start (sidecars ready, services answering).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub start_timeout: Duration,

    /// Give up (and stop everything) when serve has no model within this long (default: wait).
    #[arg(long, value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,

    /// How long each process gets to exit after SIGTERM before it is killed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub stop_timeout: Duration,

    /// Stop everything and exit 0 once serve has the model (for scripts and tests).
    #[arg(long)]
    pub until_serving: bool,

    /// Mutual TLS between the sidecars: a root and an SVID for each app are issued into the
    /// run dir (`certs/`, as `tandem certs` does) and every tandemd runs with --enable-mtls.
    #[arg(long)]
    pub mtls: bool,

    /// ingest: `digits` (built in) or the path of a CSV file.
    #[arg(long, help_heading = "Pipeline")]
    pub dataset: Option<String>,

    /// ingest: the CSV column holding the label.
    #[arg(long, help_heading = "Pipeline")]
    pub label_column: Option<String>,

    /// ingest and train: seed of the train/test split and of training.
    #[arg(long, help_heading = "Pipeline")]
    pub seed: Option<u64>,

    /// ingest: share of the samples held out for testing.
    #[arg(long, help_heading = "Pipeline")]
    pub test_fraction: Option<f64>,

    /// ingest: samples per published batch.
    #[arg(long, help_heading = "Pipeline")]
    pub batch_size: Option<u32>,

    /// train: epochs.
    #[arg(long, help_heading = "Pipeline")]
    pub epochs: Option<u32>,

    /// train: learning rate.
    #[arg(long, help_heading = "Pipeline")]
    pub learning_rate: Option<f64>,

    /// train: the MLP's hidden layer widths, comma-separated (e.g. 1024,1024 with
    /// --dataset synthetic:60000:64:10 for a workload where compute matters).
    #[arg(long, help_heading = "Pipeline")]
    pub hidden: Option<String>,

    /// train: samples per global training batch (split across the train replicas).
    #[arg(long, help_heading = "Pipeline")]
    pub train_batch_size: Option<u32>,

    /// train: a round of the training group starts once this many replicas wait (at least 1;
    /// train's default: 1).
    #[arg(long, help_heading = "Pipeline", value_parser = clap::value_parser!(u32).range(1..))]
    pub min_replicas: Option<u32>,

    /// train: most replicas in a round, 0 for no limit (train's default: 0).
    #[arg(long, help_heading = "Pipeline")]
    pub max_replicas: Option<u32>,

    /// train and serve: the device to compute on.
    #[arg(long, help_heading = "Pipeline")]
    pub device: Option<String>,

    /// serve: most requests in one forward pass.
    #[arg(long, help_heading = "Pipeline")]
    pub max_batch_size: Option<u32>,

    /// serve: longest wait for a batch to fill, in milliseconds.
    #[arg(long, help_heading = "Pipeline")]
    pub max_batch_wait_ms: Option<u64>,

    /// serve: most samples waiting for a forward pass; more are refused (load shedding).
    #[arg(long, help_heading = "Pipeline")]
    pub max_queue: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn data_and_data_file_exclude_each_other() {
        let parsed = Cli::try_parse_from(["tandem", "invoke", "a", "m", "--data", "{}", "--data-file", "x"]);
        assert!(parsed.is_err());
    }

    #[test]
    fn global_flags_go_after_the_subcommand_too() {
        let cli = Cli::try_parse_from(["tandem", "ls", "--etcd", "http://a:1,http://b:2"]).unwrap();
        assert_eq!(cli.global.etcd, vec!["http://a:1", "http://b:2"]);
    }
}
