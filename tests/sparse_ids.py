"""Multi-hot ids as a tf.SparseTensor with gaps in its columns, beside the
same ids as a tf.RaggedTensor: what the tests of sparse ids compare."""
import numpy as np
import tensorflow as tf


def sparse_ids_with_gaps(seed, rows, max_len, high):
  """(sparse, ragged): `rows` examples of 0 to max_len - 1 ids (the first,
  one inside and the last empty) drawn from [-high / 10, high); the
  negative ids are dropped from the sparse form with tf.sparse.retain,
  which leaves gaps in its columns (so tf.RaggedTensor.from_sparse refuses
  it), and from the ragged form with a boolean mask."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len, size=rows)
  lengths[[0, rows // 4, rows - 1]] = 0
  rt = tf.RaggedTensor.from_row_lengths(
      tf.constant(rng.integers(-(high // 10), high, size=lengths.sum()),
                  tf.int64), lengths)
  return (tf.sparse.retain(rt.to_sparse(), rt.flat_values >= 0),
          tf.ragged.boolean_mask(rt, rt >= 0))
