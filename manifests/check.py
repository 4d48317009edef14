#!/usr/bin/env python3
"""Tandem-specific checks of rendered Kubernetes manifests (run by scripts/validate-manifests.sh
after `kubectl kustomize` and the API-schema validation).

usage: check.py RENDERED.yaml --tandemd-help FILE --components DIR [--self-test]

What the API schema cannot know, checked for every workload with a Tandem sidecar:
- tandemd runs as a native sidecar: an init container with restartPolicy Always;
- every tandemd flag in its args, and every TANDEM_*/DAPR_* variable in its env or its
  ConfigMap, is one tandemd really has (read from `tandemd --help`);
- --app-id is the workload's app; --grpc-port, --internal-port and --admin-port match the
  container's named ports; the app's --app-port is the sidecar's --app-port and its --sidecar
  URL points at the sidecar's gRPC port on loopback; listening on 0.0.0.0 comes with
  --advertise-address;
- startup and liveness probes ask /healthz and the readiness probe /readyz, on the admin port;
- every container has CPU and memory requests and limits;
- --resources-path is a mounted ConfigMap whose files equal components/<app>/, and --data-dir
  is a mounted volume (a PVC for StatefulSets);
- a workload with more than one replica keeps its state (`statestore`) in a store its
  replicas share (state.etcd), not in each sidecar's own (state.sled); another store may be
  private to each replica only in a StatefulSet, whose claims outlive a pod (train's batches);
- where tandemd has mTLS on (TANDEM_ENABLE_MTLS in its env or ConfigMap, or --enable-mtls): its
  certificate, key and trust anchors files are set, each under a volume mounted in the tandemd
  container (not a subPath, which never sees a renewed file); where that volume is
  csi-driver-spiffe's (spiffe.csi.cert-manager.io): it is readOnly, its fs-group (if set) is the
  pod's fsGroup or runAsGroup, TANDEM_NAMESPACE is the pod's namespace, the trust domain is set,
  and the pod's serviceAccountName is the app-id (the SVID's .../sa/NAME is the caller's app-id),
  a ServiceAccount of that name is in the manifests and a RoleBinding gives it a Role allowing
  create on certificaterequests (cert-manager.io), which the driver needs to request the SVID;
and for the whole: the four apps are there (train a StatefulSet, serve and preprocess
Deployments), train's group minimum (TANDEM_MIN_REPLICAS / --min-replicas, at least 1) is
within its replicas and its maximum, serve has an HPA (whose serve metrics, if any, serve exports on its declared metrics port) and a PDB, the internal port is open only
to sidecar pods behind a default deny, and etcd's members match its replicas and the sidecars'
endpoints, and mTLS is on for all the sidecar workloads or for none, with one trust domain.
--self-test breaks a copy of the manifests in ways the checks must catch (fourteen, and seven more
about the SVID, its mount and its RBAC where the manifests have mTLS on: twenty-one) and fails if
any goes unnoticed.
"""

import argparse
import copy
import os
import re
import sys
from urllib.parse import urlparse

import yaml

APPS = {"ingest": None, "preprocess": "Deployment", "train": "StatefulSet", "serve": "Deployment"}
# Gauges on serve's /metrics that an autoscaler may scale on (services/serve/src/metrics.rs).
SERVE_SCALING_METRICS = {"tandem_serve_queue_depth_samples", "tandem_serve_requests_in_flight"}
SIDECAR_LABEL = "tandem.dev/sidecar"
TANDEMD_PORT_FLAGS = {"grpc": "--grpc-port", "internal": "--internal-port", "admin": "--admin-port"}
TANDEMD_DEFAULT_PORTS = {"--grpc-port": 50001, "--internal-port": 50002, "--admin-port": 9090}
# tandemd's mTLS files: (flag, environment variable).
MTLS_FILES = (("--cert-file", "TANDEM_CERT_FILE"), ("--key-file", "TANDEM_KEY_FILE"),
              ("--trust-anchors-file", "TANDEM_TRUST_ANCHORS_FILE"))
SPIFFE_CSI_DRIVER = "spiffe.csi.cert-manager.io"
# Values clap reads as false for a boolean flag's environment variable.
FALSEY = {"", "0", "n", "no", "f", "false", "off"}


