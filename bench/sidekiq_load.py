#!/usr/bin/env python3
"""A Sidekiq-shaped load for the benchmark (issue 12, item 6): the commands Sidekiq 6.4 / 7.3 send,
at the connection counts a small Sidekiq deployment holds.

    python bench/sidekiq_load.py --port 6380                   # through a proxy that adds the namespace
    python bench/sidekiq_load.py --port 6379 --prefix bench:    # directly: the load applies the namespace itself
    python bench/sidekiq_load.py --port 6379 --prefix bench: --jobs 500 --paced-seconds 1

bench/run.py runs it against each target in its interleaved rounds (`run()` below); run alone it prints
its figures as JSON (no CPU figures: those need the process ids, which run.py has).

What it sends (checked against sidekiq 7.3.10's lib/, /work/shared/gems, and Sidekiq 6.4):
- pushers (web processes; `--pushers` connections): Sidekiq 7's `Client#raw_push`, a pipeline of
  `SADD queues <q>` + `LPUSH queue:<q> <job json>`, on even-numbered connections; Sidekiq 6's, the same
  two commands in `MULTI`/`EXEC`, on odd-numbered ones. Every `--scheduled-every`-th job is pushed for
  later instead: `ZADD schedule <at> <job>` (`at` = now + `--delay`), in a pipeline or MULTI likewise.
- workers (`--processes` processes x `--threads` threads, one connection each, as Sidekiq's pool gives
  every processor thread its own): `BRPOP queue:critical queue:default queue:low 2` (Sidekiq's fetch,
  TIMEOUT = 2). Every `--fail-every`-th job fails its first attempt: `ZADD retry <now + delay> <job>`.
- scheduler (one connection): `SCRIPT LOAD` of Sidekiq 7.3's LUA_ZPOPBYSCORE (ZRANGE BYSCORE LIMIT 0 1 +
  ZREM), then every `--poll-interval` s, for `schedule` then `retry`: `EVALSHA sha 1 <set> <now>` until
  it returns nil, pushing each job it returns as a client push (pipeline SADD + LPUSH).
- heartbeats (one connection per process, every `--beat-interval` s, first one at start): Sidekiq 7.3's
  `Launcher#❤`: a pipeline of INCRBY/EXPIRE of `stat:processed[:date]` and `stat:failed[:date]` (when
  something was processed), `MULTI UNLINK <id>:work HSET <id>:work ... EXPIRE <id>:work 60 EXEC`, `PING`
  (check_rtt), `MULTI SADD processes <id> EXISTS <id> HSET <id> info .. busy .. beat .. rtt_us .. quiet ..
  rss .. EXPIRE <id> 60 RPOP <id>-signals EXEC`.
Intervals are shortened from Sidekiq's (poll ~5 s x processes, beat 10 s) so a few-second phase sees
every kind of traffic. All connections speak RESP2 (Sidekiq 7's redis-client sends HELLO 3; the proxy
keeps RESP2 and RESP3 clients on separate shared connections, so the shape of the traffic is the same).

Two parts, both with every connection above open and busy:
- saturated: `--jobs` jobs pushed as fast as the pushers get replies; jobs per second = jobs pushed
  to a queue directly and fetched / (their last fetch - first push), so the scheduled and retried jobs'
  wait for the poller (up to `--delay` + `--poll-interval`) does not count as time; their commands are
  in the CPU figures all the same (run.py divides CPU over the whole part by the jobs pushed).
- paced: `--paced-rate` jobs/s for `--paced-seconds`, well below saturation; latency per job is enqueue
  (just before the push is written) to dequeue (BRPOP reply parsed), for jobs pushed to a queue directly
  (scheduled and retried jobs wait for the poller by design and are left out).
Counts are exact: every job is fetched exactly once per attempt (once, or twice if it fails its first
attempt), checked per job id, and afterwards every queue, `schedule` and `retry` is empty. A mismatch
raises LoadError.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import hiredis

QUEUES = ["critical", "default", "low"]
LUA_ZPOPBYSCORE = """local key, now = KEYS[1], ARGV[1]
local jobs = redis.call("zrange", key, "-inf", now, "byscore", "limit", 0, 1)
if jobs[1] then
  redis.call("zrem", key, jobs[1])
  return jobs[1]
