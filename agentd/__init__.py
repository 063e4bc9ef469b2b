"""agentd: background agent work, scheduled and durable."""

__version__ = "0.1.0"
