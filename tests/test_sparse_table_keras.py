"""SparseEmbedding (Keras 3) and embedding_lookup: outputs for dense, ragged
and sparse ids and every combiner, the gradient that pushes into the table
(exactly, through a tape, and in model.fit with the loss falling), the
push_transform hook, inference without inserts, config and checkpoints."""
import warnings

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import hpc_ops
from hpc_ops import sparse_table
from hpc_ops.layers import SparseEmbedding
from sparse_ids import sparse_ids_with_gaps
from table_snapshot import sorted_export


def rows(layer, ids):
  return layer.table.pull(np.asarray(ids, np.int64), insert_missing=False).numpy()


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_dense_ids_every_combiner(mode):
  layer = SparseEmbedding(3, seed=2)
  none_layer = SparseEmbedding(3, seed=2, table=layer.table)
  sum_layer = SparseEmbedding(3, combiner="sum", table=layer.table)
  mean_layer = SparseEmbedding(3, combiner="mean", table=layer.table)
  ids = np.array([[1, 2, 3], [3, 4, 4]], np.int64)
  for built in (none_layer, sum_layer, mean_layer):
    built.build((2, 3))  # variables are created outside tf.function

  def call(l, x):
    return l(x) if mode == "eager" else tf.function(l.__call__, autograph=False)(x)

  r = rows(layer, ids.ravel()).reshape(2, 3, 3)
  np.testing.assert_array_equal(call(none_layer, ids), r)
  np.testing.assert_allclose(call(sum_layer, ids), r.sum(axis=1), rtol=1e-6)
  np.testing.assert_allclose(call(mean_layer, ids), r.mean(axis=1), rtol=1e-6)
  # Rank-1 ids with a combiner: one id per example.
  np.testing.assert_allclose(sum_layer(np.array([7, 8])), rows(layer, [7, 8]), rtol=1e-6)
  assert layer.compute_output_shape((None, 3)) == (None, 3, 3)
  assert mean_layer.compute_output_shape((None, 3)) == (None, 3)


def test_ragged_and_sparse_ids():
  base = SparseEmbedding(2, seed=4)
  rt = tf.ragged.constant([[1, 2], [], [3, 3, 4]], dtype=tf.int64)
  r = {k: rows(base, [k])[0] for k in (1, 2, 3, 4)}
  out = SparseEmbedding(2, table=base.table)(rt)
  assert isinstance(out, tf.RaggedTensor)
  assert out.shape.as_list() == [3, None, 2]
  np.testing.assert_array_equal(out.flat_values, [r[1], r[2], r[3], r[3], r[4]])
  expected_sum = np.array([r[1] + r[2], [0, 0], 2 * r[3] + r[4]])
  expected_mean = np.array([(r[1] + r[2]) / 2, [0, 0], (2 * r[3] + r[4]) / 3])
  for ids in (rt, rt.to_sparse()):
    np.testing.assert_allclose(SparseEmbedding(2, combiner="sum", table=base.table)(ids),
                               expected_sum, rtol=1e-6)
    np.testing.assert_allclose(SparseEmbedding(2, combiner="mean", table=base.table)(ids),
                               expected_mean, rtol=1e-6)
  sp_out = SparseEmbedding(2, table=base.table)(rt.to_sparse())
  np.testing.assert_array_equal(sp_out.flat_values, out.flat_values)



def train_against_ragged_reduce(ids, combiner, C):
  """Two traced train steps (loss sum(out * C), Adagrad) of a
  SparseEmbedding on ragged ids and of the reference, a lookup of every id
  then TensorFlow's ragged reduce over the innermost axis (empty rows'
  mean set to 0). Per side: ([the outputs' flat values..., the table's
  export], the pull ops the step traced)."""

  def flat(x):
    return x.flat_values if isinstance(x, tf.RaggedTensor) else x

  def train(by_layer):
    layer = SparseEmbedding(4, combiner=combiner, optimizer="adagrad",
                            seed=3, learning_rate=0.5)
    layer.build(None)

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        if by_layer:
          out = layer(ids, training=True)
        else:
          rows = sparse_table.embedding_lookup(
              layer.table, ids.flat_values, layer.push_trigger)
          out = (tf.reduce_sum if combiner == "sum" else tf.reduce_mean)(
              ids.with_flat_values(rows), axis=ids.ragged_rank)
          out = tf.ragged.map_flat_values(
              lambda v: tf.where(tf.math.is_nan(v), 0.0, v), out)
        loss = tf.reduce_sum(flat(out) * C)
      tape.gradient(loss, layer.push_trigger)
      return out

    outs = [flat(step()).numpy() for _ in range(2)]
    pulls = {op.type for op in step.get_concrete_function().graph.get_operations()
             if op.type.startswith("SparseTablePull")}
    return outs + sorted_export(layer.table.export()), pulls

  return train(True), train(False)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("splits_dtype", [tf.int64, tf.int32])
def test_ragged_combiners_equal_tensorflows_ragged_reduce(combiner,
                                                          splits_dtype):
  """Ragged [batch, None] ids are combined by the pull itself
  (SparseTablePullRagged, not through RaggedTensor.value_rowids(), which is
  slow) and their gradients pushed a row per ragged row
  (SparseTablePushRagged): outputs and the pushes are bit for bit those
  of TensorFlow's ragged reduce_sum / reduce_mean (empty rows first and
  last included); ids of ragged rank 2 still combine their innermost
  rows."""
  rng = np.random.default_rng(7)
  lengths = rng.integers(0, 9, size=300)
  lengths[0] = 0
  lengths[-3:] = 0
  ids = tf.RaggedTensor.from_row_lengths(
      tf.constant(rng.integers(0, 500, size=lengths.sum()), tf.int64),
      tf.constant(lengths, splits_dtype))
  C = tf.constant(rng.normal(size=(300, 4)).astype(np.float32))
  (got, pulls), (want, _) = train_against_ragged_reduce(ids, combiner, C)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert pulls == {"SparseTablePullRagged"}
  nested = tf.RaggedTensor.from_row_lengths(ids, [2, 0, 298])
  out = SparseEmbedding(4, combiner=combiner, seed=3)(nested)
  assert isinstance(out, tf.RaggedTensor)
  assert out.shape.as_list() == [3, None, 4]
  np.testing.assert_array_equal(
      out.flat_values, SparseEmbedding(4, combiner=combiner, seed=3)(ids))

