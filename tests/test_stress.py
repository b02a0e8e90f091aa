"""Stress tests at the edges of the op families' sizes and concurrency:

- RMSNorm on rows of 1 element and of 1e6 elements, forward and gradient
  against a float64 numpy reference;
- allreduces issued concurrently from several Python threads per process
  under mpirun -np 2, every result checked exactly
  (tests/stress_workers/concurrent_allreduce.py);
- one sparse table pushed, pulled, exported and evicted from several threads
  at once, with an exact final value (tests/stress_workers/table_all_ops.py).
"""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import hpc_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRESS_WORKERS = os.path.join(REPO, "tests", "stress_workers")
EPS = 1e-6


# ---------------------------------------------------------------------------
# RMSNorm: rows of 1 and of 1e6 elements.


def _to64(t):
  return tf.cast(t, tf.float64).numpy()


def _reference(x, gamma, dy):
  """float64 y, dx and dgamma of RMSNorm from the (already rounded) inputs;
  the op's epsilon is a float32 attr, so the reference uses that value."""
  x, gamma, dy = _to64(x), _to64(gamma), _to64(dy)
  h = x.shape[-1]
  eps = float(np.float32(EPS))
  inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  y = x * inv * gamma
  s = np.sum(dy * gamma * x, axis=-1, keepdims=True)
  dx = inv * gamma * dy - x * inv**3 * s / h
  dgamma = np.sum(dy * x * inv, axis=tuple(range(x.ndim - 1)))
  return y, dx, dgamma


def _run(x, gamma, dy, graph):
  def f(x, gamma, dy):
    with tf.GradientTape() as tape:
      tape.watch([x, gamma])
      y = hpc_ops.rms_norm(x, gamma, epsilon=EPS)
    dx, dgamma = tape.gradient(y, [x, gamma], output_gradients=dy)
    return y, dx, dgamma
  return (tf.function(f) if graph else f)(x, gamma, dy)


def _inputs(shape, dtype, seed):
  rng = np.random.default_rng(seed)
  x = tf.cast(rng.standard_normal(shape) * 3, dtype)
  gamma = tf.cast(rng.uniform(0.5, 1.5, shape[-1]), dtype)
  dy = tf.cast(rng.standard_normal(shape), dtype)
  return x, gamma, dy


def _check(got, want, rtol, what):
  """Relative to the largest magnitude of the reference (elements near zero
  of a long row carry the rounding of the whole row's statistics)."""
  got = _to64(got)
  scale = max(float(np.max(np.abs(want))), 1e-30)
  err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
  assert np.all(np.isfinite(got)), what
  assert err <= rtol, "%s: max error %.3g of max |ref| (allowed %.3g)" % (
      what, err, rtol)


RTOL = {tf.float16: 4e-3, tf.bfloat16: 3e-2, tf.float32: 2e-6,
        tf.float64: 1e-13}
# A row of 1e6 elements: the float32 statistics accumulate ~1.5e-6 relative
# error over the row (measured 1.5e-6 for y, dx and dgamma; float16 2.7e-4,
# float64 7e-16), so float32 gets more room than for short rows.
RTOL_LONG = {tf.float16: 2e-3, tf.float32: 1e-5, tf.float64: 1e-13}


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "function"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32,
                                   tf.float64], ids=lambda d: d.name)
def test_rms_norm_rows_of_one_element(dtype, graph):
  # H = 1: y = x / sqrt(x^2 + eps) * gamma (the sign of x, for |x| >> eps),
  # and dx = gamma * dy * eps / (x^2 + eps)^1.5: tiny but not zero.
  x, gamma, dy = _inputs((4099, 1), dtype, seed=1)
  x = tf.concat([x, tf.zeros([1, 1], dtype)], 0)  # a zero row: y = 0
  dy = tf.concat([dy, tf.ones([1, 1], dtype)], 0)
  y, dx, dgamma = _run(x, gamma, dy, graph)
  want_y, want_dx, want_dgamma = _reference(x, gamma, dy)
  assert y.shape == x.shape and dx.shape == x.shape and dgamma.shape == [1]
  _check(y, want_y, RTOL[dtype], "y")
  _check(dgamma, want_dgamma, RTOL[dtype] * 4, "dgamma")
  # dx = inv*gamma*dy - x*inv^3*S: two terms of size |gamma*dy/x| that
  # cancel to eps*gamma*dy/|x|^3, so its error is the rounding of the terms
  # (the same in the composite's autodiff): bound it element-wise by them.
  x64, g64, dy64 = _to64(x), _to64(gamma), _to64(dy)
  term = np.abs(g64 * dy64) / np.sqrt(x64 * x64 + float(np.float32(EPS)))
  assert np.all(np.abs(_to64(dx) - want_dx) <= RTOL[dtype] * 4 * term + 1e-30)
  assert _to64(y)[-1, 0] == 0.0
  # At x = 0: dx = gamma * dy / sqrt(eps) (dy = 1 there).
  np.testing.assert_allclose(_to64(dx)[-1, 0], want_dx[-1, 0], rtol=1e-2)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "function"])
