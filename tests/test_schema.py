"""The schema defined once (``agentd.state.schema``) is the schema SQLite's migrations end
at, a DB created from it is the same DB, it compiles for PostgreSQL, and the port's
records have exactly its columns. Real SQLite files; no PostgreSQL server needed."""

from __future__ import annotations

import re
import sqlite3
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateIndex, CreateTable, DefaultClause

from agentd.state import port
from agentd.state.schema import metadata
from agentd.state.sqlite.engine import SqliteStore
from agentd.state.sqlite.migrations import SCHEMA_VERSION

# ---------------------------------------------------------------- one shape for both sides


@dataclass(frozen=True)
class ColumnShape:
    affinity: str
    notnull: bool
    default: str | None
    """The default's SQL text as SQLite keeps it (``0``, ``'{}'``), or None."""
    pk: int
    """Position in the primary key (1-based), 0 if not in it."""


@dataclass(frozen=True)
class TableShape:
    columns: dict[str, ColumnShape]  # in declared order
    foreign_keys: frozenset[tuple[str, str, str, str, str]]
    """(column, referred table, referred column, on update, on delete)."""
    rowid_key: bool
    """The key is one column declared exactly INTEGER: SQLite's rowid."""
    autoincrement: bool


@dataclass(frozen=True)
class IndexShape:
    table: str
    columns: tuple[str, ...]
    unique: bool
    where: str | None
    """A partial index's predicate, normalized (``_norm``)."""


@dataclass(frozen=True)
class Shape:
    tables: dict[str, TableShape]
    indexes: dict[str, IndexShape]


