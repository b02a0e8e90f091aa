"""Error messages name the op, the input and what was expected: shape
functions (graph construction, where TensorFlow raises ValueError) and the
kernels' run-time checks (eager), for the families whose shape functions
used to return TensorFlow's generic "Shapes must be equal rank" messages."""
import shutil

import numpy as np
import pytest
import tensorflow as tf

from hpc_ops import gen_sparse_table_ops as st

v1 = tf.compat.v1


def graph_error(build):
  """The message of the error raised while building `build`'s ops."""
  with tf.Graph().as_default():
    with pytest.raises(ValueError) as info:
      build()
  return str(info.value)


def handle(shape=()):
  return v1.placeholder(tf.resource, shape=shape)


def ph(dtype, shape):
  return v1.placeholder(dtype, shape=shape)


F, I = tf.float32, tf.int64

# (build, fragments that must all appear in the message)
SPARSE_TABLE_SHAPE_ERRORS = {
    "push_grads": (
        lambda: st.sparse_table_push(handle(), ph(I, [4]), ph(F, [4, 8, 2]),
                                     ph(F, [])),
        ["SparseTablePush: grads shape [4,8,2] does not match keys shape [4] "
         "+ [dim]"]),
    "push_grads_rows": (
        lambda: st.sparse_table_push(handle(), ph(I, [4]), ph(F, [3, 8]),
                                     ph(F, [])),
        ["SparseTablePush: grads shape [3,8] does not match keys shape [4]"]),
    "push_shared_grads": (
        lambda: st.sparse_table_push(handle(), ph(I, [4, 3]), ph(F, [4, 3, 8]),
                                     ph(F, []), shared_grads=True),
        ["SparseTablePush: grads shape [4,3,8] does not match keys shape "
         "[4,3] without its last axis + [dim] (shared_grads)"]),
    "push_shared_grads_scalar_keys": (
        lambda: st.sparse_table_push(handle(), ph(I, []), ph(F, [8]),
                                     ph(F, []), shared_grads=True),
        ["SparseTablePush: keys must have rank >= 1 with shared_grads"]),
    "push_mean_without_shared_grads": (
        lambda: st.sparse_table_push(handle(), ph(I, [4]), ph(F, [4, 8]),
                                     ph(F, []), combiner="mean"),
        ["SparseTablePush: combiner 'mean' needs shared_grads"]),
    "push_learning_rate": (
        lambda: st.sparse_table_push(handle(), ph(I, [4]), ph(F, [4, 8]),
                                     ph(F, [2])),
        ["SparseTablePush: learning_rate must have rank 0, got shape [2]"]),
    "pull_handle": (
        lambda: st.sparse_table_pull(handle([2]), ph(I, [4]), dim=8),
        ["SparseTablePull: table_handle must be a scalar resource, got shape "
         "[2]"]),
    "pull_combiner_scalar_keys": (
        lambda: st.sparse_table_pull(handle(), ph(I, []), dim=8,
                                     combiner="mean"),
        ["SparseTablePull: combiner 'mean' needs keys of rank >= 1 (their "
         "last axis is combined), got a scalar"]),
    "pull_ragged_keys": (
        lambda: st.sparse_table_pull_ragged(handle(), ph(I, [4, 2]),
                                            ph(I, [3]), dim=8),
        ["SparseTablePullRagged: keys must have rank 1, got shape [4,2]"]),
    "pull_ragged_splits": (
        lambda: st.sparse_table_pull_ragged(handle(), ph(I, [4]),
                                            ph(I, []), dim=8),
        ["SparseTablePullRagged: row_splits must have rank 1, got shape []"]),
    "push_ragged_keys": (
        lambda: st.sparse_table_push_ragged(handle(), ph(I, [4, 2]),
                                            ph(I, [3]), ph(F, [2, 8]),
                                            ph(F, [])),
        ["SparseTablePushRagged: keys must have rank 1, got shape [4,2]"]),
    "push_ragged_grads_rank": (
        lambda: st.sparse_table_push_ragged(handle(), ph(I, [4]), ph(I, [3]),
                                            ph(F, [8]), ph(F, [])),
        ["SparseTablePushRagged: grads must have rank 2, got shape [8]"]),
    "push_ragged_grads_rows": (
        lambda: st.sparse_table_push_ragged(handle(), ph(I, [4]), ph(I, [3]),
                                            ph(F, [3, 8]), ph(F, [])),
        ["SparseTablePushRagged: grads shape [3,8] does not match the rows of "
         "row_splits shape [3] + [dim]"]),
    "push_ragged_learning_rate": (
        lambda: st.sparse_table_push_ragged(handle(), ph(I, [4]), ph(I, [3]),
                                            ph(F, [2, 8]), ph(F, [1])),
        ["SparseTablePushRagged: learning_rate must have rank 0, got shape "
         "[1]"]),
    "row_splits_indices": (
        lambda: st.sparse_table_row_splits(ph(I, [4]), ph(I, [2])),
        ["SparseTableRowSplits: indices must have rank 2, got shape [4]"]),
    "row_splits_dense_shape": (
        lambda: st.sparse_table_row_splits(ph(I, [4, 2]), ph(I, [2, 1])),
        ["SparseTableRowSplits: dense_shape must have rank 1, got shape "
         "[2,1]"]),
    "row_splits_rank": (
        lambda: st.sparse_table_row_splits(ph(I, [4, 2]), ph(I, [3])),
        ["SparseTableRowSplits: indices shape [4,2] does not match "
         "dense_shape shape [3] (one column per axis)"]),
    "size_handle": (
        lambda: st.sparse_table_size(handle([1, 1])),
        ["SparseTableSize: table_handle must be a scalar resource"]),
    "export_handle": (
        lambda: st.sparse_table_export(handle([3])),
        ["SparseTableExport: table_handle must be a scalar resource"]),
    "import_keys": (
        lambda: st.sparse_table_import(handle(), ph(I, [2, 2]), ph(F, [2, 4]),
                                       ph(F, [2, 1, 4]), ph(I, [2, 0]),
                                       ph(I, [])),
        ["SparseTableImport: keys must have rank 1, got shape [2,2]"]),
    "import_step": (
        lambda: st.sparse_table_import(handle(), ph(I, [2]), ph(F, [2, 4]),
                                       ph(F, [2, 1, 4]), ph(I, [2, 0]),
                                       ph(I, [1])),
        ["SparseTableImport: step must have rank 0, got shape [1]"]),
    "import_values_rows": (
        lambda: st.sparse_table_import(handle(), ph(I, [2]), ph(F, [3, 4]),
                                       ph(F, [2, 1, 4]), ph(I, [2, 0]),
                                       ph(I, [])),
        ["SparseTableImport: values shape [3,4] must have one row per key "
         "(keys shape [2])"]),
    "import_counters_rows": (
        lambda: st.sparse_table_import(handle(), ph(I, [2]), ph(F, [2, 4]),
                                       ph(F, [2, 1, 4]), ph(I, [5, 0]),
                                       ph(I, [])),
        ["SparseTableImport: counters shape [5,0] must have one row per key"]),
    "import_slots_dim": (
        lambda: st.sparse_table_import(handle(), ph(I, [2]), ph(F, [2, 4]),
                                       ph(F, [2, 1, 5]), ph(I, [2, 0]),
                                       ph(I, [])),
        ["SparseTableImport: slots shape [2,1,5] must end in values' dim "
         "(values shape [2,4])"]),
    "import_admission_keys": (
        lambda: st.sparse_table_import_admission(handle(), ph(I, [2, 1]), ph(I, [2])),
        ["SparseTableImportAdmission: keys must have rank 1, got shape [2,1]"]),
    "import_admission_counts": (
        lambda: st.sparse_table_import_admission(handle(), ph(I, [2]), ph(I, [3])),
        ["SparseTableImportAdmission: counts shape [3] must have one count per key "
         "(keys shape [2])"]),
    "evict_min_frequency": (
        lambda: st.sparse_table_evict(handle(), ph(I, [2]), ph(I, [])),
        ["SparseTableEvict: min_frequency must have rank 0, got shape [2]"]),
    "evict_max_idle_steps": (
        lambda: st.sparse_table_evict(handle(), ph(I, []), ph(I, [1, 1])),
        ["SparseTableEvict: max_idle_steps must have rank 0"]),
    "unique_grads": (
        lambda: st.sparse_table_unique_grads(ph(I, [4, 2]), ph(F, [4, 8])),
        ["SparseTableUniqueGrads: grads shape [4,8] does not match keys shape "
         "[4,2] + [dim]"]),
}


