"""The node registry through the port: who has opened this state, what they run, and
who is alive (a node not seen within its staleness window is not)."""

from __future__ import annotations

from agentd.clock import to_iso
from agentd.state.port import Store

from .helpers import at


def _seen(store: Store, node: str, seconds: float, generation: str = "g1") -> None:
    store.node_seen(
        node, at(seconds), host="host-" + node, pid=100, version="0.1.0",
        config_generation=generation,
    )  # fmt: skip


def test_a_node_is_registered_when_first_seen_and_then_only_refreshed(store: Store) -> None:
    _seen(store, "n1", 0)
    _seen(store, "n1", 5, generation="g2")
    [node] = store.nodes()
    assert node["id"] == "n1" and node["host"] == "host-n1" and node["pid"] == 100
    assert node["started_at"] == to_iso(at(0))  # the first time it was seen
    assert node["last_seen"] == to_iso(at(5))
    assert node["config_generation"] == "g2"  # a reload is visible
    assert node["stopped_at"] is None


def test_live_nodes_are_those_seen_recently_and_not_stopped(
    store: Store, second_store: Store
) -> None:
    _seen(store, "n1", 0)
    _seen(second_store, "n2", 20)
    _seen(second_store, "n3", 25)
    second_store.node_stopped("n3", at(26))
    assert store.live_nodes(at(30), 15) == {"n2"}  # n1 is stale, n3 stopped
    assert [n["id"] for n in store.nodes()] == ["n3", "n2", "n1"]
    stopped = next(n for n in store.nodes() if n["id"] == "n3")
    assert stopped["stopped_at"] == to_iso(at(26))


def test_a_stopped_node_seen_again_is_alive_again(store: Store) -> None:
    _seen(store, "n1", 0)
    store.node_stopped("n1", at(1))
    _seen(store, "n1", 2)
    assert store.live_nodes(at(3), 15) == {"n1"}
    assert store.nodes()[0]["stopped_at"] is None


def test_nodes_last_seen_long_ago_are_forgotten(store: Store) -> None:
    _seen(store, "old-dead", 0)
    _seen(store, "old-stopped", 1)
    store.node_stopped("old-stopped", at(2))
    _seen(store, "recent", 50)
    assert store.forget_nodes(at(10)) == 2
    assert [n["id"] for n in store.nodes()] == ["recent"]
    assert store.forget_nodes(at(10)) == 0
