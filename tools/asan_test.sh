#!/usr/bin/env bash
# Runs the test suite against AddressSanitizer + UndefinedBehaviorSanitizer
# builds of every op library:
#   tools/asan_test.sh [pytest args, e.g. tests/test_rms_norm.py]   (after tools/dev.sh setup)
# The instrumented libraries are staged with the Python sources in a
# temporary copy of the package that shadows python/ on sys.path; the
# sanitizer runtime is preloaded (TensorFlow itself is not instrumented, so
# leak detection is off: TensorFlow keeps allocations alive until exit).
# Any sanitizer report aborts the process, which fails the test.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${HPC_OPS_VENV:-$ROOT/.venv}"
BAZEL="${BAZEL:-bazel}"

"$BAZEL" build --config=asan //:hpc_ops
bin="$("$BAZEL" info --config=asan bazel-bin 2>/dev/null)"
stage="$(mktemp -d /tmp/hpc_ops_asan.XXXXXX)"
trap 'rm -rf "$stage"' EXIT
cp -r python/hpc_ops "$stage/"
rm -f "$stage"/hpc_ops/_*_ops.so "$stage"/hpc_ops/gen_*_ops.py
cp "$bin"/_*_ops.so "$bin"/gen_*_ops.py "$stage/hpc_ops/"

export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export HPC_OPS_SANITIZED=1
where="$("$VENV/bin/python" -c 'import hpc_ops, os; print(os.path.dirname(hpc_ops.__file__))')"
[[ "$where" == "$stage/hpc_ops" ]] || { echo "asan_test: imported $where, not the instrumented copy" >&2; exit 1; }
echo "[asan] testing the instrumented libraries in $where" >&2
# pyproject.toml sets testpaths = ["tests"]: no arguments run the whole suite,
# file arguments run just those files.
"$VENV/bin/python" -m pytest "$@"
