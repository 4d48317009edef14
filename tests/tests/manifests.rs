//! The Kubernetes manifests: every overlay renders with kustomize, every object is valid against
//! the Kubernetes API schema, and the Tandem checks pass (sidecars, probes, limits, ports that
//! match tandemd's real flags), all by `scripts/validate-manifests.sh`.

use std::process::Command;

#[test]
fn every_overlay_renders_validates_and_passes_the_tandem_checks() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let output = Command::new("bash")
        .arg(root.join("scripts/validate-manifests.sh"))
        .env("TANDEMD", tandem_tests::workspace_binary("tandemd"))
        .current_dir(root)
        .output()
        .expect("running scripts/validate-manifests.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(output.status.success(), "manifest validation failed:\n{stdout}\n{stderr}");
    for overlay in ["dev", "prod"] {
        assert!(stdout.contains(&format!("==> overlay {overlay}")), "overlay {overlay} was not validated:\n{stdout}");
    }
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("caught every break"), "the checker's self-test did not run:\n{stdout}");
}
