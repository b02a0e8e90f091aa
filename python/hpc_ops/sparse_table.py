"""The sparse_table op family: an embedding table keyed by int64 ids.

`SparseTable` is a TensorFlow resource (C++: kernels/sparse_table_op*.{h,cc})
holding one float32 row of `dim` elements per id, created on first pull, and
the row's optimizer slots; `push` applies the table's own optimizer (sgd,
adagrad, adam or ftrl) to the rows of a batch. It is a trackable:
`tf.train.Checkpoint` saves and restores keys, values, slots and counters
bit-exactly from one consistent snapshot (and the admission counts of keys
without a row yet), and `tf.saved_model.save` exports functions that pull
from it.

`embedding_lookup(table, keys, trigger)` is the differentiable pull: its
gradient pushes into the table (see `SparseEmbedding` in this module, the
Keras layer built on it).
"""
import collections
import itertools
import os
import re
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from hpc_ops import gen_sparse_table_ops

OPTIMIZERS = ("sgd", "adagrad", "adam", "ftrl")
INITIALIZERS = ("zeros", "uniform", "truncated_normal")

# Hyper-parameters each optimizer accepts in `optimizer_options`, with the
# defaults of the SparseTableHandle op.
OPTIMIZER_OPTIONS = {
    "sgd": {},
    "adagrad": {"initial_accumulator_value": 0.1, "epsilon": 1e-7},
    "adam": {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-7},
    "ftrl": {"initial_accumulator_value": 0.1, "learning_rate_power": -0.5,
             "l1": 0.0, "l2": 0.0},
}

# Slot vectors per row, in SparseTableExport's order.
SLOT_NAMES = {
    "sgd": (),
    "adagrad": ("accumulator",),
    "adam": ("m", "v"),
    "ftrl": ("accumulator", "linear"),
}

TableSnapshot = collections.namedtuple(
    "TableSnapshot", ["keys", "values", "slots", "counters", "step"])
AdmissionCounts = collections.namedtuple("AdmissionCounts", ["keys", "counts"])

_table_ids = itertools.count()


