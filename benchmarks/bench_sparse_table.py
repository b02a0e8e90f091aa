"""Sparse embedding table vs TensorFlow-native embeddings, side by side.

Workload (bench_util.zipf_batches, the same as the peer measurements in
/work/shared/reference/peers): batches of 65,536 int64 keys, Zipf s=1.1 over
N ids hashed over int64. Every table first sees every batch once (steady
state: lookups hit), then the variants take turns (--rounds times each over
all batches, Python's garbage collector paused); median seconds per
batch -> keys/s. Each call's result is read back as a NumPy view
(np.asarray, which TensorFlow documents as the copy-free read of a CPU
tensor); --copy-readback reads with .numpy() instead, as the peer
measurements did: that copies the [65536, D] result into a fresh array,
whose first touches cost every variant the same fixed time per batch
(about 1 ms at D 16 on a slow VM), not part of any lookup.

  hpc_ops pull          tf.function(table.pull(keys)), one call per batch
                        (the calling pattern of the peer measurements);
                        "pull, eager": table.pull(keys) called eagerly;
                        "pull, 10 per function": a tf.function that pulls
                        10 batches, independent lookups as those of a
                        training step with 10 features (TensorFlow's cost
                        of a function call, 0.3-1.1 ms on these VMs and
                        the same for every variant, then falls on 10
                        batches); the peers' lookups are timed the same
                        three ways
  hpc_ops pull+push     tf.function: v = pull(keys); push(keys, C, lr), table
                        optimizer Adagrad (C fixed [B, D], i.e. loss = sum(v*C))
  hpc_ops tape step     tf.function: GradientTape over
                        embedding_lookup(table, keys, trigger), loss =
                        sum(v*C), tape.gradient (pushes with Adagrad)
  MHT                   tf.lookup.experimental.MutableHashTable(id -> row)
                        + embedding_lookup on a tf.Variable [2^20, D];
                        +v1 Adagrad: GradientTape, fused sparse Adagrad
  DHT                   DenseHashTable likewise
  mod                   row = id % 2^20 (collisions allowed), the dense-array
                        speed bound; +v1 Adagrad likewise

--keras-fit times Keras's model.fit instead: a step over 4,096 examples of
16 ids each (the same 65,536-key batches), summed per example, a
sigmoid Dense head and binary cross-entropy:

  hpc_ops               SparseEmbedding(D, combiner="sum"), its table
                        training with Adagrad, Adam for the Dense head
  keras Embedding       keras.layers.Embedding(2^20, D) on id % 2^20, summed,
                        the whole model under Keras's Adagrad, SGD or Adam
                        (Keras's Adagrad and Adam update every row of the
                        2^20 on every step; its SGD applies the sparse
                        gradient)

Median step time from on_train_batch_begin to on_train_batch_end over
--rounds epochs of the batches per model, the models taking turns by
epoch.

--ragged times multi-hot examples instead: each 65,536-key batch cut at
random into 4,096 examples (16 ids on average, some empty), each
example's rows summed, inference and a train step (loss = sum(out * C),
Adagrad):

  hpc_ops               ragged ids [4096, None]: table.pull(ids,
                        combiner="sum") (SparseTablePullRagged); tape step
                        over embedding_lookup(..., combiner="sum"), which
                        pushes one gradient row per example
                        (SparseTablePushRagged)
  hpc_ops, sparse ids   the same on the ids as a tf.SparseTensor (row
                        splits from SparseTableRowSplits)
  MHT, mod              the same ids as a tf.SparseTensor (made before
                        timing), tf.nn.safe_embedding_lookup_sparse(W, rows,
                        None, combiner="sum") with rows from the MHT or
                        id % 2^20 (the plain embedding_lookup_sparse drops
                        trailing empty examples); steps with the fused
                        sparse v1 Adagrad

Bytes per key: growth of a fresh process's resident memory while an Adagrad
table takes 2e6 distinct keys, divided by the key count, next to the raw size
key + row + slot (8 + 4*D*2 bytes).

  python benchmarks/bench_sparse_table.py            # N 1e6 and 1e7, D 8/16/64
  python benchmarks/bench_sparse_table.py --quick    # N 1e6, D 16, 8 batches, 2 rounds
  python benchmarks/bench_sparse_table.py --keras-fit --N 10000000 --dims 16
  python benchmarks/bench_sparse_table.py --ragged --N 10000000 --dims 16 64
"""
import argparse
import functools
import gc
import os
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bench_util  # noqa: E402
import hpc_ops  # noqa: E402
from hpc_ops import sparse_table  # noqa: E402
from hpc_ops.layers import SparseEmbedding  # noqa: E402

