//! The Kubernetes manifests: every overlay renders with kustomize, every object is valid against
//! the Kubernetes API schema, and the Tandem checks pass (sidecars, probes, limits, ports that
//! match tandemd's real flags; in prod, mTLS with SVIDs from csi-driver-spiffe), all by
//! `scripts/validate-manifests.sh`.

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
    // The self-test ran for each overlay, and on prod (mTLS on) the SVID cases ran too.
    let caught: Vec<usize> = stdout
        .lines()
        .filter_map(|line| line.split("the self-test caught all ").nth(1))
        .map(|rest| rest.split(' ').next().and_then(|n| n.parse().ok()).expect("a count of breaks"))
        .collect();
    assert_eq!(caught.len(), 2, "the checker's self-test did not run for both overlays:\n{stdout}");
    assert!(
        caught[1] > caught[0],
        "prod's mTLS breaks were not tried (dev {}, prod {}):\n{stdout}",
        caught[0],
        caught[1]
    );
}
