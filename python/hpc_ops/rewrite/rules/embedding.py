"""embedding rule: an embedding lookup on a variable -> SparseTablePull on a
sparse table initialised from the variable's rows.

Matched (float32 rows, rank-2 variable of known shape [V, D]):

  ResourceGather(resource=<variable>, ids)             batch_dims 0
      tf.gather(var, ids), tf.nn.embedding_lookup(var, ids)
  GatherV2(ReadVariableOp(<variable>), ids, axis=0)    batch_dims 0
      Keras 3 `Embedding` (ops.take), tf.gather(var.value(), ids)

where <variable> is a function argument bound to a variable of the
SavedModel's object graph, a VarHandleOp (TF1, and the top level of a TF2
SavedModel), a function argument every caller passes the same variable to
(through PartitionedCall/StatefulPartitionedCall, direct calls, If, Case,
While), or an Identity of one of these.

Replacement (the lookup node keeps its name and now is the pull):

  handle = SparseTableHandle(dim=D, initializer='zeros', optimizer='sgd',
                             shared_name=<name unique to model + variable>)
  rows   = ReadVariableOp(<variable>)     (an existing read is reused)
  init   = SparseTableInitFromDense(handle, rows)
  keys   = Cast(ids, int64)               (int32/int16 ids only)
  out    = SparseTablePull(handle, keys, dim=D, insert_missing=False)
           with a control input on init

The first lookup fills the table with key i -> row i of the variable (every
later one finds it filled and returns at once); ids beyond [0, V) (or
negative) read zero rows, where the gather failed with InvalidArgument.

The table is named by a shared_name derived from the input's digest and the
variable (deterministic; distinct for distinct models and variables) and
lives in the device's resource manager: in a TF1 Session until it closes;
under tf.saved_model.load, which appends a per-load suffix to shared names,
one table per load that outlives the loaded model (until the process ends).
Nothing in the object graph tracks it.

Refused (reported as skipped): rows not float32, batch_dims != 0, an axis
other than 0, the variable not traceable to one variable, its shape unknown
or not rank 2, no rows, a row width beyond SparseTable's 65536, a lookup
in an XLA-compiled function, and a variable that anything in the model may
write (an Assign*/Scatter/Apply op
other than the checkpoint restore and TF1 initialiser): the table is a
snapshot of the variable at the first lookup and would not see the write.
"""
import collections
import hashlib
import re

from tensorflow.core.framework import attr_value_pb2
from tensorflow.core.framework import types_pb2
from tensorflow.core.framework import variable_pb2

from hpc_ops.rewrite import core

HANDLE = "SparseTableHandle"
INIT = "SparseTableInitFromDense"
PULL = "SparseTablePull"
MAX_DIM = 65536  # SparseTableHandle's limit on dim
_ID_TYPES = (types_pb2.DT_INT16, types_pb2.DT_INT32, types_pb2.DT_INT64)

# Ops that take a variable's resource handle without changing its value.
_READS = frozenset({
    "ReadVariableOp", "ResourceGather", "ResourceGatherNd", "VariableShape",
    "VarIsInitializedOp", "DisableCopyOnRead"
})
# Ops that write a variable even when the handle's origin is unknown.
_WRITER = re.compile(r"^(Assign(Add|Sub)?VariableOp|ResourceScatter\w+|"
                     r"ResourceApply\w+|ResourceSparseApply\w+|"
                     r"ResourceStridedSliceAssign|DestroyResourceOp)$")
_RESTORE = frozenset({"RestoreV2", "Restore", "RestoreSlice"})
_CALLS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
_IFS = frozenset({"If", "StatelessIf"})
_CASES = frozenset({"Case", "StatelessCase"})
_WHILES = frozenset({"While", "StatelessWhile"})
UNKNOWN = "?"  # a resource of unknown origin


def _shape_str(dims):
  return "unknown" if dims is None else "[%s]" % ", ".join(
      "?" if d < 0 else str(d) for d in dims)


VarInfo = collections.namedtuple("VarInfo", ["name", "dtype", "shape"])


