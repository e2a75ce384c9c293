#!/usr/bin/env bash
# Line/branch coverage of proxy/_speedups.c reached by a fuzz corpus (docs/fuzzing.md).
#
#   scripts/fuzz_coverage.sh CORPUS_DIR
#
# Builds a copy of the extension with clang's source-based coverage, replays every
# file of CORPUS_DIR (and the harness's stored inputs) through the harness's checks,
# and prints llvm-cov's report for _speedups.c. libFuzzer's own `cov:` figure counts
# edges of the instrumented code it has seen; this one says which lines those are.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${1:?usage: scripts/fuzz_coverage.sh CORPUS_DIR}
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/fuzz-cov.XXXXXX)
cp -r proxy "$WORK/proxy"
rm -f "$WORK"/proxy/_speedups*.so
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
SO="$WORK/proxy/_speedups$SUFFIX"
${CC:-clang} -shared -fPIC -O0 -fprofile-instr-generate -fcoverage-mapping -I"$INC" proxy/_speedups.c -o "$SO"

# (run as a file, not from stdin: sys.path[0] is then scripts/, not the checkout,
# so `proxy` is the copy in $WORK with the instrumented extension)
LLVM_PROFILE_FILE="$WORK/cov.profraw" PYTHONPATH="$WORK" "$PY" scripts/fuzz_speedups.py --replay "$CORPUS"
${LLVM_PROFDATA:-llvm-profdata} merge -sparse "$WORK/cov.profraw" -o "$WORK/cov.profdata"
${LLVM_COV:-llvm-cov} report "$SO" -instr-profile="$WORK/cov.profdata" proxy/_speedups.c
echo "annotated source: ${LLVM_COV:-llvm-cov} show $SO -instr-profile=$WORK/cov.profdata proxy/_speedups.c" >&2
