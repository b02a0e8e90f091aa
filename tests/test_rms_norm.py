"""rms_norm: forward and gradients vs float64 references for every dtype, in
eager mode, tf.function and TF1 graphs; numerical gradients; determinism;
streaming / huge-page paths; shape functions; bad inputs; the Keras layer
(vs keras.layers.RMSNormalization, training, .keras and SavedModel)."""
import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import hpc_ops
from hpc_ops import gen_rms_norm_ops
from hpc_ops.layers import RMSNorm

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
# Last dimensions around the vector width (8 floats, 4 doubles), and rows
# whose starts are not vector-aligned.
SHAPES = [(1,), (7,), (3, 1), (4, 8), (5, 17), (2, 3, 33), (2, 2, 2, 12),
          (6, 1029)]
EPS = 1e-6


def stat_dtype(dtype):
  return tf.float64 if dtype == tf.float64 else tf.float32


def random_pair(shape, dtype, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  x = tf.cast(rng.standard_normal(shape) * scale, dtype)
  gamma = tf.cast(rng.uniform(0.5, 1.5, shape[-1]), dtype)
  return x, gamma


def to64(t):
  return tf.cast(t, tf.float64).numpy()


def reference(x, gamma, eps=EPS):
  """float64 y and inv_rms from the (already rounded) inputs. The op's
  epsilon attr is a float32, so the reference uses that value."""
  x, gamma = to64(x), to64(gamma)
  eps = float(np.float32(eps))
  inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  return x * inv * gamma, inv[..., 0]


def composite(x, gamma, eps=EPS):
  return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True)
                           + eps) * gamma


def tolerances(dtype):
  return {tf.float16: (1e-2, 1e-3), tf.bfloat16: (1e-2, 1e-2),
          tf.float32: (1e-5, 1e-6), tf.float64: (1e-12, 1e-14)}[dtype]


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64_reference(dtype, shape):
  x, gamma = random_pair(shape, dtype, seed=len(shape))
  y, inv_rms = gen_rms_norm_ops.rms_norm(x, gamma, U=stat_dtype(dtype))
  assert y.dtype == dtype and y.shape == x.shape
  assert inv_rms.dtype == stat_dtype(dtype) and inv_rms.shape == shape[:-1]
  want_y, want_inv = reference(x, gamma)
  rtol, atol = tolerances(dtype)
  np.testing.assert_allclose(to64(y), want_y, rtol=rtol, atol=atol)
  # Statistics are float32 (float64) whatever the element type.
  stat_rtol = 1e-12 if dtype == tf.float64 else 1e-5
  np.testing.assert_allclose(to64(inv_rms), want_inv, rtol=stat_rtol)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64],
                         ids=lambda d: d.name)
def test_equals_composite_eager_and_tf_function(dtype):
  x, gamma = random_pair((9, 4, 70), dtype, seed=3)

  @tf.function
  def both(x, gamma):
    return hpc_ops.rms_norm(x, gamma), composite(x, gamma)

  ours_fn, comp_fn = both(x, gamma)
  ours_eager = hpc_ops.rms_norm(x, gamma)
  rtol = 2e-6 if dtype == tf.float32 else 1e-14
  np.testing.assert_allclose(ours_eager.numpy(), composite(x, gamma).numpy(),
                             rtol=rtol, atol=rtol)
  np.testing.assert_allclose(ours_fn.numpy(), comp_fn.numpy(), rtol=rtol,
                             atol=rtol)
  np.testing.assert_array_equal(ours_fn.numpy(), ours_eager.numpy())


def test_gamma_is_cast_to_x_dtype_and_gets_its_gradient():
  x, _ = random_pair((4, 16), tf.bfloat16, seed=7)
  gamma = tf.Variable(np.linspace(0.5, 1.5, 16), dtype=tf.float32)
  with tf.GradientTape() as tape:
    y = hpc_ops.rms_norm(x, gamma)
    loss = tf.reduce_sum(tf.cast(y, tf.float32))
  assert y.dtype == tf.bfloat16
  want_y = reference(x, tf.cast(gamma, tf.bfloat16))[0]
  np.testing.assert_allclose(to64(y), want_y, rtol=1e-2, atol=1e-2)
  dgamma = tape.gradient(loss, gamma)
  assert dgamma.dtype == tf.float32
  want = np.sum(reference(x, tf.ones([16], tf.bfloat16))[0], axis=0)
  np.testing.assert_allclose(dgamma.numpy(), want, rtol=2e-2, atol=2e-2)


