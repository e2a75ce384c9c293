#!/usr/bin/env python3
"""Coverage-guided fuzzing of the C hot path (proxy/_speedups.c) with atheris.

    scripts/fuzz.sh [SECONDS] [RUNS]        # the long run: ASan build, libFuzzer, see docs/fuzzing.md
    python3 scripts/fuzz_speedups.py CORPUS_DIR [libFuzzer flags]   # as fuzz.sh runs it
    python3 scripts/fuzz_speedups.py --replay DIR_OR_FILE...         # the checks alone, no fuzzer
    python3 scripts/fuzz_speedups.py --store MINIMISED_CORPUS_DIR     # -> tests/data/fuzz_speedups_corpus.txt

Each input drives one of rewrite_plain, frame_end or frame_run and checks more
than "no crash": the C answer against a reference computed in Python on the
same bytes (check_one):

  rewrite_plain  against model_rewrite, a line-by-line Python statement of the
                 C loop's rules (canonical requests, Spec key positions, modes,
                 limit, max_bulk): (out, end, n, keys) must be equal; `out` must
                 re-parse (hiredis) as exactly n requests, data[:end] too (the
                 proxy's RequestReader); the Specs' counters must grow by n.
                 Some inputs build a Spec from fuzzed parameters: C.Spec must
                 refuse exactly the ones spec_error refuses.
  frame_end      against proxy.resp._frame_end wherever C does not answer -2.
  frame_run      C then the Python framer on the rest must end where the
                 Python framer alone ends, popping the same entries.
  Hist           every input also builds a latency histogram from its bytes read
                 as doubles (bounds, then values): C.Hist must refuse exactly the
                 bounds hist_error refuses, else count like PyHistogram (bisect_left).

tests/test_speedups_invariants.py runs check_one on stored_inputs() (the seeds
below plus tests/data/fuzz_speedups_corpus.txt): the bounded check CI runs.
"""

from __future__ import annotations

import base64
import pathlib
import sys
from collections import deque

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS_FILE = ROOT / "tests" / "data" / "fuzz_speedups_corpus.txt"

MAX_ARGS = 1 << 20  # proxy/_speedups.c
MAX_FIXED = 16

# Specs by name, as (fixed, min_argc, first, lastkey, step): real commands' shapes
# (what rewrite.fast_spec builds) and one-letter names the fuzzer finds easily.
SPEC_PARAMS = {
    b"GET": ((1,), 2, 0, 0, 1),
    b"get": ((1,), 2, 0, 0, 1),
    b"SET": ((1,), 3, 0, 0, 1),
    b"MGET": ((), 2, 1, -1, 1),
    b"MSET": ((), 2, 1, -1, 2),
    b"HSET": ((1,), 4, 0, 0, 1),
    b"PING": ((), 1, 0, 0, 1),
    b"A": ((1,), 2, 0, 0, 1),
    b"B": ((1, 2), 3, 0, 0, 1),
    b"C": ((), 3, 2, -1, 1),
    b"D": ((), 4, 1, -3, 2),
    b"E": ((1, 3, 5), 6, 0, 0, 1),
    b"": ((), 1, 0, 0, 1),
    # the edges of a transaction block (role 1 / 2: rewrite_plain's `blocks`)
    b"MULTI": ((), 1, 0, 0, 1, 1),
    b"EXEC": ((), 1, 0, 0, 1, 2),
}
MAX_BLOCK = 64  # proxy/_speedups.c
LIMITS = [1, 2, 3, 5, 100, sys.maxsize]
MAX_BULKS = [0, 1, 3, 16, 512 * 1024 * 1024]
PREFIXES = [b"", b"a", b"app:", b"\r\n$", b"*1\r\n"]
REPEATS = [1, 1, 1, 1, 2, 9, 40, 140]

