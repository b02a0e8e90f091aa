"""Fuzz spec for the zero_out family."""
import strategies
from fuzz_ops import OpSpec
from hypothesis import strategies as st


@st.composite
def _case(draw):
  x = draw(strategies.arrays())
  # T usually matches the input, sometimes names another (or no kernel's) type.
  if draw(st.booleans()):
    import tensorflow as tf
    t = tf.as_dtype(x.dtype).as_datatype_enum
  else:
    t = draw(strategies.dtype_attr())
  return [x], ("T", t)


SPECS = [OpSpec("ZeroOut", _case(), num_outputs=1)]
