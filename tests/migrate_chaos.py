"""Kill-and-rerun harness for `keyspace-proxy migrate` (tests/test_migrate_exactly_once.py runs
it briefly, scripts/migrate_soak.py for long).

Producers keep pushing unique jobs to the source (LPUSH to two queues, ZADD to a schedule),
consumers keep popping them from the target (BRPOP-like RPOP, ZPOPMIN) and, in move
scenarios, from the source as well (old workers still running). `migrate` runs as a
subprocess and is SIGKILLed after random delays, over and over, with and without --state;
then the producers stop, one last run completes, and the multiset of every job ever pushed
is compared with what was consumed plus what is left on both sides: any job seen twice is a
duplicate, any job not seen a loss."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUES = ("queue:default", "queue:mail")
SCHEDULE = "schedule"
RESERVED = b"keyspace-proxy:migrate:"


class Chaos:
    def __init__(self, src_url: str, dst_url: str, src_ns: str = "sidekiq", seed: int = 0,
                 preload: int = 1500, batch: int = 2, log=print, dst_ns: str = "", migrate_to: str | None = None,
                 migrate_from: str | None = None):
        # src_url/dst_url: where producers and consumers connect; migrate_from/migrate_to: the
        # --from/--to of migrate when they differ (a cluster URL, and the clients then at the
        # owner of the namespace's one slot)
        self.src_url, self.dst_url, self.ns = src_url, dst_url, src_ns
        self.dst_ns, self.migrate_to, self.migrate_from = dst_ns, migrate_to or dst_url, migrate_from or src_url
        self.src = redis.Redis.from_url(src_url)
        self.dst = redis.Redis.from_url(dst_url)
        self.rng = random.Random(seed)
        self.preload, self.batch, self.log = preload, batch, log
        self.pushed: list[bytes] = []
        self.consumed: list[bytes] = []
        self.lock = threading.Lock()
        self.stop_producing = threading.Event()
        self.stop_consuming = threading.Event()
        self.threads: list[threading.Thread] = []
        self.kills = self.runs = self.finished = self.kills_in_flight = 0
        self.seq = 0

    # --- the live sides ---------------------------------------------------------------------
    def _job(self, tag: str) -> bytes:
        with self.lock:
            self.seq += 1
            job = f'{{"jid":"{tag}{self.seq}","class":"MailJob"}}'.encode()
            self.pushed.append(job)
            return job

    def src_key(self, name: str) -> str:
        return f"{self.ns}:{name}" if self.ns else name

    def dst_key(self, name: str) -> str:
        return f"{self.dst_ns}:{name}" if self.dst_ns else name

    def backlog(self, n: int) -> None:
        jobs = [self._job("b") for _ in range(n)]
        self.src.lpush(self.src_key(QUEUES[0]), *jobs[:n // 2])
        self.src.zadd(self.src_key(SCHEDULE), {j: float(i) for i, j in enumerate(jobs[n // 2:])})

    def load(self) -> None:
        for q in QUEUES:
            jobs = [self._job("pre") for _ in range(self.preload)]
            for i in range(0, len(jobs), 500):
                self.src.lpush(self.src_key(q), *jobs[i:i + 500])
        jobs = {self._job("pre"): float(i) for i in range(self.preload)}
        self.src.zadd(self.src_key(SCHEDULE), jobs)

    def _produce(self) -> None:
        r = redis.Redis.from_url(self.src_url)
        n = 0
        while not self.stop_producing.is_set():
            n += 1
            if n % 3:
                r.lpush(self.src_key(QUEUES[n % 2]), self._job("p"))
            else:
                r.zadd(self.src_key(SCHEDULE), {self._job("s"): time.time()})
            time.sleep(0.001)

    def _consume(self, url: str, names: list[str]) -> None:
        r = redis.Redis.from_url(url)
        while not self.stop_consuming.is_set():
            got = False
            for name in names:
                if name.endswith(SCHEDULE):
                    v = r.zpopmin(name)
                    v = v[0][0] if v else None
                else:
                    v = r.rpop(name)
                if v is not None:
                    got = True
                    with self.lock:
                        self.consumed.append(v)
            if not got:
                time.sleep(0.002)

    def start(self, source_consumer: bool) -> None:
        self.threads = [threading.Thread(target=self._produce, daemon=True),
                        threading.Thread(target=self._consume,
                                         args=(self.dst_url, [self.dst_key(n) for n in (*QUEUES, SCHEDULE)]),
                                         daemon=True)]
        if source_consumer:
            self.threads.append(threading.Thread(
                target=self._consume, args=(self.src_url, [self.src_key(n) for n in (*QUEUES, SCHEDULE)]),
                daemon=True))
        for t in self.threads:
            t.start()

    # --- migrate, killed ----------------------------------------------------------------------
    def migrate_args(self, move: bool, state: str | None) -> list[str]:
        args = [sys.executable, "-m", "proxy", "migrate", "--from", self.migrate_from, "--to", self.migrate_to,
                "--batch", str(self.batch)]
        if self.dst_ns:
            args += ["--to-namespace", self.dst_ns]
        if self.ns:
            args += ["--from-namespace", self.ns]
        if move:
            args.append("--move")
        if state:
            args += ["--state", state]
        return args

    def kill_loop(self, rounds: int, move: bool, state_dir: str, max_delay: float = 1.0) -> None:
        """Start migrate, SIGKILL it after a random delay; every other round with --state.
        A run that finishes before its delay is not a kill: up to 3 x `rounds` runs are made
        until `rounds // 2` of them were killed, so how fast this machine is today does not
        decide whether the test saw kills."""
        state = os.path.join(state_dir, "migrate-state.json")
        kills_before = self.kills
        i = 0
        while i < rounds or (self.kills - kills_before < rounds // 2 and i < 3 * rounds):
            i += 1
            self.backlog(self.preload // 3)  # a burst, so that every run has work to be killed in
            self.runs += 1
            p = subprocess.Popen(self.migrate_args(move, state if i % 2 else None), cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(self.rng.uniform(0.05, max_delay))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                self.kills += 1
            else:
                self.finished += 1
            out, err = p.communicate()
            if self.inflight():
                self.kills_in_flight += 1  # across servers: killed with a chunk between the sides
            if p.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"migrate failed ({p.returncode}): {out.decode()} {err.decode()}")

    def finish(self, move: bool) -> str:
        r = subprocess.run(self.migrate_args(move, None) + (["--verify"] if move else []), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    # --- the books ----------------------------------------------------------------------------
    def left(self) -> list[bytes]:
        out = []
        for r, names in ((self.src, [self.src_key(n) for n in (*QUEUES, SCHEDULE)]),
                         (self.dst, [self.dst_key(n) for n in (*QUEUES, SCHEDULE)])):
            for name in names:
                if r.type(name) == b"list":
                    out += r.lrange(name, 0, -1)
                else:
                    out += r.zrange(name, 0, -1)
        return out

    def inflight(self) -> int:
        """Chunks in flight on the source (one record hash, or one per slot on a cluster)."""
        return sum(self.src.hlen(k) for k in self.src.scan_iter(RESERVED + b"*inflight", _type="hash"))

    def journal_left(self) -> dict:
        """What migrate's own keys still hold after a completed run: nothing in flight."""
        return {"in flight": self.inflight(),
                "applied marks": sum(self.dst.hlen(k) for k in self.dst.scan_iter(RESERVED + b"*applied:*"))}

    def books(self) -> dict:
        pushed, seen = Counter(self.pushed), Counter(self.consumed) + Counter(self.left())
        dup = seen - pushed
        lost = pushed - seen
        return {"pushed": len(self.pushed), "consumed": len(self.consumed), "duplicates": sum(dup.values()),
                "losses": sum(lost.values()), "examples": [x.decode() for x in list(dup)[:3] + list(lost)[:3]]}