def test_epsilon_is_used():
  x = tf.constant([[1e-3, -1e-3, 2e-3]], tf.float64)
  gamma = tf.ones([3], tf.float64)
  for eps in [1e-6, 1e-2, 3.0]:
    y = hpc_ops.rms_norm(x, gamma, epsilon=eps)
    np.testing.assert_allclose(y.numpy(), reference(x, gamma, eps)[0],
                               rtol=1e-12)
  # A zero row is 0 (not NaN): epsilon keeps the denominator positive.
  y = hpc_ops.rms_norm(tf.zeros([2, 5]), tf.ones([5]))
  np.testing.assert_array_equal(y.numpy(), np.zeros([2, 5]))


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float32],
                         ids=lambda d: d.name)
def test_large_output_streaming_path_matches_small_calls(dtype):
  """Outputs >= 16 MiB take the streaming (and, when fresh, huge-page)
  path; rows of 4099 elements start misaligned, so each row has a scalar
  head and tail. Every row must equal the same row computed on its own (the
  small-output path), bit for bit, and the reference."""
  shape = (2053 if dtype == tf.bfloat16 else 1031, 4099)
  x, gamma = random_pair(shape, dtype, seed=11)
  y, inv_rms = gen_rms_norm_ops.rms_norm(x, gamma, U=tf.float32)
  for lo, hi in [(0, 3), (517, 520), (shape[0] - 2, shape[0])]:
    y_small, inv_small = gen_rms_norm_ops.rms_norm(x[lo:hi], gamma,
                                                   U=tf.float32)
    np.testing.assert_array_equal(to64(y[lo:hi]), to64(y_small))
    np.testing.assert_array_equal(inv_rms[lo:hi].numpy(), inv_small.numpy())
  want_y, want_inv = reference(x, gamma)
  rtol, atol = tolerances(dtype)
  np.testing.assert_allclose(to64(y), want_y, rtol=rtol, atol=atol)
  np.testing.assert_allclose(inv_rms.numpy(), want_inv, rtol=1e-5)


