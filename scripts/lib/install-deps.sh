# shellcheck shell=bash
# Sourced by scripts/test.sh, scripts/demo.sh and scripts/up.sh (not run on its own).
#
# install_deps: installs what the build and the tests need from Debian 12's packages when it is
# missing, and checks what apt does not provide here:
#   - etcd     (package etcd-server): the tests and the demo start real etcd servers;
#   - protoc   (package protobuf-compiler): etcd-client's build script compiles etcd's protos;
#   - nats-server (package nats-server): the pubsub.jetstream tests start real NATS servers
#     (Debian puts it in /usr/sbin, which is not on every user's PATH);
#   - python3 with venv (python3-venv): scripts/validate-manifests.sh installs its Kubernetes
#              tools into a virtualenv;
#   - docker-compose, when a Docker engine is there but no compose command: the compose test
#              (tests/tests/compose.rs) drives compose.yaml with it;
#   - cargo    Rust 1.95 or newer (Debian's own rustc is too old): install it with rustup.
# apt runs through sudo unless we are root.

install_deps() {
    local missing=()
    command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
    command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 \
        && ! command -v docker-compose >/dev/null 2>&1; then
        missing+=(docker-compose)
    fi
    if ((${#missing[@]} > 0)); then
        local sudo=()
        if [ "$(id -u)" -ne 0 ]; then
            if ! command -v sudo >/dev/null 2>&1; then
                echo "error: ${missing[*]} must be installed, which needs root or sudo" >&2
                return 1
            fi
            sudo=(sudo)
        fi
        echo "==> installing ${missing[*]} (apt-get)"
        "${sudo[@]}" apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    fi

    # rustup's installer puts cargo here; a fresh non-login shell may not have it on PATH yet.
    if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo is not installed; install Rust 1.95 or newer with rustup (https://rustup.rs)" >&2
        return 1
    fi
    if ! command -v cc >/dev/null 2>&1; then
        echo "error: no C compiler/linker (cc) found; Rust needs one to link: apt-get install build-essential" >&2
        return 1
    fi
}
