//! The service instances of a run, each a tandemd and its service: [`Launcher`] starts a pair
//! (tandemd first, its bound ports read back from its log, then the service beside it), and the
//! [`Roster`] holds what runs now. Supervision changes the roster when a restarted pair replaces
//! one that died; the progress watcher, the example request and the summary read it.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use crate::certs;
use crate::error::CliError;
use crate::up::plan::{self, Member};
use crate::up::ports::PortReservation;
use crate::up::process::Processes;

/// What a tandemd bound, read from its `tandemd listening` log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SidecarAddresses {
    pub grpc: SocketAddr,
    pub internal: SocketAddr,
    pub admin: SocketAddr,
}

/// Parses tandemd's `tandemd listening ... grpc=A internal=B admin=C` line (text log format).
pub fn parse_listening_line(line: &str) -> Option<SidecarAddresses> {
    if !line.contains("tandemd listening") {
        return None;
    }
    let field = |name: &str| -> Option<SocketAddr> {
        let start = line.find(&format!(" {name}="))? + name.len() + 2;
        line[start..].split_whitespace().next()?.parse().ok()
    };
    Some(SidecarAddresses { grpc: field("grpc")?, internal: field("internal")?, admin: field("admin")? })
}

/// The process name of a member's tandemd (`tandemd:train-2`); the service's is the member's.
pub fn sidecar_name(member: &str) -> String {
    format!("tandemd:{member}")
}

/// A running pair: a service and the tandemd beside it.
#[derive(Debug, Clone)]
pub struct Instance {
    pub member: Member,
    pub app_port: u16,
    /// Keeps the app port from the kernel's port choice while this pair lives.
    pub app_port_reservation: Rc<PortReservation>,
    pub sidecar: SidecarAddresses,
    pub sidecar_name: String,
    pub sidecar_log: PathBuf,
    pub service_log: PathBuf,
    /// 0 for the first start, then the restart's number: what was learnt about an earlier
    /// incarnation (a status connection, its last answer) is stale.
    pub incarnation: u32,
}

/// A pair whose tandemd is started and whose service is not yet: it waits for the tandemd's
/// addresses.
#[derive(Debug)]
pub struct PendingInstance {
    pub member: Member,
    pub app_port: u16,
    /// Held from before the tandemd starts (it binds its own ports to 0) until the pair ends.
    app_port_reservation: PortReservation,
    pub sidecar_name: String,
    pub sidecar_log: PathBuf,
    pub service_log: PathBuf,
    pub incarnation: u32,
    pub started_at: Instant,
    /// Where this incarnation's part of the tandemd log begins (the log is appended to on a
    /// restart, and the earlier incarnation's addresses are in it too).
    log_offset: u64,
}

impl PendingInstance {
    /// The tandemd's addresses, once its `tandemd listening` line is in its log.
    pub fn addresses(&self) -> Option<SidecarAddresses> {
        let mut file = std::fs::File::open(&self.sidecar_log).ok()?;
        file.seek(SeekFrom::Start(self.log_offset)).ok()?;
        let mut raw = Vec::new();
        file.read_to_end(&mut raw).ok()?;
        String::from_utf8_lossy(&raw).lines().find_map(parse_listening_line)
    }
}

/// Starts a member's pair: its tandemd (every port 0, read back from its log) with the app's
/// component files and a data dir under the run dir, then the service with `--app-port` (a free
/// port, held back from the kernel's choice until the pair ends) and `--sidecar` (its tandemd's
/// API). A restarted pair gets new ports and the same component files, data dir and log files (appended to, after a line that says which restart).
#[derive(Debug, Clone)]
pub struct Launcher {
    pub bin_dir: PathBuf,
    pub components: PathBuf,
    pub run_dir: PathBuf,
    /// etcd's client URL.
    pub etcd: String,
    /// With `--mtls`: the directory of the root (`ca.crt`) and each app's SVID (`APP.crt`, `APP.key`).
    pub certs: Option<PathBuf>,
}

