"""A short fuzz run of every op (tests/fuzz/fuzz_ops.py), one subprocess per
op family (spec file): a crash, abort, hang or sanitizer report fails the
test and names the case."""
import os
import pickle
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(HERE, "fuzz", "fuzz_ops.py")
SECONDS = os.environ.get("HPC_OPS_FUZZ_SECONDS", "3")

sys.path.insert(0, os.path.join(HERE, "fuzz"))
import fuzz_ops  # noqa: E402

FAMILIES = fuzz_ops.load_families()
OPS = sorted(op for ops in FAMILIES.values() for op in ops)


def test_every_registered_op_has_a_fuzz_spec():
  from hpc_ops import _loader
  try:  # loaded lazily by hpc_ops.distributed; absent when built without MPI
    import hpc_ops.collective  # noqa: F401
  except ImportError:
    pass
  registered = {op for _, _, ops in _loader.LOADED.values() for op in ops}
  assert registered, "no op libraries loaded"
  assert registered <= set(OPS), "ops without a fuzz spec: %s" % sorted(registered - set(OPS))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fuzz_never_crashes(family, tmp_path):
  ops = FAMILIES[family]
  case_file = tmp_path / "case.pkl"
  proc = subprocess.run(
      [sys.executable, FUZZ, "--ops", ",".join(ops), "--seconds", SECONDS,
       "--case-file", str(case_file)],
      capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    case = "no case recorded"
    if case_file.exists():
      with open(case_file, "rb") as f:
        c = pickle.load(f)
      case = "op=%s attrs=%r inputs=%r" % (c["op"], c["attrs"], [
          (getattr(x, "dtype", None), getattr(x, "shape", x)) for x in c["inputs"]])
    pytest.fail("fuzzing %s crashed (rc=%d); last case: %s\n%s"
                % (family, proc.returncode, case, proc.stderr[-4000:]))
  for op in ops:  # one summary line per op, each ending a run without a crash
    assert any(line.startswith(op + " ") and "no crash" in line
               for line in proc.stdout.splitlines()), (
                   op, proc.stdout + proc.stderr[-2000:])
