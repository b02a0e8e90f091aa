"""Fuzz spec for the sparse_table family: every op with live tables of
several configurations, handles of the wrong resource type, malformed
shapes/dtypes, bad ids and bad attrs."""
import numpy as np
import strategies
from fuzz_ops import OpSpec
from hypothesis import strategies as st

# (dim, num_slots, num_counters) -> handle, filled by _setup().
_TABLES = []
_WRONG = []


def _setup():
  import tensorflow as tf
  from hpc_ops import gen_sparse_table_ops as gen
  if _TABLES:
    return
  for i, (dim, opt, track) in enumerate([(1, "sgd", False), (4, "adagrad", True),
                                         (3, "adam", False), (2, "ftrl", True)]):
    h = gen.sparse_table_handle(dim=dim, optimizer=opt, track_usage=track,
                                num_shards=4, admission_min_count=i % 3,
                                shared_name="fuzz_table_%d" % i)
    slots = {"sgd": 0, "adagrad": 1, "adam": 2, "ftrl": 2}[opt]
    counters = (1 if opt == "adam" else 0) + (2 if track else 0)
    _TABLES.append((h, dim, slots, counters))
  v = tf.Variable(tf.zeros([4]))
  lookup = tf.lookup.experimental.MutableHashTable(tf.int64, tf.float32, 0.0)
  h = _TABLES[1][0]
  deleted = gen.sparse_table_handle(dim=4, shared_name="fuzz_deleted")
  tf.raw_ops.DestroyResourceOp(resource=deleted)
  _WRONG.extend([
      v.handle,                                   # another resource type
      deleted,                                    # a destroyed table
      tf.stack([h, h]),                           # rank 1
      tf.gather(tf.stack([h]), tf.zeros([0], tf.int32)),  # empty
      lookup.resource_handle,                     # a lookup table
  ])
  _WRONG.extend([v, lookup])  # keep the resources alive (not drawn)


@st.composite
def _handle(draw):
  """A live table (with its dim, slots, counters) or a bad handle: another
  resource type, a destroyed table, a rank-1 or an empty handle tensor."""
  if draw(st.integers(0, 5)) == 0 and _WRONG:
    return draw(st.sampled_from(_WRONG[:5])), 4, 1, 2
  return draw(st.sampled_from(_TABLES))


def _grads_like(draw, keys, dim, shared=False):
  """Gradients for keys: right (keys.shape + (dim,), or without keys' last
  axis when shared), one off, or anything."""
  shape = tuple(int(d) for d in getattr(keys, "shape", ()))
  shape = (shape[:-1] if shared else shape) + (dim,)
  pick = draw(st.integers(0, 3))
  if pick == 1:  # one off in the last or the first dimension
    i = draw(st.sampled_from([0, len(shape) - 1]))
    shape = shape[:i] + (shape[i] + 1,) + shape[i + 1:]
  if pick <= 1:
    if any(d >= strategies.HUGE for d in shape):
      shape = tuple(0 if d >= strategies.HUGE else d for d in shape)
    return draw(strategies.arrays(dtypes=[np.float32], shape=shape))
  return draw(strategies.arrays(dtypes=[np.float32, np.float64, np.int64]))


@st.composite
def _handle_case(draw):
  attrs = (
      "dim", draw(st.sampled_from([1, 4, 0, -1, 65536, 65537, 2**40])),
      "initializer", draw(st.sampled_from(["zeros", "uniform", "truncated_normal", "bad"])),
      "init_scale", draw(strategies.float_attr()),
      "seed", draw(st.sampled_from([0, -1, 2**62])),
      "optimizer", draw(st.sampled_from(["sgd", "adagrad", "adam", "ftrl", "bad"])),
      "initial_accumulator_value", draw(strategies.float_attr()),
      "epsilon", draw(strategies.float_attr()),
      "beta1", draw(strategies.float_attr()),
      "beta2", draw(strategies.float_attr()),
      "learning_rate_power", draw(strategies.float_attr()),
      "l1", draw(strategies.float_attr()),
      "l2", draw(strategies.float_attr()),
      "num_shards", draw(st.sampled_from([1, 3, 64, 4096, 8192, 0, -4])),
      "admission_min_count", draw(st.sampled_from([0, 2, -1])),
      "track_usage", draw(st.booleans()),
      "container", "",
      "shared_name", draw(st.sampled_from(["", "fuzz_shared"])),
  )
  return [], attrs


@st.composite
def _pull_case(draw):
  h, dim, _, _ = draw(_handle())
  keys = draw(st.one_of(strategies.ids(), strategies.arrays()))
  return [h, keys], ("dim", draw(st.sampled_from([dim, dim, 1, 0, -3, 2**40])),
                     "insert_missing", draw(st.booleans()),
                     "combiner", draw(st.sampled_from(["none", "sum", "mean",
                                                       "bad"])))


