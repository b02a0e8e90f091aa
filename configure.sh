#!/usr/bin/env bash
# Points the Bazel build at the TensorFlow of a Python environment (and at the
# system MPI, if any) by writing .tf_configure.bazelrc, which .bazelrc reads.
#   ./configure.sh                            # $HPC_OPS_VENV, ./.venv, or python3
#   PYTHON_BIN_PATH=/path/to/python ./configure.sh
# Environment: HPC_OPS_COPTS (kernel compile flags, default -O3 plus this
# CPU's AVX2/FMA), HPC_OPS_NO_MPI=1 (skip the collective ops), MPICC.
set -euo pipefail
cd "$(dirname "$0")"
if [[ -z "${PYTHON_BIN_PATH:-}" ]]; then
  venv="${HPC_OPS_VENV:-.venv}"
  if [[ -x "$venv/bin/python" ]]; then
    PYTHON_BIN_PATH="$venv/bin/python"
  else
    PYTHON_BIN_PATH="$(command -v python3 || true)"
  fi
fi
if [[ -z "$PYTHON_BIN_PATH" || ! -x "$PYTHON_BIN_PATH" ]]; then
  echo "configure: no Python found; set PYTHON_BIN_PATH or create $venv." >&2
  exit 1
fi
PYTHON_BIN_PATH="$(cd "$(dirname "$PYTHON_BIN_PATH")" && pwd)/$(basename "$PYTHON_BIN_PATH")"
"$PYTHON_BIN_PATH" tools/tf_config.py > .tf_configure.bazelrc.tmp
mv .tf_configure.bazelrc.tmp .tf_configure.bazelrc
echo "configure: wrote .tf_configure.bazelrc" >&2