@keras.saving.register_keras_serializable(package="hpc_ops")
class SparseTable(tf.saved_model.experimental.TrackableResource):
  """A growing embedding table: int64 key -> float32[dim] row + slots.

  Args:
    dim: row width (1 to 65536).
    initializer: "zeros", "uniform" (in [-init_scale, init_scale)) or
      "truncated_normal" (stddev init_scale, cut at 2 stddev). A row's
      initial value depends only on (seed, key).
    init_scale: scale of the initializer.
    seed: initializer seed.
    optimizer: the table's optimizer: "sgd", "adagrad", "adam" or "ftrl".
    learning_rate: default learning rate of `push` and of the gradient of
      `embedding_lookup`: a float, a scalar `tf.Variable` or a callable
      returning a scalar.
    optimizer_options: dict of hyper-parameters (see OPTIMIZER_OPTIONS).
    num_shards: independently locked shards, a power of two (<= 4096).
    admission_min_count: if > 1, a key gets a trainable row only after it
      was pulled for training that many times (before: initial value, its
      gradients are dropped).
    track_usage: keep per-row push frequency and last push step, for
      `evict`.
    push_transform: optional callable `(keys, grads) -> (keys, grads)`
      applied to the distinct keys and summed gradients of every push made by
      the gradient of `embedding_lookup`, before the push (e.g. to gather the
      pushes of all data-parallel workers).
    shared_name: share the table with every other SparseTable (or
      SparseTableHandle op) of this name in the process. By default each
      SparseTable is private and freed when the object is deleted.
    name: name of the handle op (and prefix of the default shared name).
  """

  def __init__(self, dim, initializer="uniform", init_scale=0.05, seed=0,
               optimizer="adagrad", learning_rate=0.01,
               optimizer_options=None, num_shards=64, admission_min_count=0,
               track_usage=False, push_transform=None, shared_name=None,
               name="sparse_table"):
    super().__init__()
    if optimizer not in OPTIMIZERS:
      raise ValueError("SparseTable: optimizer must be one of %s, got %r"
                       % (OPTIMIZERS, optimizer))
    if initializer not in INITIALIZERS:
      raise ValueError("SparseTable: initializer must be one of %s, got %r"
                       % (INITIALIZERS, initializer))
    options = dict(OPTIMIZER_OPTIONS[optimizer])
    unknown = set(optimizer_options or {}) - set(options)
    if unknown:
      raise ValueError("SparseTable: optimizer %r does not take %s (it takes %s)"
                       % (optimizer, sorted(unknown), sorted(options)))
    options.update(optimizer_options or {})
    if push_transform is not None and not callable(push_transform):
      raise TypeError("SparseTable: push_transform must be callable")
    self._dim = int(dim)
    self._initializer = initializer
    self._init_scale = float(init_scale)
    self._seed = int(seed)
    self._optimizer = optimizer
    self._optimizer_options = {k: float(v) for k, v in options.items()}
    self._learning_rate = learning_rate
    self._num_shards = int(num_shards)
    self._admission_min_count = int(admission_min_count)
    self._track_usage = bool(track_usage)
    self.push_transform = push_transform
    self._name = name
    self._own_resource = shared_name is None
    if shared_name is None:
      # Eager kernels are cached by attrs, so a private table needs a name
      # of its own; inside a graph (SavedModel export) an empty name makes
      # the table private to the loaded kernel.
      shared_name = "%s_%d_%d" % (re.sub(r"[^A-Za-z0-9_.\-]", "_", name),
                                  os.getpid(), next(_table_ids))
      self._eager_shared_name = shared_name
      self._graph_shared_name = ""
    else:
      self._eager_shared_name = self._graph_shared_name = shared_name
    with tf.init_scope():
      self._resource_handle = self._create_resource()

  # ---- TrackableResource ----

  def _create_resource(self):
    shared_name = (self._eager_shared_name if tf.executing_eagerly()
                   else self._graph_shared_name)
    extra = {k: self._optimizer_options[k]
             for k in OPTIMIZER_OPTIONS[self._optimizer]}
    return gen_sparse_table_ops.sparse_table_handle(
        dim=self._dim, initializer=self._initializer,
        init_scale=self._init_scale, seed=self._seed,
        optimizer=self._optimizer, num_shards=self._num_shards,
        admission_min_count=self._admission_min_count,
        track_usage=self._track_usage, shared_name=shared_name,
        name=self._name, **extra)

  def _destroy_resource(self):
    if self._own_resource and self._resource_handle is not None:
      tf.raw_ops.DestroyResourceOp(resource=self._resource_handle,
                                   ignore_lookup_error=True)

  def _serialize_to_tensors(self):
    tensors = {}
    deps = []
    if self._admission_min_count > 1:
      # Counts first: a key admitted between the two reads is then in both,
      # and the restore skips its count; read the other way round it would
      # be in neither.
      adm = self.export_admission()
      tensors.update(admission_keys=adm.keys, admission_counts=adm.counts)
      deps = [adm.keys, adm.counts]
    with tf.control_dependencies(deps):
      snap = self.export()
    tensors.update(keys=snap.keys, values=snap.values, slots=snap.slots,
                   counters=snap.counters, step=snap.step)
    return tensors

  def _restore_from_tensors(self, restored_tensors):
    restore = gen_sparse_table_ops.sparse_table_import(
        self.resource_handle, restored_tensors["keys"],
        restored_tensors["values"], restored_tensors["slots"],
        restored_tensors["counters"], restored_tensors["step"])
    if "admission_keys" not in restored_tensors:
      return restore  # a checkpoint without counts (or not asked for them)
    with tf.control_dependencies([restore]):
      return self.import_admission(restored_tensors["admission_keys"],
                                   restored_tensors["admission_counts"])

  # ---- properties ----

  @property
  def dim(self):
    return self._dim

  @property
  def optimizer(self):
    return self._optimizer

  @property
  def optimizer_options(self):
    return dict(self._optimizer_options)

  @property
  def slot_names(self):
    return SLOT_NAMES[self._optimizer]

  @property
  def learning_rate(self):
    """The default learning rate as a float32 scalar tensor."""
    lr = self._learning_rate
    if callable(lr) and not isinstance(lr, tf.Variable):
      lr = lr()
    return tf.cast(tf.convert_to_tensor(lr), tf.float32)

  @property
  def name(self):
    return self._name

  # ---- ops ----

  def pull(self, keys, insert_missing=True, combiner=None, name=None):
    """Rows of `keys` (int64, any shape): a float32 tensor keys.shape+[dim].

    Keys without a row get one (their initial value) unless insert_missing
    is False (serving: the table is not changed and such keys read their
    initial value). combiner "sum" or "mean": the rows of each keys[..., :]
    added in order (and divided by their number), keys.shape[:-1] + [dim],
    without a row per key in memory; an empty last axis gives zeros. keys
    may be a tf.RaggedTensor: [rows, None] with a combiner gives [rows,
    dim] (each ragged row's rows added, an empty row zeros); without one,
    the rows as a RaggedTensor. Ragged keys of higher ragged rank combine
    their innermost rows, [rows, None, None] giving [rows, None, dim];
    ragged keys with a uniform inner axis ([rows, None, 3]) combine that
    axis as dense keys do. With a combiner keys may also be a rank-2
    tf.SparseTensor (its rows combined, see `sparse_rows`). Not
    differentiable: see `embedding_lookup`.
    """
    if isinstance(keys, tf.SparseTensor):
      keys = _sparse_with_combiner(keys, combiner, "SparseTable.pull")
    if isinstance(keys, tf.RaggedTensor):
      keys = _ragged_int64(keys)
      if combiner is None:
        return keys.with_flat_values(self.pull(keys.flat_values,
                                               insert_missing, name=name))
      return _combine_ragged(
          keys, lambda k: self.pull(k, insert_missing, combiner, name),
          lambda k: gen_sparse_table_ops.sparse_table_pull_ragged(
              self.resource_handle, k.values, k.row_splits, dim=self._dim,
              insert_missing=insert_missing, combiner=combiner, name=name))
    keys = _as_int64(keys, "keys")
    return gen_sparse_table_ops.sparse_table_pull(
        self.resource_handle, keys, dim=self._dim,
        insert_missing=insert_missing, combiner=combiner or "none", name=name)

  def push(self, keys, grads, learning_rate=None, shared_grads=False,
           combiner="sum", name=None):
    """One optimizer step: grads (keys.shape + [dim]) of equal keys are
    summed, then every distinct key's row and slots are updated once.
    shared_grads=True: grads is keys.shape[:-1] + [dim], one row for the
    keys of each keys[..., :] (the ids of an example summed into one
    embedding), used for each of them without copies. keys may be a
    tf.RaggedTensor: [rows, None] with shared_grads gives each ragged row
    one gradient row (grads [rows, dim], the gradient of
    pull(keys, combiner="sum")); so does each innermost row of keys of
    higher ragged rank (grads as that pull gives them, ragged, or their
    flat values), and keys with a uniform inner axis share as dense keys
    do. Without shared_grads grads holds a row per key (a RaggedTensor
    [rows, None, dim] or its flat values [n, dim]). combiner="mean" (with
    shared_grads) divides each gradient row by the number of keys sharing
    it, the gradient of pull(keys, combiner="mean").
    Returns the table's step after this push (int64 scalar)."""
    lr = self.learning_rate if learning_rate is None else tf.cast(
        learning_rate, tf.float32)
    if isinstance(keys, tf.RaggedTensor):
      keys = _ragged_int64(keys)
      if isinstance(grads, tf.RaggedTensor):
        grads = grads.flat_values
      if shared_grads and keys.flat_values.shape.rank == 1:
        while keys.ragged_rank > 1:  # the innermost rows share the rows
          keys = keys.values
        return gen_sparse_table_ops.sparse_table_push_ragged(
            self.resource_handle, keys.values, keys.row_splits,
            tf.convert_to_tensor(grads, tf.float32), lr,
            combiner=combiner or "sum", name=name)
      keys = keys.flat_values
    keys = _as_int64(keys, "keys")
    grads = tf.convert_to_tensor(grads, tf.float32)
    return gen_sparse_table_ops.sparse_table_push(
        self.resource_handle, keys, grads, lr, shared_grads=shared_grads,
        combiner=combiner or "sum", name=name)

  def size(self, name=None):
    """The number of rows (int64 scalar)."""
    return gen_sparse_table_ops.sparse_table_size(self.resource_handle,
                                                  name=name)

  def export(self, name=None):
    """A consistent snapshot: TableSnapshot(keys [n], values [n, dim],
    slots [n, num_slots, dim], counters [n, num_counters] int64, step)."""
    return TableSnapshot(*gen_sparse_table_ops.sparse_table_export(
        self.resource_handle, name=name))

  def import_(self, keys, values, slots=None, counters=None, step=0,
              name=None):
    """Replaces the contents (all-or-nothing). `slots` defaults to the
    optimizer's initial slots, `counters` to zeros."""
    keys = _as_int64(keys, "keys")
    values = tf.convert_to_tensor(values, tf.float32)
    n = tf.shape(keys)[0]
    if slots is None:
      inits = [self._optimizer_options.get("initial_accumulator_value", 0.0)
               if s == "accumulator" else 0.0 for s in self.slot_names]
      slots = tf.broadcast_to(tf.reshape(tf.constant(inits, tf.float32),
                                         [1, len(inits), 1]),
                              tf.stack([n, len(inits), self._dim]))
    if counters is None:
      counters = tf.zeros(tf.stack([n, self.num_counters]), tf.int64)
    return gen_sparse_table_ops.sparse_table_import(
        self.resource_handle, keys, values,
        tf.convert_to_tensor(slots, tf.float32),
        tf.convert_to_tensor(counters, tf.int64),
        tf.convert_to_tensor(step, tf.int64), name=name)

  def export_admission(self, name=None):
    """The admission counts, from one moment: AdmissionCounts(keys [n],
    counts [n] int64) of the keys pulled for training that have no row yet.
    Empty unless admission_min_count > 1."""
    return AdmissionCounts(*gen_sparse_table_ops.sparse_table_export_admission(
        self.resource_handle, name=name))

  def import_admission(self, keys, counts, name=None):
    """Replaces the admission counts (all-or-nothing; keys that have a row
    are skipped). `import_` clears them, so call this after it."""
    return gen_sparse_table_ops.sparse_table_import_admission(
        self.resource_handle, _as_int64(keys, "keys"),
        tf.convert_to_tensor(counts, tf.int64), name=name)

  def evict(self, min_frequency=0, max_idle_steps=-1, name=None):
    """Removes rows pushed fewer than min_frequency times (if > 0) or not
    pushed in the last max_idle_steps steps (if >= 0); needs
    track_usage=True. Returns the number of rows removed."""
    return gen_sparse_table_ops.sparse_table_evict(
        self.resource_handle, tf.convert_to_tensor(min_frequency, tf.int64),
        tf.convert_to_tensor(max_idle_steps, tf.int64), name=name)

  @property
  def num_counters(self):
    return (1 if self._optimizer == "adam" else 0) + (
        2 if self._track_usage else 0)

  def get_config(self):
    """The constructor arguments (except push_transform and shared_name);
    a learning_rate that is not a number is left out."""
    config = {
        "dim": self._dim, "initializer": self._initializer,
        "init_scale": self._init_scale, "seed": self._seed,
        "optimizer": self._optimizer,
        "optimizer_options": dict(self._optimizer_options),
        "num_shards": self._num_shards,
        "admission_min_count": self._admission_min_count,
        "track_usage": self._track_usage, "name": self._name,
    }
    if isinstance(self._learning_rate, (int, float)):
      config["learning_rate"] = float(self._learning_rate)
    return config

  @classmethod
  def from_config(cls, config):
    """A new, empty table of the same configuration."""
    return cls(**config)


