"""A keyspace: how one client-visible key maps to one server key and back.

Three modes:
  add    client `foo`     <-> server `NS:foo`
  strip  client `NS:foo`  <-> server `foo`
  none   identity (a transparent db router)
Channels are mapped the same way as keys (a namespaced app's pub/sub is fenced too).

Pinned (add mode, a route's `slot = "pinned"`): the namespace is written as a hash tag,
client `foo` <-> server `{NS}:foo`, so every key of the namespace is in one Redis
Cluster hash slot (the slot of NS). The namespace's braces come first, so a client key's
own `{tag}` no longer chooses the slot: `{user1}:a` is stored as `{NS}:{user1}:a`, in
NS's slot like every other key. The namespace has no `}` (config.py refuses it), so the
tag is exactly NS, and stripping stays what it is in add mode: a server key is ours iff
it starts with the whole prefix `{NS}:`; anything else (`NS:foo`, `{NS}foo`, another
namespace's `{NS2}:x`) is not. The prefix is plain bytes to everything that uses it (the
C hot path included), and braces are not glob characters, so patterns need nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

GLOB_SPECIAL = b"*?[]\\"


class Refused(Exception):
    """A request the proxy will not send. str(e) is the error reply text, code first."""


def escape_glob(text: bytes) -> bytes:
    """Escape Redis glob metacharacters so `text` matches only itself."""
    out = bytearray()
    for c in text:
        if c in GLOB_SPECIAL:
            out.append(0x5C)
        out.append(c)
    return bytes(out)


def show(b: bytes) -> str:
    """A name for an error message: printable, bounded."""
    s = b.decode("utf-8", "backslashreplace")
    return s if len(s) <= 80 else s[:77] + "..."


@dataclass(frozen=True)
class Keyspace:
    mode: str = "none"        # "add", "strip" or "none"
    namespace: bytes = b""
    separator: bytes = b":"
    route: str = ""           # for error messages
    pinned: bool = False      # add mode: the namespace is the keys' hash tag, `{NS}:key`

    @property
    def prefix(self) -> bytes:
        if self.mode == "none":
            return b""
        if self.pinned:
            return b"{" + self.namespace + b"}" + self.separator
        return self.namespace + self.separator

    def describe(self) -> str:
        if self.mode == "none":
            return f"route {self.route}"
        return f"namespace '{show(self.namespace)}'{' (pinned)' if self.pinned else ''} of route {self.route}"

    # ---- client -> server

    def key_in(self, key: bytes, what: str = "key") -> bytes:
        if self.mode == "add":
            return self.prefix + key
        if self.mode == "strip":
            p = self.prefix
            if key.startswith(p):
                return key[len(p):]
            raise Refused(f"ERR {what} '{show(key)}' lacks the prefix '{show(p)}' "
                          f"required by {self.describe()} (strip mode)")
        return key

    def pattern_in(self, pattern: bytes, what: str = "pattern") -> bytes:
        if self.mode == "add":
            return escape_glob(self.prefix) + pattern
        if self.mode == "strip":
            for p in (escape_glob(self.prefix), self.prefix):
                if pattern.startswith(p):
                    return pattern[len(p):]
            raise Refused(f"ERR {what} '{show(pattern)}' does not start with the prefix "
                          f"'{show(self.prefix)}' required by {self.describe()} (strip mode)")
        return pattern

    def match_all(self) -> bytes:
        """A server-side glob matching exactly this keyspace (add mode)."""
        return escape_glob(self.prefix) + b"*"

    # ---- server -> client

    def key_out(self, key: bytes) -> bytes | None:
        """The client's name for a server key; None if the key lies outside this keyspace."""
        if self.mode == "add":
            p = self.prefix
            return key[len(p):] if key.startswith(p) else None
        if self.mode == "strip":
            return self.prefix + key
        return key

    def pattern_out(self, pattern: bytes) -> bytes:
        if self.mode == "add":
            e = escape_glob(self.prefix)
            return pattern[len(e):] if pattern.startswith(e) else pattern
        if self.mode == "strip":
            return escape_glob(self.prefix) + pattern
        return pattern
