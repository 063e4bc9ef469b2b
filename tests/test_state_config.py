"""The ``state:`` section: which engine keeps agentd's state, and its password kept out
of the config file. Bad values are refused with the path named and the password never
echoed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agentd.config import Config, ConfigError, load_config, secret_refs


def test_without_a_url_the_state_is_the_embedded_sqlite() -> None:
    assert Config().state.engine == "sqlite"


def test_a_postgresql_url_chooses_postgres_and_its_password_is_a_secret() -> None:
    cfg = Config.model_validate(
        {"state": {"url": "postgresql://agentd@db:5432/agentd", "password_env": "AGENTD_DB_PW"}}
    )
    assert cfg.state.engine == "postgres"
    assert [(ref.where, ref.env) for ref in secret_refs(cfg)] == [
        ("state.password_env", "AGENTD_DB_PW")
    ]


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        ({"url": "mysql://db/agentd"}, "must be a postgresql:// URL"),
        ({"url": "postgresql:///agentd"}, "names no host"),
        ({"password_env": "X"}, "need url"),
        (
            {"url": "postgresql://a@db/x", "password_env": "X", "password_file": "/p"},
            "name one of them",
        ),
    ],
)
def test_bad_state_sections_are_refused_with_their_path(
    tmp_path: Path, state: dict[str, str], needle: str
) -> None:
    path = tmp_path / "agentd.yaml"
    lines = "".join(f"  {k}: {v}\n" for k, v in state.items())
    path.write_text(f"state:\n{lines}tasks: {{}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = caught.value.render()
    assert "state" in text and needle in text, text


def test_a_password_in_the_url_is_refused_and_never_echoed(tmp_path: Path) -> None:
    path = tmp_path / "agentd.yaml"
    path.write_text("state:\n  url: postgresql://agentd:hunter2@db/agentd\ntasks: {}\n")
    out = subprocess.run(
        [sys.executable, "-m", "agentd.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 78
    both = out.stdout + out.stderr
    assert "state.url" in both and "password_env" in both
    assert "hunter2" not in both
