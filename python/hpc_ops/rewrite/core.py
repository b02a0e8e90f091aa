"""Core of the graph rewrite tool: reading and writing MetaGraphDefs and
SavedModels, a mutable view over one graph (a GraphDef's nodes or one
FunctionDef body), the function library walk and the rewrite driver.

Nothing read from a model is ever evaluated: constants are decoded with
`tf.make_ndarray`, every other value is only compared.
"""
import collections
import dataclasses
import hashlib
import os
import shutil
import tempfile

import tensorflow as tf
from google.protobuf import message as _pb_message
from google.protobuf import text_format
from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.framework import node_def_pb2
from tensorflow.core.framework import op_def_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import function_def_to_graph
from tensorflow.python.framework import op_def_registry

SAVED_MODEL_PB = "saved_model.pb"
SAVED_MODEL_PBTXT = "saved_model.pbtxt"
FINGERPRINT_PB = "fingerprint.pb"


class RewriteError(Exception):
  """The input cannot be rewritten (unreadable, malformed or hostile), or a
  rule was configured wrongly. Nothing is written when this is raised."""


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Replacement:
  rule: str
  scope: str  # "graph" or "function <name>", prefixed by the meta graph
  output: str  # name of the node that now holds the new op
  removed: list  # [(name, op)] nodes taken out of the graph
  added: list  # [(name, op)] nodes put in
  detail: str = ""

  def line(self):
    rem = ", ".join("%s (%s)" % nt for nt in self.removed) or "none"
    add = ", ".join("%s (%s)" % nt for nt in self.added)
    return "[%s] %s: %s; removed %d node%s: %s; added: %s" % (
        self.rule, self.scope, self.detail, len(
            self.removed), "" if len(self.removed) == 1 else "s", rem, add)


@dataclasses.dataclass
class Skip:
  rule: str
  scope: str
  node: str
  reason: str

  def line(self):
    return "[%s] %s: node %r skipped, because %s" % (self.rule, self.scope,
                                                     self.node, self.reason)


class Report:
  """What a rewrite did: replacements, skipped candidates, notes and (with
  verify) the verification result. `str(report)` is the text the CLI
  prints; `to_dict()` is JSON-serialisable."""

  def __init__(self):
    self.replacements = []
    self.skipped = []
    self.notes = []
    self.verification = None  # dict from verify.verify_saved_models

  @property
  def changed(self):
    return bool(self.replacements)

  def counts(self):
    return dict(collections.Counter(r.rule for r in self.replacements))

  def extend(self, other):
    self.replacements += other.replacements
    self.skipped += other.skipped
    self.notes += other.notes

  def to_dict(self):
    return {
        "replacements": [dataclasses.asdict(r) for r in self.replacements],
        "skipped": [dataclasses.asdict(s) for s in self.skipped],
        "notes": list(self.notes),
        "verification": self.verification,
    }

  def __str__(self):
    lines = [
        "%d replacement%s%s" %
        (len(self.replacements), "" if len(self.replacements) == 1 else "s",
         (" (%s)" % ", ".join("%s: %d" % kv
                              for kv in sorted(self.counts().items()))
          if self.replacements else ""))
    ]
    lines += ["  " + r.line() for r in self.replacements]
    if self.skipped:
      lines.append("%d skipped" % len(self.skipped))
      lines += ["  " + s.line() for s in self.skipped]
    lines += ["note: " + n for n in self.notes]
    if self.verification is not None:
      from hpc_ops.rewrite import verify
      lines += verify.format_result(self.verification)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# OpDefs
# ---------------------------------------------------------------------------


def registered_op_def(op_name):
  """The registered OpDef for `op_name`, or None."""
  return op_def_registry.get(op_name)


def load_hpc_ops_libraries():
  """Imports every built `hpc_ops.gen_<family>_ops` module so that the ops
  they define are registered; returns {module: error} for those that failed."""
  import importlib
  import pkgutil
  import hpc_ops
  failed = {}
  for mod in sorted(m.name
                    for m in pkgutil.iter_modules(hpc_ops.__path__)
                    if m.name.startswith("gen_") and m.name.endswith("_ops")):
    try:
      importlib.import_module("hpc_ops." + mod)
    except ImportError as e:
      failed[mod] = str(e)
  return failed


def stripped_op_def(op_def):
  """A copy of `op_def` without documentation, as in stripped_op_list."""
  od = op_def_pb2.OpDef()
  od.CopyFrom(op_def)
  od.summary = ""
  od.description = ""
  for arg in list(od.input_arg) + list(od.output_arg):
    arg.description = ""
  for attr in od.attr:
    attr.description = ""
  return od


# ---------------------------------------------------------------------------
# One graph: a GraphDef's nodes or a FunctionDef body
# ---------------------------------------------------------------------------

Tensor = collections.namedtuple("Tensor", ["node", "out"])
"""A tensor in a graph. GraphDef: out is the port as a string ("0", "1").
FunctionDef: out is "<output arg>:<index>" for node outputs and "" for the
function's own arguments (node is then the argument's name)."""

EXTERNAL = "<outside the graph>"