@pytest.mark.parametrize("dtype", [tf.float16, tf.float32, tf.float64],
                         ids=lambda d: d.name)
def test_rms_norm_rows_of_a_million_elements(dtype, graph):
  x, gamma, dy = _inputs((2, 1_000_000), dtype, seed=2)
  y, dx, dgamma = _run(x, gamma, dy, graph)
  want_y, want_dx, want_dgamma = _reference(x, gamma, dy)
  assert y.shape == x.shape and dx.shape == x.shape
  assert dgamma.shape == [1_000_000]
  _check(y, want_y, RTOL_LONG[dtype], "y")
  _check(dx, want_dx, RTOL_LONG[dtype], "dx")
  _check(dgamma, want_dgamma, RTOL_LONG[dtype], "dgamma")


def test_rms_norm_a_million_element_row_of_huge_values_does_not_overflow():
  # float16 can hold 6e4, whose square cannot be held: the statistics are
  # float32, so y must still be finite and match the reference.
  x = tf.fill([1, 1_000_000], tf.constant(60000.0, tf.float16))
  gamma = tf.ones([1_000_000], tf.float16)
  y = hpc_ops.rms_norm(x, gamma, epsilon=EPS)
  np.testing.assert_array_equal(_to64(y), np.ones((1, 1_000_000)))


# ---------------------------------------------------------------------------
# Concurrent allreduces from several threads per process.


@pytest.mark.skipif(shutil.which("mpirun") is None or
                    shutil.which("mpicc") is None,
                    reason="mpirun not found / the collective ops not built")
def test_concurrent_allreduces_from_threads_on_two_processes():
  worker = os.path.join(STRESS_WORKERS, "concurrent_allreduce.py")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             HPC_OPS_TIMEOUT_SECONDS="60", STRESS_THREADS="6",
             STRESS_ROUNDS="24")
  proc = subprocess.Popen(
      [sys.executable, "-m", "hpc_ops.run", "-np", "2", worker],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
      cwd=REPO, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=300)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    pytest.fail("the stress job did not finish in 300 s:\n" + out[-8000:])
  # 6 threads x (24 eager rounds + a tf.function call every 4th round).
  for r in range(2):
    assert "STRESS rank=%d PASS 180 results" % r in out, out[-8000:]
  assert proc.returncode == 0, out[-8000:]


# ---------------------------------------------------------------------------
# Sparse table: every locking op at once. (Many threads pushing and pulling
# the same hot keys with an exact final value is
# tests/test_sparse_table.py::test_concurrent_pushes_lose_nothing_and_pulls_never_tear.)


def test_sparse_table_push_pull_export_evict_at_once_never_deadlock():
  # An export holds every shard's lock; pushes and evictions lock shards
  # from CPU-pool tasks. A kernel that waited for the pool while holding a
  # shard lock would deadlock here, so the job runs in a subprocess with a
  # deadline.
  worker = os.path.join(STRESS_WORKERS, "table_all_ops.py")
  try:
    proc = subprocess.run([sys.executable, worker], capture_output=True,
                          text=True, timeout=240,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode(errors="replace") if e.stdout else ""
    pytest.fail("the table stress job did not finish in 240 s (deadlock?):\n"
                + out[-4000:])
  assert "TABLE PASS 36" in proc.stdout, proc.stdout + proc.stderr[-4000:]
  assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------------------
# CPU masks: a pool thread that helps a table op from its caller's CPU moves
# off it for that time (kernels/common/cpu_parallel.h) and must restore its
# mask.


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity")
                    or len(os.sched_getaffinity(0)) < 2,
                    reason="the move needs a process allowed on 2+ CPUs")
def test_sparse_table_ops_leave_every_thread_cpu_mask_as_found():
  mask = os.sched_getaffinity(0)
  rng = np.random.default_rng(5)
  ranks = np.minimum(rng.zipf(1.1, 65536), 10**7).astype(np.uint64)
  keys = tf.constant((ranks * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(1))
                     .astype(np.int64))
  grads = tf.fill([65536, 16], 1e-3)
  table = hpc_ops.SparseTable(16, optimizer="adagrad")
  pull = tf.function(table.pull)
  push = tf.function(lambda k, g: table.push(k, g, 0.1))
  # Another TensorFlow kernel between ours, as in a training step: it moves
  # TensorFlow's threads between the CPUs, which is when a helper can wake
  # on its caller's CPU.
  w = tf.Variable(tf.ones([1 << 16, 16]))
  other = tf.function(lambda k: tf.gather(w, tf.math.floormod(k, 1 << 16)))
  first = pull(keys).numpy()
  for _ in range(40):
    pull(keys)
    other(keys).numpy()
    push(keys, grads)
  assert not np.array_equal(pull(keys).numpy(), first)  # the pushes landed
  assert os.sched_getaffinity(0) == mask
  for tid in os.listdir("/proc/self/task"):
    try:
      thread_mask = os.sched_getaffinity(int(tid))
    except ProcessLookupError:
      continue  # the thread has ended
    assert thread_mask == mask, "thread %s: %s" % (tid, sorted(thread_mask))
