"""rewrite, rms_norm rule: real Keras 3 and hand-written models are saved,
rewritten, checked to hold RmsNorm instead of the native pattern, and
verified equal on random inputs in a fresh process."""
import os

import numpy as np
import pytest
import tensorflow as tf

from hpc_ops import rewrite
from hpc_ops.rewrite import core

import rewrite_models as rm

NATIVE = ("Square", "Mean", "Rsqrt", "Sqrt", "Sum", "Pow", "Reciprocal")


def rms_nodes(meta_graph):
  gd = meta_graph.graph_def
  return [
      n for n in list(gd.node) +
      [n for f in gd.library.function for n in f.node_def] if n.op == "RmsNorm"
  ]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("rms")


@pytest.mark.parametrize("policy,dtype", [("float32", tf.float32),
                                          ("mixed_float16", tf.float16),
                                          ("bfloat16", tf.bfloat16)])
def test_keras_export_is_rewritten_and_verified(tmp, policy, dtype):
  src = rm.keras_rms_model(str(tmp / ("keras_" + policy)), policy)
  before = rm.dir_checksum(src)
  dst = str(tmp / ("keras_%s_out" % policy))
  report = rewrite.rewrite_saved_model(src, dst, verify=2)
  assert report.counts() == {"rms_norm": 2}, str(report)
  assert report.verification["ok"], str(report)
  assert rm.dir_checksum(src) == before  # the input is never modified
  mg = rm.load_saved_model_proto(dst).meta_graphs[0]
  nodes = rms_nodes(mg)
  assert len(nodes) == 2
  for n in nodes:
    # 16-bit inputs: the casts Keras puts around the statistics are
    # absorbed, the op runs on the 16-bit tensor itself.
    assert n.attr["T"].type == dtype.as_datatype_enum
    assert n.attr["U"].type == tf.float32.as_datatype_enum
    assert n.attr["epsilon"].f == pytest.approx(1e-5)
  ops = rm.all_ops(mg)
  assert not any(op in ops for op in NATIVE), ops
  if policy != "float32":
    # Only the Dense layers' casts of the (float32) kernels remain.
    orig_ops = rm.all_ops(rm.load_saved_model_proto(src).meta_graphs[0])
    assert ops.get("Cast", 0) < orig_ops["Cast"]
  op_names = [o.name for o in mg.meta_info_def.stripped_op_list.op]
  assert "RmsNorm" in op_names and "Rsqrt" not in op_names
  # variables/ is copied byte for byte.
  for name in os.listdir(os.path.join(src, "variables")):
    with open(os.path.join(src, "variables", name), "rb") as a, \
        open(os.path.join(dst, "variables", name), "rb") as b:
      assert a.read() == b.read()


def test_keras_tf_saved_model_save_rewrites_every_trace(tmp):
  src = rm.keras_rms_model(str(tmp / "keras_tfsave"), save="tf", depth=1)
  mg, report = rewrite.rewrite_meta_graph(
      rm.load_saved_model_proto(src).meta_graphs[0])
  # tf.saved_model.save keeps each layer call as its own function (several
  # traces): every one that holds the pattern is rewritten.
  orig = rm.load_saved_model_proto(src).meta_graphs[0]
  with_pattern = [
      f.signature.name
      for f in orig.graph_def.library.function
      if any(n.op == "Rsqrt" for n in f.node_def)
  ]
  assert len(with_pattern) >= 1
  rewritten = {r.scope.split(" ", 1)[1] for r in report.replacements}
  assert rewritten == set(with_pattern)
  assert "Rsqrt" not in rm.all_ops(mg)


@pytest.fixture(scope="module")
def hand_written(tmp):
  src = rm.hand_written_model(str(tmp / "hand"))
  dst = str(tmp / "hand_out")
  report = rewrite.rewrite_saved_model(src, dst, verify=2)
  return src, dst, report


