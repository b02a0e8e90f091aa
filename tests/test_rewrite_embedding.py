"""rewrite, embedding rule: Keras 3 Embedding, tf.gather /
tf.nn.embedding_lookup in tf.Modules and a TF1 embedding_lookup are turned
into SparseTablePull on a table filled from the variable, give the same rows
for known ids and zero rows for unknown ones (where the original fails), and
never share a table between two models."""
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorflow.core.protobuf import meta_graph_pb2

from hpc_ops import rewrite
from hpc_ops.rewrite.rules import embedding

import rewrite_models as rm
from rewrite_models import embedding_models as em

NEW_OPS = ("SparseTableHandle", "SparseTableInitFromDense", "SparseTablePull")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp("embedding")


@pytest.fixture(scope="module")
def models(tmp):
  """name -> (source, rewritten, report); sources checked untouched."""
  src = {
      "keras1": em.keras_embedding_model(str(tmp / "keras1"), seed=1),
      "keras2": em.keras_embedding_model(str(tmp / "keras2"), seed=2),
      "lookups": em.lookups_model(str(tmp / "lookups")),
      "tf1": em.tf1_saved_model(str(tmp / "tf1")),
  }
  out = {}
  for name, path in src.items():
    before = rm.dir_checksum(path)
    dst = str(tmp / (name + "_out"))
    report = rewrite.rewrite_saved_model(path, dst, rules=["embedding"])
    assert rm.dir_checksum(path) == before
    out[name] = (path, dst, report)
  return out


def meta_graph(path):
  return rm.load_saved_model_proto(path).meta_graphs[0]


def nodes_by_op(mg):
  """op -> [(scope, NodeDef)] over the graph and every function."""
  gd = mg.graph_def
  found = {}
  for n in gd.node:
    found.setdefault(n.op, []).append(("", n))
  for f in gd.library.function:
    for n in f.node_def:
      found.setdefault(n.op, []).append((f.signature.name, n))
  return found


def function(mg, name):
  (f,) = [f for f in mg.graph_def.library.function if f.signature.name == name]
  return f


def check_pull_wiring(mg):
  """Every pull reads a handle and waits for an init of that handle; every
  new node has unique names in its graph; returns the pull nodes."""
  by_op = nodes_by_op(mg)
  pulls = by_op.get("SparseTablePull", [])
  scopes = {
      "": mg.graph_def.node,
      **{f.signature.name: f.node_def for f in mg.graph_def.library.function}
  }
  for scope, pull in pulls:
    nodes = {n.name: n for n in scopes[scope]}
    assert len(nodes) == len(scopes[scope]), scope
    handle = nodes[pull.input[0].split(":")[0]]
    assert handle.op == "SparseTableHandle"
    (ctrl,) = [i[1:] for i in pull.input if i.startswith("^")]
    init = nodes[ctrl]
    assert init.op == "SparseTableInitFromDense"
    assert init.input[0].split(":")[0] == handle.name
    assert not pull.attr["insert_missing"].b
    assert pull.attr["dim"].i == handle.attr["dim"].i
    assert handle.attr["initializer"].s == b"zeros"
    assert handle.attr["optimizer"].s == b"sgd"
    assert handle.attr["shared_name"].s.startswith(b"hpc_ops_embedding_")
  return pulls


def shared_names(mg):
  return {
      n.attr["shared_name"].s.decode()
      for _, n in nodes_by_op(mg).get("SparseTableHandle", [])
  }


