"""End-to-end CTR training with hpc_ops: the main job.

  tools/dev.sh main                                   # generated data, 1 process
  .venv/bin/python -m hpc_ops.run -np 2 examples/ctr_train.py   # data-parallel
  .venv/bin/python examples/ctr_train.py --data day_0.gz --eval-data day_1.gz

1. Data: Criteo-format TSV (label, 13 integer, 26 categorical hex features;
   gzip allowed) through tf.data; categorical values hashed to int64 ids
   salted per field. By default a synthetic file is generated from a planted
   logistic model over Zipf-distributed ids, so the best achievable AUC is
   known and printed next to the achieved one.
2. Model: one shared hpc_ops SparseEmbedding table for all 26 fields (it grows
   as new ids arrive and trains with its own Adagrad), the integer features
   scaled by an RMS normalisation written in plain TensorFlow, and an MLP
   tower with hpc_ops.layers.RMSNorm; Keras model.fit with a progress bar,
   AUC and log-loss per epoch.
3. Distributed (under mpirun, e.g. `python -m hpc_ops.run -np 2`): each worker
   reads its own shard of the lines; dense gradients are averaged with an
   MPI allreduce; the embedding table is replicated, and every push is
   allgathered so each worker applies the same pushes in the same order and
   the replicas stay identical (see `replicated_push` below for why).
4. Export: a SavedModel with a serving signature, rewritten by
   `python -m hpc_ops.rewrite` (the hand-written RMS normalisation becomes
   one fused RmsNorm op), loaded in a fresh process whose predictions must
   equal the in-memory model's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import hpc_ops  # noqa: E402
from hpc_ops.data import criteo  # noqa: E402


class Timer:
  """Wall time per phase, for the summary."""

  def __init__(self):
    self.phases = []

  def __call__(self, name):
    timer = self

    class _Phase:
      def __enter__(self):
        self.t0 = time.perf_counter()

      def __exit__(self, *exc):
        timer.phases.append((name, time.perf_counter() - self.t0))

    return _Phase()


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--data", nargs="*", help="Criteo-format training files "
                  "(default: generate --rows synthetic rows)")
  ap.add_argument("--eval-data", nargs="*", help="evaluation files (default: "
                  "generated; with --data, the last 10%% of --data's lines)")
  ap.add_argument("--rows", type=int, default=200_000, help="synthetic training rows")
  ap.add_argument("--eval-rows", type=int, default=50_000, help="synthetic eval rows")
  ap.add_argument("--vocab", type=int, default=20_000,
                  help="synthetic ids per categorical field")
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--batch-size", type=int, default=1024, help="per worker")
  ap.add_argument("--dim", type=int, default=16, help="embedding width")
  ap.add_argument("--hidden", type=int, nargs="+", default=[256, 128])
  ap.add_argument("--lr", type=float, default=1e-3, help="Adam, dense part")
  ap.add_argument("--table-optimizer", default="adagrad",
                  choices=["sgd", "adagrad", "adam", "ftrl"])
  ap.add_argument("--table-lr", type=float, default=0.05,
                  help="learning rate of the table's optimizer")
  ap.add_argument("--table-init-acc", type=float, default=1e-3,
                  help="initial accumulator (adagrad, ftrl); the mean loss "
                  "gives each row small gradients, so keep it small")
  ap.add_argument("--work-dir", default=None,
                  help="for data and the exported models (default: a temp dir)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-export", action="store_true")
  ap.add_argument("--summary-json", help="also write the summary here")
  ap.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity")
  return ap.parse_args(argv)


# ---------------------------------------------------------------- model ----

def rms_scale(x, eps=1e-6):
  """RMS normalisation written the common way in plain TensorFlow: the graph
  rewrite replaces it with one RmsNorm op at export."""
  return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + eps)


def build_model(args, push_transform=None):
  ints = keras.Input((criteo.NUM_INT,), dtype="float32", name="int")
  cats = keras.Input((criteo.NUM_CAT,), dtype="int64", name="cat")
  embedding = hpc_ops.layers.SparseEmbedding(
      args.dim, optimizer=args.table_optimizer, learning_rate=args.table_lr,
      optimizer_options=({"initial_accumulator_value": args.table_init_acc}
                         if args.table_optimizer in ("adagrad", "ftrl") else None),
      initializer="truncated_normal", init_scale=0.01, seed=args.seed,
      push_transform=push_transform, name="embedding")
  emb = keras.layers.Flatten()(embedding(cats))            # [B, 26 * dim]
  dense_in = keras.layers.Lambda(rms_scale, name="int_rms")(ints)
  x = keras.layers.Concatenate()([emb, dense_in])
  for i, width in enumerate(args.hidden):
    x = keras.layers.Dense(width, use_bias=False, name="dense_%d" % i)(x)
    x = hpc_ops.layers.RMSNorm(name="rms_norm_%d" % i)(x)
    x = keras.layers.Activation("relu")(x)
  out = keras.layers.Dense(1, activation="sigmoid", name="ctr")(x)
  return keras.Model({"int": ints, "cat": cats}, out), embedding


class ServingModule(tf.Module):
  """What is exported: the model and its table, one serving signature."""

  def __init__(self, model, table):
    super().__init__()
    self.model = model
    self.table = table

  @tf.function(input_signature=[
      tf.TensorSpec([None, criteo.NUM_INT], tf.float32, name="int"),
      tf.TensorSpec([None, criteo.NUM_CAT], tf.int64, name="cat")])
  def serve(self, int_features, cat_ids):
    return {"ctr": self.model({"int": int_features, "cat": cat_ids}, training=False)}


def predict(model, ds):
  labels, scores = [], []
  for features, y in ds:
    scores.append(model(features, training=False).numpy().reshape(-1))
    labels.append(y.numpy().reshape(-1))
  return np.concatenate(labels), np.concatenate(scores)


def logloss(labels, scores):
  p = np.clip(scores, 1e-7, 1 - 1e-7)
  return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


# ---------------------------------------------------------- distributed ----

def launched_by_mpi():
  return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))


def replicated_push(hd):
  """push_transform for a table replicated on every worker.

  Each worker's gradient step yields its distinct keys and summed row
  gradients; they are allgathered (in rank order) and divided by the
  number of workers, matching the averaged dense gradients, and every
  worker pushes the same combined batch. Pushes sum duplicate keys in batch
  order, so the replicas apply bit-identical updates and stay equal.

  Why replicated rather than sharded by key: with a handful of workers and a
  table that fits in one machine's memory, replication needs one allgather
  per step and no lookup round trip on the forward pass; sharding by key
  (the table's key->shard routing is in one place for that) pays off once
  the table outgrows one machine.
  """
  size = hd.size()

  def transform(keys, grads):
    return hd.allgather(keys), hd.allgather(grads / float(size))

  return transform


def count_lines(paths):
  n = 0
  for p in paths:
    with (criteo.gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb")) as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        n += chunk.count(b"\n")
  return n


def clean_env():
  """The environment for helper processes: without the MPI launcher's
  variables, so a child is never mistaken for a rank."""
  return {k: v for k, v in os.environ.items()
          if not k.startswith(("OMPI_", "PMIX_", "PMI_", "HYDRA_"))}


# ----------------------------------------------------------------- main ----

def main(argv=None):
  args = parse_args(argv)
  timer = Timer()
  hd = None
  rank, size = 0, 1
  if launched_by_mpi():
    import hpc_ops.distributed as hd  # noqa: F811
    hd.init()
    rank, size = hd.rank(), hd.size()
  say = print if rank == 0 else (lambda *a, **k: None)
  keras.utils.set_random_seed(args.seed)  # same initial dense weights everywhere

  work = args.work_dir or tempfile.mkdtemp(prefix="hpc_ops_ctr_")
  os.makedirs(work, exist_ok=True)
  say("hpc_ops %s, TensorFlow %s, %d worker(s), work dir %s"
      % (hpc_ops.__version__, tf.__version__, size, work))

  # ---- data
  planted = None
  with timer("data"):
    if args.data:
      train_files = args.data
      eval_files = args.eval_data or None
    else:
      train_files = [os.path.join(work, "train.tsv")]
      eval_files = [os.path.join(work, "eval.tsv")]
      info_path = os.path.join(work, "planted.json")
      if rank == 0:
        gen = dict(rows=args.rows, seed=args.seed, vocab_size=args.vocab)
        if not (os.path.exists(info_path) and json.load(open(info_path)).get("gen") == gen):
          say("generating %d + %d synthetic rows ..." % (args.rows, args.eval_rows))
          # Train and eval rows come from one planted model, one stream.
          all_path = os.path.join(work, "all.tsv")
          planted_all = criteo.write_synthetic(
              all_path, args.rows + args.eval_rows, seed=args.seed,
              vocab_size=args.vocab)
          with open(all_path) as f, open(train_files[0], "w") as tr, \
               open(eval_files[0], "w") as ev:
            for i, line in enumerate(f):
              (tr if i < args.rows else ev).write(line)
          os.remove(all_path)
          with open(info_path, "w") as f:
            json.dump({"gen": gen, "planted": planted_all}, f)
      if hd is not None:
        hd.broadcast(tf.constant(0), 0)  # the others wait for the files
      planted = json.load(open(info_path))["planted"]
    train_rows = args.rows if not args.data else count_lines(train_files)
  steps = max(1, train_rows // (args.batch_size * size))
  train_ds = criteo.make_dataset(train_files, args.batch_size, shuffle=True,
                                 seed=args.seed, num_shards=size,
                                 shard_index=rank, repeat=True)
  eval_batch = 4096
  if eval_files:
    eval_ds = criteo.make_dataset(eval_files, eval_batch)
    eval_rows = args.eval_rows if not args.data else count_lines(eval_files)
  else:  # real data without an eval file: hold out the last batches
    skip = int(0.9 * train_rows) // eval_batch
    eval_ds = criteo.make_dataset(train_files, eval_batch).skip(skip)
    eval_rows = train_rows - skip * eval_batch
  eval_steps = -(-eval_rows // eval_batch)

  # ---- model
  model, embedding = build_model(
      args, push_transform=replicated_push(hd) if hd is not None else None)
  optimizer = keras.optimizers.Adam(args.lr)
  callbacks = []
  if hd is not None:
    optimizer = hd.DistributedOptimizer(optimizer)
    callbacks.append(hd.BroadcastGlobalVariablesCallback(0))
  model.compile(optimizer=optimizer, loss="binary_crossentropy",
                metrics=[keras.metrics.AUC(name="auc")], jit_compile=False)

  # ---- train
  say("training: %d epoch(s) x %d steps of %d rows per worker"
      % (args.epochs, steps, args.batch_size))
  with timer("train"):
    history = model.fit(train_ds, epochs=args.epochs, steps_per_epoch=steps,
                        validation_data=eval_ds, validation_steps=eval_steps,
                        shuffle=False,  # the dataset shuffles itself
                        callbacks=callbacks,
                        verbose=args.verbose if rank == 0 else 0)
  train_time = timer.phases[-1][1]
  examples = args.epochs * steps * args.batch_size * size

  # ---- evaluate
  with timer("evaluate"):
    labels, scores = predict(model, eval_ds)
    auc, ll = criteo.binary_auc(labels, scores), logloss(labels, scores)
  for epoch in range(args.epochs):
    say("epoch %d: loss %.4f, train AUC %.4f, eval AUC %.4f, eval log-loss %.4f"
        % (epoch + 1, history.history["loss"][epoch], history.history["auc"][epoch],
           history.history["val_auc"][epoch], history.history["val_loss"][epoch]))

  replicas_equal = None
  if hd is not None:
    # Replicas must hold the same dense weights and table: compare digests.
    digest = tf.constant([float(np.sum(w.numpy(), dtype=np.float64))
                          for w in model.trainable_weights] +
                         [float(embedding.table.size().numpy()),
                          float(np.sum(embedding.table.export().values.numpy(), dtype=np.float64))],
                         tf.float64)
    gathered = hd.allgather(digest[tf.newaxis]).numpy()
    replicas_equal = bool(np.all(gathered == gathered[0]))

  table_rows = int(embedding.table.size().numpy())
  slot_vectors = len(embedding.table.slot_names)
  row_bytes = 8 + 4 * args.dim * (1 + slot_vectors)

  # ---- export, rewrite, reload in a fresh process
  export = {}
  if rank == 0 and not args.no_export:
    export = export_and_check(model, embedding, eval_ds, work, timer)

  summary = {
      "workers": size,
      "examples_per_second": examples / train_time,
      "train_examples": examples,
      "eval_auc": auc,
      "eval_logloss": ll,
      "planted_optimal_auc": planted["optimal_auc"] if planted else None,
      "planted_optimal_logloss": planted["optimal_logloss"] if planted else None,
      "table_rows": table_rows,
      "table_payload_bytes": table_rows * row_bytes,
      "replicas_equal": replicas_equal,
      "phases_seconds": dict(timer.phases),
      **export,
  }
  if rank == 0:
    print_summary(summary, args)
    if args.summary_json:
      with open(args.summary_json, "w") as f:
        json.dump(summary, f, indent=1)
  if hd is not None and replicas_equal is False:
    return 1
  return 0 if export.get("exported_predictions_equal", True) else 1


def export_and_check(model, embedding, eval_ds, work, timer):
  saved = os.path.join(work, "saved_model")
  rewritten = os.path.join(work, "saved_model_hpc")
  with timer("export"):
    module = ServingModule(model, embedding.table)
    # Serving needs no gradients: without them the export holds no training
    # graph (the table's push, the workers' allgather).
    tf.saved_model.save(module, saved, signatures={"serving_default": module.serve},
                        options=tf.saved_model.SaveOptions(
                            experimental_custom_gradients=False))
  with timer("rewrite"):
    import shutil
    shutil.rmtree(rewritten, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "hpc_ops.rewrite", saved, rewritten,
                           "--verify", "2"], capture_output=True, text=True,
                          env=clean_env())
    if proc.returncode != 0:
      raise RuntimeError("hpc_ops.rewrite failed:\n" + proc.stdout + proc.stderr)
    print(proc.stdout.strip())
  # A few eval rows, predicted in memory and by the rewritten model in a
  # fresh process.
  features, _ = next(iter(eval_ds))
  ints = features["int"][:5].numpy()
  cats = features["cat"][:5].numpy()
  expected = model({"int": ints, "cat": cats}, training=False).numpy().reshape(-1)
  with timer("reload"):
    inputs = os.path.join(work, "rows.npz")
    np.savez(inputs, ints=ints, cats=cats)
    code = ("import numpy as np, tensorflow as tf, hpc_ops\n"
            "d = np.load(%r)\n"
            "m = tf.saved_model.load(%r)\n"
            "out = m.signatures['serving_default'](int=tf.constant(d['ints']), "
            "cat=tf.constant(d['cats']))['ctr']\n"
            "print(' '.join(repr(float(v)) for v in out.numpy().reshape(-1)))\n"
            % (inputs, rewritten))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=clean_env())
    if proc.returncode != 0:
      raise RuntimeError("reloading the rewritten model failed:\n" + proc.stderr[-3000:])
    served = np.array([float(v) for v in proc.stdout.split()])
  equal = bool(np.allclose(served, expected, rtol=1e-5, atol=1e-6))
  print("\nfirst 5 eval rows, in-memory model vs rewritten SavedModel in a fresh process:")
  for a, b in zip(expected, served):
    print("  %.6f  %.6f" % (a, b))
  return {"exported_model": rewritten, "exported_predictions_equal": equal,
          "exported_max_abs_diff": float(np.max(np.abs(served - expected)))}


def print_summary(s, args):
  print("\n=== summary ===")
  print("workers                %d" % s["workers"])
  print("throughput             %.0f examples/s (%d examples)"
        % (s["examples_per_second"], s["train_examples"]))
  if s["planted_optimal_auc"] is not None:
    print("eval AUC               %.4f   (planted model's optimum %.4f)"
          % (s["eval_auc"], s["planted_optimal_auc"]))
    print("eval log-loss          %.4f   (planted model's optimum %.4f)"
          % (s["eval_logloss"], s["planted_optimal_logloss"]))
  else:
    print("eval AUC / log-loss    %.4f / %.4f" % (s["eval_auc"], s["eval_logloss"]))
  print("embedding table        %d rows, %.1f MB payload (key + %d floats + slots)"
        % (s["table_rows"], s["table_payload_bytes"] / 1e6, args.dim))
  if s["replicas_equal"] is not None:
    print("replicas identical     %s" % s["replicas_equal"])
  if "exported_predictions_equal" in s:
    print("exported model         %s (predictions equal: %s, max diff %.2g)"
          % (s["exported_model"], s["exported_predictions_equal"],
             s["exported_max_abs_diff"]))
  print("time per phase         " + ", ".join(
      "%s %.1f s" % kv for kv in s["phases_seconds"].items()))


if __name__ == "__main__":
  sys.exit(main())
