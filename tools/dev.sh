#!/usr/bin/env bash
# Set-up, build, demo and tests in one place; every step is skipped when it
# is already done, so running it again is fast.
#   tools/dev.sh setup   apt packages, venv, ./configure.sh, Bazel build
#   tools/dev.sh main    setup, then the main job (examples/ctr_train.py)
#   tools/dev.sh test    setup, then the whole test suite (extra args -> pytest)
#   tools/dev.sh build [FAMILY...]  rebuild op libraries into python/hpc_ops/
# Environment: HPC_OPS_VENV (default .venv in the repo), BAZEL (bazel or
# bazelisk), HPC_OPS_NO_MPI=1 (build without the collective ops).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${HPC_OPS_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
BAZEL="${BAZEL:-bazel}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

log() { echo "[hpc_ops] $*" >&2; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else log "need root to run: $*"; exit 1
  fi
}

apt_packages() {
  local want=()
  command -v "$BAZEL" >/dev/null || want+=(bazel-bootstrap)
  if [[ -z "${HPC_OPS_NO_MPI:-}" ]]; then
    command -v mpicc >/dev/null || want+=(libopenmpi-dev)
    command -v mpirun >/dev/null || want+=(openmpi-bin)
  fi
  command -v g++ >/dev/null || want+=(g++)
  python3 -c 'import venv, ensurepip' 2>/dev/null || want+=(python3-venv)
  if ((${#want[@]})); then
    log "installing ${want[*]} (apt)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${want[@]}" >/dev/null
  fi
}

python_env() {
  if [[ ! -x "$PY" ]]; then
    log "creating the venv $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.hpc_ops_requirements"
  if ! cmp -s requirements-dev.txt "$stamp"; then
    log "installing Python packages into $VENV (first time: about a minute)"
    "$PY" -m pip install -q --upgrade pip >/dev/null
    "$PY" -m pip install -q -r requirements-dev.txt
    cp requirements-dev.txt "$stamp"
  fi
  # The package is used in place: python/ goes on the venv's sys.path.
  local site
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [[ "$(cat "$site/hpc_ops_dev.pth" 2>/dev/null)" != "$ROOT/python" ]]; then
    echo "$ROOT/python" > "$site/hpc_ops_dev.pth"
  fi
}

configure() {
  # Re-run when missing, or when the venv's packages changed after it ran.
  if [[ ! -f .tf_configure.bazelrc ]] || [[ "$VENV/.hpc_ops_requirements" -nt .tf_configure.bazelrc ]] \
     || ! grep -q "PYTHON_BIN_PATH=\"$PY\"" .tf_configure.bazelrc; then
    PYTHON_BIN_PATH="$PY" ./configure.sh
  fi
}

build() {
  # `build` builds every family; `build FAMILY...` only those (so one family's
  # half-written kernel does not stop work on another).
  local targets=(//:hpc_ops)
  if (($#)); then
    targets=()
    for f in "$@"; do targets+=("//:_${f}_ops.so" "//:gen_${f}_ops"); done
  fi
  log "building the op libraries ($BAZEL build ${targets[*]})"
  "$BAZEL" build "${targets[@]}" || { log "the build failed (output above)"; exit 1; }
  local bin
  bin="$("$BAZEL" info bazel-bin 2>/dev/null)"
  if ((!$#)); then
    # Drop libraries of families that no longer exist.
    for f in python/hpc_ops/_*_ops.so python/hpc_ops/gen_*_ops.py; do
      [[ -e "$f" && ! -e "$bin/$(basename "$f")" ]] && rm -f "$f"
    done
  fi
  for f in "$bin"/_*_ops.so "$bin"/gen_*_ops.py; do
    [[ -e "$f" ]] || continue
    local dest="python/hpc_ops/$(basename "$f")"
    if ! cmp -s "$f" "$dest"; then
      # Atomic replace: a process loading the library never sees half a file.
      install -m 0644 "$f" "$dest.tmp.$$" && mv -f "$dest.tmp.$$" "$dest"
    fi
  done
}

setup() {
  apt_packages
  python_env
  configure
  build
}

cmd="${1:-setup}"
shift || true
case "$cmd" in
  setup) setup ;;
  build) configure; build "$@" ;;
  main)
    setup
    exec "$PY" examples/ctr_train.py "$@"
    ;;
  test)
    setup
    exec "$PY" -m pytest tests "$@"
    ;;
  *) echo "usage: tools/dev.sh {setup|build|main|test} [args]" >&2; exit 2 ;;
esac
