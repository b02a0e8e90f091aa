"""The zero_out op family: keep the first element, zero the rest."""
import tensorflow as tf

from hpc_ops import gen_zero_out_ops


def zero_out(x, name=None):
  """Returns a tensor shaped like `x`: x's first element, zeros elsewhere.

  Args:
    x: a tensor of int32, int64, float16, bfloat16, float32 or float64, of
      any shape (rank 0 and empty tensors included).
    name: an optional name for the op.
  """
  return gen_zero_out_ops.zero_out(x, name=name)


@tf.RegisterGradient("ZeroOut")
def _zero_out_grad(op, grad):
  """Only the first element passes its gradient through."""
  x = op.inputs[0]
  flat = tf.reshape(grad, [-1])
  mask = tf.one_hot(0, tf.size(flat), dtype=grad.dtype)
  return [tf.reshape(flat * mask, tf.shape(x))]