def _sparse_with_combiner(keys, combiner, who):
  if combiner is None:
    raise ValueError("%s: sparse keys need a combiner (or look up their "
                     "values)" % who)
  return sparse_rows(keys)


def _as_int64(keys, what):
  keys = tf.convert_to_tensor(keys)
  if keys.dtype not in (tf.int64, tf.int32):
    raise TypeError("SparseTable: %s must be int64 (or int32), got %s"
                    % (what, keys.dtype.name))
  return tf.cast(keys, tf.int64)


def _ragged_int64(keys):
  """Ragged keys with int64 values."""
  return keys.with_flat_values(_as_int64(keys.flat_values, "keys"))


def _combine_ragged(keys, combine_dense, combine_rows):
  """What a combiner makes of ragged keys: with a uniform last axis (flat
  values of rank > 1), combine_dense of the flat values, which combines
  that axis; else combine_rows of the innermost [rows, None] part (ragged
  rank 1). The outer row partitions are kept either way."""
  rank = keys.flat_values.shape.rank
  if rank is None:
    raise ValueError("SparseTable: a combiner needs ragged keys whose "
                     "flat_values have a known rank, got %s" % (keys,))
  if rank > 1:
    return keys.with_flat_values(combine_dense(keys.flat_values))
  if keys.ragged_rank == 1:
    return combine_rows(keys)
  return keys.with_values(_combine_ragged(keys.values, combine_dense,
                                          combine_rows))