@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_sparse_ids_combine_and_train_as_their_ragged_rows(combiner):
  """Sparse [batch, cols] ids with a combiner (tf.io's VarLenFeature gives
  them) go through SparseTableRowSplits, not RaggedTensor.from_sparse:
  columns with gaps (ids dropped by tf.sparse.retain) are accepted, and
  the layer's outputs and trained table equal those of the same ids as a
  RaggedTensor bit for bit, in a traced train step; indices out of
  row-major order give a clean error naming tf.sparse.reorder."""
  sp, kept = sparse_ids_with_gaps(11, rows=200, max_len=9, high=300)
  with pytest.raises(tf.errors.InvalidArgumentError):
    tf.RaggedTensor.from_sparse(sp)  # not ragged-right: it has gaps
  C = tf.constant(np.random.default_rng(11).normal(size=(200, 4)).astype(
      np.float32))

  def train(ids, spec):
    layer = SparseEmbedding(4, combiner=combiner, optimizer="adagrad",
                            seed=3, learning_rate=0.5)
    layer.build(None)

    @tf.function(input_signature=[spec])
    def step(x):
      with tf.GradientTape() as tape:
        out = layer(x, training=True)
        loss = tf.reduce_sum(out * C)
      tape.gradient(loss, layer.push_trigger)
      return out

    outs = [step(ids).numpy() for _ in range(2)]
    return outs, sorted_export(layer.table.export())

  got = train(sp, tf.SparseTensorSpec([None, None], tf.int64))
  want = train(kept, tf.RaggedTensorSpec([None, None], tf.int64))
  for a, b in zip(got[0] + got[1], want[0] + want[1]):
    np.testing.assert_array_equal(a, b)
  assert got[1][0].size > 0
  unordered = tf.SparseTensor([[1, 0], [0, 0]], tf.constant([1, 2], tf.int64),
                              [2, 1])
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="SparseTableRowSplits: indices must be in "
                           "row-major order \\(tf.sparse.reorder\\), got row 1 "
                           "then 0 at 1"):
    SparseEmbedding(4, combiner=combiner)(unordered)
  np.testing.assert_array_equal(
      SparseEmbedding(4, combiner=combiner, seed=2)(tf.sparse.reorder(unordered)),
      SparseEmbedding(4, combiner=combiner, seed=2)(tf.constant([[2], [1]])))


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("with_transform", [False, True])
def test_ragged_combiner_pushes_a_row_per_ragged_row(combiner,
                                                     with_transform):
  """embedding_lookup(ragged ids, combiner=) pushes one gradient row per
  ragged row (SparseTablePushRagged), not a copy for each id, and leaves
  the table bit for bit as a lookup of every id's row reduced by
  TensorFlow's ragged reduce afterwards; a push_transform still sees every
  id's own row (a plain push)."""
  rng = np.random.default_rng(8)
  lengths = rng.integers(0, 7, size=64)
  lengths[[0, 30, 63]] = 0
  ids = tf.RaggedTensor.from_row_lengths(
      tf.constant(rng.integers(0, 40, size=lengths.sum()), tf.int64), lengths)
  C = tf.constant(rng.normal(size=(64, 3)).astype(np.float32))

  def train(fused):
    t = hpc_ops.SparseTable(
        3, optimizer="adagrad", seed=1,
        push_transform=(lambda k, g: (k, g * 2.0)) if with_transform else None)
    trigger = tf.Variable(0.0)

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        if fused:
          out = sparse_table.embedding_lookup(t, ids, trigger,
                                              combiner=combiner)
        else:
          rows = sparse_table.embedding_lookup(t, ids.flat_values, trigger)
          out = (tf.reduce_sum if combiner == "sum" else tf.reduce_mean)(
              ids.with_flat_values(rows), axis=1)
          out = tf.where(tf.math.is_nan(out), 0.0, out)  # empty rows' mean
        loss = tf.reduce_sum(out * C)
      return tape.gradient(loss, trigger)

    step()
    step()
    ops = {op.type for op in step.get_concrete_function().graph.get_operations()
           if op.type.startswith("SparseTablePush")}
    return sorted_export(t.export()), ops

  (fused, fused_ops), (ref, ref_ops) = train(True), train(False)
  for a, b in zip(fused, ref):
    np.testing.assert_array_equal(a, b)
  assert ref_ops == {"SparseTablePush"}
  assert fused_ops == {"SparseTablePush" if with_transform
                       else "SparseTablePushRagged"}


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_ids_of_ragged_rank_2_combine_their_innermost_rows(combiner):
  """[batch, None, None] ids: the innermost rows are combined by the ragged
  pull and pushed a row each, the outer rows kept: outputs and trained
  table bit for bit those of TensorFlow's reduce over the innermost axis
  after a lookup of every id. Ragged ids with a uniform inner axis
  ([batch, None, 3]) combine that axis, as dense ids do."""
  rng = np.random.default_rng(13)
  inner = rng.integers(0, 6, size=400)
  inner[[0, 9, 399]] = 0
  flat = tf.constant(rng.integers(0, 700, size=inner.sum()), tf.int64)
  cuts = np.sort(rng.integers(0, 401, size=99))
  cuts[0] = 0  # the first example and the 12th have no inner rows
  cuts[11] = cuts[10]
  outer = np.diff(np.concatenate([[0], cuts, [400]]))
  ids = tf.RaggedTensor.from_row_lengths(
      tf.RaggedTensor.from_row_lengths(flat, inner), outer)
  assert ids.ragged_rank == 2
  C = tf.constant(rng.normal(size=(400, 4)).astype(np.float32))
  (got, pulls), (want, ref_pulls) = train_against_ragged_reduce(
      ids, combiner, C)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  assert pulls == {"SparseTablePullRagged"}
  assert ref_pulls == {"SparseTablePull"}
  assert SparseEmbedding(4, combiner=combiner)(ids).shape.as_list() == [
      100, None, 4]
  # A uniform inner axis: combined like dense ids' last axis.
  layer = SparseEmbedding(4, combiner=combiner, seed=5)
  uniform = tf.RaggedTensor.from_row_lengths(
      tf.reshape(flat[:300], [100, 3]), [40, 0, 60])
  out = layer(uniform)
  assert out.shape.as_list() == [3, None, 4]
  np.testing.assert_array_equal(
      out.flat_values, layer(tf.reshape(flat[:300], [100, 3])))


