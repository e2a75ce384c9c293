"""The C extension keeps its own invariants (issue 11, item 10).

test_speedups.py compares the C path with the Python one on well-formed Specs; these
tests hold the C code to what it must guarantee by itself: a Spec that would make
the rewrite loop read past a request's arguments cannot be built, memory follows
the bytes received rather than a declared length, and the fuzz harness
(scripts/fuzz_speedups.py, run long under ASan by scripts/fuzz.sh) passes on its
stored corpus, the bounded form of the fuzz run that CI can afford.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import time
import tracemalloc
from collections import deque

import pytest

from proxy.resp import encode_command
from proxy.speedups import C

pytestmark = pytest.mark.skipif(C is None and os.environ.get("CI") != "true",
                                reason="proxy._speedups is not compiled (pure-Python install)")

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIG = 1 << 29


# ------------------------------------------------------------------ Spec construction

@pytest.mark.parametrize("kw, rule", [
    # the reported case: position 3 with the default min_argc 1, then `GET k` read argv[3]
    (dict(fixed=(3,)), "fixed key position 3 must be below min_argc"),
    (dict(fixed=(1, 2), min_argc=2), "fixed key position 2 must be below min_argc"),
    (dict(fixed=(), min_argc=1, first=1, lastkey=-1), "a range's first key"),
    (dict(fixed=(), min_argc=3, first=3, lastkey=-1), "a range's first key"),
    (dict(fixed=(), min_argc=0), "min_argc must be >= 1"),
    (dict(fixed=(1,), min_argc=-5), "min_argc must be >= 1"),
    (dict(fixed=(0,), min_argc=2), "increasing and >= 1"),
    (dict(fixed=(2, 2), min_argc=3), "increasing and >= 1"),
    (dict(fixed=(), min_argc=3, first=1, lastkey=0), "a range needs"),
    (dict(fixed=(), min_argc=3, first=1, lastkey=-1, step=0), "a range needs"),
    (dict(fixed=(1,), min_argc=3, first=1, lastkey=-1), "not both"),
])
def test_spec_refuses_what_the_rewrite_loop_cannot_take(kw, rule):
    with pytest.raises(ValueError, match=rule):
        C.Spec(**kw)


def test_spec_accepts_the_forms_fast_spec_builds():
    C.Spec(())                         # keyless (PING)
    C.Spec((1,), 2)                    # GET
    C.Spec((1, 2), 3)                  # RENAME
    C.Spec((), 2, 1, -1, 1)            # MGET: first=1, lastkey=-1 -> min_argc 2
    C.Spec((), 2, 1, -1, 2)            # MSET


def test_a_failed_reinit_leaves_the_spec_as_it_was():
    # Spec_init checks everything before it stores anything: a refused re-init must
    # not leave fixed[] half-overwritten with positions past min_argc
    spec = C.Spec((1, 2, 3), 4)
    with pytest.raises(ValueError):
        spec.__init__((5, 6, 1), 7)
    specs = {b"X": spec}
    req = encode_command([b"X", b"a", b"b", b"c"])
    out, end, n, keys = C.rewrite_plain(req, specs, 1, b"p:", 10, BIG)
    assert (out, end, n, keys) == (encode_command([b"X", b"p:a", b"p:b", b"p:c"]), len(req), 1, 3)


def test_an_uninitialised_spec_takes_no_keys():
    # Spec.__new__ without __init__: all zero, which the loop must read as "no keys"
    spec = C.Spec.__new__(C.Spec)
    req = encode_command([b"Y", b"a"])
    assert C.rewrite_plain(req, {b"Y": spec}, 1, b"p:", 10, BIG) == (req, len(req), 1, 0)


def test_short_requests_stop_at_min_argc_for_both_forms():
    specs = {b"GET": C.Spec((1,), 2), b"MSET": C.Spec((), 2, 1, -1, 2)}
    for req in (encode_command([b"GET"]), encode_command([b"MSET"])):
        assert C.rewrite_plain(req, specs, 1, b"p:", 10, BIG) == (b"", 0, 0, 0)


# ------------------------------------------------------------------ bounded scratch memory

def _traced(fn):
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current - before, peak - before


def test_a_declared_count_allocates_nothing():
    # `*1048576\r\n` (11 bytes; larger counts go to Python) used to grow a static
    # argument array to 2^20 entries, 24 MB kept for good; now it grows as
    # arguments arrive
    specs = {b"GET": C.Spec((1,), 2)}
    for header in (b"*16000000\r\n", b"*1048576\r\n$3\r\nGET\r\n", b"*1048576\r\n" + b"$1\r\na\r\n" * 100):
        kept, peak = _traced(lambda: C.rewrite_plain(header, specs, 1, b"p:", 10, BIG))
        assert peak < 64 * 1024, (header[:20], peak)
        assert kept < 4 * 1024


def test_a_large_request_does_not_pin_its_scratch_memory():
    specs = {b"MSET": C.Spec((), 2, 1, -1, 2)}
    args = [b"MSET"] + [b"k"] * 200_000
    req = encode_command(args)

    def run():
        out, end, n, keys = C.rewrite_plain(req, specs, 1, b"p:", 10, BIG)
        assert (end, n, keys) == (len(req), 1, 100_000)
        del out
    kept, peak = _traced(run)
    assert peak > 200_000 * 8          # it did need the memory ...
    assert kept < 4 * 1024             # ... and gave it back when the call returned


def test_a_reentrant_call_cannot_free_the_callers_arrays():
    # The specs dict's look-up may run Python code (a key's __eq__), which may call
    # rewrite_plain again; its scratch arrays must not be the caller's.
    nested = encode_command([b"MSET"] + [b"z"] * 5000)

    class Evil:
        def __hash__(self):
            return hash(b"GET")

        def __eq__(self, other):
            C.rewrite_plain(nested, {b"MSET": C.Spec((), 2, 1, -1, 2)}, 1, b"q:", 10, BIG)
            return False

    specs = {Evil(): None, b"GET": C.Spec((1,), 2)}
    args = [b"GET"] + [b"k%d" % i for i in range(100)]  # more arguments than the stack arrays hold
    req = encode_command(args)
    out, end, n, keys = C.rewrite_plain(req, specs, 1, b"p:", 10, BIG)
    assert (out, end, n, keys) == (encode_command([b"GET", b"p:k0"] + args[2:]), len(req), 1, 1)


def test_frame_run_refuses_a_pending_that_is_not_a_sequence():
    with pytest.raises(TypeError):
        C.frame_run(b"+OK\r\n", 0, 5, False, 3)
    assert C.frame_run(b"+OK\r\n", 0, 5, False, deque([None])) == (5, 1)


# ------------------------------------------------------------------ the fuzz harness, bounded

def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_speedups", ROOT / "scripts" / "fuzz_speedups.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fuzz_harness_passes_on_its_stored_corpus():
    """Every stored input (the seeds, the minimised corpus of the last long run and each
    crash it found) through the same checks the ASan fuzz run makes, without ASan."""
    h = _harness()
    inputs = h.stored_inputs()
    assert len(inputs) >= 20
    t0 = time.monotonic()
    for data in inputs:
        h.check_one(data)
    assert time.monotonic() - t0 < 30


def test_fuzz_harness_models_the_rules_the_old_code_broke():
    # what the harness holds C to: C.Spec((3,)) is refused, and a request with fewer
    # arguments than a Spec's key positions is not taken
    h = _harness()
    assert h.spec_error((3,), 1, 0, 0, 1) == "fixed"
    assert h.spec_error((), 1, 1, -1, 1) == "first"
    assert h.spec_error((1,), 2, 0, 0, 1) is None
    req = encode_command([b"A"])
    assert h.model_rewrite(req, {b"A": ((1,), 2, 0, 0, 1)}, 1, b"p:", 10, BIG) == (b"", 0, 0, 0)
