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
    "float: 1.5\nexp: 1e3\ninf: .inf\nneg: -.inf\ny: yes\nt: true\nnull: ~\nempty:\n",
    "when: 2026-03-29 01:30:00+01:00\nday: 2026-03-29\nbin: !!binary aGVsbG8=\n",
    "explicit: !!str 12\nset: !!set {a, b}\nomap: !!omap [{a: 1}, {b: 2}]\n",
    "1: int key\n2.5: float key\nnull: null key\nfalse: bool key\n",
    "base: &b {x: 1, y: [1, 2]}\nuse: *b\nlist: &l [a, b]\nagain: *l\n",
    "base: &b {x: 1, y: 2}\nmerged:\n  <<: *b\n  y: 3\n",
    "tasks:\n  t1: {schedule: {cron: '0 3 * * *', timezone: Europe/Berlin}, "
    "command: {argv: [echo, '${HOME}']}}\n",
    "multi: |\n  line one\n  line two\nfolded: >\n  a\n  b\n",
]


@pytest.mark.parametrize("text", DOCS)
def test_same_values_as_safe_load(text: str) -> None:
    expected = yaml.load(text, Loader=LOADER)
    got = yamlload.load(text)
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


# ---------------------------------------------------------------- what a config must not be
# Each case twice: as it is (yamlload's own walk) and with a merge key in the document,
# which sends it through PyYAML's constructor, after yamlload's check of the whole graph.

MERGE = "zz-merge: {<<: {m: 1}}\n"


@pytest.fixture(params=["fast", "pyyaml"])
def path_(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _rejected(text: str, path_: str) -> yamlload.Rejected:
    with pytest.raises(yamlload.Rejected) as info:
        yamlload.load(text + (MERGE if path_ == "pyyaml" else ""))
    return info.value


def test_the_merge_key_really_takes_the_other_path() -> None:
    assert yamlload.load("a: 1\n" + MERGE) == yaml.load("a: 1\n" + MERGE, Loader=LOADER)


def test_a_duplicate_key_names_both_lines(path_: str) -> None:
    exc = _rejected("tasks:\n  x: 1\n  y: 2\n  x: 3\n", path_)
    assert exc.path == "tasks.x"
    assert exc.message == "duplicate key 'x' at line 4 (first at line 2)"


def test_keys_equal_as_values_are_duplicates(path_: str) -> None:
    exc = _rejected("a:\n  1: one\n  true: also one\n", path_)
    assert exc.path == "a.true" and "at line 3 (first at line 2, written '1')" in exc.message


def test_a_duplicate_inside_a_sequence_says_where(path_: str) -> None:
    exc = _rejected("l:\n  - {a: 1}\n  - {b: 1, b: 2}\n", path_)
    assert exc.path == "l[1].b" and "line 3 (first at line 3)" in exc.message


def test_two_merge_keys_are_duplicates() -> None:
    exc = _rejected("b: &b {x: 1}\nm: {<<: *b, <<: *b}\n", "fast")
    assert exc.path == "m.<<" and "duplicate key '<<'" in exc.message


def test_an_alias_to_its_own_ancestor(path_: str) -> None:
    exc = _rejected("a: &x [1, {b: *x}]\n", path_)
    assert exc.path == "a[1].b" and "refers to its own ancestor" in exc.message
    assert "ancestor, the collection at line 1, column 4" in exc.message


@pytest.mark.parametrize("within", [True, False])
def test_nesting_up_to_the_limit_reads(within: bool, path_: str) -> None:
    # The top-level mapping is level 1, so `d` holds MAX_DEPTH - 1 more levels at most.
    depth = yamlload.MAX_DEPTH - 1 if within else yamlload.MAX_DEPTH
    text = "d: " + "[" * depth + "]" * depth + "\n"
    if within:
        assert yamlload.load(text + (MERGE if path_ == "pyyaml" else ""))["d"]
    else:
        exc = _rejected(text, path_)
        assert exc.path == "d" + "[0]" * (depth - 1)
        assert f"nested more than {yamlload.MAX_DEPTH} levels deep" in exc.message


def test_nesting_through_an_alias_counts_where_it_is_used(path_: str) -> None:
    half = yamlload.MAX_DEPTH // 2 + 1
    text = f"a: &a {'[' * half}{']' * half}\nb: {'[' * half}*a{']' * half}\n"
    exc = _rejected(text, path_)
    assert exc.path.startswith("b[0]") and "levels deep" in exc.message


def _laughs(levels: int, width: int = 10, scalar: str = "lol") -> str:
    lines = [f"l0: &l0 [{', '.join([scalar] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_expanded_nodes_are_counted_exactly(path_: str) -> None:
    # l_k has 1 + 10 * size(l_{k-1}) nodes; the document 1 + sum of 2 per pair - 1 + size.
    sizes = [11]
    for _ in range(1, 6):
        sizes.append(1 + 10 * sizes[-1])
    total = 1 + sum(1 + s for s in sizes)  # the root, and each pair: key + value
    assert total < yamlload.MAX_NODES
    got = yamlload.load(_laughs(6) + (MERGE if path_ == "pyyaml" else ""))
    assert got["l5"][9][9][9][9][9] == ["lol"] * 10
    assert got["l5"][0] is got["l5"][1]  # aliases are the same object, as PyYAML gives


@pytest.mark.parametrize("levels", [7, 12])
def test_a_billion_laughs_is_rejected_at_once(levels: int, path_: str) -> None:
    exc = _rejected(_laughs(levels), path_)
    assert exc.path.startswith("l6[")
    assert f"more than {yamlload.MAX_NODES:,} nodes with aliases expanded" in exc.message
    assert f"{yamlload.MAX_DEPTH} levels of nesting" in exc.message  # both limits


def test_expanded_text_is_bounded(path_: str) -> None:
    big = "x" * 100_000
    exc = _rejected(_laughs(4, scalar=big), path_)  # 1,000 copies: 100 MB. Then 1 GB.
    assert "MiB of text with aliases expanded" in exc.message


def test_an_aliased_scalar_counts_as_its_copies(path_: str) -> None:
    text = f"s: &s {'y' * 1_000_000}\nl: [{', '.join(['*s'] * 300)}]\n"
    exc = _rejected(text, path_)
    assert exc.path.startswith("l") and "MiB of text" in exc.message


def test_a_rejection_is_a_yaml_error() -> None:
    with pytest.raises(yaml.YAMLError):
        yamlload.load("a: 1\na: 2\n")
