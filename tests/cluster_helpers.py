"""A real Redis/Valkey Cluster for the tests: three primaries with one replica each, on
free ports, slots assigned by the test. No mocks: these are the servers
`proxy.embedded.start_server` starts (`cluster-enabled yes`, a `cluster-config-file`
in each node's own temporary directory, removed on stop).

    c = start_cluster("valkey")          # cluster_state:ok on every node, replicas synced
    c.primary_for(slot)                  # a ClusterNode; .client() is a plain redis.Redis
    c.begin_migration(slot, src, dst)    # SETSLOT IMPORTING / MIGRATING: ASK from now on
    c.move_keys(slot, src, dst)          # MIGRATE ... KEYS
    c.finish_migration(slot, dst)        # SETSLOT NODE everywhere: MOVED from now on
    c.kill_primary(node)                 # SIGKILL; returns the replica once it is promoted
    c.stop()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis

from proxy.config import format_addr
from proxy.embedded import RunningServer, free_port, start_server

WAIT = 30.0   # a bound for waits, never an expected duration


def wait_until(pred, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(0.02)


@dataclass
class ClusterNode:
    server: RunningServer
    bus_port: int = 0
    id: str = ""
    primary_of: "ClusterNode | None" = None   # set for a replica
    tls_port: int = 0                         # a TLS cluster: the port clients use (the plain one stays, for the tests)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def alive(self) -> bool:
        return self.server.process.poll() is None

    def client(self, **kw) -> redis.Redis:
        kw.setdefault("socket_timeout", 10.0)
        return redis.Redis(host=self.host, port=self.port, **kw)

    def call(self, *args):
        r = self.client()
        try:
            return r.execute_command(*args)
        finally:
            r.close()

    def blocked(self, cmd: str) -> bool:
        """Whether a client of this node is blocked in `cmd` (lowercase)."""
        r = self.client()
        try:
            return any(c.get("cmd") == cmd and "b" in c.get("flags", "") for c in r.client_list())
        finally:
            r.close()

    def info(self, section: str) -> dict:
        r = self.client()
        try:
            return r.info(section)
        finally:
            r.close()

    def __repr__(self) -> str:
        return f"ClusterNode({self.port}, {self.id[:8]})"


@dataclass
class Cluster:
    kind: str
    primaries: list[ClusterNode]
    replicas: list[ClusterNode]
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # node id -> slots given at start
    dead: list[ClusterNode] = field(default_factory=list)                    # killed, still to clean up

    @property
    def nodes(self) -> list[ClusterNode]:
        return self.primaries + self.replicas

    def live(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive]

    def unassign(self, slot: int) -> None:
        """CLUSTER DELSLOTS `slot` on every live node. DELSLOTS is each node's own view, and
        a node that dropped the slot takes it back from the gossip of one still claiming it
        (the owner, until told): call it again until no node claims the slot."""
        for n in self.live():
            try:
                n.call("CLUSTER", "DELSLOTS", slot)
            except redis.ResponseError:
                pass

    def seeds(self) -> str:
        return ",".join(format_addr(n.host, n.port) for n in self.primaries)

    def tls_seeds(self) -> str:
        """The primaries' TLS ports (a TLS cluster)."""
        return ",".join(format_addr(n.host, n.tls_port) for n in self.primaries)

    def by_id(self, node_id: str) -> ClusterNode:
        return next(n for n in self.nodes if n.id == node_id)

    def primary_for(self, slot: int) -> ClusterNode:
        """The primary serving `slot`, as the live nodes agree (CLUSTER SHARDS)."""
        for n in self.live():
            for sh in n.call("CLUSTER", "SHARDS"):
                sh = _map(sh)
                slots = sh[b"slots"]
                if any(slots[i] <= slot <= slots[i + 1] for i in range(0, len(slots), 2)):
                    for node in sh[b"nodes"]:
                        node = _map(node)
                        if node[b"role"] == b"master" and node[b"health"] == b"online":
                            return self.by_id(node[b"id"].decode())
            break
        raise LookupError(f"no primary serves slot {slot}")

    def keys_in_slot(self, slot: int, count: int, prefix: str = "k") -> list[bytes]:
        """`count` key names that hash to `slot` (a hash tag chosen for it)."""
        from proxy.cluster import key_slot
        i = 0
        while key_slot(f"{i}".encode()) != slot:
            i += 1
        return [f"{prefix}{j}{{{i}}}".encode() for j in range(count)]

    # -- state

    def wait_ok(self, timeout: float = WAIT, health: bool = True) -> None:
        """Until every live node says cluster_state:ok with all slots, knows the same
        number of live nodes, and every live replica's link to its primary is up."""
        live = self.live()

        def ok() -> bool:
            for n in live:
                info = _cluster_info(n)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                    return False
            for n in live:
                if n.primary_of is not None and n.info("replication").get("master_link_status") != "up":
                    return False
            if not health:
                return True
            # and every node sees every live node online (a replica that has replicated
            # nothing yet is `loading`, and left out of CLUSTER SLOTS)
            ids = {n.id.encode() for n in live}
            for n in live:
                seen = {_map(x)[b"id"]: _map(x)[b"health"]
                        for sh in n.call("CLUSTER", "SHARDS") for x in _map(sh)[b"nodes"]}
                if any(seen.get(i) != b"online" for i in ids):
                    return False
            return True
        wait_until(ok, f"cluster_state:ok on {live}", timeout)

    def converged(self, slot: int) -> bool:
        """Every live primary names the same owner for `slot`."""
        owners = set()
        for n in self.live():
            if n.primary_of is None:
                for sh in n.call("CLUSTER", "SHARDS"):
                    sh = _map(sh)
                    s = sh[b"slots"]
                    if any(s[i] <= slot <= s[i + 1] for i in range(0, len(s), 2)):
                        owners |= {_map(x)[b"id"] for x in sh[b"nodes"] if _map(x)[b"role"] == b"master"}
        return len(owners) == 1

    # -- slot migration (what redis-cli --cluster reshard does, step by step)

    def begin_migration(self, slot: int, src: ClusterNode, dst: ClusterNode) -> None:
        """`dst` IMPORTING and `src` MIGRATING: keys still on `src` are served there, the
        others get `-ASK slot dst`."""
        dst.call("CLUSTER", "SETSLOT", slot, "IMPORTING", src.id)
        src.call("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.id)

    def move_keys(self, slot: int, src: ClusterNode, dst: ClusterNode, batch: int = 100,
                  limit: int | None = None) -> int:
        """MIGRATE the slot's keys from `src` to `dst` (at most `limit`); how many moved."""
        moved = 0
        while limit is None or moved < limit:
            n = batch if limit is None else min(batch, limit - moved)
            keys = src.call("CLUSTER", "GETKEYSINSLOT", slot, n)
            if not keys:
                break
            # (tls-cluster yes: MIGRATE connects with TLS, so to the TLS port)
            src.call("MIGRATE", dst.host, dst.tls_port or dst.port, "", 0, 10000, "KEYS", *keys)
            moved += len(keys)
        return moved

    def finish_migration(self, slot: int, dst: ClusterNode) -> None:
        """SETSLOT NODE on the new owner first, then on every other primary (as
        redis-cli does), and wait until all live primaries agree."""
        dst.call("CLUSTER", "SETSLOT", slot, "NODE", dst.id)
        for n in self.live():
            if n is not dst and n.primary_of is None:
                n.call("CLUSTER", "SETSLOT", slot, "NODE", dst.id)
        wait_until(lambda: self.converged(slot), f"every primary to agree on slot {slot}")

    def migrate_slot(self, slot: int, dst: ClusterNode) -> None:
        src = self.primary_for(slot)
        self.begin_migration(slot, src, dst)
        self.move_keys(slot, src, dst)
        self.finish_migration(slot, dst)

    # -- failover

    def kill_primary(self, node: ClusterNode, timeout: float = WAIT) -> ClusterNode:
        """SIGKILL `node` and wait until one of its replicas is the primary of its slots
        and the cluster is ok again; the promoted replica is returned (now a primary)."""
        replicas = [r for r in self.replicas if r.primary_of is node and r.alive]
        assert replicas, f"{node} has no live replica"
        node.server.process.kill()
        node.server.process.wait(10)
        self.dead.append(node)

        def promoted():
            for r in replicas:
                if r.info("replication").get("role") == "master":
                    return r
            return None
        r = wait_until(promoted, f"a replica of {node} to be promoted", timeout)
        self.replicas.remove(r)
        self.primaries[self.primaries.index(node)] = r
        r.primary_of = None
        self.wait_ok(timeout)
        return r

    def stop(self) -> None:
        for n in self.nodes + self.dead:
            n.server.stop()


def _map(v) -> dict:
    if isinstance(v, dict):
        return v
    return {v[i]: v[i + 1] for i in range(0, len(v), 2)}


def _cluster_info(n: ClusterNode) -> dict:
    r = n.client()
    try:
        text = r.execute_command("CLUSTER", "INFO")
    finally:
        r.close()
    if isinstance(text, bytes):
        text = text.decode()
    return dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)


