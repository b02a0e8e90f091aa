"""ZeroOut vs the best pure-TensorFlow equivalents, side by side.

  python benchmarks/bench_zero_out.py [--quick]

Each variant runs inside a tf.function on a float32 vector of 1e6 and 1e8
elements; the table gives the median time per call and each baseline's time
divided by ours (> 1: ours is faster). Runs under TF's default CPU allocator,
then again with TF_CPU_ALLOCATOR_USE_BFC=true.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf  # noqa: E402

import bench_util  # noqa: E402
import hpc_ops  # noqa: E402


def concat_zeros(x):
  return tf.concat([x[:1], tf.zeros_like(x[1:])], axis=0)


def one_hot_mask(x):
  return x * tf.one_hot(0, tf.size(x), dtype=x.dtype)


def scatter_update(x):
  return tf.tensor_scatter_nd_update(tf.zeros_like(x), [[0]], x[:1])


VARIANTS = {
    "hpc_ops.zero_out": hpc_ops.zero_out,
    "concat(x[:1], zeros)": concat_zeros,
    "x * one_hot(0)": one_hot_mask,
    "scatter_nd_update(zeros)": scatter_update,
}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="1e6 elements only")
  args = ap.parse_args()
  sizes = [10**6] if args.quick else [10**6, 10**8]
  rows = []
  for n in sizes:
    x = tf.random.uniform([n], 1.0, 2.0)
    times = {}
    for name, fn in VARIANTS.items():
      f = tf.function(fn)
      ref = f(x).numpy()
      assert ref[0] == x[0].numpy() and not ref[1:].any(), name
      times[name] = bench_util.median_time(lambda f=f: f(x).numpy(),
                                           reps=20 if n <= 10**6 else 5)
    ours = times["hpc_ops.zero_out"]
    best = min(t for k, t in times.items() if k != "hpc_ops.zero_out")
    for name, t in times.items():
      ratio = "1.00 (ours)" if t is ours else "%.2f" % (t / ours)
      rows.append(["%.0e" % n, name, bench_util.fmt_time(t),
                   "%.1f" % (2 * 4 * n / t / 1e9), ratio])
    rows.append(["%.0e" % n, "**best baseline / ours**", "", "",
                 "**%.2f**" % (best / ours)])
  bench_util.print_table(
      "ZeroOut, float32, TF %s, %s allocator, %d threads"
      % (tf.__version__, bench_util.allocator_name(), os.cpu_count()),
      ["elements", "variant", "time", "GB/s (2 x bytes)", "time / ours"], rows)


if __name__ == "__main__":
  main()
  bench_util.run_under_both_allocators()
