"""Redis Cluster, sans-IO: key slots, the slot map, and MOVED/ASK redirections.

Plain objects only (no sockets, no asyncio): the routing that will use them is
designed in docs/cluster.md and not built yet. Inputs are reply values as
hiredis parses them (bytes, int, list; a RESP3 map as a dict), so the same code
reads a RESP2 or a RESP3 connection's replies.

- `key_slot(key)`: CRC16-XMODEM of the key, or of its hash tag, mod 16384. The
  tag is what lies between the first `{` and the first `}` after it, if that is
  not empty (Redis's keyHashSlot, cluster.c).
- `SlotMap.from_shards(reply)` (CLUSTER SHARDS, Redis/Valkey 7+) and
  `SlotMap.from_slots(reply)` (CLUSTER SLOTS, older servers): which node serves
  each slot, primaries and their replicas. A node's address is kept as the
  server announces it: its preferred endpoint (an IP, or a hostname with
  `cluster-preferred-endpoint-type hostname`, as ElastiCache answers), the
  seed's host when the endpoint is unknown (NULL/empty: the node sits behind an
  address it does not know), its IP when the endpoint is `?` (hostnames
  preferred but none announced).
- `parse_redirect(error)`: `MOVED slot host:port` / `ASK slot host:port`,
  IPv6 and hostnames included; an empty host means "the host you asked".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

SLOTS = 16384


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-XMODEM (polynomial 0x1021, initial value 0): Redis Cluster's key hash."""
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ b) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of `key` that chooses its slot: the text between the first `{` and the
    first `}` after it when that is not empty, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def key_slot(key: bytes) -> int:
    return crc16(hash_tag(key)) & (SLOTS - 1)


def group_by_slot(keys) -> dict[int, list[int]]:
    """Indexes of `keys` per slot, each list in order, slots in order of first appearance:
    the parts a multi-key command is split into (one command per slot)."""
    out: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(key_slot(k), []).append(i)
    return out


class CrossSlot(Exception):
    """Keys of one request in more than one slot. str(e): the slots seen."""


def common_slot(keys) -> int | None:
    """The one slot all `keys` hash to; None for no keys; CrossSlot if they differ."""
    slot = None
    for k in keys:
        s = key_slot(k)
        if slot is None:
            slot = s
        elif s != slot:
            raise CrossSlot(f"keys in slots {slot} and {s}")
    return slot


# -- redirections


@dataclass(frozen=True)
class Redirect:
    kind: str        # "MOVED" or "ASK"
    slot: int
    host: str        # as the server wrote it: an IP, a hostname, "" (unknown: ask the same host) or "?"
    port: int

    def address(self, origin_host: str, slot_map: "SlotMap | None" = None) -> tuple[str, int] | None:
        """Where to go: `origin_host` is the host of the node that sent the error. An
        empty host means that same host (a node behind an address it does not know); `?`
        (hostnames preferred but the node announces none) is the one node of `slot_map`
        with that port; None when it cannot be known (refresh the map)."""
        if self.host == "":
            return origin_host, self.port
        if self.host == "?":
            # only a node that alone has this port can be meant (nodes often share 6379)
            found = {n.addr for n in (slot_map.nodes() if slot_map else [])
                     if n.port == self.port and n.host not in ("", "?")}
            return found.pop() if len(found) == 1 else None
        return self.host, self.port


def _text(v) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    return str(v)


def parse_redirect(error) -> Redirect | None:
    """A `MOVED`/`ASK` error (bytes or str, with or without the leading `-`, or a
    hiredis.ReplyError) as a Redirect; None for any other error."""
    text = _text(error.args[0] if isinstance(error, Exception) and error.args else error)
    text = text[1:] if text.startswith("-") else text
    parts = text.strip().split(" ")
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    kind, slot, addr = parts
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not slot.isdigit() or not 0 <= int(slot) < SLOTS:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Redirect(kind, int(slot), host, int(port))


# -- the slot map


