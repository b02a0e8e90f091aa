"""The collective op family: allreduce, broadcast and allgather across the
processes of an MPI job, with their gradients.

These are the thin op wrappers; `hpc_ops.distributed` builds the training
helpers on them (and is the module to import: it works, and explains itself,
even where the collective library was not built). Importing this module loads
`_collective_ops.so`, registers the gradients and arranges for MPI to be shut
down at interpreter exit.

Matching calls across processes: every call has a name, and the k-th call
with a name on one process is combined with the k-th call with that name on
the others, in whatever order differently named calls are issued. Inside
`tf.function` (graph mode) the name is the traced function's name and the
op's node name ("train_step:HpcAllreduce_3"), so nothing needs to be passed:
it is the same on every process that traced the same code, and different
functions running at the same time from several threads do not mix. In
eager mode the name is `name` or the op's default ("allreduce", "broadcast",
"allgather"): every process must issue the same sequence of eager calls per
name, and calls made concurrently from several Python threads must use
distinct names.
"""
import atexit
import ctypes
import re

import tensorflow as tf

try:
  from hpc_ops import gen_collective_ops
except ModuleNotFoundError as e:  # the library was not built
  raise ImportError(
      "hpc_ops: the collective ops (_collective_ops.so) are not built, "
      "because ./configure.sh found no MPI. Install Open MPI (Debian/Ubuntu: "
      "apt-get install libopenmpi-dev openmpi-bin), then run ./configure.sh "
      "and tools/dev.sh build collective (or reinstall hpc_ops).") from e

from hpc_ops import _loader

REDUCE_OPS = ("sum", "average", "min", "max", "product")
# The types the collectives move; other types are cast by hpc_ops.distributed.
DTYPES = (tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32, tf.float64)


def _shutdown_at_exit():
  path = _loader.LOADED.get(gen_collective_ops.__name__, (None,))[0]
  if path:
    ctypes.CDLL(path).HpcCollectiveShutdown()


# MPI_Finalize must run (on the runtime's own thread) before the process
# exits, or mpirun reports the process as failed.
atexit.register(_shutdown_at_exit)


def shutdown():
  """Finalises MPI now; later collectives fail with AbortedError."""
  _shutdown_at_exit()


def stats():
  """Counters of this process's runtime since it started:
    operations: data operations completed;
    tensors: the collectives they carried (more tensors than operations
      means that fusion packed several tensors into one operation);
    in_place: non-empty allreduces whose result was written over their own
      input buffer (TensorFlow let the kernel forward the input, because
      nothing else held it)."""
  path = _loader.LOADED[gen_collective_ops.__name__][0]
  out = (ctypes.c_int64 * 3)()
  ctypes.CDLL(path).HpcCollectiveStats(out)
  return {"operations": out[0], "tensors": out[1], "in_place": out[2]}


_info = {}


def _process_info(key, op):
  # Constant for the life of the process: evaluate once, eagerly, also when
  # called while a tf.function is being traced.
  if key not in _info:
    with tf.init_scope():
      _info[key] = int(op())
  return _info[key]


def rank():
  """This process's rank, 0 <= rank() < size(). Initialises MPI."""
  return _process_info("rank", gen_collective_ops.hpc_rank)


def size():
  """The number of processes (1 without mpirun). Initialises MPI."""
  return _process_info("size", gen_collective_ops.hpc_size)


def local_rank():
  """This process's rank among the processes on its host."""
  return _process_info("local_rank", gen_collective_ops.hpc_local_rank)


def _check_op(op):
  if op not in REDUCE_OPS:
    raise ValueError("hpc_ops: op must be one of %s, got %r"
                     % (", ".join(REDUCE_OPS), op))
  return op


def _is_control_flow_graph(graph):
  # The bodies of tf.cond, tf.switch_case and tf.while_loop (and of their
  # gradients) are traced into graphs of these classes.
  return any(c.__name__ in ("CondBranchFuncGraph", "WhileCondFuncGraph",
                            "WhileBodyFuncGraph", "ControlFlowFuncGraph")
             for c in type(graph).__mro__)