def test_inference_does_not_insert_training_does():
  layer = SparseEmbedding(4, seed=1)
  layer(np.array([[1, 2]]))  # training=None: inference
  layer(np.array([[1, 2]]), training=False)
  assert int(layer.table.size()) == 0
  layer(np.array([[1, 2]]), training=True)
  assert int(layer.table.size()) == 2


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_tape_gradient_pushes_exactly(mode):
  """SGD table, lr 0.5, zero rows: after one gradient of loss = sum(out * C)
  the row of id k is -0.5 * (sum of C over k's occurrences)."""
  layer = SparseEmbedding(3, combiner=None, optimizer="sgd", learning_rate=0.5,
                          initializer="zeros")
  ids = tf.constant([[1, 2], [2, 2]], tf.int64)
  C = tf.constant(np.arange(12, dtype=np.float32).reshape(2, 2, 3))

  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(ids, training=True) * C)
    return tape.gradient(loss, layer.trainable_variables)

  grads = step() if mode == "eager" else tf.function(step)()
  assert [float(g) for g in grads] == [0.0]  # the trigger's gradient
  c = C.numpy()
  np.testing.assert_allclose(rows(layer, [1]), [-0.5 * c[0, 0]], rtol=1e-6)
  np.testing.assert_allclose(rows(layer, [2]), [-0.5 * (c[0, 1] + c[1, 0] + c[1, 1])],
                             rtol=1e-6)
  assert int(layer.table.export().step) == 1
  assert float(layer.push_trigger.numpy()) == 0.0


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("with_transform", [False, True])
def test_combiner_pushes_as_the_rows_reduced_after_the_pull(combiner,
                                                            with_transform):
  """embedding_lookup(..., combiner=) pushes one gradient row per example
  (shared_grads) and leaves the table bit for bit as a lookup of every
  key's row reduced afterwards (whose gradient copies the example's row to
  each key); a push_transform still sees every key's own row."""
  rng = np.random.default_rng(3)
  ids = tf.constant(rng.integers(0, 40, size=(64, 5)), tf.int64)
  C = tf.constant(rng.normal(size=(64, 3)).astype(np.float32))

  def train(fused):
    seen = []

    def transform(keys, grads):
      seen.append((keys, grads))
      return keys, grads * 2.0

    t = hpc_ops.SparseTable(3, optimizer="adagrad", seed=1,
                            push_transform=transform if with_transform else None)
    trigger = tf.Variable(0.0)

    @tf.function
    def step():
      with tf.GradientTape() as tape:
        if fused:
          out = sparse_table.embedding_lookup(t, ids, trigger, combiner=combiner)
        else:
          rows = sparse_table.embedding_lookup(t, ids, trigger)
          out = (tf.reduce_sum if combiner == "sum" else tf.reduce_mean)(
              rows, axis=1)
        loss = tf.reduce_sum(out * C)
      return tape.gradient(loss, trigger)

    step()
    pushes = [op for op in step.get_concrete_function().graph.get_operations()
              if op.type == "SparseTablePush"]
    flags = {op.get_attr("shared_grads") for op in pushes}
    return sorted_export(t.export()), flags, [tuple(x.shape) for x, _ in seen]

  (fused, fused_flags, fused_seen), (ref, ref_flags, ref_seen) = (
      train(True), train(False))
  for a, b in zip(fused, ref):
    np.testing.assert_array_equal(a, b)
  assert ref_flags == {False}
  assert fused_flags == {not with_transform}
  assert fused_seen == ref_seen  # traced once each, on the distinct keys
  assert len(fused[0]) == len(np.unique(ids.numpy())) and int(fused[4]) == 1


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("scale", [1.0, 1024.0, 3.0, 0.25])
def test_loss_scaling_pushes_the_unscaled_gradient(mode, scale):
  """A loss that includes layer.losses (the layer's zero probe) and is then
  scaled up, as a loss-scale optimizer does: the push applies the gradient
  of the unscaled loss (exactly for a power of two). A loss scaled down
  (0.25: divided for gradient accumulation, say) is pushed as it is, as the
  dense weights get it."""
  layer = SparseEmbedding(3, optimizer="sgd", learning_rate=0.5, initializer="zeros")
  ids = tf.constant([[1, 2], [2, 2]], tf.int64)
  C = tf.constant(np.arange(12, dtype=np.float32).reshape(2, 2, 3))

  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(ids, training=True) * C) + tf.add_n(layer.losses)
      scaled = loss * scale
    return tape.gradient(scaled, layer.trainable_variables), loss

  (grad,), loss = step() if mode == "eager" else tf.function(step)()
  assert float(grad) == 0.0 and len(layer.losses) == 1
  c = C.numpy() * min(scale, 1.0)
  assert float(loss) == 0.0  # zero rows; the probe adds 0
  rtol = 0 if scale != 3.0 else 1e-6
  np.testing.assert_allclose(rows(layer, [1]), [-0.5 * c[0, 0]], rtol=rtol)
  np.testing.assert_allclose(rows(layer, [2]), [-0.5 * (c[0, 1] + c[1, 0] + c[1, 1])],
                             rtol=rtol)


