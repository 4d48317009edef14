#!/usr/bin/env bash
# Runs every test of the workspace: unit tests and the integration tests, which start real
# etcd and tandemd processes. Installs etcd and protoc first when they are missing (Debian 12).
# Extra arguments go to `cargo test` (e.g. a test name filter). Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib/install-deps.sh
. scripts/lib/install-deps.sh
install_deps

# The integration tests run the tandemd binary from target/<profile>/, which `cargo test` does
# not necessarily (re)build: build every target of the workspace first.
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-fail-fast "$@"
