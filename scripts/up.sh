#!/usr/bin/env bash
# Runs the AI pipeline on this machine: `tandem up` (cli/) starts etcd, then a tandemd and a
# service beside it for each of ingest, preprocess (2 replicas), train and serve, shows their
# progress, prints the test accuracy and where serve listens, and serves until Ctrl-C, when it
# stops everything. Arguments go to `tandem up` (e.g. --epochs 5 or --dataset my.csv; see
# `tandem up --help`). Installs etcd and protoc first when they are missing (Debian 12).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# shellcheck source=scripts/lib/install-deps.sh
. "$repo/scripts/lib/install-deps.sh"
install_deps

# Every binary of the workspace, in the debug profile: the build scripts/test.sh makes too, so
# one build serves both. `tandem` finds tandemd and the services next to itself (target/debug/).
# The build runs from here rather than from the repo root, so that relative paths among the
# arguments (--dataset my.csv) mean what they meant where this script was started.
cargo build --locked --workspace --bins --manifest-path "$repo/Cargo.toml"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"

# The pipeline's component files (one subdir per app where they differ).
if [ -z "${TANDEM_COMPONENTS:-}" ] && [ -d "$repo/components" ]; then
    export TANDEM_COMPONENTS="$repo/components"
fi
exec "$target_dir/debug/tandem" up "$@"
