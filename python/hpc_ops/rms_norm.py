"""The rms_norm op family: fused RMSNorm forward and backward on CPU.

`rms_norm(x, gamma)` computes, over the last axis of x,

    y = x * rsqrt(mean(x^2, axis=-1, keepdims=True) + epsilon) * gamma

in one C++ kernel (statistics in float32, or float64 for float64 inputs);
its gradient is the fused `RmsNormGrad` kernel. `RMSNorm` is a Keras 3 layer
with the same weights, math and config as `keras.layers.RMSNormalization`.
"""
import keras
import numpy as np
import tensorflow as tf

from hpc_ops import gen_rms_norm_ops

_SUPPORTED = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def _stat_dtype(dtype):
  """The statistics type (the op's attr U) for an element type."""
  return tf.float64 if dtype == tf.float64 else tf.float32


def rms_norm(x, gamma, epsilon=1e-6, name=None):
  """RMS normalisation over the last axis of `x`, scaled by `gamma`.

  Args:
    x: a float16, bfloat16, float32 or float64 tensor of rank >= 1 whose last
      dimension H is not empty.
    gamma: the scale, shape [H]; cast to x's dtype if it differs (so a
      float32 variable can scale float16 or bfloat16 activations).
    epsilon: added to the mean square before the square root; > 0.
    name: an optional name for the op.

  Returns:
    `x * rsqrt(mean(x^2, -1, keepdims=True) + epsilon) * gamma`, shaped like
    x and of its dtype. Differentiable with respect to x and gamma (twice).

  Raises:
    InvalidArgumentError: x has rank 0 or an empty last dimension, gamma is
      not [H], or epsilon <= 0.
    TypeError: x's dtype is not one of the four supported.
  """
  with tf.name_scope(name or "RmsNorm"):
    x = tf.convert_to_tensor(x)
    if x.dtype not in _SUPPORTED:
      raise TypeError("hpc_ops.rms_norm: x must be float16, bfloat16, float32 "
                      "or float64, got %s" % x.dtype.name)
    gamma = tf.convert_to_tensor(gamma)
    if gamma.dtype != x.dtype:
      gamma = tf.cast(gamma, x.dtype)
    y, _ = gen_rms_norm_ops.rms_norm(x, gamma, U=_stat_dtype(x.dtype),
                                     epsilon=epsilon)
    return y


def _inv_rms_term(x, inv_rms, d_inv_rms):
  """The part of dL/dx that flows through the inv_rms output:
  d inv_rms / d x[j] = -inv_rms^3 * x[j] / H."""
  u = inv_rms.dtype
  h = tf.cast(tf.shape(x)[-1], u)
  coeff = -d_inv_rms * inv_rms * inv_rms * inv_rms / h
  return tf.cast(tf.cast(x, u) * coeff[..., tf.newaxis], x.dtype)


def _add_if_nonzero(value, grad, term_fn):
  """value + term_fn(), skipped when `grad` is all zeros: gradient machinery
  passes zeros (not None) for the inv_rms output most callers never use, and
  the term would cost two extra passes over x. NaN counts as nonzero."""
  static = tf.get_static_value(grad)  # graph mode: usually a zeros Const
  if static is not None:
    return value + term_fn() if np.any(static != 0) else value
  nonzero = tf.reduce_any(tf.not_equal(grad, 0))
  if tf.executing_eagerly():
    return value + term_fn() if bool(nonzero) else value
  return tf.cond(nonzero, lambda: value + term_fn(), lambda: tf.identity(value))


@tf.RegisterGradient("RmsNorm")
def _rms_norm_grad(op, dy, d_inv_rms):
  """Gradients for x and gamma through the fused RmsNormGrad kernel, plus
  (when used) the gradient through the inv_rms output."""
  x, gamma = op.inputs
  inv_rms = op.outputs[1]
  if dy is None:
    dx, dgamma = tf.zeros_like(x), tf.zeros_like(gamma)
  else:
    dx, dgamma = gen_rms_norm_ops.rms_norm_grad(dy, x, gamma, inv_rms)
  if d_inv_rms is not None:
    dx = _add_if_nonzero(dx, d_inv_rms,
                         lambda: _inv_rms_term(x, inv_rms, d_inv_rms))
  return [dx, dgamma]