def tandemd_interface(help_text):
    """Flags and env vars of tandemd, from its --help."""
    flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", help_text))
    envs = set(re.findall(r"\[env: ([A-Z0-9_]+)=", help_text))
    if "--app-id" not in flags or "TANDEM_APP_ID" not in envs:
        raise SystemExit("check.py: the tandemd --help text does not list --app-id [env: TANDEM_APP_ID]")
    return flags, envs


def parse_args(args):
    """`--flag=value` / `--flag value` list -> dict."""
    out, i = {}, 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        elif arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is not None and not str(nxt).startswith("--"):
                out[arg] = str(nxt)
                i += 1
            else:
                out[arg] = True
        i += 1
    return out


def check(docs, flags, envs, components_dir):
    errors = []
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    configmaps = by_kind.get("ConfigMap", {})

    def configmap(name):
        # Generated ConfigMaps carry a content hash suffix; references are rewritten to it.
        return configmaps.get(name)

    workloads = []
    for kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        workloads += list(by_kind.get(kind, {}).values())
    sidecar_workloads = {}
    for w in workloads:
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        if labels.get(SIDECAR_LABEL) == "true":
            sidecar_workloads[w["metadata"]["name"]] = w

    mtls = {}  # sidecar workload -> (mTLS on, trust domain or None when unknown)
    for app, kind in APPS.items():
        w = sidecar_workloads.get(app)
        if w is None:
            errors.append(f"{app}: no workload with a Tandem sidecar (label {SIDECAR_LABEL}=true)")
        elif kind and w["kind"] != kind:
            errors.append(f"{app}: is a {w['kind']}, should be a {kind}")

    for name, w in sidecar_workloads.items():
        where = f"{w['kind']}/{name}"
        pod = w["spec"]["template"]["spec"]
        sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "tandemd"]
        if len(sidecars) != 1:
            errors.append(f"{where}: needs exactly one init container 'tandemd' (the native sidecar)")
            continue
        sc = sidecars[0]
        if sc.get("restartPolicy") != "Always":
            errors.append(f"{where}: tandemd init container needs restartPolicy: Always (a native sidecar)")
        if "tandemd" not in sc.get("image", ""):
            errors.append(f"{where}: tandemd container runs image {sc.get('image')!r}")
        sargs = parse_args(sc.get("args", []))
        for flag in sargs:
            if flag not in flags:
                errors.append(f"{where}: tandemd has no flag {flag}")
        env_names = [e["name"] for e in sc.get("env", [])]
        for ref in sc.get("envFrom", []):
            cm_name = ref.get("configMapRef", {}).get("name")
            cm = configmap(cm_name)
            if cm is None:
                errors.append(f"{where}: tandemd envFrom ConfigMap {cm_name!r} is not in the manifests")
            else:
                env_names += list(cm.get("data", {}))
        tenv = tandemd_env(sc, configmap)
        for env in env_names:
            if re.match(r"^(TANDEM|DAPR)_", env) and env not in envs:
                errors.append(f"{where}: tandemd has no environment variable {env}")
        if sargs.get("--app-id") != name:
            errors.append(f"{where}: tandemd --app-id is {sargs.get('--app-id')!r}, the app is {name!r}")

        ports = {p.get("name"): p["containerPort"] for p in sc.get("ports", [])}
        effective = {}
        for port_name, flag in TANDEMD_PORT_FLAGS.items():
            value = int(sargs.get(flag, TANDEMD_DEFAULT_PORTS[flag]))
            effective[port_name] = value
            if ports.get(port_name) != value:
                errors.append(f"{where}: tandemd {flag} is {value} but its containerPort '{port_name}' is {ports.get(port_name)}")
        if sargs.get("--listen-address") == "0.0.0.0" and "--advertise-address" not in sargs:
            errors.append(f"{where}: tandemd listens on 0.0.0.0 without --advertise-address")

        def probe_port_ok(probe):
            port = probe.get("httpGet", {}).get("port")
            return port == "admin" or port == effective["admin"]

        for probe_name, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            probe = sc.get(probe_name)
            if not probe or "httpGet" not in probe:
                errors.append(f"{where}: tandemd has no HTTP {probe_name}")
            elif probe["httpGet"].get("path") != path or not probe_port_ok(probe):
                errors.append(f"{where}: tandemd {probe_name} should GET {path} on the admin port ({effective['admin']})")

        apps = [c for c in pod.get("containers", []) if c["name"] == name]
        if len(apps) != 1:
            errors.append(f"{where}: no app container named {name!r}")
        else:
            aargs = parse_args(apps[0].get("args", []))
            if str(aargs.get("--app-port")) != str(sargs.get("--app-port")):
                errors.append(f"{where}: app --app-port {aargs.get('--app-port')} but tandemd --app-port {sargs.get('--app-port')}")
            url = urlparse(str(aargs.get("--sidecar", "")))
            if url.hostname not in ("127.0.0.1", "localhost") or url.port != effective["grpc"]:
                errors.append(f"{where}: app --sidecar {aargs.get('--sidecar')!r} is not tandemd's gRPC port {effective['grpc']} on loopback")

        for c in pod.get("initContainers", []) + pod.get("containers", []):
            res = c.get("resources", {})
            for bound in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(bound, {}):
                        errors.append(f"{where}: container {c['name']} has no {r} {bound[:-1]}")

        mounts = {m["mountPath"]: m["name"] for m in sc.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        res_path = sargs.get("--resources-path")
        vol = volumes.get(mounts.get(res_path)) if res_path else None
        if not vol or "configMap" not in vol:
            errors.append(f"{where}: tandemd --resources-path {res_path!r} is not a mounted ConfigMap")
        else:
            cm_name = vol["configMap"]["name"]
            cm = configmap(cm_name)
            if cm is None:
                errors.append(f"{where}: components ConfigMap {cm_name!r} is not in the manifests")
            else:
                errors += compare_components(where, cm.get("data", {}), os.path.join(components_dir, name))
        errors += check_shared_state(where, w, vol, configmap)
        data_dir = sargs.get("--data-dir")
        data_vol = mounts.get(data_dir)
        if data_vol is None:
            errors.append(f"{where}: tandemd --data-dir {data_dir!r} is not a mounted volume")
        elif w["kind"] == "StatefulSet" and data_vol not in claims:
            errors.append(f"{where}: a StatefulSet's --data-dir must be on a PVC (volumeClaimTemplates)")

        on = mtls_enabled(sargs, tenv)
        trust_domain = setting(sargs, tenv, "--trust-domain", "TANDEM_TRUST_DOMAIN")
        if trust_domain is None and setting(sargs, tenv, "--config", "TANDEM_CONFIG") is None:
            trust_domain = "public"  # tandemd's default
        mtls[name] = (on, trust_domain if isinstance(trust_domain, str) else None)
        if on:
            errors += check_mtls(where, name, w, sc, sargs, tenv, by_kind)

    serve = sidecar_workloads.get("serve")
    if serve is not None:
        hpas = [h for h in by_kind.get("HorizontalPodAutoscaler", {}).values() if h["spec"]["scaleTargetRef"]["name"] == "serve"]
        if not hpas:
            errors.append("serve: no HorizontalPodAutoscaler")
        for hpa in hpas:
            errors += check_serve_scaling_metrics(hpa, serve)
        serve_labels = serve["spec"]["template"]["metadata"]["labels"]
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
                if all(serve_labels.get(k) == v for k, v in p["spec"]["selector"].get("matchLabels", {}).items())]
        if not pdbs:
            errors.append("serve: no PodDisruptionBudget selecting its pods")

    train = sidecar_workloads.get("train")
    if train is not None:
        errors += check_training_group(train)

    on = sorted(n for n, (m, _) in mtls.items() if m)
    off = sorted(n for n, (m, _) in mtls.items() if not m)
    if on and off:
        errors.append(f"mTLS is on for {on} but off for {off}: sidecars with and without mTLS cannot call each other")
    domains = {td for m, td in mtls.values() if m and td is not None}
    if len(domains) > 1:
        errors.append(f"the mTLS sidecars have different trust domains {sorted(domains)}: they refuse each other's certificates")
    errors += check_network_policies(by_kind.get("NetworkPolicy", {}).values(), sidecar_workloads)
    errors += check_etcd(by_kind, sidecar_workloads)
    return errors


