"""sparse_table ops: pull/push semantics, every optimizer against a float64
numpy reference, duplicates, initializers, serving mode, admission,
eviction, export/import, concurrency, and clean errors on bad input."""
import threading

import numpy as np
import pytest
import tensorflow as tf

import hpc_ops
from hpc_ops import gen_sparse_table_ops as gen
from hpc_ops import sparse_table
from sparse_ids import sparse_ids_with_gaps
from table_snapshot import admission_counts, sorted_export

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def table(dim=4, **kw):
  kw.setdefault("num_shards", 8)
  return hpc_ops.SparseTable(dim, **kw)


def snapshot(t):
  """Export as numpy arrays sorted by key."""
  keys, values, slots, counters, step = sorted_export(t.export())
  return keys, values, slots, counters, int(step)


# ---------------------------------------------------------------- pull

def test_pull_shape_dtype_and_insert():
  t = table(dim=3)
  keys = tf.constant([[5, 7, 5], [-1, INT64_MAX, INT64_MIN]], tf.int64)
  v = t.pull(keys)
  assert v.shape == (2, 3, 3) and v.dtype == tf.float32
  np.testing.assert_array_equal(v[0, 0], v[0, 2])  # same key, same row
  assert int(t.size()) == 5
  np.testing.assert_array_equal(t.pull(keys), v)  # rows persist
  assert int(t.size()) == 5


def test_initial_value_depends_only_on_seed_and_key():
  keys = np.arange(-500, 500, dtype=np.int64) * 7919
  a = table(dim=5, seed=11, num_shards=4)
  b = table(dim=5, seed=11, num_shards=64)
  c = table(dim=5, seed=12)
  va = a.pull(keys).numpy()
  # b sees the keys in another order, in several batches, mixed with others.
  perm = np.random.default_rng(0).permutation(len(keys))
  for part in np.array_split(perm, 7):
    b.pull(np.concatenate([keys[part], [123456789]]))
  np.testing.assert_array_equal(b.pull(keys).numpy(), va)
  assert not np.allclose(c.pull(keys).numpy(), va)
  # Serving reads of absent keys give the same initial values.
  d = table(dim=5, seed=11)
  np.testing.assert_array_equal(d.pull(keys, insert_missing=False).numpy(), va)


@pytest.mark.parametrize("init,scale", [("zeros", 1.0), ("uniform", 0.5),
                                        ("truncated_normal", 0.2)])
def test_initializer_distributions(init, scale):
  t = table(dim=16, initializer=init, init_scale=scale, seed=3)
  v = t.pull(np.arange(20000, dtype=np.int64)).numpy().ravel()
  if init == "zeros":
    assert not v.any()
  elif init == "uniform":
    assert v.min() >= -scale and v.max() < scale
    assert abs(v.mean()) < 0.01 * scale
    assert abs(v.std() - scale / np.sqrt(3)) < 0.01 * scale
  else:
    assert np.abs(v).max() <= 2 * scale
    assert abs(v.mean()) < 0.01 * scale
    # std of a standard normal truncated at +-2: 0.8796
    assert abs(v.std() - 0.8796 * scale) < 0.01 * scale


def test_serving_pull_never_inserts():
  t = table(dim=4, seed=5)
  t.pull([1, 2])
  before = snapshot(t)
  v = t.pull([1, 3, 4], insert_missing=False)
  after = snapshot(t)
  for x, y in zip(before[:4], after[:4]):
    np.testing.assert_array_equal(x, y)
  fresh = table(dim=4, seed=5)
  np.testing.assert_array_equal(v.numpy(), fresh.pull([1, 3, 4]).numpy())


@pytest.mark.parametrize("dim", [8, 16, 32, 40, 33, 64])
def test_large_pull_matches_small_pulls(dim):
  # 70,000 keys of dim 32, 40 or 64 make an output above 8 MiB, which the
  # pull writes with streaming stores (dim 33 is not a whole number of
  # 32-byte lanes: ordinary stores); dims 8, 16, 32 and 64 have their own
  # compiled loop, 33 and 40 the general one. The rows must equal those of
  # small pulls, for present, repeated and missing keys, inserting or not.
  rng = np.random.default_rng(dim)
  keys = rng.integers(0, 20_000, size=70_000).astype(np.int64)
  keys[::7] = rng.integers(INT64_MIN, INT64_MAX, size=keys[::7].shape)
  t = table(dim=dim, seed=3)
  t.push(keys[:5000], np.full([5000, dim], 0.25, np.float32), 0.1)  # trained rows
  for insert in (False, True):
    small = np.concatenate([t.pull(c, insert_missing=False).numpy()
                            for c in np.array_split(keys, 70)])
    big = t.pull(keys, insert_missing=insert).numpy()
    assert big.shape == (70_000, dim)
    np.testing.assert_array_equal(big, small)
  assert int(t.size()) == len(np.unique(keys))


def _added_in_order(rows, combiner):
  """rows [..., n, dim] added over n in order in float32 (the combining
  pull's definition), divided by n for a mean; zeros for n = 0."""
  total = np.zeros(rows.shape[:-2] + rows.shape[-1:], np.float32)
  for j in range(rows.shape[-2]):
    total += rows[..., j, :]
  if combiner == "mean" and rows.shape[-2] > 0:
    total /= np.float32(rows.shape[-2])
  return total


