"""The rule records: one per command, and the allowlist of what may share a connection.

These hold the overlay (proxy/overlay.py) to its own promises: every hand-written
entry names a real command and says why; only commands with exactly one reply and
no connection state are shareable; nothing that blocks, subscribes or streams is."""

from __future__ import annotations

import pytest

from proxy.overlay import OVERLAY
from proxy.rules import PIN, PLAIN, REFUSE, STATE, STREAM, RuleBook, default_rules
from proxy.session import Session

RULES = default_rules()


def test_every_overlay_entry_says_why():
    assert sorted(n for n, e in OVERLAY.items() if not e.get("why") and "reply" not in e) == []


def test_session_methods_exist():
    for name, rule in RULES.rules.items():
        if rule.session is not None:
            assert callable(getattr(Session, "_cmd_" + rule.session, None)), name


def test_shareable_is_an_allowlist():
    """PLAIN only for complete keyed commands that neither block nor subscribe, or for an
    overlay entry that says effect=PLAIN with a reason."""
    for name, rule in RULES.rules.items():
        if rule.effect != PLAIN:
            continue
        entry = OVERLAY.get(name, {})
        if entry.get("effect") == PLAIN:
            assert entry.get("why"), name
            continue
        assert rule.positions is not None, name
        assert not ({"blocking", "pubsub"} & rule.flags), name


@pytest.mark.parametrize("name", ["blpop", "brpop", "bzpopmin", "blmove", "xread", "xreadgroup", "wait",
                                  "subscribe", "psubscribe", "ssubscribe", "multi", "exec", "watch",
                                  "monitor", "replconf", "sync", "psync", "select", "hello", "reset",
                                  "auth", "client|setname", "client|tracking", "client|id", "debug"])
def test_stateful_commands_do_not_share(name):
    assert not RULES.get(name).shareable


@pytest.mark.parametrize("name", ["replconf", "sync", "psync"])
def test_replication_commands_are_refused_everywhere(name):
    rule = RULES.get(name)
    assert rule.everywhere and rule.effect == STREAM


def test_unknown_commands_fail_closed_and_pin():
    rule = RULES.get("nosuchcommand")
    assert rule.policy == REFUSE and rule.effect == PIN and not rule.known
    sub = RULES.lookup([b"CLIENT", b"NOSUCHSUB"])
    assert sub.name == "client|nosuchsub" and sub.policy == REFUSE and not sub.shareable


def test_keyed_data_commands_share():
    for name in ("get", "set", "lpush", "sadd", "zadd", "evalsha", "hset", "mget", "zrangebyscore"):
        assert RULES.get(name).shareable, name


def test_state_commands_name_their_session_method():
    for name in ("select", "hello", "reset", "client|reply", "quit"):
        assert RULES.get(name).effect == STATE and RULES.get(name).session


def test_overlay_mistakes_are_caught():
    with pytest.raises(ValueError, match="unknown fields"):
        RuleBook(overlay={"get": {"efect": PLAIN}})
    with pytest.raises(ValueError, match="bad effect"):
        RuleBook(overlay={"get": {"effect": "sometimes"}})


def test_subscription_confirmations_come_from_the_rules():
    assert RULES.confirms[b"subscribe"] == ("channel", True)
    assert RULES.confirms[b"punsubscribe"] == ("pattern", False)
    assert set(RULES.confirms) == {b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe",
                                   b"ssubscribe", b"sunsubscribe"}


def test_cluster_class_keeps_its_promise():
    """On a spread route over a cluster (proxy/spread.py) the Rule's `cluster` is the only
    classification: every rule has a valid class; a command whose keys the proxy cannot
    find is never sent to a node chosen without them; a split is only for commands whose
    every key is a whole argument (the split parts are made of them); connection state
    goes to every node, or is refused with a reason."""
    from proxy.overlay import (ANY, CLUSTER_CLASSES, EVERY, FIRST_KEY, NOT_ROUTED, SLOT, SPLIT_OK, SPLIT_SUM,
                               SPLIT_VALUES, TX)
    splits = {}
    for name, rule in RULES.rules.items():
        assert rule.cluster in CLUSTER_CLASSES, name
        if rule.cluster == NOT_ROUTED:
            assert rule.cluster_why, name
        if rule.cluster == SLOT:
            assert rule.positions is not None, name   # keys found, so the slot is theirs
        if rule.keyed and rule.positions is None:
            assert rule.cluster in (NOT_ROUTED, FIRST_KEY), name
        if not rule.keyed:
            assert rule.cluster not in (SLOT, FIRST_KEY) and not rule.cluster.startswith("split"), name
        if rule.effect == STATE:
            assert rule.cluster in (STATE, NOT_ROUTED, TX, EVERY), name
        if rule.cluster.startswith("split"):
            splits[name] = rule.cluster
        if rule.effect == PIN and rule.cluster == ANY:
            # a PIN command with no keys on some node of the cluster: nothing it needs lives on
            # the client's other node connections
            assert "blocking" not in rule.flags and "pubsub" not in rule.flags, name
    assert splits == {"mget": SPLIT_VALUES, "mset": SPLIT_OK, "del": SPLIT_SUM, "unlink": SPLIT_SUM,
                      "exists": SPLIT_SUM, "touch": SPLIT_SUM}
    for name in ("multi", "exec", "discard", "watch", "unwatch"):
        assert RULES.get(name).cluster == TX
    # the split commands' keys: every argument (MSET: every other one) from the first on
    mget, mset = RULES.get("mget"), RULES.get("mset")
    args = [b"x", b"a", b"b", b"c", b"d"]
    assert list(mget.positions(args)) == [1, 2, 3, 4] and list(mset.positions(args)) == [1, 3]