def tandemd_env(container, configmap):
    """The container's environment as tandemd sees it: its envFrom ConfigMaps in order, then its
    env (which wins). A value from valueFrom stays the valueFrom dict."""
    env = {}
    for ref in container.get("envFrom", []):
        cm = configmap(ref.get("configMapRef", {}).get("name")) or {}
        prefix = ref.get("prefix", "")
        env.update({prefix + k: v for k, v in cm.get("data", {}).items()})
    for e in container.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else e.get("valueFrom", {})
    return env


def setting(sargs, env, flag, var):
    """A tandemd setting: its flag in args wins over its environment variable (None: unset)."""
    return sargs[flag] if flag in sargs else env.get(var)


def mtls_enabled(sargs, env):
    value = setting(sargs, env, "--enable-mtls", "TANDEM_ENABLE_MTLS")
    if value is None:
        return False
    if value is True or isinstance(value, dict):  # a bare flag; a value from elsewhere: assume on
        return True
    return str(value).strip().lower() not in FALSEY


def check_mtls(where, app, w, sc, sargs, env, by_kind):
    """tandemd with mTLS on: its certificate, key and trust anchors are files on volumes mounted in
    its container; an SVID from csi-driver-spiffe names the pod's ServiceAccount, which must be
    the app-id and allowed to request the SVID."""
    errors = []
    pod = w["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = sc.get("volumeMounts", [])
    spiffe = set()
    for flag, var in MTLS_FILES:
        path = setting(sargs, env, flag, var)
        if not isinstance(path, str) or not path:
            errors.append(f"{where}: mTLS is on but {var} / {flag} is not set")
            continue
        under = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
        if not under:
            errors.append(f"{where}: tandemd {var} {path!r} is not under a volume mounted in the tandemd container")
            continue
        mount = max(under, key=lambda m: len(m["mountPath"]))
        if mount.get("subPath") or mount.get("subPathExpr"):
            errors.append(f"{where}: tandemd {var} {path!r} is on a subPath mount, which never sees a renewed file")
        vol = volumes.get(mount["name"])
        if vol is None:
            errors.append(f"{where}: tandemd mounts volume {mount['name']!r}, which the pod does not have")
        elif vol.get("csi", {}).get("driver") == SPIFFE_CSI_DRIVER:
            spiffe.add(mount["name"])
    if not spiffe:
        return errors

    for vname in sorted(spiffe):
        csi = volumes[vname]["csi"]
        if csi.get("readOnly") is not True:
            errors.append(f"{where}: volume {vname!r} of {SPIFFE_CSI_DRIVER} must be readOnly: true")
        group = csi.get("volumeAttributes", {}).get(f"{SPIFFE_CSI_DRIVER}/fs-group")
        pod_groups = {str(pod.get("securityContext", {}).get(k)) for k in ("fsGroup", "runAsGroup")}
        if group is not None and str(group) not in pod_groups:
            errors.append(f"{where}: volume {vname!r} has fs-group {group}, neither the pod's fsGroup nor its runAsGroup: tandemd could not read the key")

    namespace = w["metadata"].get("namespace")
    ns = setting(sargs, env, "--namespace", "TANDEM_NAMESPACE")
    ns_ok = (ns.get("fieldRef", {}).get("fieldPath") == "metadata.namespace" if isinstance(ns, dict)
             else ns is not None and (namespace is None or ns == namespace))
    if not ns_ok:
        shown = "not set (tandemd uses 'default')" if ns is None else repr(ns)
        errors.append(f"{where}: TANDEM_NAMESPACE is {shown}; with an SVID from {SPIFFE_CSI_DRIVER} it must be the pod's namespace (fieldRef metadata.namespace)")
    if setting(sargs, env, "--trust-domain", "TANDEM_TRUST_DOMAIN") is None and setting(sargs, env, "--config", "TANDEM_CONFIG") is None:
        errors.append(f"{where}: tandemd's trust domain is left at 'public'; set TANDEM_TRUST_DOMAIN to csi-driver-spiffe's app.trustDomain")

    sa = pod.get("serviceAccountName") or pod.get("serviceAccount") or "default"
    if sa != app:
        errors.append(
            f"{where}: serviceAccountName is {sa!r}, but the SVID from {SPIFFE_CSI_DRIVER} (.../sa/SERVICE_ACCOUNT) names the"
            f" caller's app-id: it must be {app!r}, or every call from this sidecar is refused")
        return errors

    def same_namespace(obj):
        return namespace is None or obj["metadata"].get("namespace") in (None, namespace)

    if not any(same_namespace(a) for a in by_kind.get("ServiceAccount", {}).values() if a["metadata"]["name"] == sa):
        errors.append(f"{where}: no ServiceAccount {sa!r} in the manifests")

    def allows_certificate_requests(role):
        return any(set(r.get("apiGroups", [])) & {"cert-manager.io", "*"}
                   and set(r.get("resources", [])) & {"certificaterequests", "*"}
                   and set(r.get("verbs", [])) & {"create", "*"}
                   for r in role.get("rules", []) or [])

    bound = False
    for rb in by_kind.get("RoleBinding", {}).values():
        if not same_namespace(rb):
            continue
        rb_ns = rb["metadata"].get("namespace")
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") in (None, rb_ns)
                   for s in rb.get("subjects", []) or []):
            continue
        ref = rb["roleRef"]
        role = by_kind.get(ref.get("kind"), {}).get(ref.get("name"))
        if role is not None and (ref["kind"] == "ClusterRole" or same_namespace(role)) and allows_certificate_requests(role):
            bound = True
    if not bound:
        errors.append(
            f"{where}: ServiceAccount {sa!r} is not bound (RoleBinding) to a Role allowing create on certificaterequests"
            f" (cert-manager.io): {SPIFFE_CSI_DRIVER} could not request its SVID")
    return errors