def test_nan_and_inf_propagate_like_the_composite():
  x = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                [1.0, np.nan, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                [1.0, np.inf, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                [1e30, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
  gamma = np.linspace(0.5, 1.5, 9).astype(np.float32)
  for dtype in [tf.float32, tf.bfloat16, tf.float16]:
    xt = tf.cast(x, dtype)
    y = to64(hpc_ops.rms_norm(xt, tf.cast(gamma, dtype)))
    want = to64(composite(tf.cast(xt, tf.float32), gamma))
    assert np.all(np.isnan(y[1])) and np.all(np.isnan(want[1]))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    if dtype == tf.float32:
      np.testing.assert_allclose(y[~np.isnan(y)], want[~np.isnan(want)],
                                 rtol=1e-6)


def test_empty_rows_are_fine():
  for shape in [(0, 4), (2, 0, 3)]:
    x = tf.zeros(shape)
    y, inv_rms = gen_rms_norm_ops.rms_norm(x, tf.ones([shape[-1]]),
                                           U=tf.float32)
    assert y.shape == shape and inv_rms.shape == shape[:-1]
    dx, dgamma = gen_rms_norm_ops.rms_norm_grad(x, x, tf.ones([shape[-1]]),
                                                inv_rms)
    assert dx.shape == shape
    np.testing.assert_array_equal(dgamma.numpy(), np.zeros(shape[-1]))


def test_input_buffer_can_be_reused_for_the_output():
  # x * 1.0 is a temporary nothing else holds: RmsNorm may write y over it,
  # and RmsNormGrad may write dx over dy.
  x, gamma = random_pair((64, 40), tf.float32, seed=5)
  dy, _ = random_pair((64, 40), tf.float32, seed=6)

  @tf.function
  def f(x, gamma, dy):
    y, inv_rms = gen_rms_norm_ops.rms_norm(x * 1.0, gamma, U=tf.float32)
    dx, dgamma = gen_rms_norm_ops.rms_norm_grad(dy * 1.0, x, gamma, inv_rms)
    return y, dx, dgamma

  y, dx, dgamma = f(x, gamma, dy)
  _, dx_ref, dg_ref = f.python_function(x, gamma, dy)
  np.testing.assert_allclose(y.numpy(), reference(x, gamma)[0], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(dx.numpy(), dx_ref.numpy())
  np.testing.assert_array_equal(dgamma.numpy(), dg_ref.numpy())


# -------------------------------------------------------------- gradients


def grads(fn, x, gamma, dy):
  with tf.GradientTape() as tape:
    tape.watch([x, gamma])
    y = fn(x, gamma)
  return tape.gradient(y, [x, gamma], output_gradients=dy)


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5), (9,)], ids=str)
def test_numerical_gradient_float64(shape):
  x, gamma = random_pair(shape, tf.float64, seed=21)
  theoretical, numerical = tf.test.compute_gradient(
      lambda x, g: hpc_ops.rms_norm(x, g), [x, gamma])
  for t, n in zip(theoretical, numerical):
    assert np.max(np.abs(t - n)) < 1e-6
  # ... and the analytic Jacobian is the composite formula's.
  composite_jac, _ = tf.test.compute_gradient(composite, [x, gamma])
  for t, c in zip(theoretical, composite_jac):
    np.testing.assert_allclose(t, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_gradient_matches_float64_composite(dtype):
  x, gamma = random_pair((37, 515), dtype, seed=22)
  dy, _ = random_pair((37, 515), dtype, seed=23)
  dx, dgamma = grads(hpc_ops.rms_norm, x, gamma, dy)
  assert dx.dtype == dtype and dgamma.dtype == dtype
  dx64, dg64 = grads(composite, tf.cast(x, tf.float64),
                     tf.cast(gamma, tf.float64), tf.cast(dy, tf.float64))
  rtol = {tf.float16: 2e-2, tf.bfloat16: 3e-2, tf.float32: 1e-4,
          tf.float64: 1e-11}[dtype]
  # Relative to each tensor's scale: dx mixes terms of both signs.
  for got, want in [(dx, dx64), (dgamma, dg64)]:
    err = np.max(np.abs(to64(got) - want.numpy()))
    assert err <= rtol * np.max(np.abs(want.numpy())), (err, dtype)


def test_gradient_eager_equals_tf_function():
  x, gamma = random_pair((33, 260), tf.float32, seed=24)
  dy, _ = random_pair((33, 260), tf.float32, seed=25)
  eager = grads(hpc_ops.rms_norm, x, gamma, dy)
  graph = tf.function(lambda x, g, dy: grads(hpc_ops.rms_norm, x, g, dy))(
      x, gamma, dy)
  for e, g in zip(eager, graph):
    np.testing.assert_array_equal(e.numpy(), g.numpy())


def test_gradient_through_inv_rms_output():
  """The inv_rms output is differentiable too (d inv / dx = -inv^3 x / H)."""
  x, gamma = random_pair((4, 6), tf.float64, seed=26)
  w, _ = random_pair((4,), tf.float64, seed=27)

  def both(x, g):
    y, inv_rms = gen_rms_norm_ops.rms_norm(x, g, U=tf.float64)
    return y * 0.5 + inv_rms[:, None] * w[:, None]

  def only_inv(x, g):
    _, inv_rms = gen_rms_norm_ops.rms_norm(x, g, U=tf.float64)
    return inv_rms * w

  for fn in [both, only_inv]:
    theoretical, numerical = tf.test.compute_gradient(fn, [x, gamma])
    for t, n in zip(theoretical, numerical):
      assert np.max(np.abs(t - n)) < 1e-6
    graph_fn = tf.function(fn)
    graph_jac, _ = tf.test.compute_gradient(graph_fn, [x, gamma])
    for t, g in zip(theoretical, graph_jac):
      np.testing.assert_allclose(g, t, rtol=1e-12, atol=1e-14)


def test_tf1_graph_gradients_with_runtime_zero_and_nonzero_inv_rms_grad():
  """In a TF1 graph, the inv_rms gradient is a runtime tensor here (not a
  constant): the gradient must add its term only when it is nonzero."""
  x_val, g_val = random_pair((5, 9), tf.float64, seed=28)
  g = tf.compat.v1.Graph()
  with g.as_default():
    x = tf.compat.v1.placeholder(tf.float64, [None, 9])
    gamma = tf.constant(g_val.numpy())
    w = tf.compat.v1.placeholder(tf.float64, [None])
    y, inv_rms = gen_rms_norm_ops.rms_norm(x, gamma, U=tf.float64)
    loss = tf.reduce_sum(y * y) + tf.reduce_sum(inv_rms * w)
    dx, dgamma = tf.gradients(loss, [x, gamma])
    with tf.compat.v1.Session(graph=g) as sess:
      out = {}
      for name, w_val in [("zero", np.zeros(5)), ("nonzero", np.arange(5.0))]:
        out[name] = sess.run([dx, dgamma], {x: x_val.numpy(), w: w_val})

  for name, w_val in [("zero", np.zeros(5)), ("nonzero", np.arange(5.0))]:
    xv = tf.constant(x_val)
    with tf.GradientTape() as tape:
      tape.watch([xv, g_val])
      inv = tf.math.rsqrt(tf.reduce_mean(xv * xv, -1) + np.float32(EPS))
      yv = xv * inv[:, None] * g_val
      ref_loss = tf.reduce_sum(yv * yv) + tf.reduce_sum(inv * w_val)
    want = tape.gradient(ref_loss, [xv, g_val])
    for got, ref in zip(out[name], want):
      np.testing.assert_allclose(got, ref.numpy(), rtol=1e-10, atol=1e-12)


def test_second_order_gradients_match_composite():
  x, gamma = random_pair((3, 11), tf.float64, seed=29)
  v, _ = random_pair((3, 11), tf.float64, seed=30)
  u, _ = random_pair((11,), tf.float64, seed=31)

  def hvp(fn):
    with tf.GradientTape(persistent=True) as outer:
      outer.watch([x, gamma])
      with tf.GradientTape() as inner:
        inner.watch([x, gamma])
        loss = tf.reduce_sum(tf.sin(fn(x, gamma)))
      gx, gg = inner.gradient(loss, [x, gamma])
      z = tf.reduce_sum(gx * v) + tf.reduce_sum(gg * u)
    return outer.gradient(z, [x, gamma])

  for got, want in zip(hvp(hpc_ops.rms_norm), hvp(composite)):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9,
                               atol=1e-11)

  # And RmsNormGrad's own gradient against numerical differentiation.
  _, inv_rms = gen_rms_norm_ops.rms_norm(x, gamma, U=tf.float64)
  for out in range(2):
    theoretical, numerical = tf.test.compute_gradient(
        lambda dy, x, g, r, out=out: gen_rms_norm_ops.rms_norm_grad(
            dy, x, g, r)[out], [v, x, gamma, inv_rms], delta=1e-5)
    for t, n in zip(theoretical, numerical):
      assert np.max(np.abs(t - n)) < 1e-6


def test_gradient_is_deterministic_and_independent_of_thread_count(
    fresh_python):
  """dgamma's partial sums are added in a fixed shard order, so the result
  is bit-identical across runs and across intra-op thread counts."""
  code = """
      import hashlib, numpy as np, tensorflow as tf
      tf.config.threading.set_intra_op_parallelism_threads(%d)
      from hpc_ops import gen_rms_norm_ops
      rng = np.random.default_rng(40)
      x = tf.constant(rng.standard_normal((3000, 700)), tf.float32)
      dy = tf.constant(rng.standard_normal((3000, 700)), tf.float32)
      g = tf.constant(rng.uniform(0.5, 1.5, 700), tf.float32)
      _, inv = gen_rms_norm_ops.rms_norm(x, g, U=tf.float32)
      digests = set()
      for _ in range(3):
        dx, dg = gen_rms_norm_ops.rms_norm_grad(dy, x, g, inv)
        digests.add(hashlib.sha256(dx.numpy().tobytes()
                                   + dg.numpy().tobytes()).hexdigest())
      print(len(digests), digests.pop())
  """
  one = fresh_python(code % 1).stdout.split()[-2:]
  two = fresh_python(code % 2).stdout.split()[-2:]
  assert one[0] == "1" and two[0] == "1"  # same result on every run
  assert one[1] == two[1]  # and with 1 or 2 threads


# ------------------------------------------------- shapes and bad inputs


def test_shape_inference():

  @tf.function(input_signature=[tf.TensorSpec([None, None, 8], tf.float32),
                                tf.TensorSpec([None], tf.float32)])
  def f(x, gamma):
    y, inv_rms = gen_rms_norm_ops.rms_norm(x, gamma, U=tf.float32)
    assert y.shape.as_list() == [None, None, 8]
    assert inv_rms.shape.as_list() == [None, None]
    dx, dgamma = gen_rms_norm_ops.rms_norm_grad(y, x, gamma, inv_rms)
    assert dx.shape.as_list() == [None, None, 8]
    assert dgamma.shape.as_list() == [8]
    return dx

  f.get_concrete_function()

  @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32),
                                tf.TensorSpec([5], tf.float32),
                                tf.TensorSpec([3], tf.float32)])
  def g(x, gamma, inv_rms):
    y, _ = gen_rms_norm_ops.rms_norm(x, gamma, U=tf.float32)
    assert y.shape.as_list() == [None, 5]  # gamma fixes H
    dx, _ = gen_rms_norm_ops.rms_norm_grad(x, x, gamma, inv_rms)
    assert dx.shape.as_list() == [3, 5]  # inv_rms fixes the rows
    return dx

  g.get_concrete_function()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("case", [
    "rank0", "gamma_length", "gamma_rank", "empty_last_dim", "eps_zero",
    "eps_negative", "eps_nan", "eps_inf", "u_double_for_float",
    "u_float_for_double"])