@pytest.mark.parametrize("dim", [8, 16, 5, 33, 64])
@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_combined_pull_adds_the_rows_in_order(dim, combiner):
  """pull(..., combiner=) equals the rows of a plain pull added over the
  last axis in order, bit for bit, whether the keys had rows, get them in
  this pull (groups summed again after the inserts) or only read their
  initial value; it inserts exactly what a plain pull inserts. 63,000 keys
  (the threads share them out; dims 8, 16 and 64 have their own compiled
  loop, 5 and 33 the general one)."""
  rng = np.random.default_rng(dim)
  keys = (np.minimum(rng.zipf(1.2, size=(600, 7, 15)), 20_000).astype(np.int64)
          * np.int64(0x9E3779B97F4A7C1))
  trained = np.unique(keys)[::3]
  tables = []
  for _ in range(2):
    t = table(dim=dim, seed=3, optimizer="adagrad")
    t.push(trained, np.full([len(trained), dim], 0.25, np.float32), 0.1)
    tables.append(t)
  combined, plain = tables
  before = _added_in_order(plain.pull(keys, insert_missing=False).numpy(),
                           combiner)
  serving = combined.pull(keys, insert_missing=False, combiner=combiner)
  assert serving.shape == (600, 7, dim)
  np.testing.assert_array_equal(serving.numpy(), before)
  assert int(combined.size()) == len(trained)
  out = combined.pull(keys, combiner=combiner).numpy()
  plain.pull(keys)
  for a, b in zip(snapshot(combined), snapshot(plain)):
    np.testing.assert_array_equal(a, b)
  rows = plain.pull(keys, insert_missing=False).numpy()
  np.testing.assert_array_equal(out, _added_in_order(rows, combiner))
  np.testing.assert_array_equal(
      combined.pull(tf.constant(keys), combiner=combiner).numpy(), out)


@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_combined_pull_shapes_and_admission(combiner):
  t = table(dim=3, seed=1)
  r = {k: t.pull([k], insert_missing=False).numpy()[0] for k in (1, 2, 3)}
  div = 2.0 if combiner == "mean" else 1.0
  # Rank 1: the whole vector is one group.
  np.testing.assert_array_equal(t.pull([1, 2], combiner=combiner).numpy(),
                                (r[1] + r[2]) / np.float32(div))
  f = tf.function(lambda k: t.pull(k, combiner=combiner))
  for shape in ([2, 3, 4], [0, 4], [2, 0]):
    keys = tf.zeros(shape, tf.int64)
    out = f(keys)
    assert out.shape == shape[:-1] + [3]
    if shape[-1] == 0:  # an empty last axis: zeros, for the mean too
      np.testing.assert_array_equal(out.numpy(), np.zeros([2, 3]))
  g = tf.function(lambda k: t.pull(k, combiner=combiner),
                  input_signature=[tf.TensorSpec([None, None], tf.int64)])
  assert g.get_concrete_function().output_shapes.as_list() == [None, 3]
  # Admission counts every occurrence, as a plain pull does.
  counted = [table(dim=3, seed=1, admission_min_count=3) for _ in range(2)]
  keys = np.array([[5, 5, 7], [9, 9, 9]], np.int64)
  out = counted[0].pull(keys, combiner=combiner).numpy()
  counted[1].pull(keys)
  assert admission_counts(counted[0]) == admission_counts(counted[1]) == {
      5: 2, 7: 1}
  assert int(counted[0].size()) == int(counted[1].size()) == 1
  np.testing.assert_array_equal(
      out, _added_in_order(counted[1].pull(keys, insert_missing=False).numpy(),
                           combiner))

def _ragged_added_in_order(rows, splits, combiner):
  """Each ragged row's rows added in order in float32 (divided by their
  number for a mean; zeros for an empty row)."""
  out = np.zeros((len(splits) - 1, rows.shape[1]), np.float32)
  for r in range(len(splits) - 1):
    out[r] = _added_in_order(rows[splits[r]:splits[r + 1]][np.newaxis],
                             combiner)[0]
  return out


@pytest.mark.parametrize("combiner", ["sum", "mean"])
@pytest.mark.parametrize("splits_dtype", [np.int64, np.int32])
def test_ragged_pull_adds_each_rows_rows_in_order(combiner, splits_dtype):
  """pull(ragged [rows, None], combiner=) (SparseTablePullRagged) equals the
  plain rows of each ragged row added in order, bit for bit, with empty
  rows first, inside and last, before and after inserts (about 45,000 keys:
  the threads share them out) and without inserting; it inserts and counts
  for admission exactly what a plain pull does."""
  rng = np.random.default_rng(4)
  lengths = rng.integers(0, 30, size=3000)
  lengths[:3] = 0
  lengths[100:120] = 0
  lengths[-5:] = 0
  keys = (np.minimum(rng.zipf(1.2, size=lengths.sum()), 30_000).astype(
      np.int64) * np.int64(0x9E3779B97F4A7C1))
  splits = np.concatenate([[0], np.cumsum(lengths)]).astype(splits_dtype)
  ids = tf.RaggedTensor.from_row_splits(keys, splits)
  for dim, admission in ((16, 0), (5, 2)):
    pulled, plain = [table(dim=dim, seed=1, admission_min_count=admission)
                     for _ in range(2)]
    for insert in (False, True, True):
      out = pulled.pull(ids, insert_missing=insert, combiner=combiner)
      assert out.shape == (3000, dim)
      if insert:
        plain.pull(keys)
      rows = plain.pull(keys, insert_missing=False).numpy()
      np.testing.assert_array_equal(
          out.numpy(), _ragged_added_in_order(rows, splits, combiner))
      for a, b in zip(snapshot(pulled), snapshot(plain)):
        np.testing.assert_array_equal(a, b)
      assert admission_counts(pulled) == admission_counts(plain)
  # Without a combiner: the rows, ragged; rows that are all empty: zeros.
  t = table(dim=3, seed=1)
  flat = t.pull(keys[:10], insert_missing=False).numpy()
  some = tf.RaggedTensor.from_row_lengths(keys[:10], [4, 0, 6])
  out = t.pull(some, insert_missing=False)
  assert isinstance(out, tf.RaggedTensor)
  np.testing.assert_array_equal(out.flat_values, flat)
  empty = tf.RaggedTensor.from_row_splits(tf.zeros([0], tf.int64), [0, 0, 0])
  np.testing.assert_array_equal(t.pull(empty, combiner=combiner),
                                np.zeros([2, 3]))
  f = tf.function(lambda k: t.pull(k, combiner=combiner), input_signature=[
      tf.RaggedTensorSpec([None, None], tf.int64, row_splits_dtype=tf.int64)])
  assert f.get_concrete_function().output_shapes.as_list() == [None, 3]
  # Higher ragged rank: the innermost rows combined, the outer kept; a
  # uniform inner axis combined as dense keys' last axis.
  nested = t.pull(tf.RaggedTensor.from_row_lengths(some, [1, 0, 2]),
                  combiner=combiner)
  assert nested.shape.as_list() == [3, None, 3]
  np.testing.assert_array_equal(nested.flat_values,
                                t.pull(some, combiner=combiner))
  uniform = tf.RaggedTensor.from_row_lengths(keys[:12].reshape(6, 2),
                                             [2, 0, 4])
  np.testing.assert_array_equal(
      t.pull(uniform, insert_missing=False, combiner=combiner).flat_values,
      t.pull(keys[:12].reshape(6, 2), insert_missing=False, combiner=combiner))

