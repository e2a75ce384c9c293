"""Request rewriting: client argument list -> server argument list + reply transform.

Pure functions, no I/O. Everything about a command comes from its Rule
(proxy/rules.py): generated key positions, a hand-written rewrite for what the
key specs cannot describe, the reply transform, the policy on a namespaced
route. Connection-state commands (SELECT, HELLO, MULTI, SUBSCRIBE, ...) are
carried out by the session (their Rule names the method).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from proxy.keyspace import Keyspace, Refused
from proxy.keyspecs import KeySpecError
from proxy.rules import EMULATE, FENCED, PASS, REFUSE, Rule, RuleBook
from proxy.speedups import C

Transform = Callable[[bytes], bytes]


class Ctx:
    """What a rewrite may look at: the connection's current keyspace, its route's db map and
    policy, and (through `stats`) whether the route's upstream user is fenced by an ACL."""

    __slots__ = ("ks", "route", "target", "rules", "stats", "tenant", "_fence_key", "node")

    def __init__(self, route, target, rules: RuleBook, stats=None):
        self.route = route
        self.target = target
        self.ks: Keyspace = target.keyspace
        self.rules = rules
        self.stats = stats
        # the tenant fence holds where there is a namespace to fence
        self.tenant = getattr(route, "policy", "tenant") == "tenant" and self.ks.mode != "none"
        self._fence_key = None
        self.node = None   # () -> the data node (Sentinel primary, slot owner) or None; Session sets it

    @property
    def fenced(self) -> bool:
        """The route's upstream user is fenced to the namespace by a Redis ACL (checked at start
        and reload: the answer is this route's, not that of another route of the same name)."""
        st = self.stats
        if not (self.ks.mode == "add" and st is not None and st.upstream_fenced == 1):
            return False
        if self._fence_key is None:
            from proxy.fence import key
            self._fence_key = key(self.route)
        return st.fenced_for == self._fence_key

    def treat(self, rule: Rule) -> str:
        """PASS, EMULATE or REFUSE: the rule's treatment on this route and db."""
        if self.ks.mode == "none":
            return PASS
        return rule.treatment(self.route.policy, self.fenced)

    def client_db(self, arg: bytes):
        """The DbTarget a client db index names, or Refused."""
        try:
            n = int(arg)
        except ValueError:
            raise Refused("ERR value is not an integer or out of range") from None
        t = self.route.target(n)
        if t is None:
            raise Refused(f"ERR db {n} is not mapped on route {self.route.name}")
        return t

    def refused(self, name: str, why: str | None = None, by_policy: bool | None = None) -> Refused:
        """The error for a command this route will not run: the command, the route, why, and
        the setting that would allow it (`by_policy`: the tenant policy refuses it)."""
        return refusal(self.rules.get(name), self, why, by_policy)

    def rewrite(self, args: list[bytes]) -> Transform | None:
        return rewrite(args, self)


def policy_hint(route) -> str:
    """How to set this route's policy to app, in the terms the user configured it."""
    lab = getattr(route, "policy_label", "") or "listener[].policy"
    if lab.endswith(".policy"):
        return f'set policy = "app" on {lab[:-len(".policy")]}'
    return f"set {lab} app" if lab.startswith("--") else f"set {lab}=app"


def refusal(rule: Rule, ctx: Ctx, why: str | None = None, by_policy: bool | None = None) -> Refused:
    label = rule.name.upper().replace("|", " ")
    if rule.everywhere:
        return Refused(f"ERR command '{label}' is refused by the proxy on every route: {why or rule.why}")
    if by_policy is None:
        by_policy = rule.tenant != rule.app
    if ctx.tenant and by_policy:
        # refused by the tenant policy only: name the setting that would allow it
        acl = (", or give the route an upstream user fenced by a Redis ACL (docs/security.md)"
               if rule.tenant == FENCED else "")
        return Refused(f"ERR command '{label}' is refused on {ctx.ks.describe()} (policy \"tenant\": "
                       f"{why or rule.tenant_why or rule.why}); {policy_hint(ctx.route)}{acl}")
    return Refused(f"ERR command '{label}' is refused on {ctx.ks.describe()}: {why or rule.why} "
                   f"(a route without namespace passes it)")


def rewrite(args: list[bytes], ctx: Ctx) -> Transform | None:
    """Rewrite `args` in place for the server; return the reply transform (or None).

    Raises Refused with the error reply for the client."""
    rule = ctx.rules.lookup(args)
    return rewrite_rule(rule, args, ctx)