def test_bad_forward_inputs_are_clean_errors(case, graph):
  x = tf.ones([3, 4])
  gamma = tf.ones([4])
  kwargs = dict(U=tf.float32)
  fragment = {
      "rank0": "rank",
      "gamma_length": "gamma shape",
      "gamma_rank": "gamma shape",
      "empty_last_dim": "must not be empty",
      "eps_zero": "epsilon must be",
      "eps_negative": "epsilon must be",
      "eps_nan": "epsilon must be",
      "eps_inf": "epsilon must be",
      "u_double_for_float": "U (the inv_rms type) must be float",
      "u_float_for_double": "U (the inv_rms type) must be double",
  }[case]
  if case == "rank0":
    x = tf.constant(1.0)
  elif case == "gamma_length":
    gamma = tf.ones([5])
  elif case == "gamma_rank":
    gamma = tf.ones([1, 4])
  elif case == "empty_last_dim":
    x, gamma = tf.ones([3, 0]), tf.ones([0])
  elif case.startswith("eps_"):
    kwargs["epsilon"] = {"eps_zero": 0.0, "eps_negative": -1e-5,
                         "eps_nan": float("nan"),
                         "eps_inf": float("inf")}[case]
  elif case == "u_double_for_float":
    kwargs["U"] = tf.float64
  elif case == "u_float_for_double":
    x, gamma = tf.ones([3, 4], tf.float64), tf.ones([4], tf.float64)

  if graph:
    # Graph construction runs the C++ shape function first.
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match=re.escape(fragment)):
      tf.function(lambda: gen_rms_norm_ops.rms_norm(x, gamma, **kwargs))()
  else:
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(fragment)):
      gen_rms_norm_ops.rms_norm(x, gamma, **kwargs)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("case", ["rank0", "gamma_length", "dy_shape",
                                  "inv_rms_shape", "inv_rms_rank",
                                  "empty_last_dim", "u_mismatch"])
