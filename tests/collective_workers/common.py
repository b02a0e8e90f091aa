"""Shared by the worker scripts that tests/test_collective.py runs under
mpirun: named checks whose PASS/FAIL lines the test parses."""
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402,F401  (re-exported to the workers)
import tensorflow as tf  # noqa: E402

import hpc_ops.distributed as hd  # noqa: E402

tf.get_logger().setLevel("ERROR")  # no retracing warnings from the checks

DTYPES = [tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32, tf.float64]
OPS = ["sum", "average", "min", "max", "product"]


def say(text):
  """One write per line: mpirun interleaves the ranks' outputs by write."""
  sys.stdout.write(text + "\n")
  sys.stdout.flush()


class Checks:
  """Runs named checks; prints `CHECK <name> rank=<r> PASS|FAIL`."""

  def __init__(self):
    self.failed = 0

  def run(self, name, fn, *args):
    try:
      fn(*args)
    except Exception:  # noqa: BLE001 - reported to the test
      self.failed += 1
      say("CHECK %s rank=%d FAIL\n%s" % (name, hd.rank(),
                                        traceback.format_exc()))
    else:
      say("CHECK %s rank=%d PASS" % (name, hd.rank()))

  def finish(self):
    sys.stdout.flush()
    sys.exit(1 if self.failed else 0)


def as_f64(t):
  """Values of a tensor of any of DTYPES as float64 numpy (exact)."""
  return tf.cast(t, tf.float64).numpy()


def expect_error(fn, error_type, *fragments):
  try:
    fn()
  except error_type as e:
    message = getattr(e, "message", str(e))
    for f in fragments:
      assert f in message, "%r not in %r" % (f, message)
    return e
  raise AssertionError("no %s raised" % error_type.__name__)
