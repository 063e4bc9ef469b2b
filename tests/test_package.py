"""The wheel, built and installed as a user would: alone, into a fresh venv.

What ``pip install agentd-*.whl`` must give: a working ``agentd`` command whose code is
the wheel's (not this checkout's), the LICENSE the metadata declares, ``py.typed`` and
the classifiers. The build uses a copy of only what ``.dockerignore`` lets into the
image (pyproject.toml, README.md, LICENSE, agentd/): a file the package needs from
elsewhere in the checkout would be missing here as it would be in the image. The
dependencies come from the package index, as pip resolves them for a user.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

pytestmark = [pytest.mark.package, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``cmd`` with no trace of this checkout in its environment (PYTHONPATH would let
    the checkout's agentd stand in for the wheel's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_the_wheel_alone_gives_a_working_agentd(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "agentd", src / "agentd", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)],
        cwd=tmp_path,
        timeout=300,
    )
    [wheel] = dist.glob("agentd-*.whl")

    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert "agentd/py.typed" in names
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert f"{info}/licenses/LICENSE" in names
        license_text = whl.read(f"{info}/licenses/LICENSE").decode()
        meta = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the agentd authors" in license_text
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta.get_all("Classifier") == declared["classifiers"]
    assert "Typing :: Typed" in declared["classifiers"]
    # The dev tools are an extra: not installed with the wheel.
    requires = meta.get_all("Requires-Dist") or []
    assert any(r.startswith("pytest") and 'extra == "dev"' in r for r in requires)
    assert not any(r.startswith("pytest") and "extra" not in r for r in requires)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, timeout=120)
    run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", str(wheel)],
        cwd=tmp_path,
        timeout=780,
    )
    where = run(
        [str(venv / "bin/python"), "-c", "import agentd; print(agentd.__file__)"],
        cwd=tmp_path,
        timeout=60,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's code, not the checkout's

    agentd = str(venv / "bin/agentd")
    helped = run([agentd, "--help"], cwd=tmp_path, timeout=60)
    assert "check-config" in helped.stdout and "run" in helped.stdout
    checked = run(
        [agentd, "check-config", "--config", str(ROOT / "config/agentd.yaml")],
        cwd=tmp_path,
        timeout=60,
    )
    assert ": OK," in checked.stdout, checked.stdout
