#!/usr/bin/env bash
# Coverage-guided fuzzing of proxy/_speedups.c under AddressSanitizer (docs/fuzzing.md).
#
#   scripts/fuzz.sh [SECONDS=600] [RUNS=-1] [extra libFuzzer flags...]
#
# Builds an ASan + libFuzzer-coverage copy of the extension with clang into a temp
# directory (the checkout's own build is left alone), seeds a corpus from the
# harness's stored inputs, and runs scripts/fuzz_speedups.py under atheris until
# SECONDS have passed or RUNS inputs have run (-1: no limit). A failing input is
# written to $FUZZ_OUT/crash-*; the corpus to $FUZZ_OUT/corpus (FUZZ_OUT defaults
# to the temp directory, whose path is printed). Needs clang and `pip install atheris`.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_=${1:-600}
RUNS=${2:--1}
shift $(( $# < 2 ? $# : 2 ))

PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/fuzz-speedups.XXXXXX)
OUT=${FUZZ_OUT:-$WORK}
mkdir -p "$OUT/corpus"
echo "fuzz: work dir $WORK, output $OUT" >&2

# A copy of the package with the instrumented extension in it (same source file).
cp -r proxy "$WORK/proxy"
rm -f "$WORK"/proxy/_speedups*.so
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# fuzzer-no-link: libFuzzer's coverage hooks without its main (atheris provides it);
# the ASan runtime comes from atheris's asan_with_fuzzer.so, preloaded below.
${CC:-clang} -shared -fPIC -g -O1 -fno-omit-frame-pointer \
    -fsanitize=address,fuzzer-no-link -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
    -I"$INC" proxy/_speedups.c -o "$WORK/proxy/_speedups$SUFFIX"

ASAN_SO=$("$PY" -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))')
[ -f "$ASAN_SO" ] || { echo "fuzz: $ASAN_SO not found (pip install atheris)" >&2; exit 2; }

# the stored inputs (seeds + tests/data/fuzz_speedups_corpus.txt) start the corpus
PYTHONPATH="$WORK" "$PY" scripts/fuzz_speedups.py --write-seeds "$OUT/corpus"

# PYTHONMALLOC=malloc: every PyMem/PyObject allocation goes through malloc, so ASan
# sees the bounds of the extension's scratch arrays and of bytes objects (pymalloc
# would hide them inside its arenas). Python itself leaks by design: no leak check.
export PYTHONMALLOC=malloc
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1:abort_on_error=0}
export PYTHONPATH="$WORK"
export LD_PRELOAD="$ASAN_SO"
exec "$PY" scripts/fuzz_speedups.py "$OUT/corpus" \
    -max_total_time="$SECONDS_" -runs="$RUNS" -max_len=4096 -rss_limit_mb=4096 \
    -artifact_prefix="$OUT/" -print_final_stats=1 "$@"
