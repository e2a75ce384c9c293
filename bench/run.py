#!/usr/bin/env python3
"""Benchmark keyspace-proxy against direct Redis and twemproxy (issue 3).

    python bench/run.py                      # full run: 5 interleaved rounds, writes docs/benchmarks.md
    python bench/run.py --rounds 7           # more rounds
    python bench/run.py --quick --out /tmp/b.md   # smoke check, a few seconds, figures meaningless
    python bench/run.py --skip-scaling       # only the P=1 / P=16 / latency phases (faster iteration)
    python bench/run.py --proxy-args "--workers 2"   # extra arguments for `python -m proxy`
    python bench/run.py --proxy-rev HEAD     # benchmark proxy/ as committed (default: the working tree)
    python bench/run.py --baseline-rev 823b3b3   # also proxy/ as of 823b3b3, side by side: same-run ratios
    python bench/run.py --no-admin-port      # keyspace-proxy without --metrics-listen (default: on, as the image)
    python bench/run.py --no-dedicated --skip-sidekiq   # only the shared-mode redis-benchmark figures

Needs `redis-server`, `redis-benchmark` (Debian: redis-server, redis-tools) and
`nutcracker` (Debian: nutcracker) on PATH; it installs nothing and says what is
missing. It starts its own redis-server, twemproxy (nutcracker) in front of it
and keyspace-proxy (`python -m proxy`, add mode, namespace `bench`) in front of
the same server, then runs redis-benchmark against the three targets in
interleaved rounds (direct, twemproxy, keyspace-proxy, direct, twemproxy, ...)
and reads each process's CPU time from /proc/<pid>/stat around every run.
The proxy's code is copied (working tree, or `git archive` of --proxy-rev) into
a temp dir at the start, so edits made to proxy/ during a run do not mix in.

keyspace-proxy runs with its admin port on (`--metrics-listen` on a free local
port; the Docker image sets PROXY_METRICS_LISTEN=0.0.0.0:9121), unless
--no-admin-port. Besides it, in the same interleaved rounds: "keyspace-proxy
dedicated" (the same snapshot with `--upstream-mode dedicated`; --no-dedicated
drops it) and, with --baseline-rev REV, "keyspace-proxy@REV" (proxy/ as of REV,
its own snapshot, its C hot path compiled from its own source), so that "did
not regress" is a same-run ratio. After the redis-benchmark phases each round
runs a Sidekiq-shaped load (bench/sidekiq_load.py: pipelines and MULTI of
SADD + LPUSH, BRPOP over three queues, EVALSHA of the scheduler's script,
heartbeats in MULTI) against direct Redis (the load adds the namespace itself)
and every keyspace-proxy target (--skip-sidekiq drops it). twemproxy is not in
it: it refuses MULTI and blocking commands.

Exit status: 0 when the benchmark ran (whatever the figures: targets are
reported, never enforced), 1 when something is broken (a process does not
start or dies, redis-benchmark fails, its output cannot be parsed), 2 when a
required tool is missing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from proxy.embedded import ServerStartError, free_port, start_server, tcp_local_ports  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sidekiq_load  # noqa: E402  (bench/sidekiq_load.py)

ALL_TESTS = ["set", "get", "incr", "lpush", "rpop", "sadd", "hset", "zadd", "mset"]
NAMESPACE = "bench"
HOST = "127.0.0.1"
TARGETS = ["direct", "twemproxy", "keyspace-proxy"]
PROXIES = ["twemproxy", "keyspace-proxy"]
DEDICATED = "keyspace-proxy dedicated"   # the same proxy/ snapshot with --upstream-mode dedicated
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOTES_RE = re.compile(r"^<!-- notes: (?P<name>[^>\n]+?) -->[ \t]*$.*?^<!-- /notes: (?P=name) -->[ \t]*$",
                      re.S | re.M)


class BenchError(RuntimeError):
    """Something is broken (not a slow figure): exit 1."""


# --------------------------------------------------------------------------- phases

@dataclass
class Phase:
    key: str
    title: str
    tests: list[str]
    clients: int
    pipeline: int
    n: int
    datasize: int | None = None
    latency: bool = False        # report p50/p99 rather than throughput first
    scaling: bool = False        # deliverable 3

    def args(self) -> list[str]:
        a = ["-c", str(self.clients), "-P", str(self.pipeline), "-n", str(self.n)]
        if self.datasize:
            a += ["-d", str(self.datasize)]
        return a

    def flags(self) -> str:
        s = f"-c {self.clients} -P {self.pipeline} -n {self.n}"
        return s + (f" -d {self.datasize}" if self.datasize else "")


def make_phases(quick: bool, skip_scaling: bool) -> list[Phase]:
    if quick:
        t = ["set", "get"]
        phases = [
            Phase("p1", "-c 50 -P 1", t, 50, 1, 2000),
            Phase("p16", "-c 50 -P 16", t, 50, 16, 8000),
            Phase("lat", "latency -c 1 -P 1", ["get"], 1, 1, 500, latency=True),
            Phase("d1k", "1 KB values, -c 50 -P 1", ["set"], 50, 1, 1000, datasize=1024, scaling=True),
            Phase("d100k", "100 KB values, -c 50 -P 1", ["set"], 50, 1, 100, datasize=102400, scaling=True),
            Phase("c1000", "1,000 connections, -P 1", ["get"], 1000, 1, 2000, scaling=True),
        ]
    else:
        # -n chosen so that one test takes about 1-2 s through keyspace-proxy on a 2-core machine.
        phases = [
            Phase("p1", "-c 50 -P 1", ALL_TESTS, 50, 1, 50000),
            Phase("p16", "-c 50 -P 16", ALL_TESTS, 50, 16, 200000),
            Phase("lat", "latency -c 1 -P 1", ["set", "get"], 1, 1, 20000, latency=True),
            Phase("d1k", "1 KB values, -c 50 -P 1", ["set", "get"], 50, 1, 40000, datasize=1024, scaling=True),
            Phase("d100k", "100 KB values, -c 50 -P 1", ["set", "get"], 50, 1, 6000, datasize=102400, scaling=True),
            Phase("c1000", "1,000 connections, -c 1000 -P 1", ["set", "get"], 1000, 1, 40000, scaling=True),
        ]
    if skip_scaling:
        phases = [p for p in phases if not p.scaling]
    return phases


# --------------------------------------------------------------------------- /proc

def proc_tree(pid: int) -> list[int]:
    """pid and all its live descendants (a proxy with worker processes counts as one)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of pid and its descendants."""
    user = system = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        user += int(fields[11])    # utime, stime (fields 14 and 15 of stat)
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid and its descendants, in seconds."""
    return sum(cpu_split(pid))


def write_notes(doc: str, name: str, block: str) -> None:
    """Put `block` (a whole `<!-- notes: NAME -->` ... `<!-- /notes: NAME -->` block) in
    `doc` in place of the block of that name, or at its end: how the side scripts (tls.py,
    cluster.py, ...) record their figures without regenerating the rest of the file."""
    text = open(doc).read()
    pat = re.compile(rf"^<!-- notes: {re.escape(name)} -->$.*?^<!-- /notes: {re.escape(name)} -->$", re.S | re.M)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    with open(doc, "w") as f:
        f.write(text)
    print(f"written to {doc}", file=sys.stderr)


def rss_kb(pid: int) -> int:
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


def tcp_conns(pid: int, remote_port: int, descendants: bool = True) -> int:
    """Established TCP connections from pid (and its descendants) to 127.0.0.1:remote_port:
    what one process holds to Redis, whoever else is connected."""
    return len(tcp_local_ports(proc_tree(pid) if descendants else [pid], remote_port))


