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
the variant's (> 1: faster than every TensorFlow/Keras way). The machine is
shared and its load drifts: every variant and the copy are timed in three
interleaved rounds and reported as the median of their samples, so drift
hits them alike and the ratios hold better than the absolute times.

Usage: python benchmarks/bench_rms_norm.py [--quick] [--shapes 4096x1024 ...]
  [--dtypes float32 bfloat16]
"""
import argparse
import os
import statistics
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

# Each variant wraps its own tf.function around the same Python function;
# TF's retracing warning about that is noise here.
tf.get_logger().setLevel("ERROR")

EPS = 1e-6
SHAPES = ["4096x1024", "16384x4096", "8x2048x4096"]
OURS = ("hpc_ops eager", "hpc_ops tf.function")


def composite(x, gamma):
  return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True)
                           + EPS) * gamma


class ThreadedCopy:
  """A numpy copy of `nbytes` (float32) into an already-touched buffer, split
  over `threads` Python threads (numpy releases the GIL while copying)."""

  def __init__(self, threads, nbytes=512 << 20):
    self.nbytes = nbytes
    self.src = np.ones(nbytes // 4, np.float32)
    self.dst = np.zeros_like(self.src)
    self.bounds = np.linspace(0, self.src.size, threads + 1).astype(np.int64)

  def __call__(self):
    ts = [threading.Thread(target=np.copyto,
                           args=(self.dst[b:e], self.src[b:e]))
          for b, e in zip(self.bounds[:-1], self.bounds[1:])]
    for t in ts:
      t.start()
    for t in ts:
      t.join()

  def gbs(self, seconds):
    """Bytes read + written per second."""
    return 2 * self.nbytes / seconds / 1e9


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


def sample(fn, n, warmup):
  """n wall-clock times of fn() (which blocks until its result is ready)."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def bench_case(shape, dtype, reps, copy, rounds=3, budget_s=4.0):
  """{variant: (forward s, forward+backward s, max error)} and the median
  copy time. The machine is shared and its load drifts, so every variant
  (and the copy) is timed in each of `rounds` interleaved rounds and the
  median of all its samples is reported. Slow variants (seconds per call)
  get fewer samples, at least one per round."""
  x, dy, gamma, variants = make_case(shape, dtype)
  fns, errors = {}, {}
  for name, (f, fb) in variants.items():
    errors[name] = max_error(f(x), x, gamma)
    for mode, fn in [("fwd", lambda f=f: f(x)),
                     ("fwd+bwd", lambda fb=fb: fb(x, dy))]:
      fn()  # traces / compiles
      t0 = time.perf_counter()
      fn()
      once = time.perf_counter() - t0
      n = max(1, min(reps, int(budget_s / once)) // rounds)
      fns[name, mode] = (fn, n, 1 if once < 0.2 else 0)
  times = {key: [] for key in fns}
  copy_times = []
  for _ in range(rounds):
    copy_times += sample(copy, 2, 1)
    for key, (fn, n, warmup) in fns.items():
      times[key] += sample(fn, n, warmup)
  med = {key: statistics.median(v) for key, v in times.items()}
  results = {}
  for name in variants:
    results[name] = (med[name, "fwd"], med[name, "fwd+bwd"], errors[name])
    print("  %-24s fwd %9s  fwd+bwd %9s" % (
        name, bench_util.fmt_time(med[name, "fwd"]),
        bench_util.fmt_time(med[name, "fwd+bwd"])), file=sys.stderr,
          flush=True)
  return results, statistics.median(copy_times)


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
  copy = ThreadedCopy(threads)
  print("\n## RMSNorm, %s allocator (TF %s, Keras %s, %d CPU threads)"
        % (alloc, tf.__version__, keras.__version__, threads))
  print("\nTimes are medians over 3 interleaved rounds of every variant. "
        "Copy bandwidth = bytes read + written per second by a numpy copy "
        "into a touched buffer: 1 GiB with 1 thread "
        "(bench_util.memory_bandwidth_gbs, before each case) and 512 MiB "
        "split over %d threads (in every round, like the variants)."
        % threads)

  detail, summary = [], []
  for shape in shapes:
    for dt_name in args.dtypes:
      dtype = tf.as_dtype(dt_name)
      nbytes = int(np.prod(shape)) * dtype.size
      reps = 6 if args.quick else (30 if nbytes <= (64 << 20) else 9)
      print("%s %s (%s allocator)" % ("x".join(map(str, shape)), dt_name,
                                      alloc), file=sys.stderr, flush=True)
      bw1 = bench_util.memory_bandwidth_gbs()
      res, t_copy = bench_case(shape, dtype, reps, copy)
      bwn = copy.gbs(t_copy)
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
