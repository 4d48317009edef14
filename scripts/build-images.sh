#!/usr/bin/env bash
# Builds Tandem's container images from binaries compiled on this host, so that no base image
# is pulled from a registry: every image is `FROM scratch` plus a root filesystem assembled here
# (docker/build/, ignored by git):
#   base/  the shared libraries `ldd` lists for the binaries (glibc's loader, libc, libm,
#          libgcc_s), /etc/nsswitch.conf ("hosts: files dns": glibc >= 2.34 has its files and dns
#          name services built into libc.so.6, so compose service names resolve through Docker's
#          /etc/hosts and embedded DNS with nothing else), /etc/passwd with the user `tandem`
#          (uid 65532) and /tmp. Identical for every image, so Docker stores that layer once.
#   data/  an empty directory, copied to /var/lib/tandem owned by `tandem` (tandemd's data dir;
#          a named volume mounted there starts with that owner).
#   bin/   each binary, stripped.
# The same Dockerfiles (docker/*.Dockerfile) work unchanged online: they copy only from the
# build context.
#
# usage: scripts/build-images.sh [--profile debug|release] [--no-build] [--tag TAG] [IMAGE...]
#   IMAGE: tandemd ingest preprocess train serve tandem (the default: all six; tandem is the
#          command line, for compose's `certs` service), and etcd: an etcd
#          image from Debian's etcd-server binary (/usr/bin/etcd) for machines that cannot pull
#          the upstream one (the compose test uses it).
#   --profile   which cargo profile's binaries to use (default debug, the binaries CI already
#               builds; see README "Images" for the measured difference)
#   --no-build  use the binaries already in $CARGO_TARGET_DIR instead of running cargo build
#   --tag       image tag (default: $TANDEM_IMAGE_TAG or latest); images are named
#               ${TANDEM_IMAGE_PREFIX:-tandem}/NAME:TAG, as compose.yaml expects.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=${TANDEM_IMAGE_PROFILE:-debug}
tag=${TANDEM_IMAGE_TAG:-latest}
prefix=${TANDEM_IMAGE_PREFIX:-tandem}
build=1
images=()
while (($# > 0)); do
    case $1 in
        --profile) profile=${2:?--profile needs debug or release}; shift 2 ;;
        --no-build) build=0; shift ;;
        --tag) tag=${2:?--tag needs a value}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        tandemd|ingest|preprocess|train|serve|tandem|etcd) images+=("$1"); shift ;;
        *) echo "build-images: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
((${#images[@]} > 0)) || images=(tandemd ingest preprocess train serve tandem)
case $profile in
    debug) profile_dir=debug; profile_flag=() ;;
    release) profile_dir=release; profile_flag=(--release) ;;
    *) echo "build-images: --profile must be debug or release, not '$profile'" >&2; exit 2 ;;
esac
command -v docker >/dev/null || { echo "build-images: docker is not installed" >&2; exit 1; }

binary_of() { case $1 in tandemd|tandem|etcd) echo "$1" ;; *) echo "tandem-$1" ;; esac; }
package_of() { case $1 in tandemd) echo tandem-sidecar ;; tandem) echo tandem-cli ;; *) echo "tandem-$1" ;; esac; }

target_dir=${CARGO_TARGET_DIR:-target}
packages=()
for image in "${images[@]}"; do
    [ "$image" = etcd ] || packages+=(-p "$(package_of "$image")")
done
if ((build == 1 && ${#packages[@]} > 0)); then
    echo "==> cargo build ${profile_flag[*]} ${packages[*]}"
    cargo build --locked "${profile_flag[@]}" "${packages[@]}"
fi

stage=docker/build
rm -rf "$stage"
mkdir -p "$stage/base" "$stage/bin"

libs=()
for image in "${images[@]}"; do
    binary=$(binary_of "$image")
    if [ "$image" = etcd ]; then
        if ! source=$(command -v etcd); then
            echo "build-images: no etcd on PATH (apt-get install etcd-server)" >&2
            exit 1
        fi
    else
        source=$target_dir/$profile_dir/$binary
        [ -x "$source" ] || { echo "build-images: $source is missing (run without --no-build)" >&2; exit 1; }
    fi
    strip --strip-all -o "$stage/bin/$binary" "$source"
    # ldd lists `name => /path (addr)` for each library and `/path (addr)` for the loader.
    if ldd "$source" | grep -q 'not found'; then
        echo "build-images: $source needs a library this host lacks:" >&2; ldd "$source" >&2; exit 1
    fi
    while read -r lib; do libs+=("$lib"); done < <(ldd "$source" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
done
if ((${#libs[@]} > 0)); then
    for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
        # Copied to the path the loader looks for, as a real file (the host's may be a symlink).
        install -D -m 0755 "$(readlink -f "$lib")" "$stage/base$lib"
    done
fi
mkdir -p "$stage/base/etc" "$stage/base/tmp" "$stage/data"
chmod 1777 "$stage/base/tmp"
printf 'hosts: files dns\n' >"$stage/base/etc/nsswitch.conf"
printf 'root:x:0:0:root:/root:/sbin/nologin\ntandem:x:65532:65532:tandem:/var/lib/tandem:/sbin/nologin\n' >"$stage/base/etc/passwd"
printf 'root:x:0:\ntandem:x:65532:\n' >"$stage/base/etc/group"
# Fixed timestamps and modes, so the base layer is the same bytes on every build.
find "$stage" -exec touch -h -d '2000-01-01 00:00:00 UTC' {} +

for image in "${images[@]}"; do
    name=$prefix/$image:$tag
    echo "==> docker build $name"
    if ! log=$(docker build -t "$name" -f "docker/$image.Dockerfile" docker 2>&1); then
        echo "$log" >&2; echo "build-images: docker build $name failed" >&2; exit 1
    fi
    printf '    %-28s %s\n' "$name" "$(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.1f MB", $1/1e6}')"
done