def _output_arg_sizes(op_def, node, library_sigs):
  """[(arg_name, number of tensors)] for a node's outputs, or None."""
  if op_def is None:
    sig = library_sigs.get(node.op)
    if sig is None:
      return None
    return [(a.name, 1) for a in sig.output_arg]
  sizes = []
  for arg in op_def.output_arg:
    if arg.number_attr:
      n = node.attr[arg.number_attr].i if arg.number_attr in node.attr else None
      if n is None:
        default = [a for a in op_def.attr if a.name == arg.number_attr]
        n = default[0].default_value.i if default else 1
      sizes.append((arg.name, n))
    elif arg.type_list_attr:
      if arg.type_list_attr in node.attr:
        n = len(node.attr[arg.type_list_attr].list.type)
      else:
        n = 0
      sizes.append((arg.name, n))
    else:
      sizes.append((arg.name, 1))
  return sizes


class Graph:
  """Mutable view over a list of NodeDefs.

  `fdef` set: the nodes are a FunctionDef body (inputs are written
  "node:out_arg:i", arguments by name, results in fdef.ret); otherwise a
  GraphDef ("node" / "node:i"). `external` lists node names referenced from
  outside the nodes (signature_def, collections, saver), which are never
  removed.
  """

  def __init__(self,
               scope,
               nodes,
               fdef=None,
               external=(),
               library_sigs=None,
               shape_fallback=None):
    self.scope = scope
    self.nodes = nodes  # repeated NodeDef container (edited in place)
    self.fdef = fdef
    self.external = set(external)
    self.library_sigs = library_sigs or {}
    self._shape_fallback = shape_fallback  # callable -> {name: [shapes]}
    self._fallback_shapes = None
    self._index = None

  # -- indexing --------------------------------------------------------------

  @property
  def is_function(self):
    return self.fdef is not None

  def _build_index(self):
    by_name = {}
    for n in self.nodes:
      if n.name in by_name:
        raise RewriteError("%s: two nodes are named %r" % (self.scope, n.name))
      by_name[n.name] = n
    args = {}
    if self.fdef is not None:
      for i, a in enumerate(self.fdef.signature.input_arg):
        args[a.name] = i
    consumers = collections.defaultdict(list)  # producer -> [(consumer, i)]
    for n in self.nodes:
      for i, s in enumerate(n.input):
        if s.startswith("^"):
          consumers[s[1:]].append((n.name, -1))
        else:
          consumers[self.parse(s).node].append((n.name, i))
    if self.fdef is not None:
      for key, val in self.fdef.ret.items():
        consumers[self.parse(val).node].append((EXTERNAL, "ret " + key))
      for key, val in self.fdef.control_ret.items():
        consumers[val].append((EXTERNAL, "control_ret " + key))
    for name in self.external:
      consumers[name].append((EXTERNAL, "signature/collection"))
    self._index = (by_name, args, consumers)

  def invalidate(self):
    self._index = None

  @property
  def by_name(self):
    if self._index is None:
      self._build_index()
    return self._index[0]

  @property
  def args(self):
    if self._index is None:
      self._build_index()
    return self._index[1]

  def node(self, name):
    return self.by_name.get(name)

  # -- tensor references -----------------------------------------------------

  def parse(self, ref):
    """Tensor for a data input string."""
    if self.fdef is not None:
      parts = ref.split(":")
      if len(parts) == 1:
        return Tensor(ref, "")
      if len(parts) == 2:
        return Tensor(parts[0], parts[1] + ":0")
      return Tensor(parts[0], parts[1] + ":" + parts[2])
    name, _, port = ref.partition(":")
    return Tensor(name, port or "0")

  def ref(self, t):
    """Input string for a Tensor."""
    if self.fdef is not None:
      return t.node if not t.out else "%s:%s" % (t.node, t.out)
    return t.node if t.out == "0" else "%s:%s" % (t.node, t.out)

  def output(self, node, index=0):
    """Tensor for a node's flat output `index`."""
    if self.fdef is None:
      return Tensor(node.name, str(index))
    sizes = _output_arg_sizes(registered_op_def(node.op), node,
                              self.library_sigs)
    if sizes is None:
      raise RewriteError("%s: node %r has op %r, which is neither registered "
                         "nor a library function" %
                         (self.scope, node.name, node.op))
    for arg, n in sizes:
      if index < n:
        return Tensor(node.name, "%s:%d" % (arg, index))
      index -= n
    raise RewriteError("%s: node %r (%s) has no output %d" %
                       (self.scope, node.name, node.op, index))

  def flat_index(self, t):
    """The flat output index of a node output Tensor, or None."""
    if self.fdef is None:
      return int(t.out)
    if not t.out:
      return None
    node = self.node(t.node)
    arg, _, idx = t.out.partition(":")
    sizes = _output_arg_sizes(registered_op_def(node.op), node,
                              self.library_sigs)
    if sizes is None:
      return None
    flat = 0
    for name, n in sizes:
      if name == arg:
        return flat + int(idx) if int(idx) < n else None
      flat += n
    return None

  def inputs(self, node):
    """Data inputs of `node` as Tensors."""
    return [self.parse(s) for s in node.input if not s.startswith("^")]

  def control_inputs(self, node):
    return [s[1:] for s in node.input if s.startswith("^")]

  def producer(self, t):
    """The NodeDef producing Tensor t, or None for a function argument."""
    if self.fdef is not None and not t.out:
      return None
    return self.node(t.node)

  def consumers(self, name):
    """[(consumer name, input index)] of a node; index -1 for a control
    edge; consumer EXTERNAL for function results, signatures, collections."""
    if self._index is None:
      self._build_index()
    return self._index[2].get(name, [])

  def data_consumers(self, t):
    """Nodes (NodeDefs) that read Tensor t, each once."""
    seen, out = set(), []
    for cname, i in self.consumers(t.node):
      if cname == EXTERNAL or i == -1 or cname in seen:
        continue
      cnode = self.node(cname)
      if any(x == t for x in self.inputs(cnode)):
        seen.add(cname)
        out.append(cnode)
    return out

  def sole_consumer(self, t):
    """The only consumer of Tensor t (reading it once, no control edges on
    its node, not a graph output), else None."""
    uses = self.consumers(t.node)
    if len(uses) != 1 or uses[0][0] == EXTERNAL or uses[0][1] == -1:
      return None
    cnode = self.node(uses[0][0])
    return cnode if self.inputs(cnode).count(t) == 1 else None

  # -- values, types and shapes ---------------------------------------------

  def const_value(self, t, max_elements=1 << 16):
    """numpy value of Tensor t when it is a Const (possibly through
    Identity nodes without control inputs), else None."""
    for _ in range(8):
      node = self.producer(t)
      if node is None:
        return None
      if node.op == "Identity" and not self.control_inputs(node):
        t = self.inputs(node)[0]
        continue
      if node.op != "Const" or "value" not in node.attr:
        return None
      tensor = node.attr["value"].tensor
      n = 1
      for d in tensor.tensor_shape.dim:
        n *= max(d.size, 0)
      if n > max_elements:
        return None
      try:
        return tf.make_ndarray(tensor)
      except Exception:
        return None  # malformed constant: not a match, never a crash
    return None

  def const_producers(self, t):
    """Names of the Const/Identity nodes const_value(t) went through."""
    names = []
    for _ in range(8):
      node = self.producer(t)
      if node is None:
        break
      names.append(node.name)
      if node.op != "Identity":
        break
      t = self.inputs(node)[0]
    return names

  def attr_type(self, node, key):
    return node.attr[key].type if key in node.attr else None

  def shape(self, t):
    """Static shape of Tensor t as a list of dims (-1 unknown), or None when
    even the rank is unknown."""
    if self.fdef is not None and not t.out:
      i = self.args.get(t.node)
      if i is None:
        return None
      attrs = self.fdef.arg_attr[i].attr if i in self.fdef.arg_attr else {}
      if "_output_shapes" in attrs and attrs["_output_shapes"].list.shape:
        return shape_list(attrs["_output_shapes"].list.shape[0])
      if "_input_shapes" in self.fdef.attr:
        shapes = self.fdef.attr["_input_shapes"].list.shape
        if i < len(shapes):
          return shape_list(shapes[i])
      return None
    node = self.producer(t)
    if node is None:
      return None
    if node.op == "Const" and "value" in node.attr:
      return [d.size for d in node.attr["value"].tensor.tensor_shape.dim]
    idx = self.flat_index(t)
    if idx is None:
      return None
    if "_output_shapes" in node.attr:
      shapes = node.attr["_output_shapes"].list.shape
      if idx < len(shapes):
        return shape_list(shapes[idx])
    if node.op in ("Identity", "Cast", "Square", "Neg", "Abs") and node.input:
      return self.shape(self.inputs(node)[0])
    if self._shape_fallback is not None:
      if self._fallback_shapes is None:
        self._fallback_shapes = self._shape_fallback() or {}
      shapes = self._fallback_shapes.get(node.name)
      if shapes is not None and idx < len(shapes):
        return shapes[idx]
    return None

  # -- names -------------------------------------------------------------------

  def unique_name(self, base):
    taken = self.by_name
    if base not in taken and base not in self.args:
      return base
    i = 1
    while "%s_%d" % (base, i) in taken or "%s_%d" % (base, i) in self.args:
      i += 1
    return "%s_%d" % (base, i)

  # -- mutation ----------------------------------------------------------------

  def replace_node(self,
                   old_name,
                   new_node,
                   output_map,
                   extra_nodes=(),
                   remove=()):
    """Puts `new_node` where node `old_name` was (same position; new_node
    usually carries the same name), adds `extra_nodes` before it, deletes
    the nodes named in `remove`, and rewires every reader of a Tensor in
    `output_map` (old Tensor -> new Tensor)."""
    remove = set(remove)
    kept = []
    for n in self.nodes:
      if n.name == old_name:
        kept.extend(extra_nodes)
        kept.append(new_node)
      elif n.name not in remove:
        kept.append(n)
    rewired = {self.ref(k): self.ref(v) for k, v in output_map.items()}
    if self.fdef is None:
      # "n" and "n:0" name the same tensor in a GraphDef.
      for k, v in list(output_map.items()):
        if k.out == "0":
          rewired["%s:0" % k.node] = self.ref(v)
    for n in kept:
      for i, s in enumerate(n.input):
        if s in rewired:
          n.input[i] = rewired[s]
    del self.nodes[:]
    self.nodes.extend(kept)
    if self.fdef is not None:
      for key, val in list(self.fdef.ret.items()):
        if val in rewired:
          self.fdef.ret[key] = rewired[val]
    self.invalidate()


