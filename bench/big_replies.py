#!/usr/bin/env python3
"""Large replies and slow readers through keyspace-proxy (issue 11), side by side with direct Redis.

    python bench/big_replies.py                  # 3 rounds, about 2-3 minutes on 2 cores
    python bench/big_replies.py --big            # also a 512 MiB GET (needs ~3 GB of free memory)
    python bench/big_replies.py --proxy-dir . --proxy-dir /work/wt-old   # this checkout and another one
    python bench/big_replies.py --quick          # smoke check in a few seconds; figures meaningless

It starts one redis-server (`proxy.embedded.start_server("redis")`) and, for every
`--proxy-dir` (default: the checkout this script is in) and every `--modes` entry,
one keyspace-proxy (`python -m proxy ... --namespace bench --upstream-mode MODE
--metrics-listen ...`, run with PYTHONPATH and cwd set to that dir, its C hot path
as built there). Then, in interleaved rounds (direct, then each proxy in turn):

1. **Big GET**: one GET of a `--get-mb` MiB value (SET directly on Redis at the
   start), read whole on a raw socket; the seconds from sending it to the last
   byte; meanwhile a bystander process on the same route (direct: Redis; else the
   same proxy) sends PING every 10 ms and reports its slowest PING; the proxy's RSS
   is sampled (psutil) every 20 ms for its peak.
2. **Slow readers**, for each `--slow DEPTHxKIB` load (default `200x1024` and
   `64x2048`): `--slow-clients` connections each send DEPTH GETs of a KIB KiB
   value in one write and never read. The first is the issue's load (past 64
   owed replies the proxy pins a client to a connection of its own, where
   backpressure holds the rest in Redis); the second stays within 64 owed
   replies, so on a shared link its 128 MiB of replies cross the 64 MiB
   `[limits] output_limit`. A bystander
   PINGs as above; proxy and Redis RSS sampled every 20 ms. The load runs until
   RSS (proxy and Redis) is flat for 1 s (at most `--slow-hold` seconds); the
   script then reads each slow socket to see whether the target closed it (EOF
   within what the kernel buffers can hold: disconnected), closes them all and
   reads the proxy's RSS `--after` seconds later. The proxy's own count (`keyspace_proxy_errors_total{kind="output_limit"}`) is
   shown next to it when the proxy has it.

Each phase of each round starts every proxy afresh (a new process, so memory
kept from an earlier phase does not mix in). A figure is the median over rounds (slowest PING and peak RSS: median, with the
maximum over rounds in brackets); a ratio is the median of per-round ratios to
direct. `--rss-cap-mb` guards the machine: a proxy whose RSS passes it has its
slow clients closed at once (the row says "capped"); a GET slower than
`--get-timeout` is abandoned, the row says so and that proxy is restarted.

Prints markdown to stdout (and to `--out` if given). Exit 0 when the benchmark ran
(whatever the figures), 1 when something is broken, 2 when redis-server is missing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import select
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HOST = "127.0.0.1"
NAMESPACE = "bench"
MiB = 1024 * 1024


def _load_run():
    """bench/run.py's helpers (process handling, proxy start, machine info)."""
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- bystander (a child process)

def bystander_main(port: int, interval: float) -> int:
    """PING `port` every `interval` s until a line (or EOF) on stdin; print JSON with the latencies.

    A process of its own, so the GIL of the process reading the big reply never
    delays a PING."""
    s = socket.create_connection((HOST, port), timeout=300)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat: list[float] = []
    error = None

    def ping() -> float:
        t0 = time.perf_counter()
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        got = b""
        while not got.endswith(b"\r\n"):
            chunk = s.recv(64)
            if not chunk:
                raise ConnectionError("closed by the target")
            got += chunk
        if got != b"+PONG\r\n":
            raise ConnectionError(f"unexpected reply {got[:80]!r}")
        return time.perf_counter() - t0

    ping()  # connection set up (a proxy's upstream too) before we say ready
    print("ready", flush=True)
    next_at = time.perf_counter()
    while True:
        try:
            lat.append(ping())
        except OSError as e:
            error = str(e)
            break
        next_at += interval
        wait = max(0.0, next_at - time.perf_counter())
        if wait == 0.0:
            next_at = time.perf_counter()
        r, _, _ = select.select([sys.stdin], [], [], wait)
        if r:
            break
    print(json.dumps({"max": max(lat) if lat else None, "n": len(lat),
                      "p50": statistics.median(lat) if lat else None, "error": error}), flush=True)
    return 0