def _function_name(graph):
  """The name of the tf.function being traced into `graph`, the same on
  every process that traces the same code ("" outside tf.function).

  Not derived from anything that counts traces or graphs in this process
  (processes may trace in different orders): control-flow bodies are named
  "while_body_<counter>", so the enclosing function's name is used (their
  ops' node names carry the loop or branch at run time); TF's own graphs,
  such as the gradient of a tf.function called eagerly
  ("__backward_step_<counter>"), lose the counter. Nor from the input
  signature: a retrace for a smaller last batch must still match the
  other processes' collectives."""
  while graph is not None and _is_control_flow_graph(graph):
    graph = getattr(graph, "outer_graph", None)
  if graph is None or not getattr(graph, "building_function", False):
    return ""
  name = str(graph.name)
  if name.startswith("__"):
    name = re.sub(r"_\d+$", "", name)
  return name


def _call(fn, inputs, name, default_name, **attrs):
  """Runs the generated wrapper `fn` (which converts `inputs`) with the
  matching name: `name or default_name` eagerly; in graph mode the
  function's name and the node name (unique in the graph)."""
  if tf.executing_eagerly():
    return fn(inputs, tensor_name=name or default_name, **attrs)
  function_name = _function_name(tf.compat.v1.get_default_graph())
  return fn(inputs, name=name, function_name=function_name, **attrs)


def allreduce(tensor, op="average", name=None):
  """Combines `tensor` element-wise across processes; every process gets the
  result.

  Args:
    tensor: int32, int64, float16, bfloat16, float32 or float64; the same
      shape and type on every process.
    op: "average" (default), "sum", "min", "max" or "product". Integer
      averages truncate toward zero; 16-bit floats are reduced in float32.
    name: the matching name in eager mode (see the module docstring); the op
      name in graph mode (prefixed with the function's name to match).
  """
  return _call(gen_collective_ops.hpc_allreduce, tensor, name, "allreduce",
               reduce_op=_check_op(op))


def grouped_allreduce(tensors, op="average", name=None):
  """allreduce() of a list of tensors in one op per dtype: the tensors are
  handed to MPI together (fused when they fit the fusion buffer) and
  TensorFlow schedules and completes one kernel instead of one per tensor,
  which matters for many small tensors (a model's gradients). An input that
  nothing else holds is reduced in place; the results of the others that
  are fused into one operation share one buffer (so that the reduction can
  work in it directly), which is freed when the last of them is.

  Args:
    tensors: a list of tensors of the allreduce types (shapes and dtypes may
      differ from one entry to the next; each must be the same on every
      process).
    op: "average" (default) or "sum"; other reductions fall back to one
      allreduce() per tensor.
    name: the matching name in eager mode (entries of the k-th dtype group
      use "<name>.<k>/<i>"); in graph mode the op's name.
  Returns:
    The list of reduced tensors, in order.
  """
  tensors = [tf.convert_to_tensor(t) for t in tensors]
  if op not in ("sum", "average"):
    return [allreduce(t, op, name=None if name is None else
                      "%s.%d" % (name, i)) for i, t in enumerate(tensors)]
  groups = {}
  for i, t in enumerate(tensors):
    groups.setdefault(t.dtype, []).append(i)
  out = [None] * len(tensors)
  for k, index in enumerate(groups.values()):
    reduced = _call(gen_collective_ops.hpc_grouped_allreduce,
                    [tensors[i] for i in index],
                    None if name is None else "%s.%d" % (name, k),
                    "grouped_allreduce.%d" % k, reduce_op=op)
    for i, r in zip(index, reduced, strict=True):
      out[i] = r
  return out


def broadcast(tensor, root_rank=0, name=None):
  """Returns the `root_rank` process's `tensor` on every process (same shape
  and type everywhere)."""
  return _call(gen_collective_ops.hpc_broadcast, tensor, name, "broadcast",
               root_rank=root_rank)