def test_bad_gradient_inputs_are_clean_errors(case, graph):
  dy = x = tf.ones([3, 4])
  gamma = tf.ones([4])
  inv_rms = tf.ones([3])
  fragment = {
      "rank0": "rank", "gamma_length": "gamma shape",
      "dy_shape": "dy shape", "inv_rms_shape": "inv_rms shape",
      "inv_rms_rank": "inv_rms shape", "empty_last_dim": "must not be empty",
      "u_mismatch": "U (the inv_rms type) must be float"}[case]
  if case == "rank0":
    dy = x = tf.constant(1.0)
    inv_rms = tf.constant(1.0)
  elif case == "gamma_length":
    gamma = tf.ones([3])
  elif case == "dy_shape":
    dy = tf.ones([4, 3])
  elif case == "inv_rms_shape":
    inv_rms = tf.ones([4])
  elif case == "inv_rms_rank":
    inv_rms = tf.ones([3, 1])
  elif case == "empty_last_dim":
    dy = x = tf.ones([3, 0])
    gamma = tf.ones([0])
  elif case == "u_mismatch":
    inv_rms = tf.ones([3], tf.float64)
  if graph:
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match=re.escape(fragment)):
      tf.function(lambda: gen_rms_norm_ops.rms_norm_grad(
          dy=dy, x=x, gamma=gamma, inv_rms=inv_rms))()
  else:
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=re.escape(fragment)):
      gen_rms_norm_ops.rms_norm_grad(dy=dy, x=x, gamma=gamma, inv_rms=inv_rms)