@pytest.mark.parametrize("combiner", ["sum", "mean"])
def test_sparse_keys_combine_as_their_ragged_rows(combiner):
  """pull and embedding_lookup take rank-2 tf.SparseTensor keys with a
  combiner: each row's keys in order, column gaps allowed (sparse_rows),
  bit for bit as the same rows of a RaggedTensor, pushes included."""
  sp, kept = sparse_ids_with_gaps(12, rows=500, max_len=12, high=900)
  C = tf.constant(np.random.default_rng(12).normal(size=(500, 6)).astype(
      np.float32))
  results = []
  for keys in (sp, kept):
    t = table(dim=6, seed=2, optimizer="adam")
    trigger = tf.Variable(0.0)
    with tf.GradientTape() as tape:
      out = sparse_table.embedding_lookup(t, keys, trigger, combiner=combiner)
      loss = tf.reduce_sum(out * C)
    tape.gradient(loss, trigger)
    results.append([out.numpy(), t.pull(keys, combiner=combiner).numpy(),
                    *snapshot(t)])
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)
  t = table(dim=2)
  with pytest.raises(ValueError, match="SparseTable.pull: sparse keys need "
                                       "a combiner"):
    t.pull(sp)
  with pytest.raises(ValueError, match="embedding_lookup: sparse keys need "
                                       "a combiner"):
    sparse_table.embedding_lookup(t, sp, tf.Variable(0.0))
  with pytest.raises(ValueError, match="sparse keys of rank 2, got shape "
                                       "\\(1, 2, 3\\)"):
    t.pull(tf.SparseTensor([[0, 0, 0]], tf.constant([1], tf.int64),
                           [1, 2, 3]), combiner=combiner)


def test_empty_batches_are_legal():
  t = table(dim=4)
  assert t.pull(tf.zeros([0], tf.int64)).shape == (0, 4)
  assert t.pull(tf.zeros([3, 0], tf.int64)).shape == (3, 0, 4)
  t.push(tf.zeros([0], tf.int64), tf.zeros([0, 4]), 0.1)
  t.push(tf.zeros([2, 0], tf.int64), tf.zeros([2, 0, 4]), 0.1)
  assert int(t.size()) == 0
  k, g = sparse_table.unique_grads(tf.zeros([0], tf.int64), tf.zeros([0, 4]))
  assert k.shape == (0,) and g.shape == (0, 4)


def test_scalar_key():
  t = table(dim=2)
  assert t.pull(tf.constant(9, tf.int64)).shape == (2,)
  t.push(tf.constant(9, tf.int64), [1.0, 2.0], 1.0)


def test_tf_function_static_shape_and_results():
  t = table(dim=6, optimizer="sgd", initializer="zeros")

  @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int64)])
  def step(keys):
    v = t.pull(keys)
    assert v.shape.as_list() == [None, 2, 6]  # from the C++ shape function
    t.push(keys, tf.ones_like(v), 0.5)
    return t.pull(keys)

  out = step(tf.constant([[1, 2], [2, 3]], tf.int64)).numpy()
  np.testing.assert_array_equal(out[:, 0], [[-0.5] * 6, [-1.0] * 6])
  np.testing.assert_array_equal(out[:, 1], [[-1.0] * 6, [-0.5] * 6])


def test_tf1_graph_private_table_persists_across_runs():
  g = tf.Graph()
  with g.as_default():
    h = gen.sparse_table_handle(dim=2, optimizer="sgd", initializer="zeros")
    keys = tf.compat.v1.placeholder(tf.int64, [None])
    push = gen.sparse_table_push(h, keys, tf.ones([tf.size(keys), 2]), 1.0)
    size = gen.sparse_table_size(h)
    pull = gen.sparse_table_pull(h, keys, dim=2)
    with tf.compat.v1.Session(graph=g) as sess:
      sess.run(push, {keys: [1, 2]})
      sess.run(push, {keys: [2]})
      assert sess.run(size) == 2
      np.testing.assert_array_equal(sess.run(pull, {keys: [1, 2]}),
                                    [[-1, -1], [-2, -2]])


def test_shared_name_shares_and_checks_config():
  a = hpc_ops.SparseTable(4, shared_name="st_shared_test", optimizer="sgd")
  b = hpc_ops.SparseTable(4, shared_name="st_shared_test", optimizer="sgd")
  a.pull([1, 2, 3])
  assert int(b.size()) == 3
  with pytest.raises(tf.errors.InvalidArgumentError, match="already exists with another"):
    hpc_ops.SparseTable(8, shared_name="st_shared_test", optimizer="sgd")


def test_many_keys_grow_every_shard():
  t = table(dim=3, num_shards=4, initializer="truncated_normal", seed=9)
  rng = np.random.default_rng(1)
  keys = np.unique(rng.integers(INT64_MIN, INT64_MAX, size=150_000, dtype=np.int64))
  for part in np.array_split(keys, 5):
    t.pull(part)
  assert int(t.size()) == len(keys)
  k, v, _, _, _ = snapshot(t)
  np.testing.assert_array_equal(k, keys)
  np.testing.assert_array_equal(t.pull(keys, insert_missing=False).numpy(), v)


# ---------------------------------------------------------------- push