@pytest.mark.parametrize("case", sorted(SPARSE_TABLE_SHAPE_ERRORS))
def test_sparse_table_shape_function_messages(case):
  build, fragments = SPARSE_TABLE_SHAPE_ERRORS[case]
  message = graph_error(build)
  for f in fragments:
    assert f in message, message


def test_sparse_table_shape_functions_accept_unknown_shapes():
  with tf.Graph().as_default():
    h = handle(None)
    st.sparse_table_push(h, ph(I, None), ph(F, None), ph(F, None))
    st.sparse_table_import(h, ph(I, None), ph(F, None), ph(F, None),
                           ph(I, None), ph(I, None))
    _, summed = st.sparse_table_unique_grads(ph(I, [None]), ph(F, [None, 8]))
    assert summed.shape.as_list() == [None, 8]


def test_sparse_table_push_kernel_message_matches_the_shape_function():
  # The run-time check (eager skips the shape function) names the table's dim.
  h = st.sparse_table_handle(dim=16, shared_name="test_errors_push")
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"SparseTablePush: grads shape \[4,8\] does not "
                           r"match keys shape \[4\] \+ \[dim=16\]"):
    st.sparse_table_push(h, tf.zeros([4], tf.int64), tf.zeros([4, 8]), 0.1)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"SparseTablePush: grads shape \[4,2,16\] does not "
                           r"match keys shape \[4,2\] without its last axis "
                           r"\+ \[dim=16\]"):
    st.sparse_table_push(h, tf.zeros([4, 2], tf.int64), tf.zeros([4, 2, 16]),
                         0.1, shared_grads=True)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"SparseTablePush: keys must have rank >= 1 with "
                           r"shared_grads, got shape \[\]"):
    st.sparse_table_push(h, tf.zeros([], tf.int64), tf.zeros([16]), 0.1,
                         shared_grads=True)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"SparseTablePush: combiner 'mean' needs "
                           r"shared_grads"):
    st.sparse_table_push(h, tf.zeros([4], tf.int64), tf.zeros([4, 16]), 0.1,
                         combiner="mean")