def check_serve_scaling_metrics(hpa, serve):
    """An HPA metric of serve's own is one serve exports, on a port its pods declare."""
    errors = []
    app = serve["spec"]["template"]["spec"]["containers"][0]
    args = parse_args(app.get("args", []))
    ports = {p.get("name"): p.get("containerPort") for p in app.get("ports", [])}
    for metric in hpa["spec"].get("metrics", []):
        source = {"Pods": "pods", "Object": "object", "External": "external"}.get(metric.get("type"))
        name = metric.get(source, {}).get("metric", {}).get("name") if source else None
        if not name or not name.startswith("tandem_serve_"):
            continue
        if name not in SERVE_SCALING_METRICS:
            errors.append(f"serve's HPA scales on {name!r}, which serve does not export (it has {sorted(SERVE_SCALING_METRICS)})")
        port = args.get("--metrics-port")
        if port is None:
            errors.append(f"serve's HPA scales on {name!r} but serve has no --metrics-port")
        elif ports.get("metrics") != int(port):
            errors.append(f"serve --metrics-port {port} is not its container port named 'metrics' ({ports.get('metrics')})")
    return errors


def check_shared_state(where, w, components_volume, configmap):
    """Replicas must share their state: each sidecar's own sled store would split it. A store
    meant to be private to each replica (train's `batches`) needs a StatefulSet's claim."""
    replicas = w["spec"].get("replicas", 1)
    if replicas <= 1 or not components_volume or "configMap" not in components_volume:
        return []
    cm = configmap(components_volume["configMap"]["name"]) or {}
    errors = []
    for f, text in sorted(cm.get("data", {}).items()):
        try:
            component = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            errors.append(f"{where}: component file {f} is not YAML: {e}")
            continue
        kind = str(component.get("spec", {}).get("type", ""))
        if kind.startswith("state.") and kind != "state.etcd":
            name = component.get("metadata", {}).get("name")
            if name != "statestore" and w["kind"] == "StatefulSet":
                continue
            errors.append(
                f"{where}: {replicas} replicas but state store {name!r} ({f}) is {kind}, private to each sidecar;"
                " replicas need a shared store (state.etcd)"
            )
    return errors


