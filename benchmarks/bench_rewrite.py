"""Serving latency of a Keras model before and after `hpc_ops.rewrite`.

  python benchmarks/bench_rewrite.py [--quick]

The model is an RMSNorm-heavy stack, 4 x (Dense(1024) -> RMSNormalization),
exported with `model.export()`, then rewritten (the rms_norm rule fuses each
RMSNormalization into one RmsNorm op, outputs verified equal on random
batches). Both SavedModels are loaded in this process and the serving
signature is timed side by side: median time per call at several batch
sizes, and original / rewritten (> 1: the rewritten model is faster). A
second table does the same for a model of RMSNormalization layers only, the
upper bound of what the rewrite can win. Runs under TF's default CPU
allocator, then again with TF_CPU_ALLOCATOR_USE_BFC=true.
"""
import argparse
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bench_util  # noqa: E402
import hpc_ops  # noqa: E402,F401  (registers RmsNorm for the loaded model)
from hpc_ops import rewrite  # noqa: E402

HIDDEN = 1024
BLOCKS = 4


def build(path, policy, dense):
  import keras
  old = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    keras.utils.set_random_seed(0)
    dtype = "float32" if policy.startswith("mixed") else policy
    inp = keras.Input((HIDDEN,), dtype=dtype)
    y = inp
    for _ in range(BLOCKS):
      if dense:
        y = keras.layers.Dense(HIDDEN)(y)
      y = keras.layers.RMSNormalization(epsilon=1e-6)(y)
    keras.Model(inp, y).export(path, verbose=False)
  finally:
    keras.mixed_precision.set_global_policy(old)


def time_models(src, dst, batches, reps):
  fns = [
      tf.saved_model.load(p).signatures["serving_default"] for p in (src, dst)
  ]
  in_spec = list(fns[0].structured_input_signature[1].values())[0]
  rows = []
  for b in batches:
    x = tf.cast(tf.constant(np.random.default_rng(b).normal(size=(b, HIDDEN))),
                in_spec.dtype)
    outs = [list(f(x).values())[0].numpy().astype(np.float64) for f in fns]
    err = float(np.abs(outs[0] - outs[1]).max())
    # Interleaved rounds: drift on a shared machine hits both models alike.
    samples = [[], []]
    for _ in range(reps):
      for i, f in enumerate(fns):
        samples[i].append(
            bench_util.median_time(lambda f=f: list(f(x).values())[0].numpy(),
                                   reps=3,
                                   warmup=1))
    times = [float(np.median(s)) for s in samples]
    rows.append([
        b,
        bench_util.fmt_time(times[0]),
        bench_util.fmt_time(times[1]),
        "**%.2f**" % (times[0] / times[1]),
        "%.1e" % err
    ])
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick",
                  action="store_true",
                  help="batches 64 and 256, "
                  "float32 only")
  args = ap.parse_args()
  batches = [64, 256] if args.quick else [64, 256, 1024]
  reps = 8 if args.quick else 20  # interleaved rounds of 3 calls each
  configs = [("float32", True), ("float32", False)]
  if not args.quick:
    configs += [("bfloat16", False)]
  tmp = tempfile.mkdtemp(prefix="bench_rewrite-")
  try:
    for policy, dense in configs:
      src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
      shutil.rmtree(src, ignore_errors=True)
      shutil.rmtree(dst, ignore_errors=True)
      build(src, policy, dense)
      report = rewrite.rewrite_saved_model(src, dst, verify=2)
      if not report.verification["ok"] or report.counts() != {
          "rms_norm": BLOCKS
      }:
        raise SystemExit("rewrite failed:\n%s" % report)
      rows = time_models(src, dst, batches, reps)
      what = ("%d x (Dense(%d) + RMSNormalization)" % (BLOCKS, HIDDEN) if dense
              else "%d x RMSNormalization, hidden %d" % (BLOCKS, HIDDEN))
      bench_util.print_table(
          "Serving latency, %s, %s, TF %s, %s allocator, %d threads" %
          (what, policy, tf.__version__, bench_util.allocator_name(),
           os.cpu_count()), [
               "batch", "original", "rewritten", "original / rewritten",
               "max |diff|"
           ], rows)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
  bench_util.run_under_both_allocators()