def allgather(tensor, name=None):
  """Concatenates the processes' tensors along dimension 0, in rank order.
  The first dimension may differ per process."""
  return _call(gen_collective_ops.hpc_allgather, tensor, name, "allgather")


# ---------------------------------------------------------------------------
# Gradients. With data parallelism every process computes a loss L_r from the
# same collective output y; the gradient of the global loss sum_r L_r with
# respect to this process's input is what each rule below returns.


def _grad_name(op, suffix):
  """Eager gradients need a matching name: the forward op's, plus a suffix.
  In graph mode the gradient ops' node names are used (None)."""
  if not tf.executing_eagerly():
    return None
  base = op.get_attr("tensor_name")
  if isinstance(base, bytes):
    base = base.decode()
  return "%s.%s" % (base or op.type, suffix)


def _dense(grad):
  return tf.convert_to_tensor(grad)


@tf.RegisterGradient("HpcAllreduce")
def _allreduce_grad(op, grad):
  """sum/average: the same allreduce of the gradient. min/max: the summed
  gradient goes to the process(es) holding the extremum, split evenly among
  ties. product: the summed gradient times the product of the other
  processes' inputs (exact with zeros)."""
  reduce_op = op.get_attr("reduce_op")
  if isinstance(reduce_op, bytes):
    reduce_op = reduce_op.decode()
  grad = _dense(grad)
  if reduce_op in ("sum", "average"):
    return allreduce(grad, reduce_op, name=_grad_name(op, "grad"))
  x, y = op.inputs[0], op.outputs[0]
  total = allreduce(grad, "sum", name=_grad_name(op, "grad"))
  if reduce_op in ("min", "max"):
    hit = tf.cast(tf.equal(x, y), grad.dtype)
    ties = allreduce(hit, "sum", name=_grad_name(op, "ties"))
    return total * hit / tf.maximum(ties, tf.ones_like(ties))
  # product: d y / d x_r = prod_{q != r} x_q.
  xs = allgather(tf.expand_dims(x, 0), name=_grad_name(op, "inputs"))
  others = (tf.math.cumprod(xs, axis=0, exclusive=True) *
            tf.math.cumprod(xs, axis=0, exclusive=True, reverse=True))
  return total * tf.gather(others, gen_collective_ops.hpc_rank())


@tf.RegisterGradient("HpcGroupedAllreduce")
def _grouped_allreduce_grad(op, *grads):
  """The same grouped allreduce of the gradients (zeros for outputs that
  received none)."""
  reduce_op = op.get_attr("reduce_op")
  if isinstance(reduce_op, bytes):
    reduce_op = reduce_op.decode()
  grads = [tf.zeros_like(y) if g is None else _dense(g)
           for g, y in zip(grads, op.outputs, strict=True)]
  return _call(gen_collective_ops.hpc_grouped_allreduce, grads,
               _grad_name(op, "grad"), None, reduce_op=reduce_op)


@tf.RegisterGradient("HpcBroadcast")
def _broadcast_grad(op, grad):
  """Every process's output is the root's input: the root gets the sum of
  the gradients, the other processes zeros."""
  grad = _dense(grad)
  total = allreduce(grad, "sum", name=_grad_name(op, "grad"))
  is_root = tf.equal(gen_collective_ops.hpc_rank(), op.get_attr("root_rank"))
  return tf.where(is_root, total, tf.zeros_like(total))


@tf.RegisterGradient("HpcAllgather")
def _allgather_grad(op, grad):
  """This process's rows of the summed gradient."""
  grad = _dense(grad)
  total = allreduce(grad, "sum", name=_grad_name(op, "grad"))
  x = op.inputs[0]
  rows = allgather(tf.shape(x, out_type=tf.int64)[:1],
                   name=_grad_name(op, "rows"))
  me = tf.cast(gen_collective_ops.hpc_rank(), tf.int64)
  begin = tf.reduce_sum(rows[:me])
  return tf.gather(total, tf.range(begin, begin + rows[me]))


tf.no_gradient("HpcRank")
tf.no_gradient("HpcSize")
tf.no_gradient("HpcLocalRank")
