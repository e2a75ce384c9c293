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
    # issue 13: clients on the container's localhost only (a sidecar), so 6380 is not exposed;
    # reload over HTTP is off (no admin token in the image)
    assert set(" ".join(final.all("EXPOSE")).split()) == {"9121"}
    env = final.env()
    assert env["PROXY_LISTEN"] == "127.0.0.1:6380" and env["PROXY_METRICS_LISTEN"] == "0.0.0.0:9121"
    assert not {"PROXY_ADMIN_TOKEN", "PROXY_ADMIN_TOKEN_FILE"} & set(env)
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
    assert dockerignore_allows(patterns, "proxy/_speedups.c")
    for excluded in (".git", "tests/conftest.py", "build/lib", "proxy/__pycache__", "deploy/docker-compose.yml",
                     "proxy/_speedups.cpython-311-x86_64-linux-gnu.so"):
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
    assert c.env["PROXY_LISTEN"].startswith("127.0.0.1:")
    # the builder stage compiled the C hot path into the wheel (README, "The hot path in C")
    assert "hot path: C" in c.output(), c.output()
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


# -- deploy/: Kubernetes, compose, Prometheus, Grafana

import glob  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tomllib  # noqa: E402
import urllib.request  # noqa: E402

import yaml  # noqa: E402

from proxy.cli import ENV_FALLBACKS  # noqa: E402
from proxy.config import from_dict  # noqa: E402

DEPLOY = os.path.join(ROOT, "deploy")
CI = os.environ.get("CI", "").lower() == "true"
# Labels Prometheus or the scrape config add to the proxy's own.
TARGET_LABELS = {"instance", "job", "namespace", "pod", "le"}


def k8s_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "kubernetes", "*.yaml"))):
        with open(path) as f:
            docs += [(os.path.basename(path), d) for d in yaml.safe_load_all(f) if d]
    return docs


def k8s(kind: str) -> dict:
    (doc,) = [d for _, d in k8s_documents() if d["kind"] == kind]
    return doc