def sparse_rows(keys):
  """The rows of a rank-2 tf.SparseTensor of keys as a tf.RaggedTensor
  [rows, None] (row splits from SparseTableRowSplits, which checks that
  the indices are in row-major order). Each row keeps its values' order;
  unlike tf.RaggedTensor.from_sparse, column indices may have gaps (ids
  dropped by tf.sparse.retain, say), which a combiner ignores."""
  if keys.shape.rank is not None and keys.shape.rank != 2:
    raise ValueError("SparseTable: a combiner takes sparse keys of rank 2, "
                     "got shape %s" % (keys.shape,))
  splits = gen_sparse_table_ops.sparse_table_row_splits(keys.indices,
                                                        keys.dense_shape)
  return tf.RaggedTensor.from_row_splits(keys.values, splits, validate=False)


def unique_grads(keys, grads, name=None):
  """Distinct keys (first-occurrence order) and their summed gradients.

  keys: int64 of any shape; grads: keys.shape + [dim]. Returns
  (unique_keys [u], summed_grads [u, dim]); sums run in batch order.
  """
  return gen_sparse_table_ops.sparse_table_unique_grads(
      _as_int64(keys, "keys"), tf.convert_to_tensor(grads, tf.float32),
      name=name)


def embedding_lookup(table, keys, trigger, insert_missing=True,
                     learning_rate=None, combiner=None):
  """Differentiable pull whose gradient trains the table.

  Returns table.pull(keys, combiner=combiner): keys.shape + [dim], or with
  combiner "sum" or "mean" the rows of the last axis of keys summed or
  averaged (keys.shape[:-1] + [dim]; an empty axis gives zeros). `trigger`
  must be a trainable scalar variable that the caller differentiates (a
  tape only runs gradient functions on paths that reach a watched
  variable): when the gradient with respect to `trigger` is computed, the
  gradient of the loss with respect to the pulled rows is pushed into the
  table (through table.push_transform when set) and `trigger` gets a zero
  gradient. Each gradient computation pushes once. With a combiner the
  push takes one gradient row per combined row (shared_grads), not a copy
  for each key. keys may be a tf.RaggedTensor [rows, None] with a
  combiner: the pull combines each ragged row (SparseTablePullRagged) and
  the push gives each ragged row one gradient row (SparseTablePushRagged);
  so may a rank-2 tf.SparseTensor (see `sparse_rows`). Ragged keys of
  higher ragged rank, or with a uniform inner axis, combine as in
  SparseTable.pull.
  """
  return _lookup(table, keys, trigger, insert_missing, learning_rate,
                 with_probe=False, combiner=combiner)


