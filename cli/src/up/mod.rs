//! `tandem up`: the whole pipeline on this machine, as child processes.
//!
//! 1. etcd (the local `etcd` binary), on 127.0.0.1:2379 when that is free, else a free port.
//! 2. For each service instance (ingest, preprocess ×2, train ×`--train-replicas`, serve
//!    ×`--serve-replicas`): its tandemd (every port 0, read back from its log), then the service
//!    with `--app-port` (a free port) and `--sidecar` (its tandemd's API). Data and a log per
//!    process under one run dir.
//! 3. Waits until every sidecar is ready, then polls each service's `status` (single instances
//!    through their sidecars, i.e. through the mesh; each replica of preprocess, train or serve directly
//!    on its app port, since the mesh picks a replica by itself and progress is per replica)
//!    and draws it as progress bars, until serve has the model.
//! 4. Prints the test accuracy, where serve listens and a ready-to-paste `predict` example
//!    (which it runs once itself), then serves until SIGINT or SIGTERM.
//!
//! While it runs, a train or serve replica whose service or tandemd dies is restarted (a new
//! pair: train joins the training group as a late joiner, serve loads the latest model) up to
//! `--max-restarts` times; any other process
//! that exits, or any exit during start-up, ends the run ([`supervise`]). Whatever ends the run
//! (a signal, such an exit, a timeout), every process is stopped, last started first, before
//! `tandem up` exits ([`process::Processes::stop_all`]).
//!
//! Modules: [`plan`] (what to start), [`instance`] (starting a tandemd and its service, the
//! roster of what runs), [`process`] (starting, watching and stopping children), [`supervise`]
//! (what a death leads to), [`progress`] (status answers to progress rows and bars),
//! [`signals`], [`sample`].

pub mod instance;
pub mod plan;
pub mod ports;
pub mod process;
pub mod progress;
pub mod sample;
pub mod signals;
pub mod supervise;

use std::collections::HashMap;
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_proto::common::InvokeRequest;
use tandem_proto::prost_types::Any;
use tandem_proto::runtime::app_callback_client::AppCallbackClient;
use tandem_sdk::{CallOptions, SidecarClient};
use tonic::transport::{Channel, Endpoint};

use crate::args::UpArgs;
use crate::error::{CliError, ExitKind};
use crate::http;
use crate::payload::JSON;
use instance::{Instance, Launcher, PendingInstance, Roster};
pub use instance::{SidecarAddresses, parse_listening_line};
use plan::Member;
use ports::PortReservation;
use process::Processes;
use progress::{InstanceStatus, ProgressView, Snapshot};
use signals::Signals;
use supervise::{RestartPolicy, Supervision};

/// etcd's usual client port: other `tandem` commands find an etcd there without --etcd.
const DEFAULT_ETCD_PORT: u16 = 2379;

/// etcd's `--max-request-bytes` (64 MiB): train's model registry entries live in etcd, and a
/// large MLP's is far above etcd's default of 1.5 MiB.
const ETCD_MAX_REQUEST_BYTES: &str = "67108864";

/// Runs `tandem up` until a signal (or, with --until-serving, until serve has the model).
pub async fn run(options: UpArgs) -> Result<(), CliError> {
    // First, so that a Ctrl-C during start-up also stops what was started.
    let mut signals = Signals::install()?;
    plan::check_options(&options)?;
    let etcd_binary = plan::etcd_binary()?;
    let bin_dir = plan::bin_dir(&options)?;
    let members = plan::members(&options);
    plan::check_binaries(&bin_dir, &members)?;
    let given_components = plan::given_components(&options)?;
    let run_dir = RunDir::create(options.run_dir.as_deref())?;
    eprintln!("tandem up: data and a log of every process under {}", run_dir.path.display());
    let components = match given_components.map_or_else(|| plan::write_pipeline_components(&run_dir.path), Ok) {
        Ok(dir) => dir,
        Err(error) => {
            run_dir.finish(false);
            return Err(error);
        }
    };

    let certs = match options.mtls.then(|| plan::issue_certificates(&run_dir.path, &members)).transpose() {
        Ok(certs) => certs,
        Err(error) => {
            run_dir.finish(false);
            return Err(error);
        }
    };

    let mut processes = Processes::new(run_dir.path.join("pids"));
    let roster = Roster::default();
    let policy = RestartPolicy { delay: options.restart_delay, max_restarts: options.max_restarts };
    let mut up = Up {
        options: &options,
        bin_dir,
        components,
        certs,
        run_dir: run_dir.path.clone(),
        processes: &mut processes,
        signals: &mut signals,
        supervision: Supervision::new(policy, roster.clone(), options.stop_timeout, options.start_timeout),
        roster,
    };
    // The error (which process failed, its log) is printed by main, after the stop report.
    let outcome = up.run(&etcd_binary, &members).await;
    let count = processes.list().len();
    eprintln!("stopping {count} processes, last started first");
    let report = processes.stop_all(options.stop_timeout, &mut signals).await;
    let mut stopped = format!("stopped {} of {count} processes", report.stopped);
    if !report.killed.is_empty() {
        stopped.push_str(&format!(
            "; killed after {:?} without exiting: {}",
            options.stop_timeout,
            report.killed.join(", ")
        ));
    }
    if !report.already_gone.is_empty() {
        stopped.push_str(&format!("; already ended: {}", report.already_gone.join(", ")));
    }
    eprintln!("{stopped}");
    let clean = matches!(&outcome, Ok(()) | Err(CliError { kind: ExitKind::Interrupted(_), .. }));
    run_dir.finish(clean);
    outcome
}

