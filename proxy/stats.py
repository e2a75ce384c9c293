"""Counters kept in plain Python ints on the hot path, read by the metrics collector.

prometheus-client objects take a lock and do label look-ups on every call; a
proxy counts several things per request, so it keeps ints here and the
collector (metrics.py) turns them into metric families only when scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from time import get_clock_info, perf_counter

from proxy.speedups import C

REFUSAL_LOG_BURST = 10     # refusal log lines per route ...
REFUSAL_LOG_WINDOW = 10.0  # ... per this many seconds
DEPTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class PyHistogram:
    """A histogram as plain counters: per-bucket counts and a sum (the count and the
    cumulative buckets are worked out when read, i.e. when scraped). `since(t0)`
    observes perf_counter() - t0. The reference for proxy._speedups.Hist, which
    does the same in one C call."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def since(self, t0: float) -> None:
        self.observe(perf_counter() - t0)

    @property
    def count(self) -> int:
        return sum(self.counts)


def buckets(self) -> list[tuple[str, int]]:
    """Cumulative (upper bound, count) pairs, +Inf last, as Prometheus wants them."""
    out, total = [], 0
    counts = self.counts
    for bound, n in zip(self.bounds, counts):
        total += n
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + counts[-1]))
    return out


# The latency histograms: two per batch of requests while the admin port is on, so the
# C version (one call: read the clock, add one to a bucket) where it is compiled and
# reads perf_counter's clock (CLOCK_MONOTONIC: Linux; elsewhere perf_counter may use another).
_SAME_CLOCK = get_clock_info("perf_counter").implementation == "clock_gettime(CLOCK_MONOTONIC)"
_Hist = C.Hist if C is not None and hasattr(C, "Hist") and _SAME_CLOCK else PyHistogram


class Histogram(_Hist):
    __slots__ = ()
    buckets = buckets


class DepthHistogram:
    """A histogram of small integers (requests per read), kept as hits per value so
    that recording one is a single list increment. Read like Histogram: buckets(),
    sum, count (worked out when read, i.e. when scraped)."""

    __slots__ = ("bounds", "hits", "top", "_over")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.top = bounds[-1] + 1
        self.hits = [0] * (self.top + 1)   # hits[top]: values above the last bound
        self._over = 0                      # their sum

    def observe(self, value: int) -> None:
        if value < self.top:
            self.hits[value] += 1
        else:
            self.hits[self.top] += 1
            self._over += value

    @property
    def counts(self) -> list[int]:
        counts = [0] * (len(self.bounds) + 1)
        for v, n in enumerate(self.hits[:self.top]):
            if n:
                counts[bisect_left(self.bounds, v)] += n
        counts[-1] += self.hits[self.top]
        return counts

    @property
    def sum(self) -> int:
        return sum(v * n for v, n in enumerate(self.hits[:self.top])) + self._over

    @property
    def count(self) -> int:
        return sum(self.hits)

    buckets = buckets


class LogLimit:
    """Rate limit for one kind of log line: at most REFUSAL_LOG_BURST lines per
    REFUSAL_LOG_WINDOW seconds, so a misbehaving client cannot flood the log."""

    __slots__ = ("window", "lines", "quiet")

    def __init__(self):
        self.window = float("-inf")  # start of the current window (monotonic seconds)
        self.lines = 0
        self.quiet = 0

    def may_log(self, now: float) -> int | None:
        """None to stay quiet, else how many lines went unlogged before this one."""
        if now - self.window >= REFUSAL_LOG_WINDOW:
            self.window, self.lines = now, 0
        if self.lines >= REFUSAL_LOG_BURST:
            self.quiet += 1
            return None
        self.lines += 1
        quiet, self.quiet = self.quiet, 0
        return quiet


