"""agentd.yamlload gives what yaml.safe_load gives: values, identity of aliases, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from agentd import yamlload

REPO = Path(__file__).resolve().parent.parent
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DOCS = [
    "",
    "# only a comment\n",
    "a: 1\n",
    "- 1\n- two\n- 3.5\n",
    "plain: text\nquoted: 'text'\nnum_str: '12'\nint: 12\nhex: 0x1f\noctal: 0o17\n",
    "float: 1.5\nexp: 1e3\ninf: .inf\nneg: -.inf\nyes: yes\ntrue: true\nnull: ~\nempty:\n",
    "when: 2026-03-29 01:30:00+01:00\nday: 2026-03-29\nbin: !!binary aGVsbG8=\n",
    "explicit: !!str 12\nset: !!set {a, b}\nomap: !!omap [{a: 1}, {b: 2}]\n",
    "1: int key\n2.5: float key\nnull: null key\ntrue: bool key\n",
    "base: &b {x: 1, y: [1, 2]}\nuse: *b\nlist: &l [a, b]\nagain: *l\n",
    "base: &b {x: 1, y: 2}\nmerged:\n  <<: *b\n  y: 3\n",
    "dup: 1\ndup: 2\n",
    "tasks:\n  t1: {schedule: {cron: '0 3 * * *', timezone: Europe/Berlin}, "
    "command: {argv: [echo, '${HOME}']}}\n",
    "a: &x [1, *x]\n",  # recursive: PyYAML's constructor handles it
    "multi: |\n  line one\n  line two\nfolded: >\n  a\n  b\n",
]


@pytest.mark.parametrize("text", DOCS)
def test_same_values_as_safe_load(text: str) -> None:
    expected = yaml.load(text, Loader=LOADER)
    got = yamlload.load(text)
    if text.startswith("a: &x"):  # self-referential: compare the shape
        assert got["a"][0] == 1 and got["a"][1] is got["a"]
        return
    assert got == expected
    assert _types(got) == _types(expected)  # 1 and True and 1.0 compare equal


def test_the_shipped_config_and_a_generated_large_one() -> None:
    for text in [
        (REPO / "config" / "agentd.yaml").read_text(),
        "tasks:\n"
        + "".join(
            f'  "t{i:04d}": {{"schedule": {{"cron": "{i % 60} 3 * * *"}}, '
            f'"python": {{"callable": "pkg.mod:f"}}, "params": {{"n": {i}, "f": {i}.5}}}}\n'
            for i in range(300)
        ),
    ]:
        assert yamlload.load(text) == yaml.load(text, Loader=LOADER)


def test_an_alias_is_the_same_object_as_its_anchor() -> None:
    got = yamlload.load("base: &b {x: [1]}\nuse: *b\n")
    assert got["use"] is got["base"]


def test_special_floats_survive() -> None:
    got = yamlload.load("n: .nan\ni: .inf\n")
    assert math.isnan(got["n"]) and got["i"] == math.inf


@pytest.mark.parametrize(
    "text",
    [
        "a: [1, 2\n",  # syntax
        "a: 1\n b: 2\n",  # indentation
        "? [1, 2]\n: unhashable key\n",
        "a: !!python/object:os.system x\n",  # not in the safe tag set
        "a: 1\n---\nb: 2\n",  # two documents where one is expected
    ],
)
def test_same_errors_as_safe_load(text: str) -> None:
    with pytest.raises(yaml.YAMLError) as expected:
        yaml.load(text, Loader=LOADER)
    with pytest.raises(yaml.YAMLError) as got:
        yamlload.load(text)
    assert type(got.value) is type(expected.value)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: 1\nwhen: !!timestamp not-a-time\n", (1, 6)),  # PyYAML: AttributeError
        ("n: [1, !!float twelve]\n", (0, 7)),  # PyYAML: ValueError
    ],
)
def test_a_bad_tagged_value_is_a_yaml_error_that_says_where(
    text: str, where: tuple[int, int]
) -> None:
    with pytest.raises(Exception) as plain:  # what PyYAML itself does
        yaml.load(text, Loader=LOADER)
    assert not isinstance(plain.value, yaml.YAMLError)
    with pytest.raises(yaml.YAMLError) as got:
        yamlload.load(text)
    mark = got.value.problem_mark  # type: ignore[attr-defined]
    assert (mark.line, mark.column) == where
    assert "cannot read tag:yaml.org,2002:" in str(got.value)


def test_a_bad_value_on_the_slow_path_is_a_yaml_error_too() -> None:
    with pytest.raises(yaml.YAMLError, match="cannot read a value"):
        yamlload.load("b: &b {x: 1}\nm: {<<: *b, t: !!timestamp nope}\n")


def _types(value: object) -> object:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__