def shape_list(shape_proto):
  """The dims of a TensorShapeProto (-1: unknown), or None for an unknown
  rank."""
  if shape_proto.unknown_rank:
    return None
  return [d.size for d in shape_proto.dim]


def shape_proto(dims):
  """TensorShapeProto for a dims list (None: unknown rank)."""
  p = tensor_shape_pb2.TensorShapeProto()
  if dims is None:
    p.unknown_rank = True
  else:
    for d in dims:
      p.dim.add().size = d
  return p


# ---------------------------------------------------------------------------
# Matches and rules
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Match:
  """What a rule found. `output` is the node whose value the new op now
  computes (it keeps its name: signatures, control edges and collections
  that name it stay valid). `interior` are the nodes computed only for the
  pattern: all are removed; a consumer outside the pattern skips the match,
  unless the node is also in `shareable` (constants, shape reads, casts of
  the inputs), which are kept when something else reads them."""
  rule: str
  output: str
  new_node: node_def_pb2.NodeDef
  output_map: dict  # Tensor of the old output -> Tensor of the new node
  interior: list
  shareable: set = dataclasses.field(default_factory=set)
  extra_nodes: list = dataclasses.field(default_factory=list)
  detail: str = ""


@dataclasses.dataclass
class NoMatch:
  """A candidate the rule recognised but refused; the reason is reported."""
  reason: str