def check_training_group(w):
    """train's group minimum (and maximum) against its replicas: a minimum above them never starts a round."""
    where = f"{w['kind']}/train"
    replicas = w["spec"].get("replicas", 1)
    apps = [c for c in w["spec"]["template"]["spec"].get("containers", []) if c["name"] == "train"]
    if not apps:
        return []
    settings = {e["name"]: str(e.get("value")) for e in apps[0].get("env", []) if "value" in e}
    aargs = parse_args(apps[0].get("args", []))
    errors = []

    def setting(flag, env, default):
        value = aargs.get(flag, settings.get(env, default))
        try:
            return int(value)
        except (TypeError, ValueError):
            errors.append(f"{where}: {flag} / {env} is {value!r}, not a number")
            return default

    minimum = setting("--min-replicas", "TANDEM_MIN_REPLICAS", 1)
    maximum = setting("--max-replicas", "TANDEM_MAX_REPLICAS", 0)
    if minimum < 1:
        errors.append(f"{where}: TANDEM_MIN_REPLICAS is {minimum}; a training group needs at least 1")
    elif minimum > replicas:
        errors.append(f"{where}: TANDEM_MIN_REPLICAS {minimum} is above its {replicas} replicas: the training group would never start a round")
    if maximum != 0 and minimum > maximum:
        errors.append(f"{where}: TANDEM_MIN_REPLICAS {minimum} is above TANDEM_MAX_REPLICAS {maximum}")
    return errors


