"""Fuzz spec for the rms_norm family: RmsNorm and RmsNormGrad with inputs
that usually fit together (so the kernels run, on NaN/Inf/huge values and
empty rows) and sometimes do not (ranks, lengths, dtypes, U, epsilon)."""
import numpy as np
import strategies
import tensorflow as tf
from fuzz_ops import OpSpec
from hypothesis import strategies as st

_FLOAT_TYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]


def _as(draw, array, dtype):
  """`array` as a tensor of `dtype` (bfloat16 has no numpy type)."""
  if isinstance(array, tf.Tensor):
    return tf.cast(array, dtype) if array.dtype.is_floating else array
  return tf.cast(tf.constant(array), dtype)


def _stat_type(draw, t):
  if draw(st.integers(0, 3)) == 0:
    return draw(strategies.dtype_attr())
  return (tf.float64 if t == tf.float64 else tf.float32).as_datatype_enum


@st.composite
def _x_and_gamma(draw):
  x = draw(strategies.arrays(dtypes=strategies.FLOATS + [np.int32]))
  dtype = draw(st.sampled_from(_FLOAT_TYPES))
  shape = tuple(x.shape)
  fits = draw(st.integers(0, 3)) != 0
  if fits and len(shape) >= 1:
    h = shape[-1]
    gamma = strategies._fill(draw, np.float32, (h,))
  else:
    gamma = draw(strategies.arrays(dtypes=strategies.FLOATS, max_rank=2))
  if draw(st.integers(0, 5)) != 0:  # usually a type the kernels take
    x, gamma = _as(draw, x, dtype), _as(draw, gamma, dtype)
  t = (x.dtype if isinstance(x, tf.Tensor) else tf.as_dtype(x.dtype))
  return x, gamma, t, fits


@st.composite
def _forward_case(draw):
  x, gamma, t, _ = draw(_x_and_gamma())
  attrs = ("T", t.as_datatype_enum, "U", _stat_type(draw, t),
           "epsilon", draw(strategies.float_attr()))
  return [x, gamma], attrs


@st.composite
def _grad_case(draw):
  x, gamma, t, fits = draw(_x_and_gamma())
  shape = tuple(x.shape)
  u = tf.float64 if t == tf.float64 else tf.float32
  if fits and draw(st.booleans()):
    dy = _as(draw, strategies._fill(draw, np.float32, shape), t) \
        if t.is_floating else x
    inv_rms = _as(draw, strategies._fill(draw, np.float32, shape[:-1]), u)
  else:
    dy = _as(draw, draw(strategies.arrays(dtypes=strategies.FLOATS)), t) \
        if t.is_floating else x
    inv_rms = _as(draw, draw(strategies.arrays(dtypes=strategies.FLOATS,
                                               max_rank=3)), u)
  attrs = ("T", t.as_datatype_enum, "U", _stat_type(draw, t))
  return [dy, x, gamma, inv_rms], attrs


SPECS = [OpSpec("RmsNorm", _forward_case(), num_outputs=2),
         OpSpec("RmsNormGrad", _grad_case(), num_outputs=2)]
