#!/usr/bin/env python3
"""Long reply-integrity run (issue 11): the engine of tests/reply_integrity.py, for minutes.

Starts its own proxy's server (notifications on, as the suite's), a separate
reference server of the same kind and a proxy (two routes, see reply_integrity),
then runs rounds of --clients concurrent clients x --steps steps, seeds --seed,
--seed+1, ... until --duration seconds or --rounds rounds are done. After every
round every key's place on the proxy's server is checked. Exit 0 when all rounds
passed, 1 on the first failing round (reported in full).

--shrink: for the first failing client, remove whole segments of its sequence while
it still fails alone on a fresh proxy, and print the minimal sequence.

    python scripts/integrity_soak.py --duration 300 --clients 32 --steps 500
    python scripts/integrity_soak.py --mode shared-python --kind redis --seed 42
    python scripts/integrity_soak.py --seed 1 --rounds 1 --clients 12 --steps 200 --shrink
    python scripts/integrity_soak.py --families plain,multi,state --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import redis  # noqa: E402

import reply_integrity as ri  # noqa: E402
from conftest import ProxyProcess  # noqa: E402
from integration_helpers import proxy_toml  # noqa: E402
from proxy.embedded import free_port, start_server  # noqa: E402


class Clients:
    def __init__(self, server):
        self.server, self.cache = server, {}

    def __call__(self, db):
        if db not in self.cache:
            self.cache[db] = redis.Redis(host=self.server.host, port=self.server.port, db=db, socket_timeout=10)
        return self.cache[db]


class Setup:
    def __init__(self, kind: str, mode: str):
        self.kind, self.mode = kind, mode
        self.server = start_server(kind, extra=["--notify-keyspace-events", "KEA"])
        self.reference = start_server(kind)
        self.s, self.r = Clients(self.server), Clients(self.reference)
        self.proxy = None
        self.start_proxy()

    def start_proxy(self):
        if self.proxy is not None:
            self.proxy.stop()
        port_ns, port_plain = free_port(), free_port()
        text = proxy_toml(ri.proxy_config(self.server.host, self.server.port, port_ns, port_plain))
        m, _, pure = self.mode.partition("-")
        self.proxy = ProxyProcess(["--upstream-mode", m], text, port_ns,
                                  env={"KEYSPACE_PROXY_PURE_PYTHON": "1"} if pure else None)
        self.ports = {"ns": port_ns, "plain": port_plain}

    def round(self, seqs, cids, reply_timeout=ri.REPLY_TIMEOUT):
        ri.reset_servers(self.s, self.r)
        failures = ri.run_clients(seqs, self.ports, self.reference.port, reply_timeout)
        problems = ri.check_locations(self.s, self.r, cids)
        return failures, problems

    def stop(self):
        if self.proxy is not None:
            self.proxy.stop()
        self.server.stop()
        self.reference.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="valkey", choices=["valkey", "redis"])
    ap.add_argument("--mode", default="shared", choices=["shared", "dedicated", "shared-python"])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500, help="steps per client per round")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds (rounds start until then)")
    ap.add_argument("--rounds", type=int, default=0, help="stop after this many rounds (0: by duration)")
    ap.add_argument("--seed", type=int, default=None, help="first round's seed (default: random)")
    ap.add_argument("--families", default=",".join(ri.FAMILIES),
                    help="comma-separated subset of: " + ",".join(ri.FAMILIES))
    ap.add_argument("--reply-timeout", type=float, default=ri.REPLY_TIMEOUT)
    ap.add_argument("--shrink", action="store_true", help="minimise the first failing client's sequence")
    ap.add_argument("--shrink-client", type=int, default=None, help="with --shrink: this client instead")
    a = ap.parse_args(argv)
    families = [f for f in a.families.split(",") if f]
    unknown = set(families) - set(ri.FAMILIES)
    if unknown:
        ap.error(f"unknown families {sorted(unknown)}")
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "big") % 10**9
    setup = Setup(a.kind, a.mode)
    print(f"reply integrity: {a.kind}, {a.mode}, {a.clients} clients x {a.steps} steps, first seed {seed}, "
          f"families {','.join(families)}", flush=True)
    t0, rounds, total = time.monotonic(), 0, 0
    try:
        while True:
            cids = list(range(a.clients))
            seqs = [ri.generate(seed, cid, a.steps, families) for cid in cids]
            t = time.monotonic()
            failures, problems = setup.round(seqs, cids, a.reply_timeout)
            rounds += 1
            total += sum(len(s.steps) for s in seqs)
            print(f"round {rounds} seed {seed}: {len(failures)} failing clients, {len(problems)} key problems "
                  f"({time.monotonic() - t:.1f}s; {total} commands so far)", flush=True)
            if failures or problems:
                rerun = (f"python scripts/integrity_soak.py --kind {a.kind} --mode {a.mode} --seed {seed} "
                         f"--clients {a.clients} --steps {a.steps} --rounds 1 --families {','.join(families)}")
                for f in failures:
                    f.mode = f"{a.mode}/{a.kind}"
                    print(ri.format_failure(f, rerun), flush=True)
                for p in problems[:50]:
                    print("  key: " + p)
                if a.shrink:
                    shrink_first(setup, failures, problems, seqs, a)
                return 1
            if a.rounds and rounds >= a.rounds:
                break
            if not a.rounds and time.monotonic() - t0 >= a.duration:
                break
            seed += 1
    finally:
        setup.stop()
    print(f"passed: {rounds} rounds, {total} commands, {time.monotonic() - t0:.0f}s")
    return 0


def shrink_first(setup: Setup, failures, problems, seqs, a) -> None:
    real = [f for f in failures if not f.what.startswith("harness")
            and (a.shrink_client is None or f.seq.cid == a.shrink_client)]
    if real:
        target = real[0]
        seq = target.seq
        if target.step is not None:  # nothing after the failing step's segment matters
            seq = ri.cut(seq, target.step)
    elif problems:
        target, seq = None, None
        for s in seqs:  # the first client whose keys are misplaced, alone
            if any(f"c{s.cid}:" in p for p in problems):
                seq = s
                break
        if seq is None:
            print("shrink: nothing to shrink")
            return
    else:
        print("shrink: only harness failures")
        return

    def still_fails(cand) -> bool:
        setup.start_proxy()  # fresh proxy per trial: a broken link must not leak into the next
        fs, ps = setup.round([cand], [cand.cid], reply_timeout=1.0)
        return any(not f.what.startswith("harness") for f in fs) or \
            any(not p.startswith("harness") for p in ps)

    print(f"shrinking client c{seq.cid}'s {len(seq.steps)} steps (one proxy per trial)...", flush=True)
    if not still_fails(seq):
        print("shrink: the client does not fail alone (needs the others' traffic); not shrunk")
        return
    small = ri.shrink(seq, still_fails)
    setup.start_proxy()
    fs, ps = setup.round([small], [small.cid], reply_timeout=1.0)
    print(f"minimal sequence for client c{small.cid} (route {small.route}); [ ] = one pipelined write:")
    i = 0
    for n in small.batches:
        print("  [" + " | ".join(st.show() for st in small.steps[i:i + n]) + "]")
        i += n
    for f in fs:
        print(ri.format_failure(f))
    for p in ps:
        print("  key: " + p)


if __name__ == "__main__":
    sys.exit(main())
