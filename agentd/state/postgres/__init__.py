"""The PostgreSQL engine: agentd's state in a database that several nodes share.

``engine`` (``PostgresStore``, the port's implementation) and ``statements`` (what the
statement mixins for the ledger and alerts use of it). psycopg is imported here and
nowhere else in agentd (``make lint`` holds that line).
"""
