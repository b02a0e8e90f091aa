"""rewrite: inputs and outputs. Idempotence, the input left untouched, dry
runs, the CLI, and malformed or hostile inputs (not a SavedModel, corrupt
protobufs, dangling inputs, recursive functions, duplicate names)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2

from hpc_ops import rewrite
from hpc_ops.rewrite import __main__ as cli
from hpc_ops.rewrite import core
from hpc_ops.rewrite import rules as rules_lib

import rewrite_models as rm


class Small(tf.Module):

  def __init__(self):
    super().__init__()
    self.g = tf.Variable(np.linspace(0.5, 1.5, rm.H).astype(np.float32))

  @tf.function(input_signature=[tf.TensorSpec([None, rm.H], tf.float32)])
  def f(self, x):
    y = x * tf.math.rsqrt(
        tf.reduce_mean(tf.square(x), -1, keepdims=True) + 1e-6)
    return {
        "y": y * self.g,
        "z": x * tf.reshape(tf.one_hot(0, tf.size(x)), tf.shape(x))
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("io") / "small")
  m = Small()
  tf.saved_model.save(m, path, signatures={"f": m.f})
  return path


def copy_with(src, dst, edit):
  """Copies SavedModel src to dst with edit(SavedModel proto) applied."""
  shutil.copytree(src, dst)
  sm = rm.load_saved_model_proto(dst)
  edit(sm)
  with open(os.path.join(dst, "saved_model.pb"), "wb") as f:
    f.write(sm.SerializeToString())
  return dst


def body(sm, name="f"):
  """The FunctionDef of tf.function `name`."""
  names = rm.function_ops(sm.meta_graphs[0], name)
  (f,) = [
      f for f in sm.meta_graphs[0].graph_def.library.function
      if f.signature.name in names
  ]
  return f


def test_rewrite_is_idempotent(small, tmp_path):
  once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
  r1 = rewrite.rewrite_saved_model(small, once)
  assert r1.counts() == {"rms_norm": 1, "zero_out": 1}
  r2 = rewrite.rewrite_saved_model(once, twice)
  assert not r2.replacements and not r2.skipped
  assert "nothing to rewrite" in str(r2)
  for name in ("saved_model.pb", "fingerprint.pb"):
    with open(os.path.join(once, name), "rb") as a, \
        open(os.path.join(twice, name), "rb") as b:
      assert a.read() == b.read(), name


def test_names_unique_and_fingerprint_recomputed(small, tmp_path):
  dst = str(tmp_path / "out")
  rewrite.rewrite_saved_model(small, dst)
  sm = rm.load_saved_model_proto(dst)
  for f in sm.meta_graphs[0].graph_def.library.function:
    names = [n.name for n in f.node_def]
    assert len(names) == len(set(names)), f.signature.name
  with open(os.path.join(small, "fingerprint.pb"), "rb") as a, \
      open(os.path.join(dst, "fingerprint.pb"), "rb") as b:
    assert a.read() != b.read()  # it hashes saved_model.pb, which changed


def test_rewrite_meta_graph_leaves_its_argument_alone(small):
  mg = rm.load_saved_model_proto(small).meta_graphs[0]
  before = mg.SerializeToString(deterministic=True)
  new, report = rewrite.rewrite_meta_graph(mg)
  assert mg.SerializeToString(deterministic=True) == before
  assert "RmsNorm" in rm.all_ops(new) and report.changed


def test_dry_run_writes_nothing(small, tmp_path):
  dst = str(tmp_path / "dry")
  report = rewrite.rewrite_saved_model(small, dst, dry_run=True)
  assert report.counts() == {"rms_norm": 1, "zero_out": 1}
  assert not os.path.exists(dst)


def test_cli_rewrites_verifies_and_writes_json(small, tmp_path):
  before = rm.dir_checksum(small)
  dst, js = str(tmp_path / "cli"), str(tmp_path / "report.json")
  proc = subprocess.run([
      sys.executable, "-m", "hpc_ops.rewrite", small, dst, "--verify", "2",
      "--json", js
  ],
                        capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr
  assert "2 replacements (rms_norm: 1, zero_out: 1)" in proc.stdout
  assert "verification (2 random batches per signature): PASSED" in proc.stdout
  assert "signature 'f' (serve): ok" in proc.stdout
  with open(js) as f:
    data = json.load(f)
  assert {r["rule"] for r in data["replacements"]} == {"rms_norm", "zero_out"}
  assert data["verification"]["ok"] is True
  assert rm.dir_checksum(small) == before
  ops = rm.all_ops(rm.load_saved_model_proto(dst).meta_graphs[0])
  assert ops["RmsNorm"] == 1 and ops["ZeroOut"] == 1


def test_cli_dry_run_and_rule_selection(small, capsys):
  assert cli.main([small, "--dry-run", "--rules", "zero_out"]) == 0
  out = capsys.readouterr().out
  assert "1 replacement (zero_out: 1)" in out
  assert "dry run: nothing written" in out


@pytest.mark.parametrize("args,fragment", [
    (["--rules", ","], "no rules given"),
    (["--rules", "fast_math"], "unknown rule 'fast_math'"),
    (["--map", "Relu=MatMul"], "the signatures differ"),
    (["--load", "/nonexistent/lib.so"], "cannot load /nonexistent/lib.so"),
])
def test_cli_bad_options_exit_2(small, tmp_path, capsys, args, fragment):
  assert cli.main([small, str(tmp_path / "o")] + args) == 2
  assert fragment in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")


def test_cli_needs_dst_without_dry_run(small, capsys):
  assert cli.main([small]) == 2
  assert "DST is required" in capsys.readouterr().err


def expect_error(src, fragment, tmp_path):
  before = rm.dir_checksum(src) if os.path.isdir(src) else None
  dst = str(tmp_path / "never")
  with pytest.raises(rewrite.RewriteError) as e:
    rewrite.rewrite_saved_model(src, dst)
  assert fragment in str(e.value), str(e.value)
  assert not os.path.exists(dst)
  if before is not None:
    assert rm.dir_checksum(src) == before
  return str(e.value)


def test_not_a_saved_model(tmp_path):
  os.makedirs(tmp_path / "empty")
  expect_error(str(tmp_path / "empty"), "is not a SavedModel", tmp_path)
  expect_error(str(tmp_path / "missing"), "is not a directory", tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "text"])
def test_corrupt_protobuf(small, tmp_path, damage):
  bad = str(tmp_path / "bad")
  shutil.copytree(small, bad)
  path = os.path.join(bad, "saved_model.pb")
  with open(path, "rb") as f:
    data = f.read()
  if damage == "garbage":
    data = bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8))
  elif damage == "truncated":
    data = data[:len(data) // 2]
  else:
    os.remove(path)
    path = os.path.join(bad, "saved_model.pbtxt")
    data = b"meta_graphs { graph_def { node { name: 'x' op: 'Const' } }"
  with open(path, "wb") as f:
    f.write(data)
  expect_error(bad, "is not a valid SavedModel protobuf", tmp_path)


def test_corrupt_meta_graph_file(tmp_path):
  path = str(tmp_path / "m.meta")
  with open(path, "wb") as f:
    f.write(b"\xff\xfe not a protobuf \x00\x01")
  with pytest.raises(rewrite.RewriteError, match="not a valid MetaGraphDef"):
    rewrite.rewrite_meta_graph_file(path, str(tmp_path / "o.meta"))
  assert not os.path.exists(tmp_path / "o.meta")


def test_dangling_input(small, tmp_path):

  def edit(sm):
    f = body(sm)
    (sq,) = [n for n in f.node_def if n.op == "Square"]
    sq.input[0] = "no_such_node:output:0"

  bad = copy_with(small, str(tmp_path / "dangling"), edit)
  msg = expect_error(bad, "has a dangling input 'no_such_node:output:0'",
                     tmp_path)
  assert "function __inference_f_" in msg


def test_dangling_control_input_and_result(small, tmp_path):

  def edit(sm):
    f = body(sm)
    f.node_def[0].input.append("^ghost")

  bad = copy_with(small, str(tmp_path / "ctrl"), edit)
  expect_error(bad, "dangling input '^ghost'", tmp_path)

  def edit_ret(sm):
    f = body(sm)
    key = sorted(f.ret)[0]
    f.ret[key] = "ghost:output:0"

  bad = copy_with(small, str(tmp_path / "ret"), edit_ret)
  expect_error(bad, "refers to 'ghost:output:0', which does not exist",
               tmp_path)


def test_self_recursive_function(small, tmp_path):

  def edit(sm):
    f = body(sm)
    call = f.node_def.add(name="again", op="PartitionedCall")
    call.input.append(f.signature.input_arg[0].name)
    call.attr["f"].func.name = f.signature.name
    for key in ("Tin", "Tout"):
      call.attr[key].CopyFrom(
          attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
              type=[tf.float32.as_datatype_enum])))

  bad = copy_with(small, str(tmp_path / "recursive"), edit)
  msg = expect_error(bad, "the function library is recursive", tmp_path)
  name = body(rm.load_saved_model_proto(bad)).signature.name
  assert "%s -> %s" % (name, name) in msg


def test_mutually_recursive_functions_through_a_direct_call(small, tmp_path):

  def edit(sm):
    lib = sm.meta_graphs[0].graph_def.library
    a, b = lib.function.add(), lib.function.add()
    a.signature.name, b.signature.name = "ping", "pong"
    a.node_def.add(name="call", op="pong")
    b.node_def.add(name="call", op="ping")

  bad = copy_with(small, str(tmp_path / "mutual"), edit)
  expect_error(bad, "ping -> pong -> ping", tmp_path)


def test_duplicate_node_names(small, tmp_path):

  def edit(sm):
    f = body(sm)
    n = f.node_def.add()
    n.CopyFrom([m for m in f.node_def if m.op == "Square"][0])

  bad = copy_with(small, str(tmp_path / "dup"), edit)
  expect_error(bad, "two nodes are named", tmp_path)


def test_unregistered_op_asks_for_its_library(small, tmp_path):

  def edit(sm):
    f = body(sm)
    [n for n in f.node_def if n.op == "Square"][0].op = "MysteryOp"

  bad = copy_with(small, str(tmp_path / "mystery"), edit)
  expect_error(bad, "uses op 'MysteryOp', which is neither registered",
               tmp_path)


def test_hostile_constant_is_not_decoded(small, tmp_path):
  """An epsilon Const whose shape claims 2^40 elements is refused (skipped)
  without allocating it."""

  def edit(sm):
    f = body(sm)
    (eps,) = [n for n in f.node_def if n.name == "add/y"]
    shape = eps.attr["value"].tensor.tensor_shape
    shape.dim.add().size = 1 << 20
    shape.dim.add().size = 1 << 20

  bad = copy_with(small, str(tmp_path / "hostile"), edit)
  report = rewrite.rewrite_saved_model(bad, str(tmp_path / "o"), dry_run=True)
  (skip,) = [s for s in report.skipped if s.rule == "rms_norm"]
  assert "is not a readable scalar constant" in skip.reason


def test_destination_checks(small, tmp_path):
  with pytest.raises(rewrite.RewriteError, match="is the source"):
    rewrite.rewrite_saved_model(small, small)
  with pytest.raises(rewrite.RewriteError, match="inside the source"):
    rewrite.rewrite_saved_model(small, os.path.join(small, "sub"))
  os.makedirs(tmp_path / "full")
  (tmp_path / "full" / "x").write_text("keep me")
  with pytest.raises(rewrite.RewriteError, match="already exists"):
    rewrite.rewrite_saved_model(small, str(tmp_path / "full"))
  assert (tmp_path / "full" / "x").read_text() == "keep me"
  os.makedirs(tmp_path / "empty")
  rewrite.rewrite_saved_model(small, str(tmp_path / "empty"))
  assert os.path.exists(tmp_path / "empty" / "saved_model.pb")


def test_stripped_op_list_follows_the_graph(small):
  mg = rm.load_saved_model_proto(small).meta_graphs[0]
  new, _ = rewrite.rewrite_meta_graph(mg)
  listed = [o.name for o in new.meta_info_def.stripped_op_list.op]
  assert listed == sorted(listed)
  assert set(listed) == core.used_ops(new.graph_def)
  rms = [
      o for o in new.meta_info_def.stripped_op_list.op if o.name == "RmsNorm"
  ][0]
  assert not rms.summary and not rms.description


def test_rules_argument_forms(small):
  mg = rm.load_saved_model_proto(small).meta_graphs[0]
  for rules in ("zero_out", ["zero_out"], [rules_lib.resolve("zero_out")[0]]):
    _, report = rewrite.rewrite_meta_graph(mg, rules=rules)
    assert report.counts() == {"zero_out": 1}
  with pytest.raises(rewrite.RewriteError, match="no rules given"):
    rewrite.rewrite_meta_graph(mg, rules=[])


def test_wrong_input_count(small, tmp_path):

  def edit(sm):
    f = body(sm)
    (sq,) = [n for n in f.node_def if n.op == "Square"]
    del sq.input[:]

  bad = copy_with(small, str(tmp_path / "arity"), edit)
  expect_error(bad, "(Square) has 0 data inputs, its op takes 1", tmp_path)


def _mutate(sm, rng):
  """One random damage to the body of `f`."""
  f = body(sm)
  nodes = list(f.node_def)
  n = nodes[rng.integers(len(nodes))]
  kind = rng.integers(7)
  if kind == 0 and n.input:  # rewire an input somewhere odd
    target = nodes[rng.integers(len(nodes))].name
    n.input[rng.integers(len(n.input))] = rng.choice(
        [target, target + ":output:0", target + ":z:7", "x", "^" + target, ""])
  elif kind == 1 and n.input:  # drop an input
    del n.input[rng.integers(len(n.input))]
  elif kind == 2:  # change the op
    n.op = str(
        rng.choice([
            "Square", "Mul", "Const", "Rsqrt", "Identity", "Cast", "Mean",
            "AddV2", "OneHot"
        ]))
  elif kind == 3:  # retype an attr
    key = str(rng.choice(["T", "keep_dims", "dtype", "DstT", "value"]))
    choice = rng.integers(3)
    if choice == 0:
      n.attr[key].i = int(rng.integers(-5, 5))
    elif choice == 1:
      n.attr[key].type = tf.string.as_datatype_enum
    else:
      n.attr[key].tensor.tensor_shape.dim.add().size = -7
  elif kind == 4:  # a constant's bytes
    consts = [m for m in nodes if m.op == "Const"]
    if consts:
      c = consts[rng.integers(len(consts))]
      c.attr["value"].tensor.tensor_content = bytes(
          rng.integers(0, 256, 3, np.uint8))
  elif kind == 5:  # a second node of the same name
    f.node_def.add().CopyFrom(n)
  else:  # the function calls itself
    n.attr["f"].func.name = f.signature.name


def test_random_damage_gives_an_error_or_a_valid_rewrite(small):
  """Hundreds of randomly damaged graphs: each either is refused with a
  RewriteError or yields a rewrite that TensorFlow imports; nothing else
  escapes."""
  original = rm.load_saved_model_proto(small)
  rng = np.random.default_rng(1234)
  outcomes = {"error": 0, "rewritten": 0, "unchanged": 0}
  for _ in range(150):
    sm = type(original)()
    sm.CopyFrom(original)
    for _ in range(int(rng.integers(1, 3))):
      _mutate(sm, rng)
    try:
      _, report = rewrite.rewrite_meta_graph(sm.meta_graphs[0])
    except rewrite.RewriteError:
      outcomes["error"] += 1
      continue
    outcomes["rewritten" if report.changed else "unchanged"] += 1
  assert outcomes["error"] > 0 and outcomes["rewritten"] > 0, outcomes


def test_every_meta_graph_of_a_tf1_saved_model(tmp_path):
  """A TF1 SavedModel with two tag sets: both meta graphs are rewritten and
  the report names each."""
  g, x, outs = rm.tf1_graph()
  path = str(tmp_path / "two")
  with g.as_default(), tf.compat.v1.Session(graph=g) as sess:
    sess.run(tf.compat.v1.global_variables_initializer())
    b = tf.compat.v1.saved_model.Builder(path)
    sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, outs)
    b.add_meta_graph_and_variables(sess, ["serve"],
                                   signature_def_map={"serving_default": sig})
    b.add_meta_graph(["eval"], signature_def_map={"serving_default": sig})
    b.save()
  dst = str(tmp_path / "two_out")
  report = rewrite.rewrite_saved_model(path, dst)
  scopes = sorted({r.scope for r in report.replacements})
  assert scopes == ["meta_graph[eval] graph", "meta_graph[serve] graph"]
  for mg in rm.load_saved_model_proto(dst).meta_graphs:
    assert rm.all_ops(mg).get("RmsNorm") == 1, mg.meta_info_def.tags