# --------------------------------------------------------------------------- tiny RESP client

def resp_cmd(port: int, *args: str, timeout: float = 5.0):
    import hiredis
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(hiredis.pack_command(tuple(args)))
        reader = hiredis.Reader()
        while True:
            data = s.recv(65536)
            if not data:
                raise BenchError(f"connection to {port} closed during {args[0]}")
            reader.feed(data)
            reply = reader.gets()
            if reply is not False:
                return reply


def info_field(port: int, section: str, name: str) -> str:
    text = resp_cmd(port, "INFO", section).decode()
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


# --------------------------------------------------------------------------- processes

@dataclass
class Proc:
    name: str
    port: int
    process: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def wait_ping(proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
        try:
            if resp_cmd(proc.port, "PING", timeout=1.0) == b"PONG":
                return
        except (OSError, BenchError) as e:
            last = str(e)
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not answer PING on {HOST}:{proc.port} within {timeout}s ({last}):\n"
                     f"{proc.log_tail()}")


def twemproxy_config(redis_port: int, port: int) -> str:
    # One pool; hash and distribution left at their defaults (fnv1a_64, ketama).
    return (f"bench:\n"
            f"  listen: {HOST}:{port}\n"
            f"  redis: true\n"
            f"  server_connections: 1\n"
            f"  servers:\n"
            f"    - {HOST}:{redis_port}:1\n")