def affinity(declared: str) -> str:
    """SQLite's rules for a declared type's affinity ("Datatypes In SQLite", 3.1)."""
    t = declared.upper()
    if "INT" in t:
        return "INTEGER"
    if any(s in t for s in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in t or not t:
        return "BLOB"
    if any(s in t for s in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _norm(predicate: str) -> str:
    return re.sub(r"\s+", "", predicate).replace('"', "").lower()


def _where_of(ddl: str) -> str | None:
    m = re.search(r"\bWHERE\b(.*)$", ddl, re.IGNORECASE | re.DOTALL)
    return _norm(m.group(1)) if m else None


def shape_of_db(path: Path) -> Shape:
    """What a real SQLite file holds, read from sqlite_master and the pragmas."""
    conn = sqlite3.connect(path)
    try:
        tables: dict[str, TableShape] = {}
        indexes: dict[str, IndexShape] = {}
        for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        ):
            info = conn.execute(f'PRAGMA table_info("{name}")').fetchall()
            keys = [row for row in info if row[5]]
            tables[name] = TableShape(
                columns={
                    col: ColumnShape(
                        affinity=affinity(declared),
                        # SQLite lets a key column other than the rowid hold NULL (a legacy
                        # quirk); the schema and every other engine make keys NOT NULL, and
                        # agentd never writes a NULL key. Compare keys as NOT NULL.
                        notnull=bool(notnull) or pk > 0,
                        default=default,
                        pk=pk,
                    )
                    for _, col, declared, notnull, default, pk in info
                },
                foreign_keys=frozenset(
                    (fk[3], fk[2], fk[4], fk[5], fk[6])
                    for fk in conn.execute(f'PRAGMA foreign_key_list("{name}")')
                ),
                rowid_key=len(keys) == 1 and keys[0][2].upper() == "INTEGER",
                autoincrement=re.search(r"\bAUTOINCREMENT\b", sql, re.IGNORECASE) is not None,
            )
            for _, index, unique, _origin, _partial in conn.execute(f'PRAGMA index_list("{name}")'):
                if index.startswith("sqlite_autoindex_"):  # a key's own index
                    continue
                (ddl,) = conn.execute(
                    "SELECT sql FROM sqlite_master WHERE type='index' AND name=?", (index,)
                ).fetchone()
                cols = conn.execute(f'PRAGMA index_info("{index}")').fetchall()
                indexes[index] = IndexShape(
                    table=name,
                    columns=tuple(c[2] for c in sorted(cols)),
                    unique=bool(unique),
                    where=_where_of(ddl),
                )
        return Shape(tables, indexes)
    finally:
        conn.close()


_SQLITE = sqlite.dialect()


def _default_sql(column: sqlalchemy.Column[Any]) -> str | None:
    default = column.server_default
    if not isinstance(default, DefaultClause):  # None, or an Identity: no DEFAULT clause
        return None
    arg = default.arg
    if isinstance(arg, str):
        return "'" + arg.replace("'", "''") + "'"
    return str(arg.compile(dialect=_SQLITE))  # a text(): its SQL as written


def shape_of_metadata(md: sqlalchemy.MetaData) -> Shape:
    """What ``schema.metadata`` declares, in the same terms (types as the SQLite dialect
    declares them)."""
    tables: dict[str, TableShape] = {}
    indexes: dict[str, IndexShape] = {}
    for name, table in md.tables.items():
        keys = list(table.primary_key.columns)
        tables[name] = TableShape(
            columns={
                col.name: ColumnShape(
                    affinity=affinity(col.type.compile(dialect=_SQLITE)),
                    notnull=not col.nullable or col.primary_key,
                    default=_default_sql(col),
                    pk=keys.index(col) + 1 if col in keys else 0,
                )
                for col in table.columns
            },
            foreign_keys=frozenset(
                (
                    fk.parent.name,
                    fk.column.table.name,
                    fk.column.name,
                    fk.onupdate or "NO ACTION",
                    fk.ondelete or "NO ACTION",
                )
                for fk in table.foreign_keys
            ),
            rowid_key=len(keys) == 1 and keys[0].type.compile(dialect=_SQLITE) == "INTEGER",
            autoincrement=bool(table.dialect_options["sqlite"]["autoincrement"]),
        )
        for index in table.indexes:
            assert index.name is not None
            indexes[index.name] = IndexShape(
                table=name,
                columns=tuple(c.name for c in index.columns),
                unique=bool(index.unique),
                where=_where_of(str(CreateIndex(index).compile(dialect=_SQLITE))),
            )
    return Shape(tables, indexes)


def differences(a: Shape, b: Shape, a_name: str, b_name: str) -> list[str]:
    """Every way ``a`` and ``b`` differ, each naming its table and column or index."""
    out: list[str] = []

    def only(kind: str, names: set[str], where: str, not_where: str) -> None:
        out.extend(f"{kind} {n}: in {where}, not in {not_where}" for n in sorted(names))

    only("table", a.tables.keys() - b.tables.keys(), a_name, b_name)
    only("table", b.tables.keys() - a.tables.keys(), b_name, a_name)
    for name in sorted(a.tables.keys() & b.tables.keys()):
        ta, tb = a.tables[name], b.tables[name]
        only("column", {f"{name}.{c}" for c in ta.columns.keys() - tb.columns}, a_name, b_name)
        only("column", {f"{name}.{c}" for c in tb.columns.keys() - ta.columns}, b_name, a_name)
        for col in ta.columns.keys() & tb.columns.keys():
            ca, cb = ta.columns[col], tb.columns[col]
            for field in ("affinity", "notnull", "default", "pk"):
                va, vb = getattr(ca, field), getattr(cb, field)
                if va != vb:
                    out.append(
                        f"column {name}.{col}: {field} {va!r} in {a_name}, {vb!r} in {b_name}"
                    )
        common = [c for c in ta.columns if c in tb.columns]
        if common != [c for c in tb.columns if c in ta.columns]:
            out.append(
                f"table {name}: column order {list(ta.columns)} in {a_name}, "
                f"{list(tb.columns)} in {b_name}"
            )
        for field in ("foreign_keys", "rowid_key", "autoincrement"):
            va, vb = getattr(ta, field), getattr(tb, field)
            if va != vb:
                out.append(f"table {name}: {field} {va!r} in {a_name}, {vb!r} in {b_name}")
    only("index", a.indexes.keys() - b.indexes.keys(), a_name, b_name)
    only("index", b.indexes.keys() - a.indexes.keys(), b_name, a_name)
    for index in sorted(a.indexes.keys() & b.indexes.keys()):
        if a.indexes[index] != b.indexes[index]:
            out.append(
                f"index {index}: {a.indexes[index]} in {a_name}, {b.indexes[index]} in {b_name}"
            )
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def migrated(tmp_path: Path) -> Path:
    """A state DB migrated from nothing by the SQLite engine."""
    path = tmp_path / "migrated.sqlite"
    SqliteStore(path).close()
    return path


@pytest.fixture
def created(tmp_path: Path) -> Path:
    """A state DB created from ``schema.metadata`` alone, as a new engine would."""
    path = tmp_path / "created.sqlite"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()
    return path


# ---------------------------------------------------------------- the tests


def test_migrated_db_is_the_schema(migrated: Path) -> None:
    conn = sqlite3.connect(migrated)
    try:
        (version,) = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    finally:
        conn.close()
    assert int(version) == SCHEMA_VERSION
    problems = differences(
        shape_of_metadata(metadata), shape_of_db(migrated), "schema.py", "the migrated DB"
    )
    assert not problems, "\n".join(problems)


def test_db_created_from_the_schema_is_the_migrated_db(migrated: Path, created: Path) -> None:
    problems = differences(
        shape_of_db(created), shape_of_db(migrated), "the created DB", "the migrated DB"
    )
    assert not problems, "\n".join(problems)


def test_the_comparison_sees_a_difference(migrated: Path) -> None:
    """The comparison is not vacuous: a column schema.py lacks and an index that differs
    are each named."""
    conn = sqlite3.connect(migrated)
    try:
        conn.execute("ALTER TABLE runs ADD COLUMN extra TEXT")
        conn.execute("DROP INDEX idx_runs_due")
        conn.execute("CREATE INDEX idx_runs_due ON runs(not_before) WHERE status='queued'")
        conn.commit()
    finally:
        conn.close()
    problems = differences(
        shape_of_metadata(metadata), shape_of_db(migrated), "schema.py", "the migrated DB"
    )
    assert "column runs.extra: in the migrated DB, not in schema.py" in problems
    assert any(p.startswith("index idx_runs_due:") for p in problems), problems


def test_the_ddl_compiles_for_postgresql() -> None:
    pg = postgresql.dialect()  # compiling needs no server and no driver
    for table in metadata.sorted_tables:
        ddl = str(CreateTable(table).compile(dialect=pg))
        if table.c.get("id") is not None and table.c.id.identity is not None:
            assert re.search(r"\bid BIGINT GENERATED BY DEFAULT AS IDENTITY\b", ddl), ddl
        for index in table.indexes:
            index_ddl = str(CreateIndex(index).compile(dialect=pg))
            sqlite_ddl = str(CreateIndex(index).compile(dialect=_SQLITE))
            # A partial index is partial on every engine, with the same predicate.
            assert _where_of(index_ddl) == _where_of(sqlite_ddl), (index.name, index_ddl)
            assert index_ddl.startswith("CREATE UNIQUE INDEX" if index.unique else "CREATE INDEX")


RECORDS: list[tuple[type[Any], str, bool]] = [
    (port.RunRecord, "runs", False),
    (port.ClaimedRun, "runs", True),
    (port.AttemptRecord, "attempts", False),
    (port.TaskRecord, "tasks", False),
    (port.EventRecord, "events", False),
    (port.QuarantineRecord, "quarantine", False),
    (port.NodeRecord, "nodes", False),
]


@pytest.mark.parametrize(
    ("record", "table", "subset"), RECORDS, ids=lambda x: getattr(x, "__name__", x)
)
def test_records_have_their_tables_columns(record: type[Any], table: str, subset: bool) -> None:
    """Each record has exactly its table's columns (ClaimedRun: some of them), each of
    the column's Python type (a JSON column: its decoded value), never None where the
    column is NOT NULL."""
    hints = typing.get_type_hints(record)
    columns = metadata.tables[table].columns
    extra = sorted(hints.keys() - columns.keys())
    missing = [] if subset else sorted(columns.keys() - hints.keys())
    assert not extra, f"{record.__name__} has fields {extra} that {table} has no column for"
    assert not missing, f"{record.__name__} lacks {table}'s columns {missing}"
    for field, hint in hints.items():
        column = columns[field]
        args = (
            typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType)
            else (hint,)
        )
        optional = type(None) in args
        (base,) = [a for a in args if a is not type(None)]
        if (not column.nullable or column.primary_key) and optional:
            raise AssertionError(
                f"{record.__name__}.{field} may be None; {table}.{field} is NOT NULL"
            )
        if not column.info.get("json"):
            assert base is column.type.python_type, (
                f"{record.__name__}.{field} is {base}; {table}.{field} holds "
                f"{column.type.python_type}"
            )