end
"""
BRPOP_TIMEOUT = 2


class LoadError(RuntimeError):
    """The load found something wrong (a lost or duplicated job, an error reply, a wrong key)."""


@dataclass
class Shape:
    jobs: int = 10000              # saturated part
    paced_rate: float = 1000.0     # jobs per second, paced part
    paced_seconds: float = 3.0
    pushers: int = 10
    processes: int = 10
    threads: int = 5
    scheduled_every: int = 20      # every 20th job goes through `schedule`
    fail_every: int = 25           # every 25th job fails its first attempt and goes through `retry`
    delay: float = 0.05            # scheduled / retry delay, seconds
    poll_interval: float = 0.1
    beat_interval: float = 2.0
    timeout: float = 60.0          # per part: LoadError if the jobs are not all fetched by then
    settle: float = 0.3            # after connecting: first heartbeats written, workers blocked in BRPOP
    push_style: str = "mixed"      # mixed: even pushers pipeline (Sidekiq 7), odd ones MULTI (Sidekiq 6);
                                   # or every pusher "pipeline" / "multi" (to see what each costs)

    @classmethod
    def quick(cls) -> "Shape":
        return cls(jobs=300, paced_rate=500.0, paced_seconds=0.2, pushers=4, processes=2, threads=3,
                   beat_interval=0.5, timeout=20.0, settle=0.1)

    def describe(self) -> str:
        style = {"mixed": "half Sidekiq 7 pipelines, half Sidekiq 6 MULTI", "pipeline": "Sidekiq 7 pipelines",
                 "multi": "Sidekiq 6 MULTI"}[self.push_style]
        return (f"{self.pushers} pusher connections ({style}), "
                f"{self.processes} worker processes x {self.threads} threads blocked in BRPOP over "
                f"{len(QUEUES)} queues, 1 scheduler (EVALSHA every {self.poll_interval:g} s), "
                f"{self.processes} heartbeat connections (every {self.beat_interval:g} s); 1 job in "
                f"{self.scheduled_every} scheduled, 1 in {self.fail_every} retried once; "
                f"saturated part {self.jobs:,} jobs, paced part {self.paced_rate:,.0f} jobs/s for "
                f"{self.paced_seconds:g} s")


# --------------------------------------------------------------------------- a minimal RESP2 client

class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.r, self.w = reader, writer
        self.parser = hiredis.Reader()

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def pipeline(self, cmds: list[tuple]) -> list:
        self.w.write(b"".join(hiredis.pack_command(c) for c in cmds))
        out = []
        while len(out) < len(cmds):
            rep = self.parser.gets()
            if rep is False:
                data = await self.r.read(65536)
                if not data:
                    raise LoadError(f"connection closed during {cmds[0][0]}")
                self.parser.feed(data)
                continue
            out.append(rep)
        for c, rep in zip(cmds, out):
            if isinstance(rep, hiredis.ReplyError) or (
                    isinstance(rep, list) and any(isinstance(x, hiredis.ReplyError) for x in rep)):
                raise LoadError(f"{c[0]} {c[1:3]}...: error reply {rep!r}")
        return out

    async def call(self, *args):
        return (await self.pipeline([args]))[0]

    async def multi(self, cmds: list[tuple]) -> list:
        """MULTI, the commands, EXEC in one write (as redis-client sends a multi block); EXEC's array."""
        out = await self.pipeline([("MULTI",)] + cmds + [("EXEC",)])
        if out[0] != b"OK" or any(x != b"QUEUED" for x in out[1:-1]) or not isinstance(out[-1], list):
            raise LoadError(f"MULTI block answered {out!r}")
        return out[-1]

    def close(self) -> None:
        self.w.close()


# --------------------------------------------------------------------------- the load