def test_keras_embedding_is_rewritten(models):
  src, dst, report = models["keras1"]
  assert report.counts() == {"embedding": 1}, str(report)
  (r,) = report.replacements
  assert "from variable 'emb/embeddings' [50, 8]" in r.detail
  assert "ids outside [0, 50) now read zero rows instead of failing" in r.detail
  mg = meta_graph(dst)
  by_op = nodes_by_op(mg)
  assert "GatherV2" not in by_op and "ResourceGather" not in by_op
  (pull_scope, pull), = check_pull_wiring(mg)
  # Keeps the lookup's name (Keras numbers its models per process).
  (_, gather), = nodes_by_op(meta_graph(src))["GatherV2"]
  assert gather.name.endswith("/emb_1/GatherV2"), gather.name
  assert pull.name == gather.name
  body = {n.name: n for n in function(mg, pull_scope).node_def}
  # Keras reads the variable for the gather: that read fills the table.
  init = body[gather.name + "/SparseTableInitFromDense"]
  assert body[init.input[1].split(":")[0]].op == "ReadVariableOp"
  # int32 ids (after Keras' negative-id wrap) are cast to int64.
  cast = body[pull.input[1].split(":")[0]]
  scope = gather.name[:-len("GatherV2")]
  assert cast.op == "Cast" and cast.input == [scope + "SelectV2:output:0"]
  # Function bodies carry _output_shapes: the new nodes have them too.
  shape = [d.size for d in pull.attr["_output_shapes"].list.shape[0].dim]
  assert shape == [-1, 3, em.DIM]
  assert list(init.attr["_output_shapes"].list.shape) == []
  stripped = {o.name for o in mg.meta_info_def.stripped_op_list.op}
  assert set(NEW_OPS) <= stripped and "GatherV2" not in stripped
  # variables/ is copied as it was.
  for name in os.listdir(os.path.join(src, "variables")):
    with open(os.path.join(src, "variables", name), "rb") as a, \
        open(os.path.join(dst, "variables", name), "rb") as b:
      assert a.read() == b.read()


def test_every_gather_of_the_lookups_module_is_rewritten(models):
  src, dst, report = models["lookups"]
  before = nodes_by_op(meta_graph(src))
  mg = meta_graph(dst)
  by_op = nodes_by_op(mg)
  assert "ResourceGather" not in by_op
  pulls = check_pull_wiring(mg)
  assert len(pulls) == len(before["ResourceGather"]) == len(
      report.replacements)
  # Both lookups of `twice` use one handle and one initialisation.
  (twice,) = rm.function_ops(mg, "twice").values()
  assert twice.count("SparseTablePull") == 2
  assert twice.count("SparseTableHandle") == 1
  assert twice.count("SparseTableInitFromDense") == 1
  (gather64,) = rm.function_ops(mg, "gather64").values()
  assert "Cast" not in gather64  # int64 ids go straight in
  (lookup32,) = rm.function_ops(mg, "lookup32").values()
  assert "Cast" in lookup32
  # The lookup in the tf.cond branch (a function the variable reaches
  # only through the If node) is rewritten too.
  scopes = {s for s, _ in pulls}
  assert any(s.startswith("cond_true") for s in scopes), scopes
  # One table per variable: `v` everywhere, `small` apart.
  names = shared_names(mg)
  assert len(names) == 2
  assert {n.split("_")[3] for n in names} == {"v", "small"}


def test_tf1_graph_is_rewritten_and_reuses_the_snapshot_read(models):
  src, dst, report = models["tf1"]
  assert report.counts() == {"embedding": 1}, str(report)
  mg = meta_graph(dst)
  by_op = nodes_by_op(mg)
  assert "ResourceGather" not in by_op
  ((scope, pull),) = check_pull_wiring(mg)
  assert scope == "" and pull.name == "embedding_lookup"
  nodes = {n.name: n for n in mg.graph_def.node}
  init = nodes["embedding_lookup/SparseTableInitFromDense"]
  assert init.input[1] == "emb/Read/ReadVariableOp"  # no second read added
  assert len(by_op["ReadVariableOp"]) == len(
      nodes_by_op(meta_graph(src))["ReadVariableOp"])
  assert "_class" not in pull.attr  # colocation with the variable dropped
  assert mg.signature_def["serving_default"].outputs["rows"].name == "rows:0"


