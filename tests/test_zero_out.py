"""zero_out: results vs numpy for every dtype and rank, in eager mode,
tf.function and a TF1 Session; gradients; SavedModel; bad input."""
import numpy as np
import pytest
import tensorflow as tf

import hpc_ops
from hpc_ops import gen_zero_out_ops

DTYPES = [tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32, tf.float64]
SHAPES = [(), (0,), (1,), (7,), (3, 0, 2), (2, 3, 4), (1, 1, 1, 1, 5)]


def reference(x):
  out = np.zeros_like(x)
  if x.size:
    out.reshape(-1)[0] = x.reshape(-1)[0]
  return out


def random_input(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(1, 100, size=shape)
  return tf.cast(tf.constant(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_eager_matches_numpy(dtype, shape):
  x = random_input(shape, dtype)
  y = hpc_ops.zero_out(x)
  assert y.dtype == dtype
  assert y.shape == x.shape
  np.testing.assert_array_equal(tf.cast(y, tf.float64).numpy(),
                                reference(tf.cast(x, tf.float64).numpy()))


def test_generated_wrapper_is_the_op():
  x = tf.constant([[5, 6], [7, 8]])
  np.testing.assert_array_equal(gen_zero_out_ops.zero_out(x), [[5, 0], [0, 0]])
  np.testing.assert_array_equal(gen_zero_out_ops.zero_out(to_zero=x), [[5, 0], [0, 0]])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_tf_function_and_shape_inference(dtype):
  @tf.function(input_signature=[tf.TensorSpec([None, 3], dtype)])
  def f(x):
    # x + x is a temporary the kernel may reuse as its output buffer.
    y = hpc_ops.zero_out(x + x)
    assert y.shape.as_list() == [None, 3]  # static shape from the C++ shape fn
    return y

  x = random_input((4, 3), dtype, seed=1)
  expected = reference(tf.cast(x + x, tf.float64).numpy())
  np.testing.assert_array_equal(tf.cast(f(x), tf.float64).numpy(), expected)


def test_tf1_graph_and_session():
  g = tf.compat.v1.Graph()
  with g.as_default():
    x = tf.compat.v1.placeholder(tf.float32, shape=[None])
    y = gen_zero_out_ops.zero_out(x)
    with tf.compat.v1.Session(graph=g) as sess:
      out = sess.run(y, feed_dict={x: np.array([3.0, 4.0, 5.0], np.float32)})
  np.testing.assert_array_equal(out, [3.0, 0.0, 0.0])
  assert [op.type for op in g.get_operations()].count("ZeroOut") == 1


@pytest.mark.parametrize("dtype", [tf.float32, tf.int64], ids=lambda d: d.name)
def test_large_input_uses_the_thread_pool(dtype):
  # Big enough to be split across the pool; every block must be zeroed.
  n = 3_000_017
  x = tf.range(1, n + 1, dtype=dtype)
  y = hpc_ops.zero_out(x).numpy()
  assert y[0] == 1
  assert not y[1:].any()


def test_gradient_float64_is_exact():
  x = tf.constant(np.random.default_rng(2).normal(size=(3, 4)), tf.float64)
  theoretical, numerical = tf.test.compute_gradient(hpc_ops.zero_out, [x])
  assert np.max(np.abs(theoretical[0] - numerical[0])) < 1e-8
  # The Jacobian is the selector of element 0.
  expected = np.zeros((12, 12))
  expected[0, 0] = 1.0
  np.testing.assert_array_equal(theoretical[0], expected)


def test_gradient_float32():
  x = tf.constant(np.random.default_rng(3).normal(size=(5,)), tf.float32)
  theoretical, numerical = tf.test.compute_gradient(hpc_ops.zero_out, [x])
  assert np.max(np.abs(theoretical[0] - numerical[0])) < 1e-3


def test_gradient_through_tape_in_tf_function():
  @tf.function
  def grad(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(hpc_ops.zero_out(x) * 3.0)
    return tape.gradient(loss, x)

  np.testing.assert_array_equal(grad(tf.ones([2, 2])), [[3.0, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("bad", [tf.constant(["a", "b"]), tf.constant([True]),
                                 tf.constant([1], tf.uint8)],
                         ids=["string", "bool", "uint8"])
def test_unsupported_dtype_is_a_clean_error(bad):
  with pytest.raises((TypeError, tf.errors.InvalidArgumentError,
                      tf.errors.NotFoundError)):
    gen_zero_out_ops.zero_out(bad)

  @tf.function
  def f(x):
    return gen_zero_out_ops.zero_out(x)

  with pytest.raises((TypeError, tf.errors.InvalidArgumentError,
                      tf.errors.NotFoundError)):
    f(bad)


def test_saved_model_loads_in_a_fresh_process(tmp_path, fresh_python):
  class M(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def serve(self, x):
      return {"y": hpc_ops.zero_out(x * 2.0)}

  path = str(tmp_path / "model")
  tf.saved_model.save(M(), path)
  proc = fresh_python("""
      import numpy as np, tensorflow as tf
      import hpc_ops
      m = tf.saved_model.load(%r)
      y = m.signatures["serving_default"](x=tf.constant([1.5, 2.0, 3.0]))["y"]
      print(y.numpy().tolist())
  """ % path)
  assert proc.stdout.strip().splitlines()[-1] == "[3.0, 0.0, 0.0]"
