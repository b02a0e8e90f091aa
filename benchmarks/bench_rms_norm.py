"""RMSNorm: hpc_ops' fused kernels vs the TensorFlow ways to run it.

Variants, side by side in one process:
  hpc_ops eager / hpc_ops tf.function   hpc_ops.rms_norm (gradient: RmsNormGrad)
  composite eager / tf.function / XLA   x * rsqrt(mean(x^2, -1) + eps) * gamma,
                                        XLA = tf.function(jit_compile=True)
  keras layer tf.function / XLA         keras.layers.RMSNormalization
                                        (mixed_bfloat16 policy for bfloat16)
Shapes [4096, 1024], [16384, 4096], [8, 2048, 4096]; float32 and bfloat16;
forward (y) and forward+backward (y, then dx and dgamma for a given dy, with
tf.GradientTape). Every variant runs under TF's default CPU allocator and
then, in a child process, with TF_CPU_ALLOCATOR_USE_BFC=true.

Bandwidth counts the ideal traffic of a fused kernel, like the peer
measurements: forward reads x and writes y (2 |x| bytes), forward+backward
also reads x and dy and writes dx (5 |x|). It is compared with this
machine's copy bandwidth (bytes read + written): bench_util's one-thread
numpy copy, and the same copy split over as many Python threads as TF's
intra-op pool has (numpy releases the GIL while copying), the figure the
targets are stated against. "x best peer" is the best peer's time divided by
the variant's (> 1: faster than every TensorFlow/Keras way).

Usage: python benchmarks/bench_rms_norm.py [--quick] [--shapes 4096x1024 ...]
  [--dtypes float32 bfloat16]
"""
import argparse
import os
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import bench_util  # noqa: E402
import hpc_ops  # noqa: E402

EPS = 1e-6
SHAPES = ["4096x1024", "16384x4096", "8x2048x4096"]
OURS = ("hpc_ops eager", "hpc_ops tf.function")


def composite(x, gamma):
  return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True)
                           + EPS) * gamma


