#!/usr/bin/env python3
"""Cluster figures (issue 15 item 7): `redis-benchmark --cluster` straight at a three-primary
Redis Cluster, and redis-benchmark through keyspace-proxy's pinned and spread routes on the same
cluster, side by side in the same run.

    python bench/cluster.py                    # 3 interleaved rounds, prints a Markdown block
    python bench/cluster.py --rounds 3 --write # ... and puts it in docs/benchmarks.md
    python bench/cluster.py --quick            # a few seconds, figures meaningless

Needs redis-server and redis-benchmark (Debian's redis-server / redis-tools) and redis-py.
Starts a cluster of three primaries without replicas (tests/cluster_helpers.py, the
harness the tests use: Debian's redis-server, slots split evenly) and one proxy (shared
upstream mode, admin port off, C hot path when compiled) with four listeners: three routes
pinned to one namespace each (`slot = "pinned"`), the three namespaces chosen so that
each primary owns one, and one spread route (a namespace, not pinned: every key to the owner
of its own slot). Four targets, interleaved in every round:

- `direct --cluster`: redis-benchmark --cluster, its keys spread over every slot;
- `proxy, 3 namespaces`: one redis-benchmark per listener, so the load is spread over the
  three primaries the way pinning spreads apps (one namespace per app);
- `proxy, 1 namespace`: all at one listener: one pinned namespace is one slot, so all of
  it lands on one primary (the pinning trade-off);
- `proxy, spread route`: all at the spread listener: keys over every slot, as with
  `--cluster`, the proxy choosing each key's node (per-node shared links, Python path).

Every target runs three redis-benchmark processes at once, each with a third of the
clients and requests (so the load generator costs the same everywhere), and adds their
requests/s.

Per phase: requests per second (mean of the SET and GET tests), and CPU microseconds per
request of the proxy and of the three redis-servers together (utime+stime from /proc
around each run). Medians over rounds.

--write replaces the block between `<!-- notes: cluster -->` and `<!-- /notes: cluster -->`
in docs/benchmarks.md (bench/run.py keeps such blocks when it rewrites the file), or
appends one.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/run.py
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the cluster harness the tests use

from cluster_helpers import start_cluster  # noqa: E402
from proxy.cluster import key_slot  # noqa: E402
from proxy.embedded import free_port  # noqa: E402
import run  # noqa: E402

DOC = os.path.join(ROOT, "docs", "benchmarks.md")


cpu_seconds = run.cpu_seconds


def namespace_on(cluster, node, base: str) -> str:
    """A namespace whose slot `node` owns (the slots given at start)."""
    ranges = cluster.ranges[node.id]
    for i in range(100000):
        ns = f"{base}{i}"
        s = key_slot(ns.encode())
        if any(lo <= s <= hi for lo, hi in ranges):
            return ns
    raise SystemExit("no namespace found")


def start_proxy(config: str, listeners: int, tmp: str) -> subprocess.Popen:
    path = os.path.join(tmp, "proxy.toml")
    with open(path, "w") as f:
        f.write(config)
    log_path = os.path.join(tmp, "proxy.log")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("REDIS_URL", None)
    log = open(log_path, "w")
    p = subprocess.Popen([sys.executable, "-m", "proxy", "--config", path], stdout=log, stderr=subprocess.STDOUT,
                         env=env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"proxy exited: {open(log_path).read()}")
        if open(log_path).read().count("listening on") >= listeners:
            return p
        time.sleep(0.05)
    p.kill()
    raise SystemExit(f"proxy did not start: {open(log_path).read()}")


def bench_argv(port: int, clients: int, pipeline: int, n: int, cluster: bool) -> list[str]:
    return ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-P", str(pipeline),
            "-n", str(n), "-t", "set,get", "-r", "100000", "--csv"] + (["--cluster"] if cluster else [])


def parse(p: subprocess.CompletedProcess | tuple) -> dict[str, float]:
    out, err, code = p
    if code != 0:
        raise SystemExit(f"redis-benchmark failed: {err or out}")
    rows = {}
    lines = [ln for ln in out.splitlines() if ln.startswith('"')]
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        rows[rec["test"].split()[0].lower()] = float(rec["rps"])
    if set(rows) != {"set", "get"}:
        raise SystemExit(f"cannot read redis-benchmark's output: {out[-500:]}")
    return rows


def run_all(argvs: list[list[str]]) -> list[dict[str, float]]:
    """Run the redis-benchmark processes at once; each one's rps per test."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=900)
        out.append(parse((o, e, p.returncode)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100_000, help="per test (SET, GET) and phase at -P 1")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="put the block in docs/benchmarks.md")
    a = ap.parse_args()
    n = 3000 if a.quick else a.requests
    rounds = 1 if a.quick else a.rounds
    phases = [("-c 48 -P 1", 48, 1, n), ("-c 48 -P 16", 48, 16, 4 * n)]
    tmp = tempfile.mkdtemp(prefix="ksp-cluster-bench-")
    cluster = start_cluster("redis", replicas_per_primary=0)
    proc = None
    try:
        seeds = ",".join(f"{p.host}:{p.port}" for p in cluster.primaries)
        namespaces = [namespace_on(cluster, p, f"bench{i}x") for i, p in enumerate(cluster.primaries)]
        ports = [free_port() for _ in namespaces]
        spread_port = free_port()
        config = f'upstream = "redis+cluster://{seeds}"\n' + "".join(
            f'[[listener]]\nlisten = "127.0.0.1:{port}"\nnamespace = "{ns}"\nslot = "pinned"\n'
            for ns, port in zip(namespaces, ports)) + \
            f'[[listener]]\nlisten = "127.0.0.1:{spread_port}"\nnamespace = "benchspread"\n'
        proc = start_proxy(config, len(ports) + 1, tmp)
        servers = [p.server.process.pid for p in cluster.primaries]
        first = cluster.primaries[0].port

        def targets(c, pl, reqs):
            # every target: three redis-benchmark processes at once, a third of the clients and
            # requests each, so the load generator costs the same (one process is one core at most)
            yield "direct --cluster", [bench_argv(first, c // 3, pl, reqs // 3, True)] * 3, False
            yield "proxy, 3 namespaces", [bench_argv(port, c // 3, pl, reqs // 3, False) for port in ports], True
            yield "proxy, 1 namespace", [bench_argv(ports[0], c // 3, pl, reqs // 3, False)] * 3, True
            yield "proxy, spread route", [bench_argv(spread_port, c // 3, pl, reqs // 3, False)] * 3, True

        results: dict[tuple, list[dict]] = {}
        started = time.time()
        for rnd in range(rounds):
            for phase, c, pl, reqs in phases:
                for name, argvs, via in targets(c, pl, reqs):
                    c0 = cpu_seconds(proc.pid)
                    s0 = sum(cpu_seconds(pid) for pid in servers)
                    got = run_all(argvs)
                    c1 = cpu_seconds(proc.pid)
                    s1 = sum(cpu_seconds(pid) for pid in servers)
                    sent = 2 * sum(int(x[x.index("-n") + 1]) for x in argvs)
                    results.setdefault((phase, name), []).append({
                        "rps": statistics.mean(sum(g[t] for g in got) for t in ("set", "get")),
                        "proxy_us": (c1 - c0) / sent * 1e6 if via else None,
                        "server_us": (s1 - s0) / sent * 1e6})
            print(f"round {rnd + 1}/{rounds} done", file=sys.stderr)
        elapsed = time.time() - started
        spread = {ns: cluster.primary_for(key_slot(ns.encode())).port for ns in namespaces}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        cluster.stop()

    def med(phase, name, key):
        return statistics.median(r[key] for r in results[(phase, name)])

    def ratio(phase, key, num, den):
        """Median of the per-round ratios, with their range."""
        rs = [x[key] / y[key] for x, y in zip(results[(phase, num)], results[(phase, den)]) if y[key]]
        return f"{statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})"

    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    cpus = os.cpu_count()
    cmd = f"python bench/cluster.py --rounds {rounds} --requests {a.requests}" + (" --quick" if a.quick else "")
    lines = ["<!-- notes: cluster -->", "## Redis Cluster: pinned and spread routes through the proxy against redis-benchmark "
             "--cluster (bench/cluster.py)", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{cmd}`: {rounds} interleaved "
             f"round(s), {elapsed:.0f} s; a cluster of three redis-server {version} primaries (no replicas, slots "
             f"split evenly), `-t set,get -r 100000`, values 3 bytes, {phases[0][3]:,} requests per test at -P 1 "
             f"and {phases[1][3]:,} at -P 16. **A shared {cpus}-CPU machine: load average at the end {load}**; "
             "redis-benchmark, the proxy and the three redis-servers all run on it, so the requests/s are a "
             "same-run comparison, not capacity figures. The proxy: one process, shared upstream mode, admin port "
             "off, three listeners each pinned to a namespace owned by another primary and one spread route "
             f"({', '.join(f'`{ns}` on :{port}' for ns, port in spread.items())}). Every target is three "
             "redis-benchmark processes at once, 16 clients and a third of the requests each, their requests/s "
             "added: `direct --cluster` (each with `--cluster`, keys over every slot), `proxy, 3 namespaces` "
             "(one process per listener, so one namespace per primary), `proxy, 1 namespace` (all three at one "
             "listener, so all the load on one primary), `proxy, spread route` (all three at the spread "
             "listener: every key to its own slot's owner, as `--cluster` does). CPU per request: the proxy's, and the three "
             "redis-servers' together, over the requests sent. Medians over rounds.", "",
             "| phase | target | requests/s | proxy CPU µs/req | redis-servers CPU µs/req |",
             "|---|---|---:|---:|---:|"]
    names = ["direct --cluster", "proxy, 3 namespaces", "proxy, 1 namespace", "proxy, spread route"]
    for phase, *_ in phases:
        for name in names:
            proxy_us = "" if name.startswith("direct") else f"{med(phase, name, 'proxy_us'):.2f}"
            lines.append(f"| {phase} | {name} | {med(phase, name, 'rps'):,.0f} | {proxy_us} | "
                         f"{med(phase, name, 'server_us'):.2f} |")
    lines += ["", "Same-run ratios of requests/s (median of per-round ratios, min-max in brackets):", "",
              "| phase | proxy, 3 namespaces / direct --cluster | proxy, 1 namespace / direct --cluster | "
              "proxy, spread route / direct --cluster |",
              "|---|---:|---:|---:|"]
    for phase, *_ in phases:
        lines.append(f"| {phase} | {ratio(phase, 'rps', names[1], names[0])} | "
                     f"{ratio(phase, 'rps', names[2], names[0])} | {ratio(phase, 'rps', names[3], names[0])} |")
    lines += ["", "How to read it: the proxy adds a hop, so its CPU per request is the cost of the pinned "
              "route (the proxy is one process: `--workers N` spreads it over cores); the redis-servers' CPU per "
              "request is lower through the proxy because its shared link carries many clients' requests in one "
              "read and one write (Redis's own per-request cost is mostly system calls). With three primaries, "
              "three load generators and the proxy on the CPUs of one machine, requests/s says which setup got "
              "more of the machine in that moment; the CPU columns are steadier."]
    lines.append("<!-- /notes: cluster -->")
    block = "\n".join(lines)
    print(block)
    if a.write:
        run.write_notes(DOC, "cluster", block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