def test_outputs_equal_known_ids_and_zero_rows_for_unknown_ones(
    models, fresh_python):
  """In a fresh process (as a server loads it): equal rows for ids in the
  vocabulary, zero rows beyond it (the original fails), two rewritten Keras
  models with different weights loaded side by side each serve their own
  rows, and in a TF1 Session the table holds exactly the V rows."""
  paths = {k: (v[0], v[1]) for k, v in models.items()}
  proc = fresh_python("""
      import numpy as np
      import tensorflow as tf
      from hpc_ops import rewrite  # registers the hpc_ops ops

      paths = %r
      V, D, SMALL = %d, %d, %d
      rng = np.random.default_rng(0)
      loaded = {k: [tf.saved_model.load(p) for p in v]
                for k, v in paths.items()}

      def both(name, sig, **kw):
        orig, new = (m.signatures[sig] for m in loaded[name])
        return orig, new, {k: tf.constant(v) for k, v in kw.items()}

      def same(name, sig, **kw):
        orig, new, feed = both(name, sig, **kw)
        a, b = orig(**feed), new(**feed)
        assert sorted(a) == sorted(b)
        for k in a:
          assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
          assert np.array_equal(a[k].numpy(), b[k].numpy()), (name, sig, k)
        return {k: v.numpy() for k, v in b.items()}

      def fails_then_zeros(name, sig, key, **kw):
        orig, new, feed = both(name, sig, **kw)
        try:
          orig(**feed)
          raise AssertionError("the original accepted %%r" %% kw)
        except tf.errors.InvalidArgumentError as e:
          assert "out of range" in str(e) or "not in [0" in str(e), str(e)
        return new(**feed)[key].numpy()

      # Keras: the two models, in one process, each equal its original.
      ids = rng.integers(-V, V, size=(16, 3)).astype(np.int32)
      rows = {k: same(k, "serving_default", ids=ids)["output_0"]
              for k in ("keras1", "keras2")}
      assert not np.array_equal(rows["keras1"], rows["keras2"])
      for k in ("keras1", "keras2"):
        # Keras wraps -V..-1 itself; V, 10**9 and -V-1 are unknown ids.
        out = fails_then_zeros(k, "serving_default", "output_0",
                               ids=np.array([[3, V, 10**9], [-V - 1, -1, 7]],
                                            np.int32))
        ref = same(k, "serving_default",
                   ids=np.array([[3, 0, 0], [0, -1, 7]], np.int32))
        assert (out[0, 1:] == 0).all() and (out[1, 0] == 0).all()
        np.testing.assert_array_equal(out[0, 0], ref["output_0"][0, 0])
        np.testing.assert_array_equal(out[1, 1:], ref["output_0"][1, 1:])
        assert (np.abs(ref["output_0"]) > 0).all()

      # tf.Module lookups, int64 and int32 ids, nested and tf.cond.
      same("lookups", "gather64", ids=rng.integers(0, V, 33))
      same("lookups", "lookup32",
           ids=rng.integers(0, V, (5, 2)).astype(np.int32))
      same("lookups", "twice", a=rng.integers(0, V, 9),
           b=rng.integers(0, V, 9))
      same("lookups", "nested", ids=rng.integers(0, V, 4).astype(np.int32))
      for flag in (True, False):
        same("lookups", "cond", ids=rng.integers(0, V, 6), flag=flag)
      same("lookups", "small_vocab",
           ids=np.arange(SMALL, dtype=np.int32))
      out = fails_then_zeros("lookups", "gather64", "rows",
                             ids=np.array([1, V, 2**40, -1], np.int64))
      ref = same("lookups", "gather64", ids=np.array([1], np.int64))["rows"]
      np.testing.assert_array_equal(out[0], ref[0])
      assert out.shape == (4, D) and (out[1:] == 0).all()
      out = fails_then_zeros("lookups", "small_vocab", "rows",
                             ids=np.array([SMALL], np.int32))
      assert out.shape == (1, 2) and (out == 0).all()

      # TF1 SavedModel.
      same("tf1", "serving_default",
           ids=rng.integers(0, V, 12).astype(np.int32))
      out = fails_then_zeros("tf1", "serving_default", "rows",
                             ids=np.array([V + 1], np.int32))
      assert (out == 0).all()

      # In a TF1 Session the table is found under its shared_name, holds
      # the V rows and nothing else after lookups of unknown ids.
      from hpc_ops import gen_sparse_table_ops as st
      with tf.Graph().as_default() as graph, tf.compat.v1.Session() as sess:
        tf.compat.v1.saved_model.loader.load(sess, ["serve"], paths["tf1"][1])
        got = sess.run("rows:0", {"ids:0": [2, V, -5]})
        assert (got[1:] == 0).all() and (got[0] != 0).all()
        (name,) = {op.get_attr("shared_name") for op in graph.get_operations()
                   if op.type == "SparseTableHandle"}
        size = st.sparse_table_size(st.sparse_table_handle(
            dim=D, initializer="zeros", optimizer="sgd", shared_name=name))
        assert sess.run(size) == V, sess.run(size)
      print("FRESH OK")
      """ % (paths, em.VOCAB, em.DIM, em.SMALL_VOCAB))
  assert "FRESH OK" in proc.stdout