def _lookup(table, keys, trigger, insert_missing, learning_rate, with_probe,
            combiner=None):
  """embedding_lookup; with_probe=True returns (rows, probe) instead.

  The probe is a float32 zero meant to be added to the loss (SparseEmbedding
  does it with add_loss). Its gradient is then the factor between what the
  tape differentiates and the loss: a loss-scale optimizer's scale, 1 without
  one, 0 when the probe is not in the loss. A factor above 1 is taken for a
  loss scale: the push divides the rows' gradient by it, and skips the push
  when that gradient (after push_transform, so all workers agree) is not
  finite, giving the trigger a NaN gradient, so that the loss-scale
  optimizer skips the step and lowers its scale as it does for the dense
  weights. A factor of 1 or less (a loss divided for gradient accumulation,
  say) pushes the gradient as it is, like the dense weights get it.
  """
  if combiner not in (None, "sum", "mean"):
    raise ValueError("embedding_lookup: combiner must be None, 'sum' or "
                     "'mean', got %r" % (combiner,))
  if isinstance(keys, tf.SparseTensor):
    keys = _sparse_with_combiner(keys, combiner, "embedding_lookup")
  ragged = isinstance(keys, tf.RaggedTensor)
  if ragged:
    if combiner is None:
      raise ValueError("embedding_lookup: ragged keys need a combiner (or "
                       "look up their flat_values)")
    keys = _ragged_int64(keys)
    if keys.ragged_rank > 1 or keys.flat_values.shape.rank != 1:
      # A uniform inner axis or the innermost ragged rows, looked up (and
      # pushed) on their own, the outer row partitions kept.
      probes = []

      def part(k):
        out = _lookup(table, k, trigger, insert_missing, learning_rate,
                      with_probe, combiner)
        if with_probe:
          probes.append(out[1])
          return out[0]
        return out

      rows = _combine_ragged(keys, part, part)
      return (rows, probes[0]) if with_probe else rows
  else:
    keys = _as_int64(keys, "keys")
  dim = table.dim
  if combiner is not None and keys.shape.rank == 0:
    raise ValueError("embedding_lookup: a combiner needs keys of rank >= 1")
  # With a combiner and no push_transform, the push takes one gradient row
  # per combined row (shared_grads: of the last axis of dense keys, of each
  # ragged row of ragged keys); push_transform sees the keys' own rows.
  shared = combiner is not None and table.push_transform is None

  def transformed(push_keys, push_grads):
    if table.push_transform is not None:
      push_keys, push_grads = unique_grads(push_keys, push_grads)
      push_keys, push_grads = table.push_transform(push_keys, push_grads)
    return push_keys, push_grads

  # A shared push of ragged keys divides each row by its key count itself
  # for 'mean' (TensorFlow's reduce_mean divides by the data-dependent row
  # sizes, as the kernel does). Dense keys' rows are divided here: with a
  # static last axis Grappler turns the division into a multiplication by
  # its reciprocal, in reduce_mean's gradient and here alike.
  push_mean = shared and ragged and combiner == "mean"

  def push(push_keys, push_grads):
    return table.push(push_keys, push_grads, learning_rate,
                      shared_grads=shared,
                      combiner="mean" if push_mean else "sum")

  def flat_grads(dy):
    if ragged:  # each key takes its ragged row's gradient (divided by its size)
      dy = tf.cast(tf.convert_to_tensor(dy), tf.float32)
      if shared:
        return keys, dy
      splits = keys.row_splits
      if combiner == "mean":
        counts = tf.cast(splits[1:] - splits[:-1], tf.float32)
        dy = dy / tf.maximum(counts, 1.0)[:, tf.newaxis]
      n = tf.shape(keys.values, out_type=splits.dtype)[0]
      row_ids = tf.searchsorted(splits, tf.range(n), side="right",
                                out_type=splits.dtype) - 1
      return keys.values, tf.gather(dy, row_ids)
    if combiner is not None:
      dy = tf.cast(tf.convert_to_tensor(dy), tf.float32)
      per_key = tf.shape(keys)[-1]
      if combiner == "mean":
        dy = dy / tf.cast(tf.maximum(per_key, 1), tf.float32)
      if shared:
        return (tf.reshape(keys, [-1, per_key]), tf.reshape(dy, [-1, dim]))
      dy = tf.broadcast_to(dy[..., tf.newaxis, :],
                           tf.concat([tf.shape(keys), [dim]], 0))
    if isinstance(dy, tf.IndexedSlices):
      push_keys = tf.gather(keys, dy.indices)
      push_grads = dy.values
    else:
      push_keys, push_grads = keys, dy
    return (tf.reshape(push_keys, [-1]),
            tf.reshape(tf.cast(push_grads, tf.float32), [-1, dim]))

  def zero_like_trigger(step, trigger_value):
    # The trigger's zero gradient must depend on the push by data: a
    # constant zero (even with a control dependency) lets Grappler fold
    # the trigger's update away and prune the push (seen with Keras Adam
    # in model.fit). The step is >= 1, Grappler cannot know it.
    return tf.cast(tf.minimum(step, 0), trigger_value.dtype)

  @tf.custom_gradient
  def _rows(trigger_value):
    values = table.pull(keys, insert_missing=insert_missing,
                        combiner=combiner)

    def grad(dy, dprobe=None):  # dprobe: only with the probe as an output
      push_keys, push_grads = flat_grads(dy)

      def as_is():
        return push(*transformed(push_keys, push_grads))

      if dprobe is None:
        return zero_like_trigger(as_is(), trigger_value)
      scale = tf.cast(dprobe, tf.float32)

      def unscaled():
        k, g = transformed(push_keys, push_grads / scale)
        finite = tf.reduce_all(tf.math.is_finite(g))
        step = tf.cond(finite, lambda: push(k, g),
                       lambda: tf.ones([], tf.int64))
        return step, tf.where(finite, 0.0, float("nan"))

      # Without a loss scale the factor is a constant 1, which Grappler
      # folds; its dead-branch pass then stops at the push's side-effect
      # Merge and logs a warning for the training function of a float32
      # fit. A pass-through it does not fold keeps the predicate a run-time
      # value (the branch taken is the same).
      scaled = tf.raw_ops.PlaceholderWithDefault(input=scale > 1.0, shape=[])
      step, nan_if_skipped = tf.cond(
          scaled, unscaled, lambda: (as_is(), tf.zeros([], tf.float32)))
      return zero_like_trigger(step, trigger_value) + tf.cast(
          nan_if_skipped, trigger_value.dtype)

    if with_probe:
      return (values, tf.zeros([], tf.float32)), grad
    return values, grad

  return _rows(tf.convert_to_tensor(trigger))


