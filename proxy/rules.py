"""One rule record per command and subcommand: everything the proxy knows about it.

Built once from the generated table (proxy/commands.py, the servers' own key
specs) and the hand-written overlay (proxy/overlay.py, each entry with its
reason). Every other module asks the Rule and nothing else classifies
commands: how its keys are found, how its reply is rewritten, its policy on a
namespaced route, and its effect on the connection (may it share one?).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from proxy.commands import CommandTable, default_table
from proxy.overlay import (ANY, CLUSTER_CLASSES, EMULATE, FENCED, NOT_ROUTED, OVERLAY, PASS, PIN,  # noqa: F401
                           PLAIN, REFUSE, SLOT, STATE, STREAM)

_FIELDS = {"effect", "policy", "tenant", "app", "tenant_why", "everywhere", "rewrite", "reply", "session",
           "subscribe", "why", "cluster", "cluster_why"}
POLICIES = ("tenant", "app")


@dataclass(frozen=True)
class Rule:
    name: str                          # "get", "client|reply"
    known: bool                        # in the generated table
    keyed: bool                        # has key specs
    positions: Callable | None         # args -> key indexes (generated key specs), if complete
    flags: frozenset
    effect: str                        # PLAIN, STATE, PIN or STREAM
    policy: str                        # on a namespaced route: PASS, EMULATE or REFUSE
    everywhere: bool                   # refused on every route
    why: str
    tenant: str = REFUSE               # on a namespaced route with policy "tenant" (+ FENCED)
    app: str = REFUSE                  # on a namespaced route with policy "app"
    tenant_why: str = ""               # why `tenant` differs from `policy`
    rewrite: Callable | None = None    # handlers.py function
    reply: Callable | None = None      # replies.py transform (takes ks=)
    session: str | None = None         # Session method suffix
    subscribe: tuple | None = None     # (set, adding)
    # On a shared link, may this PIN borrow a pooled connection for the one call instead
    # (limits.blocking_pool)? A blocking command with all its keys known and no other reason
    # to pin in the overlay: not WAIT/WAITAOF, which wait for this connection's own writes.
    poolable: bool = False
    # On a spread route over a Redis Cluster: where it goes (overlay.py, `cluster`; proxy/spread.py)
    cluster: str = SLOT
    cluster_why: str = ""
    # Exactly one reply and no connection state: may go on a shared connection. (Derived
    # from `effect`; an attribute, not a property: Session.handle asks it for every request.)
    shareable: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shareable", self.effect == PLAIN)

    def treatment(self, policy: str, fenced: bool = False) -> str:
        """PASS, EMULATE or REFUSE on a namespaced route of `policy`; `fenced`: the route's
        upstream user is fenced to the namespace by a Redis ACL (FENCED passes)."""
        t = self.tenant if policy == "tenant" else self.app
        if t == FENCED:
            return PASS if fenced else REFUSE
        return t


def _check(name: str, entry: dict) -> None:
    unknown = set(entry) - _FIELDS
    if unknown:
        raise ValueError(f"overlay entry {name!r}: unknown fields {sorted(unknown)}")
    if "effect" in entry and entry["effect"] not in (PLAIN, STATE, PIN, STREAM):
        raise ValueError(f"overlay entry {name!r}: bad effect {entry['effect']!r}")
    for f, allowed in (("policy", (PASS, EMULATE, REFUSE)), ("app", (PASS, EMULATE, REFUSE)),
                       ("tenant", (PASS, EMULATE, REFUSE, FENCED))):
        if f in entry and entry[f] not in allowed:
            raise ValueError(f"overlay entry {name!r}: bad {f} {entry[f]!r}")
    if "cluster" in entry and entry["cluster"] not in CLUSTER_CLASSES:
        raise ValueError(f"overlay entry {name!r}: bad cluster {entry['cluster']!r}")
    if entry.get("cluster") == NOT_ROUTED and not entry.get("cluster_why"):
        raise ValueError(f"overlay entry {name!r}: cluster NOT_ROUTED needs `cluster_why` (shown in refusals)")
    if "tenant" in entry and not entry.get("tenant_why"):
        raise ValueError(f"overlay entry {name!r}: `tenant` needs `tenant_why` (shown in refusals)")


class RuleBook:
    def __init__(self, table: CommandTable | None = None, overlay: dict | None = None):
        self.table = table or default_table()
        overlay = OVERLAY if overlay is None else overlay
        for name, entry in overlay.items():
            _check(name, entry)
        self.overlay = overlay
        self.rules: dict[str, Rule] = {}
        for name in self.table.commands:
            self.rules[name] = self._build(name)
        # Subcommands of containers (and names) the table does not know still get a
        # rule: refused on namespaced routes, pinned elsewhere.
        self.containers = self.table.containers
        self.confirms = {name.encode(): r.subscribe for name, r in self.rules.items() if r.subscribe}

    def _build(self, name: str) -> Rule:
        cmd = self.table.commands.get(name)
        top = name.split("|")[0]
        entry = self.overlay.get(name, {})
        parent = self.overlay.get(top, {}) if top != name else {}
        flags = cmd.flags if cmd is not None else frozenset()
        keyed = cmd is not None and cmd.keyed
        complete = keyed and not cmd.incomplete
        rewrite = entry.get("rewrite")
        # defaults from the specs (see overlay.py's docstring)
        if complete:
            effect = PIN if ("blocking" in flags or "pubsub" in flags) else PLAIN
            policy, why = PASS, "its keys are rewritten"
        elif rewrite is not None:
            effect, policy, why = PLAIN, PASS, ""
        elif cmd is None:
            effect, policy = PIN, REFUSE
            why = ("unknown subcommand" if "|" in name else "unknown command") + \
                "; the proxy fails closed on namespaced routes"
        elif keyed:
            effect, policy, why = PIN, REFUSE, "its key positions are not fully known to the proxy"
        else:
            effect, policy, why = PIN, REFUSE, "it is not known to stay inside the namespace"
        why = entry.get("why") or parent.get("why") or why
        policy = entry.get("policy", policy)
        effect = entry.get("effect", effect)
        # on a spread route over a cluster (fail closed: a command whose keys the proxy
        # cannot find has no node it could be sent to)
        if cmd is None:
            cluster, cluster_why = NOT_ROUTED, "the proxy does not know it, so not where its keys are"
        elif keyed and not complete:
            cluster, cluster_why = NOT_ROUTED, "its key positions are not fully known, so its node cannot be chosen"
        elif effect == STATE:
            cluster, cluster_why = STATE, ""
        else:
            cluster, cluster_why = (SLOT if keyed else ANY), ""
        if "cluster" in entry:
            cluster, cluster_why = entry["cluster"], entry.get("cluster_why", "")
        return Rule(
            name=name, known=cmd is not None, keyed=keyed,
            positions=cmd.positions if complete else None, flags=flags,
            effect=effect, policy=policy, cluster=cluster, cluster_why=cluster_why,
            everywhere=entry.get("everywhere", False), why=why,
            tenant=entry.get("tenant", policy), app=entry.get("app", policy),
            tenant_why=entry.get("tenant_why", ""), rewrite=rewrite,
            reply=entry.get("reply"), session=entry.get("session"), subscribe=entry.get("subscribe"),
            poolable=complete and "blocking" in flags and "pubsub" not in flags and "effect" not in entry
            and "effect" not in parent and entry.get("session") is None)

    def get(self, name: str) -> Rule:
        """The rule for a lowercase name ("get", "client|reply"), known or not."""
        rule = self.rules.get(name)
        if rule is None:
            rule = self._build(name)
            if len(self.rules) < 4096:  # names are client input: bound what is kept
                self.rules[name] = rule
        return rule

    def lookup(self, args: list[bytes]) -> Rule:
        """The rule for a request; container commands resolve their subcommand."""
        name = args[0].lower().decode("latin-1")
        if name in self.containers and len(args) > 1:
            name = name + "|" + args[1].lower().decode("latin-1")
        return self.get(name)

    def by_raw_name(self, raw: bytes) -> Rule:
        """The rule for a command name as sent (containers give their own record)."""
        return self.get(raw.lower().decode("latin-1"))


_default: RuleBook | None = None


def default_rules() -> RuleBook:
    global _default
    if _default is None:
        _default = RuleBook()
    return _default


_TREATMENT = {PASS: "passed", EMULATE: "emulated", REFUSE: "refused", FENCED: "refused unless the upstream user is "
              "fenced by a Redis ACL"}


def markdown_policies(book: RuleBook | None = None) -> str:
    """README's table of what the two policies treat differently on a namespaced route
    (generated from the Rules: `python -m proxy.rules`; tests/test_policy.py compares)."""
    book = book or default_rules()
    rows = ["| command | `tenant` | `app` |", "|---|---|---|"]
    names = sorted(n for n in set(book.table.commands) | set(book.overlay) if n not in book.containers)
    for name in names:
        r = book.get(name)
        if r.tenant == r.app or r.everywhere:
            continue
        label = name.upper().replace("|", " ")
        tenant = _TREATMENT[r.tenant] + f": {r.tenant_why or r.why}"
        app = _TREATMENT[r.app] + (f": {r.why}" if r.policy == r.app else
                                   ": a read-only server command, as the server answers it (the application is "
                                   "trusted)")
        rows.append(f"| {label} | {tenant} | {app} |")
    from proxy.overlay import CONFIG_GET_SAFE
    rows += ["", "CONFIG GET on `tenant` answers these parameters only (a glob matches among them; any other "
             "name is refused):", ""]
    rows += [f"- `{name}`: {why}" for name, why in CONFIG_GET_SAFE.items()]
    return "\n".join(rows)


if __name__ == "__main__":  # python -m proxy.rules: README's policy table
    print("<!-- policies: generated by python -m proxy.rules -->")
    print(markdown_policies())
