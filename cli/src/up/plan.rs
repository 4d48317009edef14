//! What `tandem up` starts: which service instances, from which binaries, with which flags and
//! component files.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_transport::SpiffeId;

use crate::args::UpArgs;
use crate::certs;
use crate::error::CliError;

/// The pipeline's app-ids, in start order (the order data flows).
pub const INGEST: &str = "ingest";
pub const PREPROCESS: &str = "preprocess";
pub const TRAIN: &str = "train";
pub const SERVE: &str = "serve";

/// The sidecar binary.
pub const TANDEMD: &str = "tandemd";

/// The command that installs etcd on Debian and Ubuntu.
pub const ETCD_INSTALL: &str = "sudo apt-get install -y etcd-server";

/// One service instance: a service process and the tandemd beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The instance's name: the app-id, with `-N` for replicas (`preprocess-2`, `train-1`).
    pub name: String,
    pub app_id: &'static str,
    /// The service binary's file name.
    pub binary: String,
    /// The service's own flags (besides --app-port and --sidecar).
    pub args: Vec<String>,
}

impl Member {
    /// Whether the pair is started again when its service or its tandemd dies: train replicas,
    /// which a training group absorbs when they die and takes back as late joiners, and serve
    /// replicas, whose callers' sidecars balance over the others meanwhile. Any other instance
    /// that dies stops the pipeline.
    pub fn restartable(&self) -> bool {
        self.app_id == TRAIN || self.app_id == SERVE
    }
}

/// Refuses option combinations that no service would accept, before anything starts.
pub fn check_options(options: &UpArgs) -> Result<(), CliError> {
    // A --min-replicas above --train-replicas is allowed: the group waits, and train says so.
    if let (Some(min), Some(max)) = (options.min_replicas, options.max_replicas)
        && max != 0
        && min > max
    {
        return Err(CliError::usage(format!(
            "--min-replicas {min} is above --max-replicas {max}: a training group could never start a round \
             (--max-replicas 0 means no limit)"
        )));
    }
    Ok(())
}

/// Every service instance, in start order.
pub fn members(options: &UpArgs) -> Vec<Member> {
    let member = |name: String, app_id: &'static str| Member {
        name,
        app_id,
        binary: format!("tandem-{app_id}"),
        args: service_args(app_id, options),
    };
    let replicas = |app_id: &'static str, count: u16| {
        (1..=count).map(move |replica| {
            let name = if count == 1 { app_id.to_string() } else { format!("{app_id}-{replica}") };
            member(name, app_id)
        })
    };
    let mut members = vec![member(INGEST.into(), INGEST)];
    members.extend(replicas(PREPROCESS, options.preprocess_replicas));
    members.extend(replicas(TRAIN, options.train_replicas));
    members.extend(replicas(SERVE, options.serve_replicas));
    members
}

/// The pass-through options that `app_id` takes, only those given (each service keeps its
/// own defaults).
pub fn service_args(app_id: &str, options: &UpArgs) -> Vec<String> {
    let mut args = Vec::new();
    let mut pass = |flag: &str, value: Option<String>| {
        if let Some(value) = value {
            args.push(flag.to_string());
            args.push(value);
        }
    };
    match app_id {
        INGEST => {
            pass("--dataset", options.dataset.clone());
            pass("--label-column", options.label_column.clone());
            pass("--seed", options.seed.map(|v| v.to_string()));
            pass("--test-fraction", options.test_fraction.map(|v| v.to_string()));
            pass("--batch-size", options.batch_size.map(|v| v.to_string()));
        }
        TRAIN => {
            pass("--epochs", options.epochs.map(|v| v.to_string()));
            pass("--seed", options.seed.map(|v| v.to_string()));
            pass("--learning-rate", options.learning_rate.map(|v| v.to_string()));
            pass("--hidden", options.hidden.clone());
            pass("--train-batch-size", options.train_batch_size.map(|v| v.to_string()));
            pass("--device", options.device.clone());
            pass("--min-replicas", options.min_replicas.map(|v| v.to_string()));
            pass("--max-replicas", options.max_replicas.map(|v| v.to_string()));
        }
        SERVE => {
            pass("--max-batch-size", options.max_batch_size.map(|v| v.to_string()));
            pass("--max-batch-wait-ms", options.max_batch_wait_ms.map(|v| v.to_string()));
            pass("--max-queue", options.max_queue.map(|v| v.to_string()));
            pass("--device", options.device.clone());
        }
        _ => {}
    }
    args
}

