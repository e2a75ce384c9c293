"""`migrate` SIGKILLed at random points and rerun, with and without --state, while producers keep
pushing jobs to the source and consumers keep popping them from the target (and, for --move, from
the source too): every job pushed is consumed or left exactly once (tests/migrate_chaos.py).
Bounded for CI (8 kills per scenario); scripts/migrate_soak.py runs it for as long as you like.
Reproduce a failure with MIGRATE_CHAOS_SEED=<the seed in the message>."""

import os
import random
import shutil

import pytest

from migrate_chaos import scenario
from proxy.embedded import start_server

SEED = int(os.environ.get("MIGRATE_CHAOS_SEED", random.randrange(1 << 30)))


@pytest.fixture(scope="module")
def two_servers():
    kind = "redis" if shutil.which("redis-server") else "valkey"
    a, b = start_server(kind), start_server(kind)
    yield a, b
    a.stop()
    b.stop()


@pytest.mark.parametrize("kind, where, dbs", [
    ("move", "same server", (1, 2)),
    ("move", "across servers", (3, 4)),
    ("copy-then-move", "same server", (5, 6)),
    ("copy-then-move", "across servers", (7, 8)),
])
def test_killed_and_rerun_migrate_neither_duplicates_nor_loses(two_servers, tmp_path, kind, where, dbs):
    a, b = two_servers
    src = f"redis://127.0.0.1:{a.port}/{dbs[0]}"
    dst = f"redis://127.0.0.1:{(a if where == 'same server' else b).port}/{dbs[1]}"
    r = scenario(src, dst, kind, rounds=8, state_dir=str(tmp_path), seed=SEED)
    print(f"{kind} {where}: {r}")
    why = f"seed {SEED}: {r}"
    assert r["duplicates"] == 0 and r["losses"] == 0, why
    assert r["pushed"] > 10_000 and r["kills"] >= 4, why  # it was really killed, under load
    assert r["in flight"] == 0 and r["applied marks"] == 0, why
    assert r["final"][-1] == "verify: 0 difference(s)", why
