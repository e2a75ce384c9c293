#!/usr/bin/env python3
"""Long kill-and-rerun soak of `keyspace-proxy migrate` (the CI version is
tests/test_migrate_exactly_once.py): each scenario (move / copy-then-move, one server two dbs /
two servers) is run with ROUNDS SIGKILLs at random points while producers push and consumers pop;
the books (every job pushed vs consumed + left) must balance with 0 duplicates and 0 losses.

    python3 scripts/migrate_soak.py [--rounds 100] [--cycles 3] [--seed N] [--kind redis|valkey]
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from migrate_chaos import scenario  # noqa: E402
from proxy.embedded import start_server  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100, help="SIGKILLed runs per scenario and cycle")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--seed", type=int, default=random.randrange(1 << 30))
    p.add_argument("--kind", default="redis" if shutil.which("redis-server") else "valkey")
    p.add_argument("--preload", type=int, default=3000)
    a = p.parse_args()
    srv = [start_server(a.kind), start_server(a.kind)]
    totals = dict(pushed=0, kills=0, kills_in_flight=0, duplicates=0, losses=0)
    failed = False
    try:
        db = 0
        for cycle in range(a.cycles):
            for kind in ("move", "copy-then-move"):
                for where in ("same server", "across servers"):
                    db += 2
                    src = f"redis://127.0.0.1:{srv[0].port}/{db % 16}"
                    dst = f"redis://127.0.0.1:{srv[where == 'across servers'].port}/{(db + 1) % 16}"
                    started = time.monotonic()
                    r = scenario(src, dst, kind, a.rounds, tempfile.mkdtemp(), seed=a.seed + db, preload=a.preload)
                    for k in totals:
                        totals[k] += r[k]
                    ok = r["duplicates"] == r["losses"] == r["in flight"] == r["applied marks"] == 0
                    failed |= not ok
                    print(f"cycle {cycle} {kind:15} {where:15} {time.monotonic() - started:6.1f}s "
                          f"pushed {r['pushed']} consumed {r['consumed']} kills {r['kills']} "
                          f"(in flight {r['kills_in_flight']}) duplicates {r['duplicates']} losses {r['losses']}"
                          + ("" if ok else f"  FAILED {r}"), flush=True)
    finally:
        for s in srv:
            s.stop()
    print(f"seed {a.seed}: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