@dataclass(frozen=True)
class Node:
    id: str
    host: str                # where to connect: the preferred endpoint as announced (see module doc)
    port: int
    primary: bool
    ip: str = ""
    hostname: str = ""
    tls_port: int | None = None
    health: str = "online"   # CLUSTER SHARDS: online, failed, loading; CLUSTER SLOTS lists no health

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port

    def port_for(self, tls: bool) -> int:
        """The port of a TLS connection when the node announces one (CLUSTER SHARDS
        lists both; CLUSTER SLOTS answers with the port of the asking connection)."""
        return self.tls_port if tls and self.tls_port else self.port


@dataclass(frozen=True)
class Shard:
    primary: Node | None
    replicas: tuple[Node, ...]
    ranges: tuple[tuple[int, int], ...]   # inclusive slot ranges


def _pairs(v) -> dict:
    """A RESP3 map (dict) or its RESP2 form (a flat list of name, value) as a dict with str keys."""
    if isinstance(v, dict):
        return {_text(k): x for k, x in v.items()}
    if isinstance(v, (list, tuple)) and len(v) % 2 == 0:
        return {_text(v[i]): v[i + 1] for i in range(0, len(v), 2)}
    raise ValueError(f"expected a map, got {v!r:.80}")


def _endpoint(endpoint, ip: str, origin_host: str) -> str:
    e = "" if endpoint is None else _text(endpoint)
    if e == "":
        return origin_host     # unknown endpoint: the address the map was asked at
    if e == "?":
        return ip or "?"       # hostnames preferred but none announced: the IP is what there is
    return e