def reference_step(opt, o, w, slots, t, g, lr):
  """One float64 update of rows w [n, d] with slots [n, s, d], steps t [n]."""
  w, slots, t = w.copy(), slots.copy(), t.copy()
  if opt == "sgd":
    w -= lr * g
  elif opt == "adagrad":
    slots[:, 0] += g * g
    w -= lr * g / (np.sqrt(slots[:, 0]) + o["epsilon"])
  elif opt == "adam":
    t += 1
    b1, b2 = o["beta1"], o["beta2"]
    m, v = slots[:, 0], slots[:, 1]
    m += (g - m) * (1 - b1)
    v += (g * g - v) * (1 - b2)
    alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    w -= m * alpha[:, None] / (np.sqrt(v) + o["epsilon"])
  elif opt == "ftrl":
    acc, lin = slots[:, 0], slots[:, 1]
    p = o["learning_rate_power"]
    acc_new = acc + g * g
    lin += g - (acc_new ** -p - acc ** -p) / lr * w
    quad = acc_new ** -p / lr + 2 * o["l2"]
    w = np.where(np.abs(lin) > o["l1"], (np.sign(lin) * o["l1"] - lin) / quad, 0.0)
    slots[:, 0] = acc_new
  return w, slots, t


OPTIMIZER_CASES = [
    ("sgd", {}),
    ("adagrad", {"initial_accumulator_value": 0.1, "epsilon": 1e-7}),
    ("adagrad", {"initial_accumulator_value": 0.0, "epsilon": 0.5}),
    ("adam", {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7}),
    ("adam", {"beta1": 0.5, "beta2": 0.8, "epsilon": 1e-3}),
    ("ftrl", {"initial_accumulator_value": 0.1, "learning_rate_power": -0.5,
              "l1": 0.001, "l2": 0.01}),
    ("ftrl", {"initial_accumulator_value": 0.3, "learning_rate_power": -0.7,
              "l1": 0.0, "l2": 0.0}),
]