class Rule:
  """A matcher + replacer. Subclasses set `name` and `emits` (the op names
  their replacements use) and implement `match(graph, node)` returning a
  Match, a NoMatch (reported as skipped) or None (not a candidate)."""
  name = None
  emits = ()

  def unavailable_reason(self):
    """Why the rule cannot replace anything here (its op is not
    registered), or None."""
    for op in self.emits:
      if registered_op_def(op) is None:
        return ("the %s op is not registered in this process (build the "
                "hpc_ops library that defines it)" % op)
    return None

  def begin(self, meta_graph, model_id):
    """Called once per MetaGraphDef before any of its graphs is rewritten
    (the library already checked). `model_id` is a hex digest of the input
    (the SavedModel's saved_model.pb and variable index, or the MetaGraphDef)
    and the meta graph's position: a rule that names state after the model
    (a shared resource) derives the name from it."""

  def verify_int_limit(self):
    """An exclusive upper bound the random integer inputs of --verify must
    stay below for the comparison to be meaningful (e.g. a vocabulary
    size), or None."""
    return None

  def match(self, graph, node):
    raise NotImplementedError


def new_output(graph, node, index=0, default_arg="output"):
  """Tensor for output `index` of a node about to be added to `graph`."""
  if not graph.is_function:
    return Tensor(node.name, str(index))
  if registered_op_def(node.op) is None:
    return Tensor(node.name, "%s:%d" % (default_arg, index))
  return graph.output(node, index)


def make_node(name, op, inputs, attrs, device=""):
  n = node_def_pb2.NodeDef(name=name, op=op, device=device)
  n.input.extend(inputs)
  for k, v in attrs.items():
    n.attr[k].CopyFrom(v)
  return n


def attr_type(dtype):
  return attr_value_pb2.AttrValue(type=dtype)


def attr_float(x):
  return attr_value_pb2.AttrValue(f=float(x))


def attr_shapes(shapes):
  v = attr_value_pb2.AttrValue()
  for s in shapes:
    v.list.shape.add().CopyFrom(shape_proto(s))
  return v


def const_node(name, value, dtype, device=""):
  """A Const NodeDef holding numpy `value` as `dtype` (a DataType enum)."""
  tensor = tf.make_tensor_proto(value, dtype=tf.dtypes.as_dtype(dtype))
  return make_node(name, "Const", [], {
      "dtype": attr_type(dtype),
      "value": attr_value_pb2.AttrValue(tensor=tensor)
  }, device)


def _copy_private_attrs(src, dst):
  for k, v in src.attr.items():
    if k.startswith("_") and k not in ("_output_shapes",
                                       "_class") and k not in dst.attr:
      dst.attr[k].CopyFrom(v)


def _apply(graph, m, report, rule_unavailable):
  """Checks the match against the rest of the graph and applies it. Returns
  True when the graph changed."""
  out = graph.node(m.output)
  interior = [n for n in dict.fromkeys(m.interior) if n != m.output]
  remove = set(interior)
  # Nodes read from outside the pattern: shareable ones stay (and so must
  # whatever of the pattern they read); any other one refuses the match.
  changed = True
  while changed:
    changed = False
    for name in sorted(remove):
      outside = [
          c for c, _ in graph.consumers(name)
          if c not in remove and c != m.output
      ]
      if not outside:
        continue
      if name not in m.shareable:
        who = outside[0] if outside[0] != EXTERNAL else "the graph's outputs"
        return NoMatch("intermediate %r (%s) is also used by %r" %
                       (name, graph.node(name).op, who))
      remove.discard(name)
      changed = True
  # Kept nodes must not read removed ones.
  for name in list(remove):
    for c, _ in graph.consumers(name):
      if c != m.output and c not in remove:
        return NoMatch("node %r would lose its input %r" % (c, name))
  if rule_unavailable:
    return NoMatch(rule_unavailable)

  new = m.new_node
  for n in list(m.extra_nodes) + [new]:
    for s in n.input:
      src = s[1:] if s.startswith("^") else graph.parse(s).node
      if src in remove:
        return NoMatch("the replacement would read %r, which is removed" % src)
  new.device = new.device or out.device
  _copy_private_attrs(out, new)
  # Control dependencies of everything replaced move to the new node.
  ctrl = []
  for name in [m.output] + sorted(remove):
    for c in graph.control_inputs(graph.node(name)):
      if c not in remove and c != m.output and c not in ctrl:
        ctrl.append(c)
  existing = set(new.input)
  for c in ctrl:
    if "^" + c not in existing:
      new.input.append("^" + c)
  if "_output_shapes" not in out.attr and "_output_shapes" in new.attr:
    del new.attr["_output_shapes"]  # keep the graph's convention
  removed = [(n.name, n.op)
             for n in graph.nodes
             if n.name in remove or n.name == m.output]
  added = [(n.name, n.op) for n in m.extra_nodes] + [(new.name, new.op)]
  graph.replace_node(m.output, new, m.output_map, m.extra_nodes, remove)
  report.replacements.append(
      Replacement(m.rule, graph.scope, new.name, removed, added, m.detail))
  return True