_TABLE_ENTRY = "table."  # SparseEmbedding's table entries in Keras's stores
# Written by a layer whose table's contents are in its _table_contents entry
# (or in the entry of an earlier layer that shares the table).
_STORED_APART = _TABLE_ENTRY + "stored_apart"


class _TableContents(keras.layers.Layer):
  """The contents of one SparseTable in Keras's formats (.keras,
  .weights.h5). Every SparseEmbedding on the table reaches this one object
  (`_table_contents`), and Keras saves and loads an object it reaches
  twice only once, so a table shared by several layers is stored once,
  with the first of them."""

  def __init__(self, table):
    super().__init__()
    self._table = weakref.ref(table)  # the table holds no link to this
    # What a layer on the table writes as its mark (_STORED_APART): the same
    # number for every layer on one table, another for every other table.
    self.mark = next(_table_marks)
    # The saved mark of the layer on the table loaded last (None: it stored
    # no mark, the earlier forms), and that of the layer whose contents
    # were loaded.
    self.pending_mark = None
    self.loaded_mark = None
    self.built = True

  def save_own_variables(self, store):
    """The table's checkpoint tensors (rows, slots, counters, step and any
    admission counts, from one consistent read)."""
    for name, value in self._table()._serialize_to_tensors().items():
      store[name] = value.numpy()

  def load_own_variables(self, store):
    # Loaded right after the layer it is stored with (Keras visits a
    # layer's own weights, then what it reaches).
    self.loaded_mark = self.pending_mark
    table = {name: tf.constant(store[name]) for name in store.keys()}
    if not table:
      if self.pending_mark is not None:  # its layer stored the table apart
        raise ValueError(
            "SparseEmbedding table %r: the saved weights keep its contents "
            "with another layer that shared the table when it was saved; "
            "build the model with those layers on one table (table=) to "
            "load them" % self._table().name)
      return  # weights of the earlier forms: the layer loads them
    _restore_saved_table(self._table(), table,
                         "SparseEmbedding table %r" % self._table().name)


def _restore_saved_table(table, tensors, what):
  missing = {"keys", "values", "slots", "counters", "step"} - set(tensors)
  if missing:
    raise ValueError("%s: the saved table lacks %s" % (what, sorted(missing)))
  table._restore_from_tensors(tensors)


