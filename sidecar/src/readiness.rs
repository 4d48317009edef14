//! What /readyz reports: registered in etcd, the app's health check passing, room to write in
//! the data dir, not shutting down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::disk::DiskSpace;

#[derive(Debug)]
pub struct Readiness {
    registered: AtomicBool,
    shutting_down: AtomicBool,
    /// `None` while healthy; the reason otherwise.
    app_problem: Mutex<Option<String>>,
    /// The data dir's free space, when the sidecar writes there.
    disk: Option<Arc<DiskSpace>>,
}

impl Readiness {
    /// `app_expected`: whether an app port is configured; without one the app check passes.
    pub fn new(app_expected: bool) -> Self {
        Readiness {
            registered: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            app_problem: Mutex::new(app_expected.then(|| "app health not probed yet".to_string())),
            disk: None,
        }
    }

    /// Reports not ready while `disk` refuses writes.
    pub fn with_disk(mut self, disk: Arc<DiskSpace>) -> Self {
        self.disk = Some(disk);
        self
    }

    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::SeqCst);
    }

    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn set_app_health(&self, problem: Option<String>) {
        *self.app_problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    /// Whether the app's last health probe passed (true for a sidecar without an app).
    pub fn app_is_healthy(&self) -> bool {
        self.app_problem.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// `Ok` when ready; otherwise every reason it is not.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.is_shutting_down() {
            reasons.push("shutting down".to_string());
        }
        if !self.registered.load(Ordering::SeqCst) {
            reasons.push("not registered in etcd".to_string());
        }
        if let Some(problem) = self.app_problem.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            reasons.push(format!("app unhealthy: {problem}"));
        }
        if let Some(problem) = self.disk.as_ref().and_then(|disk| disk.problem()) {
            reasons.push(problem);
        }
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_registered_and_app_healthy() {
        let r = Readiness::new(true);
        assert_eq!(r.check().unwrap_err().len(), 2);
        r.set_registered(true);
        r.set_app_health(None);
        assert!(r.check().is_ok());
        r.set_app_health(Some("app not listening".into()));
        assert!(r.check().unwrap_err()[0].contains("not listening"));
        r.set_app_health(None);
        r.set_shutting_down();
        assert!(r.check().is_err());
    }

    #[test]
    fn an_app_that_only_calls_out_needs_no_health_check() {
        let r = Readiness::new(false);
        r.set_registered(true);
        assert!(r.check().is_ok());
    }
}