def rewrite_graph(graph, rules, report, max_passes=50):
  """Applies `rules` to one graph until nothing matches."""
  unavailable = {r.name: r.unavailable_reason() for r in rules}
  reported = set()
  for _ in range(max_passes):
    any_change = False
    names = [n.name for n in graph.nodes]
    for name in names:
      node = graph.node(name)
      if node is None:
        continue  # removed by an earlier replacement in this pass
      for rule in rules:
        try:
          result = rule.match(graph, node)
        except RewriteError:
          raise
        except Exception as e:
          # A malformed node the checks let through: refuse it, visibly.
          result = NoMatch("the rule could not read this node (%s: %s)" %
                           (type(e).__name__, e))
        if result is None:
          continue
        if isinstance(result, Match):
          result = _apply(graph, result, report, unavailable[rule.name])
        if isinstance(result, NoMatch):
          key = (rule.name, name, result.reason)
          if key not in reported:
            reported.add(key)
            report.skipped.append(
                Skip(rule.name, graph.scope, name, result.reason))
          continue
        if result:
          any_change = True
          break
    if not any_change:
      return
  raise RewriteError("%s: rules still matching after %d passes" %
                     (graph.scope, max_passes))


# ---------------------------------------------------------------------------
# Checks on the whole MetaGraphDef
# ---------------------------------------------------------------------------


def _funcs_in_attr(value, out):
  if value.HasField("func"):
    out.append(value.func.name)
    for v in value.func.attr.values():
      _funcs_in_attr(v, out)
  if value.HasField("list"):
    for f in value.list.func:
      out.append(f.name)
      for v in f.attr.values():
        _funcs_in_attr(v, out)


def called_functions(nodes, library_names):
  """Names of library functions the nodes call (as an op or through a
  function-valued attr: PartitionedCall, While, If, ...)."""
  out = []
  for n in nodes:
    if n.op in library_names:
      out.append(n.op)
    for v in n.attr.values():
      _funcs_in_attr(v, out)
  return out


def check_library(graph_def, scope):
  """RewriteError on a malformed function library: duplicate names, calls
  of missing functions, recursion."""
  lib = graph_def.library
  names = {}
  for f in lib.function:
    if f.signature.name in names:
      raise RewriteError("%s: the function library defines %r twice" %
                         (scope, f.signature.name))
    names[f.signature.name] = f
  calls = {
      name: sorted(set(called_functions(f.node_def, names)))
      for name, f in names.items()
  }
  for name, f in names.items():
    missing = [
        c for c in called_functions(f.node_def, names)
        if c not in names and registered_op_def(c) is None
    ]
    # An op name that is not registered and not in the library is reported
    # by the dangling-input check; function-valued attrs must resolve here.
    for c in missing:
      raise RewriteError("%s: function %r calls %r, which is not in the "
                         "function library" % (scope, name, c))
  # Depth-first search for a cycle, iterative (no recursion limit on
  # hostile libraries).
  state = {}  # 1 = on the stack, 2 = done
  for root in sorted(calls):
    if state.get(root):
      continue
    stack = [(root, iter(calls[root]))]
    path = [root]
    state[root] = 1
    while stack:
      name, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        state[name] = 2
        stack.pop()
        path.pop()
        continue
      if nxt not in calls:
        continue
      if state.get(nxt) == 1:
        cycle = path[path.index(nxt):] + [nxt]
        raise RewriteError(
            "%s: the function library is recursive (%s); TensorFlow cannot "
            "run such a model and it is not rewritten" %
            (scope, " -> ".join(cycle)))
      if not state.get(nxt):
        state[nxt] = 1
        path.append(nxt)
        stack.append((nxt, iter(calls[nxt])))
  for name in names:
    for n in names[name].node_def:
      for v in n.attr.values():
        funcs = []
        _funcs_in_attr(v, funcs)
        for fn in funcs:
          if fn not in names and registered_op_def(fn) is None:
            raise RewriteError("%s: function %r node %r refers to function "
                               "%r, which is not in the library" %
                               (scope, name, n.name, fn))


def _expected_input_count(op_def, node, library_sigs):
  """Number of data inputs the node's op takes, or None if unknown."""
  if op_def is None:
    sig = library_sigs.get(node.op)
    return None if sig is None else len(sig.input_arg)
  total = 0
  for arg in op_def.input_arg:
    if arg.number_attr:
      if arg.number_attr not in node.attr:
        return None
      total += node.attr[arg.number_attr].i
    elif arg.type_list_attr:
      if arg.type_list_attr not in node.attr:
        return None
      total += len(node.attr[arg.type_list_attr].list.type)
    else:
      total += 1
  return total


