"""Fuzz spec for the collective family: HpcAllreduce, HpcGroupedAllreduce,
HpcBroadcast,
HpcAllgather, HpcRank, HpcSize, HpcLocalRank.

The fuzzer runs as one process (a job of size 1), so a well-formed call
completes at once; a call that waited for a partner that never comes would
hang, and fuzz_ops.py's per-case watchdog turns that into a failure. Inputs:
every dtype (the six the kernels take, plus others that must be refused),
ranks 0-6 with empty and huge-beside-zero dims, NaN/Inf, T that does not
match the tensor, reduce_op strings that are not in the enum, root_rank of
-1, 1 (out of range for size 1), INT32_MAX and past int32, and tensor_name
of any text (empty, '#', very long, non-UTF-8 bytes).
"""
import numpy as np
import strategies
import tensorflow as tf
from fuzz_ops import OpSpec
from hypothesis import strategies as st

_KERNEL_TYPES = [tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32,
                 tf.float64]
_OTHER_TYPES = [np.int8, np.uint8, np.uint16, np.uint64, np.bool_,
                np.complex64]
_REDUCE_OPS = ["sum", "average", "min", "max", "product"]
_BAD_REDUCE_OPS = ["", "mean", "SUM", "sum ", "sum\x00", "avg", "prod",
                   "\u00e9", "x" * 300]
_ROOTS = [0, 0, 0, 1, 2, -1, -2**31, 2**31 - 1, 2**31, 2**40]


@st.composite
def _tensor(draw, min_rank=0):
  """A tensor of a kernel type (usually) or another type."""
  if draw(st.integers(0, 7)) == 0:
    return draw(strategies.arrays(dtypes=_OTHER_TYPES, min_rank=min_rank))
  x = draw(strategies.arrays(dtypes=[np.float32, np.float64, np.int32,
                                     np.int64], min_rank=min_rank))
  dtype = draw(st.sampled_from(_KERNEL_TYPES))
  x = x if isinstance(x, tf.Tensor) else tf.constant(x)
  return tf.cast(x, dtype)


def _type_attr(draw, x):
  """T: usually the tensor's type, sometimes any (or no kernel's) type."""
  if draw(st.integers(0, 4)) == 0:
    return draw(strategies.dtype_attr())
  return tf.as_dtype(x.dtype).as_datatype_enum


def _name(draw):
  return draw(st.one_of(
      st.sampled_from(["", "#", "#0", "a#1", "fuzz", "x" * 10000]),
      st.text(max_size=16),
      st.binary(max_size=8)))


@st.composite
def _allreduce_case(draw):
  x = draw(_tensor())
  reduce_op = draw(st.sampled_from(_REDUCE_OPS + _BAD_REDUCE_OPS)
                   if draw(st.integers(0, 3)) == 0
                   else st.sampled_from(_REDUCE_OPS))
  return [x], ("T", _type_attr(draw, x), "reduce_op", reduce_op,
               "tensor_name", _name(draw))


@st.composite
def _grouped_allreduce_case(draw):
  """Three tensors (the spec's output count), usually of one type."""
  xs = [draw(_tensor()) for _ in range(3)]
  if draw(st.integers(0, 3)):
    xs = [tf.cast(x, xs[0].dtype) if x.dtype in _KERNEL_TYPES else x
          for x in xs]
  reduce_op = draw(st.sampled_from(["sum", "average"] + _REDUCE_OPS[2:] +
                                   _BAD_REDUCE_OPS[:3]))
  return xs, ("N", 3, "T", _type_attr(draw, xs[0]), "reduce_op", reduce_op,
              "tensor_name", _name(draw))


@st.composite
def _broadcast_case(draw):
  x = draw(_tensor())
  return [x], ("T", _type_attr(draw, x), "root_rank",
               draw(st.sampled_from(_ROOTS)), "tensor_name", _name(draw))


@st.composite
def _allgather_case(draw):
  x = draw(_tensor())
  return [x], ("T", _type_attr(draw, x), "tensor_name", _name(draw))


@st.composite
def _info_case(draw):
  """No inputs and no attrs; sometimes a stray attr. Never a stray input:
  TensorFlow's eager runtime itself segfaults when an input is added to an
  op that declares none (EagerOperation::MaybeInferSingleInputAttrs; its own
  Timestamp op does the same), so that is not a case about our kernels."""
  attrs = ()
  if draw(st.integers(0, 3)) == 0:
    attrs = ("T", draw(strategies.dtype_attr()))
  return [], attrs


def _load():
  # hpc_ops loads the collective library lazily (hpc_ops.distributed).
  import hpc_ops.collective  # noqa: F401


SPECS = [
    OpSpec("HpcAllreduce", _allreduce_case(), num_outputs=1, setup=_load),
    OpSpec("HpcGroupedAllreduce", _grouped_allreduce_case(), num_outputs=3,
           setup=_load),
    OpSpec("HpcBroadcast", _broadcast_case(), num_outputs=1, setup=_load),
    OpSpec("HpcAllgather", _allgather_case(), num_outputs=1, setup=_load),
    OpSpec("HpcRank", _info_case(), num_outputs=1, setup=_load),
    OpSpec("HpcSize", _info_case(), num_outputs=1, setup=_load),
    OpSpec("HpcLocalRank", _info_case(), num_outputs=1, setup=_load),
]