/// Where tandemd and the services are: --bin-dir, else next to this executable.
pub fn bin_dir(options: &UpArgs) -> Result<PathBuf, CliError> {
    if let Some(dir) = &options.bin_dir {
        return Ok(dir.clone());
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::failed(format!("cannot tell where this executable is ({e}); pass --bin-dir")))?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Refuses to start anything when a binary is missing, naming every missing one.
pub fn check_binaries(bin_dir: &Path, members: &[Member]) -> Result<(), CliError> {
    let mut names: Vec<&str> = vec![TANDEMD];
    for member in members {
        if !names.contains(&member.binary.as_str()) {
            names.push(&member.binary);
        }
    }
    let missing: Vec<&str> = names.into_iter().filter(|name| !is_executable(&bin_dir.join(name))).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(CliError::failed(format!(
        "missing in {}: {}. Build them with `cargo build --workspace` (scripts/up.sh does), or point \
         --bin-dir at the directory that holds them",
        bin_dir.display(),
        missing.join(", ")
    )))
}

/// The `etcd` executable on PATH, or an error that says how to install it.
pub fn etcd_binary() -> Result<PathBuf, CliError> {
    find_on_path("etcd").ok_or_else(|| {
        CliError::failed(format!(
            "etcd is not installed (no `etcd` on PATH). Install it with `{ETCD_INSTALL}` (Debian, Ubuntu), \
             or run scripts/up.sh, which installs what is missing"
        ))
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The pipeline's component files (the repository's `components/`), built into `tandem` so
/// that `tandem up` runs the same from any working directory: (app, file name, contents).
const PIPELINE_COMPONENTS: &[(&str, &str, &str)] = &[
    ("ingest", "pubsub.yaml", include_str!("../../../components/ingest/pubsub.yaml")),
    ("preprocess", "pubsub.yaml", include_str!("../../../components/preprocess/pubsub.yaml")),
    ("preprocess", "statestore.yaml", include_str!("../../../components/preprocess/statestore.yaml")),
    ("train", "pubsub.yaml", include_str!("../../../components/train/pubsub.yaml")),
    ("train", "statestore.yaml", include_str!("../../../components/train/statestore.yaml")),
    ("train", "batchstore.yaml", include_str!("../../../components/train/batchstore.yaml")),
    ("serve", "pubsub.yaml", include_str!("../../../components/serve/pubsub.yaml")),
];

/// The component root given with --components (which must exist), absolute; `None`: the
/// pipeline's own ([`write_pipeline_components`]).
pub fn given_components(options: &UpArgs) -> Result<Option<PathBuf>, CliError> {
    match &options.components {
        // Absolute, so the sidecars' messages name the files wherever they run.
        Some(dir) if dir.is_dir() => Ok(Some(dir.canonicalize().unwrap_or_else(|_| dir.clone()))),
        Some(dir) => Err(CliError::usage(format!("--components {}: not a directory", dir.display()))),
        None => Ok(None),
    }
}

/// Writes the pipeline's own components under `run_dir` and answers their root.
pub fn write_pipeline_components(run_dir: &Path) -> Result<PathBuf, CliError> {
    let root = run_dir.join("components");
    for (app, name, contents) in PIPELINE_COMPONENTS {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(root.join(app))?;
            std::fs::write(root.join(app).join(name), contents)
        };
        write().map_err(|e| CliError::failed(format!("cannot write the components under {}: {e}", root.display())))?;
    }
    Ok(root)
}

/// With `--mtls`: a root and an SVID for every app of `members`, valid for a year, under
/// `run_dir/certs`; answers that directory.
pub fn issue_certificates(run_dir: &Path, members: &[Member]) -> Result<PathBuf, CliError> {
    const VALID_FOR: Duration = Duration::from_secs(365 * 24 * 3600);
    let dir = run_dir.join("certs");
    certs::init(&dir, "tandem up root", VALID_FOR, false)?;
    let mut apps: Vec<&str> = members.iter().map(|member| member.app_id).collect();
    apps.sort_unstable();
    apps.dedup();
    for app_id in apps {
        let id = SpiffeId::new(TRUST_DOMAIN, NAMESPACE, app_id);
        certs::issue_files(&dir, &id, VALID_FOR, &dir)?;
    }
    Ok(dir)
}

/// The trust domain and namespace of `tandem up`'s sidecars (tandemd's defaults).
const TRUST_DOMAIN: &str = "public";
const NAMESPACE: &str = "default";

/// The `--resources-path` of `app_id`'s sidecars: `ROOT/APP/` when the app has its own
/// components, else ROOT when it holds component files itself, else none (tandemd's defaults).
pub fn resources_for(root: &Path, app_id: &str) -> Option<PathBuf> {
    let own = root.join(app_id);
    if own.is_dir() {
        return Some(own);
    }
    let has_files = std::fs::read_dir(root).ok()?.filter_map(Result::ok).any(|entry| {
        let path = entry.path();
        path.is_file() && matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
    });
    has_files.then(|| root.to_path_buf())
}

/// `--app-port P --sidecar http://ADDR` and the service's own flags.
pub fn service_command_line(member: &Member, app_port: u16, sidecar_api: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--app-port".into(),
        app_port.to_string().into(),
        "--sidecar".into(),
        format!("http://{sidecar_api}").into(),
    ];
    args.extend(member.args.iter().map(OsString::from));
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn options(args: &[&str]) -> UpArgs {
        let mut all = vec!["tandem", "up"];
        all.extend_from_slice(args);
        match crate::args::Cli::parse_from(all).command {
            crate::args::Command::Up(up) => *up,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_pipeline_has_two_preprocess_replicas_by_default() {
        let names: Vec<String> = members(&options(&[])).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["ingest", "preprocess-1", "preprocess-2", "train", "serve"]);
        let names: Vec<String> =
            members(&options(&["--preprocess-replicas", "1"])).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["ingest", "preprocess", "train", "serve"]);
    }

    fn try_options(args: &[&str]) -> Result<UpArgs, clap::Error> {
        let mut all = vec!["tandem", "up"];
        all.extend_from_slice(args);
        crate::args::Cli::try_parse_from(all).map(|cli| match cli.command {
            crate::args::Command::Up(up) => *up,
            _ => unreachable!(),
        })
    }

    #[test]
    fn train_replicas_are_named_like_preprocess_replicas() {
        let names: Vec<String> = members(&options(&["--train-replicas", "3"])).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["ingest", "preprocess-1", "preprocess-2", "train-1", "train-2", "train-3", "serve"]);
        let o = options(&["--train-replicas", "2", "--epochs", "4"]);
        let trains: Vec<Member> = members(&o).into_iter().filter(|m| m.app_id == TRAIN).collect();
        assert_eq!(trains.len(), 2);
        assert!(trains.iter().all(|m| m.binary == "tandem-train" && m.args == ["--epochs", "4"]), "{trains:?}");
        assert!(trains.iter().all(Member::restartable), "train replicas are restarted when they die");
        let others = members(&o).into_iter().filter(|m| m.app_id != TRAIN && m.app_id != SERVE);
        assert!(others.into_iter().all(|m| !m.restartable()), "ingest and preprocess stop the pipeline");
        assert_eq!(options(&[]).train_replicas, 1, "one train by default");
    }

    #[test]
    fn serve_replicas_are_named_and_restarted_like_train_replicas() {
        let names: Vec<String> = members(&options(&["--serve-replicas", "2"])).into_iter().map(|m| m.name).collect();
        assert_eq!(names.iter().filter(|n| n.starts_with("serve")).collect::<Vec<_>>(), ["serve-1", "serve-2"]);
        let serves: Vec<Member> = members(&options(&["--serve-replicas", "2", "--max-queue", "64"]))
            .into_iter()
            .filter(|m| m.app_id == SERVE)
            .collect();
        assert!(serves.iter().all(Member::restartable), "serve replicas are restarted when they die");
        assert!(serves.iter().all(|m| m.args == ["--max-queue", "64"]), "{serves:?}");
        let one: Vec<String> =
            members(&options(&[])).into_iter().filter(|m| m.app_id == SERVE).map(|m| m.name).collect();
        assert_eq!(one, ["serve"], "one serve by default");
        assert!(try_options(&["--serve-replicas", "0"]).is_err());
    }

    #[test]
    fn train_replicas_must_be_at_least_one() {
        let e = try_options(&["--train-replicas", "0"]).unwrap_err();
        assert_eq!(e.exit_code(), 2, "a usage error");
        assert!(e.to_string().contains("--train-replicas") && e.to_string().contains("1..=16"), "{e}");
        assert!(try_options(&["--train-replicas", "many"]).is_err());
        let e = try_options(&["--min-replicas", "0"]).unwrap_err();
        assert!(e.exit_code() == 2 && e.to_string().contains("--min-replicas"), "{e}");
    }

    #[test]
    fn group_sizes_go_to_every_train_replica_only_when_given() {
        let o = options(&["--train-replicas", "2", "--min-replicas", "2", "--max-replicas", "4"]);
        for train in members(&o).iter().filter(|m| m.app_id == TRAIN) {
            assert_eq!(train.args, ["--min-replicas", "2", "--max-replicas", "4"], "{}", train.name);
        }
        assert!(service_args(SERVE, &o).is_empty() && service_args(PREPROCESS, &o).is_empty());
        assert_eq!(service_args(TRAIN, &options(&["--max-replicas", "0"])), ["--max-replicas", "0"]);
        assert_eq!(
            service_args(TRAIN, &options(&["--hidden", "1024,1024", "--train-batch-size", "256"])),
            ["--hidden", "1024,1024", "--train-batch-size", "256"]
        );
        assert!(service_args(TRAIN, &options(&["--train-replicas", "3"])).is_empty(), "train keeps its defaults");
        assert!(check_options(&o).is_ok());
    }

    #[test]
    fn a_minimum_above_the_maximum_is_refused_naming_both() {
        let e = check_options(&options(&["--min-replicas", "3", "--max-replicas", "2"])).unwrap_err();
        assert_eq!(e.kind, crate::error::ExitKind::Usage);
        assert!(e.message.contains("--min-replicas 3") && e.message.contains("--max-replicas 2"), "{}", e.message);
        // 0 is no limit; a minimum above the replica count only makes the group wait.
        assert!(check_options(&options(&["--min-replicas", "3", "--max-replicas", "0"])).is_ok());
        assert!(check_options(&options(&["--min-replicas", "5", "--train-replicas", "2"])).is_ok());
        assert!(check_options(&options(&["--min-replicas", "2", "--max-replicas", "2"])).is_ok());
    }

    #[test]
    fn options_go_to_the_services_that_take_them_and_only_when_given() {
        let o = options(&["--seed", "7", "--epochs", "3", "--dataset", "x.csv", "--device", "cpu"]);
        assert_eq!(service_args(INGEST, &o), ["--dataset", "x.csv", "--seed", "7"]);
        assert_eq!(service_args(TRAIN, &o), ["--epochs", "3", "--seed", "7", "--device", "cpu"]);
        assert_eq!(service_args(SERVE, &o), ["--device", "cpu"]);
        assert!(service_args(PREPROCESS, &o).is_empty());
        assert!(service_args(INGEST, &options(&[])).is_empty());
    }

    #[test]
    fn missing_binaries_are_all_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_binaries(dir.path(), &members(&options(&[]))).unwrap_err();
        for name in ["tandemd", "tandem-ingest", "tandem-preprocess", "tandem-train", "tandem-serve"] {
            assert!(e.message.contains(name), "{}", e.message);
        }
        assert_eq!(e.message.matches("tandem-preprocess").count(), 1, "{}", e.message);
    }

    #[test]
    fn an_app_subdir_wins_over_the_shared_component_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resources_for(dir.path(), "train"), None, "an empty root gives none");
        std::fs::create_dir(dir.path().join("preprocess")).unwrap();
        std::fs::write(dir.path().join("pubsub.yaml"), "").unwrap();
        assert_eq!(resources_for(dir.path(), "preprocess"), Some(dir.path().join("preprocess")));
        assert_eq!(resources_for(dir.path(), "train"), Some(dir.path().to_path_buf()));
    }

    #[test]
    fn the_built_in_components_are_the_repositorys() {
        let run_dir = tempfile::tempdir().unwrap();
        let root = write_pipeline_components(run_dir.path()).unwrap();
        let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../components");
        let mut files = 0;
        for app in std::fs::read_dir(&repository).unwrap() {
            let app = app.unwrap().path();
            for file in std::fs::read_dir(&app).unwrap() {
                let file = file.unwrap().path();
                let written = root.join(app.file_name().unwrap()).join(file.file_name().unwrap());
                assert_eq!(
                    std::fs::read_to_string(&written).ok(),
                    Some(std::fs::read_to_string(&file).unwrap()),
                    "{} is not built into tandem",
                    file.display()
                );
                files += 1;
            }
        }
        assert_eq!(files, PIPELINE_COMPONENTS.len(), "tandem carries a file the repository no longer has");
        assert_eq!(resources_for(&root, "train"), Some(root.join("train")));
    }
}
