"""Secrets stay secret (issue 23): the variables and files the config names as secrets
never reach a command's environment unless its task names them, and their values are
scrubbed from every text agentd stores, sends or logs; what agentd creates is 0700/0600
whatever the caller's umask.

The end-to-end tests run a real daemon on a config that names three secrets (the API
token in a variable, an LLM key in a variable, a webhook secret in a file), with tasks
that print their environment and echo the secrets' values into their errors."""

from __future__ import annotations

import json
import logging
import os
import stat
import urllib.request
from pathlib import Path

import httpx
import pytest
from harness import agentd_cli, wait_for

from agentd import redact
from agentd.config import parse_config, secret_refs
from agentd.redact import RedactingFilter, Redactor, SecretRef, read_secrets

TOKEN = "tok-0123456789-api-token"
LLM_KEY = "sk-live-abcdef0123456789"
HOOK_SECRET = 'hook"secret\\with-json-chars'

# ---------------------------------------------------------------- the pure parts


def test_redactor_masks_every_value_and_its_json_form() -> None:
    r = Redactor(["sk-abcdef", "sk-abcdef-longer", 'a"quoted\\one'])
    assert r.text("key sk-abcdef-longer and sk-abcdef") == "key [redacted] and [redacted]"
    encoded = json.dumps({"error": 'got a"quoted\\one here'})
    assert "quoted" not in r.text(encoded)
    assert json.loads(r.text(encoded)) == {"error": "got [redacted] here"}
    assert r.value({"e": ["x sk-abcdef"], "sk-abcdef": 1}) == {
        "e": ["x [redacted]"],
        "[redacted]": 1,
    }
    assert "sk-abcdef" not in repr(r) and r.describe() == "3 secret value(s) scrubbed"


def test_short_values_are_not_scrubbed_and_are_named() -> None:
    r = read_secrets(
        [SecretRef("a.token_env", env="T"), SecretRef("b.secret_env", env="S")],
        {"T": "abc", "S": " long-enough-secret \n"},
    )
    assert r.text("abc long-enough-secret") == "abc [redacted]"
    assert r.too_short == ("a.token_env",)


def test_read_secrets_reads_files_and_ignores_missing_ones(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("file-secret-value\n")
    r = read_secrets(
        [
            SecretRef("x.secret_file", file=f),
            SecretRef("y.secret_file", file=tmp_path / "missing"),
            SecretRef("z.token_env", env="UNSET_FOR_SURE"),
        ],
        {},
    )
    assert r.text("a file-secret-value b") == "a [redacted] b"
    assert not Redactor()  # nothing configured: the cheap path


def test_log_filter_scrubs_message_args_and_traceback() -> None:
    logger = logging.getLogger("test.secrets.filter")
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter(Redactor(["sk-logged-secret"])))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("call failed: %s", "401 for sk-logged-secret")
        try:
            raise ValueError("bad key sk-logged-secret")
        except ValueError:
            logger.exception("boom")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(lines)
    assert "sk-logged-secret" not in text
    assert "401 for [redacted]" in text and "ValueError: bad key [redacted]" in text


def test_secret_refs_finds_every_secret_the_config_names(tmp_path: Path) -> None:
    cfg = parse_config(
        f"""
daemon: {{http: {{token_env: AGENTD_TOKEN}}}}
providers:
  p: {{base_url: "http://127.0.0.1:1/v1", api_key_env: LLM_KEY, default_model: m}}
alerts:
  channels:
    hook: {{webhook: {{url: "http://127.0.0.1:1/h", secret_file: {tmp_path}/hook}}}}
  rules: [{{events: ["*"], channels: [hook]}}]
tasks:
  a: {{schedule: {{manual: true}}, agent: {{provider: p, prompt: hi}}}}
  b:
    schedule: {{manual: true}}
    agent: {{base_url: "http://127.0.0.1:1/v1", api_key_file: {tmp_path}/k, model: m, prompt: x}}
  c: {{schedule: {{manual: true}}, command: {{shell: "true", env: {{MY_TOKEN_ENV: x}}}}}}
""",
        environ={},
    )
    refs = {(r.where, r.env, str(r.file) if r.file else None) for r in secret_refs(cfg)}
    assert refs == {
        ("daemon.http.token_env", "AGENTD_TOKEN", None),
        ("providers.p.api_key_env", "LLM_KEY", None),
        ("alerts.channels.hook.webhook.secret_file", None, f"{tmp_path}/hook"),
        ("tasks.b.agent.api_key_file", None, f"{tmp_path}/k"),
    }


# ---------------------------------------------------------------- a real daemon


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("AGENTD_T_TOKEN", TOKEN)
    monkeypatch.setenv("AGENTD_T_LLM_KEY", LLM_KEY)
    monkeypatch.setenv("AGENTD_T_PLAIN", "plain-value-passes")
    hook = tmp_path / "hook.secret"
    hook.write_text(HOOK_SECRET + "\n")
    return hook


