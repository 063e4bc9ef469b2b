"""The PostgreSQL engine: agentd's state in a database that several nodes share.

``engine`` (``PostgresStore``, the port's implementation), ``statements`` (what the
statement mixins for the ledger and alerts use of it), and ``retention`` (pruning by
the rules of ``agentd.state.retention``: one node at a time, each node its own
workspaces). psycopg is imported here and nowhere else in agentd (``make lint`` holds
that line).
"""