NODE_CONFIG = [
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",   # relative to --dir: each node's own temp dir
    "--cluster-node-timeout", "1000",        # failure detection (and failover) within seconds
    "--repl-diskless-sync-delay", "0",       # replicas sync at once (the default waits 5 s)
    "--cluster-replica-validity-factor", "0",  # a replica may always take over
    "--cluster-allow-replica-migration", "no",
    "--appendonly", "no",
]


def tls_config(cert: str, key: str, ca: str) -> list[str]:
    """Node options for a TLS cluster (start_cluster(tls=...)): clients, the cluster bus and
    replication over TLS, client certificates not asked for (each node presents its
    certificate to the others as a client). The node's `--tls-port` is added per node."""
    return ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca,
            "--tls-cluster", "yes", "--tls-replication", "yes", "--tls-auth-clients", "no"]


def start_cluster(kind: str = "valkey", primaries: int = 3, replicas_per_primary: int = 1,
                  extra: list[str] | None = None, host: str = "127.0.0.1",
                  slots: list[list[tuple[int, int]]] | None = None, tls: list[str] | None = None) -> Cluster:
    """Start and join a cluster. `slots`: the inclusive slot ranges of each primary
    (CLUSTER ADDSLOTSRANGE), all 16384 covered; default an even split. `host`: where
    every node listens (`::1` for IPv6). `tls`: tls_config(...): every node also gets a
    TLS port (ClusterNode.tls_port; CLUSTER SHARDS lists it as `tls-port`), the plain
    port stays for the harness. Stops whatever it started if anything fails."""
    if slots is None:
        step = 16384 // primaries
        slots = [[(i * step, 16383 if i == primaries - 1 else (i + 1) * step - 1)] for i in range(primaries)]
    assert len(slots) == primaries and sorted(s for r in slots for lo, hi in r for s in range(lo, hi + 1)) == \
        list(range(16384)), "slots must cover 0..16383 once"
    started: list[ClusterNode] = []
    try:
        for _ in range(primaries * (1 + replicas_per_primary)):
            # the bus port given, not derived (port + 10000 may be taken, or above 65535)
            bus = free_port(host)
            tls_port = free_port(host) if tls else 0
            own = ["--tls-port", str(tls_port)] + tls if tls else []
            # die_with_parent: a killed test run leaves no cluster behind (nodes are
            # started from the thread that runs the tests, which lives as long as they)
            server = start_server(kind, host=host, extra=NODE_CONFIG + ["--cluster-port", str(bus)] + own +
                                  (extra or []), die_with_parent=True)
            started.append(ClusterNode(server, bus_port=bus, tls_port=tls_port))
        prims = started[:primaries]
        reps = started[primaries:]
        for n in started:
            n.id = n.call("CLUSTER", "MYID").decode()
        # Distinct config epochs up front, as redis-cli --cluster create does, so no
        # epoch collision has to be resolved before the slots settle.
        for i, n in enumerate(started):
            n.call("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        cluster = Cluster(kind, prims, reps)
        for n, ranges in zip(prims, slots):
            n.call("CLUSTER", "ADDSLOTSRANGE", *[x for r in ranges for x in r])
            cluster.ranges[n.id] = list(ranges)
        first = started[0]
        for n in started[1:]:
            first.call("CLUSTER", "MEET", n.host, n.port, n.bus_port)
        wait_until(lambda: all(_cluster_info(n).get("cluster_known_nodes") == str(len(started))
                               for n in started), "every node to know every other")
        for i, r in enumerate(reps):
            p = prims[i % primaries]
            r.primary_of = p
            # CLUSTER REPLICATE needs the primary known as a primary on the replica's side
            wait_until(lambda: _replicate(r, p), f"{r} to replicate {p}")
        cluster.wait_ok(health=False)
        # one write per primary, so every replica has replicated something (offset > 0)
        for p in prims:
            key = cluster.keys_in_slot(cluster.ranges[p.id][0][0], 1, prefix="harness")[0]
            p.call("SET", key, "1")
            p.call("DEL", key)
        cluster.wait_ok()
        return cluster
    except BaseException:
        for n in started:
            n.server.stop()
        raise


def _replicate(r: ClusterNode, p: ClusterNode) -> bool:
    r.call("CLUSTER", "REPLICATE", p.id)
    return True