def _encode(args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


SEEDS = [
    b"\x00\x01\x04\x04" + b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" * 3,
    b"\x00\x02\x04\x04" + b"*2\r\n$3\r\nGET\r\n$5\r\napp:k\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"\x00\x01\x04\x04" + b"*5\r\n$4\r\nMSET\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n*1\r\n$4\r\nPING\r\n",
    b"\x00\x01\x04\x04" + b"*4\r\n$1\r\nD\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n*3\r\n$1\r\nC\r\n$1\r\nx\r\n$1\r\ny\r\n",
    b"\x00\x01\x04\x04" + b"*16000000\r\n",
    b"\x00\x01\x04\x04" + b"*1\r\n$1\r\nA\r\n*2\r\n$01\r\nA\r\n$1\r\nk\r\n",
    b"\x00\x01\x04\x02" + b"*2\r\n$1\r\nA\r\n$4\r\nabcd\r\n",
    # a fuzzed Spec: nfixed=1, position 3, min_argc 1 (the old out-of-range read), then `A k`
    b"\x03\x01\x04\x04" + b"\x01\x04\x02\x00\x00\x02" + b"*2\r\n$1\r\nF\r\n$1\r\nk\r\n",
    b"\x03\x01\x04\x04" + b"\x00\x05\x04\x03\x02\x03" + b"*4\r\n$1\r\nF\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n",
    b"\x01\x00\x00\x00" + b"*3\r\n$1\r\na\r\n:12\r\n%1\r\n+a\r\n_\r\n|1\r\n+k\r\n+v\r\n#t\r\n",
    b"\x01\x00\x00\x00" + b"*1\r\n" * 70 + b":1\r\n",
    b"\x01\x00\x00\x00" + b"$-1\r\n*-1\r\n=5\r\ntxt:a\r\n!3\r\nERR\r\n>2\r\n+a\r\n+b\r\n",
    b"\x01\x00\x00\x00" + b"$+3\r\nabc\r\n$03\r\nabc\r\n*x\r\n$99999999999999999999\r\n",
    b"\x01\x07\x00\x00" + b"+OK\r\n-ERR x\r\n:1\r\n",
    b"\x02\xff\x0c\x05" + b"+OK\r\n$1\r\na\r\n>1\r\n+p\r\n*2\r\n:1\r\n:2\r\n",
    b"\x02\x0f\x0c\x09" + b"+OK\r\n$1\r\na\r\n*1\r\n$5\r\nab",
    b"\x02\x0e\x03\x0a" + b"~2\r\n:1\r\n(123\r\n,1.5\r\n",
    b"\x00\x05\x05\x04" + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*3\r\n$4\r\nHSET\r\n$1\r\nh\r\n$1\r\nf\r\n",
    b"\x00\x01\x04\x04" + b"*2\r\n$4\r\nMGET\r\n$1\r\na\r\n*1\r\n$4\r\nMGET\r\n*2\r\n$3\r\nGET\r\n",
    # wider than the stack arrays (32 arguments, 128 keys): MSET of 100, A of 40, 140 GETs
    b"\x00\x01\x04\x04" + _encode([b"MSET"] + [b"k", b"v"] * 50),
    b"\x00\x01\x04\x04" + _encode([b"A"] + [b"x"] * 39) + _encode([b"MGET"] + [b"y"] * 60),
    b"\x00\x01\x04\xe4" + b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"\x00\x06\x04\xc4" + _encode([b"MSET"] + [b"app:k", b"v"] * 5),
    # transaction blocks (blocks on: b's top bit): whole, cut short, nested, too long, past the limit
    # (b = 0x82: limit 100, 0x83: none, 0x81: 5)
    b"\x00\x01\x82\x04" + _encode([b"MULTI"]) + _encode([b"SET", b"k", b"v"]) + _encode([b"EXEC"]) * 2,
    b"\x00\x01\x82\x04" + _encode([b"GET", b"k"]) + _encode([b"MULTI"]) + _encode([b"GET", b"k"]),
    b"\x00\x01\x82\x04" + _encode([b"MULTI"]) * 2 + _encode([b"EXEC"]),
    b"\x00\x01\x83\x04" + _encode([b"MULTI"]) + _encode([b"PING"]) * 70 + _encode([b"EXEC"]),
    b"\x00\x01\x81\x04" + _encode([b"A", b"x"]) * 2 + _encode([b"MULTI"]) + _encode([b"A", b"y"]) + _encode([b"EXEC"]),
    b"\x00\x02\x82\x04" + _encode([b"MULTI", b"x"]) + _encode([b"GET", b"app:k"]) + _encode([b"EXEC"]),
    b"\x00\x02\x82\x04" + _encode([b"MULTI"]) + _encode([b"GET", b"app:k"]) + _encode([b"EXEC"]),
    # a fuzzed Spec with 17 positions: too many
    b"\x03\x01\x04\x04" + b"\x11\x02\x07\x00\x00\x02" + b"*2\r\n$1\r\nF\r\n$1\r\nk\r\n",
    b"\x00\x01\x04\x04" + b"*3\r\n$1\r\nE\r\n$1\r\na\r\n$1\r\nb\r\n*6\r\n$1\r\nE\r\n$0\r\n\r\n$0\r\n\r\n$0\r\n\r\n$0\r\n\r\n$0\r\n\r\n",
]


# ------------------------------------------------------------------ references

def spec_error(fixed, min_argc, first, lastkey, step):
    """Why C.Spec must refuse these parameters, or None (Spec_init's rules)."""
    if len(fixed) > MAX_FIXED:
        return "too many"
    if min_argc < 1:
        return "min_argc"
    if fixed and first:
        return "both"
    if first < 0 or step < 1 or (first and lastkey >= 0):
        return "range"
    if first and first >= min_argc:
        return "first"
    for i, v in enumerate(fixed):
        if v < 1 or v > MAX_ARGS or (i and v <= fixed[i - 1]):
            return "increasing"
        if v >= min_argc:
            return "fixed"
    return None


def _read_len(data: bytes, p: int):
    """read_len in _speedups.c: a canonical length (digits, no leading zero, at most
    18) and a CRLF; (value, next) or None (incomplete or not canonical)."""
    q = p
    while q < len(data) and 0x30 <= data[q] <= 0x39:
        if q - p >= 18:
            return None
        q += 1
    if q == p or q + 1 >= len(data) or data[q:q + 2] != b"\r\n":
        return None
    if data[p] == 0x30 and q - p > 1:
        return None
    return int(data[p:q]), q + 2


def _key_positions(params, argc):
    fixed, min_argc, first, lastkey, step = params[:5]
    if argc < min_argc:
        return None
    if first:
        last = argc + lastkey
        if last >= argc or last < first or first >= argc:
            return None
        return list(range(first, last + 1, step))
    return list(fixed)


def model_rewrite(data, params_by_name, mode, prefix, limit, max_bulk, blocks=False):
    """What rewrite_plain must return, in plain Python."""
    p = n = nkeys = 0
    out = []
    blk = None  # at a MULTI being taken: (p, n, nkeys, len(out)), to give the block back
    while n < limit and p < len(data) and data[p] == 0x2A:
        r = _read_len(data, p + 1)
        if r is None or not 1 <= r[0] <= MAX_ARGS:
            break
        count, q = r
        args = []
        for _ in range(count):
            if q >= len(data) or data[q] != 0x24:
                break
            r = _read_len(data, q + 1)
            if r is None:
                break
            ln, s = r
            if ln > max_bulk or len(data) - s < ln + 2 or data[s + ln:s + ln + 2] != b"\r\n":
                break
            args.append(data[s:s + ln])
            q = s + ln + 2
        if len(args) < count:
            break
        params = params_by_name.get(args[0])
        if params is None:
            break
        role = params[5] if len(params) > 5 else 0
        if role and not (blocks and count == 1 and (role == 1) == (blk is None)):
            break  # EXEC outside a block, MULTI inside one, an edge with arguments
        if blk is not None and n - blk[1] == MAX_BLOCK:
            break  # a block too long
        if role == 1:
            blk = (p, n, nkeys, len(out))
        positions = _key_positions(params, count)
        if positions is None:
            break
        if mode == 2 and not all(args[i].startswith(prefix) for i in positions):
            break
        for i in positions:
            if mode == 1:
                args[i] = prefix + args[i]
            elif mode == 2:
                args[i] = args[i][len(prefix):]
        out.append(args)
        nkeys += len(positions)
        n += 1
        p = q
        if role == 2:
            if not n < limit:  # past the owed-replies bound: given back
                p, n, nkeys, k = blk
                del out[k:]
                blk = None
                break
            blk = None
    if blk is not None:  # the data or the limit ended inside the block, or it did not qualify
        p, n, nkeys, k = blk
        del out[k:]
    return b"".join(_encode(a) for a in out), p, n, nkeys


# ------------------------------------------------------------------ checks

def _check_rewrite(C, data, specs, params, mode, prefix, limit, max_bulk, blocks=False):
    import hiredis
    from proxy.resp import RequestReader

    before = {k: s.count for k, s in specs.items()}
    got = C.rewrite_plain(data, specs, mode, prefix, limit, max_bulk, blocks)
    want = model_rewrite(data, params, mode, prefix, limit, max_bulk, blocks)
    assert got == want, (data[:200], mode, prefix, limit, max_bulk, blocks, got[1:], want[1:])
    out, end, n, keys = got
    assert sum(s.count for s in specs.values()) - sum(before.values()) == n
    # the server bytes are n whole requests, nothing more
    reader = hiredis.Reader()
    reader.feed(out)
    for _ in range(n):
        req = reader.gets()
        assert isinstance(req, list) and req, (out[:200], req)
    assert reader.gets() is False
    # and the client bytes taken are n requests to the proxy's own reader
    if n:
        rr = RequestReader(max_bulk=512 * 1024 * 1024)
        rr.feed(data[:end])
        for _ in range(n):
            assert rr.get() is not None
        assert rr.get() is None


def _python_frame_end(buf, pos):
    from proxy import resp
    try:
        return resp._frame_end(buf, pos)
    except resp.ProtocolError as e:
        return ("error", str(e))


def _check_frame_end(C, data, start):
    for pos in (0, start):
        for _ in range(20):
            c = C.frame_end(data, pos)
            want = _python_frame_end(data, pos)
            assert c == want or c == -2, (data[:200], pos, c, want)
            if c < 0:
                break
            pos = c


def _check_frame_run(C, data, bits, limit, nentries):
    from proxy import resp
    entries = [None if (bits >> (i % 8)) & 1 or i % 3 else "x" for i in range(nentries)]
    push = bool(bits & 0x80)
    ref, fast = deque(entries), deque(entries)
    try:
        want = resp._frame_run(data, 0, limit, push, ref)
    except resp.ProtocolError as e:
        want = ("error", str(e), len(ref))
    pos, m = C.frame_run(data, 0, limit, push, fast)
    assert 0 <= m <= limit and len(fast) == len(entries) - m and 0 <= pos <= len(data)
    try:
        rest_pos, rest_m = resp._frame_run(data, pos, limit - m, push, fast)
        got = (rest_pos if rest_m else pos, m + rest_m)
    except resp.ProtocolError as e:
        got = ("error", str(e), len(fast))
    assert got == want, (data[:200], limit, push, entries, got, want)


_BASE_SPECS = None


def hist_error(bounds) -> str | None:
    """Why C.Hist refuses these bounds (None: it takes them)."""
    if not 1 <= len(bounds) <= 32:
        return "a histogram needs 1 to 32 bounds"
    if any(not b > a for a, b in zip(bounds, bounds[1:])):  # (NaN compares false: refused)
        return "histogram bounds must increase"
    return None


def _check_hist(C, buf: bytes) -> None:
    import math
    import struct
    from proxy.stats import PyHistogram
    if len(buf) < 9:
        return
    nb = buf[0] % 36
    doubles = [struct.unpack_from("<d", buf, i)[0] for i in range(1, len(buf) - 7, 8)]
    bounds, values = tuple(doubles[:nb]), doubles[nb:]
    err = hist_error(bounds)
    try:
        h = C.Hist(bounds)
    except ValueError:
        assert err is not None, bounds
        return
    assert err is None, (bounds, err)
    ref = PyHistogram(bounds)
    for v in values:
        h.observe(v)
        ref.observe(v)
    assert h.counts == ref.counts and h.count == len(values), (bounds, values)
    assert h.sum == ref.sum or (math.isnan(h.sum) and math.isnan(ref.sum)), (h.sum, ref.sum)


def check_one(buf: bytes) -> None:
    """One fuzz input: 4 control bytes (target, mode/bits, limit, max_bulk), then data."""
    global _BASE_SPECS
    from proxy import _speedups as C
    if _BASE_SPECS is None:
        # built once and never changed: rewrite_plain caches look-ups per dict
        _BASE_SPECS = {name: C.Spec(*p) for name, p in SPEC_PARAMS.items()}
    _check_hist(C, buf)
    if len(buf) < 4:
        return
    sel, a, b, c = buf[0] % 4, buf[1], buf[2], buf[3]
    data = buf[4:]
    if sel == 0 or sel == 3:
        specs, params = _BASE_SPECS, SPEC_PARAMS
        if sel == 3:
            if len(data) < 6:
                return
            d, data = data[:6], data[6:]
            # small signed values around the edges Spec_init checks
            fixed = tuple(range(d[1] % 8 - 1, 60, d[2] % 3 + 1))[:d[0] % 20]  # up to 19: MAX_FIXED is 16
            if d[0] & 0x80:
                fixed = fixed[::-1]
            p = (fixed, d[2] % 8 - 1, d[3] % 6 - 1 if not fixed or d[3] & 0x80 else 0,
                 d[4] % 6 - 4, d[5] % 4 - 1)
            err = spec_error(*p)
            try:
                spec = C.Spec(*p)
            except ValueError:
                assert err is not None, p
                return
            assert err is None, (p, err)
            # a fresh dict: the name cache assumes a dict's entries never change
            specs = dict(_BASE_SPECS)
            specs[b"F"] = spec
            params = dict(SPEC_PARAMS)
            params[b"F"] = p
        # the top bits of c repeat the data: long pipelines and more keys than the
        # scratch arrays hold on the stack (their heap path) from short inputs
        reps = max(1, min(REPEATS[c >> 5], 64 * 1024 // max(1, len(data))))
        _check_rewrite(C, data * reps, specs, params, a % 4, PREFIXES[(a >> 2) % len(PREFIXES)],
                       LIMITS[b % len(LIMITS)], MAX_BULKS[c % len(MAX_BULKS)], bool(b & 0x80))
    elif sel == 1:
        _check_frame_end(C, data, a if a < 200 else len(data) + a - 200)
    else:
        _check_frame_run(C, data, a, b % 13, c % 12)


def stored_inputs() -> list[bytes]:
    """The seeds, then every input of the stored corpus (one base64 line each)."""
    out = list(SEEDS)
    if CORPUS_FILE.exists():
        for line in CORPUS_FILE.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(base64.b64decode(line))
    return out


def main() -> None:
    if sys.argv[1:2] == ["--write-seeds"]:  # fuzz.sh: the stored inputs as a starting corpus
        d = pathlib.Path(sys.argv[2])
        d.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(stored_inputs()):
            (d / f"seed-{i:04d}").write_bytes(data)
        return
    if sys.argv[1:2] == ["--store"]:  # a minimised corpus dir -> CORPUS_FILE (docs/fuzzing.md)
        files = sorted(pathlib.Path(sys.argv[2]).iterdir(), key=lambda p: (p.stat().st_size, p.name))
        lines = [f"# {len(files)} inputs: the minimised corpus of the fuzz run in docs/fuzzing.md, one base64",
                 "# line each. scripts/fuzz_speedups.py reads it: fuzz.sh's seeds and the bounded replay",
                 "# in tests/test_speedups_invariants.py (CI)."]
        lines += [base64.b64encode(p.read_bytes()).decode() for p in files if p.is_file()]
        CORPUS_FILE.write_text("\n".join(lines) + "\n")
        print(f"{CORPUS_FILE}: {len(files)} inputs", file=sys.stderr)
        return
    if sys.argv[1:2] == ["--replay"]:  # fuzz_coverage.sh, or a crash file: the checks, no fuzzer
        from proxy import _speedups
        files = [p for arg in sys.argv[2:] for p in sorted(pathlib.Path(arg).glob("*") if pathlib.Path(arg).is_dir()
                                                            else [pathlib.Path(arg)])]
        for data in stored_inputs() + [p.read_bytes() for p in files]:
            check_one(data)
        print(f"{_speedups.__file__}: {len(files)} files + {len(stored_inputs())} stored inputs pass", file=sys.stderr)
        return
    import atheris
    with atheris.instrument_imports(include=["proxy"]):
        import proxy.resp  # noqa: F401  (the Python reference: its branches guide the fuzzer too)
    from proxy import _speedups
    print(f"fuzzing {_speedups.__file__}", file=sys.stderr)
    atheris.Setup(sys.argv, check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