def _ragged_keys(draw):
  """Keys and row splits for the ragged ops: splits over the keys, with
  one of them broken, or anything; returns (keys, splits, Tsplits)."""
  import tensorflow as tf
  flat = st.lists(st.sampled_from([0, 1, 7, 99, -1, 2**63 - 1]), max_size=40)
  keys = draw(st.one_of(flat.map(lambda k: np.array(k, np.int64)), flat.map(
      lambda k: np.array(k, np.int64)), strategies.ids(), strategies.arrays()))
  shape = tuple(int(d) for d in getattr(keys, "shape", ()))
  n = int(np.prod(shape)) if shape else 1
  pick = draw(st.integers(0, 3))
  if pick <= 1:  # splits over the n keys, or with one of them broken
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    splits = np.array([0] + cuts + [n], draw(st.sampled_from([np.int64,
                                                               np.int32])))
    if pick == 1:
      splits[draw(st.integers(0, len(splits) - 1))] = draw(
          st.sampled_from([-1, n + 1, 2**31 - 1]))
  else:
    splits = draw(strategies.arrays(dtypes=[np.int64, np.int32, np.float32]))
  int32 = getattr(splits, "dtype", None) in (np.int32, tf.int32)
  return keys, splits, (tf.int32 if int32 else tf.int64).as_datatype_enum


@st.composite
def _pull_ragged_case(draw):
  h, dim, _, _ = draw(_handle())
  keys, splits, tsplits = _ragged_keys(draw)
  return [h, keys, splits], (
      "dim", draw(st.sampled_from([dim, dim, 1, 0])),
      "insert_missing", draw(st.booleans()),
      "combiner", draw(st.sampled_from(["sum", "mean", "sum", "none"])),
      "Tsplits", tsplits)


@st.composite
def _push_ragged_case(draw):
  h, dim, _, _ = draw(_handle())
  keys, splits, tsplits = _ragged_keys(draw)
  shape = tuple(int(d) for d in getattr(splits, "shape", ()))
  if len(shape) == 1 and 1 <= shape[0] < strategies.HUGE:
    # A row per ragged row, one off, or anything.
    rows = np.zeros([shape[0] - 1], np.int64)
    grads = _grads_like(draw, rows, dim)
  else:
    grads = draw(strategies.arrays(dtypes=[np.float32, np.float64]))
  lr = draw(st.sampled_from([0.1, 0.0, -1.0, np.nan]).map(np.float32))
  return [h, keys, splits, grads, lr], (
      "combiner", draw(st.sampled_from(["sum", "mean", "bad"])),
      "Tsplits", tsplits)


@st.composite
def _push_case(draw):
  h, dim, _, _ = draw(_handle())
  keys = draw(st.one_of(strategies.ids(), strategies.ids(), strategies.arrays()))
  shared = draw(st.booleans())
  grads = _grads_like(draw, keys, dim, shared)
  lr = draw(st.one_of(
      st.sampled_from([0.1, 0.0, -1.0, np.nan, np.inf]).map(np.float32),
      strategies.arrays(dtypes=[np.float32])))
  return [h, keys, grads, lr], ("shared_grads", shared, "combiner",
                                 draw(st.sampled_from(["sum", "mean", "bad"])))


@st.composite
def _handle_only_case(draw):
  h = draw(_handle())[0]
  if draw(st.integers(0, 9)) == 0:
    return [draw(strategies.arrays())], ()
  return [h], ()


@st.composite
def _import_case(draw):
  h, dim, slots, counters = draw(_handle())
  n = draw(st.integers(0, 6))
  mode = draw(st.integers(0, 2))
  if mode == 2:  # almost right: one dimension off, or one bad counter
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes = [(n,), (n, dim), (n, slots, dim), (n, counters)]
    which = draw(st.integers(0, 4))
    if which < 4:
      s = list(shapes[which])
      s[draw(st.integers(0, len(s) - 1))] += 1
      shapes[which] = tuple(s)
    keys = rng.choice(1000, size=shapes[0][0], replace=False).astype(np.int64)
    cnt = rng.integers(0, 5, size=shapes[3]).astype(np.int64)
    if which == 4 and cnt.size:
      cnt.flat[0] = draw(st.sampled_from([-1, 2**32, 2**63 - 1]))
    return [h, keys, rng.standard_normal(shapes[1]).astype(np.float32),
            rng.standard_normal(shapes[2]).astype(np.float32), cnt,
            np.int64(3)], ()
  if mode == 1:  # well-formed apart from the data itself
    keys = draw(strategies.arrays(dtypes=[np.int64], shape=(n,)))
    values = draw(strategies.arrays(dtypes=[np.float32], shape=(n, dim)))
    slot_arr = draw(strategies.arrays(dtypes=[np.float32], shape=(n, slots, dim)))
    cnt = draw(strategies.arrays(dtypes=[np.int64], shape=(n, counters)))
    step = np.int64(draw(st.sampled_from([0, 5, -1, 2**62])))
  else:
    keys = draw(strategies.arrays())
    values = draw(strategies.arrays())
    slot_arr = draw(strategies.arrays())
    cnt = draw(strategies.arrays())
    step = draw(strategies.arrays())
  return [h, keys, values, slot_arr, cnt, step], ()


