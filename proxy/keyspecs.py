"""Generic Redis/Valkey key-spec interpreter: which arguments of a command are keys.

Pure functions, no I/O. The key specs are the dicts stored in
proxy/data/commands.json (the server's `COMMAND` reply, field names kept)::

    {"flags": ["RO", "access"],
     "begin_search": {"type": "index", "spec": {"index": 1}},
     "find_keys": {"type": "range", "spec": {"lastkey": 0, "keystep": 1, "limit": 0}}}

The algorithm is Redis's ``getKeysUsingKeySpecs`` (src/db.c, same in Valkey 8):

* begin_search ``index``: the first key is at ``index``.
  ``keyword``: search for ``keyword`` (ASCII case-insensitive) starting at
  ``startfrom``; a positive startfrom scans forward up to argc-2, a negative one
  scans backward from argc+startfrom down to 2. Not found -> the spec yields no
  keys (not an error).
* find_keys ``range``: ``last = first + lastkey`` if lastkey >= 0, else
  ``argc + lastkey`` when limit == 0, else ``first + (argc-first)//limit + lastkey``
  (XREAD/XREADGROUP: the keys are the first half of what follows STREAMS).
  ``keynum``: numkeys is ``args[first + keynumidx]``, keys start at
  ``first + firstkey``, every ``keystep``.
* ``first >= argc``, ``last >= argc`` or ``last < first`` is a syntax error
  (KeySpecError), as is a numkeys that is not a strict integer, is negative, or
  counts more keys than there are arguments.
* Specs flagged ``not_key`` (SPUBLISH/SSUBSCRIBE/SUNSUBSCRIBE shard channels)
  are skipped unless ``include_not_keys=True``.

Deliberate differences from the C function (which, on any "invalid" spec,
returns -1 so the server falls back to the command's hand-written getkeys_proc):

* ``numkeys == 0`` yields no keys from that spec instead of an error: that is
  what the server finally answers for EVAL/FCALL/... with 0 keys. Commands that
  need at least one key (ZUNIONSTORE d 0 ...) are rejected by the server itself.
* specs whose begin_search or find_keys type is ``unknown`` (SORT / SORT_RO
  BY/GET/STORE) are skipped, and specs flagged ``incomplete`` (MIGRATE's KEYS
  list) still return the keys they do find. Use :func:`is_incomplete` to tell
  which commands need a hand-written handler on top.
* the keynumidx bounds check is ``first + keynumidx >= argc`` (the fixed form;
  older servers compared keynumidx alone).

API, which one to use:

* ``compile_specs(key_specs) -> fn(args) -> list[int]``: compile once per
  command when loading the table, call ``fn`` on every request. Commands whose
  keys are at fixed positions (GET, SET, LMOVE, ...; the large majority)
  compile to a length check plus a list copy (~90 ns on CPython 3.11); MSET /
  BLPOP ~250 ns, XREAD / EVAL ~0.5-0.6 us, two-spec commands (ZUNIONSTORE,
  GEORADIUS ... STORE) ~1 us.
* ``key_positions(key_specs, args)``: one-shot convenience that compiles on
  every call (~3-6 us, 10-30x slower). Fine for tests and rare paths.

``args`` is the full command as bytes: ``args[0]`` is the command name and, for
a subcommand entry such as ``object|encoding``, ``args[1]`` is the subcommand.
Results are sorted, de-duplicated argument indexes.
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["KeySpecError", "key_positions", "compile_specs", "is_incomplete",
           "is_not_key", "KeyFinder"]

KeyFinder = Callable[[Sequence[bytes]], "list[int]"]

_INT64_MAX = (1 << 63) - 1


class KeySpecError(ValueError):
    """The arguments do not fit the command's key specs; str() is a Redis-style error text."""


def _flags(spec: dict) -> set[str]:
    return {str(f).lower() for f in spec.get("flags", ())}


def is_not_key(spec: dict) -> bool:
    return "not_key" in _flags(spec)


def _is_unknown(spec: dict) -> bool:
    return (spec["begin_search"]["type"] not in ("index", "keyword")
            or spec["find_keys"]["type"] not in ("range", "keynum"))


def is_incomplete(key_specs: list[dict]) -> bool:
    """True if any spec is flagged INCOMPLETE or has an unknown begin_search/find_keys type.

    Such commands (SORT, SORT_RO, MIGRATE) need a hand-written key finder: the
    positions from key_positions/compile_specs are then only a subset (or, for
    MIGRATE's empty-key form, include the "" placeholder at index 3).
    """
    return any("incomplete" in _flags(s) or _is_unknown(s) for s in key_specs)


def _name(args: Sequence[bytes]) -> str:
    if not args:
        return ""
    a = args[0]
    return (a.decode("utf-8", "replace") if isinstance(a, (bytes, bytearray)) else str(a)).lower()


def _arity_error(args: Sequence[bytes]) -> KeySpecError:
    return KeySpecError(f"wrong number of arguments for '{_name(args)}' command")


def _parse_numkeys(raw) -> int:
    """Strict integer parse like Redis string2ll: no spaces, '+', leading zeros, '_'."""
    if isinstance(raw, str):
        raw = raw.encode()
    raw = bytes(raw)
    if raw.isdigit() and (raw[:1] != b"0" or len(raw) == 1):
        n = int(raw)
        if n <= _INT64_MAX:
            return n
    elif raw[:1] == b"-" and raw[1:].isdigit() and raw[1:2] != b"0":
        if int(raw) >= -_INT64_MAX - 1:
            raise KeySpecError("Number of keys can't be negative")
    raise KeySpecError("value is not an integer or out of range")


# --------------------------------------------------------------------- compiling

