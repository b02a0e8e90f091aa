"""op_map rule: replace every node of op OldOp by NewOp, for ops with
identical signatures (checked against the registered OpDefs).

Identical means: the same number of inputs and outputs, each with the same
type (fixed type, or the same type/number/type-list attribute), the same
ref-ness; every attr of OldOp exists in NewOp with the same type, and
NewOp's extra attrs have defaults. Argument names may differ (function
bodies are rewired to NewOp's output names). A node whose attr value NewOp
does not allow (e.g. a dtype outside its type constraint) is skipped and
reported.
"""
import re

from tensorflow.core.framework import types_pb2

from hpc_ops.rewrite import core

_OP_NAME = re.compile(r"^[A-Z][A-Za-z0-9_>]*$")


def _arg_spec(arg):
  return (arg.type, arg.type_attr, arg.number_attr, arg.type_list_attr,
          arg.is_ref)


def _arg_str(arg):
  if arg.number_attr:
    t = "%s * %s" % (arg.number_attr, arg.type_attr or
                     types_pb2.DataType.Name(arg.type))
  elif arg.type_list_attr:
    t = arg.type_list_attr
  elif arg.type_attr:
    t = arg.type_attr
  else:
    t = types_pb2.DataType.Name(arg.type)[3:].lower()
  return "%s: %s" % (arg.name, "Ref(%s)" % t if arg.is_ref else t)


def signature_mismatch(old, new):
  """Why OpDefs `old` and `new` are not interchangeable, or None."""
  for kind in ("input_arg", "output_arg"):
    a, b = getattr(old, kind), getattr(new, kind)
    what = kind.split("_")[0]

    def count(n):
      return "%d %s%s" % (n, what, "" if n == 1 else "s")

    if len(a) != len(b):
      return "%s has %s (%s), %s has %s (%s)" % (old.name, count(
          len(a)), ", ".join(map(_arg_str, a)), new.name, count(
              len(b)), ", ".join(map(_arg_str, b)))
    for i, (x, y) in enumerate(zip(a, b)):
      if _arg_spec(x) != _arg_spec(y):
        return "%s %d is `%s` in %s but `%s` in %s" % (
            what, i, _arg_str(x), old.name, _arg_str(y), new.name)
  old_attrs = {a.name: a for a in old.attr}
  new_attrs = {a.name: a for a in new.attr}
  for name, a in old_attrs.items():
    if name not in new_attrs:
      return "%s has attr %r, %s does not" % (old.name, name, new.name)
    if new_attrs[name].type != a.type:
      return "attr %r is %s in %s but %s in %s" % (
          name, a.type, old.name, new_attrs[name].type, new.name)
  for name, a in new_attrs.items():
    if name not in old_attrs and not a.HasField("default_value"):
      return "%s has attr %r without a default, which %s nodes lack" % (
          new.name, name, old.name)
  return None


class OpMapRule(core.Rule):
  name = "op_map"

  def __init__(self, mapping):
    if not mapping:
      raise core.RewriteError("op_map: empty mapping")
    for old, new in mapping.items():
      for op in (old, new):
        if not _OP_NAME.match(op):
          raise core.RewriteError("op_map: %r is not an op name" % op)
      if old == new:
        raise core.RewriteError("op_map: %s maps to itself" % old)
      if new in mapping:
        raise core.RewriteError("op_map: %s=%s chains into %s=%s; give the "
                                "final op directly" %
                                (old, new, new, mapping[new]))
    self.mapping = dict(mapping)
    self.defs = {}
    for old, new in self.mapping.items():
      defs = []
      for op in (old, new):
        od = core.registered_op_def(op)
        if od is None:
          raise core.RewriteError(
              "op_map %s=%s: op %r is not registered (load the library that "
              "defines it, e.g. with --load)" % (old, new, op))
        defs.append(od)
      why = signature_mismatch(*defs)
      if why:
        raise core.RewriteError("op_map %s=%s: the signatures differ: %s" %
                                (old, new, why))
      self.defs[old] = defs
    self.emits = tuple(self.mapping.values())

  @classmethod
  def from_string(cls, spec):
    """"Old=New[,Old2=New2]" -> OpMapRule."""
    mapping = {}
    for part in spec.split(","):
      part = part.strip()
      if not part:
        continue
      old, sep, new = part.partition("=")
      if not sep or not old.strip() or not new.strip():
        raise core.RewriteError("op_map: %r is not OldOp=NewOp" % part)
      if old.strip() in mapping:
        raise core.RewriteError("op_map: %s is mapped twice" % old.strip())
      mapping[old.strip()] = new.strip()
    return cls(mapping)

  def match(self, g, node):
    if node.op not in self.mapping:
      return None
    old_def, new_def = self.defs[node.op]
    new = core.node_def_pb2.NodeDef()
    new.CopyFrom(node)
    new.op = new_def.name
    allowed = {a.name: a for a in new_def.attr}
    for key in list(new.attr):
      if key.startswith("_"):
        continue
      a = allowed.get(key)
      if a is None:
        del new.attr[key]  # cannot happen after the signature check
        continue
      vals = set(
          a.allowed_values.list.type) if a.HasField("allowed_values") else None
      if vals:
        got = ([new.attr[key].type]
               if a.type == "type" else list(new.attr[key].list.type))
        bad = [t for t in got if t not in vals]
        if bad:
          return core.NoMatch(
              "%s does not allow %s=%s" %
              (new_def.name, key, types_pb2.DataType.Name(bad[0])))
    output_map = {}
    if g.is_function:
      old_sizes = core._output_arg_sizes(old_def, node, {})
      new_sizes = core._output_arg_sizes(new_def, new, {})
      for (oa, n), (na, _) in zip(old_sizes, new_sizes):
        for i in range(n):
          if oa != na:
            output_map[core.Tensor(node.name, "%s:%d" % (oa, i))] = \
                core.Tensor(node.name, "%s:%d" % (na, i))
    return core.Match(rule=self.name,
                      output=node.name,
                      new_node=new,
                      output_map=output_map,
                      interior=[],
                      detail="%s -> %s" % (old_def.name, new_def.name))