def _key_order(k):
  return (not k.startswith("object:"), k)


def _fname(g):
  return g.fdef.signature.name if g.is_function else ""


def _where(fname):
  return "function %s" % fname if fname else "the graph"


def resource_source(g, t, max_steps=64):
  """("arg", index) or ("handle", node name) that resource Tensor t comes
  from through Identity nodes, else None."""
  for _ in range(max_steps):
    if g.is_function and not t.out:
      i = g.args.get(t.node)
      return None if i is None else ("arg", i)
    node = g.producer(t)
    if node is None:
      return None
    if node.op == "Identity":
      t = g.inputs(node)[0]
      continue
    if node.op == "VarHandleOp":
      return ("handle", node.name)
    return None
  return None


class VariableMap:
  """Which variable each resource tensor of a MetaGraphDef holds, and which
  variables something in the model may write.

  Keys: "object:<node id>" for a variable of the SavedModel object graph
  (bound to a function's captured argument), "node:<function>:<name>" for
  a VarHandleOp ("" is the top-level graph). A function argument that the
  object graph binds and a VarHandleOp a caller passes into it are one
  variable (union-find); an unbound argument holds whatever its callers
  pass (a set: more than one variable, or UNKNOWN, is not rewritten).
  """

  def __init__(self, meta_graph):
    gd = meta_graph.graph_def
    self.lib = {f.signature.name: f for f in gd.library.function}
    sigs = {n: f.signature for n, f in self.lib.items()}
    graphs = {"": core.Graph("graph", gd.node, library_sigs=sigs)}
    for name, f in self.lib.items():
      graphs[name] = core.Graph("function " + name,
                                f.node_def,
                                fdef=f,
                                library_sigs=sigs)
    self._parent = {}
    self.info = {}
    self.bound = {}  # (function, arg index) -> key
    self.arg_keys = collections.defaultdict(set)  # unbound arguments
    self.writes = collections.defaultdict(list)  # key -> [description]
    self.unknown_writes = []
    self._seed_object_graph(meta_graph)
    for fname, g in graphs.items():
      for n in g.nodes:
        if n.op == "VarHandleOp":
          key = "node:%s:%s" % (fname, n.name)
          shared = n.attr["shared_name"].s if "shared_name" in n.attr else b""
          self.info[key] = VarInfo(
              shared.decode("utf-8", "replace") or n.name,
              n.attr["dtype"].type if "dtype" in n.attr else None,
              core.shape_list(n.attr["shape"].shape)
              if "shape" in n.attr else None)
    self._propagate(graphs)
    self._find_writes(graphs, meta_graph)

  # -- union-find --------------------------------------------------------------

  def find(self, k):
    root = k
    while self._parent.get(root, root) != root:
      root = self._parent[root]
    while k != root:
      self._parent[k], k = root, self._parent.get(k, k)
    return root

  def _union(self, a, b):
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return False
    # The representative is deterministic: object-graph keys first.
    lo, hi = sorted((ra, rb), key=_key_order)
    self._parent[hi] = lo
    return True

  def members(self, key):
    root = self.find(key)
    return sorted((k for k in self.info if self.find(k) == root),
                  key=_key_order)

  def variable(self, key):
    """VarInfo of a variable class: the first member with a name, the
    first fully known shape and dtype among the members."""
    infos = [self.info[k] for k in self.members(key)]
    shapes = [v.shape for v in infos if v.shape is not None]
    known = [s for s in shapes if -1 not in s]
    dtypes = [v.dtype for v in infos if v.dtype]
    return VarInfo(infos[0].name if infos else key,
                   dtypes[0] if dtypes else None,
                   (known or shapes or [None])[0])

  # -- analysis ----------------------------------------------------------------

  def _seed_object_graph(self, meta_graph):
    if not meta_graph.HasField("object_graph_def"):
      return
    og = meta_graph.object_graph_def
    for cf_name, cf in sorted(og.concrete_functions.items()):
      f = self.lib.get(cf_name)
      if f is None:
        continue
      n_in, bound = len(f.signature.input_arg), list(cf.bound_inputs)
      if len(bound) > n_in:
        continue
      for j, node_id in enumerate(bound):
        if not 0 <= node_id < len(og.nodes):
          continue
        obj = og.nodes[node_id]
        if obj.WhichOneof("kind") != "variable":
          continue
        key = "object:%d" % node_id
        v = obj.variable
        self.info[key] = VarInfo(v.name or "object %d" % node_id, v.dtype,
                                 core.shape_list(v.shape))
        self.bound[(cf_name, n_in - len(bound) + j)] = key

  def keys(self, fname, g, t, final=True):
    """Set of variable keys (or UNKNOWN) resource Tensor t may hold. An
    argument no caller passes anything to holds UNKNOWN, once the
    propagation is done (final); during it, nothing yet."""
    src = resource_source(g, t)
    if src is None:
      return {UNKNOWN}
    if src[0] == "handle":
      return {"node:%s:%s" % (fname, src[1])}
    key = self.bound.get((fname, src[1]))
    if key is not None:
      return {key}
    got = set(self.arg_keys.get((fname, src[1]), ()))
    return got or ({UNKNOWN} if final else set())

  def _flow(self, callee, j, ks):
    """Resources ks are passed as argument j of callee; True if that
    changed anything."""
    key = self.bound.get((callee, j))
    if key is not None:
      return any([self._union(key, k) for k in ks if k != UNKNOWN])
    have = self.arg_keys[(callee, j)]
    new = ks - have
    have |= new
    return bool(new)

  def _callees(self, n):
    """[(function, first input feeding its argument 0)] a node calls."""

    def fn(key):
      return [n.attr[key].func.name] if key in n.attr else []

    if n.op in self.lib:
      return [(n.op, 0)]
    if n.op in _CALLS:
      return [(f, 0) for f in fn("f")]
    if n.op in _IFS:
      return [(f, 1) for f in fn("then_branch") + fn("else_branch")]
    if n.op in _CASES and "branches" in n.attr:
      return [(b.name, 1) for b in n.attr["branches"].list.func]
    if n.op in _WHILES:
      return [(f, 0) for f in fn("cond") + fn("body")]
    return []

  def _propagate(self, graphs):
    # Monotone (sets only grow, classes only merge): ends after at most
    # one round per possible addition.
    changed = True
    while changed:
      changed = False
      for fname, g in graphs.items():
        for n in g.nodes:
          calls = self._callees(n)
          ins = g.inputs(n) if calls else []
          for callee, offset in calls:
            f = self.lib.get(callee)
            if f is None:
              continue
            for j, arg in enumerate(f.signature.input_arg):
              if arg.type != types_pb2.DT_RESOURCE or offset + j >= len(ins):
                continue
              changed |= self._flow(
                  callee, j, self.keys(fname, g, ins[offset + j], final=False))
          if n.op in _WHILES and "body" in n.attr:
            # Loop-carried resources: what the body returns comes back in.
            body = self.lib.get(n.attr["body"].func.name)
            if body is None:
              continue
            bg = graphs[body.signature.name]
            for j, arg in enumerate(body.signature.output_arg):
              if arg.type != types_pb2.DT_RESOURCE or arg.name not in body.ret:
                continue
              ks = self.keys(body.signature.name,
                             bg,
                             bg.parse(body.ret[arg.name]),
                             final=False)
              for callee, _ in calls:
                changed |= self._flow(callee, j, ks)

  def _restored(self, g, n):
    """True for AssignVariableOp(v, <a checkpoint restore output>)."""
    if n.op != "AssignVariableOp":
      return False
    ins = g.inputs(n)
    if len(ins) != 2:
      return False
    t = ins[1]
    for _ in range(16):
      p = g.producer(t)
      if p is None:
        return False
      if p.op in _RESTORE:
        return True
      if p.op != "Identity":
        return False
      t = g.inputs(p)[0]
    return False

  def _find_writes(self, graphs, meta_graph):
    initializers = set()  # TF1: run by global_variables_initializer only
    for coll in meta_graph.collection_def.values():
      for raw in coll.bytes_list.value:
        vd = variable_pb2.VariableDef()
        try:
          vd.ParseFromString(raw)
        except Exception:
          continue
        if vd.initializer_name:
          initializers.add(vd.initializer_name.split(":")[0])
    for fname, g in graphs.items():
      for n in g.nodes:
        if n.op in _READS or n.op == "Identity" or self._callees(n):
          continue
        op_def = core.registered_op_def(n.op)
        if op_def is None:
          continue
        positions = []
        for i, arg in enumerate(op_def.input_arg):
          if arg.number_attr or arg.type_list_attr:
            break  # later positions are not known without counting
          if arg.type == types_pb2.DT_RESOURCE:
            positions.append(i)
        if not positions:
          continue
        if (not fname and n.name in initializers) or self._restored(g, n):
          continue
        ins = g.inputs(n)
        desc = "%r (%s) in %s" % (n.name, n.op, _where(fname))
        for i in positions:
          if i >= len(ins):
            continue
          ks = self.keys(fname, g, ins[i])
          for k in ks - {UNKNOWN}:
            self.writes[self.find(k)].append(desc)
          if UNKNOWN in ks and _WRITER.match(n.op):
            self.unknown_writes.append(desc)


