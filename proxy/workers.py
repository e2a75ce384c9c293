"""`--workers N`: N proxy processes sharing the listeners (SO_REUSEPORT), one supervisor.

One Python process runs on one core. With several workers the kernel spreads new
client connections over them (SO_REUSEPORT), so a machine with spare cores carries
more pipelined traffic (docs/benchmarks.md has the figures; at pipeline depth 1 on
2 busy cores it costs more than it gives, hence the default of 1).

The supervisor accepts no clients itself. It starts each worker as a fresh
`python -m proxy` with the same arguments and environment (no forked event loop
state), restarts a worker that dies, forwards SIGHUP/SIGTERM/SIGINT, and, when an
admin port is configured, serves it for all of them: each worker runs its own admin
port on 127.0.0.1 (a free port, reported back through a pipe once its listeners are
up) and the supervisor's /metrics is the sum of theirs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Config, ConfigError, format_addr
from proxy.logs import WORKER_ENV  # noqa: F401  set in a worker: its index (its log lines say worker=N)

log = logging.getLogger("keyspace-proxy")

REPORT_FD_ENV = "KEYSPACE_PROXY_REPORT_FD"    # where a worker writes its admin port once listening
START_TIMEOUT = 60.0
RESTART_DELAY = 1.0
ASK_TIMEOUT = 5.0
# Gauges that are one fact seen by every worker, not a quantity to add up.
_COMBINE = {"keyspace_proxy_build_info": max, "keyspace_proxy_config_generation": min,
            "keyspace_proxy_upstream_up": min}


def report_ready(admin_port: int | None) -> None:
    """In a worker: tell the supervisor that the listeners are up, and where the admin port is."""
    fd = os.environ.pop(REPORT_FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd), "w") as f:
            f.write(f"{admin_port or 0}\n")


def merge_metrics(texts: list[str]) -> list[Metric]:
    """Sum the workers' exposition texts sample by sample (counters, gauges, histogram
    buckets, sums and counts); the gauges in _COMBINE take min or max instead."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, list[float]]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            seen = values[fam.name]
            for s in fam.samples:
                seen.setdefault((s.name, tuple(sorted(s.labels.items()))), []).append(s.value)
    for name, fam in families.items():
        combine = _COMBINE.get(name, sum)
        for (sample, labels), vals in values[name].items():
            fam.add_sample(sample, dict(labels), combine(vals))
    return list(families.values())


class Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.listening = False          # reported back: its listeners are up
        self.admin_port: int | None = None
        self.exited_at: float | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, config: Config, workers: int, argv: list[str], load_config=None):
        self.config = config
        self.argv = argv
        self.load_config = load_config
        self.workers = [Worker(i) for i in range(workers)]
        self.restarts = 0
        self.exit_code = 1          # what the start's failure exits with: a worker's configuration error is 2
        self.httpd = None
        self.admin_httpd = None        # [admin] listen: POST /-/reload apart from /metrics
        self.admin_port: int | None = None
        self.token = config.admin_token   # what the workers hold too (same flags, variables, file)

    # -- worker processes

    def _spawn(self, w: Worker) -> None:
        r, wfd = os.pipe()
        env = dict(os.environ, **{WORKER_ENV: str(w.index), REPORT_FD_ENV: str(wfd)})
        args = [sys.executable, "-m", "proxy", *self.argv]
        if self.config.metrics_listen:
            args += ["--metrics-listen", "127.0.0.1:0"]  # a flag wins over the file and the env
        try:
            proc = subprocess.Popen(args, env=env, pass_fds=(wfd,))
        finally:
            os.close(wfd)
        w.proc, w.listening, w.admin_port, w.exited_at = proc, False, None, None

        def await_report() -> None:
            with os.fdopen(r) as f:
                line = f.readline().strip()
            if line and w.proc is proc:
                w.admin_port = int(line) or None
                w.listening = True
                log.info("worker %d listening (pid %d)", w.index, proc.pid, extra={"event": "worker_ready"})
        threading.Thread(target=await_report, name=f"worker-{w.index}-report", daemon=True).start()

    def start(self) -> bool:
        """Start every worker and wait until each listens; False if one could not start."""
        for w in self.workers:
            self._spawn(w)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if all(w.listening for w in self.workers):
                return True
            for w in self.workers:
                if not w.alive():
                    log.error("worker %d exited while starting (exit code %s)", w.index, w.proc.returncode,
                              extra={"event": "worker_exit"})
                    self.exit_code = 2 if w.proc.returncode == 2 else 1
                    return False
            time.sleep(0.05)
        log.error("workers did not start within %.0f s", START_TIMEOUT, extra={"event": "worker_exit"})
        return False

    def check(self) -> None:
        """Restart workers that died (after a pause, so a crash loop does not spin)."""
        now = time.monotonic()
        for w in self.workers:
            if w.alive():
                continue
            if w.exited_at is None:
                w.exited_at = now
                w.listening = False
                log.error("worker %d (pid %d) exited with code %s; restarting it", w.index, w.proc.pid,
                          w.proc.returncode, extra={"event": "worker_exit"})
            elif now - w.exited_at >= RESTART_DELAY:
                self.restarts += 1
                self._spawn(w)

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.alive():
                w.proc.send_signal(sig)

    def stop(self, timeout: float) -> None:
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time; killing it", w.index, extra={"event": "worker_exit"})
                w.proc.kill()
                w.proc.wait()

    # -- reload: validated here first, so an invalid file never reaches a worker

    def reload(self) -> tuple[bool, str]:
        if self.load_config is None:
            return False, "no configuration to re-read"
        try:
            new = self.load_config()
            check_config(new)
        except (ConfigError, OSError) as e:
            log.error("reload refused, the running configuration stays: %s", e, extra={"event": "reload"})
            return False, f"reload refused: {e}"
        if self.httpd is None or not self.token:  # workers re-read the file on SIGHUP
            self.signal_all(signal.SIGHUP)
            return True, f"reload signalled to {len(self.workers)} workers"
        results = [self._ask(w, "/-/reload", method="POST") for w in self.workers]
        ok = all(code == 200 for code, _ in results)
        if ok:
            self.token = new.admin_token
        body = "".join(f"worker {w.index}: {text.strip()}\n" for w, (_, text) in zip(self.workers, results))
        return ok, body.rstrip("\n")

    # -- the shared admin port

    def _ask(self, w: Worker, path: str, method: str = "GET") -> tuple[int, str]:
        if not w.alive() or w.admin_port is None:
            return 503, "not running"
        req = urllib.request.Request(f"http://127.0.0.1:{w.admin_port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
        if method == "POST" and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=ASK_TIMEOUT) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 503, f"unreachable: {e}"

    def collect(self):
        texts = []
        for w in self.workers:
            code, text = self._ask(w, "/metrics")
            if code == 200:
                texts.append(text)
        yield from merge_metrics(texts)
        running = GaugeMetricFamily("keyspace_proxy_workers", "Worker processes running and listening")
        running.add_metric([], sum(1 for w in self.workers if w.alive() and w.listening))
        yield running
        restarts = GaugeMetricFamily("keyspace_proxy_worker_restarts", "Workers restarted since start")
        restarts.add_metric([], self.restarts)
        yield restarts

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            return _reply(start_response, "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST)
        if path == "/-/reload":
            from proxy.metrics import reload_gate
            elsewhere = format_addr(*self.config.admin_listen) if self.config.admin_listen else None
            refused = reload_gate(environ, self.token, start_response, elsewhere)
            if refused is not None:
                return refused
            ok, message = self.reload()
            return _reply(start_response, "200 OK" if ok else "400 Bad Request", (message + "\n").encode())
        if path == "/healthz":
            down = [w.index for w in self.workers if not w.alive()]
            if down:
                return _reply(start_response, "503 Service Unavailable", f"workers down: {down}\n".encode())
            return _reply(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            results = [self._ask(w, "/readyz") for w in self.workers]
            body = "".join(f"worker {w.index}: {text.strip()}\n" for w, (_, text) in zip(self.workers, results))
            ok = all(code == 200 for code, _ in results)
            return _reply(start_response, "200 OK" if ok else "503 Service Unavailable", body.encode())
        return _reply(start_response, "404 Not Found",
                      b"not found: try /metrics, /healthz, /readyz, POST /-/reload\n")

    def admin_app(self, environ, start_response):
        """[admin] listen: POST /-/reload and /healthz only."""
        path = environ.get("PATH_INFO", "/")
        if path == "/-/reload":
            from proxy.metrics import reload_gate
            refused = reload_gate(environ, self.token, start_response)
            if refused is not None:
                return refused
            ok, message = self.reload()
            return _reply(start_response, "200 OK" if ok else "400 Bad Request", (message + "\n").encode())
        if path == "/healthz":
            return self.app(environ, start_response)
        return _reply(start_response, "404 Not Found", b"not found: this admin port serves POST /-/reload and "
                                                       b"/healthz; /metrics and /readyz are on [metrics] listen\n")

    def serve_admin(self) -> None:
        from proxy.metrics import admin_httpd
        if self.config.metrics_listen:
            host, port = self.config.metrics_listen
            self.httpd = admin_httpd(host, port, self.app)
            self.admin_port = self.httpd.server_port
            threading.Thread(target=self.httpd.serve_forever, name="admin", daemon=True).start()
            log.info("metrics on http://%s/metrics (also /healthz, /readyz), summed over %d workers",
                     format_addr(host, self.admin_port), len(self.workers))
        if self.config.admin_listen:
            host, port = self.config.admin_listen
            self.admin_httpd = admin_httpd(host, port, self.admin_app, "admin")
            threading.Thread(target=self.admin_httpd.serve_forever, name="admin-reload", daemon=True).start()
            log.info("admin on http://%s: POST /-/reload%s", format_addr(host, self.admin_httpd.server_port),
                     " with the admin token" if self.token else " is off (no admin token)")


def _reply(start_response, status: str, body: bytes, ctype: str = "text/plain; charset=utf-8"):
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def check_config(config: Config) -> None:
    """What several workers cannot share."""
    for route in config.routes:
        if route.listen[1] == 0:
            raise ConfigError(f"route {route.name}: listen port 0 gives each worker a different port; "
                              "give a fixed port with --workers")


def run_workers(config: Config, workers: int, argv: list[str], load_config=None) -> int:
    """The supervisor's main loop: until SIGTERM/SIGINT, or a worker that cannot start."""
    check_config(config)
    sup = Supervisor(config, workers, argv, load_config)
    events: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda s, _frame: events.append(s))
    if config.metrics_listen or config.admin_listen:
        sup.serve_admin()
    if not sup.start():
        sup.stop(config.limits.drain_timeout + 5)
        return sup.exit_code
    log.info("%d workers listening; supervisor pid %d", workers, os.getpid(), extra={"event": "ready"})
    while True:
        while events:
            sig = events.pop(0)
            if sig == signal.SIGHUP:
                ok, message = sup.reload()
                log.info("reload: %s", message, extra={"event": "reload"})
            else:
                log.info("stopping %d workers", workers, extra={"event": "stop"})
                sup.stop(config.limits.drain_timeout + 5)
                for httpd in (sup.httpd, sup.admin_httpd):
                    if httpd is not None:
                        httpd.shutdown()
                log.info("stopped")
                return 0
        sup.check()
        time.sleep(0.1)