def compare_components(where, data, directory):
    errors = []
    # No directory: the app uses tandemd's default components, and the ConfigMap must be empty.
    files = {f for f in os.listdir(directory) if f.endswith((".yaml", ".yml"))} if os.path.isdir(directory) else set()
    if set(data) != files:
        errors.append(f"{where}: components ConfigMap holds {sorted(data)} but {directory} has {sorted(files)}")
    for f in files & set(data):
        with open(os.path.join(directory, f)) as fh:
            if fh.read() != data[f]:
                errors.append(f"{where}: components ConfigMap's {f} differs from {directory}/{f}")
    return errors


def check_network_policies(policies, sidecar_workloads):
    errors = []
    policies = list(policies)
    if not any(p["spec"].get("podSelector") == {} and "Ingress" in p["spec"].get("policyTypes", []) and not p["spec"].get("ingress")
               for p in policies):
        errors.append("NetworkPolicy: no default deny of ingress")
    internal_ports = {50002}
    for w in sidecar_workloads.values():
        for c in w["spec"]["template"]["spec"].get("initContainers", []):
            internal_ports |= {p["containerPort"] for p in c.get("ports", []) if p.get("name") == "internal"}
    opened_to_sidecars = False
    for p in policies:
        for rule in p["spec"].get("ingress", []) or []:
            ports = {pt.get("port") for pt in rule.get("ports", [])} if rule.get("ports") else None
            opens_internal = ports is None or bool(ports & (internal_ports | {"internal"}))
            if not opens_internal:
                continue
            froms = rule.get("from")
            only_sidecars = bool(froms) and all(
                set(f) == {"podSelector"} and f["podSelector"].get("matchLabels", {}).get(SIDECAR_LABEL) == "true" for f in froms
            )
            if not only_sidecars:
                errors.append(f"NetworkPolicy/{p['metadata']['name']}: opens the internal port to more than sidecar pods")
            else:
                opened_to_sidecars = True
    if not opened_to_sidecars:
        errors.append("NetworkPolicy: the internal port is not opened to sidecar pods (sidecars could not call each other)")
    return errors


def check_etcd(by_kind, sidecar_workloads):
    errors = []
    sts = by_kind.get("StatefulSet", {}).get("etcd")
    svc = by_kind.get("Service", {}).get("etcd")
    if sts is None:
        return ["etcd: no StatefulSet"]
    if svc is None or svc["spec"].get("clusterIP") != "None":
        errors.append("etcd: no headless Service 'etcd'")
    if not sts["spec"].get("volumeClaimTemplates"):
        errors.append("etcd: no PVC (volumeClaimTemplates)")
    replicas = sts["spec"].get("replicas", 1)
    members = [f"etcd-{i}" for i in range(replicas)]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    cluster = None
    for env in container.get("env", []):
        if env["name"] == "ETCD_INITIAL_CLUSTER":
            ref = env.get("valueFrom", {}).get("configMapKeyRef")
            cluster = by_kind.get("ConfigMap", {}).get(ref["name"], {}).get("data", {}).get(ref["key"]) if ref else env.get("value")
    named = sorted(m.split("=", 1)[0] for m in (cluster or "").split(",") if m)
    if named != members:
        errors.append(f"etcd: ETCD_INITIAL_CLUSTER names {named} but the StatefulSet has {replicas} replicas")
    for cm in by_kind.get("ConfigMap", {}).values():
        endpoints = cm.get("data", {}).get("TANDEM_ETCD_ENDPOINTS")
        for endpoint in (endpoints or "").split(","):
            if endpoints and urlparse(endpoint).hostname.split(".")[0] not in members:
                errors.append(f"ConfigMap/{cm['metadata']['name']}: TANDEM_ETCD_ENDPOINTS has {endpoint}, not an etcd member")
    return errors