@pytest.mark.parametrize("opt,options", OPTIMIZER_CASES,
                         ids=["%s%d" % (c[0], i) for i, c in enumerate(OPTIMIZER_CASES)])
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_push_matches_float64_numpy(opt, options, mode):
  dim = 5
  t = table(dim=dim, optimizer=opt, optimizer_options=options,
            initializer="uniform", init_scale=0.5, seed=4)
  full = dict(sparse_table.OPTIMIZER_OPTIONS[opt], **options)
  uniq = np.array([3, -8, 2**40, 11], np.int64)
  t.pull(uniq)
  k0, w, slots, counters, _ = snapshot(t)
  w, slots = w.astype(np.float64), slots.astype(np.float64)
  steps = counters[:, 0].astype(np.float64) if opt == "adam" else np.zeros(len(k0))
  rng = np.random.default_rng(5)
  push = t.push
  if mode == "function":
    push = tf.function(t.push)
  lrs = [0.1, 0.05, 0.2]
  for lr in lrs:
    # Duplicate keys: the update uses their summed gradient, once.
    keys = np.concatenate([uniq, uniq[:2], uniq[:1]])
    grads = rng.normal(size=(len(keys), dim)).astype(np.float32)
    push(tf.constant(keys), tf.constant(grads), tf.constant(lr, tf.float32))
    g = np.zeros((len(k0), dim))
    for key, gr in zip(keys, grads.astype(np.float64)):
      g[np.searchsorted(k0, key)] += gr
    w, slots, steps = reference_step(opt, full, w, slots, steps, g, lr)
  k1, w1, s1, c1, step = snapshot(t)
  np.testing.assert_array_equal(k1, k0)
  assert step == len(lrs)
  np.testing.assert_allclose(w1, w, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(s1, slots, rtol=2e-5, atol=1e-6)
  if opt == "adam":
    np.testing.assert_array_equal(c1[:, 0], steps)


def test_duplicates_are_summed_before_one_update():
  # Adagrad makes the difference visible: one update with (g1+g2)^2 in the
  # accumulator, not two updates with g1^2 and g2^2.
  t = table(dim=2, optimizer="adagrad", initializer="zeros",
            optimizer_options={"initial_accumulator_value": 1.0, "epsilon": 0.0})
  t.push([7, 7, 7], [[1.0, 2.0], [2.0, 0.0], [1.0, -1.0]], 1.0)
  _, w, slots, _, _ = snapshot(t)
  g = np.array([4.0, 1.0])
  np.testing.assert_allclose(slots[0, 0], 1.0 + g * g, rtol=1e-6)
  np.testing.assert_allclose(w[0], -g / np.sqrt(1.0 + g * g), rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_large_push_sums_duplicates_in_batch_order_bit_exactly(mode):
  """A batch big enough to be grouped by several threads, with Zipf-like
  repeats spread over every shard and a width with a vector part and a
  tail: each key's gradient sum is the float32 sum in batch order, to the
  last bit (SGD from zeros, lr 1: the row is minus that sum)."""
  dim = 19
  t = table(dim=dim, optimizer="sgd", initializer="zeros", num_shards=16)
  rng = np.random.default_rng(7)
  ranks = np.minimum(rng.zipf(1.3, size=40000), 5000).astype(np.int64)
  keys = ranks * np.int64(0x9E3779B97F4A7C1)
  grads = rng.normal(size=(len(keys), dim)).astype(np.float32)
  push = tf.function(t.push) if mode == "function" else t.push
  push(tf.constant(keys), tf.constant(grads), tf.constant(1.0))
  want = {}
  for k, g in zip(keys.tolist(), grads):
    want[k] = g.copy() if k not in want else want[k] + g  # float32, in order
  k1, w1, _, _, _ = snapshot(t)
  assert len(k1) == len(want)
  expected = -np.stack([want[k] for k in k1.tolist()])
  np.testing.assert_array_equal(w1, expected)


@pytest.mark.parametrize("opt", sparse_table.OPTIMIZERS)
@pytest.mark.parametrize("mode", ["eager", "function"])
def test_push_with_shared_grads_equals_a_row_per_key(opt, mode):
  """shared_grads: the keys of keys[i, j, :] all take grads[i, j]; the
  table ends bit for bit as after a push of that row copied for every key
  (same sums in the same order), for every optimizer, with the batch big
  enough for several parts and a width with a vector part and a tail."""
  dim = 11
  rng = np.random.default_rng(9)
  keys = (np.minimum(rng.zipf(1.3, size=(300, 4, 30)), 3000).astype(np.int64)
          * np.int64(0x9E3779B97F4A7C1))
  shared = rng.normal(size=(300, 4, dim)).astype(np.float32)
  copied = np.repeat(shared[:, :, np.newaxis, :], 30, axis=2)
  results = []
  for grads, flag in ((shared, True), (copied, False)):
    t = table(dim=dim, optimizer=opt, seed=3, num_shards=16)
    push = tf.function(t.push) if mode == "function" else t.push
    for lr in (0.1, 0.05):
      step = push(tf.constant(keys), tf.constant(grads), lr, shared_grads=flag)
    assert int(step) == 2
    results.append(snapshot(t))
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)
  # One key per row, and no keys at all.
  t = table(dim=2, optimizer="sgd", initializer="zeros")
  t.push([[5], [6], [5]], [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], 1.0,
         shared_grads=True)
  np.testing.assert_array_equal(snapshot(t)[1], [[-6.0, -8.0], [-3.0, -4.0]])
  step = t.push(tf.zeros([3, 0], tf.int64), tf.zeros([3, 2]), 1.0,
                shared_grads=True)
  assert int(step) == 2 and int(t.size()) == 2


@pytest.mark.parametrize("opt", sparse_table.OPTIMIZERS)
@pytest.mark.parametrize("splits_dtype", [np.int64, np.int32])
def test_ragged_push_with_shared_grads_equals_a_row_per_key(opt,
                                                            splits_dtype):
  """push(ragged [rows, None], grads [rows, dim], shared_grads=True)
  (SparseTablePushRagged): every key of ragged row r takes grads[r]; the
  table ends bit for bit as after a push of that row copied for each key,
  for every optimizer, with empty rows first, inside and last, about
  45,000 keys (several parts), eagerly and in a function, with admission
  too (after a pull has admitted some keys: the others' gradients are
  dropped alike). Without shared_grads ragged keys push a row per key."""
  dim = 11
  rng = np.random.default_rng(5)
  lengths = rng.integers(0, 30, size=3000)
  lengths[:3] = 0
  lengths[100:120] = 0
  lengths[-5:] = 0
  keys = (np.minimum(rng.zipf(1.3, size=lengths.sum()), 3000).astype(np.int64)
          * np.int64(0x9E3779B97F4A7C1))
  splits = np.concatenate([[0], np.cumsum(lengths)]).astype(splits_dtype)
  ids = tf.RaggedTensor.from_row_splits(keys, splits)
  shared = rng.normal(size=(3000, dim)).astype(np.float32)
  copied = np.repeat(shared, lengths, axis=0)
  reference = {}
  for admission in (0, 3):
    results = []
    for mode in ("eager", "function", "copied"):
      t = table(dim=dim, optimizer=opt, seed=3, num_shards=16,
                admission_min_count=admission)
      if admission:
        t.pull(keys[:20_000])
      for lr in (0.1, 0.05):
        if mode == "copied":
          step = t.push(keys, copied, lr)
        elif mode == "eager":
          step = t.push(ids, shared, lr, shared_grads=True)
        else:
          step = tf.function(t.push)(ids, tf.constant(shared), lr,
                                     shared_grads=True)
      assert int(step) == 2
      results.append((snapshot(t), admission_counts(t)))
    for snap, counts in results[:2]:
      for a, b in zip(snap, results[2][0]):
        np.testing.assert_array_equal(a, b)
      assert counts == results[2][1]
    reference[admission] = results[2][0]
  assert 0 < len(reference[3][0]) < len(reference[0][0])
  # Without shared_grads: a gradient row per key, ragged or flat.
  for grads in (ids.with_flat_values(tf.constant(copied)), copied):
    t = table(dim=dim, optimizer=opt, seed=3, num_shards=16)
    t.push(ids, grads, 0.1)
    t.push(ids, grads, 0.05)
    for a, b in zip(snapshot(t), reference[0]):
      np.testing.assert_array_equal(a, b)
  # Rows that are all empty push nothing but still count a step.
  t = table(dim=2)
  empty = tf.RaggedTensor.from_row_splits(tf.zeros([0], tf.int64), [0, 0, 0])
  assert int(t.push(empty, tf.ones([2, 2]), 0.1, shared_grads=True)) == 1
  assert int(t.size()) == 0
  # Higher ragged rank: the innermost rows share the rows, grads as the
  # combining pull gives them (ragged or flat); a uniform inner axis
  # shares as dense keys' last axis.
  outer = tf.RaggedTensor.from_row_lengths(ids, [1000, 0, 2000])
  pulled = table(dim=dim).pull(outer, combiner="sum")
  assert pulled.shape.as_list() == [3, None, dim]
  for grads in (pulled.with_flat_values(tf.constant(shared)), shared):
    t = table(dim=dim, optimizer=opt, seed=3, num_shards=16)
    t.push(outer, grads, 0.1, shared_grads=True)
    t.push(outer, grads, 0.05, shared_grads=True)
    for a, b in zip(snapshot(t), reference[0]):
      np.testing.assert_array_equal(a, b)
  uniform = tf.RaggedTensor.from_row_lengths(keys[:300].reshape(100, 3),
                                             [40, 0, 60])
  results = []
  for k in (uniform, keys[:300].reshape(100, 3)):
    t = table(dim=dim, optimizer=opt, seed=3)
    t.push(k, shared[:100], 0.1, shared_grads=True)
    results.append(snapshot(t))
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ragged", [False, True])
def test_shared_push_mean_divides_each_row_by_its_key_count(ragged):
  """push(..., shared_grads=True, combiner="mean"): each gradient row
  divided by the number of keys sharing it (an empty ragged row's by 1),
  bit for bit as a "sum" push of the rows divided beforehand."""
  rng = np.random.default_rng(14)
  if ragged:
    lengths = rng.integers(0, 7, size=300)
    keys = tf.RaggedTensor.from_row_lengths(
        rng.integers(0, 400, size=lengths.sum()), lengths)
  else:
    lengths = np.full(300, 6)
    keys = rng.integers(0, 400, size=(300, 6))
  grads = rng.normal(size=(300, 5)).astype(np.float32)
  divided = grads / np.maximum(lengths, 1).astype(np.float32)[:, None]
  results = []
  for g, combiner in ((grads, "mean"), (divided, "sum")):
    t = table(dim=5, optimizer="adam", seed=4)
    for lr in (0.1, 0.02):
      t.push(keys, g, lr, shared_grads=True, combiner=combiner)
    results.append(snapshot(t))
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)


