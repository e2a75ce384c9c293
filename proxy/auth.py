"""Client authentication at the proxy: a listener's users, and the gate a client passes
before it has a Session.

A listener with `[[listener.user]]` tables asks every client to authenticate, as a
Redis server with passwords does. Each user has its own Route (the listener's fields
with the user's over them: namespace, db map, upstream and its credentials), so one
listener can serve several tenants. Passwords are held as SHA-256 digests only (as
Redis's ACL holds them) and compared with hmac.compare_digest; an unknown user is
compared against a dummy digest, so the time taken says nothing about which users exist.

`Gate` is sans-IO, like Session: bytes in with `client_data`, replies out in
`out_client`. Until the client authenticates it answers everything itself, in order:
AUTH, HELLO [proto] [AUTH user pass] [SETNAME name], QUIT and RESET (the commands the
server's command table flags `no_auth`), and `-NOAUTH Authentication required.` for
anything else, with Redis's limits for unauthenticated input (10 arguments of 16384
bytes). Once a client authenticates the gate stops reading: `user` says who it is,
`first` is the request the session begins with (`HELLO 3 AUTH u p SETNAME n` goes on as
`HELLO 3 SETNAME n`, so the protocol switches on the server's confirmation as it
always does) and `rest` the bytes that followed. AUTH is never forwarded upstream:
the upstream connection authenticates with the route's own credentials.

After authentication the Session asks `Login` about AUTH, HELLO ... AUTH and RESET
(see Session._login).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from time import monotonic
from typing import Callable

from proxy.request_reader import ProtocolError, RequestReader, string2ll
from proxy.resp import OK, error

log = logging.getLogger("keyspace-proxy")

# Redis 7 / Valkey 8's own texts (server.c, networking.c, acl.c)
NOAUTH = error("NOAUTH Authentication required.")
WRONGPASS = error("WRONGPASS invalid username-password pair or user is disabled.")
HELLO_NOAUTH = error("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                     "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                     "select the RESP protocol version at the same time")
NO_DEFAULT = error("ERR AUTH <password> called without any password configured for the default user. "
                   "Are you sure your configuration is correct?")
RESET_REPLY = b"+RESET\r\n"
UNAUTHENTICATED_MAX_QUERY = 10 * (16384 + 32)  # 10 arguments of 16384 bytes, with their headers

_DUMMY = hashlib.sha256(b"keyspace-proxy: the digest an unknown user is compared with").digest()


def digest(password: bytes) -> bytes:
    return hashlib.sha256(password).digest()


@dataclass(frozen=True)
class User:
    """One `[[listener.user]]`: its name, its password's SHA-256 and the route it selects.
    `source` says where the password came from (for `check`: never the password)."""
    name: str
    digest: bytes = field(repr=False)
    route: object          # config.Route (the listener's fields with the user's over them)
    source: tuple = ()     # ("password_file", path) / ("password_env", VAR) / ("password_sha256", "***")


def routing(route) -> tuple:
    """What a route does with a client's commands, without its name: two users whose
    routes give the same tuple may take over each other's connection (AUTH again)."""
    def target(t):
        ks = t.keyspace
        return t.db, ks.mode, ks.namespace, ks.separator, ks.pinned
    return (route.upstream, target(route.default),
            tuple(sorted((c, target(t)) for c, t in route.databases.items())))


def parse_hello(args: list[bytes]) -> tuple[bytes | None, tuple | None, list[bytes]]:
    """HELLO [protover [AUTH user pass] [SETNAME name]] read as Redis reads it
    (helloCommand): (an error reply or None, (user, password) or None, the HELLO without
    its AUTH option)."""
    out = [args[0]]
    if len(args) >= 2:
        version = string2ll(args[1])
        if version is None:
            return error("ERR Protocol version is not an integer or out of range"), None, out
        if version < 2 or version > 3:
            return error("NOPROTO unsupported protocol version"), None, out
        out.append(args[1])
    creds = None
    j = 2
    while j < len(args):
        more = len(args) - 1 - j
        opt = args[j].lower()
        if opt == b"auth" and more >= 2:
            creds = (args[j + 1], args[j + 2])  # the last AUTH option wins, as in Valkey
            j += 3
        elif opt == b"setname" and more >= 1:
            if any(c < 0x21 or c > 0x7E for c in args[j + 1]):
                return error("ERR Client names cannot contain spaces, newlines or special characters."), None, out
            out += args[j:j + 2]
            j += 2
        else:
            return error(f"ERR Syntax error in HELLO option '{args[j].decode('utf-8', 'replace')}'"), None, out
    return None, creds, out


def _shown(name: bytes) -> str:
    """A user name as the client gave it, for the log: printable and bounded."""
    s = name.decode("utf-8", "backslashreplace")
    return repr(s if len(s) <= 64 else s[:61] + "...")


