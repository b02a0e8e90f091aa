"""Models with embedding lookups for the rewrite's `embedding` rule: Keras 3
`Embedding` exported with `model.export`, `tf.Module`s doing `tf.gather` /
`tf.nn.embedding_lookup` on variables (and lookups the rule must refuse),
and a TF1 SavedModel."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

VOCAB = 50
DIM = 8
SMALL_VOCAB = 3  # below the 4 that --verify draws integers from


def table(vocab=VOCAB, dim=DIM, seed=0, dtype=np.float32):
  """Distinct, non-zero rows: a zero row returned for a known id would show."""
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((vocab, dim)) + 3.0).astype(dtype)


def keras_embedding_model(path, seed=1):
  """ids [None, 3] int32 -> (embeddings [None, 3, DIM], Dense logits)."""
  import keras
  keras.utils.set_random_seed(seed)
  inp = keras.Input((3,), dtype="int32", name="ids")
  emb = keras.layers.Embedding(VOCAB, DIM, name="emb")(inp)
  logits = keras.layers.Dense(4, name="dense")(keras.layers.Flatten()(emb))
  model = keras.Model(inp, [emb, logits])
  model.get_layer("emb").embeddings.assign(table(seed=seed))
  model.export(path, verbose=False)
  return path


class Lookups(tf.Module):
  """tf.gather / tf.nn.embedding_lookup on variables: int64 and int32 ids,
  two lookups of one variable, a lookup in a function called from another,
  one in a tf.cond branch, and a variable smaller than --verify's integer
  range."""

  def __init__(self, seed=0):
    super().__init__()
    self.v = tf.Variable(table(seed=seed), name="v")
    self.small = tf.Variable(table(SMALL_VOCAB, 2, seed=seed + 1),
                             name="small")

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
  def gather64(self, ids):
    return {"rows": tf.gather(self.v, ids)}

  @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int32)])
  def lookup32(self, ids):
    return {"rows": tf.nn.embedding_lookup(self.v, ids) * 2.0}

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.int64),
      tf.TensorSpec([None], tf.int64)
  ])
  def twice(self, a, b):
    return {"sum": tf.gather(self.v, a) + tf.gather(self.v, b)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
  def nested(self, ids):
    return {"rows": self._inner(ids) + 1.0}

  @tf.function
  def _inner(self, ids):
    return tf.gather(self.v, ids)

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.int64),
      tf.TensorSpec([], tf.bool)
  ])
  def cond(self, ids, flag):
    # The lookup lives in a branch function: the variable reaches it only
    # through the If node's inputs.
    return {
        "rows":
            tf.cond(flag, lambda: tf.gather(self.v, ids),
                    lambda: tf.zeros([tf.size(ids), DIM]))
    }

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
  def small_vocab(self, ids):
    return {"rows": tf.gather(self.small, ids)}

  def signatures(self):
    return {
        name: getattr(self, name)
        for name in ("gather64", "lookup32", "twice", "nested", "cond",
                     "small_vocab")
    }


def lookups_model(path, seed=0):
  m = Lookups(seed)
  tf.saved_model.save(m, path, signatures=m.signatures())
  return path


class NearMisses(tf.Module):
  """Gathers the rule must leave alone, each for a reported reason."""

  def __init__(self):
    super().__init__()
    self.v64 = tf.Variable(table(dtype=np.float64), name="v64")
    self.v = tf.Variable(table(), name="v")
    self.trained = tf.Variable(table(), name="trained")

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
  def float64(self, ids):
    return tf.gather(self.v64, ids)

  @tf.function(input_signature=[tf.TensorSpec([VOCAB, 2], tf.int64)])
  def batch_dims(self, ids):
    # Row r of the output gathers columns of row r of the variable (ids
    # must have the variable's first dimension: TensorFlow CHECK-fails
    # otherwise).
    return tf.raw_ops.ResourceGather(resource=self.v.handle,
                                     indices=ids,
                                     dtype=tf.float32,
                                     batch_dims=1)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
  def columns(self, ids):
    return tf.gather(self.v.read_value(), ids, axis=1)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
  def lookup_trained(self, ids):
    return tf.gather(self.trained, ids)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)],
               jit_compile=True)
  def xla(self, ids):
    return tf.gather(self.v, ids)

  @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
  def bump(self, x):
    self.trained.assign_add(tf.fill(self.trained.shape, x))
    return x

  def signatures(self):
    return {
        name: getattr(self, name)
        for name in ("float64", "batch_dims", "columns", "lookup_trained",
                     "xla", "bump")
    }


def near_misses_model(path):
  m = NearMisses()
  tf.saved_model.save(m, path, signatures=m.signatures())
  return path


def tf1_saved_model(path):
  """TF1: ids placeholder int32 [None] -> embedding_lookup on a resource
  variable (reads the variable through the graph's own snapshot)."""
  g = tf.Graph()
  with g.as_default():
    ids = tf.compat.v1.placeholder(tf.int32, [None], name="ids")
    emb = tf.compat.v1.get_variable("emb", initializer=table(seed=7))
    rows = tf.identity(tf.nn.embedding_lookup(emb, ids), name="rows")
    with tf.compat.v1.Session(graph=g) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      b = tf.compat.v1.saved_model.Builder(path)
      sig = tf.compat.v1.saved_model.predict_signature_def({"ids": ids},
                                                           {"rows": rows})
      b.add_meta_graph_and_variables(sess, ["serve"],
                                     signature_def_map={"serving_default": sig})
      b.save()
  return path