def scenario(src_url: str, dst_url: str, kind: str, rounds: int, state_dir: str, seed: int = 0,
             preload: int = 3000, max_delay: float = 0.4, log=print, src_ns: str = "sidekiq", dst_ns: str = "",
             migrate_to: str | None = None, migrate_from: str | None = None) -> dict:
    """kind: "move" (kill-and-rerun --move, consumers on both sides) or "copy-then-move"
    (kill-and-rerun copies, then kill-and-rerun --move; consumers on the target only, as a copy
    with old workers still popping the source would run jobs twice by definition)."""
    c = Chaos(src_url, dst_url, src_ns=src_ns, seed=seed, preload=preload, log=log, dst_ns=dst_ns,
              migrate_to=migrate_to, migrate_from=migrate_from)
    c.load()
    c.start(source_consumer=(kind == "move"))
    try:
        if kind == "copy-then-move":
            c.kill_loop(rounds // 2, move=False, state_dir=state_dir, max_delay=max_delay)
            c.finish(move=False)
            c.kill_loop(rounds - rounds // 2, move=True, state_dir=state_dir, max_delay=max_delay)
        else:
            c.kill_loop(rounds, move=True, state_dir=state_dir, max_delay=max_delay)
        c.stop_producing.set()
        for t in c.threads[:1]:
            t.join(10)
        out = c.finish(move=True)
        time.sleep(0.2)
    finally:
        c.stop_producing.set()
        c.stop_consuming.set()
        for t in c.threads:
            t.join(10)
    report = dict(c.books(), kills=c.kills, kills_in_flight=c.kills_in_flight, runs=c.runs, finished=c.finished,
                  **c.journal_left())
    report["final"] = out.strip().splitlines()
    return report