def test_shared_names_are_deterministic_and_per_model(models, tmp):
  src, dst, _ = models["keras1"]
  again = str(tmp / "keras1_again")
  rewrite.rewrite_saved_model(src, again, rules=["embedding"])
  with open(os.path.join(dst, "saved_model.pb"), "rb") as a, \
      open(os.path.join(again, "saved_model.pb"), "rb") as b:
    assert a.read() == b.read()  # same input, same bytes
  names = {k: shared_names(meta_graph(models[k][1])) for k in models}
  assert len(names["keras1"]) == len(names["keras2"]) == 1
  # Same architecture and graph, different weights: different tables.
  assert names["keras1"] != names["keras2"]
  every = [n for v in names.values() for n in v]
  assert len(every) == len(set(every))
  # A MetaGraphDef rewritten in memory is named after its own bytes.
  mg = meta_graph(src)
  a, _ = rewrite.rewrite_meta_graph(mg, rules=["embedding"])
  b, _ = rewrite.rewrite_meta_graph(mg, rules=["embedding"])
  assert a.SerializeToString(deterministic=True) == b.SerializeToString(
      deterministic=True)


def test_second_rewrite_changes_nothing(models, tmp):
  for name in ("keras1", "tf1"):
    _, once, _ = models[name]
    twice = str(tmp / (name + "_twice"))
    report = rewrite.rewrite_saved_model(once, twice, rules=["embedding"])
    assert not report.replacements and not report.skipped, str(report)
    with open(os.path.join(once, "saved_model.pb"), "rb") as a, \
        open(os.path.join(twice, "saved_model.pb"), "rb") as b:
      assert a.read() == b.read()


def test_rule_is_opt_in(models):
  src = models["keras1"][0]
  _, report = rewrite.rewrite_meta_graph(meta_graph(src))
  assert not report.replacements and "embedding" not in str(report)


def test_near_misses_are_skipped_with_their_reasons(tmp):
  src = em.near_misses_model(str(tmp / "near"))
  _, report = rewrite.rewrite_meta_graph(meta_graph(src), rules=["embedding"])
  assert not report.replacements, str(report)
  reasons = {s.scope.split()[-1].split("_")[3]: s.reason for s in report.skipped}
  assert reasons["float64"] == ("the rows are double: SparseTablePull serves "
                                "float32 rows")
  assert reasons["batch"] == ("batch_dims is 1: SparseTablePull looks up "
                              "whole rows (batch_dims 0)")
  assert reasons["columns"] == ("the gather is along axis 1: only row "
                                "lookups (axis 0) are embedding lookups")
  assert reasons["lookup"].startswith(
      "variable 'trained' is also written by 'AssignAddVariableOp' "
      "(AssignAddVariableOp) in function __inference_bump_")
  assert reasons["lookup"].endswith(
      "the table is filled from it once and would not see the change")
  assert reasons["xla"].startswith("function __inference_xla_")
  assert reasons["xla"].endswith("is compiled with XLA (jit_compile), which "
                                 "has no kernel for the sparse table ops")
  assert len(report.skipped) == 5
  assert "skipped, because the rows are double" in str(report)


