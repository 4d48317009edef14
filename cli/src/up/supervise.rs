//! What `tandem up` does when a process dies: [`Supervisor`] decides (a pure state machine,
//! unit-tested with made-up instants), [`Supervision`] carries it out on the processes.
//!
//! During start-up, and for every instance other than a train or serve replica, a process that
//! exits stops the whole pipeline (reported with its exit status and the last lines of its log).
//! Once every sidecar is ready ([`Supervision::arm`]), a train or serve replica whose service or
//! tandemd exits is reported the same way, the other process of its pair is stopped, and after
//! `--restart-delay` the pair starts again (a new tandemd and service on new ports, the same
//! component files: a train replica joins its training group as a late joiner, a serve replica
//! loads the latest model) while everything else keeps running; callers' sidecars meanwhile
//! send predictions to the other serve replicas. A replica that dies after `--max-restarts` restarts stops the pipeline.
//! A restart whose tandemd does not come up within `--start-timeout` counts as a death too.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::error::{CliError, ExitKind};
use crate::up::instance::{Launcher, PendingInstance, Roster, sidecar_name};
use crate::up::plan::Member;
use crate::up::process::{self, Processes};
use crate::up::progress::Console;
use crate::up::signals::{self, Signals};

/// When and how often a dead pair is started again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// The pause between the death and the new start.
    pub delay: Duration,
    /// Restarts of one member before a death stops the pipeline.
    pub max_restarts: u32,
}

/// A restartable member's pair, as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    Running,
    /// Down; starts again at `restart_at`.
    Down {
        restart_at: Instant,
    },
    /// Being started again (its tandemd is starting).
    Starting,
}

/// What to do about a process that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stop the pipeline: not a restartable member, or not yet armed (start-up).
    Stop,
    /// Stop the rest of the pair; start it again at `at`. `restart` counts from 1.
    Restart { restart: u32, at: Instant },
    /// The member was restarted `restarts` times already (`--max-restarts`): stop the pipeline.
    GiveUp { restarts: u32 },
    /// The pair is already down and waits for its restart (this was its other process).
    AlreadyDown,
}

#[derive(Debug, Clone, Copy)]
struct Replica {
    restarts: u32,
    state: PairState,
}

/// The restart decisions, per member.
#[derive(Debug)]
pub struct Supervisor {
    policy: RestartPolicy,
    armed: bool,
    replicas: BTreeMap<String, Replica>,
}

impl Supervisor {
    pub fn new(policy: RestartPolicy) -> Supervisor {
        Supervisor { policy, armed: false, replicas: BTreeMap::new() }
    }

    pub fn policy(&self) -> RestartPolicy {
        self.policy
    }

    /// From now on restartable members are restarted (before: start-up, every exit stops).
    pub fn arm(&mut self) {
        self.armed = true;
    }

    /// A process of `member`'s pair exited at `now`.
    pub fn exited(&mut self, member: &Member, now: Instant) -> Verdict {
        if !self.armed || !member.restartable() {
            return Verdict::Stop;
        }
        let replica =
            self.replicas.entry(member.name.clone()).or_insert(Replica { restarts: 0, state: PairState::Running });
        match replica.state {
            PairState::Down { .. } => Verdict::AlreadyDown,
            // Running, or a restart that did not come up: a death either way.
            PairState::Running | PairState::Starting => {
                if replica.restarts >= self.policy.max_restarts {
                    return Verdict::GiveUp { restarts: replica.restarts };
                }
                replica.restarts += 1;
                let at = now + self.policy.delay;
                replica.state = PairState::Down { restart_at: at };
                Verdict::Restart { restart: replica.restarts, at }
            }
        }
    }

