"""zero_out rule: native "keep the first element, zero the rest" -> ZeroOut.

Matched patterns (x any shape unless noted):

  mask      x * reshape(one_hot(0, size(x)), shape(x))
            Mul(x, Reshape(OneHot(0, Size(x), 1, 0), Shape(x))), either
            operand order
  flat mask reshape(reshape(x, [-1]) * one_hot(0, size(x)), shape(x))
  concat    concat([x[:1], zeros_like(x[1:])], 0)          x of rank 1
            (zeros_like folded into a Const of zeros for a static shape
            is matched too)
  scatter   tensor_scatter_nd_update(zeros_like(x), [[0]], x[:1])
                                                           x of rank 1

Differences the rewrite accepts (ZeroOut's result is the one documented):
the mask patterns give NaN where x holds NaN or +-Inf outside the first
element (0 * Inf), ZeroOut gives 0; the scatter pattern fails on an empty x,
ZeroOut returns it.
"""
from tensorflow.core.framework import types_pb2

from hpc_ops.rewrite import core

OP = "ZeroOut"
SUPPORTED = (types_pb2.DT_INT32, types_pb2.DT_INT64, types_pb2.DT_HALF,
             types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE)


def _int_attr(node, key):
  return node.attr[key].i if key in node.attr else 0


def _const_list(g, t):
  v = g.const_value(t)
  if v is None or v.dtype.kind not in "iu":
    return None
  return [int(a) for a in v.reshape(-1)], v.shape


def _slice(g, node, x):
  """'head' for x[:1] / x[0:1], 'tail' for x[1:], else None."""
  if node is None or node.op != "StridedSlice":
    return None
  ins = g.inputs(node)
  if len(ins) != 4 or ins[0] != x:
    return None
  if any(
      _int_attr(node, k)
      for k in ("ellipsis_mask", "new_axis_mask", "shrink_axis_mask")):
    return None
  b, e, s = (_const_list(g, t) for t in ins[1:])
  if b is None or e is None or s is None or s[0] != [1]:
    return None
  bm, em = _int_attr(node, "begin_mask"), _int_attr(node, "end_mask")
  if (b[0] == [0] or bm & 1) and e[0] == [1] and not em & 1:
    return "head"
  if b[0] == [1] and not bm & 1 and em & 1:
    return "tail"
  return None


