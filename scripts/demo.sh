#!/usr/bin/env bash
# Runs the quick-start demo (services/demo): a real etcd, two apps and a tandemd beside each,
# the apps calling each other through the mesh. Arguments go to tandem-demo (e.g. --rounds 3;
# see --help). Installs etcd and protoc first when they are missing (Debian 12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib/install-deps.sh
. scripts/lib/install-deps.sh
install_deps

# The debug profile, on purpose: it is the build scripts/test.sh makes too (one build serves
# both), and a clean debug build takes about 3 minutes here against about 7 for release. The
# demo makes a handful of calls; bench/ is where performance is measured.
#
# tandem-demo finds tandemd next to its own executable (target/debug/), and depending on the
# tandem-sidecar library does not build the tandemd binary, so build both first. `cargo run`
# then only starts tandem-demo from wherever the target dir is (CARGO_TARGET_DIR honoured),
# and on Unix it replaces itself with it, so Ctrl-C and the exit code reach the demo directly.
cargo build --locked -p tandem-sidecar -p tandem-demo
exec cargo run --locked --quiet -p tandem-demo -- "$@"
