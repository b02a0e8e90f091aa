"""Fuzz harness for every hpc_ops op.

Drives each op the way tf.raw_ops does (any inputs, any attrs, no Python
wrapper checks) with inputs from Hypothesis strategies: every dtype, ranks
0-6, dims 0-10 and huge (with a zero dim, so the tensor stays empty), NaN and
Inf, ids of -1 / N / INT64_MAX, bad attrs, handles of the wrong resource
type. The only acceptable outcomes are a result or a TensorFlow error; a
crash, abort or sanitizer report kills this process, and the case that did
it is in the file named by --case-file (written before each call).

  python tests/fuzz/fuzz_ops.py                 # a short run: 5 s per op
  python tests/fuzz/fuzz_ops.py --long          # 5 min per op
  python tests/fuzz/fuzz_ops.py --ops ZeroOut --seconds 60
  python tests/fuzz/fuzz_ops.py --replay CASE   # re-run a recorded case

Op specs live in tests/fuzz/spec_<family>.py, each with a list SPECS.
"""
import argparse
import faulthandler
import glob
import importlib
import os
import pickle
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tensorflow.python.eager import context, execute  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import strategies  # noqa: E402

# Outcomes that are fine: the op ran, or refused cleanly.
ACCEPTED = (tf.errors.OpError, TypeError, ValueError)

# A case that runs longer than this is a hang (e.g. a collective waiting for
# a partner that never comes): every thread's stack is printed and the
# process exits, so the case file names it. Fuzz cases are small tensors.
HANG_SECONDS = float(os.environ.get("HPC_OPS_FUZZ_HANG_SECONDS", "60"))


class OpSpec:
  """How to fuzz one op: `case` is a Hypothesis strategy of
  (inputs, attrs) pairs; inputs are numpy arrays or tf tensors (handles),
  attrs a flat tuple (name, value, name, value, ...) as execute() takes."""

  def __init__(self, op, case, num_outputs, setup=None):
    self.op = op
    self.case = case
    self.num_outputs = num_outputs
    self.setup = setup  # called once before fuzzing (e.g. import hpc_ops)


def raw_call(op, inputs, attrs, num_outputs):
  tensors = [x if isinstance(x, tf.Tensor) else tf.constant(x) for x in inputs]
  return execute.execute(op.encode(), num_outputs, tensors, attrs,
                         context.context())


def load_families():
  """{family: [op names]} from tests/fuzz/spec_<family>.py."""
  families = {}
  for path in sorted(glob.glob(os.path.join(HERE, "spec_*.py"))):
    name = os.path.basename(path)[:-3]
    families[name[len("spec_"):]] = [s.op for s in
                                     importlib.import_module(name).SPECS]
  return families


def load_specs():
  specs = {}
  for path in sorted(glob.glob(os.path.join(HERE, "spec_*.py"))):
    mod = importlib.import_module(os.path.basename(path)[:-3])
    for spec in mod.SPECS:
      specs[spec.op] = spec
  return specs


def _record(case_file, spec, inputs, attrs):
  if not case_file:
    return
  saved = [x if isinstance(x, np.ndarray) else ("<tensor>", repr(x))
           for x in inputs]
  with open(case_file, "wb") as f:
    pickle.dump({"op": spec.op, "inputs": saved, "attrs": attrs,
                 "num_outputs": spec.num_outputs}, f)
    f.flush()
    os.fsync(f.fileno())


def run_case(spec, inputs, attrs, case_file=None):
  _record(case_file, spec, inputs, attrs)
  faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
  try:
    out = raw_call(spec.op, inputs, attrs, spec.num_outputs)
    for t in out:
      t.numpy() if t.dtype != tf.resource else None
    return "ok"
  except ACCEPTED as e:
    return type(e).__name__
  finally:
    faulthandler.cancel_dump_traceback_later()


def fuzz(spec, seconds, case_file=None):
  """Runs `spec` for about `seconds`; returns {outcome: count}."""
  if spec.setup:
    spec.setup()
  outcomes = {}

  @settings(max_examples=25, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(spec.case)
  def one(case):
    inputs, attrs = case
    result = run_case(spec, inputs, attrs, case_file)
    outcomes[result] = outcomes.get(result, 0) + 1

  end = time.monotonic() + seconds
  while time.monotonic() < end:
    one()
  return outcomes


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seconds", type=float, default=5.0, help="per op")
  ap.add_argument("--long", action="store_true", help="300 s per op")
  ap.add_argument("--ops", default="", help="comma-separated op names")
  ap.add_argument("--case-file", default=os.path.join(HERE, ".last_case.pkl"))
  ap.add_argument("--replay", help="re-run one recorded case file")
  args = ap.parse_args(argv)
  import hpc_ops  # noqa: F401  registers every op library

  specs = load_specs()
  if args.replay:
    with open(args.replay, "rb") as f:
      case = pickle.load(f)
    print("replaying %s attrs=%r" % (case["op"], case["attrs"]))
    spec = specs[case["op"]]
    if spec.setup:
      spec.setup()
    print(run_case(spec, case["inputs"], case["attrs"]))
    return 0
  names = [n for n in args.ops.split(",") if n] or sorted(specs)
  missing = [n for n in names if n not in specs]
  if missing:
    sys.exit("fuzz_ops: no spec for %s (have: %s)" % (missing, sorted(specs)))
  seconds = 300.0 if args.long else args.seconds
  for name in names:
    t0 = time.monotonic()
    outcomes = fuzz(specs[name], seconds, args.case_file)
    total = sum(outcomes.values())
    print("%-22s %6d cases in %5.1f s, no crash: %s" % (
        name, total, time.monotonic() - t0,
        ", ".join("%s %d" % kv for kv in sorted(outcomes.items()))), flush=True)
  if os.path.exists(args.case_file):
    os.remove(args.case_file)
  return 0


if __name__ == "__main__":
  sys.exit(main())