def check_graph(graph):
  """RewriteError on dangling inputs, unknown ops or nodes whose input
  count does not match their op in one graph."""
  by_name = graph.by_name  # raises on duplicate names
  for n in graph.nodes:
    if not n.op:
      raise RewriteError("%s: node %r has no op" % (graph.scope, n.name))
    op_def = registered_op_def(n.op)
    if op_def is None and n.op not in graph.library_sigs:
      raise RewriteError(
          "%s: node %r uses op %r, which is neither registered in this "
          "process nor a library function (load the library that defines it "
          "with --load)" % (graph.scope, n.name, n.op))
    want = _expected_input_count(op_def, n, graph.library_sigs)
    got = sum(1 for s in n.input if not s.startswith("^"))
    if want is not None and want != got:
      raise RewriteError(
          "%s: node %r (%s) has %d data inputs, its op takes %d" %
          (graph.scope, n.name, n.op, got, want))
    for s in n.input:
      t = graph.parse(s[1:]) if s.startswith("^") else graph.parse(s)
      if s.startswith("^"):
        ok = t.node in by_name
      elif graph.is_function and not t.out:
        ok = t.node in graph.args
      else:
        ok = t.node in by_name and (graph.flat_index(t) is not None)
      if not ok:
        raise RewriteError(
            "%s: node %r has a dangling input %r (no such %s)" %
            (graph.scope, n.name, s,
             "node" if s.startswith("^") or t.out else "argument or node"))
  if graph.is_function:
    for key, val in graph.fdef.ret.items():
      t = graph.parse(val)
      if (t.node not in by_name if t.out else t.node not in graph.args):
        raise RewriteError("%s: result %r refers to %r, which does not exist" %
                           (graph.scope, key, val))
    for key, val in graph.fdef.control_ret.items():
      if val not in by_name:
        raise RewriteError("%s: control result %r refers to %r, which does "
                           "not exist" % (graph.scope, key, val))


def _external_refs(meta_graph):
  """Node names the MetaGraphDef refers to outside the GraphDef's nodes."""
  names = set()

  def add(tensor_name):
    if tensor_name:
      names.add(tensor_name.lstrip("^").split(":")[0])

  for sig in meta_graph.signature_def.values():
    for info in list(sig.inputs.values()) + list(sig.outputs.values()):
      add(info.name)
      if info.HasField("coo_sparse"):
        add(info.coo_sparse.values_tensor_name)
        add(info.coo_sparse.indices_tensor_name)
        add(info.coo_sparse.dense_shape_tensor_name)
  for coll in meta_graph.collection_def.values():
    for v in coll.node_list.value:
      add(v)
  sd = meta_graph.saver_def
  for v in (sd.filename_tensor_name, sd.save_tensor_name, sd.restore_op_name):
    add(v)
  return names


def _graph_shape_fallback(graph_def):
  """Static shapes from importing the GraphDef into a tf.Graph (TF1 graphs
  saved without _output_shapes); {} when it cannot be imported."""

  def infer():
    try:
      g = tf.Graph()
      with g.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
      out = {}
      for op in g.get_operations():
        out[op.name] = [
            None if o.shape.rank is None else
            [-1 if d is None else d
             for d in o.shape.as_list()]
            for o in op.outputs
        ]
      return out
    except Exception:
      return {}

  return infer


def used_ops(graph_def):
  lib = {f.signature.name for f in graph_def.library.function}
  ops = {n.op for n in graph_def.node}
  for f in graph_def.library.function:
    ops.update(n.op for n in f.node_def)
  return ops - lib


def update_stripped_op_list(meta_graph, before_ops):
  """Adds the OpDefs of ops the rewrite introduced and drops those no longer
  used. Leaves an empty list empty (the producer did not strip)."""
  op_list = meta_graph.meta_info_def.stripped_op_list
  if not op_list.op:
    return
  now = used_ops(meta_graph.graph_def)
  have = {od.name: od for od in op_list.op}
  new_defs = []
  for name in sorted(now):
    if name in have:
      new_defs.append(have[name])
    elif name not in before_ops:  # introduced by the rewrite
      od = registered_op_def(name)
      if od is None:
        raise RewriteError("the rewrite introduced op %r, which is not "
                           "registered" % name)
      new_defs.append(stripped_op_def(od))
    # else: used before and not listed by the producer; leave it so.
  if [od.name for od in new_defs] != [od.name for od in op_list.op]:
    copies = [op_def_pb2.OpDef() for _ in new_defs]
    for c, od in zip(copies, new_defs):
      c.CopyFrom(od)
    del op_list.op[:]
    op_list.op.extend(copies)


def _import_problem(meta_graph, functions):
  """TensorFlow's error importing the graph and `functions` into a fresh
  tf.Graph (which checks every node against its OpDef and runs the shape
  functions), or None."""
  gd = meta_graph.graph_def
  g = tf.Graph()
  try:
    with g.as_default():
      tf.graph_util.import_graph_def(gd, name="")
  except Exception as e:
    return "the graph does not import: %s" % e
  lib = {f.signature.name: f for f in gd.library.function}
  for name in sorted(functions):
    try:
      with g.as_default():
        function_def_to_graph.function_def_to_graph(lib[name])
    except Exception as e:
      return "function %r does not import: %s" % (name, e)
  return None