class Login:
    """A listener's users as one client connection sees them: who it is, and the check
    of a password. `users` returns the listener's users as they are now (a reload
    applies to the next attempt). Attempts are counted on the listener's stats;
    failures are logged (rate limited) with the peer and the user name, never the
    password."""

    def __init__(self, listener: str, users: Callable[[], dict], stats, peer: str):
        self.listener = listener
        self.users = users
        self.stats = stats
        self.peer = peer
        self.user: User | None = None

    def check(self, name: bytes | None, password: bytes) -> tuple[User | None, bytes | None]:
        """(the user, None) if the password is right, else (None, the error reply)."""
        users = self.users() or {}
        if name is None:  # AUTH password: the `default` user, as in Redis
            if "default" not in users:
                self._failed(b"default", "no user is named default (one-argument AUTH)")
                return None, NO_DEFAULT
            name = b"default"
        user = users.get(name.decode("utf-8", "surrogateescape"))
        # compared whether or not the user exists: the time says nothing about which do
        right = hmac.compare_digest(digest(password), user.digest if user is not None else _DUMMY)
        if right and user is not None:
            self.stats.auth_successes += 1
            return user, None
        self._failed(name, "wrong password" if user is not None else "no such user")
        return None, WRONGPASS

    def _failed(self, name: bytes, why: str) -> None:
        st = self.stats
        st.auth_failures += 1
        quiet = st.auth_log.may_log(monotonic())
        if quiet is not None:
            log.warning("listener %s: authentication failed for user %s from %s (%s)%s", self.listener,
                        _shown(name), self.peer, why, f" ({quiet} more failures not logged)" if quiet else "",
                        extra={"event": "auth_failed", "route": self.listener})


class Gate:
    """A client of a listener with users, until it authenticates (see the module's
    docstring). The shell (server.ClientConnection) writes `out_client`, and closes the
    connection once written when `close_when_done` is set."""

    # what the shell asks of a session while the gate stands in for it
    shared = True        # a client that does not read its replies is not read either
    idle = True          # nothing owed upstream: a reload may close it at once
    pending = ()
    need_link = None
    upstream_error = None

    @staticmethod
    def _subscribed() -> bool:
        return False

    def __init__(self, login: Login, limits, no_auth: frozenset):
        self.login = login
        self.no_auth = no_auth   # command names the server answers before AUTH (command table)
        self.reader = RequestReader(limits.max_bulk, min(limits.max_query, UNAUTHENTICATED_MAX_QUERY))
        self.reader.fast = False            # one request at a time: the rest goes to the session
        self.reader.unauthenticated = True
        self.output_limit = limits.output_limit
        self.out_client: list[bytes] = []
        self.user: User | None = None
        self.first: list[bytes] | None = None
        self.rest = b""
        self.close_when_done = False
        self.protocol_error = False

    def client_data(self, data: bytes) -> None:
        if self.close_when_done or self.user is not None:
            return
        reader = self.reader
        reader.feed(data)
        while True:
            try:
                args = reader.get()
            except ProtocolError as e:
                self.out_client.append(error(f"ERR Protocol error: {e}"))
                self.close_when_done = self.protocol_error = True
                return
            if args is None:
                return
            try:
                self._handle(args)
            except Exception as e:  # a bug here must cost this client alone, never the process
                log.exception("listener %s: internal error before authentication", self.login.listener)
                self.out_client.append(error(f"ERR proxy internal error ({e.__class__.__name__}); closing the "
                                             "connection"))
                self.close_when_done = self.protocol_error = True
                return
            if self.user is not None:
                self.rest = reader.take_rest()
                return
            if self.close_when_done:
                return

    def _handle(self, args: list[bytes]) -> None:
        name = args[0].lower()
        handler = self._HANDLERS.get(name) if name.decode("latin-1") in self.no_auth else None
        if handler is None:
            self.out_client.append(NOAUTH)
        else:
            handler(self, args)

    def _auth(self, args: list[bytes]) -> None:
        if len(args) < 2:
            return self.out_client.append(error("ERR wrong number of arguments for 'auth' command"))
        if len(args) > 3:
            return self.out_client.append(error("ERR syntax error"))
        user, err = self.login.check(args[1] if len(args) == 3 else None, args[-1])
        if user is None:
            return self.out_client.append(err)
        self.login.user = self.user = user
        self.out_client.append(OK)

    def _hello(self, args: list[bytes]) -> None:
        err, creds, rest = parse_hello(args)
        if err is not None:
            return self.out_client.append(err)
        if creds is None:
            return self.out_client.append(HELLO_NOAUTH)
        user, err = self.login.check(*creds)
        if user is None:
            return self.out_client.append(err)
        self.login.user = self.user = user
        self.first = rest  # HELLO <proto> [SETNAME n]: answered by the server, through the session

    def _quit(self, args: list[bytes]) -> None:
        self.out_client.append(OK)
        self.close_when_done = True

    def _reset(self, args: list[bytes]) -> None:
        if len(args) != 1:
            return self.out_client.append(error("ERR wrong number of arguments for 'reset' command"))
        self.out_client.append(RESET_REPLY)  # nothing to reset: the client is not authenticated

    _HANDLERS = {b"auth": _auth, b"hello": _hello, b"quit": _quit, b"reset": _reset}


def no_auth_commands(table) -> frozenset:
    """The commands a server runs before AUTH: those its command table flags `no_auth`."""
    return frozenset(n for n, c in table.commands.items() if "no_auth" in c.flags)
