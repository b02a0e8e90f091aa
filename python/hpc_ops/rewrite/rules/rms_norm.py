"""rms_norm rule: RMSNorm subgraphs -> one `RmsNorm` op.

Matched, anchored at the reduction (every variant in any order of the
commutative operands):

  xs^2          Square(xs) | Mul(xs, xs) | Pow(xs, 2)
  mean          Mean(xs^2, axis, keep_dims=True)
                | Sum(...) then RealDiv/Div by D or Mul by 1/D
  + eps         AddV2/Add(mean, eps)           eps a positive constant
  inverse       Rsqrt(.) | Pow(., -0.5) | Reciprocal/Inv(Sqrt(.))
                | RealDiv(1, Sqrt(.))
  normalise     Mul(xs, inverse) | RealDiv/Div(xs, Sqrt(.))
                (or the same applied to Mul(xs, gamma): gamma first)
  tail          optional Cast back to x's dtype, optional Mul by gamma,
                in either order

where axis is the last axis only (-1, or rank-1 with the rank known) and
gamma has shape [D], D = x's last dimension. Keras 3 `RMSNormalization`
exports exactly this (with Cast to float32 around it for float16/bfloat16
inputs); so do `x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), -1,
keepdims=True) + eps) * gamma` and the Sum/N, 1/Sqrt and gamma-first
spellings.

Replacement: `RmsNorm(x, gamma)` with attrs T, U (float, double for T=double)
and epsilon; the node takes the name of the pattern's last node, whose
readers now read its output 0. When xs is Cast(x: half/bfloat16 -> float)
and the result is cast back to x's dtype, the casts are absorbed: RmsNorm
runs on x itself (T=half/bfloat16, statistics in float inside the op). A
gamma computed in float32 from a half/bfloat16 variable (Keras'
Cast(ReadVariableOp)) is read before its cast; any other float32 gamma is
cast to T by an added Cast node. Without gamma, a Const of ones is added.
"""
import numpy as np
from tensorflow.core.framework import types_pb2

from hpc_ops.rewrite import core

OP = "RmsNorm"
FLOATS = (types_pb2.DT_HALF, types_pb2.DT_BFLOAT16, types_pb2.DT_FLOAT,
          types_pb2.DT_DOUBLE)
_DTYPE_NAMES = {
    types_pb2.DT_HALF: "half",
    types_pb2.DT_BFLOAT16: "bfloat16",
    types_pb2.DT_FLOAT: "float",
    types_pb2.DT_DOUBLE: "double"
}


def dtype_name(dt):
  return _DTYPE_NAMES.get(dt, types_pb2.DataType.Name(dt))


def _consumers(g, t, ops):
  return [c for c in g.data_consumers(t) if c.op in ops]


def _other(g, node, t):
  """For a binary node reading t, its other operand (None if t is read
  twice or not at all)."""
  ins = g.inputs(node)
  if len(ins) != 2 or ins.count(t) != 1:
    return None
  return ins[1] if ins[0] == t else ins[0]


def _is_const(g, t, value, rtol=1e-6):
  v = g.const_value(t)
  if v is None or v.size != 1 or v.dtype.kind not in "fiu":
    return False
  return abs(float(v.reshape(-1)[0]) - value) <= rtol * abs(value)


def _square_operand(g, sq):
  """xs when node `sq` computes xs^2, else None."""
  ins = g.inputs(sq)
  if sq.op == "Square" and len(ins) == 1:
    return ins[0]
  if sq.op == "Mul" and len(ins) == 2 and ins[0] == ins[1]:
    return ins[0]
  if sq.op == "Pow" and len(ins) == 2 and _is_const(g, ins[1], 2.0):
    return ins[0]
  return None