    /// The members whose pause is over at `now`, in name order; they are `Starting` from now.
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for (name, replica) in &mut self.replicas {
            if let PairState::Down { restart_at } = replica.state
                && restart_at <= now
            {
                replica.state = PairState::Starting;
                due.push(name.clone());
            }
        }
        due
    }

    /// `member`'s restarted pair is up.
    pub fn running(&mut self, member: &str) {
        if let Some(replica) = self.replicas.get_mut(member) {
            replica.state = PairState::Running;
        }
    }

    pub fn restarts(&self, member: &str) -> u32 {
        self.replicas.get(member).map_or(0, |replica| replica.restarts)
    }

    pub fn state(&self, member: &str) -> PairState {
        self.replicas.get(member).map_or(PairState::Running, |replica| replica.state)
    }
}

/// Carries out the supervisor's decisions on the processes: reports a death, stops the rest of
/// the pair, starts it again when due, and keeps the roster (and so the progress rows) current.
pub struct Supervision {
    supervisor: Supervisor,
    roster: Roster,
    launcher: Option<Launcher>,
    console: Console,
    pending: Vec<PendingInstance>,
    stop_timeout: Duration,
    start_timeout: Duration,
}

impl Supervision {
    pub fn new(policy: RestartPolicy, roster: Roster, stop_timeout: Duration, start_timeout: Duration) -> Self {
        Supervision {
            supervisor: Supervisor::new(policy),
            roster,
            launcher: None,
            console: Console::default(),
            pending: Vec::new(),
            stop_timeout,
            start_timeout,
        }
    }

    /// Start-up is over: restartable members are restarted with `launcher` from now on, and
    /// what supervision reports goes through `console` (above the progress bars).
    pub fn arm(&mut self, launcher: Launcher, console: Console) {
        self.launcher = Some(launcher);
        self.console = console;
        self.supervisor.arm();
    }

    /// One round of supervision (`phase` says when, for messages): handles every exit since the
    /// last round, starts the pairs whose pause is over, and the services of restarted tandemds
    /// that are listening. An error stops the pipeline.
    pub async fn tend(
        &mut self,
        processes: &mut Processes,
        signals: &mut Signals,
        phase: &str,
    ) -> Result<(), CliError> {
        while let Some(exited) = processes.check_exits() {
            let member = self.roster.member_of_process(&exited.name);
            self.pending.retain(|pending| pending.sidecar_name != exited.name);
            self.on_death(processes, signals, phase, member.as_ref(), &exited.name, exited.report()).await?;
        }
        self.start_due(processes)?;
        self.finish_starts(processes, signals, phase).await
    }

    /// A process of `member`'s pair (`process`) died, as `report` says.
    async fn on_death(
        &mut self,
        processes: &mut Processes,
        signals: &mut Signals,
        phase: &str,
        member: Option<&Member>,
        process: &str,
        report: String,
    ) -> Result<(), CliError> {
        let Some(member) = member else { return Err(CliError::failed(format!("{phase}: {report}"))) };
        let policy = self.supervisor.policy();
        match self.supervisor.exited(member, Instant::now()) {
            Verdict::Stop => Err(CliError::failed(format!("{phase}: {report}"))),
            Verdict::GiveUp { restarts } => Err(CliError::failed(format!(
                "{phase}: {report}\n{} died after being restarted {} (--max-restarts {}); giving up",
                member.name,
                match restarts {
                    1 => "once".to_string(),
                    n => format!("{n} times"),
                },
                policy.max_restarts
            ))),
            Verdict::AlreadyDown => {
                processes.forget(process);
                Ok(())
            }
            Verdict::Restart { restart, .. } => {
                let partner = if process == member.name { sidecar_name(&member.name) } else { member.name.clone() };
                let stopping =
                    if processes.is_running(&partner) { format!("stopping {partner}, then ") } else { String::new() };
                self.console.line(&format!(
                    "{report}\n{} is down {phase}; {stopping}starting its tandemd and service again in {:?} \
                     (restart {restart} of {})",
                    member.name, policy.delay, policy.max_restarts
                ));
                let why = format!("down; restart {restart} of {} in {:?}", policy.max_restarts, policy.delay);
                self.roster.set_down(&member.name, restart, why);
                if let Some(stopped) = processes.stop(&partner, self.stop_timeout, signals).await {
                    if let Some(signal) = stopped.interrupted_by {
                        return Err(CliError::new(
                            ExitKind::Interrupted(signal),
                            format!("stopped by {}", signals::name(signal)),
                        ));
                    }
                    if stopped.killed {
                        self.console.line(&format!("{partner} did not exit within {:?}; killed", self.stop_timeout));
                    }
                }
                processes.forget(process);
                processes.forget(&partner);
                Ok(())
            }
        }
    }