@dataclass
class Part:
    name: str
    jobs: int
    expected: int                       # executions: jobs + first-attempt failures
    executions: int = 0
    first_push: float = 0.0
    last_fetch: float = 0.0
    direct_fetches: int = 0              # first attempts of jobs pushed to a queue (not scheduled)
    last_direct_fetch: float = 0.0
    latencies: list[float] = field(default_factory=list)
    attempts: dict[str, list[int]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Load:
    def __init__(self, host: str, port: int, prefix: str, shape: Shape):
        self.host, self.port, self.prefix, self.s = host, port, prefix, shape
        self.part: Part | None = None
        self.parts: dict[str, Part] = {}
        self.processed = [0] * shape.processes
        self.failed = [0] * shape.processes
        self.busy = [0] * shape.processes
        self.sha = ""
        self.tasks: list[asyncio.Task] = []
        self.conns: list[Conn] = []
        self.pushers: list[Conn] = []
        self.errors: list[BaseException] = []
        self.commands = {"pushes": 0, "evalsha": 0, "beats": 0, "brpop_timeouts": 0}

    def k(self, key: str) -> str:
        return self.prefix + key

    async def connect(self) -> Conn:
        c = await Conn.open(self.host, self.port)
        self.conns.append(c)
        return c

    # -- jobs
    def job(self, part: str, i: int, queue: str) -> dict:
        now = time.time()
        return {"retry": True, "queue": queue, "class": "HardWorker", "args": [i, "user-%06d" % i, {"n": i}],
                "jid": f"{part[0]}{i:023x}", "created_at": now, "enqueued_at": now,
                "attempt": 0, "t": time.perf_counter()}

    async def push(self, conn: Conn, job: dict, multi: bool, at: float | None = None) -> None:
        if at is not None:
            job = dict(job)
            job.pop("enqueued_at", None)
            cmds = [("ZADD", self.k("schedule"), repr(at), json.dumps(job))]
        else:
            job["enqueued_at"] = time.time()
            cmds = [("SADD", self.k("queues"), job["queue"]),
                    ("LPUSH", self.k("queue:" + job["queue"]), json.dumps(job))]
        if multi:
            await conn.multi(cmds)
        else:
            await conn.pipeline(cmds)
        self.commands["pushes"] += 1

    async def pusher(self, n: int, conn: Conn, part: Part, rate: float | None) -> None:
        s = self.s
        t0 = time.perf_counter()
        # odd pushers: Sidekiq 6 (MULTI); even: Sidekiq 7 (pipeline)
        multi = {"mixed": n % 2 == 1, "pipeline": False, "multi": True}[s.push_style]
        for i in range(n, part.jobs, s.pushers):
            if rate:
                wait = t0 + i / rate - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            job = self.job(part.name, i, QUEUES[i % len(QUEUES)])
            if not part.first_push:
                part.first_push = time.perf_counter()
            if i % s.scheduled_every == s.scheduled_every - 1:
                job["scheduled"] = True
                await self.push(conn, job, multi, at=time.time() + s.delay)
            else:
                await self.push(conn, job, multi)

    # -- workers
    async def worker(self, proc: int, conn: Conn) -> None:
        s = self.s
        keys = [self.k("queue:" + q) for q in QUEUES]
        want = tuple(k.encode() for k in keys)
        while True:
            rep = await conn.call("BRPOP", *keys, BRPOP_TIMEOUT)
            if rep is None:
                self.commands["brpop_timeouts"] += 1
                continue
            now = time.perf_counter()
            key, payload = rep
            # Through a proxy the reply names the queue as the client sent it (the namespace stripped).
            if key not in want:
                raise LoadError(f"BRPOP replied with key {key!r}, expected one of {want!r}")
            job = json.loads(payload)
            part = self.parts.get(job["jid"][0])
            if part is None:
                raise LoadError(f"fetched a job of no part: {payload[:200]!r}")
            part.attempts.setdefault(job["jid"], []).append(job["attempt"])
            part.executions += 1
            part.last_fetch = now
            if job["attempt"] == 0 and not job.get("scheduled"):
                part.latencies.append(now - job["t"])
                part.direct_fetches += 1
                part.last_direct_fetch = now
            i = job["args"][0]
            self.busy[proc] += 1
            if job["attempt"] == 0 and i % s.fail_every == 0:
                job.update(attempt=1, retry_count=0, error_message="boom", error_class="RuntimeError",
                           failed_at=time.time())
                await conn.call("ZADD", self.k("retry"), repr(time.time() + s.delay), json.dumps(job))
                self.failed[proc] += 1
            else:
                self.processed[proc] += 1
            self.busy[proc] -= 1
            if part.executions >= part.expected:
                part.done.set()

    # -- scheduler
    async def scheduler(self, conn: Conn) -> None:
        while True:
            for zset in ("schedule", "retry"):
                while True:
                    job = await conn.call("EVALSHA", self.sha, 1, self.k(zset), repr(time.time()))
                    self.commands["evalsha"] += 1
                    if job is None:
                        break
                    await self.push(conn, json.loads(job), multi=False)
            await asyncio.sleep(self.s.poll_interval)

    # -- heartbeats
    async def heartbeat(self, proc: int, conn: Conn) -> None:
        identity = f"worker-{proc}:{os.getpid()}:0123456789ab"
        info = json.dumps({"hostname": f"worker-{proc}", "started_at": time.time(), "pid": os.getpid(),
                           "tag": "bench", "concurrency": self.s.threads, "queues": QUEUES,
                           "weights": [{q: 0 for q in QUEUES}], "labels": [], "identity": identity,
                           "version": "7.3.10", "embedded": False})
        nowdate = time.strftime("%Y-%m-%d", time.gmtime())
        while True:
            procd, fails = self.processed[proc], self.failed[proc]
            self.processed[proc] = self.failed[proc] = 0
            if procd + fails:
                await conn.pipeline([("INCRBY", self.k("stat:processed"), procd),
                                     ("INCRBY", self.k(f"stat:processed:{nowdate}"), procd),
                                     ("EXPIRE", self.k(f"stat:processed:{nowdate}"), 157680000),
                                     ("INCRBY", self.k("stat:failed"), fails),
                                     ("INCRBY", self.k(f"stat:failed:{nowdate}"), fails),
                                     ("EXPIRE", self.k(f"stat:failed:{nowdate}"), 157680000)])
            work = self.k(f"{identity}:work")
            cmds = [("UNLINK", work)]
            if self.busy[proc]:
                cmds += [("HSET", work, "tid-1", json.dumps({"queue": "default", "run_at": time.time()})),
                         ("EXPIRE", work, 60)]
            await conn.multi(cmds)
            t = time.perf_counter()
            await conn.call("PING")
            rtt = int((time.perf_counter() - t) * 1e6)
            await conn.multi([("SADD", self.k("processes"), identity),
                              ("EXISTS", self.k(identity)),
                              ("HSET", self.k(identity), "info", info, "busy", self.busy[proc],
                               "beat", repr(time.time()), "rtt_us", rtt, "quiet", "false", "rss", 65536),
                              ("EXPIRE", self.k(identity), 60),
                              ("RPOP", self.k(f"{identity}-signals"))])
            self.commands["beats"] += 1
            await asyncio.sleep(self.s.beat_interval)

    def spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        t.add_done_callback(self._done)
        self.tasks.append(t)

    def _done(self, t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is not None:
            self.errors.append(t.exception())
            for p in self.parts.values():
                p.done.set()      # wake the waiting part: it re-raises below

    def check(self) -> None:
        if self.errors:
            e = self.errors[0]
            raise LoadError(f"{type(e).__name__}: {e}") from e

    async def run_part(self, part: Part, rate: float | None, probe: Callable[[], dict]) -> dict:
        self.parts[part.name[0]] = part
        before = probe()
        t0 = time.perf_counter()
        pushers = [asyncio.create_task(self.pusher(n, c, part, rate)) for n, c in enumerate(self.pushers)]
        try:
            await asyncio.wait_for(asyncio.gather(*pushers), self.s.timeout)
            await asyncio.wait_for(part.done.wait(), max(1.0, self.s.timeout - (time.perf_counter() - t0)))
        except asyncio.TimeoutError:
            raise LoadError(f"{part.name}: {part.executions} of {part.expected} executions within "
                            f"{self.s.timeout:g} s") from None
        finally:
            for p in pushers:
                p.cancel()
        self.check()
        after = probe()
        return {"before": before, "after": after}

    def verify(self, part: Part) -> None:
        s = self.s
        bad = []
        for i in range(part.jobs):
            jid = f"{part.name[0]}{i:023x}"
            want = [0, 1] if i % s.fail_every == 0 else [0]
            got = sorted(part.attempts.get(jid, []))
            if got != want:
                bad.append(f"{jid}: fetched attempts {got}, expected {want}")
        if len(part.attempts) != part.jobs:
            bad.append(f"{len(part.attempts)} job ids fetched, {part.jobs} pushed")
        if bad:
            raise LoadError(f"{part.name}: {len(bad)} jobs not fetched exactly once per attempt: "
                            + "; ".join(bad[:5]))


def expected_executions(jobs: int, fail_every: int) -> int:
    return jobs + len(range(0, jobs, fail_every))


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run(host: str, port: int, prefix: str, shape: Shape,
              probe: Callable[[], dict] = lambda: {}) -> dict:
    """Run both parts against host:port; return per-part figures and the probe's readings
    (run.py's probe reads CPU seconds and Redis's INFO at the start and end of each part)."""
    ld = Load(host, port, prefix, shape)
    try:
        sched = await ld.connect()
        ld.sha = (await sched.call("SCRIPT", "LOAD", LUA_ZPOPBYSCORE)).decode()
        ld.pushers = [await ld.connect() for _ in range(shape.pushers)]
        beats = [await ld.connect() for _ in range(shape.processes)]
        workers = [[await ld.connect() for _ in range(shape.threads)] for _ in range(shape.processes)]
        for p, conns in enumerate(workers):
            for c in conns:
                ld.spawn(ld.worker(p, c))
        for p, c in enumerate(beats):
            ld.spawn(ld.heartbeat(p, c))
        ld.spawn(ld.scheduler(sched))
        await asyncio.sleep(shape.settle)   # first heartbeats written, every worker blocked in BRPOP
        ld.check()
        out = {"connections": len(ld.conns)}
        sat = Part("saturated", shape.jobs, expected_executions(shape.jobs, shape.fail_every))
        out["saturated"] = await ld.run_part(sat, None, probe)
        n_paced = max(1, int(shape.paced_rate * shape.paced_seconds))
        paced = Part("paced", n_paced, expected_executions(n_paced, shape.fail_every))
        out["paced"] = await ld.run_part(paced, shape.paced_rate, probe)
        await asyncio.sleep(0.05)       # a duplicate delivered late would show up in verify()
        ld.check()
        for part in (sat, paced):
            ld.verify(part)
            out[part.name].update(
                jobs=part.jobs, executions=part.executions, seconds=part.last_fetch - part.first_push,
                jobs_per_s=part.direct_fetches / (part.last_direct_fetch - part.first_push),
                latency_n=len(part.latencies),
                p50_ms=(pct(part.latencies, 50) or 0) * 1e3, p99_ms=(pct(part.latencies, 99) or 0) * 1e3,
                avg_ms=statistics.fmean(part.latencies) * 1e3 if part.latencies else 0.0)
        out["counts"] = dict(ld.commands)
    finally:
        for t in ld.tasks:
            t.cancel()
        await asyncio.gather(*ld.tasks, return_exceptions=True)
        for c in ld.conns:
            c.close()
    # Nothing left behind: queues, schedule and retry empty (read through the same target).
    c = await Conn.open(host, port)
    try:
        left = await c.pipeline([("LLEN", prefix + "queue:" + q) for q in QUEUES] +
                                [("ZCARD", prefix + "schedule"), ("ZCARD", prefix + "retry")])
    finally:
        c.close()
    if any(left):
        raise LoadError(f"left behind: {dict(zip(QUEUES + ['schedule', 'retry'], left))}")
    return out


def main(argv: list[str] | None = None) -> int:
    d = Shape()
    ap = argparse.ArgumentParser(description="Sidekiq-shaped load against one Redis or proxy.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", default="", help="namespace the load applies itself (direct to Redis)")
    ap.add_argument("--quick", action="store_true", help="tiny counts")
    ap.add_argument("--push-style", choices=["mixed", "pipeline", "multi"], default=None,
                    help="mixed (default): even pushers send Sidekiq 7 pipelines, odd ones Sidekiq 6 MULTI")
    for name in ("jobs", "pushers", "processes", "threads", "scheduled_every", "fail_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("paced_rate", "paced_seconds", "delay", "poll_interval", "beat_interval", "timeout", "settle"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    a = ap.parse_args(argv)
    shape = Shape.quick() if a.quick else d
    for k in shape.__dataclass_fields__:
        v = getattr(a, k, None)
        if v is not None:
            setattr(shape, k, v)
    try:
        out = asyncio.run(run(a.host, a.port, a.prefix, shape))
    except (LoadError, OSError) as e:
        print(f"sidekiq_load: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