class RmsNormRule(core.Rule):
  name = "rms_norm"
  emits = (OP,)

  def match(self, g, node):
    if node.op not in ("Mean", "Sum") or len(g.inputs(node)) != 2:
      return None
    red = node
    sq_t, axis_t = g.inputs(red)
    sq = g.producer(sq_t)
    if sq is None:
      return None
    xs = _square_operand(g, sq)
    if xs is None:
      return None
    cdt = g.attr_type(red, "T")
    if cdt not in FLOATS:
      return None
    interior = [sq.name, red.name]
    shareable = set()

    def consts(t):
      names = g.const_producers(t)
      interior.extend(names)
      shareable.update(names)

    if sq.op == "Pow":
      consts(g.inputs(sq)[1])
    stat = g.output(red)
    count = None  # (kind, value) of the Sum's normalisation
    if red.op == "Sum":
      for c in _consumers(g, stat, ("RealDiv", "Div", "Mul")):
        other = _other(g, c, stat)
        if other is None or (c.op != "Mul" and g.inputs(c)[0] != stat):
          continue
        v = g.const_value(other)
        if v is not None and v.size == 1:
          count = (c.op, float(v.reshape(-1)[0]))
          interior.append(c.name)
          consts(other)
          stat = g.output(c)
          break
      if count is None:
        return None
    add = None
    for c in _consumers(g, stat, ("AddV2", "Add")):
      if _other(g, c, stat) is not None:
        add = c
        break
    if add is None:
      if _consumers(g, stat, ("Rsqrt", "Sqrt")):
        return core.NoMatch("there is no epsilon added to the mean of squares "
                            "(RmsNorm needs epsilon > 0)")
      return None
    eps_t = _other(g, add, stat)
    interior.append(add.name)
    add_t = g.output(add)

    # The inverse RMS (inv) or the RMS to divide by (rms).
    inv = rms = None
    for c in g.data_consumers(add_t):
      if c.op == "Rsqrt":
        inv = c
      elif c.op == "Pow" and g.inputs(c)[0] == add_t and _is_const(
          g,
          g.inputs(c)[1], -0.5):
        inv = c
        consts(g.inputs(c)[1])
      elif c.op == "Sqrt":
        rms = c
      else:
        continue
      break
    if inv is None and rms is None:
      return None
    # Recognised from here on: refusals are reported.
    # Checks on the reduction.
    xshape = g.shape(xs)
    rank = None if xshape is None else len(xshape)
    if rank == 0:
      return core.NoMatch("x is a scalar")
    if not (red.attr["keep_dims"].b if "keep_dims" in red.attr else False):
      return core.NoMatch("the reduction drops the axis (keepdims=False)")
    axes = g.const_value(axis_t)
    if axes is None or axes.dtype.kind not in "iu":
      return core.NoMatch("the reduction axis is not a constant")
    consts(axis_t)
    axes = [int(a_) for a_ in axes.reshape(-1)]
    if len(axes) != 1:
      return core.NoMatch("the reduction is over axes %s, not only the last "
                          "axis" % axes)
    if axes[0] != -1 and (rank is None or axes[0] != rank - 1):
      return core.NoMatch(
          "the reduction axis %d is not the last axis (rank %s)" %
          (axes[0], "unknown" if rank is None else rank))
    normalise = gamma_first = None
    if rms is not None:
      interior.append(rms.name)
      rms_t = g.output(rms)
      for c in g.data_consumers(rms_t):
        ins = g.inputs(c)
        if c.op in ("Reciprocal", "Inv") and len(ins) == 1:
          inv = c
          break
        if c.op in ("RealDiv", "Div") and len(ins) == 2 and ins[1] == rms_t:
          if _is_const(g, ins[0], 1.0):
            inv = c
            consts(ins[0])
            break
          normalise = (c, ins[0])
          break
    if inv is not None:
      interior.append(inv.name)
      inv_t = g.output(inv)
      for c in _consumers(g, inv_t, ("Mul",)):
        other = _other(g, c, inv_t)
        if other is not None:
          normalise = (c, other)
          if other == xs:
            break
    if normalise is None:
      return core.NoMatch("the RMS statistic %r is not applied to x by a Mul "
                          "or a division" % (inv or rms).name)
    n_node, a = normalise
    if a != xs:
      # gamma first: (xs * gamma) * inv
      pa = g.producer(a)
      if pa is None or pa.op != "Mul" or _other(g, pa, xs) is None:
        return core.NoMatch("the RMS statistic scales %r, not the squared "
                            "input %r" % (g.ref(a), g.ref(xs)))
      gamma_first = _other(g, pa, xs)
      interior.append(pa.name)
    interior.append(n_node.name)

    depth = xshape[-1] if xshape and xshape[-1] > 0 else None
    if count is not None:
      if depth is None:
        return core.NoMatch("the sum of squares is divided by a constant but "
                            "x's last dimension is unknown")
      want = depth if count[0] != "Mul" else 1.0 / depth
      if abs(count[1] - want) > 1e-6 * want:
        return core.NoMatch("the sum of squares is scaled by %g, not by 1/%d "
                            "(not a mean)" % (count[1], depth) if count[0] ==
                            "Mul" else "the sum of squares is divided by %g, "
                            "not by the last dimension %d" % (count[1], depth))
    eps = g.const_value(eps_t)
    if eps is None:
      src = g.producer(eps_t)
      if src is not None and src.op in ("Const", "Identity") and \
          g.const_producers(eps_t) and \
          g.node(g.const_producers(eps_t)[-1]).op == "Const":
        return core.NoMatch("epsilon %r is not a readable scalar constant" %
                            g.ref(eps_t))
      return core.NoMatch(
          "epsilon is not a constant (it is %r, %s)" %
          (g.ref(eps_t),
           "a %s" % src.op if src is not None else "a function argument"))
    if eps.size != 1 or eps.dtype.kind != "f" or (eps.ndim > (
        rank if rank is not None else 1)):
      return core.NoMatch("epsilon %r is not a scalar" % g.ref(eps_t))
    eps = float(eps.reshape(-1)[0])
    if not np.isfinite(eps) or eps <= 0.0:
      return core.NoMatch("epsilon is %r; RmsNorm needs a finite epsilon > 0" %
                          eps)
    consts(eps_t)

    # The tail: an optional Cast back to x's dtype and the gamma Mul.
    xs_node = g.producer(xs)
    narrow = None  # x's own dtype when xs = Cast(x)
    if (xs_node is not None and xs_node.op == "Cast" and
        g.attr_type(xs_node, "DstT") == cdt and
        g.attr_type(xs_node, "SrcT") in FLOATS and
        g.attr_type(xs_node, "SrcT") != cdt and not g.control_inputs(xs_node)):
      narrow = g.attr_type(xs_node, "SrcT")
    out = n_node
    out_t = g.output(n_node)
    cur = cdt
    cast_back = None
    gamma = (gamma_first, cdt) if gamma_first is not None else None
    if gamma is not None and not _gamma_ok(g, gamma_first, depth):
      return core.NoMatch("gamma %r does not have shape [%s] (x's last "
                          "dimension)" % (g.ref(gamma_first), depth or "?"))
    for _ in range(2):
      c = g.sole_consumer(out_t)
      if c is None:
        break
      if (c.op == "Cast" and narrow is not None and cast_back is None and
          g.attr_type(c, "SrcT") == cur and g.attr_type(c, "DstT") == narrow):
        cast_back = c
        cur = narrow
      elif (c.op == "Mul" and gamma is None and g.attr_type(c, "T") == cur and
            _gamma_ok(g, _other(g, c, out_t), depth)):
        gamma = (_other(g, c, out_t), cur)
      else:
        break
      interior.append(out.name)
      out, out_t = c, g.output(c)

    if cast_back is not None:
      tdt, x = narrow, g.inputs(xs_node)[0]
      interior.append(xs_node.name)
      shareable.add(xs_node.name)
    else:
      tdt, x = cdt, xs
    extra = []
    device = out.device
    if gamma is None:
      if depth is None:
        return core.NoMatch("there is no gamma and x's last dimension is "
                            "unknown (RmsNorm needs a gamma of that length)")
      ones = core.const_node(g.unique_name(out.name + "/ones_gamma"),
                             np.ones([depth], np.float64), tdt, device)
      extra.append(ones)
      gamma_t = core.new_output(g, ones)
      gamma_desc = "ones"
    else:
      gamma_t, gdt = gamma
      gamma_desc = repr(g.ref(gamma_t))
      if gdt != tdt:
        gnode = g.producer(gamma_t)
        if (gnode is not None and gnode.op == "Cast" and
            g.attr_type(gnode, "SrcT") == tdt and
            g.attr_type(gnode, "DstT") == gdt and not g.control_inputs(gnode)):
          interior.append(gnode.name)
          shareable.add(gnode.name)
          gamma_t = g.inputs(gnode)[0]
          gamma_desc = repr(g.ref(gamma_t))
        else:
          cast = core.make_node(
              g.unique_name(out.name + "/gamma_cast"), "Cast", [g.ref(gamma_t)],
              {
                  "SrcT": core.attr_type(gdt),
                  "DstT": core.attr_type(tdt),
                  "Truncate": core.attr_value_pb2.AttrValue(b=False)
              }, device)
          extra.append(cast)
          gamma_t = core.new_output(g, cast)
          gamma_desc += " cast to %s" % dtype_name(tdt)

    udt = (types_pb2.DT_DOUBLE
           if tdt == types_pb2.DT_DOUBLE else types_pb2.DT_FLOAT)
    yshape = g.shape(x)
    if yshape is None:
      yshape = g.shape(out_t)
    new = core.make_node(
        out.name, OP, [g.ref(x), g.ref(gamma_t)], {
            "T":
                core.attr_type(tdt),
            "U":
                core.attr_type(udt),
            "epsilon":
                core.attr_float(eps),
            "_output_shapes":
                core.attr_shapes(
                    [yshape, None if yshape is None else yshape[:-1]]),
        }, device)
    new_out = core.new_output(g, new, 0, default_arg="y")
    return core.Match(rule=self.name,
                      output=out.name,
                      new_node=new,
                      output_map={out_t: new_out},
                      interior=interior,
                      shareable=shareable,
                      extra_nodes=extra,
                      detail="RmsNorm(T=%s, epsilon=%g) of %r, gamma %s" %
                      (dtype_name(tdt), eps, g.ref(x), gamma_desc))


def _gamma_ok(g, t, depth):
  """gamma must be a rank-1 tensor of x's (known) last dimension."""
  if t is None or depth is None:
    return False
  shape = g.shape(t)
  return shape is not None and shape == [depth]