ROWS = 1 << 20  # the peers' fixed Variable


PER_FUNCTION = 10  # batches per call of the "pull, 10 per function" variants


def _each(op, *keys):
  return [op(k) for k in keys]


class PerFunction:
  """`op(keys)` on `per_call` batches inside one tf.function, every result
  returned: the lookups of a training step with `per_call` features. No
  control dependencies between them: TensorFlow still runs the ops on one
  table (a stateful resource) in program order, but may run an op that
  only reads a resource beside them, such as the MHT path's gather from
  its Variable beside the next lookup. TensorFlow's cost of calling a
  function, which a one-op function pays on every batch, is shared by
  `per_call` batches. Called with `per_call` batches; time_interleaved
  divides."""

  def __init__(self, op, per_call=PER_FUNCTION):
    self.per_call = per_call
    # A partial, not a lambda: TensorFlow counts traces per code object, and
    # one trace for each table and width would read as retracing.
    self.fn = tf.function(functools.partial(_each, op))

  def __call__(self, *keys):
    return self.fn(*keys)


def pull_variants(op, batches):
  """The three ways of calling a lookup `op(keys)` that are timed, for ours
  and for every peer: one tf.function call per batch, eagerly, and
  PER_FUNCTION (at most the batch count) lookups to a PerFunction."""
  per_call = min(PER_FUNCTION, len(batches))
  return {"pull": tf.function(op), "pull, eager": op,
          "pull, %d per function" % per_call: PerFunction(op, per_call)}


def _args(batches, i, k):
  """The k batches from batch i on (wrapping around): a variant's
  arguments for its turn at batch i (k = 1 but for a PerFunction)."""
  return [batches[(i + j) % len(batches)] for j in range(k)]


