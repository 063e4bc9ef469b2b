"""The SQLite engine: agentd's embedded, zero-setup state (one file under ``state_dir``,
WAL mode, ``synchronous=FULL``).

``engine`` (``SqliteStore``, the port's implementation, with the SQL of ``ledger`` and
``alerts``), ``migrations`` (the schema's history), ``statedir`` (the state dir, its
lock, and the checks of its files before anything opens them), ``retention`` (pruning,
in its own thread and connection, by the rules of ``agentd.state.retention``). Import
the submodule you need: the CLI's read paths load ``statedir`` alone.
"""