def test_hand_written_variants_all_replaced(hand_written):
  src, dst, report = hand_written
  assert report.verification["ok"], str(report)
  assert not report.skipped, str(report)
  mg = rm.load_saved_model_proto(dst).meta_graphs[0]
  by_fn = {}
  for f in mg.graph_def.library.function:
    for n in f.node_def:
      if n.op == "RmsNorm":
        by_fn.setdefault(f.signature.name, []).append(n)

  def one(prefix):
    hits = [ns for name, ns in by_fn.items() if name.startswith(prefix)]
    assert len(hits) == 1 and len(hits[0]) == 1, (prefix, sorted(by_fn))
    return hits[0][0]

  assert one("__inference_square_mean_rsqrt_"
            ).attr["T"].type == tf.float32.as_datatype_enum
  assert one("__inference_sum_sqrt_gamma_first_"
            ).attr["epsilon"].f == pytest.approx(1e-5)
  bf16 = one("__inference_bf16_upcast_")
  assert bf16.attr["T"].type == tf.bfloat16.as_datatype_enum
  assert bf16.input[0] == "x"  # the input cast was absorbed
  f16 = one("__inference_f16_native_no_gamma_")
  assert f16.attr["T"].type == tf.float16.as_datatype_enum
  # The constant was float16: its value, not 1e-3, is what the model used.
  assert f16.attr["epsilon"].f == float(np.float16(1e-3))
  f64 = one("__inference_f64_pow_reciprocal_")
  assert (f64.attr["T"].type,
          f64.attr["U"].type) == (tf.float64.as_datatype_enum,
                                  tf.float64.as_datatype_enum)
  # The nested pattern lives in _inner, called from a cond branch and a
  # while body (functions calling functions).
  inner = [name for name in by_fn if name.startswith("__inference__inner_")]
  assert inner, sorted(by_fn)
  assert not any(op in rm.all_ops(mg) for op in ("Rsqrt", "Sqrt", "Mean"))
  sigs = {s["name"] for s in report.verification["signatures"]}
  assert {"square_mean_rsqrt", "bf16_upcast", "nested"} <= sigs


def test_rewritten_model_runs_rms_norm_in_a_fresh_process(
    hand_written, fresh_python):
  """The served model really executes RmsNorm and matches the formula."""
  _, dst, _ = hand_written
  proc = fresh_python("""
      import numpy as np, tensorflow as tf
      import hpc_ops
      m = tf.saved_model.load(%r)
      fn = m.signatures["square_mean_rsqrt"]
      gd = fn.graph.as_graph_def()
      ops = [n.op for f in gd.library.function for n in f.node_def]
      ops += [n.op for n in gd.node]
      print("RmsNorm" in ops, "Rsqrt" in ops)
      x = np.random.default_rng(0).normal(size=(5, 3, %d)).astype(np.float32)
      g = np.linspace(0.5, 1.5, %d).astype(np.float32)
      ms = (x.astype(np.float64) ** 2).mean(-1, keepdims=True)
      want = x / np.sqrt(ms + 1e-5) * g
      got = list(fn(x=tf.constant(x)).values())[0].numpy()
      print(float(np.abs(got - want).max()))
  """ % (dst, rm.H, rm.H))
  has_op, has_native, err = proc.stdout.split()
  assert has_op == "True" and has_native == "False"
  assert float(err) < 1e-5


def test_near_misses_are_reported_not_rewritten(tmp):
  src = rm.near_misses_model(str(tmp / "near"))
  report = rewrite.rewrite_saved_model(src, None, dry_run=True)
  assert not report.replacements, str(report)
  reasons = {
      s.scope.split("__inference_")[1].rsplit("_", 1)[0]: s.reason
      for s in report.skipped
      if s.rule == "rms_norm"
  }
  assert "epsilon is not a constant" in reasons["variable_epsilon"]
  assert "ReadVariableOp" in reasons["variable_epsilon"]
  assert "is also used by" in reasons["shared_statistic"]
  assert "Rsqrt" in reasons["shared_statistic"]
  assert "not the last axis" in reasons["middle_axis"]
  assert "axes [1, 2]" in reasons["two_axes"]
  assert "keepdims=False" in reasons["no_keepdims"]
  assert "no epsilon" in reasons["no_epsilon"]