def test_push_creates_missing_rows_from_their_initial_value():
  t = table(dim=3, optimizer="sgd", seed=8)
  init = table(dim=3, seed=8).pull([42]).numpy()
  t.push([42], [[1.0, 1.0, 1.0]], 0.25)
  np.testing.assert_allclose(t.pull([42]).numpy(), init - 0.25, rtol=1e-6)


def test_nan_and_inf_propagate():
  t = table(dim=3, optimizer="sgd", initializer="zeros")
  t.push([1, 2], [[np.nan, 1.0, 0.0], [np.inf, 0.0, 0.0]], 1.0)
  v = t.pull([1, 2]).numpy()
  assert np.isnan(v[0, 0]) and v[0, 1] == -1.0 and np.isneginf(v[1, 0])


def test_learning_rate_tensor_and_variable():
  lr = tf.Variable(0.5)
  t = table(dim=1, optimizer="sgd", initializer="zeros", learning_rate=lr)
  t.push([1], [[1.0]])
  lr.assign(2.0)
  t.push([1], [[1.0]])
  assert t.pull([1]).numpy()[0, 0] == -2.5


def test_unique_grads():
  keys = tf.constant([[5, 3], [5, 9]], tf.int64)
  grads = tf.constant([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [0.5, 0.5]]])
  k, g = sparse_table.unique_grads(keys, grads)
  np.testing.assert_array_equal(k, [5, 3, 9])
  np.testing.assert_array_equal(g, [[11, 22], [3, 4], [0.5, 0.5]])


# ---------------------------------------------------------------- concurrency