def test_without_the_object_graph_variables_are_traced_through_calls(models):
  """With the object graph dropped, the signatures' lookups still find their
  variable (a top-level VarHandleOp passed down through the calls, shape
  from its attr); the trace no signature calls is skipped with the
  reason."""
  src = models["lookups"][0]
  mg = meta_graph(src)
  mg.ClearField("object_graph_def")
  new, report = rewrite.rewrite_meta_graph(mg, rules=["embedding"])
  assert report.replacements
  untraced = [s for s in report.skipped if "can trace" in s.reason]
  assert untraced and all(
      "__inference__inner_" in s.scope for s in untraced), str(report)
  assert "it does not come from a VarHandleOp or a function argument bound " \
      "to a variable" in untraced[0].reason
  gathers = nodes_by_op(mg)["ResourceGather"]
  assert len(report.replacements) == len(gathers) - len(untraced)
  assert any(r.scope.startswith("function cond_true") for r in report.replacements)


def test_unknown_variable_shape_is_skipped(models):
  mg = meta_graph(models["tf1"][0])
  (var,) = [n for n in mg.graph_def.node if n.name == "emb"]
  var.attr["shape"].shape.Clear()
  var.attr["shape"].shape.unknown_rank = True
  copy = meta_graph_pb2.MetaGraphDef()
  copy.CopyFrom(mg)
  new, report = rewrite.rewrite_meta_graph(mg, rules=["embedding"])
  assert not report.replacements
  (skip,) = report.skipped
  assert skip.node == "embedding_lookup"
  assert skip.reason == ("variable 'emb' has no static shape "
                         "(SparseTablePull needs its row width)")
  assert mg == copy  # the argument is left alone


def test_verify_draws_ids_inside_the_smallest_vocabulary(models, tmp):
  """--verify's integers are drawn in [0, 4); the `small` variable has 3
  rows, so verification draws below 3 (an id of 3 would fail the original
  and read zeros from the rewrite: a false mismatch)."""
  rule = embedding.EmbeddingRule()
  report = rewrite.rewrite_saved_model(models["lookups"][0],
                                       str(tmp / "lookups_verified"),
                                       rules=[rule],
                                       verify=2)
  assert rule.verify_int_limit() == em.SMALL_VOCAB
  assert report.verification["ok"], str(report)
  assert ("integer inputs drawn in [0, 3): the smallest vocabulary of a "
          "rewritten lookup") in str(report)
  assert {s["name"] for s in report.verification["signatures"]} == {
      "gather64", "lookup32", "twice", "nested", "cond", "small_vocab"
  }


def test_cli_rules_embedding_verify(models, tmp):
  src = models["keras2"][0]
  dst = str(tmp / "cli")
  proc = subprocess.run([
      sys.executable, "-m", "hpc_ops.rewrite", src, dst, "--rules",
      "rms_norm,zero_out,embedding", "--verify", "2"
  ],
                        capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr
  assert "1 replacement (embedding: 1)" in proc.stdout
  assert "ids outside [0, 50) now read zero rows" in proc.stdout
  assert "verification (2 random batches per signature): PASSED" in proc.stdout
  assert "signature 'serving_default' (serve): ok" in proc.stdout
  assert shared_names(meta_graph(dst)) == shared_names(
      meta_graph(models["keras2"][1]))
