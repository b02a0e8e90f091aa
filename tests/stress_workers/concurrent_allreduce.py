"""Run under mpirun -np 2 (or more) by tests/test_stress.py: several Python
threads per process issue allreduces at the same time, and every result is
checked exactly.

    python -m hpc_ops.run -np 2 tests/stress_workers/concurrent_allreduce.py

Thread t of every rank issues ROUNDS allreduces named "stress.t<t>" (eager:
the k-th call with a name on one process is combined with the k-th call with
that name on the others) and, interleaved, calls its own tf.function whose
allreduce has the node name "stress_fn_t<t>". Inputs are small integers
(exact in every type, sums included), derived from (rank, thread, round), so
every rank knows the exact expected result. Prints one line per rank:
`STRESS rank=<r> PASS <n> results` or `STRESS rank=<r> FAIL <reason>`.
"""
import os
import sys
import threading
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import hpc_ops.collective as coll  # noqa: E402
import hpc_ops.distributed as hd  # noqa: E402

tf.get_logger().setLevel("ERROR")  # each thread traces its own tf.function
THREADS = int(os.environ.get("STRESS_THREADS", "6"))
ROUNDS = int(os.environ.get("STRESS_ROUNDS", "40"))
DTYPES = [tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32,
          tf.float64]
OPS = ["sum", "min", "max", "product", "average"]

hd.init()
R, P = hd.rank(), hd.size()


def values(rank, t, k, n):
  """Rank `rank`'s input for thread t, round k: integers in [-8, 8] (in
  [1, 2] for products, so that no type overflows or rounds)."""
  rng = np.random.default_rng([rank, t, k])
  return rng.integers(-8, 9, size=n), rng.integers(1, 3, size=n)


def case(t, k):
  dtype = DTYPES[(t + k) % len(DTYPES)]
  op = OPS[(t * 7 + k) % len(OPS)]
  # Sizes around the fusion buffer and block boundaries, and empty ones.
  n = [0, 1, 17, 2048, 2049, 40000][(t + 3 * k) % 6]
  return dtype, op, n


def inputs_and_expected(t, k):
  dtype, op, n = case(t, k)
  per_rank = [values(r, t, k, n)[1 if op == "product" else 0]
              for r in range(P)]
  stack = np.stack(per_rank).astype(np.float64)
  expected = {"sum": stack.sum(0), "min": stack.min(0), "max": stack.max(0),
              "product": stack.prod(0),
              "average": np.trunc(stack.sum(0) / P) if dtype.is_integer
              else stack.sum(0) / P}[op]
  x = tf.cast(tf.constant(per_rank[R].astype(np.float64)), dtype)
  return x, op, expected


def worker(t, results, errors):
  fn_op = OPS[t % len(OPS)]

  @tf.function(reduce_retracing=True)
  def fn(x):
    return coll.allreduce(x, fn_op, name="stress_fn_t%d" % t)

  try:
    for k in range(ROUNDS):
      x, op, expected = inputs_and_expected(t, k)
      y = hd.allreduce(x, op=op, name="stress.t%d" % t)
      got = tf.cast(y, tf.float64).numpy()
      if y.dtype != x.dtype or not np.array_equal(got, expected):
        raise AssertionError("thread %d round %d (%s %s n=%d): got %s, want %s"
                             % (t, k, x.dtype.name, op, x.shape[0], got[:8],
                                expected[:8]))
      results.append(1)
      if k % 4 == 0:  # the thread's tf.function, on float32
        x = tf.constant(np.arange(64, dtype=np.float32) + R + t)
        y = fn(x).numpy()
        ranks = np.arange(64)[None, :] + np.arange(P)[:, None] + t
        want = {"sum": ranks.sum(0), "min": ranks.min(0),
                "max": ranks.max(0), "product": ranks.prod(0),
                "average": ranks.sum(0) / P}[fn_op].astype(np.float32)
        if not np.array_equal(y, want):
          raise AssertionError("thread %d tf.function round %d: got %s, want "
                               "%s" % (t, k, y[:8], want[:8]))
        results.append(1)
  except Exception:  # noqa: BLE001 - reported below
    errors.append(traceback.format_exc())


def main():
  results, errors = [], []
  threads = [threading.Thread(target=worker, args=(t, results, errors))
             for t in range(THREADS)]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  if errors:
    print("STRESS rank=%d FAIL %s" % (R, errors[0].replace("\n", " | ")),
          flush=True)
    return 1
  print("STRESS rank=%d PASS %d results" % (R, len(results)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