class Bystander:
    def __init__(self, port: int, interval: float = 0.010):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bystander", str(port),
                                   "--bystander-interval", str(interval)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        line = self.p.stdout.readline()
        if line.strip() != "ready":
            self.p.kill()
            raise RuntimeError(f"bystander on {port} did not start: {line!r} {self.p.stderr.read()[-2000:]}")

    def stop(self) -> dict:
        try:
            out, err = self.p.communicate("stop\n", timeout=300)
        except subprocess.TimeoutExpired:
            self.p.kill()
            return {"max": None, "n": 0, "error": "bystander hung"}
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"max": None, "n": 0, "error": f"bystander output {out!r} {err[-500:]!r}"}


# --------------------------------------------------------------------------- RSS sampling

class RssSampler(threading.Thread):
    """RSS of some pids every `interval` s: peak per pid and the history (for 'is it flat')."""

    def __init__(self, pids: dict[str, int | None], interval: float = 0.020):
        super().__init__(daemon=True)
        import psutil
        self.procs = {k: psutil.Process(p) for k, p in pids.items() if p}
        self.interval = interval
        self.peak = {k: 0 for k in self.procs}
        self.history: list[tuple[float, dict[str, int]]] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def sample(self) -> dict[str, int]:
        out = {}
        for k, p in self.procs.items():
            try:
                out[k] = p.memory_info().rss
            except Exception:
                out[k] = 0
        return out

    def run(self) -> None:
        while True:
            now = time.monotonic()
            s = self.sample()
            with self.lock:
                for k, v in s.items():
                    self.peak[k] = max(self.peak[k], v)
                self.history.append((now, s))
                if len(self.history) > 500:
                    del self.history[:250]
            if self.halt.wait(self.interval):
                return

    def flat_for(self, seconds: float, tol: int = 4 * MiB) -> bool:
        with self.lock:
            h = list(self.history)
        if not h or h[-1][0] - h[0][0] < seconds:
            return False
        recent = [s for t, s in h if t >= h[-1][0] - seconds]
        return all(max(s[k] for s in recent) - min(s[k] for s in recent) <= tol for k in self.procs)

    def latest(self, key: str) -> int:
        with self.lock:
            return self.history[-1][1].get(key, 0) if self.history else 0

    def stop(self) -> dict[str, int]:
        self.halt.set()
        self.join()
        return dict(self.peak)


# --------------------------------------------------------------------------- raw RESP