@pytest.mark.parametrize("scale", [1024.0, 0.25])
def test_loss_scaling_with_ragged_ids_pushes_the_unscaled_row_gradient(scale):
  """Ragged ids with a combiner push a gradient row per example
  (SparseTablePushRagged) through the same loss-scale handling: the
  gradient of the unscaled loss under a scale above 1, as it is below;
  nothing pushed (and a NaN for the trigger) when it overflowed."""
  layer = SparseEmbedding(3, combiner="sum", optimizer="sgd", learning_rate=0.5,
                          initializer="zeros")
  ids = tf.ragged.constant([[1, 2], [], [2, 2]], dtype=tf.int64)

  @tf.function
  def step(C):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(ids, training=True) * C) + tf.add_n(layer.losses)
      scaled = loss * scale
    return tape.gradient(scaled, layer.trainable_variables)[0]

  C = np.arange(9, dtype=np.float32).reshape(3, 3)
  assert float(step(tf.constant(C))) == 0.0
  c = C * min(scale, 1.0)
  np.testing.assert_array_equal(rows(layer, [1]), [-0.5 * c[0]])
  np.testing.assert_array_equal(rows(layer, [2]), [-0.5 * (c[0] + 2 * c[2])])
  C[2, 1] = np.inf
  if scale > 1:
    before = rows(layer, [1, 2])
    assert np.isnan(float(step(tf.constant(C))))
    np.testing.assert_array_equal(rows(layer, [1, 2]), before)
    assert int(layer.table.export().step) == 1


def test_mirrored_strategy_replicas_push_the_batch_gradient(fresh_python):
  """Two replicas of a tf.distribute.MirroredStrategy (two logical CPUs),
  each pushing its half of the batch into the one table: together the
  full batch's update, as with one replica (a loss linear in the rows, so
  the order of the replicas' pulls and pushes does not matter), in float32
  and under mixed_float16."""
  out = fresh_python("""
      import numpy as np, tensorflow as tf
      cpu = tf.config.list_physical_devices("CPU")[0]
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      import keras
      from hpc_ops.layers import SparseEmbedding
      rng = np.random.default_rng(0)
      ids = rng.integers(0, 20, size=(64, 3)).astype(np.int64)
      weight = rng.normal(size=(64, 1)).astype(np.float32)

      def run(strategy, policy):
        keras.mixed_precision.set_global_policy(policy)
        with strategy.scope():
          inp = keras.Input((3,), dtype="int64")
          emb = SparseEmbedding(4, combiner="sum", optimizer="sgd",
                                learning_rate=0.5, initializer="zeros")
          out = keras.layers.Dense(1, kernel_initializer="ones", use_bias=False,
                                   dtype="float32")(emb(inp))
          model = keras.Model(inp, out)
          model.compile(optimizer=keras.optimizers.SGD(0.0),
                        loss=lambda w, p: p * w)  # linear in the rows
        model.fit(ids, weight, batch_size=64, epochs=1, verbose=0, shuffle=False)
        assert model.distribute_strategy.num_replicas_in_sync == strategy.num_replicas_in_sync
        return emb.table.pull(np.arange(20), insert_missing=False).numpy()

      two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
      for policy in ("float32", "mixed_float16"):
        one_rows = run(tf.distribute.get_strategy(), policy)
        two_rows = run(two, policy)
        assert np.abs(one_rows).max() > 0.01
        np.testing.assert_allclose(two_rows, one_rows, rtol=1e-3, atol=1e-6)
      print("ok")
  """)
  assert out.stdout.strip().endswith("ok")


