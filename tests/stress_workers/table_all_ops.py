"""Run by tests/test_stress.py in a subprocess (a deadlock must not hang the
test run): pushes of large batches (split across the CPU pool inside the
op), pulls, exports (which hold every shard's lock) and evictions (which
take shard locks from pool tasks) on one table at the same time, from
several Python threads.

Pushes use SGD with learning rate 1 and gradients of 1 on a zero-initialised
table, and every batch holds each of 16 hot keys exactly HOT_REPEAT times,
so after P pushes every column of every hot row is exactly -HOT_REPEAT * P.
Every pulled or exported hot row must have equal columns (no torn row) and
a value that is a multiple of -HOT_REPEAT. Prints `TABLE PASS <pushes>` or
`TABLE FAIL <reason>`.
"""
import os
import sys
import threading
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import hpc_ops  # noqa: E402

DIM = 8
HOT = np.arange(16, dtype=np.int64)
HOT_REPEAT = 500
PUSHERS = 3
PUSHES = int(os.environ.get("STRESS_PUSHES", "12"))


def check_rows(rows, what):
  rows = np.asarray(rows)
  if not (rows == rows[:, :1]).all():
    raise AssertionError("%s: torn row %s" % (what, rows))
  if np.any(np.mod(rows, HOT_REPEAT) != 0) or np.any(rows > 0):
    raise AssertionError("%s: value not a multiple of -%d: %s"
                         % (what, HOT_REPEAT, rows[:, 0]))


def main():
  table = hpc_ops.SparseTable(dim=DIM, initializer="zeros", optimizer="sgd",
                              num_shards=64, track_usage=True)
  rng = np.random.default_rng(0)
  batches = []
  for i in range(PUSHERS):
    keys = np.concatenate([np.repeat(HOT, HOT_REPEAT),
                           rng.integers(1000, 10**7, size=12000)])
    batches.append(tf.constant(rng.permutation(keys)))
  grads = [tf.ones([int(b.shape[0]), DIM]) for b in batches]
  errors, stop = [], threading.Event()

  def guard(fn):
    def run(*args):
      try:
        fn(*args)
      except Exception:  # noqa: BLE001 - reported below
        errors.append(traceback.format_exc())
        stop.set()
    return run

  @guard
  def pusher(i):
    for _ in range(PUSHES):
      table.push(batches[i], grads[i], 1.0)

  @guard
  def exporter():
    while not stop.is_set():
      snap = table.export()
      keys = snap.keys.numpy()
      hot = np.isin(keys, HOT)
      if hot.any():
        check_rows(snap.values.numpy()[hot], "export")

  @guard
  def puller():
    while not stop.is_set():
      check_rows(table.pull(HOT).numpy(), "pull")

  @guard
  def evicter():
    while not stop.is_set():
      # Rows idle for 10^6 steps: none, but every shard is visited.
      table.evict(max_idle_steps=10**6)
      table.size()

  pushers = [threading.Thread(target=pusher, args=(i,)) for i in range(PUSHERS)]
  others = [threading.Thread(target=f) for f in (exporter, puller, evicter)]
  for t in pushers + others:
    t.start()
  for t in pushers:
    t.join()
  stop.set()
  for t in others:
    t.join()
  if errors:
    print("TABLE FAIL " + errors[0].replace("\n", " | "), flush=True)
    return 1
  total = PUSHERS * PUSHES
  final = table.pull(HOT).numpy()
  if not np.array_equal(final, np.full((16, DIM), -float(HOT_REPEAT * total))):
    print("TABLE FAIL final hot rows %s, want %d" % (final[:, 0],
                                                     -HOT_REPEAT * total))
    return 1
  print("TABLE PASS %d" % total, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