# A compiled spec is fn(args, argc) -> list of positions (possibly empty),
# raising KeySpecError when Redis would treat the spec as invalid.
_SpecFn = Callable[[Sequence[bytes], int], "list[int] | range"]


def _compile_begin(bs: dict):
    """Return ('index', pos) or ('keyword', fn(args, argc) -> first or 0)."""
    t = bs["type"]
    s = bs["spec"]
    if t == "index":
        return "index", int(s["index"])
    kw = str(s["keyword"]).encode().upper()
    kwlen = len(kw)
    startfrom = int(s["startfrom"])

    if startfrom > 0:
        def search(args, argc):
            for i in range(startfrom, argc - 1):
                a = args[i]
                if len(a) == kwlen and a.upper() == kw:
                    return i + 1
            return 0
    else:
        def search(args, argc):
            start = argc + startfrom
            if start >= argc:
                return 0
            for i in range(start, 1, -1):
                a = args[i]
                if len(a) == kwlen and a.upper() == kw:
                    return i + 1
            return 0
    return "keyword", search


def _compile_spec(spec: dict) -> tuple[_SpecFn, tuple[int, ...] | None, int]:
    """Compile one known spec. Returns (fn, fixed_positions_or_None, min_argc)."""
    bkind, bval = _compile_begin(spec["begin_search"])
    fk = spec["find_keys"]
    s = fk["spec"]

    if fk["type"] == "range":
        lastkey = int(s["lastkey"])
        step = int(s["keystep"]) or 1
        limit = int(s.get("limit", 0))

        if bkind == "index" and lastkey >= 0:
            first = bval
            last = first + lastkey
            fixed = tuple(range(first, last + 1, step))

            def fn(args, argc):
                if last >= argc:
                    raise _arity_error(args)
                return fixed
            return fn, fixed, last + 1

        def last_of(first, argc):
            if lastkey >= 0:
                return first + lastkey
            if not limit:
                return argc + lastkey
            # C integer division truncates toward zero.
            q = argc - first
            q = q // limit if q >= 0 else -((-q) // limit)
            return first + q + lastkey

        if bkind == "index":
            first0 = bval

            def fn(args, argc):
                last = last_of(first0, argc)
                if last >= argc or last < first0 or first0 >= argc:
                    raise _arity_error(args)
                return range(first0, last + 1, step)
            if lastkey < 0 and not limit and first0 >= 1:  # the C path's range form (first, lastkey, step)
                fn.fast = ("range", first0, lastkey, step)
        else:
            search = bval

            def fn(args, argc):
                first = search(args, argc)
                if not first:
                    return ()
                last = last_of(first, argc)
                if last >= argc or last < first or first >= argc:
                    raise KeySpecError("syntax error")
                return range(first, last + 1, step)
        return fn, None, 0

    # keynum
    keynumidx = int(s["keynumidx"])
    firstkey = int(s["firstkey"])
    step = int(s["keystep"]) or 1
    search = bval if bkind == "keyword" else None
    index = bval if bkind == "index" else 0

    def fn(args, argc):
        if search is not None:
            first = search(args, argc)
            if not first:
                return ()
        else:
            first = index
        nidx = first + keynumidx
        if nidx >= argc or nidx < 0:
            raise _arity_error(args)
        numkeys = _parse_numkeys(args[nidx])
        if numkeys == 0:
            return ()
        first += firstkey
        last = first + numkeys - 1
        if last >= argc or first >= argc:
            raise KeySpecError("Number of keys can't be greater than number of args")
        return range(first, last + 1, step)
    return fn, None, 0


def compile_specs(key_specs: list[dict], *, include_not_keys: bool = False) -> KeyFinder:
    """Compile key specs into ``fn(args) -> list[int]`` (sorted unique key indexes).

    ``fn`` raises KeySpecError when the arguments cannot match the specs. Unknown
    specs are skipped (see is_incomplete), ``not_key`` specs too unless
    include_not_keys. Call this once per command; ``fn`` is what runs per request.
    """
    compiled = []
    for spec in key_specs:
        if _is_unknown(spec):
            continue
        if not include_not_keys and is_not_key(spec):
            continue
        compiled.append(_compile_spec(spec))

    if not compiled:
        def no_keys(args: Sequence[bytes]) -> list[int]:
            return []
        no_keys.fast = ("fixed", (), 1)
        return no_keys

    if all(fixed is not None for _, fixed, _ in compiled):
        positions = tuple(sorted({p for _, fixed, _ in compiled for p in fixed}))
        min_argc = max(m for _, _, m in compiled)

        def fixed_keys(args: Sequence[bytes]) -> list[int]:
            if len(args) < min_argc:
                raise _arity_error(args)
            return list(positions)
        fixed_keys.fast = ("fixed", positions, min_argc)  # what the C path needs to do the same
        return fixed_keys

    fns = tuple(fn for fn, _, _ in compiled)
    if len(fns) == 1:
        only = fns[0]

        def one_spec(args: Sequence[bytes]) -> list[int]:
            # A single range/keynum walks forward, so it is already sorted and unique.
            return list(only(args, len(args)))
        if hasattr(only, "fast"):
            one_spec.fast = only.fast
        return one_spec

    def many_specs(args: Sequence[bytes]) -> list[int]:
        argc = len(args)
        out: list[int] = []
        for fn in fns:
            out.extend(fn(args, argc))
        return sorted(set(out))
    return many_specs


def key_positions(key_specs: list[dict], args: list[bytes], *,
                  include_not_keys: bool = False) -> list[int]:
    """Sorted unique indexes of the key arguments in ``args`` (args[0] = command name).

    One-shot form of compile_specs(key_specs)(args); prefer compiling once.
    """
    return compile_specs(key_specs, include_not_keys=include_not_keys)(args)
