//! What went wrong, as a message for people and an exit code for scripts.

use std::fmt;

/// The exit codes of `tandem` (also listed in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// 1: the request reached a sidecar or app and failed there, or `tandem up` failed.
    Failed,
    /// 2: bad arguments or input (also clap's code for a malformed command line).
    Usage,
    /// 3: etcd or a sidecar could not be reached, or the app has no live instance.
    Unreachable,
    /// 4: no such app-id, state key or subscription.
    NotFound,
    /// 130 after SIGINT (Ctrl-C), 143 after SIGTERM, 129 after SIGHUP: the shell's 128 + signal number.
    Interrupted(i32),
}

impl ExitKind {
    pub fn code(self) -> u8 {
        match self {
            ExitKind::Failed => 1,
            ExitKind::Usage => 2,
            ExitKind::Unreachable => 3,
            ExitKind::NotFound => 4,
            ExitKind::Interrupted(signal) => (128 + signal).clamp(0, 255) as u8,
        }
    }
}

/// An error of the CLI: the message says what was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub struct CliError {
    pub kind: ExitKind,
    pub message: String,
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl CliError {
    pub fn new(kind: ExitKind, message: impl Into<String>) -> Self {
        CliError { kind, message: message.into() }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::new(ExitKind::Failed, message)
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ExitKind::Usage, message)
    }

    pub fn unreachable(message: impl Into<String>) -> Self {
        Self::new(ExitKind::Unreachable, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ExitKind::NotFound, message)
    }

    /// A gRPC error from a sidecar (or, through it, from an app), with `what` saying which
    /// request it was. The code picks the exit code; the message is the sidecar's, which
    /// names what was wrong.
    pub fn from_status(what: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let kind = match status.code() {
            Code::NotFound => ExitKind::NotFound,
            Code::Unavailable => ExitKind::Unreachable,
            Code::InvalidArgument => ExitKind::Usage,
            _ => ExitKind::Failed,
        };
        let mut message = format!("{what}: {} ({:?})", status.message(), status.code());
        let message_text = status.message().to_ascii_lowercase();
        if status.code() == Code::Unavailable
            && (message_text.contains("connect") || message_text.contains("transport"))
        {
            message.push_str("; is a sidecar listening there? (--sidecar names another)");
        }
        CliError::new(kind, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_stable() {
        assert_eq!(ExitKind::Failed.code(), 1);
        assert_eq!(ExitKind::Usage.code(), 2);
        assert_eq!(ExitKind::Unreachable.code(), 3);
        assert_eq!(ExitKind::NotFound.code(), 4);
        assert_eq!(ExitKind::Interrupted(2).code(), 130);
        assert_eq!(ExitKind::Interrupted(15).code(), 143);
    }

    #[test]
    fn grpc_codes_map_to_exit_codes() {
        let e = CliError::from_status("invoking x", &tonic::Status::not_found("app-id 'x' is unknown"));
        assert_eq!(e.kind, ExitKind::NotFound);
        assert!(e.message.contains("app-id 'x' is unknown"), "{}", e.message);
        let e = CliError::from_status("invoking x", &tonic::Status::unavailable("no live instance"));
        assert_eq!(e.kind, ExitKind::Unreachable);
        let e = CliError::from_status("invoking x", &tonic::Status::internal("boom"));
        assert_eq!(e.kind, ExitKind::Failed);
    }
}