@st.composite
def _import_admission_case(draw):
  h = draw(_handle())[0]
  mode = draw(st.integers(0, 2))
  n = draw(st.integers(0, 6))
  if mode == 2:  # almost right: a count missing, out of range, or a duplicate key
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keys = rng.choice(1000, size=n, replace=False).astype(np.int64)
    counts = rng.integers(1, 5, size=n).astype(np.int64)
    which = draw(st.integers(0, 2))
    if which == 0:
      counts = counts[1:] if n else np.ones([1], np.int64)
    elif n and which == 1:
      counts[0] = draw(st.sampled_from([0, -1, 2**32, 2**63 - 1]))
    elif n > 1:
      keys[-1] = keys[0]
    return [h, keys, counts], ()
  if mode == 1:  # well-formed apart from the data itself
    return [h, draw(strategies.arrays(dtypes=[np.int64], shape=(n,))),
            draw(strategies.arrays(dtypes=[np.int64], shape=(n,)))], ()
  return [h, draw(strategies.arrays()), draw(strategies.arrays())], ()


@st.composite
def _init_from_dense_case(draw):
  h, dim, _, _ = draw(_handle())
  if draw(st.booleans()):
    n = draw(st.integers(0, 6))
    values = draw(strategies.arrays(dtypes=[np.float32],
                                    shape=(n, draw(st.sampled_from([dim, dim + 1])))))
  else:
    values = draw(strategies.arrays())
  return [h, values], ()


@st.composite
def _evict_case(draw):
  h = draw(_handle())[0]
  scalar = st.sampled_from([0, 1, -1, 2**62, -2**63]).map(np.int64)
  return [h, draw(st.one_of(scalar, strategies.arrays())),
          draw(st.one_of(scalar, strategies.arrays()))], ()


@st.composite
def _row_splits_case(draw):
  """SparseTensor indices in row-major order within a small dense shape
  (the output has dense_shape[0] + 1 entries), with one row index broken,
  or anything; dense_shape right, negative or of another rank."""
  rows = draw(st.sampled_from([0, 1, 3, 8, 100]))
  rank = draw(st.integers(1, 3))
  pick = draw(st.integers(0, 3))
  if pick <= 1 and rows > 0:
    first = sorted(draw(st.lists(st.integers(0, rows - 1), max_size=40)))
    indices = np.zeros([len(first), rank], np.int64)
    indices[:, 0] = first
    if pick == 1 and len(first):
      indices[draw(st.integers(0, len(first) - 1)), 0] = draw(
          st.sampled_from([-1, rows, 2**63 - 1, -2**63]))
  else:
    indices = draw(st.one_of(strategies.ids(), strategies.arrays()))
  shape = np.full([rank], 5, np.int64)
  shape[0] = draw(st.sampled_from([rows, rows, -1, -2**62]))
  # Not drawn int64 values: a large dense_shape[0] would allocate gigabytes.
  dense_shape = draw(st.one_of(st.just(shape), st.just(shape[:-1]),
                               strategies.arrays(dtypes=[np.int32], min_rank=1)))
  return [indices, dense_shape], ()


@st.composite
def _unique_case(draw):
  keys = draw(st.one_of(strategies.ids(), strategies.arrays()))
  dim = draw(st.integers(0, 5))
  return [keys, _grads_like(draw, keys, dim)], ()


SPECS = [
    OpSpec("SparseTableHandle", _handle_case(), num_outputs=1, setup=_setup),
    OpSpec("SparseTablePull", _pull_case(), num_outputs=1, setup=_setup),
    OpSpec("SparseTablePullRagged", _pull_ragged_case(), num_outputs=1,
           setup=_setup),
    OpSpec("SparseTablePush", _push_case(), num_outputs=1, setup=_setup),
    OpSpec("SparseTablePushRagged", _push_ragged_case(), num_outputs=1,
           setup=_setup),
    OpSpec("SparseTableSize", _handle_only_case(), num_outputs=1, setup=_setup),
    OpSpec("SparseTableExport", _handle_only_case(), num_outputs=5, setup=_setup),
    OpSpec("SparseTableImport", _import_case(), num_outputs=0, setup=_setup),
    OpSpec("SparseTableExportAdmission", _handle_only_case(), num_outputs=2,
           setup=_setup),
    OpSpec("SparseTableImportAdmission", _import_admission_case(), num_outputs=0,
           setup=_setup),
    OpSpec("SparseTableInitFromDense", _init_from_dense_case(), num_outputs=0,
           setup=_setup),
    OpSpec("SparseTableEvict", _evict_case(), num_outputs=1, setup=_setup),
    OpSpec("SparseTableUniqueGrads", _unique_case(), num_outputs=2, setup=_setup),
    OpSpec("SparseTableRowSplits", _row_splits_case(), num_outputs=1),
]