/// The run dir: given, or a temp dir that is removed after a clean stop.
struct RunDir {
    path: PathBuf,
    temporary: bool,
}

impl RunDir {
    fn create(given: Option<&Path>) -> Result<RunDir, CliError> {
        let Some(path) = given else {
            let dir = tempfile::Builder::new()
                .prefix("tandem-up-")
                .tempdir()
                .map_err(|e| CliError::failed(format!("cannot create a temp dir for the run: {e}")))?;
            return Ok(RunDir { path: dir.keep(), temporary: true });
        };
        let bad = |why: String| CliError::usage(format!("--run-dir {}: {why}", path.display()));
        std::fs::create_dir_all(path).map_err(|e| bad(e.to_string()))?;
        // A reused run dir would hand etcd and the sidecars the data of another run.
        if std::fs::read_dir(path).map_err(|e| bad(e.to_string()))?.next().is_some() {
            return Err(bad("not empty; give a new or empty directory".into()));
        }
        let path = path.canonicalize().map_err(|e| bad(e.to_string()))?;
        Ok(RunDir { path, temporary: false })
    }

    fn finish(self, clean: bool) {
        if self.temporary && clean {
            let _ = std::fs::remove_dir_all(&self.path);
        } else if !clean {
            eprintln!("the logs stay in {}", self.path.display());
        }
    }
}

struct Up<'a> {
    options: &'a UpArgs,
    bin_dir: PathBuf,
    components: PathBuf,
    /// With `--mtls`: where the root and the SVIDs are.
    certs: Option<PathBuf>,
    run_dir: PathBuf,
    processes: &'a mut Processes,
    signals: &'a mut Signals,
    /// What runs now; supervision replaces a restarted pair in it.
    roster: Roster,
    supervision: Supervision,
}

