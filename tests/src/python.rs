//! Python for the Dapr-compatibility tests: a virtualenv with the packages of
//! `tests/python/requirements.txt` (the official Dapr SDK from PyPI), created once in the target
//! directory (`scripts/test.sh` creates it up front; a test that finds it missing creates it),
//! and the scripts of `tests/python/` run with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's `tests/python/` directory.
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// The target directory this test binary runs from (`target/` or `$CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    let profile_dir = crate::workspace_binary_path("tandemd").parent().expect("target/<profile>").to_path_buf();
    profile_dir.parent().expect("the target directory").to_path_buf()
}

/// The virtualenv's python, with the requirements installed; created on first use. Panics
/// with pip's output when it cannot be created (no network to PyPI, no `python3 -m venv`).
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| ensure_venv(&target_dir().join("py-venv"))).clone()
}

fn ensure_venv(venv: &Path) -> PathBuf {
    let python = venv.join("bin").join("python");
    let requirements = scripts_dir().join("requirements.txt");
    let stamp = venv.join("requirements.installed");
    let wanted = std::fs::read_to_string(&requirements).expect("tests/python/requirements.txt");
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|installed| installed == wanted) {
        return python;
    }
    // Built beside, then moved in place: tests of other binaries may look at the same time.
    let building = venv.with_extension(format!("building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    run(Command::new("python3").args(["-m", "venv"]).arg(&building), "python3 -m venv");
    run(
        Command::new(building.join("bin").join("python"))
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements),
        "pip install -r tests/python/requirements.txt",
    );
    std::fs::write(building.join("requirements.installed"), &wanted).expect("writing the stamp");
    let _ = std::fs::remove_dir_all(venv);
    // Only bin/python is run, which finds its packages relative to itself wherever it is.
    std::fs::rename(&building, venv).unwrap_or_else(|e| panic!("moving the virtualenv to {}: {e}", venv.display()));
    python
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
