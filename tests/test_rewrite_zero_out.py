"""rewrite, zero_out and op_map rules: native ZeroOut spellings are replaced
and verified; op_map swaps ops with identical signatures and refuses the
others."""
import os

import numpy as np
import pytest
import tensorflow as tf

import hpc_ops
from hpc_ops import rewrite
from hpc_ops.rewrite import core
from hpc_ops.rewrite.rules import op_map

import rewrite_models as rm


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("zero_out")


@pytest.fixture(scope="module")
def zero_out_models(tmp):
  src = rm.zero_out_model(str(tmp / "zo"))
  dst = str(tmp / "zo_out")
  report = rewrite.rewrite_saved_model(src, dst, rules=["zero_out"], verify=2)
  return src, dst, report


def test_native_patterns_replaced_and_verified(zero_out_models):
  src, dst, report = zero_out_models
  assert report.verification["ok"], str(report)
  kinds = sorted(
      r.detail.split("(")[-1].rstrip(")") for r in report.replacements)
  assert kinds == [
      "concat pattern", "concat pattern", "flat mask pattern", "mask pattern",
      "scatter pattern"
  ], str(report)
  mg = rm.load_saved_model_proto(dst).meta_graphs[0]

  def ops(name):
    (found,) = rm.function_ops(mg, name).values()
    return found

  for name in ("mask", "flat_mask", "concat", "concat_static", "scatter"):
    assert ops(name).count("ZeroOut") == 1, (name, ops(name))
    assert not {"OneHot", "ConcatV2", "TensorScatterUpdate", "ZerosLike"} & set(
        ops(name)), (name, ops(name))
    # concat_static: tf.function folded zeros_like(x[1:]) into a Const and
    # left x[1:] unread in the original; the rewrite leaves dead code be.
    assert ops(name).count("StridedSlice") == (name == "concat_static"), (
        name, ops(name))
  # Look-alikes that compute something else are left alone.
  assert "OneHot" in ops("not_first") and "ZeroOut" not in ops("not_first")
  assert "ConcatV2" in ops("rows") and "ZeroOut" not in ops("rows")
  sigs = {s["name"]: s for s in report.verification["signatures"]}
  assert sigs["flat_mask"]["outputs"][0]["dtype"] == "int64"
  assert sigs["concat_static"]["outputs"][0]["dtype"] == "float16"


def test_mask_pattern_difference_on_non_finite_values(zero_out_models):
  """Documented: the mask pattern multiplies, so Inf/NaN outside the first
  element give NaN; ZeroOut gives 0."""
  src, dst, _ = zero_out_models
  x = tf.constant([[1.0, np.inf, np.nan]])
  orig = tf.saved_model.load(src).signatures["mask"](x=x)["output_0"].numpy()
  new = tf.saved_model.load(dst).signatures["mask"](x=x)["output_0"].numpy()
  assert orig[0, 0] == 1.0 and np.isnan(orig[0, 1:]).all()
  np.testing.assert_array_equal(new, [[1.0, 0.0, 0.0]])
  np.testing.assert_array_equal(new, hpc_ops.zero_out(x).numpy())


# -- op_map --------------------------------------------------------------------


class Exp(tf.Module):

  @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
  def f(self, x):
    return {"y": tf.exp(x) * 2.0}


def test_op_map_replaces_and_verification_catches_a_changed_result(tmp):
  """Exp=Expm1 has identical signatures but not the same values: the
  rewrite happens, verification reports the mismatch and the destination
  is not written."""
  m = Exp()
  src = str(tmp / "exp")
  tf.saved_model.save(m, src, signatures={"f": m.f})
  dst = str(tmp / "exp_out")
  report = rewrite.rewrite_saved_model(src,
                                       dst,
                                       rules=["op_map:Exp=Expm1"],
                                       verify=1)
  assert report.counts() == {"op_map": 1}
  assert not report.verification["ok"]
  (sig,) = report.verification["signatures"]
  assert sig["name"] == "f" and not sig["ok"]
  assert sig["outputs"][0]["max_abs_diff"] == pytest.approx(2.0, rel=1e-3)
  assert not os.path.exists(dst)
  assert "verification failed" in str(report)
  # Without verification it is written, and holds Expm1.
  report = rewrite.rewrite_saved_model(src, dst, rules="op_map:Exp=Expm1")
  ops = rm.all_ops(rm.load_saved_model_proto(dst).meta_graphs[0])
  assert ops.get("Expm1") == 1 and "Exp" not in ops


def test_op_map_renames_outputs_in_function_bodies(tmp):
  """Identity (output `output`) -> ZeroOut (output `zeroed`): readers in
  function bodies are rewired to the new output name; resource Identities
  are refused by ZeroOut's type constraint and reported."""

  class M(tf.Module):

    def __init__(self):
      super().__init__()
      self.v = tf.Variable([5.0, 6.0])

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def f(self, x):
      v = tf.raw_ops.ReadVariableOp(resource=tf.identity(self.v.handle),
                                    dtype=tf.float32)
      return tf.identity(x * 2.0) + v[0]

  m = M()
  src = str(tmp / "ident")
  tf.saved_model.save(m, src, signatures={"f": m.f})
  mg, report = rewrite.rewrite_meta_graph(
      rm.load_saved_model_proto(src).meta_graphs[0],
      rules=["op_map:Identity=ZeroOut"])
  assert report.counts()["op_map"] >= 2
  (body,) = [
      f for f in mg.graph_def.library.function
      if f.signature.name.startswith("__inference_f_")
  ]
  refs = [i for n in body.node_def for i in n.input] + list(body.ret.values())
  zeroed = {n.name for n in body.node_def if n.op == "ZeroOut"}
  for r in refs:
    if r.split(":")[0] in zeroed:
      assert r.split(":")[1] == "zeroed", r
  skipped = [s for s in report.skipped if s.rule == "op_map"]
  assert any("ZeroOut does not allow T=DT_RESOURCE" in s.reason
             for s in skipped), \
      str(report)


@pytest.mark.parametrize("spec,fragment", [
    ("Relu=MatMul", "Relu has 1 input (features: T), MatMul has 2 inputs "
     "(a: T, b: T)"),
    ("Relu=Cast", "input 0 is `features: T` in Relu but `x: SrcT` in Cast"),
    ("LeakyRelu=Relu", "LeakyRelu has attr 'alpha', Relu does not"),
    ("Exp=NoSuchOp", "op 'NoSuchOp' is not registered"),
    ("Exp=Exp", "maps to itself"),
    ("Exp=Log,Log=Sqrt", "chains into"),
    ("Exp", "is not OldOp=NewOp"),
    ("exp=Log", "is not an op name"),
])
def test_op_map_refuses_bad_mappings(spec, fragment):
  with pytest.raises(rewrite.RewriteError) as e:
    op_map.OpMapRule.from_string(spec)
  assert fragment in str(e.value)


def test_op_map_signature_check_names_both_sides():
  why = op_map.signature_mismatch(core.registered_op_def("Relu"),
                                  core.registered_op_def("Softplus"))
  assert why is None  # features: T -> activations: T, same constraint kind
  why = op_map.signature_mismatch(core.registered_op_def("ZeroOut"),
                                  core.registered_op_def("Shape"))
  assert ("output 0 is `zeroed: T` in ZeroOut but `output: out_type` in "
          "Shape") in why