def test_unsupported_dtypes_are_type_errors():
  with pytest.raises(TypeError, match="float16, bfloat16, float32"):
    hpc_ops.rms_norm(tf.ones([2, 3], tf.int32), tf.ones([3], tf.int32))
  with pytest.raises((TypeError, tf.errors.InvalidArgumentError,
                      tf.errors.NotFoundError)):
    gen_rms_norm_ops.rms_norm(tf.ones([2, 3], tf.int32),
                              tf.ones([3], tf.int32), U=tf.float32)
  with pytest.raises((TypeError, tf.errors.InvalidArgumentError)):
    gen_rms_norm_ops.rms_norm(tf.ones([2, 3]), tf.ones([3], tf.float64),
                              U=tf.float32)


# ------------------------------------------------------------ Keras layer


def keras_pair(axis=-1, epsilon=1e-6, dtype=None, input_shape=(4, 6, 16)):
  ours = RMSNorm(axis=axis, epsilon=epsilon, dtype=dtype)
  theirs = keras.layers.RMSNormalization(axis=axis, epsilon=epsilon,
                                         dtype=dtype)
  ours.build(input_shape)
  theirs.build(input_shape)
  rng = np.random.default_rng(50)
  theirs.set_weights([rng.uniform(0.5, 1.5, theirs.scale.shape)
                      .astype(np.float32)])
  ours.set_weights(theirs.get_weights())
  return ours, theirs


@pytest.mark.parametrize("axis", [-1, 2, [-2, -1], [1, 2]], ids=str)
def test_layer_matches_keras_rms_normalization(axis):
  ours, theirs = keras_pair(axis=axis)
  assert [w.name for w in ours.weights] == ["scale"]
  assert ours.scale.shape == theirs.scale.shape
  x = tf.random.stateless_normal([4, 6, 16], seed=[1, 2])
  np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=2e-6,
                             atol=2e-6)
  # Same trainable gradients too.
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    lo = tf.reduce_sum(tf.sin(ours(x)))
    lt = tf.reduce_sum(tf.sin(theirs(x)))
  pairs = [(tape.gradient(lo, x), tape.gradient(lt, x)),
           (tape.gradient(lo, ours.scale), tape.gradient(lt, theirs.scale))]
  for a, b in pairs:
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_layer_mixed_bfloat16_matches_keras():
  ours, theirs = keras_pair(dtype="mixed_bfloat16")
  x = tf.random.stateless_normal([4, 6, 16], seed=[3, 4])
  yo, yt = ours(x), theirs(x)
  assert yo.dtype == yt.dtype == tf.bfloat16
  assert ours.scale.dtype == "float32"
  np.testing.assert_allclose(to64(yo), to64(yt), rtol=1e-2, atol=1e-2)