def validate_rewritten(original, rewritten, changed_functions, scope, report):
  """RewriteError when the rewritten graph or a changed function fails to
  import while the original imports; a note when neither imports."""
  problem = _import_problem(rewritten, changed_functions)
  if problem is None:
    return
  if _import_problem(original, changed_functions) is not None:
    report.notes.append("%s: not validated, because the original does not "
                        "import in this process either (%s)" % (scope, problem))
    return
  raise RewriteError("%s: the rewritten model is invalid, nothing written: %s" %
                     (scope, problem))


# ---------------------------------------------------------------------------
# MetaGraphDef rewrite
# ---------------------------------------------------------------------------


def meta_graph_label(meta_graph, index, total):
  tags = ",".join(meta_graph.meta_info_def.tags)
  if total == 1:
    return ""
  return "meta_graph[%s]" % (tags or index)


def input_digest(*blobs):
  """Hex sha256 over byte strings (each length-prefixed)."""
  h = hashlib.sha256()
  for b in blobs:
    h.update(b"%d:" % len(b))
    h.update(b)
  return h.hexdigest()


def rewrite_meta_graph_in_place(meta_graph,
                                rules,
                                label="",
                                validate=True,
                                source_digest=None,
                                index=0):
  """Rewrites `meta_graph` (a MetaGraphDef, edited in place). Returns a
  Report. `source_digest` identifies the input it was read from (default:
  a digest of the MetaGraphDef itself); `index` is its position there."""
  report = Report()
  original = meta_graph_pb2.MetaGraphDef()
  original.CopyFrom(meta_graph)
  if source_digest is None:
    source_digest = input_digest(original.SerializeToString(deterministic=True))
  gd = meta_graph.graph_def
  prefix = (label + " ") if label else ""
  check_library(gd, prefix + "library")
  sigs = {f.signature.name: f.signature for f in gd.library.function}
  before_ops = used_ops(gd)
  top = Graph(prefix + "graph",
              gd.node,
              external=_external_refs(meta_graph),
              library_sigs=sigs,
              shape_fallback=_graph_shape_fallback(gd))
  graphs = [top] + [
      Graph(prefix + "function " + f.signature.name,
            f.node_def,
            fdef=f,
            library_sigs=sigs) for f in gd.library.function
  ]
  for g in graphs:
    check_graph(g)
  model_id = input_digest(source_digest.encode(), b"meta_graph %d" % index)
  for rule in rules:
    rule.begin(meta_graph, model_id)
  changed_functions = []
  for g in graphs:
    n = len(report.replacements)
    rewrite_graph(g, rules, report)
    if len(report.replacements) > n and g.is_function:
      changed_functions.append(g.fdef.signature.name)
  if report.replacements:
    update_stripped_op_list(meta_graph, before_ops)
    if validate:
      validate_rewritten(original, meta_graph, changed_functions, prefix or
                         "model", report)
  return report


def rewrite_meta_graph(meta_graph_def, rules=None, validate=True):
  """Returns (rewritten copy of meta_graph_def, Report). The argument is not
  modified."""
  from hpc_ops.rewrite import rules as rules_lib
  rule_objs = rules_lib.resolve(rules)
  out = meta_graph_pb2.MetaGraphDef()
  out.CopyFrom(meta_graph_def)
  report = rewrite_meta_graph_in_place(out, rule_objs, validate=validate)
  return out, report


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _parse(proto, data, path, text):
  try:
    if text:
      text_format.Parse(
          data.decode("utf-8") if isinstance(data, bytes) else data, proto)
    else:
      proto.ParseFromString(data)
  except (_pb_message.DecodeError, text_format.ParseError, UnicodeDecodeError,
          ValueError) as e:
    raise RewriteError(
        "%s is not a valid %s protobuf (%s): %s" %
        (path, proto.DESCRIPTOR.name, "text" if text else "binary", e)) from e
  return proto


def read_saved_model(src_dir):
  """(SavedModel proto, file name, is_text)."""
  if not os.path.isdir(src_dir):
    raise RewriteError("%s is not a directory (a SavedModel is a directory "
                       "holding saved_model.pb)" % src_dir)
  for fname, text in ((SAVED_MODEL_PB, False), (SAVED_MODEL_PBTXT, True)):
    path = os.path.join(src_dir, fname)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        sm = _parse(saved_model_pb2.SavedModel(), f.read(), path, text)
      if not sm.meta_graphs:
        raise RewriteError("%s holds no MetaGraphDef" % path)
      return sm, fname, text
  raise RewriteError("%s is not a SavedModel: it has neither %s nor %s" %
                     (src_dir, SAVED_MODEL_PB, SAVED_MODEL_PBTXT))


def read_meta_graph_file(path):
  """(MetaGraphDef, is_text) from a .meta (binary) or .pbtxt (text) file."""
  if not os.path.isfile(path):
    raise RewriteError("%s does not exist or is not a file" % path)
  with open(path, "rb") as f:
    data = f.read()
  text = path.endswith((".pbtxt", ".txt", ".meta_txt"))
  mg = _parse(meta_graph_pb2.MetaGraphDef(), data, path, text)
  if not mg.graph_def.node and not mg.graph_def.library.function:
    raise RewriteError("%s parsed as a MetaGraphDef but holds no graph" % path)
  return mg, text


def _serialize(proto, text):
  if text:
    return text_format.MessageToString(proto).encode("utf-8")
  return proto.SerializeToString(deterministic=True)