def threaded_copy_bandwidth_gbs(threads, nbytes=1 << 30):
  """Copy bandwidth (bytes read + written) of `threads` Python threads each
  copying a slice of a `nbytes` float32 array into an already-touched one."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.zeros_like(src)
  bounds = np.linspace(0, src.size, threads + 1).astype(np.int64)

  def copy():
    ts = [threading.Thread(target=np.copyto,
                           args=(dst[b:e], src[b:e]))
          for b, e in zip(bounds[:-1], bounds[1:])]
    for t in ts:
      t.start()
    for t in ts:
      t.join()

  t = bench_util.median_time(copy, reps=5, warmup=1)
  return 2 * nbytes / t / 1e9


def make_case(shape, dtype):
  """Inputs and {name: (forward fn, forward+backward fn)} for one case."""
  h = shape[-1]
  rng = np.random.default_rng(0)
  x = tf.constant(rng.standard_normal(shape, np.float32), dtype=dtype)
  dy = tf.constant(rng.standard_normal(shape, np.float32), dtype=dtype)
  gamma = tf.Variable(tf.cast(rng.uniform(0.5, 1.5, h).astype(np.float32),
                              dtype))
  policy = "mixed_bfloat16" if dtype == tf.bfloat16 else "float32"
  layer = keras.layers.RMSNormalization(epsilon=EPS, dtype=policy)
  layer.build(shape)
  layer.scale.assign(tf.cast(gamma, tf.float32))

  def ours(x):
    return hpc_ops.rms_norm(x, gamma, EPS)

  def comp(x):
    return composite(x, gamma)

  def keras_layer(x):
    return layer(x)

  def with_grad(f, g):
    def run(x, dy):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = f(x)
      return tape.gradient(y, [x, g], output_gradients=dy)
    return run

  variants = {}
  for name, f, g, mode in [
      ("hpc_ops eager", ours, gamma, "eager"),
      ("hpc_ops tf.function", ours, gamma, "graph"),
      ("composite eager", comp, gamma, "eager"),
      ("composite tf.function", comp, gamma, "graph"),
      ("composite XLA", comp, gamma, "xla"),
      ("keras layer tf.function", keras_layer, layer.scale, "graph"),
      ("keras layer XLA", keras_layer, layer.scale, "xla")]:
    fb = with_grad(f, g)
    if mode != "eager":
      f = tf.function(f, jit_compile=mode == "xla")
      fb = tf.function(fb, jit_compile=mode == "xla")
    variants[name] = (f, fb)
  return x, dy, gamma, variants


def max_error(y, x, gamma, rows=256):
  """Max |y - float64 composite| over the first `rows` rows (the reference
  over the whole tensor would need GBs of float64)."""
  h = x.shape[-1]
  x64 = tf.cast(tf.reshape(x, [-1, h])[:rows], tf.float64)
  ref = composite(x64, tf.cast(gamma, tf.float64))
  got = tf.cast(tf.reshape(y, [-1, h])[:rows], tf.float64)
  return float(tf.reduce_max(tf.abs(got - ref)))


def timed(fn, reps, budget_s=4.0):
  """Median seconds per call; slow variants (seconds per call on the big
  shapes) get fewer repetitions, at least 3."""
  fn()  # traces / compiles
  t0 = time.perf_counter()
  fn()
  once = time.perf_counter() - t0
  reps = max(3, min(reps, int(budget_s / max(once, 1e-9))))
  return bench_util.median_time(fn, reps=reps, warmup=1)


def bench_case(shape, dtype, reps):
  """{variant: (forward s, forward+backward s, max error)}."""
  x, dy, gamma, variants = make_case(shape, dtype)
  results = {}
  for name, (f, fb) in variants.items():
    err = max_error(f(x), x, gamma)
    t_f = timed(lambda: f(x), reps)
    t_fb = timed(lambda: fb(x, dy), reps)
    results[name] = (t_f, t_fb, err)
    print("  %-24s fwd %9s  fwd+bwd %9s" % (name, bench_util.fmt_time(t_f),
                                              bench_util.fmt_time(t_fb)),
          file=sys.stderr, flush=True)
  return results


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="only the smallest shape, fewer repetitions")
  ap.add_argument("--shapes", nargs="+", default=SHAPES)
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  args = ap.parse_args()
  shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes]
  if args.quick:
    shapes = [min(shapes, key=np.prod)]
  threads = tf.config.threading.get_intra_op_parallelism_threads() or \
      os.cpu_count()
  alloc = bench_util.allocator_name()
  print("\n## RMSNorm, %s allocator (TF %s, Keras %s, %d CPU threads)"
        % (alloc, tf.__version__, keras.__version__, threads))
  print("\nCopy bandwidth: bytes read + written per second by a numpy copy "
        "of 1 GiB into a touched buffer, with 1 thread "
        "(bench_util.memory_bandwidth_gbs) and with %d threads, measured just "
        "before each case (the machine is shared, so it drifts)." % threads)

  detail, summary = [], []
  for shape in shapes:
    for dt_name in args.dtypes:
      dtype = tf.as_dtype(dt_name)
      nbytes = int(np.prod(shape)) * dtype.size
      reps = 5 if args.quick else (20 if nbytes <= (64 << 20) else 6)
      print("%s %s (%s allocator)" % ("x".join(map(str, shape)), dt_name,
                                      alloc), file=sys.stderr, flush=True)
      bw1 = bench_util.memory_bandwidth_gbs()
      bwn = threaded_copy_bandwidth_gbs(threads)
      res = bench_case(shape, dtype, reps)
      peers = {k: v for k, v in res.items() if k not in OURS}
      best_f = min(peers, key=lambda k: peers[k][0])
      best_fb = min(peers, key=lambda k: peers[k][1])
      label = "%s %s" % ("x".join(map(str, shape)), dt_name)
      for name, (t_f, t_fb, err) in res.items():
        gbs_f = 2 * nbytes / t_f / 1e9
        gbs_fb = 5 * nbytes / t_fb / 1e9
        detail.append([
            label, name, bench_util.fmt_time(t_f), "%.1f" % gbs_f,
            "%.0f%%" % (100 * gbs_f / bwn), "%.2fx" % (peers[best_f][0] / t_f),
            bench_util.fmt_time(t_fb), "%.1f" % gbs_fb,
            "%.2fx" % (peers[best_fb][1] / t_fb), "%.1e" % err])
      ours_f = min(OURS, key=lambda k: res[k][0])
      ours_fb = min(OURS, key=lambda k: res[k][1])
      t_f, t_fb = res[ours_f][0], res[ours_fb][1]
      gbs_f = 2 * nbytes / t_f / 1e9
      summary.append([
          label, bench_util.fmt_time(t_f),
          "%s (%s)" % (bench_util.fmt_time(peers[best_f][0]), best_f),
          "**%.2fx**" % (peers[best_f][0] / t_f),
          "%.1f GB/s: %.0f%% / %.0f%% of %.1f / %.1f" % (
              gbs_f, 100 * gbs_f / bwn, 100 * gbs_f / bw1, bwn, bw1),
          bench_util.fmt_time(t_fb),
          "%s (%s)" % (bench_util.fmt_time(peers[best_fb][1]), best_fb),
          "**%.2fx**" % (peers[best_fb][1] / t_fb)])

  bench_util.print_table(
      "Summary, %s allocator: best hpc_ops variant vs best peer" % alloc,
      ["case", "ours fwd", "best peer fwd", "speedup",
       "ours fwd bandwidth, as %% of copy (%d thr / 1 thr)" % threads,
       "ours fwd+bwd", "best peer fwd+bwd", "speedup"], summary)
  bench_util.print_table(
      "All variants, %s allocator" % alloc,
      ["case", "variant", "fwd", "GB/s", "%% of %d-thr copy" % threads,
       "x best peer", "fwd+bwd", "GB/s", "x best peer",
       "max err (fwd)"], detail)


if __name__ == "__main__":
  main()
  bench_util.run_under_both_allocators()
