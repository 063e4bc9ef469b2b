"""agentd's state layer: the port (``agentd.state.port``: the verbs, records, errors and
unit of work that everything above it uses), the schema defined once
(``agentd.state.schema``), retention's engine-neutral policy (``agentd.state.retention``),
and the engines behind the port (``agentd.state.sqlite``, the embedded default, and
``agentd.state.postgres``).

Nothing above this package imports an engine except ``daemon``, which chooses one, and
the CLI's read paths, which open one read-only; ``make lint`` holds that line.
"""