@tf.RegisterGradient("RmsNormGrad")
def _rms_norm_grad_grad(op, a, b):
  """Second-order gradients: RmsNormGrad's outputs are
    dx[j]     = r * g[j] * dy[j] - (r^3 / H) * x[j] * S,  S = sum_k g dy x
    dgamma[j] = sum over rows of dy[j] * x[j] * r
  (r = inv_rms, treated as an input; its own dependence on x flows back
  through RmsNorm's inv_rms gradient). With upstream gradients a (for dx)
  and b (for dgamma) and A = sum_k a[k] x[k], per row:
    d/d dy[j] = r * g[j] * a[j] - (r^3 / H) * A * g[j] * x[j] + r * b[j] * x[j]
    d/d x[j]  = -(r^3 / H) * (a[j] * S + A * g[j] * dy[j]) + r * b[j] * dy[j]
    d/d g[j]  = sum over rows of r * a[j] * dy[j] - (r^3 / H) * A * dy[j] * x[j]
    d/d r     = sum_j a[j] g[j] dy[j] - (3 r^2 / H) * S * A
                + sum_j b[j] dy[j] x[j]
  computed in the statistics type U."""
  dy, x, gamma, inv_rms = op.inputs
  t, u = x.dtype, inv_rms.dtype
  dy_u, x_u, g_u = tf.cast(dy, u), tf.cast(x, u), tf.cast(gamma, u)
  r = inv_rms[..., tf.newaxis]
  h = tf.cast(tf.shape(x)[-1], u)
  c = r * r * r / h
  lead_axes = tf.range(tf.rank(x) - 1)

  d_dy = tf.zeros_like(dy_u)
  d_x = tf.zeros_like(x_u)
  d_g = tf.zeros_like(g_u)
  d_r = tf.zeros_like(inv_rms)
  if a is not None:
    a_u = tf.cast(a, u)
    s = tf.reduce_sum(g_u * dy_u * x_u, axis=-1, keepdims=True)
    big_a = tf.reduce_sum(a_u * x_u, axis=-1, keepdims=True)
    d_dy += r * g_u * a_u - c * big_a * g_u * x_u
    d_x += -c * (a_u * s + big_a * g_u * dy_u)
    d_g += tf.reduce_sum(r * a_u * dy_u - c * big_a * dy_u * x_u,
                         axis=lead_axes)
    d_r += (tf.reduce_sum(a_u * g_u * dy_u, axis=-1)
            - 3.0 * tf.squeeze(r * r * s * big_a, -1) / h)
  if b is not None:
    b_u = tf.cast(b, u)
    d_dy += r * b_u * x_u
    d_x += r * b_u * dy_u
    d_r += tf.reduce_sum(b_u * dy_u * x_u, axis=-1)
  return [tf.cast(d_dy, t), tf.cast(d_x, t), tf.cast(d_g, t), d_r]


@keras.saving.register_keras_serializable(package="hpc_ops")
class RMSNorm(keras.layers.Layer):
  """Root-mean-square normalisation: a drop-in for
  `keras.layers.RMSNormalization` that runs hpc_ops' fused kernels.

  `y = x * rsqrt(mean(x^2 over axis) + epsilon) * scale`: the same weight
  (`scale`, initialised to ones, shaped like the normalised axes), the same
  math (statistics in float32 for 16-bit inputs) and the same config, so
  weights and configs move between the two layers unchanged.

  Differences: the TensorFlow backend only, and no XLA (`supports_jit` is
  False, so `model.compile(jit_compile="auto")` does not try it). Axes other
  than the trailing ones are moved to the end with a transpose and back (Keras'
  own layer broadcasts `scale` against the last axes in that case, which only
  works when the shapes happen to line up); `scale` is applied along the
  normalised axes.

  Args:
    axis: int or list of ints, the axes to normalise over (default -1).
    epsilon: added to the mean square before the square root; > 0.
  """

  def __init__(self, axis=-1, epsilon=1e-6, **kwargs):
    super().__init__(**kwargs)
    if keras.backend.backend() != "tensorflow":
      raise RuntimeError("hpc_ops.layers.RMSNorm needs the TensorFlow Keras "
                         "backend, got %r" % keras.backend.backend())
    if not epsilon > 0:
      raise ValueError("RMSNorm: epsilon must be > 0, got %r" % (epsilon,))
    self.axis = axis
    self.epsilon = epsilon
    self.supports_jit = False  # a custom op: no XLA kernel
    self._norm_axes = None

  def _normalized_axes(self, rank):
    axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
    if not axes:
      raise ValueError("RMSNorm: axis must name at least one axis")
    out = []
    for a in axes:
      if not isinstance(a, int) or a >= rank or a < -rank:
        raise ValueError("RMSNorm: axis %r is out of bounds for an input of "
                         "rank %d. Received: axis=%r" % (a, rank, self.axis))
      out.append(a % rank)
    if len(set(out)) != len(out):
      raise ValueError("RMSNorm: duplicate axes in axis=%r" % (self.axis,))
    return sorted(out)

  def build(self, input_shape):
    input_shape = tuple(input_shape)
    axes = self._normalized_axes(len(input_shape))
    shape = tuple(input_shape[a] for a in axes)
    if any(d is None for d in shape):
      raise ValueError("RMSNorm: the normalised axes %r of input shape %r must "
                       "have known sizes" % (self.axis, input_shape))
    self._norm_axes = axes
    self.scale = self.add_weight(name="scale", shape=shape,
                                 initializer="ones")
    self.built = True

  def call(self, x):
    x = tf.convert_to_tensor(x)
    rank = x.shape.rank
    axes = self._norm_axes
    scale = tf.reshape(tf.cast(self.scale, x.dtype), [-1])
    k = len(axes)
    trailing = axes == list(range(rank - k, rank))
    if not trailing:
      perm = [d for d in range(rank) if d not in axes] + axes
      x = tf.transpose(x, perm)
    if k == 1:
      y = rms_norm(x, scale, self.epsilon)
    else:
      shape = tf.shape(x)
      flat = tf.reshape(x, tf.concat([shape[:rank - k], [-1]], 0))
      y = tf.reshape(rms_norm(flat, scale, self.epsilon), shape)
    if not trailing:
      inverse = [perm.index(d) for d in range(rank)]
      y = tf.transpose(y, inverse)
    return y

  def compute_output_shape(self, input_shape):
    self._normalized_axes(len(input_shape))  # validates
    return input_shape

  def get_config(self):
    config = {"axis": self.axis, "epsilon": self.epsilon}
    return {**super().get_config(), **config}
