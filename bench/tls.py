#!/usr/bin/env python3
"""TLS figures (issue 13): redis-benchmark --tls directly against a TLS redis-server and
through keyspace-proxy (TLS listener, rediss:// upstream), side by side in the same run,
with the plain-TCP pair as the reference.

    python bench/tls.py                    # 3 interleaved rounds, prints a Markdown block
    python bench/tls.py --rounds 5 --write # ... and puts it in docs/benchmarks.md
    python bench/tls.py --quick            # a few seconds, figures meaningless

Needs redis-server and redis-benchmark built with TLS (Debian's are) and trustme
(pip install trustme) for the certificates. Starts one redis-server with a plain port
and a TLS port, and two proxies in front of it (add mode, namespace `bench`, shared
upstream mode, admin port off, C hot path when compiled): one plain listener to a
redis:// upstream, one TLS listener to the rediss:// upstream (certificate verified
against the test CA). Four targets, interleaved in every round: direct plain, direct
TLS, proxy plain, proxy TLS. Per phase: requests per second (mean of the SET and GET
tests), p50 latency, and the CPU microseconds per request of the proxy and of
redis-server (utime+stime from /proc around each run). Medians over rounds.

--write replaces the block between `<!-- notes: tls -->` and `<!-- /notes: tls -->` in
docs/benchmarks.md (bench/run.py keeps such blocks when it rewrites the file), or appends
one.
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

from proxy.embedded import free_port, start_server  # noqa: E402
import run  # noqa: E402

DOC = os.path.join(ROOT, "docs", "benchmarks.md")


cpu_seconds = run.cpu_seconds


def make_certs(d: str) -> dict:
    import trustme
    ca = trustme.CA()
    out = {"ca": os.path.join(d, "ca.pem")}
    ca.cert_pem.write_to_path(out["ca"])
    for name in ("server", "proxy"):
        cert = ca.issue_cert("localhost", "127.0.0.1")
        out[name + "_cert"] = os.path.join(d, f"{name}.crt")
        out[name + "_key"] = os.path.join(d, f"{name}.key")
        with open(out[name + "_cert"], "wb") as f:
            for pem in cert.cert_chain_pems:
                f.write(pem.bytes())
        cert.private_key_pem.write_to_path(out[name + "_key"])
    return out


def start_proxy(args: list[str], port: int, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("REDIS_URL", None)
    log = open(log_path, "w")
    p = subprocess.Popen([sys.executable, "-m", "proxy", "--listen", f"127.0.0.1:{port}", "--namespace", "bench",
                          *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"proxy exited: {open(log_path).read()}")
        if "listening on" in open(log_path).read():
            return p
        time.sleep(0.05)
    p.kill()
    raise SystemExit(f"proxy did not start: {open(log_path).read()}")


def bench(port: int, tls: list[str], clients: int, pipeline: int, n: int) -> dict[str, dict[str, float]]:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-P", str(pipeline),
            "-n", str(n), "-t", "set,get", "-r", "100000", "--csv", *tls]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"redis-benchmark failed: {p.stderr or p.stdout}")
    rows = {}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('"')]
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        rows[rec["test"].split()[0].lower()] = {k: float(v) for k, v in rec.items() if k != "test"}
    if set(rows) != {"set", "get"}:
        raise SystemExit(f"cannot read redis-benchmark's output: {p.stdout[-500:]}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="put the block in docs/benchmarks.md")
    a = ap.parse_args()
    scale = 0.05 if a.quick else 1.0
    phases = [("-c 50 -P 1", 50, 1, int(100_000 * scale)), ("-c 50 -P 16", 50, 16, int(400_000 * scale)),
              ("latency -c 1 -P 1", 1, 1, int(20_000 * scale))]
    tmp = tempfile.mkdtemp(prefix="ksp-tls-bench-")
    certs = make_certs(tmp)
    tls_port, plain_proxy, tls_proxy = free_port(), free_port(), free_port()
    server = start_server("redis", extra=["--tls-port", str(tls_port), "--tls-cert-file", certs["server_cert"],
                                          "--tls-key-file", certs["server_key"], "--tls-ca-cert-file", certs["ca"],
                                          "--tls-auth-clients", "no"])
    procs = []
    try:
        procs.append(start_proxy(["--upstream", f"redis://127.0.0.1:{server.port}/0"], plain_proxy,
                                 os.path.join(tmp, "plain.log")))
        procs.append(start_proxy(["--upstream", f"rediss://127.0.0.1:{tls_port}/0",
                                  "--upstream-tls-ca-file", certs["ca"], "--tls-cert-file", certs["proxy_cert"],
                                  "--tls-key-file", certs["proxy_key"]], tls_proxy, os.path.join(tmp, "tls.log")))
        client_tls = ["--tls", "--cacert", certs["ca"]]
        targets = [("direct plain", server.port, [], None), ("direct TLS", tls_port, client_tls, None),
                   ("proxy plain", plain_proxy, [], procs[0]), ("proxy TLS", tls_proxy, client_tls, procs[1])]
        results: dict[tuple, list[dict]] = {}
        started = time.time()
        for rnd in range(a.rounds):
            for phase, c, pl, n in phases:
                for name, port, tls, proc in targets:
                    c0 = cpu_seconds(proc.pid) if proc else 0.0
                    s0 = cpu_seconds(server.process.pid)
                    rows = bench(port, tls, c, pl, n)
                    c1 = cpu_seconds(proc.pid) if proc else 0.0
                    s1 = cpu_seconds(server.process.pid)
                    reqs = 2 * n
                    results.setdefault((phase, name), []).append({
                        "rps": statistics.mean(r["rps"] for r in rows.values()),
                        "p50": statistics.mean(r["p50_latency_ms"] for r in rows.values()),
                        "proxy_us": (c1 - c0) / reqs * 1e6, "server_us": (s1 - s0) / reqs * 1e6})
            print(f"round {rnd + 1}/{a.rounds} done", file=sys.stderr)
        elapsed = time.time() - started
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        server.stop()

    def med(phase, name, key):
        return statistics.median(r[key] for r in results[(phase, name)])

    def ratio(phase, key, num, den):
        rounds = zip(results[(phase, num)], results[(phase, den)])
        return statistics.median(x[key] / y[key] for x, y in rounds if y[key])

    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    lines = ["<!-- notes: tls -->", "## TLS: through the proxy against direct TLS (bench/tls.py)", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `python bench/tls.py --rounds "
             f"{a.rounds}{' --quick' if a.quick else ''}`: {a.rounds} interleaved round(s), {elapsed:.0f} s; "
             f"redis-server {version}, `-t set,get -r 100000`, values 3 bytes; load average at the end {load} "
             "(the load generator, the proxies and redis-server share the machine). The proxy: add mode, "
             "shared upstream mode, admin port off; `proxy TLS` has a TLS listener and a rediss:// upstream "
             "(verified), so it decrypts and re-encrypts every request and reply. Medians over rounds.", "",
             "| phase | target | requests/s | p50 ms | proxy CPU µs/req | redis-server CPU µs/req |",
             "|---|---|---:|---:|---:|---:|"]
    for phase, *_ in phases:
        for name, *_ in targets:
            proxy_us = f"{med(phase, name, 'proxy_us'):.2f}" if name.startswith("proxy") else ""
            lines.append(f"| {phase} | {name} | {med(phase, name, 'rps'):,.0f} | {med(phase, name, 'p50'):.3f} | "
                         f"{proxy_us} | {med(phase, name, 'server_us'):.2f} |")
    lines += ["", "Same-run ratios (median of per-round ratios):", "",
              "| phase | proxy TLS / direct TLS, requests/s | proxy plain / direct plain, requests/s | "
              "proxy CPU µs/req, TLS / plain |", "|---|---:|---:|---:|"]
    for phase, *_ in phases:
        lines.append(f"| {phase} | {ratio(phase, 'rps', 'proxy TLS', 'direct TLS'):.2f} | "
                     f"{ratio(phase, 'rps', 'proxy plain', 'direct plain'):.2f} | "
                     f"{ratio(phase, 'proxy_us', 'proxy TLS', 'proxy plain'):.2f} |")
    lines += ["", "Not profiled yet: the proxy's TLS runs in uvloop's SSL layer, which drives OpenSSL through Python's `ssl.SSLObject` and memory BIOs on every read and write, in the proxy's one thread; `--workers N` spreads it over cores. Single rounds on a shared 2-core machine are noisy (compare the latency rows of the direct targets)."]
    lines.append("<!-- /notes: tls -->")
    block = "\n".join(lines)
    print(block)
    if a.write:
        run.write_notes(DOC, "tls", block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
