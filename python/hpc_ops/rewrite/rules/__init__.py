"""Rewrite rules: each module holds one matcher + replacer.

  rms_norm  RMSNorm subgraphs (Keras 3 RMSNormalization, hand-written)
            -> RmsNorm
  zero_out  native "keep the first element, zero the rest" -> ZeroOut
  op_map    a user-given OldOp=NewOp mapping between identical signatures
  embedding an embedding lookup on a float32 variable (ResourceGather, or
            Keras 3 Embedding's GatherV2(ReadVariableOp, ids, axis=0)) ->
            SparseTablePull on a table filled once from the variable's rows
            (ids beyond the vocabulary then read zeros); opt-in, not in
            DEFAULT, because it changes what unknown ids do

DEFAULT are the rules that keep every result as it was.
"""
from hpc_ops.rewrite.core import RewriteError
from hpc_ops.rewrite.core import Rule

DEFAULT = ("rms_norm", "zero_out")


def _by_name(name):
  from hpc_ops.rewrite.rules import embedding
  from hpc_ops.rewrite.rules import op_map
  from hpc_ops.rewrite.rules import rms_norm
  from hpc_ops.rewrite.rules import zero_out
  if name == "rms_norm":
    return rms_norm.RmsNormRule()
  if name == "zero_out":
    return zero_out.ZeroOutRule()
  if name.startswith("op_map:") or name.startswith("op_map="):
    return op_map.OpMapRule.from_string(name[len("op_map:"):])
  if name == "embedding":
    return embedding.EmbeddingRule()
  raise RewriteError("unknown rule %r (known: rms_norm, zero_out, embedding, "
                     "op_map:OldOp=NewOp[,OldOp2=NewOp2])" % name)


def resolve(rules):
  """Rule objects for `rules`: None (the defaults), a comma-separated
  string, or a list of names and Rule objects."""
  if rules is None:
    rules = DEFAULT
  if isinstance(rules, str):
    # "op_map:A=B,C=D" keeps its commas.
    parts, out = rules.split(","), []
    for p in parts:
      p = p.strip()
      if not p:
        continue
      if "=" in p and out and out[-1].startswith("op_map:") and ":" not in p:
        out[-1] += "," + p
      else:
        out.append(p)
    rules = out
  objs, seen = [], set()
  for r in rules:
    obj = r if isinstance(r, Rule) else _by_name(r)
    key = obj.name if obj.name != "op_map" else id(obj)
    if key in seen:
      continue
    seen.add(key)
    objs.append(obj)
  if not objs:
    raise RewriteError("no rules given")
  return objs
