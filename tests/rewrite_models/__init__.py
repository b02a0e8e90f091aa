"""Models with the native patterns the rewrite rules replace, saved the way
users save them (Keras 3 `model.export`, `tf.saved_model.save`, TF1
SavedModel builder, `export_meta_graph`), and helpers to inspect graphs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hashlib  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf import saved_model_pb2  # noqa: E402

H = 16  # hidden size of the small test models

# -- inspection ---------------------------------------------------------------


def load_saved_model_proto(path):
  sm = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    sm.ParseFromString(f.read())
  return sm


def all_ops(meta_graph):
  """Counter-like dict op -> count over the graph and every function."""
  ops = {}
  gd = meta_graph.graph_def
  for n in list(gd.node) + [n for f in gd.library.function for n in f.node_def]:
    ops[n.op] = ops.get(n.op, 0) + 1
  return ops


def function_ops(meta_graph, name):
  """{function name: [ops]} for the traces of the tf.function `name`
  (library functions named __inference_<name>_<number>)."""
  pattern = re.compile(r"__inference_%s_\d+" % re.escape(name))
  return {
      f.signature.name: [n.op for n in f.node_def]
      for f in meta_graph.graph_def.library.function
      if pattern.fullmatch(f.signature.name)
  }


def dir_checksum(path):
  """sha256 over every file's relative path, bytes and mtime."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(os.path.relpath(p, path).encode())
      h.update(str(os.stat(p).st_mtime_ns).encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


# -- models -------------------------------------------------------------------


def keras_rms_model(path, policy="float32", depth=2, save="export"):
  """Dense + RMSNormalization blocks, saved with model.export (or
  tf.saved_model.save with save="tf")."""
  import keras
  old = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    keras.utils.set_random_seed(1)
    inp = keras.Input((H,),
                      dtype="float32" if policy.startswith("mixed") else policy)
    y = inp
    for i in range(depth):
      y = keras.layers.Dense(H, name="dense_%d" % i)(y)
      norm = keras.layers.RMSNormalization(epsilon=1e-5, name="rms_%d" % i)
      y = norm(y)
    model = keras.Model(inp, y)
    # Non-trivial gammas so that a dropped gamma would show.
    for layer in model.layers:
      if isinstance(layer, keras.layers.RMSNormalization):
        layer.scale.assign(np.linspace(0.5, 1.5, H).astype("float32"))
    if save == "export":
      model.export(path, verbose=False)
    else:
      tf.saved_model.save(model, path)
  finally:
    keras.mixed_precision.set_global_policy(old)
  return path


class HandWritten(tf.Module):
  """The hand-written RMSNorm spellings, one signature each."""

  def __init__(self):
    super().__init__()
    self.g = tf.Variable(np.linspace(0.5, 1.5, H).astype(np.float32))
    self.g64 = tf.Variable(np.linspace(0.5, 1.5, H))

  @tf.function(input_signature=[tf.TensorSpec([None, 3, H], tf.float32)])
  def square_mean_rsqrt(self, x):
    return x * tf.math.rsqrt(
        tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + 1e-5) * self.g

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.float32)])
  def sum_sqrt_gamma_first(self, x):
    ms = tf.reduce_sum(x * x, axis=1, keepdims=True) / float(H)
    return self.g * x / tf.sqrt(1e-5 + ms)

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.bfloat16)])
  def bf16_upcast(self, x):
    xf = tf.cast(x, tf.float32)
    v = tf.reduce_mean(tf.math.pow(xf, 2.0), axis=-1, keepdims=True)
    return tf.cast(xf * tf.math.rsqrt(v + 1e-6), tf.bfloat16) * tf.cast(
        self.g, tf.bfloat16)

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.float16)])
  def f16_native_no_gamma(self, x):
    return x * tf.math.rsqrt(
        tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + 1e-3)

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.float64)])
  def f64_pow_reciprocal(self, x):
    ms = tf.reduce_sum(tf.square(x), axis=-1, keepdims=True) * (1.0 / H)
    inv = 1.0 / tf.sqrt(ms + 1e-6)
    return (x * inv) * self.g64

  @tf.function(input_signature=[
      tf.TensorSpec([None, H], tf.float32),
      tf.TensorSpec([], tf.bool)
  ])
  def nested(self, x, flag):
    # The pattern lives in a cond branch and a while body: functions of
    # the library called from other functions.
    y = tf.cond(flag, lambda: self._inner(x), lambda: x * 2.0)

    def body(i, v):
      return i + 1, self._inner(v) + 1.0

    _, z = tf.while_loop(lambda i, v: i < 2, body, [0, y])
    return z

  @tf.function
  def _inner(self, x):
    return x * tf.math.rsqrt(
        tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + 1e-5) * self.g

  def signatures(self):
    return {
        name: getattr(self, name)
        for name in ("square_mean_rsqrt", "sum_sqrt_gamma_first", "bf16_upcast",
                     "f16_native_no_gamma", "f64_pow_reciprocal", "nested")
    }


def hand_written_model(path):
  m = HandWritten()
  tf.saved_model.save(m, path, signatures=m.signatures())
  return path


