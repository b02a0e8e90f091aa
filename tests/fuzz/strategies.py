"""Hypothesis strategies for malformed and edge-case op inputs."""
import numpy as np
from hypothesis import strategies as st
import tensorflow as tf

NUMERIC = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
           np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_,
           np.complex64]
FLOATS = [np.float16, np.float32, np.float64]
HUGE = 2**40  # a dim no real tensor can have: only used next to a 0 dim
INT64_MAX = np.iinfo(np.int64).max

# Every TF dtype an attr can name, including ones no kernel supports.
DTYPE_ENUMS = [d.as_datatype_enum for d in [
    tf.float16, tf.bfloat16, tf.float32, tf.float64, tf.int8, tf.int16,
    tf.int32, tf.int64, tf.uint8, tf.uint16, tf.uint32, tf.uint64, tf.bool,
    tf.string, tf.complex64, tf.complex128, tf.resource, tf.variant]]


@st.composite
def shapes(draw, min_rank=0, max_rank=6, max_dim=10):
  """Ranks 0-6, dims 0-10; sometimes a huge dim beside a zero dim (an empty
  tensor whose dims multiply past int64 if the kernel forgets the zero)."""
  rank = draw(st.integers(min_rank, max_rank))
  dims = [draw(st.integers(0, max_dim)) for _ in range(rank)]
  budget = 1
  for i, d in enumerate(dims):  # keep tensors small
    if budget * max(d, 1) > 4096:
      dims[i] = 1
    budget *= max(dims[i], 1)
  if rank >= 2 and draw(st.integers(0, 9)) == 0:
    i, j = draw(st.permutations(range(rank)))[:2]
    dims[i], dims[j] = 0, HUGE
  return tuple(dims)


def _fill(draw, dtype, shape):
  n = int(np.prod(shape)) if all(d < HUGE for d in shape) else 0
  dtype = np.dtype(dtype)
  if n == 0:
    return np.zeros(shape if all(d < HUGE for d in shape) else
                    tuple(0 if d == HUGE else d for d in shape), dtype)
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  if dtype.kind == "f":
    x = rng.normal(size=n) * draw(st.sampled_from([1.0, 1e-30, 1e30]))
    special = draw(st.sampled_from([None, np.nan, np.inf, -np.inf, 0.0]))
    if special is not None:
      x[rng.integers(0, n, size=max(1, n // 4))] = special
    with np.errstate(over="ignore"):  # 1e30 -> inf in float16 is intended
      return x.astype(dtype).reshape(shape)
  if dtype.kind == "c":
    return (rng.normal(size=n) + 1j * rng.normal(size=n)).astype(dtype).reshape(shape)
  if dtype.kind == "b":
    return rng.integers(0, 2, size=n).astype(dtype).reshape(shape)
  info = np.iinfo(dtype)
  edge = np.array([0, 1, info.max, info.min] + ([-1] if info.min < 0 else []),
                  dtype=dtype)
  x = rng.integers(max(info.min, -1000), min(info.max, 1000), size=n).astype(dtype)
  return np.where(rng.random(n) < 0.2, rng.choice(edge, size=n), x).reshape(shape)


@st.composite
def arrays(draw, dtypes=NUMERIC, min_rank=0, max_rank=6, shape=None):
  dtype = draw(st.sampled_from(dtypes))
  shp = shape if shape is not None else draw(shapes(min_rank, max_rank))
  if any(d == HUGE for d in shp):
    # numpy can't make it: use TF, which allows an empty tensor of any dims.
    return tf.zeros(shp, tf.as_dtype(dtype))
  return _fill(draw, dtype, shp)


@st.composite
def ids(draw, num_rows=None, max_rank=3):
  """int64 ids with the classic bad ones: -1, N, INT64_MAX, INT64_MIN."""
  shp = draw(shapes(0, max_rank))
  if any(d == HUGE for d in shp):
    return tf.zeros(shp, tf.int64)
  n = int(np.prod(shp))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  bad = [-1, INT64_MAX, np.iinfo(np.int64).min]
  if num_rows is not None:
    bad.append(num_rows)
  x = rng.integers(0, 100, size=n)
  mask = rng.random(n) < 0.2
  x = np.where(mask, rng.choice(np.array(bad, np.int64), size=n), x)
  return x.astype(np.int64).reshape(shp)


def dtype_attr():
  return st.sampled_from(DTYPE_ENUMS)


def float_attr():
  """A float attr such as epsilon: half the time a usual positive value (so
  the kernel runs), half the time 0, a negative, NaN, +-Inf, a denormal or
  a huge value."""
  return st.one_of(
      st.sampled_from([1e-6, 1e-5, 1e-3]),
      st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf"),
                       1e-45, 1e38]))