class EmbeddingRule(core.Rule):
  name = "embedding"
  emits = (HANDLE, INIT, PULL)

  def __init__(self):
    self._vars = None
    self._model_id = None
    self._min_rows = None

  def begin(self, meta_graph, model_id):
    self._model_id = model_id
    self._vars = VariableMap(meta_graph)

  def verify_int_limit(self):
    return self._min_rows

  def shared_name(self, key, info):
    digest = hashlib.sha256(
        ("%s\0%s\0%s" % (self._model_id, self._vars.find(key),
                         info.name)).encode("utf-8")).hexdigest()[:32]
    readable = re.sub(r"[^A-Za-z0-9_.\-]", "_", info.name)[:64]
    return "hpc_ops_embedding_%s_%s" % (readable, digest)

  # -- matching ----------------------------------------------------------------

  def match(self, g, node):
    if node.op == "ResourceGather":
      ins = g.inputs(node)
      if len(ins) != 2:
        return None
      res, ids = ins
      found = self._check(g, node, res, ids, g.attr_type(node, "dtype"))
      if isinstance(found, core.NoMatch):
        return found
      return self._replace(g, node, res, ids, found, rows=None, interior=[])
    if node.op == "GatherV2":
      ins = g.inputs(node)
      if len(ins) != 3:
        return None
      params, ids, axis = ins
      read = self._variable_read(g, params)
      if read is None:
        return None  # a gather from a tensor, not an embedding lookup
      res = g.inputs(read)[0]
      found = self._check(g, node, res, ids, g.attr_type(node, "Tparams"))
      if isinstance(found, core.NoMatch):
        return found
      a = g.const_value(axis)
      if a is None or a.size != 1 or a.dtype.kind not in "iu":
        return core.NoMatch("the gather's axis is not a constant")
      a = int(a.reshape(-1)[0])
      if a not in (0, -2):
        return core.NoMatch("the gather is along axis %d: only row lookups "
                            "(axis 0) are embedding lookups" % a)
      return self._replace(g,
                           node,
                           res,
                           ids,
                           found,
                           rows=params,
                           interior=g.const_producers(axis))
    return None

  def _variable_read(self, g, t):
    """The ReadVariableOp t is (through Identity nodes), else None."""
    for _ in range(16):
      p = g.producer(t)
      if p is None:
        return None
      if p.op == "ReadVariableOp":
        return p
      if p.op != "Identity":
        return None
      t = g.inputs(p)[0]
    return None

  def _check(self, g, node, res, ids, dtype):
    """(key, VarInfo) of the looked-up variable, or a NoMatch."""
    if self._vars is None:
      raise core.RewriteError(
          "the embedding rule needs the whole MetaGraphDef (call it through "
          "rewrite_meta_graph or rewrite_saved_model)")
    if dtype != types_pb2.DT_FLOAT:
      return core.NoMatch(
          "the rows are %s: SparseTablePull serves float32 rows" %
          (types_pb2.DataType.Name(dtype)[3:].lower() if dtype else "untyped"))
    bd = node.attr["batch_dims"].i if "batch_dims" in node.attr else 0
    if bd != 0:
      return core.NoMatch("batch_dims is %d: SparseTablePull looks up whole "
                          "rows (batch_dims 0)" % bd)
    it = g.attr_type(node, "Tindices")
    if it not in _ID_TYPES:
      return core.NoMatch("the ids are %s, not an integer type" %
                          (types_pb2.DataType.Name(it) if it else "untyped"))
    fname = _fname(g)
    if g.is_function and "_XlaMustCompile" in g.fdef.attr and \
        g.fdef.attr["_XlaMustCompile"].b:
      return core.NoMatch("function %s is compiled with XLA (jit_compile), "
                          "which has no kernel for the sparse table ops" %
                          fname)
    ks = self._vars.keys(fname, g, res)
    classes = {self._vars.find(k) for k in ks if k != UNKNOWN}
    if UNKNOWN in ks or len(classes) != 1:
      return core.NoMatch(
          "the gathered resource %r is not one variable the rewrite can "
          "trace (%s)" % (g.ref(res), "it may hold %d variables" %
                          len(classes) if UNKNOWN not in ks else
                          "it does not come from a VarHandleOp or a function "
                          "argument bound to a variable"))
    (key,) = classes
    info = self._vars.variable(key)
    if info.shape is None or len(info.shape) != 2:
      if info.shape is None:
        return core.NoMatch("variable %r has no static shape (SparseTablePull "
                            "needs its row width)" % info.name)
      return core.NoMatch("variable %r has shape %s: only rank-2 embedding "
                          "matrices are looked up" %
                          (info.name, _shape_str(info.shape)))
    rows, dim = info.shape
    if dim < 0:
      return core.NoMatch("variable %r has shape %s: the row width is not "
                          "known statically" %
                          (info.name, _shape_str(info.shape)))
    if dim < 1 or dim > MAX_DIM:
      return core.NoMatch("variable %r has rows of %d elements: SparseTable "
                          "holds 1 to %d" % (info.name, dim, MAX_DIM))
    if rows == 0:
      return core.NoMatch("variable %r has no rows" % info.name)
    if info.dtype not in (None, types_pb2.DT_FLOAT):
      return core.NoMatch("variable %r is %s: SparseTablePull serves float32 "
                          "rows" % (info.name, types_pb2.DataType.Name(
                              info.dtype)[3:].lower()))
    writes = self._vars.writes.get(key)
    if writes:
      return core.NoMatch(
          "variable %r is also written by %s%s: the table is filled from it "
          "once and would not see the change" %
          (info.name, writes[0], " and %d more" %
           (len(writes) - 1) if len(writes) > 1 else ""))
    if self._vars.unknown_writes:
      return core.NoMatch(
          "%s writes a resource the rewrite cannot trace to a variable, which "
          "may be %r" % (self._vars.unknown_writes[0], info.name))
    return key, info

  # -- replacement ---------------------------------------------------------------

  def _unconditional(self, g, t):
    """True when Tensor t is a read of a variable handle through nodes
    without control inputs: another lookup may then wait for it without
    risking a cycle."""
    for _ in range(64):
      if g.is_function and not t.out:
        return True
      node = g.producer(t)
      if node is None or g.control_inputs(node):
        return False
      if node.op == "VarHandleOp":
        return True
      if node.op not in ("ReadVariableOp", "Identity"):
        return False
      t = g.inputs(node)[0]
    return False

  def _existing(self, g, shared_name):
    """(handle, init) nodes an earlier lookup of this graph added for the
    same table, else None."""
    for n in g.nodes:
      if (n.op == HANDLE and "shared_name" in n.attr and
          n.attr["shared_name"].s == shared_name.encode()):
        out = g.output(n, 0)
        for c in g.data_consumers(out):
          ins = g.inputs(c)
          if (c.op == INIT and ins[0] == out and not g.control_inputs(c) and
              self._unconditional(g, ins[1])):
            return n, c
    return None

  def _existing_read(self, g, res):
    """Output of a ReadVariableOp of the same handle tensor without control
    inputs, else None."""
    for n in g.nodes:
      if (n.op == "ReadVariableOp" and g.attr_type(n, "dtype")
          == types_pb2.DT_FLOAT and g.inputs(n) == [res] and
          self._unconditional(g, g.output(n, 0))):
        return g.output(n, 0)
    return None

  def _replace(self, g, node, res, ids, found, rows, interior):
    key, info = found
    vocab, dim = info.shape
    shared_name = self.shared_name(key, info)
    dev = node.device
    shapes = "_output_shapes" in node.attr

    def attrs(d, out_shapes):
      if shapes:
        d["_output_shapes"] = core.attr_shapes(out_shapes)
        d["_output_shapes"].list.SetInParent()  # set even when empty
      return d

    extra = []
    existing = self._existing(g, shared_name)
    if existing is not None:
      handle, init = existing
    else:
      handle = core.make_node(
          g.unique_name(node.name + "/SparseTableHandle"), HANDLE, [],
          attrs(
              {
                  "dim": attr_value_pb2.AttrValue(i=dim),
                  "initializer": attr_value_pb2.AttrValue(s=b"zeros"),
                  "optimizer": attr_value_pb2.AttrValue(s=b"sgd"),
                  "shared_name": attr_value_pb2.AttrValue(
                      s=shared_name.encode()),
              }, [[]]), dev)
      extra.append(handle)
      if rows is None:
        rows = self._existing_read(g, res)
      if rows is None:
        read = core.make_node(
            g.unique_name(node.name + "/ReadVariableOp"), "ReadVariableOp",
            [g.ref(res)],
            attrs({"dtype": core.attr_type(types_pb2.DT_FLOAT)},
                  [[vocab, dim]]), dev)
        extra.append(read)
        rows = core.new_output(g, read, 0, "value")
      init = core.make_node(
          g.unique_name(node.name + "/SparseTableInitFromDense"), INIT,
          [g.ref(core.new_output(g, handle, 0)),
           g.ref(rows)], attrs({}, []), dev)
      extra.append(init)
    ids_type = g.attr_type(node, "Tindices")
    ids_shape = g.shape(ids)
    keys = ids
    if ids_type != types_pb2.DT_INT64:
      cast = core.make_node(
          g.unique_name(node.name + "/Cast"), "Cast", [g.ref(ids)],
          attrs(
              {
                  "SrcT": core.attr_type(ids_type),
                  "DstT": core.attr_type(types_pb2.DT_INT64),
                  "Truncate": attr_value_pb2.AttrValue(b=False),
              }, [ids_shape]), dev)
      extra.append(cast)
      keys = core.new_output(g, cast, 0, "y")
    out_shape = g.shape(g.output(node, 0))
    if out_shape is None and ids_shape is not None:
      out_shape = ids_shape + [dim]
    pull = core.make_node(
        node.name, PULL, [
            g.ref(core.new_output(g, handle, 0)),
            g.ref(keys), "^" + init.name
        ],
        attrs(
            {
                "dim": attr_value_pb2.AttrValue(i=dim),
                "insert_missing": attr_value_pb2.AttrValue(b=False),
            }, [out_shape]), dev)
    self._min_rows = vocab if self._min_rows is None else min(
        self._min_rows, vocab)
    return core.Match(
        rule=self.name,
        output=node.name,
        new_node=pull,
        output_map={g.output(node): core.new_output(g, pull, 0, "values")},
        interior=interior,
        shareable=set(interior),
        extra_nodes=extra,
        detail="SparseTablePull(dim=%d) of ids %r from variable %r %s via "
        "table %r; ids outside [0, %d) now read zero rows instead of failing" %
        (dim, g.ref(ids), info.name, _shape_str(info.shape), shared_name,
         vocab))