class NearMisses(tf.Module):
  """RMSNorm-looking graphs the rule must leave alone (and report)."""

  def __init__(self):
    super().__init__()
    self.eps = tf.Variable(1e-5)
    self.g = tf.Variable(np.linspace(0.5, 1.5, H).astype(np.float32))

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.float32)])
  def variable_epsilon(self, x):
    return x * tf.math.rsqrt(
        tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + self.eps)

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.float32)])
  def shared_statistic(self, x):
    inv = tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True) + 1e-5)
    return {"y": x * inv * self.g, "inv": inv}

  @tf.function(input_signature=[tf.TensorSpec([None, 4, H], tf.float32)])
  def middle_axis(self, x):
    return x * tf.math.rsqrt(
        tf.reduce_mean(tf.square(x), axis=1, keepdims=True) + 1e-5)

  @tf.function(input_signature=[tf.TensorSpec([None, 4, H], tf.float32)])
  def two_axes(self, x):
    return x * tf.math.rsqrt(
        tf.reduce_mean(tf.square(x), axis=[1, 2], keepdims=True) + 1e-5)

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.float32)])
  def no_keepdims(self, x):
    ms = tf.reduce_mean(tf.square(x), axis=-1)
    return x * tf.expand_dims(tf.math.rsqrt(ms + 1e-5), -1)

  @tf.function(input_signature=[tf.TensorSpec([None, H], tf.float32)])
  def no_epsilon(self, x):
    return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1, keepdims=True))

  def signatures(self):
    return {
        name: getattr(self, name)
        for name in ("variable_epsilon", "shared_statistic", "middle_axis",
                     "two_axes", "no_keepdims", "no_epsilon")
    }


def near_misses_model(path):
  m = NearMisses()
  tf.saved_model.save(m, path, signatures=m.signatures())
  return path


class ZeroOutPatterns(tf.Module):
  """The native spellings of ZeroOut."""

  @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
  def mask(self, x):
    return x * tf.reshape(tf.one_hot(0, tf.size(x), dtype=x.dtype), tf.shape(x))

  @tf.function(input_signature=[tf.TensorSpec([None, 2, 2], tf.int64)])
  def flat_mask(self, x):
    flat = tf.reshape(x, [-1])
    return tf.reshape(flat * tf.one_hot(0, tf.size(x), dtype=x.dtype),
                      tf.shape(x))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
  def concat(self, x):
    return tf.concat([x[:1], tf.zeros_like(x[1:])], 0)

  @tf.function(input_signature=[tf.TensorSpec([5], tf.float16)])
  def concat_static(self, x):
    return tf.concat([x[:1], tf.zeros_like(x[1:])], 0)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.float64)])
  def scatter(self, x):
    return tf.tensor_scatter_nd_update(tf.zeros_like(x), [[0]], x[:1])

  @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
  def not_first(self, x):  # keeps element 1: not ZeroOut
    return x * tf.reshape(tf.one_hot(1, tf.size(x), dtype=x.dtype), tf.shape(x))

  @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
  def rows(self, x):  # rank 2 concat keeps a whole row: not ZeroOut
    return tf.concat([x[:1], tf.zeros_like(x[1:])], 0)

  def signatures(self):
    return {
        name: getattr(self, name)
        for name in ("mask", "flat_mask", "concat", "concat_static", "scatter",
                     "not_first", "rows")
    }


def zero_out_model(path):
  m = ZeroOutPatterns()
  tf.saved_model.save(m, path, signatures=m.signatures())
  return path


def tf1_graph():
  """A TF1 graph with the RMSNorm formula and a ZeroOut mask; returns
  (graph, x placeholder, outputs dict)."""
  g = tf.Graph()
  with g.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, H], name="x")
    gamma = tf.compat.v1.get_variable("gamma",
                                      initializer=np.linspace(
                                          0.5, 1.5, H).astype(np.float32))
    with tf.device("/device:CPU:0"):
      y = tf.multiply(x * tf.math.rsqrt(
          tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + 1e-6),
                      gamma,
                      name="y")
    z = tf.multiply(x,
                    tf.reshape(tf.one_hot(0, tf.size(x)), tf.shape(x)),
                    name="z")
    # A control dependency on the pattern's last node must survive.
    with tf.control_dependencies([y]):
      after = tf.identity(z, name="after")
  return g, x, {"y": y, "z": z, "after": after}


def tf1_saved_model(path):
  g, x, outs = tf1_graph()
  with g.as_default(), tf.compat.v1.Session(graph=g) as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    b = tf.compat.v1.saved_model.Builder(path)
    sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, outs)
    b.add_meta_graph_and_variables(sess, ["serve"],
                                   signature_def_map={"serving_default": sig})
    b.save()
  return path


def tf1_meta_graph_file(path, as_text=False):
  """export_meta_graph (no _output_shapes: the shapes come from importing)."""
  g, _, _ = tf1_graph()
  with g.as_default():
    tf.compat.v1.train.export_meta_graph(filename=path,
                                         as_text=as_text,
                                         graph=g)
  return path