def test_sparse_table_pull_kernel_messages():
  h = st.sparse_table_handle(dim=4, shared_name="test_errors_pull")
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"SparseTablePull: combiner 'sum' needs keys of "
                           r"rank >= 1 \(their last axis is combined\), got a "
                           r"scalar"):
    st.sparse_table_pull(h, tf.constant(3, tf.int64), dim=4, combiner="sum")
  # An unknown combiner is refused by the op's attr list.
  with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                     match="combiner"):
    st.sparse_table_pull(h, tf.constant([3], tf.int64), dim=4,
                         combiner="max")


@pytest.mark.parametrize("splits, message", [
    ([1, 2, 4], "must start at 0 and end at the number of keys, 4, got 1 and 4"),
    ([0, 2, 5], "must start at 0 and end at the number of keys, 4, got 0 and 5"),
    ([0, 3, 2, 4], "must not decrease, got 3 then 2 at 1"),
    ([], "must have rank 1 and at least one element, got shape \\[0\\]"),
])
@pytest.mark.parametrize("op", ["SparseTablePullRagged",
                                "SparseTablePushRagged"])
def test_sparse_table_ragged_kernel_messages(op, splits, message):
  h = st.sparse_table_handle(dim=4, shared_name="test_errors_ragged")

  def call(keys, row_splits):
    if op == "SparseTablePullRagged":
      return st.sparse_table_pull_ragged(h, keys, row_splits, dim=4)
    rows = max(int(tf.size(row_splits)) - 1, 0)
    return st.sparse_table_push_ragged(h, keys, row_splits,
                                       tf.zeros([rows, 4]), 0.1)

  keys = tf.constant([1, 2, 3, 4], tf.int64)
  for dtype in (tf.int64, tf.int32):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=op + ": row_splits " + message):
      call(keys, tf.constant(splits, dtype))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=op + ": keys must have rank 1, got "
                           "shape \\[2,2\\]"):
    call(tf.reshape(keys, [2, 2]), tf.constant([0, 4], tf.int64))
  assert int(st.sparse_table_size(h)) == 0  # nothing was inserted