    /// Starts the tandemd of every pair whose pause is over.
    fn start_due(&mut self, processes: &mut Processes) -> Result<(), CliError> {
        let due = self.supervisor.due(Instant::now());
        let Some(launcher) = &self.launcher else { return Ok(()) };
        for name in due {
            let Some(member) = self.roster.member_of_process(&name) else { continue };
            let restart = self.supervisor.restarts(&name);
            let pending = launcher.start_sidecar(processes, &member, restart)?;
            self.roster.set_down(&name, restart, format!("restarting (restart {restart}): tandemd starting"));
            self.pending.push(pending);
        }
        Ok(())
    }

    /// Starts the service beside every restarted tandemd that listens; a tandemd that does not
    /// within --start-timeout is stopped, which counts as a death of its pair.
    async fn finish_starts(
        &mut self,
        processes: &mut Processes,
        signals: &mut Signals,
        phase: &str,
    ) -> Result<(), CliError> {
        let Some(launcher) = self.launcher.clone() else { return Ok(()) };
        for pending in std::mem::take(&mut self.pending) {
            if let Some(sidecar) = pending.addresses() {
                let name = pending.member.name.clone();
                let instance = launcher.start_service(processes, pending, sidecar)?;
                self.supervisor.running(&name);
                self.console.line(&format!(
                    "{name} restarted (restart {} of {}): app 127.0.0.1:{}, tandemd API {} admin {}",
                    instance.incarnation,
                    self.supervisor.policy().max_restarts,
                    instance.app_port,
                    instance.sidecar.grpc,
                    instance.sidecar.admin
                ));
                self.roster.set_up(instance);
            } else if pending.started_at.elapsed() > self.start_timeout {
                let report = format!(
                    "{} did not report its addresses within {:?}; the last lines of its log ({}):\n{}",
                    pending.sidecar_name,
                    self.start_timeout,
                    pending.sidecar_log.display(),
                    process::log_tail(&pending.sidecar_log, 20)
                );
                let member = pending.member.clone();
                // It is the only process of its pair: its stop is the pair's stop.
                if let Some(stopped) = processes.stop(&pending.sidecar_name, self.stop_timeout, signals).await
                    && let Some(signal) = stopped.interrupted_by
                {
                    return Err(CliError::new(
                        ExitKind::Interrupted(signal),
                        format!("stopped by {}", signals::name(signal)),
                    ));
                }
                processes.forget(&pending.sidecar_name);
                self.on_death(processes, signals, phase, Some(&member), &pending.sidecar_name, report).await?;
            } else {
                self.pending.push(pending);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::plan::{PREPROCESS, SERVE, TRAIN};

    fn member(name: &str, app_id: &'static str) -> Member {
        Member { name: name.into(), app_id, binary: format!("tandem-{app_id}"), args: vec![] }
    }

    fn supervisor(max_restarts: u32) -> Supervisor {
        let mut supervisor = Supervisor::new(RestartPolicy { delay: Duration::from_secs(3), max_restarts });
        supervisor.arm();
        supervisor
    }

    #[test]
    fn a_train_replica_that_dies_is_restarted_after_the_delay() {
        let mut s = supervisor(5);
        let t0 = Instant::now();
        let train = member("train-1", TRAIN);
        let at = t0 + Duration::from_secs(3);
        assert_eq!(s.exited(&train, t0), Verdict::Restart { restart: 1, at });
        assert_eq!(s.state("train-1"), PairState::Down { restart_at: at });
        // The pair's other process, stopped or dying too, is no second death.
        assert_eq!(s.exited(&train, t0 + Duration::from_millis(10)), Verdict::AlreadyDown);
        assert_eq!(s.restarts("train-1"), 1);

        assert!(s.due(t0 + Duration::from_secs(2)).is_empty(), "not before the pause is over");
        assert_eq!(s.due(at), ["train-1"]);
        assert_eq!(s.state("train-1"), PairState::Starting);
        assert!(s.due(at + Duration::from_secs(1)).is_empty(), "started once");
        s.running("train-1");
        assert_eq!(s.state("train-1"), PairState::Running);
        assert_eq!(s.restarts("train-1"), 1);
    }

    #[test]
    fn after_max_restarts_the_next_death_gives_up() {
        let mut s = supervisor(2);
        let train = member("train-2", TRAIN);
        let mut now = Instant::now();
        for restart in 1..=2 {
            assert!(matches!(s.exited(&train, now), Verdict::Restart { restart: r, .. } if r == restart));
            now += Duration::from_secs(3);
            assert_eq!(s.due(now), ["train-2"]);
            s.running("train-2");
        }
        assert_eq!(s.exited(&train, now), Verdict::GiveUp { restarts: 2 });
        let mut never = supervisor(0);
        assert_eq!(never.exited(&train, now), Verdict::GiveUp { restarts: 0 }, "--max-restarts 0: no restart");
    }

    #[test]
    fn a_restart_that_does_not_come_up_counts_as_a_death() {
        let mut s = supervisor(5);
        let train = member("train", TRAIN);
        let t0 = Instant::now();
        s.exited(&train, t0);
        assert_eq!(s.due(t0 + Duration::from_secs(3)), ["train"]);
        // Its new tandemd exits while starting.
        let verdict = s.exited(&train, t0 + Duration::from_secs(4));
        assert_eq!(verdict, Verdict::Restart { restart: 2, at: t0 + Duration::from_secs(7) });
    }

    #[test]
    fn replicas_are_counted_apart() {
        let mut s = supervisor(1);
        let now = Instant::now();
        assert!(matches!(s.exited(&member("train-1", TRAIN), now), Verdict::Restart { restart: 1, .. }));
        assert!(matches!(s.exited(&member("train-2", TRAIN), now), Verdict::Restart { restart: 1, .. }));
        assert_eq!(s.due(now + Duration::from_secs(3)), ["train-1", "train-2"]);
        assert_eq!((s.restarts("train-1"), s.restarts("train-2"), s.restarts("train-3")), (1, 1, 0));
    }

    #[test]
    fn a_serve_replica_that_dies_is_restarted_like_a_train_replica() {
        let mut s = supervisor(1);
        let now = Instant::now();
        assert!(matches!(s.exited(&member("serve", SERVE), now), Verdict::Restart { restart: 1, .. }));
        assert_eq!(s.due(now + Duration::from_secs(3)), ["serve"]);
    }

    #[test]
    fn other_apps_and_any_death_during_start_up_stop_the_pipeline() {
        let mut s = supervisor(5);
        let now = Instant::now();
        for (name, app_id) in [("preprocess-1", PREPROCESS), ("ingest", crate::up::plan::INGEST)] {
            assert_eq!(s.exited(&member(name, app_id), now), Verdict::Stop, "{name}");
        }
        let mut starting = Supervisor::new(RestartPolicy { delay: Duration::ZERO, max_restarts: 5 });
        assert_eq!(starting.exited(&member("train-1", TRAIN), now), Verdict::Stop, "not armed yet");
        assert_eq!(starting.restarts("train-1"), 0);
    }
}
