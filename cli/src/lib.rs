//! tandem-cli: the `tandem` command line.
//!
//! - `tandem up` ([`up`]): runs the AI pipeline on this machine: etcd, then a `tandemd` and a
//!   service process for each of ingest, preprocess (2 replicas), train (`--train-replicas`, one
//!   training group) and serve, with progress bars fed by each service's `status` method, until
//!   Ctrl-C; restarts a train replica that dies; then stops everything in reverse order.
//! - `tandem invoke`, `tandem publish`, `tandem state get`, `tandem ls`, `tandem unsubscribe`
//!   ([`commands`]): talk to a running mesh through a sidecar's Dapr API and etcd.
//! - `tandem dataset synth` ([`commands`]): writes a seeded synthetic dataset to Parquet or CSV.
//! - `tandem certs init|issue|renew|check` ([`certs`]): a root and SPIFFE SVIDs for mTLS, for local use.
//!
//! Modules: [`args`] (the command line), [`error`] (errors and exit codes), [`registry`] (what
//! etcd says about apps and their sidecars), [`commands`] (everything but `up`), [`up`],
//! [`http`] (a tiny HTTP GET for admin endpoints), [`payload`] (`--data` parsing).
//!
//! How the CLI reaches a sidecar: every tandemd records the address of its app-facing API
//! (`api_address`) in its etcd instance record. `state get APP` goes to a sidecar of APP itself,
//! since an app's state lives in its own sidecar's stores; `invoke` prefers a sidecar of the
//! target app and `publish` takes any, unless `--sidecar` names one.

pub mod args;
pub mod certs;
pub mod commands;
pub mod error;
pub mod http;
pub mod payload;
pub mod registry;
pub mod up;

pub use error::{CliError, ExitKind};

/// Runs one parsed command line; the error carries the exit code.
pub async fn run(cli: args::Cli) -> Result<(), CliError> {
    use args::Command;
    match cli.command {
        Command::Up(options) => up::run(*options).await,
        Command::Invoke(call) => commands::invoke(&cli.global, call).await,
        Command::Publish(event) => commands::publish(&cli.global, event).await,
        Command::State(args::StateCommand::Get(get)) => commands::state_get(&cli.global, get).await,
        Command::Ls(ls) => commands::ls(&cli.global, ls).await,
        Command::Unsubscribe(remove) => commands::unsubscribe(&cli.global, remove).await,
        Command::Dataset(args::DatasetCommand::Synth(synth)) => commands::dataset_synth(synth).await,
        Command::Certs(args::CertsCommand::Init(init)) => commands::certs_init(init),
        Command::Certs(args::CertsCommand::Issue(issue)) => commands::certs_issue(&cli.global, issue),
        Command::Certs(args::CertsCommand::Renew(renew)) => commands::certs_renew(&cli.global, renew).await,
        Command::Certs(args::CertsCommand::Check(check)) => commands::certs_check(check),
    }
}