def start_twemproxy(redis_port: int, tmp: str) -> tuple[Proc, str]:
    port = free_port()
    conf = os.path.join(tmp, "nutcracker.yml")
    text = twemproxy_config(redis_port, port)
    with open(conf, "w") as f:
        f.write(text)
    check = subprocess.run(["nutcracker", "-t", "-c", conf], capture_output=True, text=True)
    if check.returncode != 0 or "syntax is ok" not in (check.stdout + check.stderr):
        raise BenchError(f"nutcracker -t rejects the generated config:\n{text}\n{check.stdout}{check.stderr}")
    log = os.path.join(tmp, "nutcracker.log")
    p = subprocess.Popen(["nutcracker", "-c", conf, "-o", log, "-p", os.path.join(tmp, "nutcracker.pid"),
                          "-s", str(free_port()), "-a", HOST],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc("twemproxy", port, p, log)
    wait_ping(proc)
    return proc, text


def snapshot_proxy(tmp: str, rev: str | None, subdir: str = "src", flag: str = "--proxy-rev") -> tuple[str, str]:
    """Copy the proxy package (working tree, or `rev` from git) to tmp/<subdir>; return (src dir, description)."""
    src = os.path.join(tmp, subdir)
    os.makedirs(src)
    if rev:
        sha = subprocess.run(["git", "rev-parse", "--verify", rev + "^{commit}"], cwd=ROOT,
                             capture_output=True, text=True)
        if sha.returncode != 0:
            raise BenchError(f"{flag} {rev}: not a commit: {sha.stderr.strip()}")
        has_setup = subprocess.run(["git", "cat-file", "-e", f"{sha.stdout.strip()}:setup.py"], cwd=ROOT,
                                   capture_output=True).returncode == 0
        archive = subprocess.run(["git", "archive", sha.stdout.strip(), "proxy"] + (["setup.py"] if has_setup else []),
                                 cwd=ROOT, capture_output=True)
        if archive.returncode != 0:
            raise BenchError(f"git archive {rev} proxy failed: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
        build_speedups(src)
        return src, f"{sha.stdout.strip()} (`{flag} {rev}`: proxy/ as committed)"
    shutil.copytree(os.path.join(ROOT, "proxy"), os.path.join(src, "proxy"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(os.path.join(ROOT, "setup.py"), src)
    build_speedups(src)
    return src, git_commit()


def build_speedups(src: str) -> None:
    """Compile the C hot path (proxy/_speedups.c) in the snapshot, from its own source,
    as `pip install` would; without it (a revision before it, or no compiler) the proxy
    runs its pure-Python path, which the report then says."""
    if not os.path.exists(os.path.join(src, "setup.py")):
        return
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src,
                           capture_output=True, text=True)
    if build.returncode != 0:
        print(f"warning: the C hot path did not build; keyspace-proxy runs pure Python:\n{build.stderr[-2000:]}",
              file=sys.stderr)


def hot_path(proc: "Proc") -> str:
    """What the proxy said at start: `C (proxy._speedups)` or `pure Python (why)`."""
    with open(proc.log_path, errors="replace") as f:
        m = re.search(r"hot path: (.*)", f.read())
    return m.group(1).strip() if m else "pure Python (a revision before the C hot path)"


def start_keyspace_proxy(redis_port: int, tmp: str, extra: list[str], src: str, name: str = "keyspace-proxy",
                         admin: bool = True) -> tuple[Proc, list[str]]:
    """`python -m proxy` from the snapshot `src`; with `admin`, the admin port on as the Docker image runs
    it (PROXY_METRICS_LISTEN=0.0.0.0:9121 there: latency histograms kept), here on a free local port."""
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "--listen", f"{HOST}:{port}",
            "--upstream", f"redis://{HOST}:{redis_port}/0", "--namespace", NAMESPACE]
    if admin:
        argv += ["--metrics-listen", f"{HOST}:{free_port()}"]
    argv += extra
    log = os.path.join(tmp, f"keyspace-proxy-{port}.log")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("REDIS_URL", None)
    # the Sidekiq-shaped load runs the scheduler's EVALSHA: a trusted app (README, Policies); a
    # variable, not --policy, so that baseline snapshots from before the policy start too
    env.setdefault("PROXY_POLICY", "app")
    with open(log, "w") as lf:
        p = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=src,
                             start_new_session=True)
    proc = Proc(name, port, p, log)
    wait_ping(proc)
    return proc, argv


# --------------------------------------------------------------------------- redis-benchmark

def test_of(name: str) -> str:
    """CSV test name ("MSET (10 keys)", "SET") -> our test id ("mset", "set")."""
    return name.split()[0].lower()


def parse_csv(out: str) -> dict[str, dict[str, float]]:
    lines = [l for l in out.splitlines() if l.startswith('"')]
    rows: dict[str, dict[str, float]] = {}
    if not lines:
        return rows
    for rec in csv.DictReader(io.StringIO("\n".join(lines))):
        vals = {}
        for k, v in rec.items():
            if k == "test":
                continue
            try:
                vals[k] = float(v)
            except (TypeError, ValueError):
                pass
        rows[test_of(rec["test"])] = vals
    return rows


def parse_text_latency(out: str) -> dict[str, dict[str, float]]:
    """Fallback for redis-benchmark versions whose --csv has no latency columns."""
    rows: dict[str, dict[str, float]] = {}
    parts = re.split(r"^====== (.+?) ======\s*$", out, flags=re.M)
    for name, body in zip(parts[1::2], parts[2::2]):
        vals: dict[str, float] = {}
        m = re.search(r"throughput summary: ([\d.]+) requests per second", body) or \
            re.search(r"([\d.]+) requests per second", body)
        if m:
            vals["rps"] = float(m.group(1))
        m = re.search(r"avg\s+min\s+p50\s+p95\s+p99\s+max\s*\n\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                      body)
        if m:
            vals["avg_latency_ms"] = float(m.group(1))
            vals["p50_latency_ms"], vals["p99_latency_ms"] = float(m.group(3)), float(m.group(5))
        else:  # older: "50.00% <= 0.1 milliseconds"
            cum = [(float(p), float(ms)) for p, ms in re.findall(r"([\d.]+)% <= ([\d.]+) millisecond", body)]
            for q, key in ((50.0, "p50_latency_ms"), (99.0, "p99_latency_ms")):
                hit = [ms for p, ms in cum if p >= q]
                if hit:
                    vals[key] = hit[0]
        rows[test_of(name)] = vals
    return rows


class Bench:
    def __init__(self, binary: str):
        self.binary = binary
        self.csv_latency: bool | None = None

    def run(self, port: int, tests: list[str], args: list[str], timeout: float = 600.0,
            csv_out: bool = True) -> tuple[int, str, str]:
        argv = [self.binary, "-h", HOST, "-p", str(port), "-t", ",".join(tests)] + args
        if csv_out:
            argv.append("--csv")
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1, "", f"timed out after {timeout}s: {shlex.join(argv)}"
        return r.returncode, r.stdout, r.stderr

    def measure(self, port: int, tests: list[str], phase: Phase) -> dict[str, dict[str, float]]:
        rc, out, err = self.run(port, tests, phase.args())
        rows = parse_csv(out)
        if rc != 0 or any(t not in rows for t in tests):
            raise BenchError(f"redis-benchmark {phase.flags()} -t {','.join(tests)} on port {port} failed "
                             f"(exit {rc}):\n{out[-1500:]}\n{err[-1500:]}")
        if phase.latency:
            if self.csv_latency is None:
                self.csv_latency = all("p50_latency_ms" in v and "p99_latency_ms" in v for v in rows.values())
            if not self.csv_latency:
                # This redis-benchmark's --csv has no latency columns: the text output of the same run
                # is used instead (the run above still gives CPU figures; this one gives latency).
                rc, out, err = self.run(port, tests, phase.args(), csv_out=False)
                text = parse_text_latency(out)
                for t in tests:
                    if rc != 0 or "p50_latency_ms" not in text.get(t, {}):
                        raise BenchError(f"cannot parse latency of {t} from redis-benchmark's text output:\n"
                                         f"{out[-2000:]}")
                    rows[t].update({k: v for k, v in text[t].items() if k != "rps"})
        return rows


def probe(bench: Bench, port: int, tests: list[str]) -> dict[str, str]:
    """Which tests does a target answer without an error? {test: error} for those it refuses."""
    args = ["-c", "2", "-n", "50"]
    rc, out, err = bench.run(port, tests, args, timeout=60)
    rows = parse_csv(out)
    if rc == 0 and all(t in rows for t in tests):
        return {}
    refused = {}
    for t in tests:
        rc, out, err = bench.run(port, [t], args, timeout=60)
        if rc != 0 or t not in parse_csv(out):
            msg = " ".join(l.strip() for l in (out + "\n" + err).splitlines()
                           if "rror" in l or "rejected" in l.lower()) or f"exit {rc}"
            refused[t] = msg[:300]
    return refused


# --------------------------------------------------------------------------- measurement

@dataclass
class RunResult:
    rows: dict[str, dict[str, float]]
    requests: int
    proxy_cpu: float | None   # seconds, the proxy in front (None for direct)
    redis_cpu: float
    wall: float


@dataclass
class Results:
    rounds: int
    phases: list[Phase]
    runs: dict[tuple[str, str], list[RunResult]] = field(default_factory=dict)   # (phase, target) -> per round
    refused: dict[str, dict[str, str]] = field(default_factory=dict)            # target -> test -> error
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    targets: list[str] = field(default_factory=lambda: list(TARGETS))           # in interleaving order
    baseline: str | None = None                                                  # "keyspace-proxy@REV"
    baseline_desc: str = ""
    admin: bool = True
    sidekiq_shape: "sidekiq_load.Shape | None" = None
    sidekiq: dict[str, list[dict]] = field(default_factory=dict)                 # target -> per round
    load_start: tuple[float, ...] | None = None                                  # os.getloadavg() at start


def flushall(redis_port: int) -> None:
    resp_cmd(redis_port, "FLUSHALL")


def run_one(bench: Bench, phase: Phase, target: str, port: int, redis_pid: int, proxy: Proc | None,
            tests: list[str]) -> RunResult:
    r_cpu0 = cpu_seconds(redis_pid)
    p_cpu0 = cpu_seconds(proxy.pid) if proxy else None
    t0 = time.monotonic()
    try:
        rows = bench.measure(port, tests, phase)
    except BenchError as e:
        dead = [p.name for p in (proxy,) if p and not p.alive()]
        extra = f"\n{proxy.name} is no longer running:\n{proxy.log_tail()}" if dead else ""
        raise BenchError(f"{target}: {e}{extra}") from None
    wall = time.monotonic() - t0
    r_cpu = cpu_seconds(redis_pid) - r_cpu0
    p_cpu = (cpu_seconds(proxy.pid) - p_cpu0) if proxy else None
    return RunResult(rows, phase.n * len(tests), p_cpu, r_cpu, wall)


def run_sidekiq(target: str, port: int, prefix: str, redis_port: int, redis_pid: int, proxy: Proc | None,
                shape: "sidekiq_load.Shape") -> dict:
    """One run of bench/sidekiq_load.py against a target, in this process (its CPU is the load
    generator's). Per part: jobs/s, latency, CPU per job pushed of the proxy, Redis and the load
    generator, Redis commands per job (INFO stats) and the connections to Redis the target holds at the
    end of the part, while every connection of the load is open (the proxy's, or directly the load's own,
    from /proc: the other targets' idle connections to the same Redis are not counted)."""
    import asyncio

    def probe() -> dict:
        # directly: this process's own sockets only (its children are the proxies and twemproxy)
        held = tcp_conns(proxy.pid, redis_port) if proxy else tcp_conns(os.getpid(), redis_port, False)
        info = resp_cmd(redis_port, "INFO", "stats").decode()
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return {"proxy": cpu_seconds(proxy.pid) if proxy else None, "redis": cpu_seconds(redis_pid),
                "gen": time.process_time(), "clients": held, "cmds": int(fields["total_commands_processed"])}

    try:
        out = asyncio.run(sidekiq_load.run(HOST, port, prefix, shape, probe))
    except (sidekiq_load.LoadError, OSError) as e:
        dead = f"\n{proxy.name} is no longer running:\n{proxy.log_tail()}" if proxy and not proxy.alive() else ""
        raise BenchError(f"sidekiq load against {target}: {e}{dead}") from None
    res = {"connections": out["connections"]}
    for part in ("saturated", "paced"):
        o = out[part]
        b, a, n = o["before"], o["after"], o["jobs"]
        res[part] = {
            "jobs": n, "executions": o["executions"], "jobs_per_s": o["jobs_per_s"],
            "p50_ms": o["p50_ms"], "p99_ms": o["p99_ms"], "avg_ms": o["avg_ms"],
            "proxy_us": (a["proxy"] - b["proxy"]) / n * 1e6 if proxy else None,
            "redis_us": (a["redis"] - b["redis"]) / n * 1e6,
            "gen_us": (a["gen"] - b["gen"]) / n * 1e6,
            "cmds_per_job": (a["cmds"] - b["cmds"] - 1) / n,   # minus the probe's own INFO
            "clients": a["clients"],
        }
    return res


def idle_memory(target: str, port: int, proc_pid: int | None, redis_port: int, redis_pid: int,
                count: int) -> dict[str, float]:
    """Open `count` connections, PING on each (so a proxy has set up whatever it needs for a client),
    leave them idle, and read VmRSS of the proxy (and of redis-server) before and after."""
    warm = []
    for _ in range(10):  # warm up allocator paths so the first connections' one-off costs are not counted
        s = socket.create_connection((HOST, port))
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        s.recv(64)
        warm.append(s)
    for s in warm:
        s.close()
    time.sleep(0.3)
    clients0 = int(info_field(redis_port, "clients", "connected_clients") or 0)
    p0 = rss_kb(proc_pid) if proc_pid else 0
    r0 = rss_kb(redis_pid)
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection((HOST, port))
            socks.append(s)
        for s in socks:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
        for s in socks:
            s.settimeout(10)
            if not s.recv(64).startswith(b"+PONG"):
                raise BenchError(f"{target}: no PONG on an idle-connection probe")
        time.sleep(0.5)
        p1 = rss_kb(proc_pid) if proc_pid else 0
        r1 = rss_kb(redis_pid)
        clients1 = int(info_field(redis_port, "clients", "connected_clients") or 0)
    finally:
        for s in socks:
            s.close()
    return {"proxy_kb": (p1 - p0) / count if proc_pid else float("nan"),
            "redis_kb": (r1 - r0) / count,
            "proxy_rss_before_kb": p0,
            "upstream_conns": clients1 - clients0}


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < new:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))  # inherited by every child we start
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --------------------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_num(x, digits=0):
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}"


