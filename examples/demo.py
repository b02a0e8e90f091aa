"""A short tour of hpc_ops inside TensorFlow graphs.

  tools/dev.sh main          (or: .venv/bin/python examples/demo.py)

Runs each available op family eagerly, inside a tf.function and through a
gradient, and prints what it did.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import hpc_ops  # noqa: E402
from hpc_ops import gen_zero_out_ops  # noqa: E402


def demo_zero_out():
  print("== zero_out: keep the first element, zero the rest")
  x = tf.constant([[3.0, 1.0, 4.0], [1.0, 5.0, 9.0]])
  print("input:\n%s" % x.numpy())
  print("eager hpc_ops.zero_out(x):\n%s" % hpc_ops.zero_out(x).numpy())

  @tf.function
  def in_graph(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = gen_zero_out_ops.zero_out(x)
      loss = tf.reduce_sum(y * y)
    return y, tape.gradient(loss, x)

  y, dx = in_graph(x)
  ops = [op.type for op in in_graph.get_concrete_function(x).graph.get_operations()]
  print("inside tf.function (graph has %d ZeroOut node): y[0,0]=%.1f, "
        "d(sum y^2)/dx:\n%s" % (ops.count("ZeroOut"), y[0, 0], dx.numpy()))
  assert np.array_equal(dx.numpy(), [[6.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def main():
  print("hpc_ops %s on TensorFlow %s" % (hpc_ops.__version__, tf.__version__))
  demo_zero_out()
  print("done")


if __name__ == "__main__":
  main()