def test_layer_non_trailing_axis():
  """axis=1 of [B, C, T]: normalised over C, scale along C."""
  layer = RMSNorm(axis=1)
  x = tf.random.stateless_normal([2, 5, 3], seed=[5, 6])
  layer.build(x.shape)
  scale = np.linspace(0.5, 1.5, 5).astype(np.float32)
  layer.set_weights([scale])
  xn = x.numpy().astype(np.float64)
  inv = 1 / np.sqrt(np.mean(xn * xn, axis=1, keepdims=True)
                    + float(np.float32(1e-6)))
  want = xn * inv * scale[None, :, None]
  np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-6)


def test_layer_config_round_trips_both_ways():
  ours, theirs = keras_pair(axis=-1, epsilon=1e-5)
  cfg = ours.get_config()
  assert set(cfg) == set(theirs.get_config())
  assert cfg["epsilon"] == 1e-5
  assert RMSNorm.from_config(theirs.get_config()).epsilon == 1e-5
  back = keras.layers.RMSNormalization.from_config(cfg)
  assert back.epsilon == 1e-5
  assert keras.saving.get_registered_name(RMSNorm) == "hpc_ops>RMSNorm"
  json.dumps(keras.saving.serialize_keras_object(ours))


@pytest.mark.parametrize("axis", [3, -4, [0, 0]], ids=str)
def test_layer_bad_axis(axis):
  with pytest.raises(ValueError, match="axis"):
    RMSNorm(axis=axis).build((2, 3, 4))


def test_layer_bad_epsilon():
  with pytest.raises(ValueError, match="epsilon"):
    RMSNorm(epsilon=0.0)


def small_model():
  inputs = keras.Input((8, 12))
  h = keras.layers.Dense(12)(inputs)
  h = RMSNorm(name="norm")(h)
  outputs = keras.layers.Dense(1)(h)
  return keras.Model(inputs, outputs)


def test_layer_trains_in_model_fit():
  keras.utils.set_random_seed(0)
  model = small_model()
  model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
  assert model.get_layer("norm").supports_jit is False
  rng = np.random.default_rng(60)
  x = rng.standard_normal((256, 8, 12)).astype(np.float32)
  y = (x[:, :, :1] * 2.0 - x[:, :, 1:2]).astype(np.float32)
  before = model.get_layer("norm").scale.numpy().copy()
  hist = model.fit(x, y, epochs=5, batch_size=32, verbose=0)
  assert hist.history["loss"][-1] < 0.5 * hist.history["loss"][0]
  assert not np.allclose(model.get_layer("norm").scale.numpy(), before)


def test_layer_saves_as_keras_and_saved_model_in_fresh_process(
    tmp_path, fresh_python):
  keras.utils.set_random_seed(1)
  model = small_model()
  model.get_layer("norm").scale.assign(np.linspace(0.5, 1.5, 12))
  x = np.random.default_rng(61).standard_normal((3, 8, 12)).astype(np.float32)
  want = model.predict(x, verbose=0)
  keras_path = str(tmp_path / "m.keras")
  sm_path = str(tmp_path / "sm")
  np.save(str(tmp_path / "x.npy"), x)
  model.save(keras_path)
  model.export(sm_path, verbose=False)
  proc = fresh_python("""
      import numpy as np, keras, tensorflow as tf
      import hpc_ops  # registers the ops and the layer
      x = np.load(%r)
      m = keras.saving.load_model(%r)
      print("LAYER", type(m.get_layer("norm")).__module__)
      np.save(%r, m.predict(x, verbose=0))
      sm = tf.saved_model.load(%r)
      np.save(%r, sm.serve(tf.constant(x)).numpy())
  """ % (str(tmp_path / "x.npy"), keras_path, str(tmp_path / "k.npy"),
         sm_path, str(tmp_path / "s.npy")))
  assert "LAYER hpc_ops.rms_norm" in proc.stdout
  np.testing.assert_allclose(np.load(str(tmp_path / "k.npy")), want,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.load(str(tmp_path / "s.npy")), want,
                             rtol=1e-6, atol=1e-6)