def time_interleaved(fns, batches, rounds, warm=2):
  """Median seconds per batch of each fn(batch) (its result is read back),
  with the variants taking turns: each round runs every variant over all
  batches, in an order rotated from round to round, so load changes on a
  shared machine hit all of them alike. Python's garbage collector is
  paused while timing (it would otherwise run at random points, in any
  variant). A PerFunction is called at every (per_call / 2)-th batch, each
  call pulling that batch and the next per_call - 1 (so it looks up each
  batch twice a round, in overlapping windows); its time per batch is the
  call's divided by per_call."""
  names = list(fns)
  for name in names:
    k = getattr(fns[name], "per_call", 1)
    for i in range(warm):
      _block(fns[name](*_args(batches, i, k)))
  times = {name: [] for name in names}
  for name in _taking_turns(names, rounds):
    fn = fns[name]
    k = getattr(fn, "per_call", 1)
    for i in range(0, len(batches), max(1, k // 2)):
      args = _args(batches, i, k)
      t0 = time.perf_counter()
      _block(fn(*args))
      times[name].append((time.perf_counter() - t0) / k)
  return {name: float(np.median(t)) for name, t in times.items()}


def _taking_turns(names, rounds):
  """The names, `rounds` times over, the order rotated from round to round,
  with Python's garbage collector paused until the last."""
  gc.collect()
  gc.disable()
  try:
    for r in range(rounds):
      yield from names[r % len(names):] + names[:r % len(names)]
  finally:
    gc.enable()


COPY_READBACK = False  # --copy-readback


def _block(r):
  if isinstance(r, (tf.Tensor, tf.Variable)):
    r.numpy() if COPY_READBACK else np.asarray(r)
  elif isinstance(r, (list, tuple)):
    for x in r:
      _block(x)


def ours(batches, dim, lr=0.01):
  """hpc_ops variants: {op: fn}, and a check that the pushes changed rows."""
  table = hpc_ops.SparseTable(dim, optimizer="adagrad", initializer="uniform")
  for b in batches:
    table.pull(b)
  B = int(batches[0].shape[0])
  C = tf.random.normal([B, dim], stddev=1e-3, seed=1)

  @tf.function
  def pull_push(k):
    v = table.pull(k)
    with tf.control_dependencies([v]):
      return table.push(k, C, lr)

  trigger = tf.Variable(0.0)

  @tf.function
  def tape_step(k):
    with tf.GradientTape() as tape:
      v = sparse_table.embedding_lookup(table, k, trigger)
      loss = tf.reduce_sum(v * C)
    return tape.gradient(loss, trigger)

  probe = table.pull(batches[0][:2]).numpy()

  def check():
    assert np.abs(table.pull(batches[0][:2]).numpy() - probe).max() > 0, "no update"

  return {**pull_variants(lambda k: table.pull(k), batches),
          "pull+push": pull_push, "tape step": tape_step}, check


def peer(method, batches, uniq, dim, lr=0.01):
  """A TensorFlow-native peer: {op: fn} and a check that the steps changed W."""
  if method == "MHT":
    table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)
  elif method == "DHT":
    table = tf.lookup.experimental.DenseHashTable(
        tf.int64, tf.int64, default_value=-1, empty_key=-1, deleted_key=-2,
        initial_num_buckets=1 << 21)
  else:
    table = None
  if table is not None:
    table.insert(tf.constant(uniq), tf.range(len(uniq), dtype=tf.int64))
    index = table.lookup
  else:
    index = lambda k: tf.math.floormod(k, ROWS)  # noqa: E731
  B = int(batches[0].shape[0])
  C = tf.random.normal([B, dim], stddev=1e-3, seed=1)
  W = tf.Variable(tf.random.normal([ROWS, dim], stddev=0.01))
  opt = tf.compat.v1.train.AdagradOptimizer(lr)

  @tf.function
  def step(k):
    rows = index(k)
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.nn.embedding_lookup(W, rows) * C)
    update = opt.apply_gradients([(tape.gradient(loss, W), W)])
    with tf.control_dependencies([update]):
      return tf.identity(loss)

  def first_rows():  # eager: no second trace of the timed "pull" function
    return tf.nn.embedding_lookup(W, index(batches[0][:2])).numpy()

  probe = first_rows()

  def check():
    assert np.abs(first_rows() - probe).max() > 0, "no update"

  return {**pull_variants(lambda k: tf.nn.embedding_lookup(W, index(k)), batches),
          "pull+push": step}, check


FIT_IDS = 16  # ids per example in --keras-fit: 4,096 examples a batch


class _StepTimes(keras.callbacks.Callback):
  """The seconds of each train step of a fit."""

  def __init__(self):
    super().__init__()
    self.times = []

  def on_train_batch_begin(self, batch, logs=None):
    self.t0 = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    self.times.append(time.perf_counter() - self.t0)