def fmt_ratio(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.2f}"
    return f"**{m:.2f}** ({min(xs):.2f}-{max(xs):.2f})"


def fmt_us(x):
    return "n/a" if x is None else f"{x * 1e6:.2f}"


def rps(res: Results, phase: str, target: str, test: str) -> list[float | None]:
    out = []
    for rr in res.runs.get((phase, target), []):
        row = rr.rows.get(test)
        out.append(row.get("rps") if row else None)
    return out


def paired(a: list, b: list, op) -> list[float | None]:
    return [op(x, y) if x is not None and y is not None and y != 0 else None for x, y in zip(a, b)]


def cpu_per_req(res: Results, phase: str, target: str, which: str) -> list[float | None]:
    out = []
    for rr in res.runs.get((phase, target), []):
        v = rr.proxy_cpu if which == "proxy" else rr.redis_cpu
        out.append(v / rr.requests if v is not None and rr.requests else None)
    return out


def throughput_table(res: Results, ph: Phase) -> list[str]:
    lines = ["| test | direct req/s | twemproxy req/s | keyspace-proxy req/s | ksp / direct | ksp / twemproxy |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in ph.tests:
        d, w, k = (rps(res, ph.key, x, t) for x in TARGETS)
        lines.append(f"| {t} | {fmt_num(med(d))} | {fmt_num(med(w))} | {fmt_num(med(k))} "
                     f"| {fmt_ratio(paired(k, d, lambda a, b: a / b))} | {fmt_ratio(paired(k, w, lambda a, b: a / b))} |")
    return lines


def latency_series(res: Results, phase: str, target: str, test: str, key: str) -> list[float | None]:
    out = []
    for rr in res.runs.get((phase, target), []):
        row = rr.rows.get(test)
        out.append(row.get(key) if row else None)
    return out


def latency_table(res: Results, ph: Phase) -> list[str]:
    lines = ["| test | direct p50 / p99 / avg ms | twemproxy p50 / p99 / avg ms | keyspace-proxy p50 / p99 / avg ms "
             "| added p50 ms: twemproxy | added p50 ms: keyspace-proxy | added p99 ms: twemproxy "
             "| added p99 ms: keyspace-proxy | added avg ms: twemproxy | added avg ms: keyspace-proxy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in ph.tests:
        cells = []
        for x in TARGETS:
            vals = [fmt_num(med(latency_series(res, ph.key, x, t, k)), 3)
                    for k in ("p50_latency_ms", "p99_latency_ms", "avg_latency_ms")]
            cells.append(" / ".join(vals))
        added = []
        for key in ("p50_latency_ms", "p99_latency_ms", "avg_latency_ms"):
            d = latency_series(res, ph.key, "direct", t, key)
            for x in PROXIES:
                added.append(fmt_num(med(paired(latency_series(res, ph.key, x, t, key), d,
                                                lambda a, b: a - b)), 3))
        lines.append(f"| {t} | " + " | ".join(cells) + " | " + " | ".join(added) + " |")
    return lines


def cpu_table(res: Results) -> list[str]:
    lines = ["| phase | keyspace-proxy µs/req | twemproxy µs/req | ksp / twemproxy "
             "| redis-server µs/req: direct | via twemproxy | via keyspace-proxy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for ph in res.phases:
        k = cpu_per_req(res, ph.key, "keyspace-proxy", "proxy")
        w = cpu_per_req(res, ph.key, "twemproxy", "proxy")
        rd, rw, rk = (cpu_per_req(res, ph.key, x, "redis") for x in TARGETS)
        lines.append(f"| {ph.title} (-t {','.join(ph.tests)}) | {fmt_us(med(k))} | {fmt_us(med(w))} "
                     f"| {fmt_ratio(paired(k, w, lambda a, b: a / b))} "
                     f"| {fmt_us(med(rd))} | {fmt_us(med(rw))} | {fmt_us(med(rk))} |")
    return lines


def memory_table(res: Results, count: int) -> list[str]:
    lines = [f"| target | proxy RSS KB per idle connection | redis-server RSS KB per connection | "
             f"redis-server connections for {count:,} clients | proxy RSS before (KB) |",
             "|---|---:|---:|---:|---:|"]
    for x in res.targets:
        m = res.memory.get(x)
        if not m:
            continue
        pk = "-" if x == "direct" else f"{m['proxy_kb']:.1f}"
        before = "-" if x == "direct" else f"{m['proxy_rss_before_kb']:,}"
        lines.append(f"| {x} | {pk} | {m['redis_kb']:.1f} | {m['upstream_conns']:,} | {before} |")
    return lines


def test_ratios(res: Results, phase: str, a: str, b: str) -> dict[str, float]:
    """{test: median over rounds of a's req/s / b's in the same round}."""
    ph = next((p for p in res.phases if p.key == phase), None)
    out = {}
    for t in (ph.tests if ph else []):
        m = med(paired(rps(res, phase, a, t), rps(res, phase, b, t), lambda x, y: x / y))
        if m is not None:
            out[t] = m
    return out


def fmt_over_tests(r: dict[str, float]) -> str:
    if not r:
        return "n/a"
    lo = min(r, key=r.get)
    return f"**{statistics.median(r.values()):.2f}** (lowest {r[lo]:.2f} {lo}, highest {max(r.values()):.2f})"


def total_cpu(res: Results, phase: str, target: str) -> list[float | None]:
    return [p + r if p is not None and r is not None else None
            for p, r in zip(cpu_per_req(res, phase, target, "proxy"), cpu_per_req(res, phase, target, "redis"))]


def pair_table(res: Results, a: str, b: str) -> list[str]:
    """Per redis-benchmark phase: a against b (both keyspace-proxy targets), CPU and throughput."""
    lines = [f"| phase | proxy µs/req: {a} | {b} | proxy {a} / {b} | redis-server µs/req via {a} | via {b} "
             f"| proxy+redis {a} / {b} | req/s {a} / {b}: median of tests |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for ph in res.phases:
        pa, pb = cpu_per_req(res, ph.key, a, "proxy"), cpu_per_req(res, ph.key, b, "proxy")
        ra, rb = cpu_per_req(res, ph.key, a, "redis"), cpu_per_req(res, ph.key, b, "redis")
        lines.append(f"| {ph.title} | {fmt_us(med(pa))} | {fmt_us(med(pb))} | {fmt_ratio(paired(pa, pb, lambda x, y: x / y))} "
                     f"| {fmt_us(med(ra))} | {fmt_us(med(rb))} "
                     f"| {fmt_ratio(paired(total_cpu(res, ph.key, a), total_cpu(res, ph.key, b), lambda x, y: x / y))} "
                     f"| {fmt_over_tests(test_ratios(res, ph.key, a, b))} |")
    return lines


def pair_tests_table(res: Results, ph: Phase, a: str, b: str) -> list[str]:
    lines = [f"| test | {a} req/s | {b} req/s | {a} / {b} |", "|---|---:|---:|---:|"]
    for t in ph.tests:
        x, y = rps(res, ph.key, a, t), rps(res, ph.key, b, t)
        lines.append(f"| {t} | {fmt_num(med(x))} | {fmt_num(med(y))} | {fmt_ratio(paired(x, y, lambda p, q: p / q))} |")
    return lines


def sk_series(res: Results, target: str, part: str, key: str) -> list[float | None]:
    return [r[part][key] for r in res.sidekiq.get(target, [])]


def sidekiq_tables(res: Results) -> list[str]:
    lines = ["| target | jobs/s | jobs/s vs direct | proxy CPU µs/job | Redis CPU µs/job | proxy+Redis µs/job "
             "| Redis commands/job | Redis connections held | load generator CPU µs/job |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    d_rate = sk_series(res, "direct", "saturated", "jobs_per_s")
    for t in res.sidekiq:
        rate = sk_series(res, t, "saturated", "jobs_per_s")
        p = sk_series(res, t, "saturated", "proxy_us")
        r = sk_series(res, t, "saturated", "redis_us")
        tot = [x + y if x is not None else y for x, y in zip(p, r)]
        lines.append(f"| {t} | {fmt_num(med(rate))} | {'-' if t == 'direct' else fmt_ratio(paired(rate, d_rate, lambda a, b: a / b))} "
                     f"| {fmt_num(med(p), 1)} | {fmt_num(med(r), 1)} | {fmt_num(med(tot), 1)} "
                     f"| {fmt_num(med(sk_series(res, t, 'saturated', 'cmds_per_job')), 2)} "
                     f"| {fmt_num(med(sk_series(res, t, 'saturated', 'clients')))} "
                     f"| {fmt_num(med(sk_series(res, t, 'saturated', 'gen_us')), 1)} |")
    shape = res.sidekiq_shape
    rate = f"{shape.paced_rate:,.0f} jobs/s" if shape else "paced"
    lines += ["", f"Paced part ({rate}): latency per job, enqueue to dequeue (jobs pushed to a queue directly; "
              "p50/p99 over all jobs of a round, medians over rounds; *added* = target minus direct in the same "
              "round, median over rounds), and CPU per job at that rate.", "",
              "| target | p50 / p99 / avg ms | added p50 ms | added p99 ms | proxy CPU µs/job | Redis CPU µs/job "
              "| Redis connections held |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for t in res.sidekiq:
        vals = " / ".join(fmt_num(med(sk_series(res, t, "paced", k)), 3) for k in ("p50_ms", "p99_ms", "avg_ms"))
        added = []
        for k in ("p50_ms", "p99_ms"):
            added.append("-" if t == "direct" else fmt_num(med(paired(sk_series(res, t, "paced", k),
                                                                      sk_series(res, "direct", "paced", k),
                                                                      lambda a, b: a - b)), 3))
        lines.append(f"| {t} | {vals} | {added[0]} | {added[1]} "
                     f"| {fmt_num(med(sk_series(res, t, 'paced', 'proxy_us')), 1)} "
                     f"| {fmt_num(med(sk_series(res, t, 'paced', 'redis_us')), 1)} "
                     f"| {fmt_num(med(sk_series(res, t, 'paced', 'clients')))} |")
    return lines


def baseline_summary(res: Results) -> list[str]:
    """The issue-11 check: the proxy against the baseline at P=1 and P=16 (and the Sidekiq load)."""
    a, b = "keyspace-proxy", res.baseline
    lines = [f"| figure | {a} / {b} (median of per-round ratios; min-max) |", "|---|---|"]
    for key in ("p1", "p16"):
        ph = next((p for p in res.phases if p.key == key), None)
        if not ph:
            continue
        lines.append(f"| {ph.title}: req/s, median over the {len(ph.tests)} tests | "
                     f"{fmt_over_tests(test_ratios(res, key, a, b))} |")
        lines.append(f"| {ph.title}: proxy CPU per request | "
                     f"{fmt_ratio(paired(cpu_per_req(res, key, a, 'proxy'), cpu_per_req(res, key, b, 'proxy'), lambda x, y: x / y))} |")
        lines.append(f"| {ph.title}: redis-server CPU per request | "
                     f"{fmt_ratio(paired(cpu_per_req(res, key, a, 'redis'), cpu_per_req(res, key, b, 'redis'), lambda x, y: x / y))} |")
    if a in res.sidekiq and b in res.sidekiq:
        lines.append(f"| Sidekiq-shaped, saturated: jobs/s | "
                     f"{fmt_ratio(paired(sk_series(res, a, 'saturated', 'jobs_per_s'), sk_series(res, b, 'saturated', 'jobs_per_s'), lambda x, y: x / y))} |")
        lines.append(f"| Sidekiq-shaped, saturated: proxy CPU per job | "
                     f"{fmt_ratio(paired(sk_series(res, a, 'saturated', 'proxy_us'), sk_series(res, b, 'saturated', 'proxy_us'), lambda x, y: x / y))} |")
    return lines


def ratios_over_tests(res: Results, phase: str, other: str) -> dict[str, float]:
    ph = next((p for p in res.phases if p.key == phase), None)
    out = {}
    if not ph:
        return out
    for t in ph.tests:
        m = med(paired(rps(res, phase, "keyspace-proxy", t), rps(res, phase, other, t), lambda a, b: a / b))
        if m is not None:
            out[t] = m
    return out


def targets_section(res: Results) -> list[str]:
    lines = ["## Targets", ""]
    if res.rounds < 5:
        lines += [f"Only {res.rounds} round(s) in this run; the issue asks for at least 5, so these verdicts "
                  f"are indicative only.", ""]
    lines += ["| target (issue 3) | figure | verdict |", "|---|---|---|"]

    def thr(label, phase, other, goal):
        r = ratios_over_tests(res, phase, other)
        if not r:
            lines.append(f"| {label} | no data | n/a |")
            return
        worst = min(r, key=r.get)
        ok = [t for t, v in r.items() if v >= goal]
        verdict = "met" if len(ok) == len(r) else f"not met ({len(ok)}/{len(r)} tests)"
        lines.append(f"| {label} | median over tests {statistics.median(r.values()):.2f}x, "
                     f"lowest {r[worst]:.2f}x ({worst}) | {verdict} |")

    thr("P=16 throughput >= 1.2x twemproxy", "p16", "twemproxy", 1.2)
    thr("P=1 throughput >= 1.0x twemproxy", "p1", "twemproxy", 1.0)
    thr("P=1 throughput >= 0.9x direct", "p1", "direct", 0.9)
    for phase, label in (("p1", "P=1"), ("p16", "P=16")):
        k = cpu_per_req(res, phase, "keyspace-proxy", "proxy")
        w = cpu_per_req(res, phase, "twemproxy", "proxy")
        r = med(paired(k, w, lambda a, b: a / b))
        if r is None:
            lines.append(f"| proxy CPU per request <= twemproxy's at {label} | no data | n/a |")
        else:
            lines.append(f"| proxy CPU per request <= twemproxy's at {label} | {fmt_us(med(k))} vs "
                         f"{fmt_us(med(w))} µs/req ({r:.2f}x) | {'met' if r <= 1.0 else 'not met'} |")
    lat = next((p for p in res.phases if p.key == "lat"), None)
    if lat:
        cells, ok, tie_avg_worse = [], True, False
        for t in lat.tests:
            d = latency_series(res, "lat", "direct", t, "p50_latency_ms")
            k = med(paired(latency_series(res, "lat", "keyspace-proxy", t, "p50_latency_ms"), d, lambda a, b: a - b))
            w = med(paired(latency_series(res, "lat", "twemproxy", t, "p50_latency_ms"), d, lambda a, b: a - b))
            if k is None or w is None:
                ok = False
                cells.append(f"{t}: n/a")
                continue
            ok = ok and k <= w
            da = latency_series(res, "lat", "direct", t, "avg_latency_ms")
            ka = med(paired(latency_series(res, "lat", "keyspace-proxy", t, "avg_latency_ms"), da, lambda a, b: a - b))
            wa = med(paired(latency_series(res, "lat", "twemproxy", t, "avg_latency_ms"), da, lambda a, b: a - b))
            avg = f" (avg {ka * 1000:+.0f} vs {wa * 1000:+.0f})" if ka is not None and wa is not None else ""
            if ka is not None and wa is not None and abs(k - w) < 1e-9 and ka > wa:
                tie_avg_worse = True
            cells.append(f"{t}: p50 {k * 1000:+.0f} vs {w * 1000:+.0f} µs{avg}")
        lines.append(f"| added p50 latency at c=1 no worse than twemproxy's (keyspace-proxy vs twemproxy) "
                     f"| {'; '.join(cells)} "
                     f"| {('met (p50 tied at redis-benchmark resolution; avg is worse)' if tie_avg_worse else 'met') if ok else 'not met'} |")
    lines += ["", "Throughput verdicts need every test's ratio (median of per-round paired ratios) to reach the "
              "goal. keyspace-proxy runs with its defaults (shared upstream connections) unless the "
              "command line above passes other flags with `--proxy-args`."]
    return lines


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "proxy"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return (sha or "unknown") + (" + uncommitted changes under proxy/ (working tree as of the start)"
                                     if dirty else " (working tree, clean)")
    except OSError:
        return "unknown"


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return "not installed"


def machine_info(load_start: tuple[float, ...] | None = None) -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [f"- CPUs usable (nproc): {nproc}; CPU model: {model}",
            f"- Memory: {mem}; kernel {platform.release()}; load average at start: "
            f"{' '.join(f'{x:.2f}' for x in (load_start or os.getloadavg()))}"]


def versions(redis_version: str, proxy_desc: str) -> list[str]:
    nc = subprocess.run(["nutcracker", "--version"], capture_output=True, text=True)
    ncv = (nc.stdout + nc.stderr).strip().splitlines()
    rb = subprocess.run(["redis-benchmark", "--version"], capture_output=True, text=True).stdout.strip()
    return [f"- Python {platform.python_version()} ({sys.executable})",
            f"- redis-server: {redis_version}",
            f"- redis-benchmark: {rb}",
            f"- nutcracker: {ncv[0] if ncv else 'unknown'}",
            f"- hiredis {pkg_version('hiredis')}, uvloop {pkg_version('uvloop')}",
            f"- keyspace-proxy git commit: {proxy_desc}"]


HEADER = """# Benchmarks

> **Generated by `python bench/run.py`** (issue 3; how to run it: the docstring of `bench/run.py`).
> Re-running the script rewrites this whole file EXCEPT hand-written blocks: a line `<!-- notes: NAME -->`,
> then anything (headings included), then a line `<!-- /notes: NAME -->`, for any NAME (e.g. `profile`).
> Those blocks are kept verbatim, in their order, at the end of the file. Write notes only inside them.
"""

DEFAULT_NOTES = """<!-- notes: profile -->
## Profiles and what changed because of them (hand-written)

_Not written yet: py-spy / cProfile findings of the hot path go here (issue 3, deliverable 4)._
<!-- /notes: profile -->"""


def existing_notes(path: str) -> list[str]:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return []
    return [m.group(0) for m in NOTES_RE.finditer(text)]


def render(res: Results, args, cmdline: str, redis_version: str, twem_conf: str, ksp_argv: list[str],
           started: str, elapsed: float, mem_count: int, fd_limit: int, notes: list[str],
           proxy_desc: str, ksp_argvs: dict[str, list[str]] | None = None) -> str:
    L = [HEADER]
    if args.quick:
        L += ["**QUICK SMOKE RUN (`--quick`): 1 round, tiny request counts. These figures mean nothing; "
              "run `python bench/run.py` for real ones.**", ""]
    L += [f"Run {started} with `{cmdline}`: {res.rounds} interleaved round(s) "
          f"({', '.join(res.targets)}, repeated), {elapsed:.0f} s in total; load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (redis-benchmark, the load generator, the proxies "
          f"and redis-server share the machine's CPUs, see \"Machine and versions\").", "",
          f"keyspace-proxy targets run with the admin port {'ON (`--metrics-listen`, as the Docker image runs: latency histograms kept)' if res.admin else 'OFF (`--no-admin-port`)'}; "
          f"`{DEDICATED}` is the same code with `--upstream-mode dedicated`"
          + (f"; `{res.baseline}` is proxy/ as of that commit, in its own snapshot with its C hot path compiled "
             f"from its own source." if res.baseline else "."), ""]
    L += ["## CPU per request (read this first)", "",
          "CPU seconds (utime+stime from `/proc/<pid>/stat`, all of a process's descendants included) "
          "spent by each process during a phase, divided by the requests redis-benchmark sent in it "
          "(MSET of 10 keys counts as one request). Medians over rounds, in microseconds; the ratio is "
          "the median of per-round ratios (min-max in brackets). On a shared machine this is steadier "
          "than throughput: it does not depend on who else got the CPU.", ""]
    L += cpu_table(res) + [""]
    if res.baseline and any((ph.key, res.baseline) in res.runs for ph in res.phases):
        L += [f"## keyspace-proxy against {res.baseline} (same rounds)", "",
              f"`keyspace-proxy` (the code under test) and `{res.baseline}` run one after the other in every "
              f"phase of every round, so each ratio is a same-run ratio: per round, the first's figure divided by "
              f"the second's, median over rounds (min-max in brackets). Throughput: per test the median of "
              f"per-round ratios, then the median over tests. Below 1.00 is less CPU (better) in the CPU columns, "
              f"fewer requests per second (worse) in the last.", ""]
        L += baseline_summary(res) + [""]
        L += pair_table(res, "keyspace-proxy", res.baseline) + [""]
        for ph in res.phases:
            if ph.key in ("p1", "p16"):
                L += [f"### {ph.title}: `redis-benchmark -t {','.join(ph.tests)} {ph.flags()}`", ""]
                L += pair_tests_table(res, ph, "keyspace-proxy", res.baseline) + [""]
    if any((ph.key, DEDICATED) in res.runs for ph in res.phases):
        L += ["## Dedicated upstream connections (`--upstream-mode dedicated`) against shared (the default)", "",
              "Same rounds, same method as above: every redis-benchmark client gets its own upstream connection, "
              "so Redis reads and writes once per request instead of once per batch of all clients' requests.", ""]
        L += pair_table(res, DEDICATED, "keyspace-proxy") + [""]
        L += ["Throughput of each target against direct, median over tests (per test the median of per-round "
              "ratios):", "",
              "| phase | " + " | ".join(f"{x} / direct" for x in res.targets if x != "direct") + " |",
              "|---|" + "---|" * (len(res.targets) - 1)]
        for ph in res.phases:
            L.append(f"| {ph.title} | " + " | ".join(fmt_over_tests(test_ratios(res, ph.key, x, "direct"))
                                                     for x in res.targets if x != "direct") + " |")
        L.append("")
    if res.sidekiq:
        sh = res.sidekiq_shape
        L += ["## Sidekiq-shaped load (`bench/sidekiq_load.py`)", "",
              f"What Sidekiq 6.4 / 7.3 send (the docstring of `bench/sidekiq_load.py` lists each command): "
              f"{sh.describe()}. {next(iter(res.sidekiq.values()))[0]['connections']} client connections in all. "
              f"Through keyspace-proxy the load sends unprefixed keys and the proxy adds `{NAMESPACE}:`; "
              f"directly, the load adds `{NAMESPACE}:` itself, so Redis does the same work. twemproxy is left out "
              f"(it refuses MULTI and blocking commands). Every job is fetched exactly once per attempt (checked "
              f"per job id) and nothing is left in any queue, `schedule` or `retry` afterwards, or the run fails.",
              "",
              "Saturated part: jobs/s counts jobs pushed straight to a queue, first push to last fetch; CPU per job "
              "is CPU seconds over the whole part (scheduled and retried jobs, heartbeats, the scheduler's "
              "polls included) divided by the jobs pushed; *Redis commands/job* is from Redis's INFO "
              "(`total_commands_processed`); *Redis connections held* is what the target (directly: the load "
              "itself) holds to Redis at the end of the part, every connection of the load open, counted "
              "from /proc (the other targets' idle connections to the same Redis left out). The load generator is one Python process "
              "(asyncio, hiredis): at this size it, not Redis or the proxy, sets the pace, so read CPU per job "
              "first. Medians over rounds.", ""]
        L += sidekiq_tables(res) + [""]
    for ph in res.phases:
        if ph.scaling:
            continue
        L += [f"## {'Latency' if ph.latency else 'Throughput'}: `redis-benchmark -t {','.join(ph.tests)} "
              f"{ph.flags()}`", ""]
        if ph.latency:
            L += ["p50, p99 and avg are redis-benchmark's own figures (its `--csv` latency columns; its "
                  "percentiles come from a histogram with steps of about 8 µs here, avg is finer), medians over "
                  "rounds; *added* is the target's figure minus direct's in the same round, median over rounds.",
                  ""]
            L += latency_table(res, ph) + [""]
        else:
            L += ["Requests per second, medians over rounds; ratios are medians of per-round paired ratios "
                  "(min-max over rounds in brackets).", ""]
            L += throughput_table(res, ph) + [""]
    scaling = [ph for ph in res.phases if ph.scaling]
    if scaling:
        L += ["## Scaling: value size and connection count", "",
              "Same method as above (medians, paired ratios). CPU per request of these phases is in the "
              "CPU table at the top.", ""]
        for ph in scaling:
            L += [f"### {ph.title}: `redis-benchmark -t {','.join(ph.tests)} {ph.flags()}`", ""]
            L += throughput_table(res, ph) + [""]
    if res.memory:
        L += ["### Memory per idle connection", "",
              f"{mem_count:,} connections opened to a freshly started instance of each target, one PING on "
              f"each (so a proxy sets up whatever a client needs, e.g. its upstream connection), then left "
              f"idle; VmRSS before and after, divided by the number of connections. Columns 3 and 4 are what "
              f"redis-server (also fresh) pays: a proxy with one upstream connection per client makes it hold "
              f"a connection per client, a multiplexing proxy only a few.", ""]
        L += memory_table(res, mem_count) + [""]
    refused = {t: r for t, r in res.refused.items() if r}
    L += ["## Commands a target refused", ""]
    if refused:
        for t, r in refused.items():
            for test, msg in r.items():
                L.append(f"- {t} refuses `{test}` (shown as n/a): {msg}")
    else:
        L.append("None: every target answered every test without an error (each target is probed with "
                 "every test before the rounds; redis-benchmark stops at the first error reply).")
    L.append("")
    L += targets_section(res) + [""]
    other_argvs = [f"  - {name}: `{shlex.join(['python' if a == sys.executable else a for a in av])}`"
                   for name, av in (ksp_argvs or {}).items() if name != "keyspace-proxy"]
    L += ["## Method", "",
          f"- Command: `{cmdline}`",
          "- redis-server started by `proxy.embedded.start_server(\"redis\")` (no persistence) on 127.0.0.1; "
          "FLUSHALL before each redis-benchmark run.",
          f"- keyspace-proxy: `{shlex.join(['python' if a == sys.executable else a for a in ksp_argv])}` "
          f"(add mode: every key gets the prefix `{NAMESPACE}:`)" + ("; the other keyspace-proxy targets:"
                                                                    if other_argvs else "."), *other_argvs,
          "- twemproxy (nutcracker), validated with `nutcracker -t`:", "", "```yaml", twem_conf.rstrip(), "```", "",
          f"- Each phase runs {', '.join(res.targets)} in turn, then the next phase; one round is all "
          "phases (then the Sidekiq-shaped load against direct and every keyspace-proxy target); rounds "
          "repeat. redis-benchmark (or the load generator), the proxies and redis-server share the machine's "
          "CPUs.",
          f"- File-descriptor limit raised to {fd_limit} (RLIMIT_NOFILE, inherited by every process started).",
          "- Ratios: for each round, keyspace-proxy's figure divided by the other target's in the same round; "
          "the table shows the median of these per-round ratios.",
          ""]
    L += ["## Machine and versions", ""] + machine_info(res.load_start) + versions(redis_version, proxy_desc)
    if res.baseline:
        L.append(f"- {res.baseline}: {res.baseline_desc}")
    L.append("")
    L += notes or [DEFAULT_NOTES]
    return "\n".join(L).rstrip() + "\n"


# --------------------------------------------------------------------------- main

def check_tools() -> list[str]:
    missing = []
    for tool, pkg in (("redis-server", "redis-server"), ("redis-benchmark", "redis-tools"),
                      ("nutcracker", "nutcracker")):
        if not shutil.which(tool):
            missing.append(f"{tool} (Debian package {pkg})")
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark keyspace-proxy against direct Redis and twemproxy.")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke check: a few seconds, meaningless figures")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"),
                    help="markdown file to write (default docs/benchmarks.md)")
    ap.add_argument("--skip-scaling", action="store_true",
                    help="skip the value-size / 1,000-connection / memory figures")
    ap.add_argument("--proxy-args", default="", help="extra arguments for `python -m proxy`, one string")
    ap.add_argument("--proxy-rev", default=None, metavar="REV",
                    help="benchmark proxy/ as of this git commit (default: the working tree as it is at the start)")
    ap.add_argument("--baseline-rev", default=None, metavar="REV",
                    help="also measure proxy/ as of this commit (its own snapshot, C hot path compiled from its "
                         "source) as target keyspace-proxy@REV in the same interleaved rounds")
    ap.add_argument("--no-admin-port", action="store_true",
                    help="run keyspace-proxy without --metrics-listen (default: admin port on, as the Docker "
                         "image runs it)")
    ap.add_argument("--no-dedicated", action="store_true",
                    help="skip the keyspace-proxy target with --upstream-mode dedicated")
    ap.add_argument("--skip-sidekiq", action="store_true", help="skip the Sidekiq-shaped phase")
    ap.add_argument("--idle-connections", type=int, default=None,
                    help="connections for the memory-per-idle-connection figure (default 1000; 100 with --quick)")
    args = ap.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if rounds < 1:
        ap.error("--rounds must be >= 1")
    mem_count = args.idle_connections or (100 if args.quick else 1000)
    cmdline = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd())] +
                         (sys.argv[1:] if argv is None else argv))

    missing = check_tools()
    if missing:
        print("bench/run.py: missing on PATH: " + "; ".join(missing) +
              "\n  install them, e.g.: apt-get install -y redis-server redis-tools nutcracker", file=sys.stderr)
        return 2

    phases = make_phases(args.quick, args.skip_scaling)
    fd_limit = raise_fd_limit(65536)
    if fd_limit < max(4 * 1000, 4 * mem_count) and not args.skip_scaling:
        print(f"bench/run.py: file-descriptor limit is {fd_limit} (hard limit too low): skipping the "
              f"1,000-connection figures", file=sys.stderr)
        phases = [p for p in phases if p.clients < fd_limit // 4]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.monotonic()
    extra = shlex.split(args.proxy_args)
    admin = not args.no_admin_port
    baseline = f"keyspace-proxy@{args.baseline_rev}" if args.baseline_rev else None
    # Interleaving order: the baseline right after the proxy it is compared with.
    targets = TARGETS + ([baseline] if baseline else []) + ([] if args.no_dedicated else [DEDICATED])
    shape = sidekiq_load.Shape.quick() if args.quick else sidekiq_load.Shape(jobs=20000)
    res = Results(rounds, phases, targets=targets, baseline=baseline, admin=admin,
                  sidekiq_shape=None if args.skip_sidekiq else shape)
    res.load_start = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="ksp-bench-")
    procs: list[Proc] = []
    redis = None
    try:
        src, proxy_desc = snapshot_proxy(tmp, args.proxy_rev)
        # name -> (snapshot, extra arguments): every keyspace-proxy target
        ksp_spec = {"keyspace-proxy": (src, extra), DEDICATED: (src, extra + ["--upstream-mode", "dedicated"])}
        if baseline:
            bsrc, base_desc = snapshot_proxy(tmp, args.baseline_rev, "src-baseline", "--baseline-rev")
            ksp_spec[baseline] = (bsrc, extra)
        try:
            redis = start_server("redis")
        except ServerStartError as e:
            raise BenchError(f"redis-server did not start: {e}") from None
        twem, twem_conf = start_twemproxy(redis.port, tmp)
        procs.append(twem)
        ports = {"direct": redis.port, "twemproxy": twem.port}
        front: dict[str, Proc | None] = {"direct": None, "twemproxy": twem}
        ksp_argvs = {}
        for name in targets:
            if name in ksp_spec:
                p, ksp_argvs[name] = start_keyspace_proxy(redis.port, tmp, ksp_spec[name][1], ksp_spec[name][0],
                                                          name, admin)
                procs.append(p)
                ports[name], front[name] = p.port, p
        ksp_argv = ksp_argvs["keyspace-proxy"]
        proxy_desc += f"; hot path: {hot_path(front['keyspace-proxy'])}"
        if baseline:
            base_desc += f"; hot path: {hot_path(front[baseline])}"
            res.baseline_desc = base_desc
        bench = Bench(shutil.which("redis-benchmark"))

        all_tests = sorted({t for p in phases for t in p.tests}, key=ALL_TESTS.index)
        for target in targets:
            res.refused[target] = probe(bench, ports[target], all_tests)
            for t, msg in res.refused[target].items():
                print(f"note: {target} refuses {t}: {msg} (reported as n/a)", file=sys.stderr)

        sk_targets = ["direct"] + [t for t in targets if t in ksp_spec]
        for rnd in range(1, rounds + 1):
            for ph in phases:
                for target in targets:
                    tests = [t for t in ph.tests if t not in res.refused[target]]
                    if not tests:
                        res.runs.setdefault((ph.key, target), []).append(RunResult({}, 0, None, 0.0, 0.0))
                        continue
                    flushall(redis.port)
                    rr = run_one(bench, ph, target, ports[target], redis.process.pid, front[target], tests)
                    res.runs.setdefault((ph.key, target), []).append(rr)
                    summary = ", ".join(f"{t} {rr.rows[t].get('rps', 0):,.0f}" for t in tests)
                    cpu = f"; proxy {rr.proxy_cpu / rr.requests * 1e6:.2f} µs/req" if rr.proxy_cpu is not None else ""
                    print(f"round {rnd}/{rounds} {ph.key:6} {target:24} {rr.wall:5.1f}s  {summary}{cpu}",
                          flush=True)
            if not args.skip_sidekiq:
                for target in sk_targets:
                    flushall(redis.port)
                    t0 = time.monotonic()
                    sk = run_sidekiq(target, ports[target], "" if front[target] else NAMESPACE + ":",
                                     redis.port, redis.process.pid, front[target], shape)
                    res.sidekiq.setdefault(target, []).append(sk)
                    s, p = sk["saturated"], sk["paced"]
                    cpu = f", proxy {s['proxy_us']:.1f} µs/job" if s["proxy_us"] is not None else ""
                    print(f"round {rnd}/{rounds} sidekiq {target:24} {time.monotonic() - t0:5.1f}s  "
                          f"{s['jobs_per_s']:,.0f} jobs/s{cpu}, redis {s['redis_us']:.1f} µs/job, "
                          f"{s['clients']} redis conns; paced p50/p99 {p['p50_ms']:.3f}/{p['p99_ms']:.3f} ms",
                          flush=True)
            for p in procs:
                if not p.alive():
                    raise BenchError(f"{p.name} died:\n{p.log_tail()}")

        if not args.skip_scaling:
            # Fresh instances (redis-server too) so memory freed by the benchmark runs or by the previous
            # measurement does not hide the cost of a connection.
            for target in targets:
                try:
                    r2 = start_server("redis")
                except ServerStartError as e:
                    raise BenchError(f"redis-server did not start: {e}") from None
                p2 = None
                try:
                    if target == "twemproxy":
                        p2, _ = start_twemproxy(r2.port, tempfile.mkdtemp(dir=tmp))
                    elif target in ksp_spec:
                        p2, _ = start_keyspace_proxy(r2.port, tmp, ksp_spec[target][1], ksp_spec[target][0],
                                                     target, admin)
                    if p2:
                        procs.append(p2)
                    res.memory[target] = idle_memory(target, p2.port if p2 else r2.port, p2.pid if p2 else None,
                                                     r2.port, r2.process.pid, mem_count)
                finally:
                    if p2:
                        p2.stop()
                    r2.stop()
            for x, m in res.memory.items():
                print(f"idle connections {x:24} proxy {m['proxy_kb']:.1f} KB/conn, redis-server "
                      f"{m['redis_kb']:.1f} KB/conn, {m['upstream_conns']} upstream connections", flush=True)

        notes = existing_notes(args.out)
        text = render(res, args, cmdline, redis.version, twem_conf, ksp_argv, started,
                      time.monotonic() - t_start, mem_count, fd_limit, notes, proxy_desc, ksp_argvs)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp_out = args.out + ".tmp"
        with open(tmp_out, "w") as f:
            f.write(text)
        os.replace(tmp_out, args.out)
        print(f"wrote {args.out}")
        print("\n".join(cpu_table(res)))
        if baseline:
            print("\n".join(baseline_summary(res)))
        if res.sidekiq:
            print("\n".join(sidekiq_tables(res)))
        print("\n".join(targets_section(res)[2:]))
        return 0
    except (BenchError, sidekiq_load.LoadError) as e:
        print(f"bench/run.py: BROKEN: {e}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.stop()
        if redis:
            redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