class _TableCheck(keras.layers.Layer):
  """A layer's check, when Keras's formats load, that the table whose
  contents it loads was its own table when saved. Keras reaches it after the
  layer's `_table_contents`, so the shared contents have been loaded by
  then, with this layer or an earlier one on the table. Weights saved from
  layers with a table each, loaded into layers that share one, would
  otherwise load the first layer's table and skip the others. No other
  layer loads in between, so the contents' pending mark is still this
  layer's."""

  def __init__(self, layer):
    super().__init__()
    self._layer = weakref.ref(layer)
    self.built = True

  def save_own_variables(self, store):
    pass

  def load_own_variables(self, store):
    layer = self._layer()
    contents = layer._table_contents
    loaded, mark = contents.loaded_mark, contents.pending_mark
    # Mark 1: weights saved before marks told tables apart.
    if mark is None or loaded is None or 1 in (mark, loaded):
      return
    if mark != loaded:
      raise ValueError(
          "SparseEmbedding %r: the saved weights hold a table of its own, but "
          "in this model it shares table %r with an earlier layer, whose "
          "saved table was loaded into it; build the model with a table per "
          "layer, as when the weights were saved, to load them"
          % (layer.name, layer.table.name))


_table_marks = itertools.count(2)
_contents = weakref.WeakKeyDictionary()  # SparseTable -> _TableContents
_checks = weakref.WeakKeyDictionary()  # SparseEmbedding -> _TableCheck


def _one_per(registry, owner, make):
  """registry[owner], made by make(owner) on first use (made once: Keras
  tells saveables apart by id)."""
  if owner not in registry:
    registry[owner] = make(owner)
  return registry[owner]