def command(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts += [b"$%d\r\n" % len(b), b, b"\r\n"]
    return b"".join(parts)


def simple(port: int, *args, timeout: float = 60.0) -> bytes:
    """Send one command, return the first reply line (enough for +OK / :n / +PONG)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(command(*args))
        got = b""
        while b"\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"{port} closed during {args[0]}")
            got += chunk
        return got.split(b"\r\n", 1)[0]


class GetTimeout(Exception):
    pass


def timed_get(port: int, key: str, expect: int, timeout: float) -> float:
    """GET key on a fresh connection; read the whole reply (recv_into, nothing kept); seconds."""
    buf = bytearray(4 * MiB)
    mv = memoryview(buf)
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = command("GET", key)
        t0 = time.perf_counter()
        deadline = t0 + timeout
        s.sendall(req)
        head = b""
        got = 0
        total = None
        while total is None or got < total:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise GetTimeout()
            s.settimeout(left)
            try:
                n = s.recv_into(mv)
            except socket.timeout:
                raise GetTimeout() from None
            if n == 0:
                raise ConnectionError(f"connection closed after {got} bytes of the GET reply")
            got += n
            if total is None:
                head += bytes(mv[:min(n, 64)])
                nl = head.find(b"\r\n")
                if nl >= 0:
                    if head[:1] != b"$":
                        raise ConnectionError(f"GET {key} answered {head[:200]!r}")
                    length = int(head[1:nl])
                    if length != expect:
                        raise ConnectionError(f"GET {key}: {length} bytes, expected {expect}")
                    total = nl + 2 + length + 2
        return time.perf_counter() - t0


def kernel_buffers() -> int:
    """The most a loopback connection can hold in its two socket buffers (autotuning maxima)."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                total += int(f.read().split()[2])
        except (OSError, ValueError, IndexError):
            total += 32 * MiB
    return total


def count_closed(socks: list[socket.socket], limit: float = 5.0) -> int:
    """How many of these never-read sockets the other side has closed.

    A closed connection's FIN (or RST) waits behind the replies still in the socket
    buffers, so the only way to see it is to read: a socket that reaches EOF or a
    reset within what the two kernel buffers can hold was closed by the target; one
    that delivers more than that, or goes quiet for half a second without an EOF, is
    still open."""
    cap = kernel_buffers() + MiB
    buf = bytearray(MiB)
    got = {s: 0 for s in socks}
    closed: set = set()
    live: set = set()
    for s in socks:
        s.setblocking(False)
    deadline = time.monotonic() + limit
    todo = set(socks)
    quiet_since = time.monotonic()
    while todo and time.monotonic() < deadline:
        r, _, _ = select.select(list(todo), [], [], 0.1)
        if not r:
            if time.monotonic() - quiet_since > 0.5:
                break
            continue
        quiet_since = time.monotonic()
        for s in r:
            try:
                n = s.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:
                n = 0
            if n == 0:
                closed.add(s)
                todo.discard(s)
                continue
            got[s] += n
            if got[s] > cap:
                live.add(s)
                todo.discard(s)
    return len(closed)


def metric_sum(mport: int | None, name: str, label: str) -> int | None:
    if not mport:
        return None
    try:
        with urllib.request.urlopen(f"http://{HOST}:{mport}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found, total = False, 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            found = True
            total += float(line.rsplit(None, 1)[1])
    return int(total) if found else None


def redis_clients(port: int) -> int:
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(command("INFO", "clients"))
        got = b""
        while True:
            got += s.recv(65536)
            nl = got.find(b"\r\n")
            if nl >= 0 and len(got) >= nl + 2 + int(got[1:nl]) + 2:
                break
    for line in got.decode(errors="replace").splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    return -1


# --------------------------------------------------------------------------- targets

@dataclass
class Target:
    label: str                 # "direct" or "<proxy label> shared"
    port: int
    key_prefix: str            # direct: "bench:", through a proxy: ""
    proc: object = None        # bench/run.py Proc of the proxy (None for direct)
    mport: int | None = None
    src: str | None = None
    mode: str | None = None
    get: dict = field(default_factory=dict)    # size label -> list of round results
    slow: dict = field(default_factory=dict)   # slow load label -> list of round results

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def proxy_code(d: str) -> str:
    """The last commit that changed proxy/ (or setup.py) in checkout d: what actually runs."""
    r = subprocess.run(["git", "-C", d, "log", "-1", "--format=%h %s", "--", "proxy", "setup.py"],
                       capture_output=True, text=True)
    line = r.stdout.strip()
    return (line[:90] + "...") if len(line) > 90 else (line or "unknown")


def proxy_label(d: str) -> str:
    sha = subprocess.run(["git", "-C", d, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    label = sha.stdout.strip() or os.path.basename(os.path.abspath(d))
    dirty = subprocess.run(["git", "-C", d, "status", "--porcelain", "--", "proxy"], capture_output=True, text=True)
    return label + ("+dirty" if dirty.stdout.strip() else "")


# --------------------------------------------------------------------------- phases

def run_get(t: Target, key: str, size: int, timeout: float) -> dict:
    by = Bystander(t.port)
    sampler = RssSampler({"proxy": t.pid})
    sampler.start()
    before = sampler.sample().get("proxy", 0)
    time.sleep(0.05)
    res: dict = {"before": before}
    try:
        res["seconds"] = timed_get(t.port, t.key_prefix + key, size, timeout)
    except GetTimeout:
        res["timeout"] = True
    except (OSError, ConnectionError) as e:
        res["error"] = str(e)[:200]
    res["peak"] = sampler.stop().get("proxy", 0)
    res["bystander"] = by.stop()
    return res


def run_slow(t: Target, redis_pid: int, redis_port: int, key: str, clients: int, pipeline: int,
             hold: float, after: float, rss_cap: int) -> dict:
    req = command("GET", t.key_prefix + key) * pipeline
    # errors_total{kind="output_limit"}: one per client disconnected for its output limit (exported
    # from the start, unlike closed_total's reasons); absent in a proxy without output limits
    metric = "keyspace_proxy_errors_total"
    closed0 = metric_sum(t.mport, metric, 'kind="output_limit"')
    by = Bystander(t.port)
    conns0 = redis_clients(redis_port)
    sampler = RssSampler({"proxy": t.pid, "redis": redis_pid})
    sampler.start()
    time.sleep(0.1)
    before = sampler.sample()
    socks = []
    t0 = time.monotonic()
    for _ in range(clients):
        s = socket.create_connection((HOST, t.port), timeout=10)
        s.sendall(req)
        socks.append(s)
    capped = False
    while True:
        time.sleep(0.1)
        el = time.monotonic() - t0
        if t.pid and sampler.latest("proxy") > rss_cap:
            capped = True
            break
        if el >= hold or (el >= 1.5 and sampler.flat_for(1.0)):
            break
    settle = time.monotonic() - t0
    conns = redis_clients(redis_port) - conns0
    disconnected = count_closed(socks)
    for s in socks:
        s.close()
    time.sleep(after)
    after_rss = sampler.sample()
    peak = sampler.stop()
    closed1 = metric_sum(t.mport, metric, 'kind="output_limit"')
    return {"before": before.get("proxy", 0), "peak": peak.get("proxy", 0), "after": after_rss.get("proxy", 0),
            "redis_before": before["redis"], "redis_peak": peak["redis"], "redis_after": after_rss["redis"],
            "disconnected": disconnected, "metric": None if closed0 is None or closed1 is None else closed1 - closed0,
            "bystander": by.stop(), "settle": settle, "capped": capped, "conns": conns}


# --------------------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def mb(x) -> str:
    return "-" if x is None else f"{x / MiB:,.0f}"


def ms(x) -> str:
    return "-" if x is None else (f"{x * 1000:,.0f}" if x >= 0.1 else f"{x * 1000:.1f}")


def med_max(xs, fmt) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m, hi = statistics.median(xs), max(xs)
    return fmt(m) if len(xs) == 1 or fmt(m) == fmt(hi) else f"{fmt(m)} ({fmt(hi)})"


def get_table(targets: list[Target], size_label: str, timeout: float) -> list[str]:
    direct = targets[0].get[size_label]
    lines = [f"| target | GET {size_label} s | proxy / direct | bystander slowest PING ms | "
             f"proxy RSS before MB | proxy peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in targets:
        rs = t.get.get(size_label, [])
        secs = [r.get("seconds") for r in rs]
        bad = [r for r in rs if "seconds" not in r]
        s = med(secs)
        cell = "-" if s is None else f"{s:.3f}"
        if bad:
            why = "timed out" if any(r.get("timeout") for r in bad) else bad[0].get("error", "failed")
            cell = (f">{timeout:.0f} ({why}, {len(bad)}/{len(rs)} rounds)" if any(r.get("timeout") for r in bad)
                    else f"{cell} ({len(bad)}/{len(rs)} failed: {why})")
        if t.proc is None:
            ratio = "1"
        else:
            per = [r["seconds"] / d["seconds"] for r, d in zip(rs, direct) if "seconds" in r and "seconds" in d]
            ratio = "-" if not per else f"**{statistics.median(per):.2f}**"
            if bad and any(r.get("timeout") for r in bad):
                ratio = f">{timeout / max(med([d.get('seconds') for d in direct]) or 1e-9, 1e-9):.0f}"
        by = med_max([r["bystander"].get("max") for r in rs], ms)
        berr = [r["bystander"]["error"] for r in rs if r["bystander"].get("error")]
        if berr:
            by += f" (bystander: {berr[0]})"
        before = "-" if t.proc is None else med_max([r["before"] for r in rs], mb)
        peak = "-" if t.proc is None else med_max([r["peak"] for r in rs], mb)
        lines.append(f"| {t.label} | {cell} | {ratio} | {by} | {before} | {peak} |")
    return lines


def slow_table(targets: list[Target], clients: int, load: str) -> list[str]:
    lines = [f"| target | proxy RSS before MB | proxy peak RSS MB | proxy RSS {{after}} s after MB | "
             f"slow clients disconnected (of {clients}) | bystander slowest PING ms | "
             f"Redis RSS growth MB (peak - before) | Redis connections added | load ran s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in targets:
        rs = t.slow.get(load, [])
        if not rs:
            continue
        px = t.proc is not None
        before = med_max([r["before"] for r in rs], mb) if px else "-"
        peak = med_max([r["peak"] for r in rs], mb) if px else "-"
        after = med_max([r["after"] for r in rs], mb) if px else "-"
        if any(r["capped"] for r in rs):
            peak += f" (capped in {sum(r['capped'] for r in rs)}/{len(rs)} rounds)"
        disc = med_max([r["disconnected"] for r in rs], lambda x: f"{x:.0f}")
        m = [r["metric"] for r in rs if r["metric"] is not None]
        if px:
            disc += f" (proxy counted {med_max(m, lambda x: f'{x:.0f}')})" if m else " (proxy: no output_limit count)"
        by = med_max([r["bystander"].get("max") for r in rs], ms)
        berr = [r["bystander"]["error"] for r in rs if r["bystander"].get("error")]
        if berr:
            by += f" (bystander: {berr[0]})"
        growth = med_max([r["redis_peak"] - r["redis_before"] for r in rs], mb)
        conns = med_max([r["conns"] for r in rs], lambda x: f"{x:.0f}")
        settle = med_max([r["settle"] for r in rs], lambda x: f"{x:.1f}")
        lines.append(f"| {t.label} | {before} | {peak} | {after} | {disc} | {by} | {growth} | {conns} | {settle} |")
    return lines


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Large replies and slow readers: direct Redis vs keyspace-proxy.")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke check with tiny sizes; figures meaningless")
    ap.add_argument("--get-mb", type=int, default=None, help="size of the big GET in MiB (default 64; 1 with --quick)")
    ap.add_argument("--big", action="store_true", help="also GET a 512 MiB value (not run by default)")
    ap.add_argument("--get-timeout", type=float, default=60.0, help="abandon a GET after this many seconds")
    ap.add_argument("--slow-clients", type=int, default=None, help="clients that never read (default 20; 3 quick)")
    ap.add_argument("--slow", action="append", default=None, metavar="DEPTHxKIB",
                    help="a slow-reader load: each client sends DEPTH GETs of a KIB KiB value; repeat for several "
                         "(default 200x1024 and 64x2048; 10x64 and 4x256 with --quick)")
    ap.add_argument("--slow-hold", type=float, default=None, help="longest the slow load runs, s (default 10; 0.5 quick)")
    ap.add_argument("--after", type=float, default=None, help="RSS read this long after the slow clients are "
                                                               "closed, s (default 2; 0.3 quick)")
    ap.add_argument("--rss-cap-mb", type=int, default=4096, help="close the slow clients at once if a proxy's "
                                                                 "RSS passes this (default 4096)")
    ap.add_argument("--modes", default="shared,dedicated", help="upstream modes to run (default shared,dedicated)")
    ap.add_argument("--proxy-dir", action="append", default=None, metavar="DIR",
                    help="a checkout whose proxy/ to run (PYTHONPATH and cwd = DIR, its _speedups as built there); "
                         "repeat for several; default: this script's checkout")
    ap.add_argument("--skip-get", action="store_true")
    ap.add_argument("--skip-slow", action="store_true")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--bystander", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bystander-interval", type=float, default=0.010, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bystander is not None:
        return bystander_main(args.bystander, args.bystander_interval)

    q = args.quick
    rounds = args.rounds if args.rounds is not None else (1 if q else 3)
    get_mb = args.get_mb if args.get_mb is not None else (1 if q else 64)
    clients = args.slow_clients if args.slow_clients is not None else (3 if q else 20)
    loads = []
    for spec in args.slow or (["10x64", "4x256"] if q else ["200x1024", "64x2048"]):
        try:
            depth, kib = (int(x) for x in spec.lower().split("x"))
        except ValueError:
            ap.error(f"--slow {spec}: expected DEPTHxKIB, e.g. 200x1024")
        loads.append((spec, depth, kib))
    hold = args.slow_hold if args.slow_hold is not None else (0.5 if q else 10.0)
    after = args.after if args.after is not None else (0.3 if q else 2.0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    dirs = [os.path.abspath(d) for d in (args.proxy_dir or [ROOT])]
    cmdline = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd())] +
                         (sys.argv[1:] if argv is None else argv))

    if not shutil.which("redis-server"):
        print("bench/big_replies.py: redis-server is not on PATH (apt-get install redis-server)", file=sys.stderr)
        return 2
    for d in dirs:
        if not os.path.isfile(os.path.join(d, "proxy", "__main__.py")):
            ap.error(f"--proxy-dir {d}: no proxy/ package there")

    br = _load_run()
    from proxy.embedded import ServerStartError, free_port, start_server

    sizes = [(f"{get_mb} MiB", get_mb * MiB)] + ([("512 MiB", 512 * MiB)] if args.big else [])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="ksp-bigbench-")
    redis = None
    targets: list[Target] = []
    hot: list[str] = []

    def start_proxy(t: Target) -> None:
        if t.proc is not None:
            t.proc.process.kill()
            t.proc.process.wait(10)
        mport = free_port()
        proc, _ = br.start_keyspace_proxy(redis.port, tmp, ["--upstream-mode", t.mode,
                                                             "--metrics-listen", f"{HOST}:{mport}"], t.src)
        t.proc, t.port, t.mport = proc, proc.port, mport

    def fresh() -> None:
        """Every proxy measurement starts from a new process: memory a proxy kept from
        the previous phase (the allocator need not give it back) would hide this one's."""
        for t in targets:
            if t.proc is not None:
                start_proxy(t)

    try:
        try:
            redis = start_server("redis")  # no persistence, Redis's defaults otherwise
        except ServerStartError as e:
            raise br.BenchError(f"redis-server did not start: {e}") from None
        targets.append(Target("direct", redis.port, NAMESPACE + ":"))
        for d in dirs:
            label = proxy_label(d)
            for mode in modes:
                t = Target(f"proxy {label} {mode}" if len(dirs) > 1 else f"proxy {mode}", 0, "", src=d, mode=mode)
                start_proxy(t)
                targets.append(t)
            hot.append(f"- `{d}` (HEAD {label}; proxy/ last changed in {proxy_code(d)}): "
                       f"hot path {br.hot_path(targets[-1].proc)}")

        # The values, SET directly on Redis under the namespace the proxies add.
        for label, size in sizes:
            if simple(redis.port, "SET", f"{NAMESPACE}:big{size}", b"x" * size) != b"+OK":
                raise br.BenchError(f"SET of the {label} value failed")
        for _, _, kib in loads:
            if simple(redis.port, "SET", f"{NAMESPACE}:slow{kib}", b"y" * (kib * 1024)) != b"+OK":
                raise br.BenchError("SET of the slow readers' value failed")

        for rnd in range(1, rounds + 1):
            if not args.skip_get:
                for label, size in sizes:
                    fresh()
                    for t in targets:
                        r = run_get(t, f"big{size}", size, args.get_timeout)
                        t.get.setdefault(label, []).append(r)
                        print(f"round {rnd}/{rounds} GET {label:8} {t.label:28} "
                              f"{'%.3f s' % r['seconds'] if 'seconds' in r else r.get('error', 'TIMEOUT')}; "
                              f"bystander max {ms(r['bystander'].get('max'))} ms; proxy peak {mb(r['peak'])} MB",
                              file=sys.stderr, flush=True)
                        if t.proc is not None and ("timeout" in r or not t.proc.alive()):
                            print(f"  restarting {t.label}", file=sys.stderr, flush=True)
                            start_proxy(t)
            if not args.skip_slow:
                for load, depth, kib in loads:
                    fresh()
                    for t in targets:
                        r = run_slow(t, redis.process.pid, redis.port, f"slow{kib}", clients, depth, hold, after,
                                     args.rss_cap_mb * MiB)
                        t.slow.setdefault(load, []).append(r)
                        print(f"round {rnd}/{rounds} slow {load} {t.label:28} peak {mb(r['peak'])} MB, "
                              f"after {mb(r['after'])} MB, "
                              f"disconnected {r['disconnected']} (metric {r['metric']}), bystander max "
                              f"{ms(r['bystander'].get('max'))} ms, redis +{mb(r['redis_peak'] - r['redis_before'])} MB, "
                              f"{r['settle']:.1f} s{' CAPPED' if r['capped'] else ''}", file=sys.stderr, flush=True)
            for t in targets:
                if t.proc is not None and not t.proc.alive():
                    raise br.BenchError(f"{t.label} died:\n{t.proc.log_tail()}")

        elapsed = time.monotonic() - t_start
        L = []
        if q:
            L += ["**QUICK SMOKE RUN (`--quick`): tiny sizes, 1 round; the figures mean nothing.**", ""]
        L += [f"Run {started} with `{cmdline}`: {rounds} interleaved round(s), {elapsed:.0f} s in total; "
              f"load average {' '.join(f'{x:.2f}' for x in load0)} at start, "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end.", ""]
        if not args.skip_get:
            for label, _ in sizes:
                L += [f"**GET of a {label} value** (raw socket, whole reply read; bystander PING every 10 ms "
                      f"on the same route; medians over rounds, max in brackets; ratio: median of per-round "
                      f"ratios to direct):", ""]
                L += get_table(targets, label, args.get_timeout) + [""]
        if not args.skip_slow:
            for load, depth, kib in loads:
                L += [f"**Slow readers, `{load}`**: {clients} clients each send {depth} GETs of a {kib:,} KiB value "
                      f"({depth * kib / 1024:,.0f} MiB of replies each) in one write and never read; bystander PING "
                      f"every 10 ms on the same route; RSS sampled every 20 ms (medians over rounds, max in "
                      f"brackets):", ""]
                L += [x.replace("{after}", f"{after:g}") for x in slow_table(targets, clients, load)] + [""]
        mach = [x.split("; load average at start")[0] for x in br.machine_info()]  # ours: in the run line
        L += ["Machine and versions:", ""] + mach + \
             [f"- Python {platform.python_version()}; redis-server: {redis.version}"] + hot
        text = "\n".join(L) + "\n"
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return 0
    except (br.BenchError, RuntimeError, OSError) as e:
        print(f"bench/big_replies.py: BROKEN: {e}", file=sys.stderr)
        return 1
    finally:
        for t in targets:
            if t.proc is not None:
                t.proc.stop()
        if redis:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