impl Up<'_> {
    async fn run(&mut self, etcd_binary: &Path, members: &[Member]) -> Result<(), CliError> {
        let etcd = self.start_etcd(etcd_binary).await?;
        eprintln!("  etcd          {etcd}");
        let launcher = Launcher {
            bin_dir: self.bin_dir.clone(),
            components: self.components.clone(),
            run_dir: self.run_dir.clone(),
            etcd: etcd.clone(),
            certs: self.certs.clone(),
        };
        for member in members {
            let instance = self.start_member(&launcher, member).await?;
            eprintln!(
                "  {:<13} app 127.0.0.1:{}, tandemd API {} admin {}",
                instance.member.name, instance.app_port, instance.sidecar.grpc, instance.sidecar.admin
            );
            self.roster.add(instance);
        }
        let started = self.roster.running();
        let start_timeout = self.options.start_timeout;
        self.guard("while waiting for the sidecars to be ready", wait_ready(&started, start_timeout)).await?;
        eprintln!("all {} sidecars ready; running the pipeline", started.len());

        let mut view = ProgressView::new();
        // From here on a train or serve replica that dies is restarted instead of ending the run.
        self.supervision.arm(launcher, view.console());
        let roster = self.roster.clone();
        let watching = watch_progress(&roster, &mut view, self.options.ready_timeout);
        let snapshot = self.guard("while the pipeline ran", watching).await;
        view.finish();
        let snapshot = snapshot?;

        let trying = try_model(&roster, self.options.dataset.as_deref());
        let example = self.guard("while trying the model", trying).await?;
        self.print_summary(&snapshot, &etcd, &example);
        if self.options.until_serving {
            return Ok(());
        }
        eprintln!("serving until Ctrl-C (or SIGTERM)");
        self.guard("while serving", std::future::pending::<Result<(), CliError>>()).await
    }

    /// Runs `work` while supervising the children and watching the signals: a child whose exit
    /// ends the run ([`Supervision::tend`]), or SIGINT or SIGTERM, ends the wait with an error
    /// that says so (`phase` says when it happened).
    async fn guard<T>(&mut self, phase: &str, work: impl Future<Output = Result<T, CliError>>) -> Result<T, CliError> {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                result = &mut work => return result,
                _ = tick.tick() => self.supervision.tend(self.processes, self.signals, phase).await?,
                signal = self.signals.next() => {
                    return Err(CliError::new(ExitKind::Interrupted(signal), format!("stopped by {}", signals::name(signal))));
                }
            }
        }
    }

    /// Starts etcd and waits until it reports healthy; returns its client URL.
    async fn start_etcd(&mut self, etcd_binary: &Path) -> Result<String, CliError> {
        // Reserved ports stay held until etcd is healthy, so nothing else takes them first.
        let (client_port, _client_reservation) = match self.options.etcd_port {
            Some(0) => reserve()?,
            Some(port) => (port, None),
            None if port_is_free(DEFAULT_ETCD_PORT) => (DEFAULT_ETCD_PORT, None),
            None => reserve()?,
        };
        let peer_reservation = PortReservation::new()?;
        let peer_port = peer_reservation.port();
        let dir = instance::dir_for(&self.run_dir, "etcd")?;
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let args: Vec<OsString> = [
            "--name",
            "tandem",
            "--data-dir",
            &dir.join("data").to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("tandem={peer}"),
            "--max-request-bytes",
            ETCD_MAX_REQUEST_BYTES,
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        self.processes.spawn("etcd", etcd_binary, &args, &[], &dir.join("etcd.log"))?;
        let address = SocketAddr::from(([127, 0, 0, 1], client_port));
        let log = dir.join("etcd.log");
        let timeout = self.options.start_timeout;
        let healthy = async move {
            let started = Instant::now();
            loop {
                if let Ok((200, body)) = http::get(address, "/health").await
                    && body.contains("true")
                {
                    return Ok(());
                }
                if started.elapsed() > timeout {
                    return Err(CliError::failed(format!(
                        "etcd did not report healthy within {timeout:?}; the last lines of its log ({}):\n{}",
                        log.display(),
                        process::log_tail(&log, 20)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        self.guard("while starting etcd", healthy).await?;
        Ok(client)
    }

    /// Starts one instance's tandemd, waits for its addresses, then starts the service.
    async fn start_member(&mut self, launcher: &Launcher, member: &Member) -> Result<Instance, CliError> {
        let pending = launcher.start_sidecar(self.processes, member, 0)?;
        let timeout = self.options.start_timeout;
        let what = format!("while starting {}", pending.sidecar_name);
        let sidecar = self.guard(&what, wait_for_addresses(&pending, timeout)).await?;
        launcher.start_service(self.processes, pending, sidecar)
    }

    fn print_summary(&self, snapshot: &Snapshot, etcd: &str, example: &Example) {
        let serve = self.roster.running_of(plan::SERVE).expect("serve runs");
        let (accuracy, model) = snapshot.trained().unwrap_or((f64::NAN, "?".into()));
        let tandem = tandem_command();
        let etcd_flag = if etcd == format!("http://127.0.0.1:{DEFAULT_ETCD_PORT}") {
            String::new()
        } else {
            format!(" --etcd {etcd}")
        };
        println!();
        println!("the pipeline is serving");
        println!("  test accuracy  {:.2}% (model {model})", accuracy * 100.0);
        println!(
            "  serve          app 127.0.0.1:{} (AppCallback gRPC); its tandemd's Dapr gRPC API {}",
            serve.app_port, serve.sidecar.grpc
        );
        println!("  etcd           {etcd}");
        println!("  logs           {}/*/*.log", self.run_dir.display());
        println!();
        let sample = if example.digits { "a handwritten 0 from the digits dataset" } else { "all-zero features" };
        println!("predict through the mesh ({sample}):");
        println!("  {tandem}{etcd_flag} invoke serve predict --data '{}'", example.request);
        println!("answer: {}", example.answer.trim());
        println!();
        println!("also: {tandem}{etcd_flag} ls    {tandem}{etcd_flag} state get ingest manifest/latest");
    }
}

/// Asks train for the model (for its feature count), then sends serve the example request,
/// both through ingest's sidecar (the mesh picks a live train replica): the answer proves the
/// whole path works.
async fn try_model(roster: &Roster, dataset: Option<&str>) -> Result<Example, CliError> {
    let ingest = roster.running_of(plan::INGEST).expect("ingest runs");
    let sidecar = SidecarClient::new(&ingest.sidecar.grpc.to_string()).expect("a bound address is valid");
    let options = || CallOptions::default().timeout(Duration::from_secs(30)).content_type(JSON);
    let model = sidecar
        .invoke_with(plan::TRAIN, "get_model", br#"{"version":null}"#.to_vec(), options())
        .await
        .map_err(|status| CliError::from_status("asking train for the model (get_model)", &status))?;
    let model: Value = serde_json::from_slice(&model.data)
        .map_err(|e| CliError::failed(format!("train's get_model answer is not JSON: {e}")))?;
    let feature_count = model
        .get("feature_count")
        .and_then(Value::as_u64)
        .ok_or_else(|| CliError::failed("train's get_model answer has no feature_count".to_string()))?
        as usize;
    let digits = dataset.is_none_or(|dataset| dataset == "digits");
    let request = sample::predict_request(digits, feature_count);
    let answer = sidecar
        .invoke_with(plan::SERVE, "predict", request.clone().into_bytes(), options())
        .await
        .map_err(|status| CliError::from_status("the example request to serve's predict", &status))?;
    Ok(Example { request, answer: String::from_utf8_lossy(&answer.data).into_owned(), digits })
}

/// The example request and serve's answer to it.
struct Example {
    request: String,
    answer: String,
    digits: bool,
}

/// Waits for the `tandemd listening` line in a starting sidecar's log.
async fn wait_for_addresses(pending: &PendingInstance, timeout: Duration) -> Result<SidecarAddresses, CliError> {
    loop {
        if let Some(addresses) = pending.addresses() {
            return Ok(addresses);
        }
        if pending.started_at.elapsed() > timeout {
            let log = &pending.sidecar_log;
            return Err(CliError::failed(format!(
                "{} did not report its addresses within {timeout:?}; the last lines of its log ({}):\n{}",
                pending.sidecar_name,
                log.display(),
                process::log_tail(log, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every sidecar's /readyz answers 200 (registered, routing loaded, app healthy).
async fn wait_ready(started: &[Instance], timeout: Duration) -> Result<(), CliError> {
    let begun = Instant::now();
    let mut waiting: Vec<&Instance> = started.iter().collect();
    loop {
        let mut still = Vec::new();
        let mut reasons = Vec::new();
        for instance in waiting {
            match http::get(instance.sidecar.admin, "/readyz").await {
                Ok((200, _)) => {}
                other => {
                    let reason = match other {
                        Ok((code, body)) => format!("/readyz {code}: {body}"),
                        Err(e) => format!("/readyz: {e}"),
                    };
                    reasons.push((instance, reason));
                    still.push(instance);
                }
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if begun.elapsed() > timeout {
            let details: Vec<String> = reasons
                .into_iter()
                .map(|(instance, reason)| {
                    format!(
                        "{} is not ready ({reason}); the last lines of {} ({}):\n{}\n  and of {} ({}):\n{}",
                        instance.sidecar_name,
                        instance.member.name,
                        instance.service_log.display(),
                        process::log_tail(&instance.service_log, 10),
                        instance.sidecar_name,
                        instance.sidecar_log.display(),
                        process::log_tail(&instance.sidecar_log, 10),
                    )
                })
                .collect();
            return Err(CliError::failed(format!("not ready within {timeout:?}:\n{}", details.join("\n"))));
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the CLI asks one instance for its `status`.
enum StatusSource {
    /// Through the instance's own sidecar, i.e. through the mesh (single-instance apps).
    Mesh(SidecarClient),
    /// Straight to the app's callback API (replicas, which the mesh cannot address one by one).
    Direct(AppCallbackClient<Channel>),
}

impl StatusSource {
    fn for_instance(instance: &Instance, replicas: usize) -> StatusSource {
        if replicas > 1 {
            let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{}", instance.app_port))
                .expect("a loopback URL is valid")
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true);
            StatusSource::Direct(AppCallbackClient::new(endpoint.connect_lazy()))
        } else {
            StatusSource::Mesh(
                SidecarClient::new(&instance.sidecar.grpc.to_string()).expect("a bound address is valid"),
            )
        }
    }

    async fn status(&mut self, app_id: &str) -> Option<Value> {
        let payload = b"{}".to_vec();
        let data = match self {
            StatusSource::Mesh(client) => {
                let options = CallOptions::default().timeout(Duration::from_secs(2)).content_type(JSON);
                client.invoke_with(app_id, "status", payload, options).await.ok()?.data
            }
            StatusSource::Direct(client) => {
                let mut request = tonic::Request::new(InvokeRequest {
                    method: "status".into(),
                    data: Some(Any { type_url: String::new(), value: payload }),
                    content_type: JSON.into(),
                    http_extension: None,
                });
                request.set_timeout(Duration::from_secs(2));
                client.on_invoke(request).await.ok()?.into_inner().data?.value
            }
        };
        serde_json::from_slice(&data).ok()
    }
}

/// Polls every running instance's status and draws it until serve has the model (and train
/// says how good it is); bounded by `ready_timeout` when given. A restarted pair gets a new
/// status connection, and what its predecessor answered is dropped.
async fn watch_progress(
    roster: &Roster,
    view: &mut ProgressView,
    ready_timeout: Option<Duration>,
) -> Result<Snapshot, CliError> {
    // Per instance name: the incarnation they belong to, the connection and the last answer.
    let mut sources: HashMap<String, (u32, StatusSource)> = HashMap::new();
    let mut answers: HashMap<String, (u32, Value)> = HashMap::new();
    let begun = Instant::now();
    loop {
        let slots = roster.slots();
        for slot in &slots {
            let Some(instance) = &slot.instance else { continue };
            let name = &slot.member.name;
            if sources.get(name).is_none_or(|(incarnation, _)| *incarnation != instance.incarnation) {
                let replicas = slots.iter().filter(|s| s.member.app_id == slot.member.app_id).count();
                sources.insert(name.clone(), (instance.incarnation, StatusSource::for_instance(instance, replicas)));
            }
            let (_, source) = sources.get_mut(name).expect("just made");
            // A missed answer keeps the last one on screen.
            if let Some(answer) = source.status(slot.member.app_id).await {
                answers.insert(name.clone(), (instance.incarnation, answer));
            }
        }
        // The roster as it is now: supervision may have changed it while the answers came.
        let snapshot = Snapshot {
            instances: roster
                .slots()
                .into_iter()
                .map(|slot| {
                    let incarnation = slot.instance.as_ref().map(|instance| instance.incarnation);
                    let status = answers
                        .get(&slot.member.name)
                        .filter(|(answered_by, _)| Some(*answered_by) == incarnation)
                        .map(|(_, answer)| answer.clone());
                    InstanceStatus {
                        restarts: slot.restarts,
                        down: slot.down,
                        ..InstanceStatus::new(slot.member.name, slot.member.app_id, status)
                    }
                })
                .collect(),
        };
        view.update(&snapshot.rows());
        if snapshot.serving_model().is_some() && snapshot.trained().is_some() {
            return Ok(snapshot);
        }
        if let Some(limit) = ready_timeout
            && begun.elapsed() > limit
        {
            let last: Vec<String> =
                snapshot.rows().into_iter().map(|(name, row)| format!("  {name}: {}", row.message)).collect();
            return Err(CliError::failed(format!(
                "serve has no model after {limit:?} (--ready-timeout); last progress:\n{}",
                last.join("\n")
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn reserve() -> Result<(u16, Option<PortReservation>), CliError> {
    let reservation = PortReservation::new()?;
    Ok((reservation.port(), Some(reservation)))
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// How to run this `tandem` again from here: `tandem` when that is what PATH finds, else its
/// path (relative to the current directory when inside it).
fn tandem_command() -> String {
    let Ok(exe) = std::env::current_exe() else { return "tandem".into() };
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("tandem").canonicalize().ok() == exe.canonicalize().ok())
        })
        .unwrap_or(false);
    if on_path {
        return "tandem".into();
    }
    let relative = std::env::current_dir().ok().and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf));
    relative.unwrap_or(exe).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_run_dir_must_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("new");
        assert!(RunDir::create(Some(&fresh)).is_ok());
        std::fs::write(fresh.join("x"), "").unwrap();
        let e = RunDir::create(Some(&fresh)).err().unwrap();
        assert!(e.message.contains("not empty"), "{}", e.message);
    }
}