@keras.saving.register_keras_serializable(package="hpc_ops")
class SparseEmbedding(keras.layers.Layer):
  """Embedding layer for int64 ids backed by a `SparseTable`.

  Inputs: int64 (or other integer; not float) ids as a dense tensor, a
  tf.RaggedTensor or a rank-2 tf.SparseTensor. combiner=None returns one
  row per id (dense: ids.shape + [dim]; ragged and sparse: a RaggedTensor
  [batch, None, dim]); "sum" or "mean" combine the ids of the last axis (of
  each row for ragged and sparse inputs; an empty row gives zeros):
  [batch, dim].

  Training: the layer owns a zero scalar trainable weight, the push
  trigger; the ids' rows are pulled through `embedding_lookup`, so when a
  Keras optimizer (or any tape) takes the gradient of the trigger the
  gradient of the rows is pushed into the table with the table's own
  optimizer and learning rate. Pulls insert new ids when training is true;
  otherwise (inference) unknown ids read their initial value.

  Loss scaling (mixed_float16, where Keras wraps the optimizer in a
  LossScaleOptimizer): a training call adds a zero to the layer's losses
  (`add_loss`), whose gradient tells the push the loss scale; the push
  applies the gradient of the unscaled loss and skips a step whose
  gradient overflowed, as the optimizer does for the dense weights. A
  custom loop that scales its loss must add `model.losses` before scaling,
  as Keras's own training step does.

  The table is tracked as `layer.table`: tf.train.Checkpoint and
  tf.saved_model save it, and Keras's own formats (`model.save` to
  .keras, `save_weights` to .weights.h5) store its contents once, with the
  first layer on the table (see _TableContents).

  Args: dim, combiner, table (an existing SparseTable to use), and the
  SparseTable arguments (initializer, init_scale, seed, optimizer,
  learning_rate, optimizer_options, num_shards, admission_min_count,
  track_usage, push_transform).
  """

  def __init__(self, dim, combiner=None, initializer="uniform",
               init_scale=0.05, seed=0, optimizer="adagrad",
               learning_rate=0.01, optimizer_options=None, num_shards=64,
               admission_min_count=0, track_usage=False,
               push_transform=None, table=None, **kwargs):
    super().__init__(**kwargs)
    if combiner not in (None, "sum", "mean"):
      raise ValueError("SparseEmbedding: combiner must be None, 'sum' or "
                       "'mean', got %r" % (combiner,))
    if table is not None and table.dim != dim:
      raise ValueError("SparseEmbedding: dim=%d but the table has dim %d"
                       % (dim, table.dim))
    self.dim = int(dim)
    self.combiner = combiner
    self.supports_jit = False  # custom ops: no XLA
    self._table_kwargs = dict(
        initializer=initializer, init_scale=init_scale, seed=seed,
        optimizer=optimizer, learning_rate=learning_rate,
        optimizer_options=optimizer_options, num_shards=num_shards,
        admission_min_count=admission_min_count, track_usage=track_usage,
        push_transform=push_transform)
    with tf.init_scope():
      self.table = table if table is not None else SparseTable(
          self.dim, name=(self.name + "_table"), **self._table_kwargs)

  def build(self, input_shape=None):
    self.push_trigger = self.add_weight(
        name="push_trigger", shape=(), initializer="zeros", trainable=True)
    self.built = True

  def _rows(self, ids, training, combiner=None):
    """The rows of ids, or their sum / mean over the last axis of ids."""
    if not training:
      return embedding_lookup(self.table, ids, self.push_trigger,
                              insert_missing=False, combiner=combiner)
    # The probe joins the loss through add_loss (a zero), so that the push
    # learns a loss-scale optimizer's scale (see _lookup). Keras (like
    # tf.nn.scale_regularization_loss) divides added losses by the number
    # of replicas of a tf.distribute strategy: multiplied back here.
    rows, probe = _lookup(self.table, ids, self.push_trigger,
                          insert_missing=True, learning_rate=None,
                          with_probe=True, combiner=combiner)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    self.add_loss(probe * float(replicas) if replicas > 1 else probe)
    return rows

  def call(self, inputs, training=None):
    if isinstance(inputs, tf.SparseTensor):
      # Combined rows need only the row ids (column gaps allowed); rows
      # returned as they are need from_sparse's check that none has gaps.
      inputs = (sparse_rows(inputs) if self.combiner is not None
                else tf.RaggedTensor.from_sparse(inputs))
    if isinstance(inputs, tf.RaggedTensor):
      ids = inputs.with_flat_values(self._int64_ids(inputs.flat_values))
      if self.combiner is None:
        rows = self._rows(ids.flat_values, training)
        return tf.cast(ids.with_flat_values(rows), self.compute_dtype)
      # Combined by the pull: each innermost ragged row
      # (SparseTablePullRagged), or a uniform inner axis as for dense ids.
    else:
      ids = self._int64_ids(tf.convert_to_tensor(inputs))
      if self.combiner is not None and ids.shape.rank == 1:
        ids = ids[:, tf.newaxis]
    return tf.cast(self._rows(ids, training, self.combiner),
                   self.compute_dtype)

  def compute_output_shape(self, input_shape):
    shape = tuple(input_shape)
    if self.combiner is not None and len(shape) >= 2:
      shape = shape[:-1]
    return shape + (self.dim,)

  def _int64_ids(self, ids):
    """The ids tensor as int64, once _check_ids_dtype took its type."""
    self._check_ids_dtype(ids.dtype)
    return tf.cast(ids, tf.int64)

  def _check_ids_dtype(self, dtype):
    """Ids must arrive as integers: a float tensor cannot hold every int64
    id (float32 is exact only below 2^24), so casting one back would merge
    and change ids without a word."""
    if not tf.as_dtype(dtype).is_integer:  # casts to int64 lose nothing
      raise TypeError(
          "SparseEmbedding %r: ids must be integers, got %s (a float "
          "input cannot hold every int64 id; build the model's input with "
          "keras.Input(..., dtype=\"int64\"))"
          % (self.name, tf.as_dtype(dtype).name))

  def compute_output_spec(self, inputs, training=None):
    self._check_ids_dtype(inputs.dtype)
    ragged = bool(getattr(inputs, "ragged", False)) or bool(
        getattr(inputs, "sparse", False))
    shape = self.compute_output_shape(inputs.shape)
    return keras.KerasTensor(shape, dtype=self.compute_dtype,
                             ragged=ragged and self.combiner is None)

  @property
  def _table_contents(self):
    """What Keras's formats store of the table (see _TableContents)."""
    return _one_per(_contents, self.table, _TableContents)

  @property
  def _table_contents_check(self):
    """Reached after _table_contents as Keras loads (see _TableCheck)."""
    return _one_per(_checks, self, _TableCheck)

  def save_own_variables(self, store):
    """Keras's formats: the layer's weight as Keras stores it ("0") and a
    mark that the table's contents are stored apart (_table_contents),
    which names the table among those of the save."""
    super().save_own_variables(store)
    store[_STORED_APART] = np.int64(self._table_contents.mark)

  def load_own_variables(self, store):
    """Also loads the earlier forms: the table's contents beside the
    layer's weight ("table.<name>" entries), or none."""
    names = list(store.keys())
    own = {n: store[n] for n in names if not n.startswith(_TABLE_ENTRY)}
    super().load_own_variables(own)
    apart = _STORED_APART in names
    self._table_contents.pending_mark = (
        int(store[_STORED_APART]) if apart else None)
    table = {n[len(_TABLE_ENTRY):]: tf.constant(store[n]) for n in names
             if n.startswith(_TABLE_ENTRY) and n != _STORED_APART}
    if table:
      _restore_saved_table(self.table, table, "SparseEmbedding %r" % self.name)
    elif not apart:
      warnings.warn("SparseEmbedding %r: the saved weights hold no table "
                    "contents (written before the layer stored them); the "
                    "table keeps its rows" % self.name)

  def get_config(self):
    """The layer's arguments, with the table as a nested config that names
    the table's identity (Keras's `shared_object_id`): `keras.models.
    load_model` then gives layers that shared a table one table again,
    while `from_config` outside a load builds a new one."""
    config = super().get_config()
    table = keras.saving.serialize_keras_object(self.table)
    # Keras marks an object seen twice in one save only in the copy it
    # keeps of the second config, so the identity is written here.
    table["shared_object_id"] = id(self.table)
    config.update({"dim": self.dim, "combiner": self.combiner, "table": table})
    return config

  @classmethod
  def from_config(cls, config):
    """Builds the layer on the table its config describes; configs written
    before the table was nested (its arguments beside dim) still load."""
    config = dict(config)
    if "table" in config:
      config["table"] = keras.saving.deserialize_keras_object(config["table"])
    return cls(**config)