def _check_dst(src, dst):
  src_abs, dst_abs = os.path.realpath(src), os.path.realpath(dst)
  if src_abs == dst_abs:
    raise RewriteError("destination %s is the source: the input is never "
                       "modified, write the result elsewhere" % dst)
  if dst_abs.startswith(src_abs.rstrip(os.sep) + os.sep):
    raise RewriteError("destination %s is inside the source %s" % (dst, src))
  if os.path.lexists(dst) and not (os.path.isdir(dst) and not os.listdir(dst)):
    raise RewriteError("destination %s already exists (remove it or choose "
                       "another path)" % dst)


def rewrite_saved_model(src_dir,
                        dst_dir,
                        rules=None,
                        verify=0,
                        dry_run=False,
                        validate=True,
                        seed=0):
  """Rewrites the SavedModel in `src_dir` into `dst_dir` (which must not
  exist, or be empty). Every meta graph is rewritten; variables/, assets/
  and any other file are copied untouched; fingerprint.pb is recomputed.
  With verify=N, both models are run on N random batches per signature in
  a fresh process before dst_dir is created; a mismatch leaves dst_dir
  absent. dry_run: report only, write nothing (verify then uses a
  temporary copy). Returns the Report."""
  from hpc_ops.rewrite import rules as rules_lib
  rule_objs = rules_lib.resolve(rules)
  sm, fname, text = read_saved_model(src_dir)
  if not dry_run:
    _check_dst(src_dir, dst_dir)
  digest = _saved_model_digest(src_dir, fname)
  report = Report()
  for i, mg in enumerate(sm.meta_graphs):
    label = meta_graph_label(mg, i, len(sm.meta_graphs))
    report.extend(
        rewrite_meta_graph_in_place(mg, rule_objs, label, validate, digest, i))
  if not report.changed:
    report.notes.append("nothing to rewrite: the output is a copy of the input")
  if dry_run and not verify:
    return report
  parent = os.path.dirname(os.path.abspath(dst_dir)) if not dry_run else None
  tmp = tempfile.mkdtemp(prefix=".hpc_ops_rewrite-", dir=parent)
  try:
    out_dir = os.path.join(tmp, "model")
    _copy_tree(src_dir, out_dir, skip={fname, FINGERPRINT_PB})
    with open(os.path.join(src_dir, fname), "rb") as f:
      original = f.read()
    with open(os.path.join(out_dir, fname), "wb") as f:
      # Unchanged: the same bytes, so a second rewrite changes nothing.
      f.write(_serialize(sm, text) if report.changed else original)
    if os.path.exists(os.path.join(src_dir, FINGERPRINT_PB)):
      _write_fingerprint(src_dir, out_dir, report.changed)
    if verify:
      from hpc_ops.rewrite import verify as verify_lib
      limits = [r.verify_int_limit() for r in rule_objs]
      limits = [x for x in limits if x is not None]
      report.verification = verify_lib.verify_saved_models(
          src_dir,
          out_dir,
          verify,
          seed=seed,
          int_limit=min(limits) if limits else None)
      if not report.verification["ok"]:
        report.notes.append("verification failed: %s was not written" % dst_dir)
        return report
    if not dry_run:
      if os.path.isdir(dst_dir):
        os.rmdir(dst_dir)  # empty, checked above
      os.rename(out_dir, dst_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return report


def _saved_model_digest(src_dir, fname):
  """Digest of what makes a SavedModel this model: its graph file and the
  variable index (which holds a checksum of every saved tensor), so that
  two exports of one architecture with different weights differ."""
  blobs = []
  for rel in (fname, os.path.join("variables", "variables.index")):
    path = os.path.join(src_dir, rel)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        blobs.append(f.read())
  return input_digest(*blobs)


def _copy_tree(src, dst, skip):

  def ignore(d, names):
    return [n for n in names if os.path.samefile(d, src) and n in skip]

  shutil.copytree(src, dst, ignore=ignore)


def _write_fingerprint(src_dir, out_dir, changed):
  dst = os.path.join(out_dir, FINGERPRINT_PB)
  if not changed:
    shutil.copy2(os.path.join(src_dir, FINGERPRINT_PB), dst)
    return
  try:
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
    data = fingerprinting.CreateFingerprintDef(out_dir)
  except Exception:
    return  # fingerprints are optional; a stale one would be worse
  with open(dst, "wb") as f:
    f.write(data)


def rewrite_meta_graph_file(src, dst, rules=None, dry_run=False, validate=True):
  """Rewrites a standalone MetaGraphDef file (.meta binary or .pbtxt text);
  the output keeps the input's format. Returns the Report."""
  from hpc_ops.rewrite import rules as rules_lib
  rule_objs = rules_lib.resolve(rules)
  mg, text = read_meta_graph_file(src)
  if not dry_run:
    _check_dst(src, dst)
  with open(src, "rb") as f:
    digest = input_digest(f.read())
  report = rewrite_meta_graph_in_place(mg, rule_objs, "", validate, digest)
  if not report.changed:
    report.notes.append("nothing to rewrite: the output is a copy of the input")
  if dry_run:
    return report
  fd, tmp = tempfile.mkstemp(prefix=".hpc_ops_rewrite-",
                             dir=os.path.dirname(os.path.abspath(dst)))
  try:
    with os.fdopen(fd, "wb") as f:
      if report.changed:
        f.write(_serialize(mg, text))
      else:
        with open(src, "rb") as s:
          f.write(s.read())
    os.replace(tmp, dst)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return report
