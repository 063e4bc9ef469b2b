"""Slices of a run's captured output (``agentd.runoutput``), on real files: what
``GET /v1/runs/{run_id}/output`` answers and ``agentd logs -f`` follows."""

from __future__ import annotations

from pathlib import Path

from agentd.runoutput import read_output


def test_slices_never_repeat_or_lose_a_byte(tmp_path: Path) -> None:
    out = tmp_path / "stdout.log"
    out.write_bytes(b"line 1\nline 2\n")
    first = read_output(out, 0, 5, final=False)
    assert first["text"] == "line " and first["next_offset"] == 5 and not first["eof"]
    rest = read_output(out, first["next_offset"], 1000, final=False)
    assert first["text"] + rest["text"] == "line 1\nline 2\n"
    assert rest["eof"] and rest["next_offset"] == rest["size"] == 14
    with out.open("ab") as fh:  # the run writes on
        fh.write(b"line 3\n")
    more = read_output(out, rest["next_offset"], 1000, final=False)
    assert more["text"] == "line 3\n" and not more["restarted"]


def test_a_character_cut_at_the_end_waits_for_the_next_slice(tmp_path: Path) -> None:
    out = tmp_path / "stdout.log"
    text = "größe €5 🙂\n"
    data = text.encode()
    out.write_bytes(data)
    pieces, offset = [], 0
    while offset < len(data):
        page = read_output(out, offset, 1, final=False)  # (at least 4 bytes: MIN_PAGE)
        assert "\ufffd" not in page["text"], page
        assert page["next_offset"] > offset, page
        pieces.append(page["text"])
        offset = page["next_offset"]
    assert "".join(pieces) == text
    # A final run's last bytes are given as they are, even when not UTF-8.
    out.write_bytes(b"ok \xe2\x82")
    assert read_output(out, 0, 100, final=False)["text"] == "ok "
    assert read_output(out, 0, 100, final=True)["text"] == "ok \ufffd"


def test_a_file_written_anew_starts_again_and_a_missing_one_is_empty(tmp_path: Path) -> None:
    out = tmp_path / "stdout.log"
    missing = read_output(out, 0, 100, final=False)
    assert missing["exists"] is False and missing["text"] == "" and missing["eof"]
    out.write_bytes(b"attempt 1 wrote a lot\n")
    seen = read_output(out, 0, 100, final=False)["next_offset"]
    out.write_bytes(b"attempt 2\n")  # a retry truncates it
    again = read_output(out, seen, 100, final=False)
    assert again["restarted"] and again["offset"] == 0 and again["text"] == "attempt 2\n"
