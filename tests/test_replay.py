"""``agentd.executors.replay`` in one process, on recordings as the state DB keeps them:
how recorded tool results are matched to the calls a replay makes, and where a replay
stops. End to end (the daemon recording, the CLI replaying) in tests/test_e2e_replay.py."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agentd.config import Config, parse_config
from agentd.executors import replay
from agentd.executors.replay import Options, Recording, ReplayRefused, ReplayStopped

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from agent_tools import SCRIPT

PY = sys.executable


def config(out: Path) -> Config:
    text = textwrap.dedent(
        f"""
        tasks:
          t1:
            schedule: {{manual: true}}
            agent:
              base_url: http://127.0.0.1:9/v1
              model: m1
              prompt: Do the thing.
              tools:
                - name: append
                  parameters:
                    type: object
                    properties: {{word: {{type: string}}}}
                    required: [word]
                  command: {{argv: [{PY}, {SCRIPT}, {out}, "{{word}}"]}}
          plain:
            schedule: {{manual: true}}
            command: {{argv: ["true"]}}
        """
    )
    return parse_config(text, "test.yaml", {})


class Steps:
    """A recording, built the way the loop records: ``seq`` in order."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, step: int, kind: str, call_id: str | None, payload: Any) -> Steps:
        self.records.append(
            {
                "run_id": "r1",
                "seq": len(self.records) + 1,
                "step": step,
                "kind": kind,
                "call_id": call_id,
                "payload": payload,
                "recorded_at": "2026-03-01T12:00:00Z",
            }
        )
        return self

    def reply(self, step: int, *calls: tuple[str, str, dict[str, Any]], content: str = "") -> Steps:
        payload = {
            "content": content,
            "tool_calls": [
                {"id": cid, "name": name, "arguments": json.dumps(args)}
                for cid, name, args in calls
            ],
            "usage": {"input_tokens": 10, "output_tokens": 5, "cost_usd": 0.0},
            "model": "m1",
        }
        return self.add(step, "model", None, payload)

    def call(self, step: int, cid: str, args: dict[str, Any], content: str | None) -> Steps:
        self.add(step, "tool_started", cid, {"tool": "append", "arguments": args})
        if content is not None:
            result = {"tool": "append", "ok": True, "content": content, "duration_s": 0.1}
            self.add(step, "tool_result", cid, result)
        return self


RUN = {"id": "r1", "task_id": "t1"}


def replayed(tmp_path: Path, steps: Steps, **options: Any) -> replay.Report:
    cfg = config(tmp_path / "words.txt")
    return asyncio.run(
        replay.replay(
            cfg,
            cfg.tasks[RUN["task_id"]],
            RUN,
            steps.records,
            Options(cassette=True, **options),
            tmp_path / "out",
        )
    )


def sent(report: replay.Report) -> list[tuple[str, str]]:
    """The tool results the replay's transcript holds: (call id, content)."""
    records = [json.loads(line) for line in report.transcript.read_text().splitlines()]
    return [(r["call_id"], r["payload"]["content"]) for r in records if r["kind"] == "tool_result"]


def test_the_same_call_twice_gets_its_recorded_results_in_order(tmp_path: Path) -> None:
    steps = (
        Steps()
        .reply(1, ("c1", "append", {"word": "w"}), ("c2", "append", {"word": "w"}))
        .call(1, "c1", {"word": "w"}, "first")
        .call(1, "c2", {"word": "w"}, "second")
        .reply(2, content="done")
    )
    report = replayed(tmp_path, steps)
    assert report.stopped is None and report.same
    assert report.result is not None and report.result.ok
    assert sent(report) == [("c1", "first"), ("c2", "second")]
    assert not (tmp_path / "words.txt").exists()  # the tool never ran


def test_a_call_refused_without_running_is_answered_by_the_loop_again(tmp_path: Path) -> None:
    """Invalid arguments were never run (a result, no start): the replay's loop answers
    them itself, as the run's did; nothing needs serving."""
    steps = Steps().reply(1, ("c1", "append", {"word": 3}))
    error = "error: invalid arguments (word): 3 is not of type 'string'"
    steps.add(1, "tool_result", "c1", {"tool": "append", "ok": False, "content": error})
    steps.reply(2, content="gave up")
    report = replayed(tmp_path, steps)
    assert report.same and sent(report) == [("c1", error)]


def test_a_call_recorded_as_started_without_a_result_stops_the_replay(tmp_path: Path) -> None:
    steps = Steps().reply(1, ("c1", "append", {"word": "w"})).call(1, "c1", {"word": "w"}, None)
    report = replayed(tmp_path, steps)
    assert report.stopped == (
        'step 1: the model asked for append {"word":"w"}, which the recording has as started'
        " (call c1, step 1) with no result: its outcome was unknown, so there is nothing to serve"
    )
    assert report.result is None and not report.same
    assert not (tmp_path / "words.txt").exists()


def test_a_cassette_with_no_reply_left_stops_the_replay(tmp_path: Path) -> None:
    """A run that ended before its answer (killed, cancelled): the cassette runs out."""
    steps = Steps().reply(1, ("c1", "append", {"word": "w"})).call(1, "c1", {"word": "w"}, "ok")
    report = replayed(tmp_path, steps)
    assert report.stopped == "step 2: the recording has 1 model replies, and the cassette no more"
    assert report.new["steps"] == 1 and sent(report) == [("c1", "ok")]


def test_a_replay_needs_an_agent_with_tools_and_recorded_replies(tmp_path: Path) -> None:
    cfg = config(tmp_path / "words.txt")
    with pytest.raises(ReplayRefused, match="task 'plain' is not an agent with tools"):
        replay.check(cfg.tasks["plain"], {"id": "r2", "task_id": "plain"}, [])
    with pytest.raises(ReplayRefused, match="task 'gone' is not in the config"):
        replay.check(None, {"id": "r2", "task_id": "gone"}, [])
    with pytest.raises(ReplayRefused, match="run r1 has no recorded model reply"):
        replayed(tmp_path, Steps())
    bad = Steps().reply(1, content="x")
    with pytest.raises(ReplayRefused, match=r"prompt placeholder \{nope\} has no value"):
        replayed(tmp_path, bad, prompt="Use {nope}.")


def test_recording_matches_by_tool_and_arguments_not_by_call_id() -> None:
    steps = (
        Steps()
        .reply(1, ("c1", "append", {"word": "a"}), ("c2", "append", {"word": "b"}))
        .call(1, "c1", {"word": "a"}, "A")
        .call(1, "c2", {"word": "b"}, "B")
    )
    recording = Recording(steps.records)
    assert recording.serve("append", {"word": "b"}, 1) == (True, "B")
    assert recording.serve("append", {"word": "a"}, 1) == (True, "A")
    with pytest.raises(ReplayStopped, match=r'append \{"word":"a"\}, which the recording does not'):
        recording.serve("append", {"word": "a"}, 2)
