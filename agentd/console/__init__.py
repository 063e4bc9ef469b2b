"""The web console served at ``/ui`` (``daemon.http.console``); see ``agentd.console.app``."""

from agentd.console.app import Console

__all__ = ["Console"]