def _leaky(tmp_path: Path) -> None:
    (tmp_path / "leaky_mod.py").write_text(
        "import os\n"
        "def leak(ctx):\n"
        "    raise RuntimeError('provider said no to ' + os.environ['AGENTD_T_LLM_KEY'])\n"
    )


def _config(tmp_path: Path, hook: Path) -> tuple[str, str]:
    alert_out = tmp_path / "alert.json"
    alert_env = tmp_path / "alert.env"
    top = f"""
providers:
  llm: {{base_url: "http://127.0.0.1:9/v1", api_key_env: AGENTD_T_LLM_KEY, default_model: m}}
alerts:
  channels:
    pager:
      command:
        argv: [/bin/sh, -c, "cat >> {alert_out}; echo >> {alert_out}; env >> {alert_env}"]
    hook:
      webhook: {{url: "http://127.0.0.1:9/hook", secret_file: {hook}}}
      retries: 0
  rules:
    - events: [run_quarantined]
      channels: [pager]
"""
    tasks = f"""
envdump:
  schedule: {{manual: true}}
  command: {{shell: "env; umask"}}
named:
  schedule: {{manual: true}}
  command:
    shell: "echo named=$AGENTD_T_LLM_KEY"
    env: {{AGENTD_T_LLM_KEY: "${{AGENTD_T_LLM_KEY}}"}}
leakcmd:
  schedule: {{manual: true}}
  command:
    shell: |
      echo using {TOKEN} and {LLM_KEY} >&2
      printf '%s\\n' '{HOOK_SECRET}' >&2
      exit 3
  retry: {{max_attempts: 1}}
leakpy:
  schedule: {{manual: true}}
  python: {{callable: "leaky_mod:leak"}}
  retry: {{max_attempts: 1}}
"""
    return top, tasks


def _api(url: str, path: str) -> dict[str, object]:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _everything_stored(d, alert_out: Path) -> str:  # type: ignore[no-untyped-def]
    """Every text agentd keeps or sends about its runs, as one string."""
    parts = [json.dumps(d.query(f"SELECT * FROM {t}")) for t in ("runs", "attempts", "events")]
    parts.append(json.dumps(d.query("SELECT * FROM alerts")))
    parts.append(json.dumps(d.query("SELECT * FROM outbox")))
    for ws in (d.state_dir / "runs").rglob("*"):
        if ws.name in ("run.json", "events.jsonl"):
            parts.append(ws.read_text())
    parts.append(alert_out.read_text() if alert_out.exists() else "")
    parts.append(d.log())
    return "\n".join(parts)