def rewrite_rule(rule: Rule, args: list[bytes], ctx: Ctx) -> Transform | None:
    if rule.everywhere:
        raise refusal(rule, ctx)
    ks = ctx.ks
    if rule.rewrite is not None:
        return rule.rewrite(args, ctx)
    if ks.mode == "none":
        return None
    if ctx.treat(rule) == REFUSE:
        raise refusal(rule, ctx)
    if rule.positions is not None:
        try:
            positions = rule.positions(args)
        except KeySpecError as e:
            raise Refused(f"ERR {e}") from None
        for i in positions:
            args[i] = ks.key_in(args[i])
        return partial(rule.reply, ks=ks) if rule.reply is not None else None
    return None  # PASS (or EMULATE, carried out by the session)


# ------------------------------------------------------------------ plans
# The hot path: most requests are plain commands whose treatment depends only on
# their name and the connection's keyspace. A Plan is computed once per (name as
# sent, keyspace) and cached, so a request costs a dict look-up and its key loop.

PASS_PLAN, KEYS, SLOW = 0, 1, 2


class Plan:
    __slots__ = ("kind", "label", "positions", "key_in", "reply", "count", "rule", "shareable", "entry", "fast")

    def __init__(self, kind, rule: Rule, positions=None, key_in=None, reply=None):
        self.kind = kind            # PASS_PLAN: send as is; KEYS: rewrite positions; SLOW: full path
        self.rule = rule
        self.label = rule.name      # for metrics (unknown names are counted as "other")
        self.positions = positions  # args -> key indexes
        self.key_in = key_in        # the keyspace's key_in
        self.reply = reply          # reply transform or None
        self.count = 0              # requests seen (read by metrics)
        self.shareable = rule.shareable
        self.entry = None           # the session's pending entry for this plan's replies
        self.fast = None            # its C Spec, if the C path can take it (fast_spec)


def compile_plan(raw_name: bytes, ctx: Ctx) -> Plan:
    """The plan for a command name (as sent) under ctx's keyspace."""
    rules = ctx.rules
    rule = rules.by_raw_name(raw_name)
    ks = ctx.ks
    if rule.name in rules.containers or rule.session is not None or rule.rewrite is not None or rule.everywhere:
        return Plan(SLOW, rule)
    if ks.mode == "none":
        return Plan(PASS_PLAN, rule)
    treatment = rule.tenant if ctx.tenant else rule.app
    if treatment in (REFUSE, FENCED):
        return Plan(SLOW, rule)  # rewrite() refuses with the reason, or passes a fenced route's script
    if rule.positions is not None:
        # add mode: prefix + key as a C call, no Python frame per key
        key_in = ks.prefix.__add__ if ks.mode == "add" else ks.key_in
        return Plan(KEYS, rule, rule.positions, key_in,
                    partial(rule.reply, ks=ks) if rule.reply is not None else None)
    if treatment in (PASS, EMULATE):
        return Plan(PASS_PLAN, rule)
    return Plan(SLOW, rule)


def fast_spec(plan: Plan):
    """The C path's Spec for a plan it can take whole, else None: a shareable command
    (exactly one reply, no connection state) with no reply transform, whose key
    positions are fixed or a simple range; or MULTI / EXEC, which the C path takes
    only around such commands, as one block. The C code counts its requests on the
    Spec (`spec.count`)."""
    if C is None:
        return None
    if plan.rule.session in ("multi", "exec"):
        # the edges of a transaction block, taken whole on a shared link (rewrite_plain's
        # `blocks`; Session._plain_block is the same rule)
        return C.Spec((), role=C.MULTI_OPENS if plan.rule.session == "multi" else C.EXEC_CLOSES)
    if plan.kind > KEYS or plan.reply is not None or not plan.shareable:
        return None
    if plan.kind == PASS_PLAN:
        return C.Spec(())
    form = getattr(plan.positions, "fast", None)
    if form is None:
        return None
    if form[0] == "fixed":
        return C.Spec(form[1], form[2]) if len(form[1]) <= 16 else None
    _, first, lastkey, step = form
    # keyspecs' range check (last = argc + lastkey; last >= first and first < argc)
    # holds exactly when argc >= first - lastkey: that is the Spec's min_argc, which
    # Spec_init requires to be above `first` (lastkey < 0, so it is).
    return C.Spec((), first - lastkey, first, lastkey, step)