def test_kubernetes_manifests_validate():
    import kubernetes_validate
    version = kubernetes_validate.latest_version()
    kinds = set()
    for name, doc in k8s_documents():
        kinds.add(doc["kind"])
        if doc["kind"] == "PodMonitor":
            continue  # a CRD: kubernetes-validate has no schema for it; checked in test_podmonitor_targets_the_sidecar
        kubernetes_validate.validate(doc, version, strict=True)
    assert {"ConfigMap", "Deployment", "PodMonitor"} <= kinds
    # the validator does reject a wrong manifest (strict: unknown fields)
    bad = json.loads(json.dumps(k8s("Deployment")))
    bad["spec"]["template"]["spec"]["containers"][1]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def sidecar() -> dict:
    (c,) = [c for c in k8s("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "keyspace-proxy"]
    return c


def test_sidecar_deployment_wiring(dockerfile):
    _, _, final = dockerfile
    dep = k8s("Deployment")
    pod = dep["spec"]["template"]
    proxy = sidecar()
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    env = {e["name"]: e for e in proxy["env"]}
    # the ConfigMap's TOML is a valid proxy configuration, mounted where PROXY_CONFIG points
    cm = k8s("ConfigMap")
    (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == "keyspace-proxy-config"]
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert vol["configMap"]["name"] == cm["metadata"]["name"] and mount["readOnly"]
    (key,) = cm["data"]
    assert env["PROXY_CONFIG"]["value"] == f"{mount['mountPath']}/{key}"
    cfg = from_dict(tomllib.loads(cm["data"][key]), environ={"CLIENT_PASSWORD": "from-a-secret"})
    (route,) = cfg.routes
    assert route.listen == ("127.0.0.1", ports["redis"])  # only the pod's containers reach it
    # TLS to Redis, and clients authenticate at the proxy with a password from a Secret
    assert route.upstream.tls is not None and route.upstream.tls.verify
    (user,) = route.users.values()
    assert user.name == "default" and user.source == ("password_env", "CLIENT_PASSWORD")
    assert "secretKeyRef" in env["CLIENT_PASSWORD"]["valueFrom"]
    assert cfg.metrics_listen[1] == ports["metrics"]
    # reload: on the pod's localhost only, with a token from an optional Secret (none: off)
    assert cfg.admin_listen[0] == "127.0.0.1" and cfg.admin_token is None
    assert env["PROXY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    # the password comes from a Secret as REDIS_URL, never from the ConfigMap
    assert "secretKeyRef" in env["REDIS_URL"]["valueFrom"]
    assert "@" not in cm["data"][key]
    # every PROXY_* variable is one the CLI reads
    assert {n for n in env if n.startswith("PROXY_")} <= set(ENV_FALLBACKS.values())
    # the app goes through the sidecar
    (app,) = [c for c in pod["spec"]["containers"] if c["name"] != "keyspace-proxy"]
    app_env = {e["name"]: e for e in app["env"]}
    assert app_env["REDIS_URL"]["value"] == f"redis://:$(CLIENT_PASSWORD)@127.0.0.1:{ports['redis']}/0"
    # the same Secret on both sides (Kubernetes expands $(CLIENT_PASSWORD) from the line above it)
    assert app_env["CLIENT_PASSWORD"]["valueFrom"] == env["CLIENT_PASSWORD"]["valueFrom"]
    assert [e["name"] for e in app["env"]].index("CLIENT_PASSWORD") < [e["name"] for e in app["env"]].index("REDIS_URL")
    # probes, resources, hardening
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert proxy["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(proxy["resources"]["requests"]) and "memory" in proxy["resources"]["limits"]
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert str(sc["runAsUser"]) == final.all("USER")[-1].split(":")[0]  # the image's user
    # scrape annotations point at the metrics port
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
    assert ann["prometheus.io/path"] == "/metrics"
    assert pod["spec"]["terminationGracePeriodSeconds"] > cfg.limits.drain_timeout


def test_podmonitor_targets_the_sidecar():
    """PodMonitor is a CRD (monitoring.coreos.com/v1) without a schema in kubernetes-validate:
    check its shape by hand, and that it selects the Deployment's pods and a port they have."""
    pm = k8s("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm) == {"apiVersion", "kind", "metadata", "spec"} and pm["metadata"]["name"]
    assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    labels = k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    sel = pm["spec"]["selector"]
    assert set(sel) == {"matchLabels"} and sel["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in sidecar()["ports"]}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "honorLabels"}
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+(ms|s|m)", ep["interval"])


def compose_file(path: str) -> dict:
    """The file, checked against the Compose specification's JSON schema (no Docker engine here)."""
    import jsonschema
    with open(os.path.join(ROOT, "tests", "data", "compose-spec.json")) as f:
        schema = json.load(f)
    with open(path) as f:
        compose = yaml.safe_load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    # and the schema does reject a wrong file
    assert list(jsonschema.Draft7Validator(schema).iter_errors({"services": {"x": {"imag": "redis"}}}))
    return compose


def test_compose_file_matches_the_compose_specification(dockerfile):
    compose = compose_file(os.path.join(DEPLOY, "docker-compose.yml"))
    s = compose["services"]
    redis_svc, proxy, worker = s["redis"], s["proxy"], s["worker"]
    assert redis_svc["image"].startswith("redis:7")
    assert "--appendonly" in redis_svc["command"] and "yes" in redis_svc["command"]
    (volume,) = redis_svc["volumes"]
    assert volume.split(":")[0] in compose["volumes"] and volume.endswith(":/data")
    build = proxy["build"]
    assert os.path.exists(os.path.join(DEPLOY, build["context"], build["dockerfile"]))
    assert set(proxy["environment"]) <= set(ENV_FALLBACKS.values()) | {"REDIS_URL", "PROXY_PASSWORD"}
    # passwords on both hops, from deploy/.env (env.example lists them), never written in the file
    assert proxy["environment"]["REDIS_URL"] == "redis://:${REDIS_PASSWORD}@redis:6379/0"
    assert "${REDIS_PASSWORD" in " ".join(redis_svc["command"])
    assert proxy["environment"]["PROXY_PASSWORD"].startswith("${PROXY_CLIENT_PASSWORD")
    with open(os.path.join(DEPLOY, "env.example")) as f:
        assert {"REDIS_PASSWORD", "PROXY_CLIENT_PASSWORD"} <= {ln.split("=")[0] for ln in f if "=" in ln}
    # the worker is another container: the proxy listens on the compose network, its port unpublished
    assert proxy["environment"]["PROXY_LISTEN"] == "0.0.0.0:6380"
    assert not any(p.split(":")[-1] == "6380" for p in proxy.get("ports", []))
    assert "PROXY_ADMIN_TOKEN" not in proxy["environment"]
    listen_port = dockerfile[2].env()["PROXY_LISTEN"].rpartition(":")[2]
    assert worker["environment"]["REDIS_URL"] == f"redis://:${{PROXY_CLIENT_PASSWORD}}@proxy:{listen_port}/0"
    assert worker["depends_on"]["proxy"]["condition"] == "service_healthy"  # the image's HEALTHCHECK


SERVER_MOVE = os.path.join(DEPLOY, "runbook", "server-move")


def test_server_move_compose_and_step_configs(dockerfile):
    """deploy/runbook/server-move/: the self-hosted side (Redis 7, append-only file on a named
    volume, a healthcheck that fails while the AOF loads) and the proxy whose mounted step configs
    route to the managed Redis (REDIS_URL, from .env) or to the `redis` service."""
    compose = compose_file(os.path.join(SERVER_MOVE, "docker-compose.yml"))
    s = compose["services"]
    assert set(s) == {"redis", "proxy"}
    redis_svc, proxy = s["redis"], s["proxy"]
    assert redis_svc["image"].startswith("redis:7") and "ports" not in redis_svc  # only the proxy reaches it
    cmd = redis_svc["command"]
    assert cmd[0] == "redis-server" and cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    (volume,) = redis_svc["volumes"]
    name, _, mount = volume.partition(":")
    assert name in compose["volumes"] and mount == "/data"  # a named volume, where Redis writes its AOF
    test = redis_svc["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "redis-cli ping" in test[1] and "PONG" in test[1]
    build = proxy["build"]
    assert os.path.samefile(os.path.join(SERVER_MOVE, build["context"], build["dockerfile"]), DOCKERFILE)
    env = proxy["environment"]
    assert set(env) <= set(ENV_FALLBACKS.values()) | {"REDIS_URL"}
    assert re.fullmatch(r"\$\{MANAGED_REDIS_URL:\?[^}]+\}", env["REDIS_URL"])  # from .env, required
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    assert proxy["read_only"] and "/tmp" in proxy["tmpfs"]  # migrate --state needs a writable folder
    (mount,) = proxy["volumes"]
    src, dst, mode = mount.split(":")
    assert os.path.samefile(os.path.join(SERVER_MOVE, src), SERVER_MOVE) and mode == "ro"
    assert os.path.dirname(env["PROXY_CONFIG"]) == dst
    published = {p.rsplit(":", 2)[-2] if p.count(":") == 2 else p.split(":")[0]: p for p in proxy["ports"]}
    assert published["9121"].startswith("127.0.0.1:")  # the unauthenticated reload: this host only

    with open(os.path.join(SERVER_MOVE, "env.example")) as f:
        example = dict(line.split("=", 1) for line in f.read().splitlines() if line and not line.startswith("#"))
    managed = example["MANAGED_REDIS_URL"]
    steps = {}
    for name in ("step1-managed.toml", "step2-self-hosted.toml"):
        with open(os.path.join(SERVER_MOVE, name)) as f:
            text = f.read()
        assert "@" not in text  # no token in the files
        steps[name] = from_dict(tomllib.loads(text), environ={"REDIS_URL": managed})
    for cfg in steps.values():
        assert {r.name: r.listen[1] for r in cfg.routes} == {"new": 6380, "old": 6381}
        assert {str(r.listen[1]) for r in cfg.routes} | {str(cfg.metrics_listen[1])} == set(published)
    one, two = steps["step1-managed.toml"], steps["step2-self-hosted.toml"]
    by_name = {r.name: r for r in one.routes}
    assert all(r.upstream.host.endswith("amazonaws.com") and r.upstream.tls for r in one.routes)
    ks = {n: (r.default.keyspace.mode, r.default.keyspace.namespace) for n, r in by_name.items()}
    assert ks == {"new": ("add", b"sidekiq"), "old": ("none", b"")}
    by_name = {r.name: r for r in two.routes}
    assert all((r.upstream.host, r.upstream.port, r.upstream.db) == ("redis", 6379, 0) for r in two.routes)
    ks = {n: (r.default.keyspace.mode, r.default.keyspace.namespace) for n, r in by_name.items()}
    assert ks == {"new": ("none", b""), "old": ("strip", b"sidekiq")}  # the namespace goes in the same move


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        if CI:
            pytest.fail("promtool missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def test_alert_rules_check_and_unit_tests():
    d = os.path.join(DEPLOY, "prometheus")
    p = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=d, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=d, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    with open(os.path.join(d, "alerts.yml")) as f:
        names = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]}
    assert {"KeyspaceProxyUpstreamDown", "KeyspaceProxyHighErrorRatio", "KeyspaceProxyRefusedCommands",
            "KeyspaceProxyConnectionSaturation"} <= names


def test_prometheus_config(tmp_path):
    """promtool checks the file; Debian's promtool is built without Kubernetes service discovery
    (its `+ds` source drops the cloud SD plugins), so the kubernetes_sd job is checked by hand
    and removed from the copy promtool reads."""
    d = os.path.join(DEPLOY, "prometheus")
    with open(os.path.join(d, "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    k8s_jobs = [j for j in cfg["scrape_configs"] if "kubernetes_sd_configs" in j]
    assert k8s_jobs
    for j in k8s_jobs:
        assert j["kubernetes_sd_configs"] == [{"role": "pod"}]
        for rc in j["relabel_configs"]:
            assert set(rc) <= {"source_labels", "action", "regex", "replacement", "target_label", "separator"}
            re.compile(rc.get("regex", "(.*)"))
        keep = j["relabel_configs"][0]
        assert keep["action"] == "keep" and keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    # the relabelling that builds the address from the annotation
    (addr,) = [rc for j in k8s_jobs for rc in j["relabel_configs"] if rc.get("target_label") == "__address__"]
    m = re.fullmatch(addr["regex"], "10.1.2.3:6380;9121")
    assert m and addr["replacement"].replace("$1", m.group(1)).replace("$2", m.group(2)) == "10.1.2.3:9121"
    cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if j not in k8s_jobs]
    shutil.copy(os.path.join(d, "alerts.yml"), tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    p = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


# -- every metric the dashboard and the alerts name is one the proxy exports

METRIC = re.compile(r"\bkeyspace_proxy_[a-z0-9_]+\b")
BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(keyspace_proxy_[a-z0-9_]+)\{([^}]*)\}")


def dashboard_queries() -> list[str]:
    with open(os.path.join(DEPLOY, "grafana", "keyspace-proxy.json")) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            exprs.append(v["query"]["query"] if isinstance(v["query"], dict) else v["query"])
    return exprs


def alert_queries() -> list[str]:
    with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
        return [r["expr"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


def test_dashboard_shape():
    with open(os.path.join(DEPLOY, "grafana", "keyspace-proxy.json")) as f:
        dash = json.load(f)
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")") and METRIC.search(t["expr"]), t["expr"]


def scrape(port: int) -> dict[str, set[str]]:
    """{sample name: label names} for every series name the endpoint declares."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, set[str]] = {}
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["_sum", "_count", "_created"], "gauge": [""], "info": ["_info"], "unknown": [""]}
    for fam in text_string_to_metric_families(text):
        for suffix in suffixes.get(fam.type, [""]):
            out.setdefault(fam.name + suffix, set())
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def test_dashboard_and_alerts_name_only_exported_metrics(server, fresh_db, start_proxy):
    """Needs the metrics endpoint of the operations work (proxy/metrics.py)."""
    import socket
    import hashlib
    mport, port, uport = free_port(), free_port(), free_port()
    upstream = f"redis://{server.host}:{server.port}/{fresh_db}"
    # a plain listener and one with a user, so the auth metrics have samples (and labels) too
    p = start_proxy(config_text=(
        f'[metrics]\nlisten = "127.0.0.1:{mport}"\n'
        f'[[listener]]\nname = "main"\nlisten = "127.0.0.1:{port}"\nupstream = "{upstream}"\nnamespace = "ns"\n'
        f'[[listener]]\nname = "users"\nlisten = "127.0.0.1:{uport}"\nupstream = "{upstream}"\n'
        f'namespace = "nsu"\nmax_clients = 1\n[[listener.user]]\nname = "alice"\n'
        f'password_sha256 = "{hashlib.sha256(b"apw").hexdigest()}"\n'), port=port)
    held = redis.Redis(port=uport, username="alice", password="apw")
    assert held.ping()
    with pytest.raises(redis.ConnectionError, match="max number of clients"):
        redis.Redis(port=uport).ping()  # rejected: samples for client_connections_rejected
    held.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=uport, username="alice", password="wrong").ping()
    r = redis.Redis(port=p.port)
    pipe = r.pipeline(transaction=False)
    for i in range(5):
        pipe.set(f"k{i}", i)
    pipe.execute()
    r.get("k1")
    with pytest.raises(redis.ResponseError):
        r.flushall()  # refused on a namespaced route
    r.close()
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(b"*1\r\n$x\r\n")  # protocol error
        s.recv(1000)
    deadline = time.monotonic() + 10
    while True:
        try:
            exported = scrape(mport)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    queries = dashboard_queries() + alert_queries()
    named = {m for q in queries for m in METRIC.findall(q)}
    missing = sorted(named - set(exported))
    assert not missing, f"named in deploy/ but not exported: {missing}; exported: {sorted(exported)}"
    # and the other way: every family the proxy exports has a panel or an alert (an operator
    # should not have to find a metric by reading proxy/metrics.py)
    families = {m.removesuffix("_total") for m in exported if m.startswith("keyspace_proxy_")
                and not m.endswith(("_created", "_bucket", "_sum", "_count"))}
    shown = {m.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
             for m in named}
    unshown = sorted(families - shown)
    assert not unshown, f"exported but in no dashboard panel or alert: {unshown}"
    # label names used in selectors and groupings exist on the metrics (where samples show labels)
    for q in queries:
        used_metrics = METRIC.findall(q)
        known = set().union(*(exported[m] for m in used_metrics)) | TARGET_LABELS
        for metric, matchers in SELECTOR.findall(q):
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in exported[metric] | TARGET_LABELS, f"{metric} has no label {label!r}: {q}"
        for group in BY.findall(q):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in known, f"no metric of {used_metrics} has label {label!r}: {q}"