impl Launcher {
    /// Starts the member's tandemd (`incarnation` 0: the first start, N: restart N).
    pub fn start_sidecar(
        &self,
        processes: &mut Processes,
        member: &Member,
        incarnation: u32,
    ) -> Result<PendingInstance, CliError> {
        let dir = self.dir_for(&member.name)?;
        let app_port_reservation = PortReservation::new()?;
        let app_port = app_port_reservation.port();
        let sidecar_name = sidecar_name(&member.name);
        let sidecar_log = dir.join("tandemd.log");
        let service_log = dir.join(format!("{}.log", member.binary));
        let mut args: Vec<OsString> = [
            "--app-id",
            member.app_id,
            "--app-port",
            &app_port.to_string(),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--app-protocol",
            "grpc",
            "--internal-port",
            "0",
            "--admin-port",
            "0",
            "--etcd-endpoints",
            &self.etcd,
            "--app-health-probe-interval",
            "500ms",
            "--drain-timeout",
            "5s",
            "--log-format",
            "text",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.push("--data-dir".into());
        args.push(dir.join("data").into());
        if let Some(resources) = plan::resources_for(&self.components, member.app_id) {
            args.push("--resources-path".into());
            args.push(resources.into());
        }
        if let Some(certs) = &self.certs {
            args.push("--enable-mtls".into());
            for (flag, file) in [
                ("--cert-file", format!("{}.crt", member.app_id)),
                ("--key-file", format!("{}.key", member.app_id)),
                ("--trust-anchors-file", certs::ROOT_CERT.to_string()),
            ] {
                args.push(flag.into());
                args.push(certs.join(file).into());
            }
        }
        if incarnation > 0 {
            mark_restart(&sidecar_log, &member.name, incarnation)?;
        }
        let log_offset = std::fs::metadata(&sidecar_log).map(|m| m.len()).unwrap_or(0);
        let tandemd = self.bin_dir.join(plan::TANDEMD);
        processes.spawn(&sidecar_name, &tandemd, &args, &[], &sidecar_log)?;
        Ok(PendingInstance {
            member: member.clone(),
            app_port,
            app_port_reservation,
            sidecar_name,
            sidecar_log,
            service_log,
            incarnation,
            started_at: Instant::now(),
            log_offset,
        })
    }

    /// Starts the service beside its tandemd, which listens at `sidecar`.
    pub fn start_service(
        &self,
        processes: &mut Processes,
        pending: PendingInstance,
        sidecar: SidecarAddresses,
    ) -> Result<Instance, CliError> {
        let member = pending.member;
        if pending.incarnation > 0 {
            mark_restart(&pending.service_log, &member.name, pending.incarnation)?;
        }
        let args = plan::service_command_line(&member, pending.app_port, &sidecar.grpc.to_string());
        processes.spawn(&member.name, &self.bin_dir.join(&member.binary), &args, &[], &pending.service_log)?;
        Ok(Instance {
            member,
            app_port: pending.app_port,
            app_port_reservation: Rc::new(pending.app_port_reservation),
            sidecar,
            sidecar_name: pending.sidecar_name,
            sidecar_log: pending.sidecar_log,
            service_log: pending.service_log,
            incarnation: pending.incarnation,
        })
    }

    /// RUN/NAME/, created when missing.
    pub fn dir_for(&self, name: &str) -> Result<PathBuf, CliError> {
        dir_for(&self.run_dir, name)
    }
}

/// RUN/NAME/, created when missing.
pub fn dir_for(run_dir: &Path, name: &str) -> Result<PathBuf, CliError> {
    let dir = run_dir.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| CliError::failed(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// A line in a log that a restarted process appends to, so a reader sees where it starts.
fn mark_restart(log: &Path, member: &str, restart: u32) -> Result<(), CliError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut file| writeln!(file, "--- tandem up: restart {restart} of {member} ---"))
        .map_err(|e| CliError::failed(format!("cannot write to {}: {e}", log.display())))
}

/// One member of the run in the roster.
#[derive(Debug, Clone)]
pub struct Slot {
    pub member: Member,
    /// The running pair; `None` while a restart is pending.
    pub instance: Option<Instance>,
    /// How often the pair was restarted.
    pub restarts: u32,
    /// While the pair is down: what it waits for (shown as its progress row).
    pub down: Option<String>,
}

/// Every member of the run in start order, with its running pair. Shared on `tandem up`'s one
/// thread: no borrow is held across an await, so readers get copies.
#[derive(Debug, Clone, Default)]
pub struct Roster(Rc<RefCell<Vec<Slot>>>);

impl Roster {
    /// Adds a member's first pair, at the end.
    pub fn add(&self, instance: Instance) {
        let member = instance.member.clone();
        self.0.borrow_mut().push(Slot { member, instance: Some(instance), restarts: 0, down: None });
    }

    pub fn slots(&self) -> Vec<Slot> {
        self.0.borrow().clone()
    }

    /// Every running pair, in start order.
    pub fn running(&self) -> Vec<Instance> {
        self.0.borrow().iter().filter_map(|slot| slot.instance.clone()).collect()
    }

    /// The first running pair of `app_id`.
    pub fn running_of(&self, app_id: &str) -> Option<Instance> {
        self.0.borrow().iter().filter(|slot| slot.member.app_id == app_id).find_map(|slot| slot.instance.clone())
    }

