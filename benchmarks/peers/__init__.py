"""Peer programs (APScheduler, huey) and the helpers they share.

These modules run inside the peers' own virtualenvs, so they import only the standard
library, the peer under test and ``benchmarks.peers.common``.
"""
