"""Criteo-format click logs: a tf.data reader and a synthetic generator.

The format (Criteo's Display Advertising Challenge / Terabyte logs): one
example per line, tab-separated, `label`, 13 integer features `I1..I13`,
26 categorical features `C1..C26` given as 8-digit hex strings; any feature
may be empty (missing). Files may be gzip-compressed (`.gz`).

`make_dataset` hashes every categorical value to an int64 id salted by its
field, so one table can hold all 26 fields without collisions between them,
and log-transforms the integer features.

`write_synthetic` writes such a file from a planted logistic model over
Zipf-distributed ids, so the best achievable AUC is known: it is the AUC of
the true click probabilities, returned alongside.
"""
import gzip
import os

import numpy as np
import tensorflow as tf

NUM_INT = 13
NUM_CAT = 26
INT_NAMES = ["I%d" % i for i in range(1, NUM_INT + 1)]
CAT_NAMES = ["C%d" % i for i in range(1, NUM_CAT + 1)]


def _open(path, mode):
  if path.endswith(".gz"):
    return gzip.open(path, mode, compresslevel=1)  # level 9 is 6x slower
  return open(path, mode)


def _parse_lines(lines):
  """[batch] strings -> (int features [batch,13] float32, cat ids
  [batch,26] int64, labels [batch,1] float32)."""
  defaults = [[0.0]] + [[0.0]] * NUM_INT + [[""]] * NUM_CAT
  cols = tf.io.decode_csv(lines, record_defaults=defaults, field_delim="\t",
                          na_value="")
  label = tf.expand_dims(cols[0], -1)
  ints = tf.stack(cols[1:1 + NUM_INT], axis=-1)
  # log(1 + x) for counts; Criteo's integer features can be -1 or -2.
  ints = tf.math.log1p(tf.maximum(ints, 0.0))
  ids = []
  for i, col in enumerate(cols[1 + NUM_INT:]):
    salted = tf.strings.join(["%d:" % i, col])  # empty = a per-field "missing" id
    ids.append(tf.strings.to_hash_bucket_fast(salted, 2**62))
  return ints, tf.stack(ids, axis=-1), label


def make_dataset(paths, batch_size, shuffle=False, seed=0, num_shards=1,
                 shard_index=0, repeat=False):
  """A tf.data.Dataset of ({"int": [B,13] float32, "cat": [B,26] int64},
  label [B,1] float32) batches from Criteo-format files.

  `num_shards`/`shard_index` give each data-parallel worker its own part of
  the lines (round robin), so workers see disjoint data.
  """
  if isinstance(paths, str):
    paths = [paths]
  compression = "GZIP" if all(p.endswith(".gz") for p in paths) else ""
  if compression == "" and any(p.endswith(".gz") for p in paths):
    raise ValueError("mix of gzip and plain files: %s" % paths)
  ds = tf.data.TextLineDataset(paths, compression_type=compression)
  if num_shards > 1:
    ds = ds.shard(num_shards, shard_index)
  if shuffle:
    ds = ds.shuffle(16 * batch_size, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch_size)
  ds = ds.map(lambda lines: _parse_lines(lines), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda i, c, y: ({"int": i, "cat": c}, y))
  return ds.prefetch(tf.data.AUTOTUNE)


def binary_auc(labels, scores):
  """Exact ROC AUC (ties count half), numpy."""
  labels = np.asarray(labels).reshape(-1).astype(bool)
  scores = np.asarray(scores, np.float64).reshape(-1)
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  # average ranks over ties
  _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = start + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(avg, counts)
  pos = labels.sum()
  neg = len(labels) - pos
  if pos == 0 or neg == 0:
    return float("nan")
  return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


class PlantedModel:
  """The logistic model that generates synthetic clicks.

  logit = bias + sum_f w_f[id of field f] + v . log1p(int features), with
  per-field vocabularies of Zipf-distributed (s ~ 1.1) ids. Field weights
  have a scale that makes some fields informative and others nearly noise.
  """

  def __init__(self, seed=0, vocab_size=20000, zipf_s=1.1, strength=1.0):
    rng = np.random.default_rng(seed)
    self.vocab_size = vocab_size
    self.zipf_s = zipf_s
    self.bias = -1.2  # about 25% clicks, like Criteo
    scales = strength * rng.uniform(0.05, 0.8, size=NUM_CAT)
    self.cat_weights = rng.normal(size=(NUM_CAT, vocab_size)) * scales[:, None]
    self.int_weights = strength * rng.normal(scale=0.15, size=NUM_INT)
    # Hex codes per field: a random (collision-free) relabelling of ranks.
    self.codes = np.stack([rng.choice(1 << 24, vocab_size, replace=False)
                           for _ in range(NUM_CAT)])
    w = 1.0 / np.arange(1, vocab_size + 1, dtype=np.float64) ** zipf_s
    self.cdf = np.cumsum(w) / w.sum()

  def sample(self, n, rng):
    """(labels [n], int features [n,13] with -1 = missing, cat ranks [n,26],
    true probabilities [n])."""
    ranks = np.searchsorted(self.cdf, rng.random((n, NUM_CAT)))
    ints = rng.poisson(lam=rng.uniform(0.5, 20, size=NUM_INT), size=(n, NUM_INT))
    logit = self.bias + self.cat_weights[np.arange(NUM_CAT), ranks].sum(1)
    logit += np.log1p(ints) @ self.int_weights - np.log1p(ints).mean(0) @ self.int_weights
    missing = rng.random((n, NUM_INT)) < 0.1
    ints = np.where(missing, -1, ints)
    p = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random(n) < p).astype(np.int64)
    return labels, ints, ranks, p


def write_synthetic(path, rows, seed=0, vocab_size=20000, chunk=50000):
  """Writes `rows` Criteo-format lines to `path` (gzip if it ends in .gz).

  Returns {"rows", "click_rate", "optimal_auc", "optimal_logloss"}: the
  AUC/log-loss of the planted probabilities on these rows, the best any
  model can expect on data from the same source.
  """
  model = PlantedModel(seed=seed, vocab_size=vocab_size)
  rng = np.random.default_rng(seed + 1)
  # Strings are looked up, not formatted per value: hex codes per field and
  # rank, small integers by value (index 0 = missing = "").
  hexes = np.array([["%08x" % c for c in field] for field in model.codes], dtype=object)
  int_strs = np.array([""] + [str(v) for v in range(1024)], dtype=object)
  all_labels, all_p = [], []
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with _open(path, "wt") as f:
    for start in range(0, rows, chunk):
      n = min(chunk, rows - start)
      labels, ints, ranks, p = model.sample(n, rng)
      table = np.empty((n, 1 + NUM_INT + NUM_CAT), dtype=object)
      table[:, 0] = np.where(labels == 1, "1", "0")
      table[:, 1:1 + NUM_INT] = int_strs[np.minimum(ints, 1023) + 1]
      table[:, 1 + NUM_INT:] = hexes[np.arange(NUM_CAT), ranks]
      f.write("".join("\t".join(row) + "\n" for row in table.tolist()))
      all_labels.append(labels)
      all_p.append(p)
  labels = np.concatenate(all_labels)
  p = np.concatenate(all_p)
  eps = 1e-12
  logloss = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
  return {"rows": rows, "click_rate": float(labels.mean()),
          "optimal_auc": binary_auc(labels, p), "optimal_logloss": float(logloss)}