def test_float32_fit_logs_no_grappler_warning(fresh_python):
  """Without a loss scale the push's loss-scale branch has a constant
  predicate; Grappler must not be left to fold it (it then logs "Skipping
  loop optimization for Merge node with control input" at TensorFlow's
  default log level). The fit still trains the table."""
  out = fresh_python("""
      import numpy as np, keras
      from hpc_ops.layers import SparseEmbedding
      inp = keras.Input((3,), dtype="int64")
      emb = SparseEmbedding(4, combiner="mean", optimizer="adagrad",
                            initializer="zeros")
      model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
      model.compile("adam", "mse")
      ids = np.arange(96, dtype=np.int64).reshape(32, 3)
      model.fit(ids, np.ones((32, 1)), batch_size=8, epochs=1, verbose=0)
      print("rows", np.abs(emb.table.pull(ids, insert_missing=False)).max())
  """, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
  assert float(out.stdout.split()[-1]) > 0
  assert "loop_optimizer" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_loss_scaling_skips_a_push_that_overflowed(mode):
  """Under a loss scale, a gradient that is not finite is not pushed and
  the trigger's gradient is NaN (a loss-scale optimizer then skips the step
  and lowers its scale); without scaling it is pushed as before."""
  layer = SparseEmbedding(2, optimizer="sgd", learning_rate=0.5, initializer="zeros")
  ids = tf.constant([[1, 2]], tf.int64)
  C = tf.constant([[[1.0, 1.0], [np.inf, 1.0]]])
  layer(ids, training=True)  # rows exist

  def step(scale):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(layer(ids, training=True) * C) + tf.add_n(layer.losses)
      scaled = loss * scale
    return tape.gradient(scaled, layer.trainable_variables)[0]

  step = step if mode == "eager" else tf.function(step)
  assert np.isnan(float(step(tf.constant(256.0))))
  np.testing.assert_array_equal(rows(layer, [1, 2]), np.zeros((2, 2)))
  assert int(layer.table.export().step) == 0
  assert float(step(tf.constant(1.0))) == 0.0  # unscaled: pushed as it is
  assert rows(layer, [1])[0].tolist() == [-0.5, -0.5]
  assert int(layer.table.export().step) == 1


@pytest.fixture
def mixed_float16():
  keras.mixed_precision.set_global_policy("mixed_float16")
  yield
  keras.mixed_precision.set_global_policy("float32")


def test_model_fit_with_mixed_float16_and_loss_scaling(mixed_float16):
  """model.fit under mixed_float16 (Keras wraps the optimizer in a
  LossScaleOptimizer): the table gets the unscaled gradients (its rows match
  a float32 run's), and with a scale so large that the first steps overflow
  in float16, those steps push nothing and the scale comes down."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50, size=(256, 3)).astype(np.int64)
  y = (ids.sum(axis=1, keepdims=True) % 7 / 7.0).astype(np.float32)

  def fit(optimizer):
    keras.utils.set_random_seed(1)
    inp = keras.Input(shape=(3,), dtype="int64")
    emb = SparseEmbedding(4, combiner="sum", optimizer="sgd", learning_rate=0.2)
    model = keras.Model(inp, keras.layers.Dense(1, dtype="float32")(emb(inp)))
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(ids, y, batch_size=32, epochs=3, verbose=0, shuffle=False)
    return model, emb, history.history["loss"]

  model, emb, losses = fit(keras.optimizers.SGD(0.05))
  assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  mixed_rows = rows(emb, np.arange(50))
  keras.mixed_precision.set_global_policy("float32")
  _, emb32, _ = fit(keras.optimizers.SGD(0.05))
  np.testing.assert_allclose(mixed_rows, rows(emb32, np.arange(50)), atol=2e-3)

  keras.mixed_precision.set_global_policy("mixed_float16")
  optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05),
                                                  initial_scale=2.0 ** 28)
  model, emb, losses = fit(optimizer)
  assert all(np.isfinite(losses))
  assert np.isfinite(rows(emb, np.arange(50))).all()
  # 24 steps; each one skipped for overflow halved the scale and pushed nothing.
  skipped = int(np.log2(2.0 ** 28 / float(optimizer.dynamic_scale.numpy())))
  assert skipped > 0
  assert int(emb.table.export().step) == 24 - skipped


def test_embedding_lookup_with_gather_downstream_pushes_indexed_slices():
  t = hpc_ops.SparseTable(2, optimizer="sgd", learning_rate=1.0, initializer="zeros")
  trigger = tf.Variable(0.0)
  keys = tf.constant([10, 11, 12], tf.int64)
  with tf.GradientTape() as tape:
    v = sparse_table.embedding_lookup(t, keys, trigger)
    loss = tf.reduce_sum(tf.gather(v, [2, 2, 0]))  # IndexedSlices gradient
  tape.gradient(loss, trigger)
  np.testing.assert_array_equal(t.pull(keys).numpy(), [[-1, -1], [0, 0], [-2, -2]])


@pytest.mark.parametrize("keras_optimizer", ["adam", "sgd"])
def test_model_fit_trains_the_table(keras_optimizer):
  # Seeded: with some Dense initialisations plain SGD needs more epochs.
  keras.utils.set_random_seed(0)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 300, size=(1024, 4)).astype(np.int64)
  target_w = rng.normal(size=300)
  y = target_w[ids].mean(axis=1, keepdims=True).astype(np.float32)
  inp = keras.Input(shape=(4,), dtype="int64")
  emb = SparseEmbedding(8, combiner="mean", optimizer="adagrad", learning_rate=0.5, seed=1)
  model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
  dense_optimizer = {"adam": keras.optimizers.Adam(0.02),
                     "sgd": keras.optimizers.SGD(0.1)}[keras_optimizer]
  model.compile(optimizer=dense_optimizer, loss="mse")
  initial = hpc_ops.SparseTable(8, seed=1).pull(np.arange(300), insert_missing=False).numpy()
  hist = model.fit(ids, y, epochs=6, batch_size=64, verbose=0)
  losses = hist.history["loss"]
  assert losses[-1] < 0.5 * losses[0], losses
  seen = np.unique(ids)
  assert int(emb.table.size()) == len(seen)
  trained = rows(emb, seen)
  change = np.abs(trained - initial[seen]).max(axis=1)
  assert (change > 0).all() and np.median(change) > 0.01, change
  assert int(emb.table.export().step) == 6 * 1024 // 64
  assert float(emb.push_trigger.numpy()) == 0.0
  # Evaluation and prediction neither push nor insert.
  model.evaluate(ids[:64], y[:64], verbose=0)
  model.predict(np.array([[10**12, 1, 2, 3]], np.int64), verbose=0)
  assert int(emb.table.size()) == len(seen)
  assert int(emb.table.export().step) == 6 * 1024 // 64


@pytest.mark.parametrize("form", ["ragged", "sparse"])
def test_model_fit_with_ragged_ids(form):
  """model.fit on ragged [batch, None] ids, or the same ids as a
  tf.SparseTensor (keras.Input(sparse=True), as tf.io's VarLenFeature gives
  them), summed per example, some examples empty: the loss falls and every
  id gets a row."""
  rng = np.random.default_rng(1)
  lengths = rng.integers(0 if form == "sparse" else 1, 5, size=256)
  flat = rng.integers(0, 50, size=lengths.sum()).astype(np.int64)
  rt = tf.RaggedTensor.from_row_lengths(flat, lengths)
  w = rng.normal(size=50)
  y = np.array([w[r].sum() for r in np.split(flat, np.cumsum(lengths)[:-1])], np.float32)[:, None]
  inp = keras.Input(shape=(None,), dtype="int64", **{form: True})
  emb = SparseEmbedding(4, combiner="sum", optimizer="adagrad", learning_rate=0.3)
  model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
  model.compile(optimizer="adam", loss="mse")
  ds = tf.data.Dataset.from_tensor_slices((rt, y)).batch(32)
  if form == "sparse":
    ds = ds.map(lambda ids, label: (ids.to_sparse(), label))
  hist = model.fit(ds, epochs=5, verbose=0, shuffle=False)
  assert hist.history["loss"][-1] < 0.6 * hist.history["loss"][0], hist.history["loss"]
  assert int(emb.table.size()) == len(np.unique(flat))


def test_fit_with_steps_per_execution_or_run_eagerly_matches_the_default():
  """Several train steps per tf.function call, or none in a function, push
  the same gradients in the same order: the same losses, rows and dense
  weights as a default fit."""

  def fit(**compile_args):
    keras.utils.set_random_seed(1)
    inp = keras.Input(shape=(3,), dtype="int64")
    emb = SparseEmbedding(4, combiner="sum", seed=3)
    model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  **compile_args)
    x = np.random.default_rng(0).integers(0, 50, size=(64, 3))
    y = (x.sum(1, keepdims=True) % 3) / 2.0
    loss = model.fit(x, y, batch_size=8, epochs=3, verbose=0,
                     shuffle=False).history["loss"]
    return loss, sorted_export(emb.table.export()), model.get_weights()

  loss, rows, dense = fit()
  assert loss[-1] < 0.7 * loss[0], loss
  assert int(rows[4]) == 3 * 64 // 8  # one push per step
  for compile_args in ({"steps_per_execution": 4}, {"run_eagerly": True}):
    other_loss, other_rows, other_dense = fit(**compile_args)
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
    for a, b in zip(other_rows + other_dense, rows + dense):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_push_transform_sees_distinct_keys_and_summed_grads():
  calls = []

  def transform(keys, grads):
    calls.append((keys.numpy(), grads.numpy()))
    return keys, grads * 2.0

  t = hpc_ops.SparseTable(2, optimizer="sgd", learning_rate=1.0, initializer="zeros",
                          push_transform=transform)
  trigger = tf.Variable(0.0)
  keys = tf.constant([5, 3, 5, 5], tf.int64)
  C = tf.constant([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(sparse_table.embedding_lookup(t, keys, trigger) * C)
  tape.gradient(loss, trigger)
  assert len(calls) == 1
  np.testing.assert_array_equal(calls[0][0], [5, 3])
  np.testing.assert_array_equal(calls[0][1], [[13, 16], [3, 4]])
  np.testing.assert_array_equal(t.pull([5, 3]).numpy(), [[-26, -32], [-6, -8]])


def test_push_transform_runs_every_fit_step():
  counter = tf.Variable(0, dtype=tf.int64, trainable=False)

  def transform(keys, grads):
    with tf.control_dependencies([counter.assign_add(1)]):
      return tf.identity(keys), tf.identity(grads)

  inp = keras.Input(shape=(2,), dtype="int64")
  emb = SparseEmbedding(4, combiner="sum", push_transform=transform)
  model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
  model.compile(optimizer="adam", loss="mse")
  model.fit(np.arange(64).reshape(32, 2), np.ones((32, 1)), batch_size=8, epochs=2,
            verbose=0)
  assert int(counter.numpy()) == 8
  assert int(emb.table.export().step) == 8


def test_get_config_round_trip():
  layer = SparseEmbedding(6, combiner="mean", optimizer="ftrl", learning_rate=0.3,
                          optimizer_options={"l1": 0.01}, seed=9, name="emb")
  config = layer.get_config()
  clone = SparseEmbedding.from_config(config)
  clone_config = clone.get_config()
  assert clone.table is not layer.table  # a new table, outside a Keras load
  assert clone_config["table"].pop("shared_object_id") == id(clone.table)
  assert config["table"].pop("shared_object_id") == id(layer.table)
  assert clone_config == config
  assert config["table"]["config"]["optimizer"] == "ftrl"
  assert clone.table.optimizer_options["l1"] == pytest.approx(0.01)
  assert clone.table.optimizer_options["l2"] == 0.0


def test_config_with_the_table_arguments_beside_dim_loads():
  """The form configs took before the table was nested."""
  clone = SparseEmbedding.from_config({
      "name": "old", "dim": 3, "combiner": "sum", "optimizer": "adam", "seed": 4,
      "learning_rate": 0.2, "num_shards": 8})
  config = clone.table.get_config()
  assert (clone.dim, clone.combiner, clone.table.dim) == (3, "sum", 3)
  assert (config["optimizer"], config["seed"], config["num_shards"]) == ("adam", 4, 8)
  assert config["learning_rate"] == pytest.approx(0.2)


def test_keras_format_keeps_a_shared_table(tmp_path):
  """Two layers on one table (user and item ids in one id space) load from
  .keras on one table again, with its rows; two loads do not share."""
  users = keras.Input(shape=(2,), dtype="int64")
  items = keras.Input(shape=(3,), dtype="int64")
  user_emb = SparseEmbedding(4, combiner="sum", optimizer="adam", seed=2, name="user")
  item_emb = SparseEmbedding(4, combiner="mean", table=user_emb.table, name="item")
  alone = SparseEmbedding(4, combiner="sum", name="alone")
  merged = keras.layers.Concatenate()([user_emb(users), item_emb(items), alone(users)])
  model = keras.Model([users, items], keras.layers.Dense(1)(merged))
  model.compile(optimizer="adam", loss="mse")
  data = [np.arange(40).reshape(20, 2), np.arange(60).reshape(20, 3) + 30]
  model.fit(data, np.ones((20, 1)), epochs=2, verbose=0)
  assert int(user_emb.table.size()) == 90
  probe = [np.array([[0, 1], [35, 89]]), np.array([[30, 31, 32], [0, 1, 500]])]
  expected = model.predict(probe, verbose=0)

  model.save(str(tmp_path / "m.keras"))
  first = keras.models.load_model(str(tmp_path / "m.keras"))
  second = keras.models.load_model(str(tmp_path / "m.keras"))
  for loaded in (first, second):
    user, item = loaded.get_layer("user"), loaded.get_layer("item")
    assert user.table is item.table
    assert loaded.get_layer("alone").table is not user.table
    assert int(user.table.size()) == 90
    np.testing.assert_array_equal(loaded.predict(probe, verbose=0), expected)
  assert first.get_layer("user").table is not second.get_layer("user").table
  # Training the loaded model grows one table through both layers.
  first.fit([d + 1000 for d in data], np.ones((20, 1)), epochs=1, verbose=0)
  assert int(first.get_layer("item").table.size()) == 180
  assert int(first.get_layer("user").table.size()) == 180
  assert int(second.get_layer("user").table.size()) == 90

  # The shared table is stored once (with the first layer), the other once.
  weights = str(tmp_path / "w.weights.h5")
  model.save_weights(weights)
  with h5py.File(weights, "r") as f:
    stored = []
    f.visit(lambda name: stored.append(name) if name.endswith("/keys") else None)
  assert len(stored) == 2, stored
  # A model built with the layers on one table loads it; one where they
  # have a table each is refused (the item layer's contents are elsewhere).
  for shared in (True, False):
    u = keras.Input(shape=(2,), dtype="int64")
    i = keras.Input(shape=(3,), dtype="int64")
    ue = SparseEmbedding(4, combiner="sum", optimizer="adam", seed=2)
    ie = SparseEmbedding(4, combiner="mean", optimizer="adam", seed=2,
                         table=ue.table if shared else None)
    out = keras.layers.Concatenate()(
        [ue(u), ie(i), SparseEmbedding(4, combiner="sum")(u)])
    rebuilt = keras.Model([u, i], keras.layers.Dense(1)(out))
    if shared:
      rebuilt.load_weights(weights)
      assert int(ue.table.size()) == 90
      np.testing.assert_array_equal(rebuilt.predict(probe, verbose=0), expected)
    else:
      with pytest.raises(ValueError, match="another layer that shared the table"):
        rebuilt.load_weights(weights)


def test_keras_weights_of_separate_tables_refused_on_a_shared_one(tmp_path):
  """Weights saved from two layers with a table each, loaded into a model
  where those layers share one table, are refused (the first layer's
  table would load and the second's be skipped); a model with a table per
  layer loads them, in either order of loading."""

  def build(shared):
    u = keras.Input(shape=(2,), dtype="int64")
    i = keras.Input(shape=(2,), dtype="int64")
    ue = SparseEmbedding(4, combiner="sum", name="user")
    ie = SparseEmbedding(4, combiner="sum", name="item",
                         table=ue.table if shared else None)
    out = keras.layers.Concatenate()([ue(u), ie(i)])
    return keras.Model([u, i], keras.layers.Dense(1)(out)), ue, ie

  model, ue, ie = build(shared=False)
  model.compile(optimizer="adam", loss="mse")
  data = [np.arange(40).reshape(20, 2), np.arange(40).reshape(20, 2) + 100]
  model.fit(data, np.ones((20, 1)), epochs=2, verbose=0)
  assert int(ue.table.size()) == 40 and int(ie.table.size()) == 40
  weights = str(tmp_path / "w.weights.h5")
  model.save_weights(weights)

  shared, se, _ = build(shared=True)
  with pytest.raises(ValueError, match="'item'.* a table of its own"):
    shared.load_weights(weights)
  # Not a leftover of the refused load: a model on separate tables loads.
  for _ in range(2):
    separate, sue, sie = build(shared=False)
    separate.load_weights(weights)
    assert sorted_export(sue.table.export())[0].tolist() == list(range(40))
    assert sorted_export(sie.table.export())[0].tolist() == list(
        range(100, 140))
  # Weights saved from the shared model load into it again.
  se.table.pull(tf.constant([7, 8], tf.int64))
  shared.save_weights(str(tmp_path / "s.weights.h5"))
  again, ae, ai = build(shared=True)
  again.load_weights(str(tmp_path / "s.weights.h5"))
  assert ae.table is ai.table and int(ae.table.size()) >= 2


def test_tf_checkpoint_of_a_model_restores_the_table(tmp_path):
  inp = keras.Input(shape=(2,), dtype="int64")
  emb = SparseEmbedding(4, combiner="sum")
  model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
  model.compile(optimizer="adam", loss="mse")
  model.fit(np.arange(40).reshape(20, 2), np.ones((20, 1)), epochs=1, verbose=0)
  saved = emb.table.export()
  ckpt = tf.train.Checkpoint(model=model)
  path = ckpt.save(str(tmp_path / "model"))
  model.fit(np.arange(40, 80).reshape(20, 2), np.ones((20, 1)), epochs=1, verbose=0)
  assert int(emb.table.size()) == 80
  ckpt.restore(path)
  restored = emb.table.export()
  for a, b in zip(saved, restored):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_keras_formats_keep_the_table(tmp_path):
  def build():
    inp = keras.Input(shape=(2,), dtype="int64")
    emb = SparseEmbedding(4, combiner="sum", optimizer="adam",
                          admission_min_count=3, seed=3)
    return keras.Model(inp, keras.layers.Dense(1)(emb(inp))), emb

  def state(layer):
    adm = layer.table.export_admission()
    adm_order = np.argsort(adm.keys.numpy())
    return sorted_export(layer.table.export()) + [
        adm.keys.numpy()[adm_order], adm.counts.numpy()[adm_order]]

  model, emb = build()
  model.compile(optimizer="adam", loss="mse")
  ids = np.arange(40).reshape(20, 2)
  model.fit(ids, np.ones((20, 1)), epochs=3, verbose=0)  # every id admitted
  model(np.array([[100, 101], [100, 102]]), training=True)  # counted only
  saved = state(emb)
  assert len(saved[0]) == 40 and int(saved[4]) > 0
  assert saved[5].tolist() == [100, 101, 102] and saved[6].tolist() == [2, 1, 1]
  probe = np.array([[0, 1], [38, 39], [100, 500]])
  expected = model.predict(probe, verbose=0)

  model.save(str(tmp_path / "m.keras"))
  loaded = keras.models.load_model(str(tmp_path / "m.keras"))
  layer = [l for l in loaded.layers if isinstance(l, SparseEmbedding)][0]
  for a, b in zip(saved, state(layer)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.predict(probe, verbose=0), expected)

  model.save_weights(str(tmp_path / "w.weights.h5"))
  other, other_emb = build()
  other.load_weights(str(tmp_path / "w.weights.h5"))
  for a, b in zip(saved, state(other_emb)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(other.predict(probe, verbose=0), expected)


def _save_in_an_earlier_form(model, path, monkeypatch, with_table):
  """save_weights as earlier versions wrote it: the table's contents as
  "table.<name>" entries beside the layer's weight, or none at all."""

  def save_own_variables(layer, store):
    keras.layers.Layer.save_own_variables(layer, store)
    if with_table:
      for name, value in layer.table._serialize_to_tensors().items():
        store["table." + name] = value.numpy()

  with monkeypatch.context() as m:
    m.setattr(SparseEmbedding, "save_own_variables", save_own_variables)
    m.setattr(SparseEmbedding, "_table_contents", None)
    model.save_weights(path)


def test_keras_weights_of_earlier_forms_load(tmp_path, monkeypatch):
  """Weights with the table beside the layer's weight (two layers on one
  table: stored with each) still load; weights without table contents
  load with a warning and leave the table as it is."""
  inp = keras.Input(shape=(2,), dtype="int64")
  first = SparseEmbedding(4, combiner="sum", optimizer="adam")
  second = SparseEmbedding(4, combiner="mean", table=first.table)
  out = keras.layers.Concatenate()([first(inp), second(inp)])
  model = keras.Model(inp, out)
  model(np.array([[1, 2]]), training=True)
  first.table.push([1, 2], np.ones((2, 4), np.float32), 0.5)
  saved = first.table.export()
  path = str(tmp_path / "beside.weights.h5")
  _save_in_an_earlier_form(model, path, monkeypatch, with_table=True)
  model(np.array([[3, 4]]), training=True)
  first.table.push([1], np.ones((1, 4), np.float32), 0.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    model.load_weights(path)
  restored = first.table.export()
  for a, b in zip(saved, restored):
    np.testing.assert_array_equal(a.numpy(), b.numpy())

  path = str(tmp_path / "none.weights.h5")
  _save_in_an_earlier_form(model, path, monkeypatch, with_table=False)
  with pytest.warns(UserWarning, match="hold no table contents"):
    model.load_weights(path)
  assert int(first.table.size()) == 2  # kept its rows


def test_backup_and_restore_resumes_with_the_table(tmp_path):
  """keras.callbacks.BackupAndRestore: a fit interrupted after its second
  epoch resumes, in a new model, at the third with the table's rows, slots,
  counters and step as they were."""
  ids = np.arange(96, dtype=np.int64).reshape(32, 3)
  y = np.ones((32, 1), np.float32)

  def build():
    inp = keras.Input((3,), dtype="int64")
    emb = SparseEmbedding(4, combiner="mean", optimizer="adam",
                          initializer="zeros")
    model = keras.Model(inp, keras.layers.Dense(1, kernel_initializer="ones")(
        emb(inp)))
    model.compile("adam", "mse")
    return model, emb

  class Stop(keras.callbacks.Callback):
    """Exports the table and stops the fit at its `hook` of `epoch` (None:
    the first epoch the fit runs)."""

    def __init__(self, emb, hook, epoch):
      super().__init__()
      self.emb, self.at = emb, epoch
      setattr(self, hook, self.stop)

    def stop(self, epoch, logs=None):
      if self.at in (None, epoch):
        self.epoch, self.snapshot = epoch, self.emb.table.export()
        raise RuntimeError("stopped")

  def fit_until(model, stop):
    with pytest.raises(RuntimeError, match="stopped"):
      model.fit(ids, y, epochs=4, verbose=0, callbacks=[
          keras.callbacks.BackupAndRestore(str(tmp_path)), stop])
    return stop

  model, emb = build()
  interrupt = fit_until(model, Stop(emb, "on_epoch_end", 1))
  assert int(interrupt.snapshot.step) == 2 and len(interrupt.snapshot.keys) == 96
  model2, emb2 = build()
  check = fit_until(model2, Stop(emb2, "on_epoch_begin", None))
  assert check.epoch == 2  # resumed after the two epochs of the backup
  for want, got in zip(sorted_export(interrupt.snapshot),
                       sorted_export(check.snapshot)):
    np.testing.assert_array_equal(got, want)  # keys, values, slots, counters, step


def test_eviction_between_epochs_of_a_fit():
  """A callback that evicts idle rows at each epoch's end (as documented):
  the rows of ids no longer seen go, the others stay trained, and the
  model goes on training (the evicted ids get new rows when they return)."""
  inp = keras.Input((2,), dtype="int64")
  emb = SparseEmbedding(4, combiner="sum", optimizer="adagrad",
                        track_usage=True)
  model = keras.Model(inp, keras.layers.Dense(1)(emb(inp)))
  model.compile("sgd", "mse")
  evicted = []
  evict = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs:
                                         evicted.append(int(emb.table.evict(
                                             max_idle_steps=4))))
  old, new = np.arange(40).reshape(20, 2), np.arange(100, 140).reshape(20, 2)
  y = np.ones((20, 1), np.float32)
  model.fit(old, y, batch_size=4, epochs=1, verbose=0)  # 5 steps
  model.fit(new, y, batch_size=4, epochs=2, verbose=0, callbacks=[evict])
  assert evicted == [40, 0]
  keys = sorted(emb.table.export().keys.numpy().tolist())
  assert keys == list(range(100, 140))
  history = model.fit(old, y, batch_size=4, epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][0])
  assert int(emb.table.size()) == 80


def test_float_ids_are_refused():
  """A float input would merge large int64 ids silently (float32 holds
  integers exactly only below 2^24): refused when the model is built and
  when the layer is called, for dense, ragged and sparse ids. Every integer
  type is taken (its cast to int64 keeps ids apart)."""
  with pytest.raises(TypeError, match=r"ids must be integers, got float32.*"
                                      r"dtype=\"int64\""):
    inp = keras.Input(shape=(2,))  # dtype left at float32
    SparseEmbedding(4, combiner="sum")(inp)
  layer = SparseEmbedding(4, combiner="sum")
  for ids in (tf.constant([[1.0, 2.0]]),
              tf.ragged.constant([[1.0], [2.0, 3.0]]),
              tf.sparse.from_dense(tf.constant([[1.0, 0.0]], tf.float64))):
    with pytest.raises(TypeError, match="ids must be integers, got float"):
      layer(ids, training=True)
  assert int(layer.table.size()) == 0
  for ids in (np.array([[1, 2]], np.int32), tf.ragged.constant([[1], [2, 3]]),
              np.array([[4, 5]], np.int16), np.array([[2**64 - 1, 0]], np.uint64)):
    layer(ids, training=True)
  keys = sorted(layer.table.export().keys.numpy().tolist())
  assert keys == [-1, 0, 1, 2, 3, 4, 5]  # uint64 ids keep their bits


def test_bad_layer_arguments():
  with pytest.raises(ValueError, match="combiner"):
    SparseEmbedding(4, combiner="max")
  with pytest.raises(ValueError, match="dim=4 but the table has dim 8"):
    SparseEmbedding(4, table=hpc_ops.SparseTable(8))
  with pytest.raises(TypeError, match="push_transform must be callable"):
    hpc_ops.SparseTable(4, push_transform=3)