def test_sparse_table_push_ragged_grads_message():
  h = st.sparse_table_handle(dim=4, shared_name="test_errors_push_ragged")
  keys = tf.constant([1, 2, 3, 4], tf.int64)
  splits = tf.constant([0, 1, 4], tf.int32)
  for grads in (tf.zeros([3, 4]), tf.zeros([2, 5]), tf.zeros([2])):
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="SparseTablePushRagged: grads shape \\[%s\\] "
                             "does not match the 2 rows of row_splits "
                             "\\+ \\[dim=4\\]"
                             % ",".join(map(str, grads.shape))):
      st.sparse_table_push_ragged(h, keys, splits, grads, 0.1)
  assert int(st.sparse_table_size(h)) == 0
  st.sparse_table_push_ragged(h, keys, splits, tf.ones([2, 4]), 0.1)
  assert int(st.sparse_table_size(h)) == 4


@pytest.mark.parametrize("indices, dense_shape, message", [
    ([[0, 0], [2, 0], [1, 3]], [3, 4],
     "indices must be in row-major order \\(tf.sparse.reorder\\), got row "
     "2 then 1 at 2"),
    ([[0, 0], [3, 0]], [3, 4],
     "indices\\[1, 0\\] = 3 is not in \\[0, dense_shape\\[0\\] = 3\\)"),
    ([[-1, 0]], [3, 4],
     "indices\\[0, 0\\] = -1 is not in \\[0, dense_shape\\[0\\] = 3\\)"),
    (np.zeros([0, 2]), [-1, 4], "dense_shape\\[0\\] must be >= 0, got -1"),
    ([[0, 0]], [3], "indices must have shape \\[n, 1\\] \\(one column per "
                    "axis of dense_shape\\), got \\[1,2\\]"),
    (np.zeros([0, 0]), np.zeros([0]),
     "dense_shape must have rank 1 and at least one element, got shape "
     "\\[0\\]"),
])
def test_sparse_table_row_splits_kernel_messages(indices, dense_shape,
                                                 message):
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="SparseTableRowSplits: " + message):
    st.sparse_table_row_splits(tf.constant(indices, tf.int64),
                               tf.constant(dense_shape, tf.int64))


def test_sparse_table_row_splits_values():
  def splits(indices, dense_shape):
    return st.sparse_table_row_splits(
        tf.constant(indices, tf.int64, shape=[len(indices), len(dense_shape)]),
        tf.constant(dense_shape, tf.int64)).numpy().tolist()

  assert splits([[0, 1], [0, 7], [2, 0]], [4, 9]) == [0, 2, 2, 3, 3]
  assert splits([[1], [1]], [2]) == [0, 0, 2]
  assert splits([], [2, 5]) == [0, 0, 0]
  assert splits([], [0, 5]) == [0]
  with tf.Graph().as_default():
    assert st.sparse_table_row_splits(
        ph(I, [None, 2]), ph(I, [None])).shape.as_list() == [None]


@pytest.mark.skipif(shutil.which("mpicc") is None,
                    reason="the collective ops are not built")
def test_allgather_shape_function_message():
  from hpc_ops import gen_collective_ops
  message = graph_error(
      lambda: gen_collective_ops.hpc_allgather(ph(F, []), tensor_name="g"))
  assert ("HpcAllgather: tensor must have rank >= 1 (it is concatenated along "
          "dimension 0), got shape []") in message, message
  # Unknown rank is fine at graph construction.
  with tf.Graph().as_default():
    y = gen_collective_ops.hpc_allgather(ph(F, None), tensor_name="g")
    assert y.shape.rank is None
    y = gen_collective_ops.hpc_allgather(ph(F, [3, 5]), tensor_name="g")
    assert y.shape.as_list() == [None, 5]


@pytest.mark.parametrize("x", [np.float32(1.0), np.zeros([], np.int64)])
def test_allgather_kernel_message(x):
  if shutil.which("mpicc") is None:
    pytest.skip("the collective ops are not built")
  from hpc_ops import gen_collective_ops
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"HpcAllgather: tensor must have rank >= 1"):
    gen_collective_ops.hpc_allgather(x, tensor_name="test_errors")
