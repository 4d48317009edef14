//! A Docker Compose project of the repository's compose.yaml, for the container tests: a unique
//! project name, its own image tag and host port, and everything (containers, networks,
//! volumes, the images it built) removed when dropped, also when the test panics; the last
//! log lines of every service are printed first in that case.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Whether a Docker engine answers, and which compose command drives it.
pub enum DockerSupport {
    /// `docker compose` (v2 plugin) or `docker-compose` (v1): the program and its leading args.
    Ready(Vec<String>),
    Missing(String),
}

/// Finds the Docker engine and a compose command.
pub fn docker_support() -> DockerSupport {
    let ok = |program: &str, args: &[&str]| {
        std::process::Command::new(program).args(args).output().map(|o| o.status.success()).unwrap_or(false)
    };
    if !ok("docker", &["info", "--format", "{{.ServerVersion}}"]) {
        return DockerSupport::Missing("no Docker engine answers `docker info`".into());
    }
    if ok("docker", &["compose", "version"]) {
        DockerSupport::Ready(vec!["docker".into(), "compose".into()])
    } else if ok("docker-compose", &["version"]) {
        DockerSupport::Ready(vec!["docker-compose".into()])
    } else {
        DockerSupport::Missing("neither `docker compose` nor `docker-compose` is installed".into())
    }
}

/// The workspace root (where compose.yaml is).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

pub struct ComposeProject {
    pub name: String,
    pub image_tag: String,
    compose: Vec<String>,
    env: Vec<(String, String)>,
    images: Vec<String>,
    torn_down: bool,
}

impl ComposeProject {
    /// A project with a unique name; `env` are the compose variables (image tag, ports, ...).
    pub fn new(compose: Vec<String>, prefix: &str, env: Vec<(String, String)>) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let unique = format!("{}-{nanos:x}", std::process::id());
        let image_tag = format!("test-{unique}");
        let mut env = env;
        env.push(("TANDEM_IMAGE_TAG".into(), image_tag.clone()));
        ComposeProject {
            name: format!("{prefix}-{unique}"),
            image_tag,
            compose,
            env,
            images: Vec::new(),
            torn_down: false,
        }
    }

    /// Sets a compose variable for the commands from now on.
    pub fn add_env(&mut self, key: &str, value: &str) {
        self.env.push((key.into(), value.into()));
    }

    /// Builds the images with scripts/build-images.sh from the binaries already built.
    pub async fn build_images(&mut self, images: &[&str]) -> Output {
        let target_dir = crate::workspace_binary_path("tandemd")
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/ has a parent")
            .to_path_buf();
        let profile = crate::workspace_binary_path("tandemd")
            .parent()
            .and_then(|p| p.file_name())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "debug".into());
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(workspace_root().join("scripts/build-images.sh"))
            .args(["--no-build", "--profile", &profile, "--tag", &self.image_tag])
            .args(images)
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(workspace_root());
        for image in images {
            self.images.push(format!("tandem/{image}:{}", self.image_tag));
        }
        run_with_timeout(cmd, Duration::from_secs(300)).await
    }

    /// Runs a compose subcommand of this project; `timeout` bounds it.
    pub async fn compose(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = tokio::process::Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .args(["--project-name", &self.name, "--file", "compose.yaml"])
            .args(args)
            .current_dir(workspace_root())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        run_with_timeout(cmd, timeout).await
    }

    /// The container id of a service, running or stopped (empty when it has none).
    pub async fn container(&self, service: &str) -> String {
        let out = self.compose(&["ps", "-a", "-q", service], Duration::from_secs(60)).await;
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker inspect -f FORMAT` of a service's container.
    pub async fn inspect(&self, service: &str, format: &str) -> String {
        let id = self.container(service).await;
        if id.is_empty() {
            return String::new();
        }
        let out = docker(&["inspect", "-f", format, &id]).await;
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The health status Docker reports for a service (`healthy`, `starting`, `unhealthy`).
    pub async fn health(&self, service: &str) -> String {
        self.inspect(service, "{{if .State.Health}}{{.State.Health.Status}}{{end}}").await
    }

    /// `docker kill` of a service's container (SIGKILL: no graceful shutdown).
    pub async fn kill(&self, service: &str) {
        let id = self.container(service).await;
        assert!(!id.is_empty(), "{service} has no container to kill");
        let out = docker(&["kill", &id]).await;
        assert!(out.status.success(), "docker kill {service}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Waits until `condition` holds, checking every second; panics naming `what` after `timeout`.
    pub async fn wait_for<F, Fut>(&self, timeout: Duration, what: &str, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !condition().await {
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One service's whole log.
    pub async fn service_logs(&self, service: &str) -> String {
        let out = self.compose(&["logs", "--no-color", service], Duration::from_secs(60)).await;
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// The last lines of every service's log.
    pub async fn logs(&self, tail: usize) -> String {
        let out = self.compose(&["logs", "--no-color", "--tail", &tail.to_string()], Duration::from_secs(60)).await;
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// Named volumes of this project that still exist.
    pub async fn volumes(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.name);
        let out = docker(&["volume", "ls", "-q", "--filter", &label]).await;
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// `down --volumes` and removes the images this project built.
    pub async fn tear_down(&mut self) -> Output {
        self.torn_down = true;
        let out =
            self.compose(&["down", "--volumes", "--remove-orphans", "--timeout", "5"], Duration::from_secs(180)).await;
        for image in &self.images {
            docker(&["image", "rm", "--force", image]).await;
        }
        out
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        // Blocking on purpose: a test that panicked must not leave containers or volumes behind.
        let project = ComposeProject {
            name: self.name.clone(),
            image_tag: self.image_tag.clone(),
            compose: self.compose.clone(),
            env: self.env.clone(),
            images: std::mem::take(&mut self.images),
            torn_down: false,
        };
        let panicking = std::thread::panicking();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async move {
                let mut project = project;
                if panicking {
                    eprintln!(
                        "---- last log lines of compose project {} ----\n{}",
                        project.name,
                        project.logs(60).await
                    );
                }
                project.tear_down().await;
            })
        });
        let _ = cleanup.join();
    }
}

/// Runs `docker ARGS`.
pub async fn docker(args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("docker");
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(120)).await
}

async fn run_with_timeout(mut cmd: tokio::process::Command, timeout: Duration) -> Output {
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    let what = format!("{:?}", cmd.as_std());
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot run {what}: {e}"),
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}