def self_test(docs, flags, envs, components_dir):
    """Each mutation must make check() report an error mentioning the given text."""

    def workload(d, name):
        return next(x for x in d if x["kind"] in ("Deployment", "StatefulSet") and x["metadata"]["name"] == name)

    def sidecar(d, name):
        return next(c for c in workload(d, name)["spec"]["template"]["spec"]["initContainers"] if c["name"] == "tandemd")

    def set_arg(container, flag, value):
        container["args"] = [a for a in container["args"] if not str(a).startswith(flag + "=")] + [f"{flag}={value}"]

    def drop_sidecar(d):
        workload(d, "serve")["spec"]["template"]["spec"]["initContainers"] = []

    def plain_init(d):
        del sidecar(d, "train")["restartPolicy"]

    def wrong_admin_port(d):
        set_arg(sidecar(d, "preprocess"), "--admin-port", "9091")

    def unknown_flag(d):
        sidecar(d, "ingest")["args"].append("--no-such-flag=1")

    def no_readiness(d):
        del sidecar(d, "serve")["readinessProbe"]

    def no_limits(d):
        del workload(d, "train")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]

    def app_port_mismatch(d):
        set_arg(workload(d, "serve")["spec"]["template"]["spec"]["containers"][0], "--app-port", "7000")

    def internal_open(d):
        for p in d:
            if p["kind"] == "NetworkPolicy" and p["metadata"]["name"] == "sidecar-internal-from-sidecars":
                p["spec"]["ingress"][0]["from"] = [{"namespaceSelector": {}}]

    def train_deployment(d):
        workload(d, "train")["kind"] = "Deployment"

    def components_drift(d):
        for cm in d:
            if cm["kind"] == "ConfigMap" and cm["metadata"]["name"].startswith("components-serve"):
                cm.setdefault("data", {})["extra.yaml"] = "x: 1\n"

    def train_private_store(d):
        for cm in d:
            if cm["kind"] == "ConfigMap" and cm["metadata"]["name"].startswith("components-train"):
                cm["data"]["statestore.yaml"] = cm["data"]["statestore.yaml"].replace("state.etcd", "state.sled")

    def group_never_starts(d):
        app = workload(d, "train")["spec"]["template"]["spec"]["containers"][0]
        app["env"] = [e for e in app.get("env", []) if e["name"] != "TANDEM_MIN_REPLICAS"]
        app["env"].append({"name": "TANDEM_MIN_REPLICAS", "value": str(workload(d, "train")["spec"].get("replicas", 1) + 1)})

    def serve_hpa(d):
        return next(x for x in d if x["kind"] == "HorizontalPodAutoscaler" and x["metadata"]["name"] == "serve")

    def scales_on_unknown_metric(d):
        serve_hpa(d)["spec"]["metrics"].append(
            {"type": "Pods", "pods": {"metric": {"name": "tandem_serve_queue_lenght"},
                                      "target": {"type": "AverageValue", "averageValue": "64"}}})

    def set_env(container, name, value):
        container["env"] = [e for e in container.get("env", []) if e["name"] != name] + [{"name": name, "value": value}]

    def sidecar_config(d):
        name = sidecar(d, "serve")["envFrom"][0]["configMapRef"]["name"]
        return next(x for x in d if x["kind"] == "ConfigMap" and x["metadata"]["name"] == name)

    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    serve_sc = sidecar(docs, "serve")
    mtls_on = mtls_enabled(parse_args(serve_sc.get("args", [])), tandemd_env(serve_sc, by_kind.get("ConfigMap", {}).get))

    # mTLS on for serve alone (dev) or off for serve alone (prod).
    def mtls_mixed(d):
        set_env(sidecar(d, "serve"), "TANDEM_ENABLE_MTLS", "false" if mtls_on else "true")

    # With mTLS on (prod): the SVID's id, files, mount and RBAC.
    def service_account_not_app_id(d):
        workload(d, "train")["spec"]["template"]["spec"]["serviceAccountName"] = "default"

    def spiffe_mount_removed(d):
        sc = sidecar(d, "serve")
        sc["volumeMounts"] = [m for m in sc["volumeMounts"] if not m["mountPath"].startswith("/var/run/secrets/spiffe.io")]

    def key_outside_mounts(d):
        set_env(sidecar(d, "ingest"), "TANDEM_KEY_FILE", "/tmp/tls.key")

    def cert_file_unset(d):
        del sidecar_config(d)["data"]["TANDEM_CERT_FILE"]

    def trust_domain_unset(d):
        del sidecar_config(d)["data"]["TANDEM_TRUST_DOMAIN"]

    def service_account_missing(d):
        d[:] = [x for x in d if not (x["kind"] == "ServiceAccount" and x["metadata"]["name"] == "preprocess")]

    def role_binding_removed(d):
        d[:] = [x for x in d if x["kind"] != "RoleBinding"]

    mtls_cases = [
        (service_account_not_app_id, "StatefulSet/train: serviceAccountName is 'default'"),
        (spiffe_mount_removed, "Deployment/serve: tandemd TANDEM_CERT_FILE '/var/run/secrets/spiffe.io/tls.crt' is not under a volume mounted"),
        (key_outside_mounts, "StatefulSet/ingest: tandemd TANDEM_KEY_FILE '/tmp/tls.key' is not under a volume mounted"),
        (cert_file_unset, "mTLS is on but TANDEM_CERT_FILE / --cert-file is not set"),
        (trust_domain_unset, "trust domain is left at 'public'"),
        (service_account_missing, "no ServiceAccount 'preprocess'"),
        (role_binding_removed, "ServiceAccount 'serve' is not bound (RoleBinding)"),
    ]

    cases = [
        (mtls_mixed, "mTLS is on for"),
        (scales_on_unknown_metric, "which serve does not export"),
        (drop_sidecar, "exactly one init container 'tandemd'"),
        (plain_init, "restartPolicy: Always"),
        (wrong_admin_port, "--admin-port is 9091"),
        (unknown_flag, "no flag --no-such-flag"),
        (no_readiness, "no HTTP readinessProbe"),
        (no_limits, "has no cpu limit"),
        (app_port_mismatch, "app --app-port 7000"),
        (internal_open, "opens the internal port to more than sidecar pods"),
        (train_deployment, "train: is a Deployment"),
        (components_drift, "components ConfigMap holds"),
        (train_private_store, "replicas need a shared store (state.etcd)"),
        (group_never_starts, "the training group would never start a round"),
    ] + (mtls_cases if mtls_on else [])
    failures = []
    for mutate, expected in cases:
        broken = copy.deepcopy(docs)
        mutate(broken)
        errors = check(broken, flags, envs, components_dir)
        if not any(expected in e for e in errors):
            failures.append(f"self-test {mutate.__name__}: expected an error with {expected!r}, got {errors}")
    return failures, len(cases)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rendered")
    ap.add_argument("--tandemd-help", required=True, help="file with the output of `tandemd --help`")
    ap.add_argument("--components", required=True, help="the repository's components/ directory")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    with open(a.tandemd_help) as fh:
        flags, envs = tandemd_interface(fh.read())
    with open(a.rendered) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    errors = check(docs, flags, envs, a.components)
    breaks = 0
    if a.self_test and not errors:
        errors, breaks = self_test(docs, flags, envs, a.components)
    for e in errors:
        print(f"  FAIL {e}")
    if errors:
        return 1
    print(f"  ok   {a.rendered}: {len(docs)} objects, Tandem checks passed" + (f" (and the self-test caught all {breaks} breaks)" if a.self_test else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