@dataclass
class SlotMap:
    shards: list[Shard]
    owners: list[int | None] = field(default_factory=list, repr=False)   # slot -> shard index

    def __post_init__(self):
        if not self.owners:
            self.owners = [None] * SLOTS
            for i, sh in enumerate(self.shards):
                for lo, hi in sh.ranges:
                    for s in range(lo, hi + 1):
                        self.owners[s] = i

    # -- building

    @classmethod
    def from_shards(cls, reply, origin_host: str = "") -> "SlotMap":
        """From CLUSTER SHARDS (RESP2 or RESP3). `origin_host`: the host the command was
        sent to, for nodes whose endpoint is unknown. ValueError for anything else (an
        error reply: not a cluster, unknown subcommand)."""
        return _built("CLUSTER SHARDS", reply, lambda: cls._from_shards(reply, origin_host))

    @classmethod
    def _from_shards(cls, reply, origin_host: str) -> "SlotMap":
        shards = []
        for raw in reply:
            sh = _pairs(raw)
            slots = [int(x) for x in sh.get("slots") or []]
            ranges = tuple((slots[i], slots[i + 1]) for i in range(0, len(slots) - 1, 2))
            nodes = []
            for rn in sh.get("nodes") or []:
                n = _pairs(rn)
                ip = _text(n.get("ip") or b"")
                tls = n.get("tls-port")
                port = n.get("port")
                nodes.append(Node(
                    id=_text(n.get("id") or b""),
                    host=_endpoint(n.get("endpoint"), ip, origin_host),
                    port=int(port) if port is not None else int(tls or 0),
                    primary=_text(n.get("role") or b"") == "master",
                    ip=ip, hostname=_text(n.get("hostname") or b""),
                    tls_port=int(tls) if tls is not None else None,
                    health=_text(n.get("health") or b"online")))
            shards.append(_shard(nodes, ranges))
        return cls(shards)

    @classmethod
    def from_slots(cls, reply, origin_host: str = "") -> "SlotMap":
        """From CLUSTER SLOTS (RESP2 or RESP3): ranges listed one by one, each with its
        primary first, then its replicas. ValueError as from_shards."""
        return _built("CLUSTER SLOTS", reply, lambda: cls._from_slots(reply, origin_host))

    @classmethod
    def _from_slots(cls, reply, origin_host: str) -> "SlotMap":
        by_primary: dict[str, tuple[list, list[Node]]] = {}
        for entry in reply:
            lo, hi = int(entry[0]), int(entry[1])
            nodes = []
            for i, rn in enumerate(entry[2:]):
                meta = _pairs(rn[3]) if len(rn) > 3 and rn[3] is not None else {}
                ip = _text(meta.get("ip") or b"")
                endpoint = rn[0]
                if not ip and endpoint not in (None, b"", b"?", "", "?"):
                    ip = _text(endpoint) if _looks_ip(_text(endpoint)) else ""
                nodes.append(Node(id=_text(rn[2]) if len(rn) > 2 else "",
                                  host=_endpoint(endpoint, ip, origin_host), port=int(rn[1]),
                                  primary=i == 0, ip=ip, hostname=_text(meta.get("hostname") or b"")))
            if not nodes:
                continue
            key = nodes[0].id or "%s:%d" % nodes[0].addr
            by_primary.setdefault(key, ([], nodes))[0].append((lo, hi))
        shards = [_shard(nodes, tuple(sorted(ranges))) for ranges, nodes in by_primary.values()]
        return cls(shards)

    # -- asking it

    def shard(self, slot: int) -> Shard | None:
        i = self.owners[slot]
        return None if i is None else self.shards[i]

    def primary(self, slot: int) -> Node | None:
        sh = self.shard(slot)
        return sh.primary if sh else None

    def replicas(self, slot: int) -> tuple[Node, ...]:
        sh = self.shard(slot)
        return sh.replicas if sh else ()

    def node_for_keys(self, keys) -> Node | None:
        """The primary serving all of `keys`; CrossSlot if they are in several slots; None
        if the slot is not served (or no keys)."""
        slot = common_slot(keys)
        return None if slot is None else self.primary(slot)

    def group_by_node(self, keys) -> dict[Node, list[int]]:
        """Indexes of `keys` per serving primary, in order: which links a split request
        (MGET, DEL, ...) touches. Each part sent must still be one slot (a node refuses
        CROSSSLOT for two slots it serves both): split by `group_by_slot` first. A key
        whose slot is not served raises LookupError."""
        out: dict[Node, list[int]] = {}
        for i, k in enumerate(keys):
            slot = key_slot(k)
            node = self.primary(slot)
            if node is None:
                raise LookupError(f"slot {slot} is not served")
            out.setdefault(node, []).append(i)
        return out

    def primaries(self) -> list[Node]:
        """Primaries that serve slots (for SCAN, KEYS, DBSIZE: every primary once)."""
        return [sh.primary for sh in self.shards if sh.primary is not None and sh.ranges]

    def nodes(self) -> list[Node]:
        out = []
        for sh in self.shards:
            out += ([sh.primary] if sh.primary else []) + list(sh.replicas)
        return out

    def uncovered(self) -> list[tuple[int, int]]:
        """Slot ranges no shard serves (empty when the cluster is fully covered)."""
        out, start = [], None
        for s, o in enumerate(self.owners + [0]):
            if o is None and start is None:
                start = s
            elif o is not None and start is not None:
                out.append((start, s - 1))
                start = None
        return out

    def moved(self, r: Redirect, origin_host: str = "") -> "SlotMap":
        """The map after a MOVED: slot `r.slot` is served by the node at its address (a
        known node, or a new primary). A stopgap until the map is fetched again."""
        addr = r.address(origin_host, self)
        if addr is None:
            return self
        owners = list(self.owners)
        shards = list(self.shards)
        for i, sh in enumerate(shards):
            if sh.primary is not None and sh.primary.addr == addr:
                owners[r.slot] = i
                break
        else:
            shards.append(Shard(Node("", addr[0], addr[1], True), (), ()))
            owners[r.slot] = len(shards) - 1
        return SlotMap(shards, owners)


def _built(command: str, reply, build) -> "SlotMap":
    if isinstance(reply, Exception) or not isinstance(reply, (list, tuple)):
        raise ValueError(f"{command} answered {_text(reply)!r:.200}, not a slot map")
    try:
        return build()
    except (TypeError, IndexError, KeyError, ValueError) as e:
        raise ValueError(f"{command}: a reply of an unknown shape ({e})") from None


def _looks_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _shard(nodes: list[Node], ranges: tuple) -> Shard:
    # After a failover a shard may list its dead former primary as a primary too: the
    # healthy one serves.
    prims = sorted((n for n in nodes if n.primary), key=lambda n: n.health != "online")
    primary = prims[0] if prims else None
    return Shard(primary, tuple(n for n in nodes if n is not primary), ranges)