def test_concurrent_pushes_lose_nothing_and_pulls_never_tear():
  """Pushers add -1 per occurrence (SGD, lr 1, grads of 1 in every column)
  to 16 hot keys, with plain pushes and with ragged ones (a gradient row
  per ragged row); readers pull concurrently (plain, summing and ragged
  summing pulls).
  Final values are exactly -(total occurrences); every pulled row has all
  columns equal (a torn row would mix two versions) and values never go
  back up."""
  dim = 16
  t = table(dim=dim, optimizer="sgd", initializer="zeros", num_shards=4)
  hot = np.arange(16, dtype=np.int64)
  rng = np.random.default_rng(0)
  # Large batches use the thread pool inside the op as well.
  batches = []
  for i in range(4):
    keys = np.concatenate([np.repeat(hot, 1250),
                           rng.integers(1000, 10**6, size=2000)])
    batches.append(tf.constant(rng.permutation(keys)))
  grads = [tf.ones([int(b.shape[0]), dim]) for b in batches]
  # The same keys in ragged rows of 0-15 keys, a gradient row each.
  ragged = []
  for b in batches:
    cuts = np.sort(rng.integers(0, int(b.shape[0]) + 1, size=499))
    ragged.append(tf.RaggedTensor.from_row_splits(
        b, np.concatenate([[0], cuts, [int(b.shape[0])]])))
  ragged_grads = tf.ones([500, dim])
  pushes_per_thread, num_pushers = 25, 4
  push_fn = tf.function(lambda k, g: t.push(k, g, 1.0))
  ragged_push_fn = tf.function(
      lambda k, g: t.push(k, g, 1.0, shared_grads=True))
  errors, stop = [], threading.Event()

  def pusher(i):
    try:
      for j in range(pushes_per_thread):
        b = (i + j) % len(batches)
        if j % 4 == 0:  # eager ops and tf.function calls, in turns
          t.push(batches[b], grads[b], 1.0)
        elif j % 4 == 1:
          push_fn(batches[b], grads[b])
        elif j % 4 == 2:
          t.push(ragged[b], ragged_grads, 1.0, shared_grads=True)
        else:
          ragged_push_fn(ragged[b], ragged_grads)
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  def reader():
    # Plain pulls, and pulls that sum hot rows, dense and ragged (all under
    # the same locks: the sums' columns are equal too, and never go back
    # up).
    by_row = tf.RaggedTensor.from_row_lengths(hot, [3, 0, 8, 5])
    last = [np.zeros(len(hot)), np.zeros(len(hot) // 4), np.zeros(4)]
    try:
      while not stop.is_set():
        for j, v in enumerate((t.pull(hot).numpy(),
                               t.pull(hot.reshape(4, 4), combiner="sum").numpy(),
                               t.pull(by_row, combiner="sum").numpy())):
          if not (v == v[:, :1]).all():
            errors.append(AssertionError("torn row: %s" % v))
            return
          if (v[:, 0] > last[j]).any():
            errors.append(AssertionError("value went back up"))
            return
          last[j] = v[:, 0]
    except Exception as e:  # pragma: no cover
      errors.append(e)

  threads = [threading.Thread(target=pusher, args=(i,)) for i in range(num_pushers)]
  readers = [threading.Thread(target=reader) for _ in range(2)]
  for th in readers + threads:
    th.start()
  for th in threads:
    th.join()
  stop.set()
  for th in readers:
    th.join()
  assert not errors, errors
  expected = -1250.0 * pushes_per_thread * num_pushers
  np.testing.assert_array_equal(t.pull(hot).numpy(), np.full((16, dim), expected))
  assert int(t.export().step) == pushes_per_thread * num_pushers


# ---------------------------------------------------------------- admission, eviction

def test_admission_needs_min_count_pulls():
  t = table(dim=2, optimizer="sgd", initializer="uniform", seed=2,
            admission_min_count=3)
  init = table(dim=2, seed=2).pull([5]).numpy()
  np.testing.assert_array_equal(t.pull([5]).numpy(), init)  # seen once
  assert int(t.size()) == 0
  t.push([5], [[1.0, 1.0]], 1.0)  # not admitted: dropped
  np.testing.assert_array_equal(t.pull([5], insert_missing=False).numpy(), init)
  t.pull([5], insert_missing=False)  # serving reads do not count
  t.pull([5])  # second time
  assert int(t.size()) == 0
  np.testing.assert_array_equal(t.pull([5]).numpy(), init)  # third: admitted
  assert int(t.size()) == 1
  t.push([5], [[1.0, 1.0]], 1.0)
  np.testing.assert_allclose(t.pull([5]).numpy(), init - 1.0, rtol=1e-6)
  # Duplicates in one batch count one by one.
  t.pull([9, 9, 9])
  assert int(t.size()) == 2


def test_admission_counts_export_and_import():
  t = table(dim=2, admission_min_count=3)
  t.pull([5, 5, 7, 9, 9, 9])  # 9 admitted on its third occurrence
  assert admission_counts(t) == {5: 2, 7: 1}
  assert t.export().keys.numpy().tolist() == [9]
  u = table(dim=2, admission_min_count=3)
  u.pull([11, 11])
  snap = t.export()
  u.import_(snap.keys, snap.values, snap.slots)  # clears the counts
  assert admission_counts(u) == {}
  u.import_admission([5, 7, 9], [2, 1, 2])  # 9 has a row: skipped
  assert admission_counts(u) == {5: 2, 7: 1}
  u.pull([5, 7])  # 5 admitted, 7 counted
  assert sorted(u.export().keys.numpy().tolist()) == [5, 9]
  assert admission_counts(u) == {7: 2}
  # Bad input is refused before the counts are touched.
  for keys, counts, match in [
      ([1, 2], [1], r"counts must have shape \[2\] \(one count per key\), got \[1\]"),
      ([1], [0], r"counts\[0\] = 0 is outside \[1, 2\^32-1\]"),
      ([1, 2], [1, 2**32], r"counts\[1\] = 4294967296 is outside"),
      ([4, 8, 4], [1, 1, 1], "duplicate key 4"),
      ([[1]], [1], r"keys must be a vector, got shape \[1,1\]")]:
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
      u.import_admission(keys, counts)
  assert admission_counts(u) == {7: 2}
  # A table without admission counts nothing and ignores imported counts.
  v = table(dim=2)
  v.pull([1, 1])
  v.import_admission([2], [5])
  assert admission_counts(v) == {}


def test_eviction_by_frequency_and_idle_steps():
  t = table(dim=2, optimizer="adagrad", track_usage=True)
  t.pull([1, 2, 3, 4])
  for _ in range(3):
    t.push([1, 1, 2], np.ones((3, 2), np.float32), 0.1)  # 1: freq 6, 2: freq 3
  t.push([3], [[1.0, 1.0]], 0.1)  # freq 1, last step 4
  for _ in range(5):
    t.push([2], [[1.0, 1.0]], 0.1)  # 2: freq 8, last step 9
  s = t.export()
  assert s.counters.shape == (4, 2)
  counters = dict(zip(s.keys.numpy(), s.counters.numpy().tolist()))
  assert counters == {1: [6, 3], 2: [8, 9], 3: [1, 4], 4: [0, 0]}
  assert int(t.evict(min_frequency=2)) == 2  # 3 and 4
  assert sorted(t.export().keys.numpy()) == [1, 2]
  assert int(t.evict(max_idle_steps=6)) == 0  # 1 idle for 6 steps
  assert int(t.evict(max_idle_steps=5)) == 1
  assert t.export().keys.numpy().tolist() == [2]
  # The rest still works after compaction.
  t.pull([10, 11])
  assert int(t.size()) == 3


def test_evict_needs_track_usage():
  with pytest.raises(tf.errors.FailedPreconditionError, match="track_usage"):
    table(dim=2).evict(min_frequency=1)


# ---------------------------------------------------------------- export / import

@pytest.mark.parametrize("opt", sparse_table.OPTIMIZERS)
def test_export_import_roundtrip_is_bit_exact(opt):
  a = table(dim=3, optimizer=opt, track_usage=True)
  keys = np.arange(1000, dtype=np.int64) * 31
  a.pull(keys)
  a.push(keys[:500], np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32), 0.1)
  exported = a.export()
  b = table(dim=3, optimizer=opt, track_usage=True, num_shards=2)
  b.pull([1, 2, 3])  # replaced by the import
  b.import_(*exported)
  for x, y in zip(snapshot(a), snapshot(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_import_defaults_and_replaces():
  t = table(dim=2, optimizer="adagrad",
            optimizer_options={"initial_accumulator_value": 0.25})
  t.pull([100])
  t.import_([1, 2], [[1.0, 2.0], [3.0, 4.0]])
  k, v, s, c, step = snapshot(t)
  np.testing.assert_array_equal(k, [1, 2])
  np.testing.assert_array_equal(v, [[1, 2], [3, 4]])
  np.testing.assert_array_equal(s, np.full((2, 1, 2), 0.25, np.float32))
  assert c.shape == (2, 0) and step == 0


# ---------------------------------------------------------------- bad input

def test_grads_shape_mismatch():
  t = table(dim=16)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"SparseTablePush: grads shape \[4,8\] does not match "
                           r"keys shape \[4\] \+ \[dim=16\]"):
    gen.sparse_table_push(t.resource_handle, tf.zeros([4], tf.int64),
                          tf.zeros([4, 8]), 0.1)

  # Unknown static shapes: the kernel checks at run time.
  @tf.function(input_signature=[tf.TensorSpec(None, tf.int64),
                                tf.TensorSpec(None, tf.float32)])
  def f(k, g):
    return gen.sparse_table_push(t.resource_handle, k, g, 0.1)

  with pytest.raises(tf.errors.InvalidArgumentError, match="does not match keys shape"):
    f(tf.zeros([3], tf.int64), tf.zeros([4, 16]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="does not match keys shape"):
    f(tf.zeros([3], tf.int64), tf.zeros([3]))
  # Known static shapes: the C++ shape function refuses at trace time.
  with pytest.raises(ValueError, match="Dimension 0 in both shapes must be equal"):
    tf.function(lambda k, g: gen.sparse_table_push(t.resource_handle, k, g, 0.1))(
        tf.zeros([3], tf.int64), tf.zeros([4, 16]))


def test_pull_dim_attr_mismatch():
  t = table(dim=4)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="attr dim=8 does not match the table's dim 4"):
    gen.sparse_table_pull(t.resource_handle, [1], dim=8)


def test_variable_handle_is_refused():
  v = tf.Variable(tf.zeros([4]))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="SparseTablePull: table_handle is not a live SparseTable"):
    gen.sparse_table_pull(v.handle, [1], dim=4)
  with pytest.raises(tf.errors.InvalidArgumentError, match="SparseTablePush"):
    gen.sparse_table_push(v.handle, [1], [[1.0] * 4], 0.1)
  with pytest.raises(tf.errors.InvalidArgumentError, match="SparseTableExport"):
    gen.sparse_table_export(v.handle)


def test_non_scalar_handles_are_refused():
  t = table(dim=2)
  h = t.resource_handle
  # (TensorFlow's eager runtime refuses an empty handle tensor itself.)
  msg = "table_handle must be a scalar resource|Empty resource handle"
  for bad in (tf.stack([h, h]), tf.gather(tf.stack([h]), tf.zeros([0], tf.int32))):
    with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
      gen.sparse_table_pull(bad, [1], dim=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
      gen.sparse_table_size(bad)


def test_destroyed_table_is_a_clean_error():
  t = table(dim=2)
  h = t.resource_handle
  tf.raw_ops.DestroyResourceOp(resource=h)
  with pytest.raises(tf.errors.NotFoundError, match="SparseTableSize"):
    gen.sparse_table_size(h)


@pytest.mark.parametrize("attrs,msg", [
    ({"dim": 0}, "dim"),
    ({"dim": -3}, "dim"),
    ({"dim": 1 << 20}, r"dim=1048576 must be in \[1, 65536\]"),
    ({"dim": 4, "num_shards": 3}, "num_shards=3 must be a power of two"),
    ({"dim": 4, "num_shards": 8192}, "num_shards"),
    ({"dim": 4, "optimizer": "adam", "epsilon": 0.0}, "epsilon=0 must be finite and > 0"),
    ({"dim": 4, "optimizer": "adam", "beta1": 1.0}, "beta1"),
    ({"dim": 4, "optimizer": "adam", "beta2": float("nan")}, "beta2"),
    ({"dim": 4, "optimizer": "adagrad", "epsilon": 0.0,
      "initial_accumulator_value": 0.0}, "adagrad needs epsilon > 0"),
    ({"dim": 4, "optimizer": "ftrl", "l1": -1.0}, "l1"),
    ({"dim": 4, "optimizer": "ftrl", "learning_rate_power": 0.5}, "learning_rate_power"),
    ({"dim": 4, "init_scale": float("inf")}, "init_scale"),
    ({"dim": 4, "admission_min_count": -1}, "admission_min_count"),
    ({"dim": 4, "optimizer": "rmsprop"}, "optimizer"),
    ({"dim": 4, "initializer": "ones"}, "initializer"),
])
def test_bad_handle_attrs(attrs, msg):
  with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
    gen.sparse_table_handle(**attrs)


def test_bad_push_inputs():
  t = table(dim=2, optimizer="ftrl")
  with pytest.raises(tf.errors.InvalidArgumentError, match="learning_rate must be a scalar"):
    gen.sparse_table_push(t.resource_handle, [1], [[1.0, 1.0]], [0.1, 0.2])
  with pytest.raises(tf.errors.InvalidArgumentError, match="must be > 0 for the ftrl"):
    gen.sparse_table_push(t.resource_handle, [1], [[1.0, 1.0]], 0.0)
  with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
    gen.sparse_table_push(t.resource_handle, tf.constant([1], tf.int32), [[1.0, 1.0]], 0.1)
  with pytest.raises(tf.errors.InvalidArgumentError, match="grads must have rank"):
    sparse_table.unique_grads([1, 2], [1.0, 2.0])


def test_bad_import_leaves_the_table_unchanged():
  t = table(dim=3, optimizer="adam")
  t.pull([1, 2, 3])
  t.push([1], [[1.0, 1.0, 1.0]], 0.1)
  before = snapshot(t)
  h = t.resource_handle
  k = tf.constant([5, 6], tf.int64)
  v = tf.zeros([2, 3])
  s = tf.zeros([2, 2, 3])
  c = tf.zeros([2, 1], tf.int64)
  cases = [
      ((k, tf.zeros([2, 4]), s, c, 0), "values have dim 4 but the table has dim 3"),
      ((k, tf.zeros([3, 3]), s, c, 0), r"values must have shape \[2, 3\]"),
      ((k, v, tf.zeros([2, 1, 3]), c, 0), r"slots must have shape \[2, 2, 3\] for optimizer 'adam'"),
      ((k, v, s, tf.zeros([2, 2], tf.int64), 0), r"counters must have shape \[2, 1\]"),
      ((k, v, s, tf.constant([[1], [-1]], tf.int64), 0), r"counters\[1, 0\] = -1"),
      ((k, v, s, tf.constant([[1], [2**32]], tf.int64), 0), "outside"),
      ((k, v, s, c, -5), "step must be >= 0"),
      ((tf.constant([5, 5], tf.int64), v, s, c, 0), "duplicate key 5"),
  ]
  for args, msg in cases:
    with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
      gen.sparse_table_import(h, *args)
  after = snapshot(t)
  for x, y in zip(before, after):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_python_wrapper_argument_errors():
  with pytest.raises(ValueError, match="optimizer"):
    hpc_ops.SparseTable(4, optimizer="rmsprop")
  with pytest.raises(ValueError, match="does not take"):
    hpc_ops.SparseTable(4, optimizer="sgd", optimizer_options={"epsilon": 1.0})
  with pytest.raises(TypeError, match="int64"):
    table().pull(tf.constant([1.5]))
  with pytest.raises(TypeError, match="int64"):
    table().pull(tf.ragged.constant([[1.5], []]), combiner="sum")
  with pytest.raises(ValueError, match="ragged keys need a combiner"):
    sparse_table.embedding_lookup(table(), tf.ragged.constant([[1], []]),
                                  tf.Variable(0.0))