class RouteStats:
    """Everything counted for one route (listener)."""

    def __init__(self, name: str):
        self.name = name
        self.clients = 0
        self.accepted = 0
        self.closed: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        # unexpected_reply: a reply no request waited for (the link is closed, never the
        # reply handed on); output_limit: a client that did not read its replies was
        # disconnected; internal: a bug cost one client its connection (logged);
        # cluster_redirect: a -MOVED / -ASK answered -TRYAGAIN (proxy/cluster_route.py);
        # orphan_reply: a blocking command served after its client left (proxy/bpool.py);
        # tls_handshake: a client's TLS handshake with a TLS listener failed (server.Listener).
        self.errors = {"upstream": 0, "protocol": 0, "refused": 0, "unexpected_reply": 0, "output_limit": 0,
                       "internal": 0, "cluster_redirect": 0, "orphan_reply": 0, "tls_handshake": 0}
        # limits.blocking_pool: blocking commands served on a borrowed pooled connection,
        # and those that waited for one because the route's pool was full
        self.blocking_borrows = 0
        self.blocking_waits = 0
        # -MOVED / -ASK answers cluster nodes gave this route's requests (followed by the
        # proxy, or answered -TRYAGAIN: errors["cluster_redirect"])
        self.cluster_redirects = {"MOVED": 0, "ASK": 0}
        self.keys_rewritten = 0
        self.bytes_in = {"client": 0, "upstream": 0}
        self.bytes_out = {"client": 0, "upstream": 0}
        self.upstream_connections = 0
        self.upstream_opened = 0
        self.upstream_failures = 0
        self.upstream_up: int | None = None
        # 1: the upstream user is fenced to the namespace by a Redis ACL (checked at start
        # and on reload, server.probe_fence); 0: it is not, or it was not checked
        self.upstream_fenced = 0
        self.fenced_for = None   # fence.key() of the route that check was for
        # Clients turned away at accept: max_clients (the process's), listener_max_clients
        # (the listener's), fd_limit (accept() itself failed: out of file descriptors).
        self.rejected: dict[str, int] = {}
        # Upstream connections declared dead for owing a reply past limits.reply_timeout.
        self.upstream_timeouts = 0
        self.depth = DepthHistogram(DEPTH_BUCKETS)
        self.request_seconds = Histogram(SECONDS_BUCKETS)
        self.roundtrip_seconds = Histogram(SECONDS_BUCKETS)
        # Commands are counted on their plans (rewrite.Plan): plan.count += 1.
        self._plans: dict = {}
        self._fast: dict = {}        # per target: command name as sent -> C Spec (speedups)
        self.uncached_commands = 0
        self._refusal_log = LogLimit()
        # client authentication (a listener with users): attempts, and their log lines
        self.auth_successes = 0
        self.auth_failures = 0
        self.auth_log = LogLimit()

    def plans_for(self, target) -> dict:
        """The plan cache of one keyspace target (and policy: plans depend on both)."""
        cache = self._plans.get(target)
        if cache is None:
            cache = self._plans[target] = {}
        return cache

    def fast_for(self, target) -> dict:
        """The C path's specs of one keyspace target (a subset of its plans)."""
        specs = self._fast.get(target)
        if specs is None:
            specs = self._fast[target] = {}
        return specs

    def closed_reason(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1

    def refused_command(self, name: str) -> None:
        self.refused[name] = self.refused.get(name, 0) + 1  # bounded to known names when read
        self.errors["refused"] += 1

    def may_log_refusal(self, now: float) -> int | None:
        """Rate limit for refusal log lines: None to stay quiet, else how many refusals
        went unlogged before this one. A misbehaving client cannot flood the log: at most
        REFUSAL_LOG_BURST lines per REFUSAL_LOG_WINDOW seconds per route."""
        return self._refusal_log.may_log(now)

    def commands(self, known) -> dict[str, int]:
        """Commands by lowercase name; names the command table does not know are "other"."""
        out: dict[str, int] = {"other": self.uncached_commands} if self.uncached_commands else {}
        for cache in list(self._plans.values()):
            for plan in list(cache.values()):
                n = plan.count + (plan.fast.count if plan.fast is not None else 0)
                if n:
                    label = plan.label if plan.label in known else "other"
                    out[label] = out.get(label, 0) + n
        return out