def test_statistic_shared_as_output_keeps_gamma_free_part(tmp):
  """A gamma Mul whose input is also an output stops the match before it:
  the normalisation is still fused, the Mul by gamma stays."""

  class M(tf.Module):

    @tf.function(input_signature=[tf.TensorSpec([None, rm.H], tf.float32)])
    def f(self, x):
      n = x * tf.math.rsqrt(
          tf.reduce_mean(tf.square(x), -1, keepdims=True) + 1e-5)
      return {"n": n, "y": n * tf.constant(np.full([rm.H], 2.0, np.float32))}

  path = str(tmp / "shared_out")
  m = M()
  tf.saved_model.save(m, path, signatures={"f": m.f})
  mg, report = rewrite.rewrite_meta_graph(
      rm.load_saved_model_proto(path).meta_graphs[0])
  assert report.counts() == {"rms_norm": 1}
  ops = [op for ops in rm.function_ops(mg, "f").values() for op in ops]
  assert ops.count("RmsNorm") == 1 and ops.count("Mul") == 1
  assert "gamma ones" in report.replacements[0].detail


def test_tf1_saved_model_keeps_control_deps_device_and_signatures(tmp):
  src = rm.tf1_saved_model(str(tmp / "tf1"))
  dst = str(tmp / "tf1_out")
  report = rewrite.rewrite_saved_model(src, dst, verify=2)
  assert report.counts() == {"rms_norm": 1, "zero_out": 1}, str(report)
  assert report.verification["ok"], str(report)
  mg = rm.load_saved_model_proto(dst).meta_graphs[0]
  nodes = {n.name: n for n in mg.graph_def.node}
  (rms,) = rms_nodes(mg)
  assert rms.device == "/device:CPU:0"
  assert "_output_shapes" in rms.attr
  assert [d.size for d in rms.attr["_output_shapes"].list.shape[1].dim] == [-1]
  # The signature still names the (reused) output node, and the control
  # edge on it survives.
  y_name = mg.signature_def["serving_default"].outputs["y"].name
  assert y_name.split(":")[0] == rms.name
  assert "^" + rms.name in nodes["after"].input
  assert len(nodes) == len({n.name for n in mg.graph_def.node})


@pytest.mark.parametrize("as_text", [False, True], ids=["meta", "pbtxt"])
def test_meta_graph_file(tmp, as_text):
  ext = ".pbtxt" if as_text else ".meta"
  src = rm.tf1_meta_graph_file(str(tmp / ("model" + ext)), as_text)
  dst = str(tmp / ("model_out" + ext))
  report = rewrite.rewrite_meta_graph_file(src, dst)
  assert report.counts() == {"rms_norm": 1, "zero_out": 1}, str(report)
  mg, text = core.read_meta_graph_file(dst)
  assert text == as_text
  assert "RmsNorm" in rm.all_ops(mg) and "Rsqrt" not in rm.all_ops(mg)
  # Run original and rewritten graphs on the same input.
  x = np.random.default_rng(1).normal(size=(4, rm.H)).astype(np.float32)
  results = []
  for path in (src, dst):
    g = tf.Graph()
    with g.as_default():
      tf.compat.v1.train.import_meta_graph(path)
      with tf.compat.v1.Session(graph=g) as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        results.append(sess.run(["y:0", "z:0"], {"x:0": x}))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(results[0][1], results[1][1])


def test_keras_layer_norm_rms_scaling_is_not_rms_norm(tmp):
  """LayerNormalization(rms_scaling=True) divides by the variance (Keras
  warns about it), which is not RMSNorm: reported, not rewritten."""
  import keras
  import warnings
  inp = keras.Input((rm.H,))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    out = keras.layers.LayerNormalization(rms_scaling=True)(inp)
    path = str(tmp / "layer_norm")
    keras.Model(inp, out).export(path, verbose=False)
  mg, report = rewrite.rewrite_meta_graph(
      rm.load_saved_model_proto(path).meta_graphs[0])
  assert not report.replacements
  (skip,) = report.skipped
  assert "not the squared input" in skip.reason
  assert "reduce_variance/sub" in skip.reason