def keras_fit_rows(keys_np, dim, rounds):
  """--keras-fit: median model.fit step time of SparseEmbedding against
  keras.layers.Embedding under three Keras optimizers; rows of
  [impl, optimizer, median/step, examples/s, Mkeys/s, time over ours]."""
  x = keys_np.reshape(-1, FIT_IDS)
  batch = keys_np.shape[1] // FIT_IDS
  y = np.random.default_rng(0).integers(0, 2, size=(len(x), 1)).astype(
      np.float32)

  def head(inp, embedded):
    return keras.Model(
        inp, keras.layers.Dense(1, activation="sigmoid")(embedded))

  def ours():
    inp = keras.Input(shape=(FIT_IDS,), dtype="int64")
    emb = SparseEmbedding(dim, combiner="sum", optimizer="adagrad",
                          learning_rate=0.01)
    model = head(inp, emb(inp))
    model.compile(optimizer=keras.optimizers.Adam(0.001),
                  loss="binary_crossentropy")

    def check():  # every id has its row, and the rows trained
      assert int(emb.table.size()) == len(np.unique(keys_np))
      assert int(emb.table.export().step) > 0
    return model, x, check

  def keras_embedding(optimizer):
    inp = keras.Input(shape=(FIT_IDS,), dtype="int64")
    emb = keras.layers.Embedding(ROWS, dim)
    model = head(inp, keras.ops.sum(emb(inp), axis=1))
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    xs = np.mod(x, ROWS)
    first = emb.embeddings.numpy()[xs[0]]

    def check():
      assert np.abs(emb.embeddings.numpy()[xs[0]] - first).max() > 0
    return model, xs, check

  variants = {
      ("hpc_ops SparseEmbedding", "table Adagrad, Adam"): ours(),
      ("keras Embedding", "Adagrad"): keras_embedding(
          keras.optimizers.Adagrad(0.01)),
      ("keras Embedding", "SGD"): keras_embedding(keras.optimizers.SGD(0.01)),
      ("keras Embedding", "Adam"): keras_embedding(
          keras.optimizers.Adam(0.001)),
  }
  times = {name: _StepTimes() for name in variants}
  for model, xs, _ in variants.values():  # traces, and the table's rows
    model.fit(xs, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
  names = list(variants)
  for name in _taking_turns(names, rounds):
    model, xs, _ = variants[name]
    model.fit(xs, y, batch_size=batch, epochs=1, verbose=0, shuffle=False,
              callbacks=[times[name]])
  for _, _, check in variants.values():
    check()
  ours_sec = float(np.median(times[names[0]].times))
  rows = []
  for name in names:
    sec = float(np.median(times[name].times))
    rows.append([name[0], name[1], bench_util.fmt_time(sec),
                 "%.0f" % (batch / sec), "%.1f" % (batch * FIT_IDS / sec / 1e6),
                 "%.2fx" % (sec / ours_sec)])
  return rows


RAGGED_ROWS = 4096  # examples per batch in --ragged


def ragged_batches(keys_np, seed=0):
  """--ragged: each batch of keys cut at RAGGED_ROWS - 1 uniform random
  points into examples (16 ids on average at 65,536 keys, some empty), as
  (RaggedTensor [RAGGED_ROWS, None], the same ids as a tf.SparseTensor)."""
  rng = np.random.default_rng(seed)
  out = []
  for keys in keys_np:
    cuts = np.sort(rng.integers(0, len(keys) + 1, size=RAGGED_ROWS - 1))
    splits = np.concatenate([[0], cuts, [len(keys)]]).astype(np.int64)
    ids = tf.RaggedTensor.from_row_splits(tf.constant(keys),
                                          tf.constant(splits))
    out.append((ids, ids.to_sparse()))
  return out


def ragged_rows(keys_np, dim, rounds, peers, lr=0.01):
  """--ragged: median time per batch of combined lookups and train steps,
  ours on ragged ids against the peers' safe_embedding_lookup_sparse; rows of
  [impl, op, median/batch, Mkeys/s, vs MHT, vs mod]."""
  batches = ragged_batches(keys_np)
  C = tf.random.normal([RAGGED_ROWS, dim], stddev=1e-3, seed=1)
  variants, checks = {}, []

  table = hpc_ops.SparseTable(dim, optimizer="adagrad")
  for b in keys_np:
    table.pull(b)
  trigger = tf.Variable(0.0)

  # One trace each: the examples' longest row, in the static shape of a
  # SparseTensor made from constants, changes from batch to batch.
  ragged_spec = [tf.RaggedTensorSpec([RAGGED_ROWS, None], tf.int64,
                                     row_splits_dtype=tf.int64)]
  sparse_spec = [tf.SparseTensorSpec([RAGGED_ROWS, None], tf.int64)]

  def our_step(ids):
    with tf.GradientTape() as tape:
      out = sparse_table.embedding_lookup(table, ids, trigger, combiner="sum",
                                          learning_rate=lr)
      loss = tf.reduce_sum(out * C)
    return tape.gradient(loss, trigger)

  def our_pull(ids):
    return table.pull(ids, combiner="sum")

  for name, spec, i in (("hpc_ops", ragged_spec, 0),
                        ("hpc_ops, sparse ids", sparse_spec, 1)):
    pull = tf.function(our_pull, input_signature=spec)
    step = tf.function(our_step, input_signature=spec)
    variants[(name, "combined pull")] = lambda b, f=pull, i=i: f(b[i])
    variants[(name, "train step")] = lambda b, f=step, i=i: f(b[i])
  step0 = int(table.export().step)
  checks.append(lambda: int(table.export().step) > step0)

  uniq = np.unique(keys_np)
  for method in peers:
    if method == "MHT":
      index_table = tf.lookup.experimental.MutableHashTable(
          tf.int64, tf.int64, default_value=-1)
      index_table.insert(tf.constant(uniq), tf.range(len(uniq), dtype=tf.int64))
      index = index_table.lookup
    elif method == "mod":
      index = lambda k: tf.math.floormod(k, ROWS)  # noqa: E731
    else:
      continue
    W = tf.Variable(tf.random.normal([ROWS, dim], stddev=0.01))
    opt = tf.compat.v1.train.AdagradOptimizer(lr)

    def lookup(sp, W=W, index=index):
      rows = tf.SparseTensor(sp.indices, index(sp.values), sp.dense_shape)
      return tf.nn.safe_embedding_lookup_sparse(W, rows, None, combiner="sum")

    def step(sp, W=W, opt=opt, lookup=lookup):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(lookup(sp) * C)
      update = opt.apply_gradients([(tape.gradient(loss, W), W)])
      with tf.control_dependencies([update]):
        return tf.identity(loss)

    peer_pull = tf.function(lookup, input_signature=sparse_spec)
    peer_step = tf.function(step, input_signature=sparse_spec)
    variants[(method, "combined pull")] = (
        lambda b, f=peer_pull: f(b[1]))
    variants[(method, "train step")] = lambda b, f=peer_step: f(b[1])
    w0 = W.numpy()[:1000].copy()
    checks.append(lambda W=W, w0=w0: np.abs(W.numpy()[:1000] - w0).max() > 0)

  medians = time_interleaved(variants, batches, rounds)
  for check in checks:
    assert check(), "a train step did not update its rows"
  keys = len(keys_np[0])
  rows = []
  for (name, op), sec in medians.items():
    base, bound = medians.get(("MHT", op)), medians.get(("mod", op))
    rows.append([name, op, bench_util.fmt_time(sec),
                 "%.1f" % (keys / sec / 1e6),
                 "%.2fx" % (base / sec) if base else "-",
                 "%.2fx" % (bound / sec) if bound else "-"])
  return rows


def bytes_per_key(dim, num_keys=2_000_000):
  """Resident-memory growth per key while a fresh process's Adagrad table
  takes `num_keys` distinct keys in 65,536-key batches (a child process, so
  memory freed by earlier tables cannot be reused); and the raw
  key + row + slot size, 8 + 4 * dim * 2 bytes."""
  code = textwrap.dedent("""
      import os, numpy as np, tensorflow as tf, hpc_ops
      def rss():
        with open("/proc/self/statm") as f:
          return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
      keys = np.arange(%d, dtype=np.int64) * 0x9E3779B97F4A7C1
      batches = [tf.constant(c) for c in np.array_split(keys, len(keys) // 65536)]
      table = hpc_ops.SparseTable(%d, optimizer="adagrad")
      table.pull(batches[0][:10])  # kernels and scratch exist before
      before = rss()
      for b in batches:
        table.pull(b)
      assert int(table.size()) == len(keys)
      print((rss() - before) / len(keys))
  """ % (num_keys, dim))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  return float(out.stdout.strip().splitlines()[-1]), 8 + 4 * dim * 2


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="N 1e6, D 16, 8 batches")
  ap.add_argument("--N", type=int, nargs="+", default=[1_000_000, 10_000_000])
  ap.add_argument("--dims", type=int, nargs="+", default=[8, 16, 64])
  ap.add_argument("--nbatches", type=int, default=20)
  ap.add_argument("--rounds", type=int, default=3,
                  help="turns each variant takes over the batches")
  ap.add_argument("--peers", nargs="*", default=["MHT", "DHT", "mod"])
  ap.add_argument("--copy-readback", action="store_true",
                  help="read results back with .numpy() (a copy), not as a view")
  ap.add_argument("--ragged", action="store_true",
                  help="time multi-hot examples (ragged ids, summed) against "
                  "safe_embedding_lookup_sparse (instead of the table ops)")
  ap.add_argument("--keras-fit", action="store_true",
                  help="time model.fit steps: SparseEmbedding against "
                  "keras.layers.Embedding (instead of the table ops)")
  args = ap.parse_args()
  global COPY_READBACK
  COPY_READBACK = args.copy_readback
  if args.quick:
    args.N, args.dims, args.nbatches, args.rounds = [1_000_000], [16], 8, 2
  alloc = bench_util.allocator_name()
  print("tf %s, %d CPUs, allocator %s, read-back %s, %s, load average %.1f" % (
      tf.__version__, os.cpu_count(), alloc,
      "copy" if COPY_READBACK else "view", time.strftime("%Y-%m-%d %H:%M"),
      os.getloadavg()[0]))
  if args.ragged or args.keras_fit:  # a table per (N, D) of another workload
    for N in args.N:
      keys_np = bench_util.zipf_batches(N, nbatches=args.nbatches)
      for D in args.dims:
        if args.ragged:
          bench_util.print_table(
              "Multi-hot examples, %.0e ids, D %d, 4,096 examples (65,536 "
              "ids) a batch, each summed, %s allocator (ratios: time of MHT "
              "/ mod over ours, > 1 means ours is faster)" % (N, D, alloc),
              ["impl", "op", "median/batch", "Mkeys/s", "vs MHT", "vs mod"],
              ragged_rows(keys_np, D, args.rounds, args.peers))
        else:
          bench_util.print_table(
              "Keras model.fit, %.0e ids, D %d, 4,096 examples x 16 ids a "
              "step, %s allocator (time over ours: > 1 means ours is faster)"
              % (N, D, alloc),
              ["impl", "optimizer", "median/step", "examples/s", "Mkeys/s",
               "time over ours"],
              keras_fit_rows(keys_np, D, args.rounds))
    print("load average at the end: %.1f" % os.getloadavg()[0])
    return
  rows, mem_rows = [], []
  for N in args.N:
    keys_np = bench_util.zipf_batches(N, nbatches=args.nbatches)
    B = keys_np.shape[1]
    batches = [tf.constant(k) for k in keys_np]
    uniq = np.unique(keys_np)
    for D in args.dims:
      variants, checks = {}, []
      fns, check = ours(batches, D)
      variants.update({("hpc_ops", op): fn for op, fn in fns.items()})
      checks.append(check)
      for m in args.peers:
        fns, check = peer(m, batches, uniq, D)
        variants.update({(m, op): fn for op, fn in fns.items()})
        checks.append(check)
      medians = time_interleaved(variants, batches, args.rounds)
      for check in checks:
        check()
      results = {}
      for (name, op), sec in medians.items():
        results.setdefault(name, {})[op] = sec
      mht = results.get("MHT", {})
      mod = results.get("mod", {})
      for name, r in results.items():
        for what, sec in r.items():
          base = mht.get(what if what != "tape step" else "pull+push")
          bound = mod.get(what if what != "tape step" else "pull+push")
          rows.append([
              "%.0e" % N, D, name, what, bench_util.fmt_time(sec),
              "%.1f" % (B / sec / 1e6),
              "%.2fx" % (base / sec) if base else "-",
              "%.2fx" % (bound / sec) if bound else "-"])
      print("done N=%.0e D=%d" % (N, D), file=sys.stderr, flush=True)
  if alloc == "default":  # table memory does not come from TF's allocator
    for D in args.dims:
      per_key, raw = bytes_per_key(D)
      mem_rows.append([D, "2e6", "%.0f" % per_key, raw, "%.2fx" % (per_key / raw)])
  bench_util.print_table(
      "Sparse table, 65,536-key Zipf(1.1) batches, %s allocator (Mkeys/s; "
      "ratios: time of MHT / mod over ours, > 1 means ours is faster)" % alloc,
      ["N ids", "D", "impl", "op", "median/batch", "Mkeys/s", "vs MHT", "vs mod"],
      rows)
  print("load average at the end: %.1f" % os.getloadavg()[0])
  if mem_rows:
    bench_util.print_table(
        "Memory per key (hpc_ops table, Adagrad, RSS growth)",
        ["D", "keys", "bytes/key", "raw key+row+slot", "ratio"], mem_rows)


if __name__ == "__main__":
  main()
  bench_util.run_under_both_allocators()