def test_commands_never_inherit_configured_secrets_and_texts_are_scrubbed(  # type: ignore[no-untyped-def]
    make_daemon, tmp_path: Path, secret_env: Path
) -> None:
    _leaky(tmp_path)
    top, tasks = _config(tmp_path, secret_env)
    d = make_daemon(tasks, top=top)
    d.write_config(  # the port is known once the harness made it
        tasks,
        f"http: {{host: 127.0.0.1, port: {d.port}, token_env: AGENTD_T_TOKEN}}\n"
        f"python_path: [{tmp_path}]",
    )
    old = os.umask(0o022)
    try:
        d.start(env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    finally:
        os.umask(old)

    ids = {t: d.trigger(t) for t in ("envdump", "named", "leakcmd", "leakpy")}
    d.wait_status(ids["envdump"], "succeeded")
    d.wait_status(ids["named"], "succeeded")
    d.wait_status(ids["leakcmd"], "quarantined")
    d.wait_status(ids["leakpy"], "quarantined")
    alert_out = tmp_path / "alert.json"
    wait_for(lambda: alert_out.exists() and alert_out.read_text().count("\n") >= 2, what="alerts")

    # The environment of a command: no secret variable, the plain one passes, and the
    # caller's umask (022), not the daemon's (077).
    ws = {t: d.state_dir / "runs" / t / ids[t] for t in ids}
    env_out = (ws["envdump"] / "stdout.log").read_text()
    for name in ("AGENTD_T_TOKEN", "AGENTD_T_LLM_KEY", "CREDENTIALS_DIRECTORY"):
        assert name not in env_out
    assert TOKEN not in env_out and LLM_KEY not in env_out
    assert "AGENTD_T_PLAIN=plain-value-passes" in env_out
    assert env_out.strip().splitlines()[-1] == "0022"
    # A task that names a secret in its own env gets it (its output is its own).
    assert (ws["named"] / "stdout.log").read_text().strip() == f"named={LLM_KEY}"
    # Nor does an alert command's environment hold them.
    alert_env = (tmp_path / "alert.env").read_text()
    assert "AGENTD_T_LLM_KEY" not in alert_env and "AGENTD_T_TOKEN" not in alert_env

    # What agentd stores, sends and logs: scrubbed everywhere.
    wait_for(lambda: (ws["leakcmd"] / "run.json").exists(), what="run.json")
    stored = _everything_stored(d, alert_out)
    for value in (TOKEN, LLM_KEY, HOOK_SECRET, json.dumps(HOOK_SECRET)[1:-1]):
        assert value not in stored, f"{value!r} leaked"
    errors = {r["task_id"]: r["error"] for r in d.runs()}
    assert errors["leakcmd"] == "exit code 3: [redacted]"
    assert "[redacted]" in errors["leakpy"] and "provider said no" in errors["leakpy"]
    assert "[redacted]" in alert_out.read_text()
    for t in ("leakcmd", "leakpy"):  # the API reads the same scrubbed records
        detail = json.dumps(_api(d.url, f"/v1/runs/{ids[t]}"))
        assert LLM_KEY not in detail and TOKEN not in detail and "[redacted]" in detail
    # stderr.log is the task's own output, kept as it was, readable by the owner alone.
    stderr = ws["leakcmd"] / "stderr.log"
    assert TOKEN in stderr.read_text()
    assert stat.S_IMODE(stderr.stat().st_mode) == 0o600
    assert "secrets: 3 secret value(s) scrubbed" in d.log()
    assert d.stop() == 0


def test_state_is_private_whatever_the_umask(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(
        """
        out:
          schedule: {manual: true}
          command: {shell: "echo hi; echo err >&2"}
        """
    )
    old = os.umask(0o000)
    try:
        d.start()
    finally:
        os.umask(old)
    run_id = d.trigger("out")
    d.wait_status(run_id, "succeeded")
    ws = d.state_dir / "runs" / "out" / run_id
    wait_for(lambda: (ws / "run.json").exists(), what="run.json")
    mode = {p: stat.S_IMODE(p.stat().st_mode) for p in [d.state_dir, *d.state_dir.rglob("*")]}
    assert {p.name for p in mode} >= {
        "state.sqlite",
        "state.sqlite-wal",
        "schedule.sqlite",
        "agentd.lock",
        "run.json",
        "events.jsonl",
        "stdout.log",
        "stderr.log",
    }
    loose = {str(p): oct(m) for p, m in mode.items() if m & 0o077}
    assert not loose, f"readable by others: {loose}"
    assert d.stop() == 0


def test_a_loose_existing_state_dir_is_left_alone_and_reported(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("m: {schedule: {manual: true}, command: {shell: 'true'}}")
    d.state_dir.mkdir(mode=0o755)
    d.state_dir.chmod(0o755)
    d.start()
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o755
    assert "is mode 0755: other users may read the run history" in d.log()
    assert d.stop() == 0


def test_check_config_show_names_the_withheld_secrets(  # type: ignore[no-untyped-def]
    tmp_path: Path, secret_env: Path
) -> None:
    top, tasks = _config(tmp_path, secret_env)
    cfg = tmp_path / "agentd.yaml"
    cfg.write_text(
        "daemon: {http: {token_env: AGENTD_T_TOKEN}}\n"
        + top
        + "tasks:\n"
        + "\n".join("  " + line for line in tasks.splitlines())
    )
    out = agentd_cli("check-config", "--show", config=cfg, check=True).stdout
    assert "#   daemon.http.token_env: $AGENTD_T_TOKEN" in out
    assert "#   providers.llm.api_key_env: $AGENTD_T_LLM_KEY" in out
    assert f"#   alerts.channels.hook.webhook.secret_file: {secret_env}" in out
    assert TOKEN not in out and LLM_KEY not in out
    report = json.loads(agentd_cli("check-config", "--json", config=cfg, check=True).stdout)
    assert {s["path"] for s in report["secrets"]} == {
        "daemon.http.token_env",
        "providers.llm.api_key_env",
        "alerts.channels.hook.webhook.secret_file",
    }
    assert redact.MASK == "[redacted]"


def test_the_token_from_a_systemd_credential_with_a_fallback_for_the_shell(  # type: ignore[no-untyped-def]
    make_daemon, tmp_path: Path
) -> None:
    """packaging/systemd/README.md's recipe: ``token_file:
    ${CREDENTIALS_DIRECTORY:-/etc/agentd/credentials}/api-token``. The daemon (given
    the directory, as LoadCredential= does) guards its API with the file's token; the
    CLI from a shell, without the variable, reads the same token from the fallback."""
    creds = tmp_path / "run-credentials"
    fallback = tmp_path / "etc-credentials"
    for where in (creds, fallback):
        where.mkdir()
        (where / "api-token").write_text("cred-token-0123456789")
    d = make_daemon("job: {schedule: {manual: true}, command: {argv: ['true']}}")
    d.write_config(
        "job: {schedule: {manual: true}, command: {argv: ['true']}}",
        f"http: {{host: 127.0.0.1, port: {d.port}, token_file:"
        f' "${{CREDENTIALS_DIRECTORY:-{fallback}}}/api-token"}}',
    )
    d.start(env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert httpx.get(d.url + "/v1/tasks").status_code == 401
    headers = {"Authorization": "Bearer cred-token-0123456789"}
    assert httpx.get(d.url + "/v1/tasks", headers=headers).status_code == 200
    assert "CREDENTIALS_DIRECTORY" not in os.environ
    out = d.cli("tasks", "--json")
    assert [t["task"] for t in json.loads(out.stdout)] == ["job"]
    assert d.stop() == 0