class ZeroOutRule(core.Rule):
  name = "zero_out"
  emits = (OP,)

  def match(self, g, node):
    found = None
    if node.op == "Mul":
      found = self._mask(g, node)
    elif node.op == "Reshape":
      found = self._flat_mask(g, node)
    elif node.op == "ConcatV2":
      found = self._concat(g, node)
    elif node.op == "TensorScatterUpdate":
      found = self._scatter(g, node)
    if found is None or isinstance(found, core.NoMatch):
      return found
    x, interior, shareable, kind = found
    dt = g.attr_type(node, "T")
    if dt not in SUPPORTED:
      return core.NoMatch("ZeroOut does not support %s" %
                          types_pb2.DataType.Name(dt))
    xshape = g.shape(x)
    new = core.make_node(node.name, OP, [g.ref(x)], {
        "T": core.attr_type(dt),
        "_output_shapes": core.attr_shapes([xshape]),
    }, node.device)
    return core.Match(
        rule=self.name,
        output=node.name,
        new_node=new,
        output_map={g.output(node): core.new_output(g, new, 0, "zeroed")},
        interior=interior,
        shareable=shareable,
        detail="ZeroOut(T=%s) of %r (%s pattern)" %
        (types_pb2.DataType.Name(dt)[3:].lower(), g.ref(x), kind))

  # -- patterns ----------------------------------------------------------------

  def _one_hot_first(self, g, t, size_of):
    """Interior names if t is one_hot(0, Size(s), 1, 0) with s in size_of."""
    oh = g.producer(t)
    if oh is None or oh.op != "OneHot" or len(g.inputs(oh)) != 4:
      return None
    if "axis" in oh.attr and oh.attr["axis"].i != -1:
      return None
    idx, depth, on, off = g.inputs(oh)
    v_idx, v_on, v_off = (g.const_value(a) for a in (idx, on, off))
    if any(v is None or v.size != 1 for v in (v_idx, v_on, v_off)):
      return None
    if v_idx.ndim != 0 or int(v_idx) != 0 or float(v_on.reshape(-1)[0]) != 1.0 \
        or float(v_off.reshape(-1)[0]) != 0.0:
      return None
    size = g.producer(depth)
    if size is None or size.op != "Size" or g.inputs(size)[0] not in size_of:
      return None
    names = [oh.name, size.name]
    for a in (idx, on, off):
      names += g.const_producers(a)
    return names

  def _shape_of(self, g, t, x):
    s = g.producer(t)
    return s is not None and s.op == "Shape" and g.inputs(s)[0] == x

  def _mask(self, g, mul):
    ins = g.inputs(mul)
    if len(ins) != 2:
      return None
    for x, r in (ins, ins[::-1]):
      rs = g.producer(r)
      if rs is None or rs.op != "Reshape":
        continue
      oh_t, shp_t = g.inputs(rs)
      names = self._one_hot_first(g, oh_t, (x,))
      if names is None or not self._shape_of(g, shp_t, x):
        continue
      shp = g.producer(shp_t).name
      interior = [rs.name, shp] + names
      shareable = set(interior) - {rs.name, g.producer(oh_t).name}
      return x, interior, shareable, "mask"
    return None

  def _flat_mask(self, g, rs):
    ins = g.inputs(rs)
    if len(ins) != 2:
      return None
    mul = g.producer(ins[0])
    if mul is None or mul.op != "Mul" or len(g.inputs(mul)) != 2:
      return None
    for flat_t, oh_t in (g.inputs(mul), g.inputs(mul)[::-1]):
      flat = g.producer(flat_t)
      if flat is None or flat.op != "Reshape":
        continue
      x, shape_t = g.inputs(flat)
      v = _const_list(g, shape_t)
      if v is None or v[0] != [-1]:
        continue
      names = self._one_hot_first(g, oh_t, (x, flat_t))
      if names is None or not self._shape_of(g, ins[1], x):
        continue
      interior = (
          [mul.name, flat.name, g.producer(ins[1]).name] + names +
          g.const_producers(shape_t))
      shareable = set(interior) - {mul.name, g.producer(oh_t).name}
      return x, interior, shareable, "flat mask"
    return None

  def _concat(self, g, cc):
    ins = g.inputs(cc)
    if len(ins) != 3 or _int_attr(cc, "N") not in (0, 2):
      return None
    axis = g.const_value(ins[2])
    if axis is None or axis.size != 1 or int(
        axis.reshape(-1)[0]) not in (0, -1):
      return None
    head = g.producer(ins[0])
    if head is None or head.op != "StridedSlice":
      return None
    x = g.inputs(head)[0]
    if _slice(g, head, x) != "head":
      return None
    xshape = g.shape(x)
    if xshape is None or len(xshape) != 1:
      return None
    zeros = g.producer(ins[1])
    interior = [head.name] + g.const_producers(ins[2])
    for t in g.inputs(head)[1:]:
      interior += g.const_producers(t)
    if zeros is not None and zeros.op == "ZerosLike":
      tail = g.producer(g.inputs(zeros)[0])
      if _slice(g, tail, x) != "tail":
        return None
      interior += [zeros.name, tail.name]
      for t in g.inputs(tail)[1:]:
        interior += g.const_producers(t)
    else:
      v = g.const_value(ins[1])
      if (v is None or xshape[0] < 1 or list(v.shape) != [xshape[0] - 1] or
          v.any()):
        return None
      interior += g.const_producers(ins[1])
    shareable = {n for n in interior if g.node(n).op == "Const"}
    return x, interior, shareable, "concat"

  def _scatter(self, g, sc):
    ins = g.inputs(sc)
    if len(ins) != 3:
      return None
    zeros = g.producer(ins[0])
    if zeros is None or zeros.op != "ZerosLike":
      return None
    x = g.inputs(zeros)[0]
    xshape = g.shape(x)
    if xshape is None or len(xshape) != 1:
      return None
    idx = _const_list(g, ins[1])
    if idx is None or idx[0] != [0] or list(idx[1]) != [1, 1]:
      return None
    head = g.producer(ins[2])
    if _slice(g, head, x) != "head":
      return None
    interior = [zeros.name, head.name] + g.const_producers(ins[1])
    for t in g.inputs(head)[1:]:
      interior += g.const_producers(t)
    shareable = {n for n in interior if g.node(n).op == "Const"}
    return x, interior, shareable, "scatter"