    /// The member whose service or tandemd has the process name `process`.
    pub fn member_of_process(&self, process: &str) -> Option<Member> {
        let member = process.strip_prefix("tandemd:").unwrap_or(process);
        self.0.borrow().iter().find(|slot| slot.member.name == member).map(|slot| slot.member.clone())
    }

    /// The member's pair is down: `restarts` so far, `why` shown until it runs again.
    pub fn set_down(&self, member: &str, restarts: u32, why: String) {
        if let Some(slot) = self.0.borrow_mut().iter_mut().find(|slot| slot.member.name == member) {
            slot.instance = None;
            slot.restarts = restarts;
            slot.down = Some(why);
        }
    }

    /// The member's pair runs again, as `instance`.
    pub fn set_up(&self, instance: Instance) {
        if let Some(slot) = self.0.borrow_mut().iter_mut().find(|slot| slot.member.name == instance.member.name) {
            slot.down = None;
            slot.instance = Some(instance);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_addresses() {
        let line = "2026-01-01T00:00:00.000Z  INFO tandem_sidecar::runtime: tandemd listening app_id=a \
                    instance_id=x grpc=127.0.0.1:1 internal=127.0.0.1:2 admin=127.0.0.1:3";
        let a = parse_listening_line(line).unwrap();
        assert_eq!((a.grpc.port(), a.internal.port(), a.admin.port()), (1, 2, 3));
        assert!(parse_listening_line("registered in etcd grpc=127.0.0.1:1").is_none());
        assert!(parse_listening_line("tandemd listening grpc=127.0.0.1:1").is_none(), "all three are needed");
    }

    #[test]
    fn a_restarted_sidecars_addresses_come_from_its_own_part_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tandemd.log");
        let line = |port: u16| {
            format!("tandemd listening grpc=127.0.0.1:{port} internal=127.0.0.1:{port} admin=127.0.0.1:{port}\n")
        };
        std::fs::write(&log, line(1)).unwrap();
        mark_restart(&log, "train-1", 1).unwrap();
        let member =
            Member { name: "train-1".into(), app_id: plan::TRAIN, binary: "tandem-train".into(), args: vec![] };
        let app_port_reservation = PortReservation::new().unwrap();
        let pending = PendingInstance {
            member,
            app_port: app_port_reservation.port(),
            app_port_reservation,
            sidecar_name: sidecar_name("train-1"),
            sidecar_log: log.clone(),
            service_log: dir.path().join("tandem-train.log"),
            incarnation: 1,
            started_at: Instant::now(),
            log_offset: std::fs::metadata(&log).unwrap().len(),
        };
        assert_eq!(pending.addresses(), None, "the earlier incarnation's line does not count");
        std::fs::OpenOptions::new().append(true).open(&log).unwrap().write_all(line(2).as_bytes()).unwrap();
        assert_eq!(pending.addresses().map(|a| a.grpc.port()), Some(2));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("--- tandem up: restart 1 of train-1 ---"), "{text}");
    }

    #[test]
    fn the_roster_finds_a_member_by_either_process_and_tracks_a_restart() {
        let member = |name: &str, app_id: &'static str| Member {
            name: name.into(),
            app_id,
            binary: format!("tandem-{app_id}"),
            args: vec![],
        };
        let address: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let instance = |member: Member, incarnation: u32| Instance {
            sidecar_name: sidecar_name(&member.name),
            member,
            app_port: 1,
            app_port_reservation: Rc::new(PortReservation::new().unwrap()),
            sidecar: SidecarAddresses { grpc: address, internal: address, admin: address },
            sidecar_log: PathBuf::new(),
            service_log: PathBuf::new(),
            incarnation,
        };
        let roster = Roster::default();
        roster.add(instance(member("train-1", plan::TRAIN), 0));
        roster.add(instance(member("train-2", plan::TRAIN), 0));
        assert_eq!(roster.member_of_process("tandemd:train-2").map(|m| m.name).as_deref(), Some("train-2"));
        assert_eq!(roster.member_of_process("train-1").map(|m| m.name).as_deref(), Some("train-1"));
        assert!(roster.member_of_process("etcd").is_none());

        roster.set_down("train-1", 1, "restart 1 of 5 in 3s".into());
        assert_eq!(roster.running().len(), 1);
        assert_eq!(roster.running_of(plan::TRAIN).map(|i| i.member.name).as_deref(), Some("train-2"));
        roster.set_up(instance(member("train-1", plan::TRAIN), 1));
        let slots = roster.slots();
        assert_eq!((slots[0].restarts, slots[0].down.as_deref()), (1, None));
        assert_eq!(slots[0].instance.as_ref().map(|i| i.incarnation), Some(1));
    }
}
