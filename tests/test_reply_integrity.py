"""Concurrent reply integrity (issue 11): many clients on one proxy, every reply checked
against a private direct connection to a reference server, every key checked for place.

The engine and what it checks are described in tests/reply_integrity.py. Here: a
bounded run per upstream mode and server kind (CLIENTS clients x STEPS steps, for the
fixed seeds and one random seed). A failure prints the seed; rerun exactly with
`INTEGRITY_SEEDS=<seed> python -m pytest 'tests/test_reply_integrity.py::test_reply_integrity[valkey-shared]'`
(the failure message gives the exact line), or shrink it
to a minimal sequence with `python scripts/integrity_soak.py --seed <seed> --rounds 1 --shrink`.
Longer runs: scripts/integrity_soak.py.
"""

from __future__ import annotations

import os
import random

import pytest
import redis

import reply_integrity as ri
from integration_helpers import proxy_toml
from proxy.embedded import free_port

CLIENTS = 12
STEPS = 200
# 529485032: UNSUBSCRIBE confirmed after a later MULTI + SELECT was queued (channel named by the
# queued SELECT's namespace); found by the random seed in CI-like runs
FIXED_SEEDS = [1, 2, 529485032]


def seeds() -> list[int]:
    given = os.environ.get("INTEGRITY_SEEDS")
    if given:
        return [int(s) for s in given.split(",")]
    return FIXED_SEEDS + [random.SystemRandom().randrange(10**9)]


@pytest.fixture(scope="module")
def reference(reference_server):
    return reference_server


class Clients:
    """redis-py clients of each db of one server, for setup and the key check."""

    def __init__(self, server):
        self.server, self.cache = server, {}

    def __call__(self, db: int) -> redis.Redis:
        if db not in self.cache:
            self.cache[db] = redis.Redis(host=self.server.host, port=self.server.port, db=db, socket_timeout=10)
        return self.cache[db]

    def close(self):
        for c in self.cache.values():
            c.close()


def report(nodeid: str, seed: int, mode: str, kind: str, failures: list[ri.Failure], problems: list[str]) -> str:
    rerun = (f"INTEGRITY_SEEDS={seed} python -m pytest '{nodeid}'"
             f"  |  python scripts/integrity_soak.py --kind {kind} --mode {mode} --seed {seed} "
             f"--clients {CLIENTS} --steps {STEPS} --rounds 1 --shrink")
    out = [f"seed {seed}, upstream mode {mode}, server {kind}: {len(failures)} of {CLIENTS} clients failed, "
           f"{len(problems)} key-placement problems"]
    for f in failures:
        out.append("  - " + f.title())
    for f in failures[:4]:
        f.mode = f"{mode}/{kind}"
        out.append(ri.format_failure(f, rerun))
    if problems:
        out.append("keys on the proxy's server not where the reference says their writer put them:")
        out += ["  " + p for p in problems[:30]]
        if len(problems) > 30:
            out.append(f"  ... and {len(problems) - 30} more")
    out.append(f"reproduce: {rerun}")
    return "\n".join(out)


def test_reply_integrity(request, server, reference, start_proxy, upstream_mode):
    port_ns, port_plain = free_port(), free_port()
    text = proxy_toml(ri.proxy_config(server.host, server.port, port_ns, port_plain))
    start_proxy(config_text=text, port=port_ns)
    ports = {"ns": port_ns, "plain": port_plain}
    s_clients, r_clients = Clients(server), Clients(reference)
    try:
        for seed in seeds():
            ri.reset_servers(s_clients, r_clients)
            seqs = [ri.generate(seed, cid, STEPS) for cid in range(CLIENTS)]
            failures = ri.run_clients(seqs, ports, reference.port)
            problems = ri.check_locations(s_clients, r_clients, list(range(CLIENTS)))
            if failures or problems:
                pytest.fail(report(request.node.nodeid, seed, upstream_mode, server.kind, failures, problems),
                            pytrace=False)
    finally:
        s_clients.close()
        r_clients.close()


def test_generator_is_deterministic_and_covers_every_family():
    """Same seed, same sequences; the bounded run exercises every family and check."""
    a = [ri.generate(7, cid, STEPS) for cid in range(CLIENTS)]
    b = [ri.generate(7, cid, STEPS) for cid in range(CLIENTS)]
    assert [(s.steps, s.batches) for s in a] == [(s.steps, s.batches) for s in b]
    families = {st.family for s in a for st in s.steps}
    assert families == set(ri.FAMILIES)
    checks = {st.check for s in a for st in s.steps}
    assert checks == set(ri.CHECKS)
    assert {s.route for s in a} == {"ns", "plain"}
    names = {st.args[0].upper() for s in a for st in s.steps}
    for must in (b"CLIENT", b"MULTI", b"WATCH", b"EXEC", b"DISCARD", b"RESET", b"HELLO", b"SELECT",
                 b"SUBSCRIBE", b"PUBLISH", b"BLPOP", b"REPLCONF", b"FLUSHALL"):
        assert must in names, must
