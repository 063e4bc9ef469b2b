"""The contract suite: one set of tests for ``agentd.state.port.Store``, run against
every engine (see ``conftest.py``)."""
