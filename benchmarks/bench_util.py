"""Timing, tables and allocator settings shared by the benchmarks.

Every benchmark times ours and its baselines side by side in one process and
reports ratios (this machine's timings drift by 20-30 % run to run). On
VMs where first touches of fresh pages are slow, TensorFlow's default CPU
allocator pays them for every large tensor, so benchmarks run each variant
under both allocator settings: `run_under_both_allocators()` re-runs the
script in a child process with TF_CPU_ALLOCATOR_USE_BFC=true.
"""
import os
import statistics
import subprocess
import sys
import time

ALLOCATOR_ENV = "TF_CPU_ALLOCATOR_USE_BFC"


def allocator_name():
  return "BFC" if os.environ.get(ALLOCATOR_ENV, "").lower() in ("1", "true") else "default"


def run_under_both_allocators(argv=None):
  """In the parent run: re-runs this script with the BFC allocator after the
  caller's own (default-allocator) run. Returns True in the child run."""
  if os.environ.get("_HPC_OPS_BENCH_CHILD"):
    return True
  if os.environ.get(ALLOCATOR_ENV):
    return True  # the user picked one setting: run only that
  argv = sys.argv if argv is None else argv
  env = dict(os.environ, _HPC_OPS_BENCH_CHILD="1", **{ALLOCATOR_ENV: "true"})
  sys.stdout.flush()
  subprocess.run([sys.executable] + argv, env=env, check=True)
  return False


def median_time(fn, reps=10, warmup=2, min_time=0.0):
  """Median seconds per call of fn(); fn must block until its result is
  ready (call .numpy() or similar on TF outputs)."""
  for _ in range(warmup):
    fn()
  times = []
  start = time.perf_counter()
  while len(times) < reps or time.perf_counter() - start < min_time:
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def print_table(title, header, rows):
  """Prints a Markdown table (easy to paste into the README)."""
  print("\n### %s\n" % title)
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join(" --- " for _ in header) + "|")
  for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")
  sys.stdout.flush()


def fmt_time(seconds):
  if seconds >= 1.0:
    return "%.2f s" % seconds
  if seconds >= 1e-3:
    return "%.2f ms" % (seconds * 1e3)
  return "%.1f us" % (seconds * 1e6)


def memory_bandwidth_gbs(nbytes=1 << 30):
  """This machine's copy bandwidth, GB/s counted as bytes read + written,
  from numpy copying a `nbytes` float32 array into an already-touched one
  (single thread: numpy copies on one core)."""
  import numpy as np
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  dst.fill(0)
  t = median_time(lambda: np.copyto(dst, src), reps=5, warmup=1)
  return 2 * nbytes / t / 1e9


def zipf_batches(num_ids, s=1.1, batch=65536, nbatches=40, seed=0):
  """Batches of int64 keys, Zipf-like over `num_ids` ids: P(rank k) ~ 1/k^s
  (exact inverse-CDF sampling), each rank hashed multiplicatively so ids
  spread over int64. The same workload as the peer measurements."""
  import numpy as np
  rng = np.random.default_rng(seed)
  w = 1.0 / np.arange(1, num_ids + 1, dtype=np.float64) ** s
  cdf = np.cumsum(w)
  cdf /= cdf[-1]
  ranks = np.searchsorted(cdf, rng.random(batch * nbatches)).astype(np.uint64)
  ids = ((ranks + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(1)
  return ids.astype(np.int64).reshape(nbatches, batch)
