"""Data-parallel training across processes with hpc_ops' MPI collectives.

Start N copies of a script with `python -m hpc_ops.run -np N script.py`
(or plain mpirun, see hpc_ops.run); without a launcher everything works as a
job of one process.

    import hpc_ops.distributed as hd
    hd.init()
    ds = ds.shard(hd.size(), hd.rank())

    # Custom loop
    with tf.GradientTape() as tape:
      loss = ...
    tape = hd.DistributedGradientTape(tape)      # gradients averaged
    grads = tape.gradient(loss, model.trainable_variables)

    # Keras 3 model.fit
    model.compile(optimizer=hd.DistributedOptimizer(keras.optimizers.Adam()),
                  loss=..., jit_compile=False)
    model.fit(ds, callbacks=[hd.BroadcastGlobalVariablesCallback(0)])

This module imports without the collective library (a build without MPI);
its functions then raise ImportError saying how to get it. Matching of calls
across processes, fusion and timeouts: see hpc_ops.collective and
docs/collective.md.
"""
import os

import tensorflow as tf

__all__ = [
    "init", "shutdown", "rank", "size", "local_rank", "allreduce",
    "grouped_allreduce",
    "broadcast", "allgather", "broadcast_variables", "DistributedGradientTape",
    "DistributedOptimizer",
    "BroadcastGlobalVariablesCallback",  # noqa: F822 (module __getattr__)
]


def _quiet_pool_threads():
  """Turns off the spinning of TensorFlow's thread pools in a process that
  may run on one CPU only (mpirun binds each of N processes on N cores to
  one core): a pool thread that spins while it waits for work takes that
  CPU from the collectives' runtime thread and TensorFlow's executor (2
  processes on a 2-vCPU VM: a chained 4 KB allreduce 41-49 us instead of
  50-60 us, 64 KB 54-59 us instead of 64-84 us; docs/collective.md).
  TensorFlow reads the setting only when its eager context starts, so this
  is done at import and only if no TensorFlow op has run yet;
  HPC_OPS_TF_SPINNING=1 keeps TensorFlow's default."""
  if os.environ.get("HPC_OPS_TF_SPINNING", "") not in ("", "0"):
    return
  try:
    if len(os.sched_getaffinity(0)) != 1:
      return
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.python.eager import context
    ctx = context.context()
    if ctx._initialized:  # pylint: disable=protected-access
      return
    config = config_pb2.ConfigProto()
    if ctx._config is not None:  # pylint: disable=protected-access
      config.CopyFrom(ctx._config)  # pylint: disable=protected-access
    config.experimental.disable_thread_spinning = True
    ctx._config = config  # pylint: disable=protected-access
  except (AttributeError, ImportError, OSError):
    pass  # another TensorFlow's internals: leave its default


_quiet_pool_threads()


def _ops():
  """hpc_ops.collective, imported on first use (ImportError without MPI)."""
  from hpc_ops import collective
  return collective


def init():
  """Initialises MPI (on the runtime's background thread) and waits until
  every process is connected. Optional: the first collective does it too."""
  _ops().size()


def shutdown():
  """Finalises MPI; later collectives fail. Runs by itself at exit."""
  _ops().shutdown()


def rank():
  """This process's rank, 0 <= rank() < size()."""
  return _ops().rank()


def size():
  """The number of processes in the job (1 without a launcher)."""
  return _ops().size()


def local_rank():
  """This process's rank among the processes of its host."""
  return _ops().local_rank()


def allreduce(tensor, op="average", name=None):
  """Combines `tensor` across processes ("average", "sum", "min", "max",
  "product"). A tf.IndexedSlices is gathered instead (indices and values
  concatenated over processes; "average" divides the values by size());
  only "sum" and "average" apply to it."""
  ops = _ops()
  if isinstance(tensor, tf.IndexedSlices):
    if op not in ("sum", "average"):
      raise ValueError("hpc_ops: op=%r is not defined for IndexedSlices; use "
                       "'sum' or 'average', or convert to a dense tensor" % op)
    prefix = name or "allreduce"
    values = ops.allgather(tensor.values, name=prefix + ".values")
    indices = ops.allgather(tensor.indices, name=prefix + ".indices")
    if op == "average":
      values = values / tf.cast(ops.size(), values.dtype)
    return tf.IndexedSlices(values, indices, tensor.dense_shape)
  return ops.allreduce(tensor, op=op, name=name)


def grouped_allreduce(tensors, op="average", name=None):
  """allreduce() of a list of tensors, one op per dtype (see
  hpc_ops.collective.grouped_allreduce); IndexedSlices entries are gathered
  as allreduce() does."""
  tensors = list(tensors)
  dense = [i for i, t in enumerate(tensors)
           if not isinstance(t, tf.IndexedSlices)]
  out = list(tensors)
  reduced = _ops().grouped_allreduce([tensors[i] for i in dense], op=op,
                                     name=name)
  for i, r in zip(dense, reduced, strict=True):
    out[i] = r
  for i, t in enumerate(tensors):
    if isinstance(t, tf.IndexedSlices):
      out[i] = allreduce(t, op=op, name=None if name is None else
                         "%s.slices%d" % (name, i))
  return out


def broadcast(tensor, root_rank=0, name=None):
  """The `root_rank` process's `tensor`, on every process."""
  return _ops().broadcast(tensor, root_rank=root_rank, name=name)


def allgather(tensor, name=None):
  """The processes' tensors concatenated along dimension 0 (rank order)."""
  return _ops().allgather(tensor, name=name)


# ---------------------------------------------------------------------------
# Variables and gradients.


def _broadcast_value(value, root_rank, name):
  """broadcast() for any numeric or bool type (cast through a supported
  one when needed)."""
  ops = _ops()
  value = tf.convert_to_tensor(value)
  if value.dtype in ops.DTYPES:
    return ops.broadcast(value, root_rank, name=name)
  if value.dtype.is_integer or value.dtype == tf.bool:
    wide = ops.broadcast(tf.cast(value, tf.int64), root_rank, name=name)
    return tf.cast(wide, value.dtype)
  if value.dtype.is_floating:
    wide = ops.broadcast(tf.cast(value, tf.float64), root_rank, name=name)
    return tf.cast(wide, value.dtype)
  raise TypeError("hpc_ops: cannot broadcast a variable of type %s"
                  % value.dtype.name)


def _read(variable):
  value = getattr(variable, "value", None)  # keras.Variable -> tf.Variable
  if value is not None and not callable(value):
    return tf.convert_to_tensor(value)
  return tf.convert_to_tensor(variable)


def broadcast_variables(variables, root_rank=0):
  """Assigns the `root_rank` process's values to `variables` (tf.Variable or
  keras.Variable) on every process. Every process must pass the same list
  in the same order. Returns None eagerly, a grouped op in graph mode."""
  variables = list(variables)
  updates = []
  for i, v in enumerate(variables):
    value = _broadcast_value(_read(v), root_rank,
                             name="broadcast_variables.%d" % i)
    updates.append(v.assign(value))
  if tf.executing_eagerly():
    return None
  return tf.group(*updates)


def _reduce_all(grads, op, sparse_as_dense):
  """One grouped allreduce per dtype for the dense gradients (one kernel
  instead of one per variable); IndexedSlices are gathered."""
  if sparse_as_dense:
    grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
             for g in grads]
  return grouped_allreduce(grads, op=op)


_eager_reducers = {}


def _allreduce_gradients(grads, op, sparse_as_dense):
  """allreduce() of every non-None entry of the list `grads`. Eagerly, the
  collectives are issued from one tf.function so that they run concurrently
  (and fuse) instead of one round trip each."""
  index = [i for i, g in enumerate(grads) if g is not None]
  if not index:
    return list(grads)
  values = [grads[i] for i in index]
  if tf.executing_eagerly():
    key = (op, sparse_as_dense)
    if key not in _eager_reducers:

      def reduce_gradients(vs):
        return _reduce_all(vs, op, sparse_as_dense)

      # The function's name is part of its collectives' names: one per key,
      # so that two tapes with different settings never mix.
      reduce_gradients.__name__ = "hpc_ops_reduce_gradients_%s%s" % (
          op, "_sparse_as_dense" if sparse_as_dense else "")
      _eager_reducers[key] = tf.function(reduce_gradients,
                                         reduce_retracing=True)
    reduced = _eager_reducers[key](values)
  else:
    reduced = _reduce_all(values, op, sparse_as_dense)
  out = list(grads)
  for i, r in zip(index, reduced, strict=True):
    out[i] = r
  return out


class DistributedGradientTape:
  """Wraps a tf.GradientTape: gradient() returns gradients combined across
  processes (averaged by default). None gradients stay None; IndexedSlices
  are gathered (or made dense first with sparse_as_dense=True). Everything
  else is delegated to the wrapped tape.

      with tf.GradientTape() as tape:
        loss = ...
      grads = DistributedGradientTape(tape).gradient(loss, variables)
  """

  def __init__(self, tape, op="average", sparse_as_dense=False):
    if op not in ("sum", "average"):
      raise ValueError("hpc_ops: DistributedGradientTape op must be 'sum' or "
                       "'average', got %r" % op)
    self._tape = tape
    self._op = op
    self._sparse_as_dense = sparse_as_dense

  def gradient(self, target, sources, output_gradients=None,
               unconnected_gradients=tf.UnconnectedGradients.NONE):
    grads = self._tape.gradient(target, sources,
                                output_gradients=output_gradients,
                                unconnected_gradients=unconnected_gradients)
    flat = tf.nest.flatten(grads)
    reduced = _allreduce_gradients(flat, self._op, self._sparse_as_dense)
    return tf.nest.pack_sequence_as(grads, reduced)

  def __enter__(self):
    self._tape.__enter__()
    return self

  def __exit__(self, *exc):
    return self._tape.__exit__(*exc)

  def __getattr__(self, name):
    return getattr(self._tape, name)


# ---------------------------------------------------------------------------
# Keras 3.

_distributed_classes = {}


def DistributedOptimizer(optimizer, op="average",  # noqa: N802 (Horovod name)
                         sparse_as_dense=False):
  """Makes a Keras 3 optimizer combine gradients across processes before it
  applies them (in `apply`, which `apply_gradients` and `model.fit` use).

  The optimizer is changed in place and returned. Its class keeps its name,
  so saved models and configs load as the plain optimizer. With the same
  initial weights (BroadcastGlobalVariablesCallback) every process applies
  bit-identical averaged gradients, so the weights stay identical. Compile
  the model with jit_compile=False: XLA cannot compile the MPI ops.

  Under the mixed_float16 dtype policy the optimizer is first wrapped in a
  keras.optimizers.LossScaleOptimizer, which is returned: its check for
  gradients that overflowed then sees the combined gradients, so every
  process skips the same steps. (Keras's compile would otherwise wrap the
  optimizer itself, around the combining, and a process whose own
  gradients overflowed would skip a step the others combine.) A
  LossScaleOptimizer passed in is used as it is, for the same reason.
  """
  import keras
  if not isinstance(optimizer, keras.optimizers.Optimizer):
    raise TypeError("hpc_ops: DistributedOptimizer needs a keras.optimizers."
                    "Optimizer, got %r" % (optimizer,))
  if op not in ("sum", "average"):
    raise ValueError("hpc_ops: DistributedOptimizer op must be 'sum' or "
                     "'average', got %r" % op)
  if (keras.config.dtype_policy().name == "mixed_float16" and
      not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)):
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  base = type(optimizer)
  if not getattr(base, "_hpc_ops_distributed", False):
    if base not in _distributed_classes:

      def apply(self, grads, trainable_variables=None):
        grads = _allreduce_gradients(list(grads), self._hpc_ops_op,
                                     self._hpc_ops_sparse_as_dense)
        return base.apply(self, grads, trainable_variables)

      _distributed_classes[base] = type(base.__name__, (base,), {
          "apply": apply,
          "_hpc_ops_distributed": True,
          "__module__": base.__module__,
          "__qualname__": base.__qualname__,
          "__doc__": base.__doc__,
      })
    optimizer.__class__ = _distributed_classes[base]
  optimizer._hpc_ops_op = op
  optimizer._hpc_ops_sparse_as_dense = sparse_as_dense
  return optimizer


def _combines_after_loss_scaling(optimizer):
  """True for a LossScaleOptimizer around a DistributedOptimizer (what
  Keras's compile makes of a DistributedOptimizer created before the
  mixed_float16 policy was set, or for a model with its own mixed policy)."""
  import keras
  inner = getattr(optimizer, "inner_optimizer", None)
  return (isinstance(optimizer, keras.optimizers.LossScaleOptimizer) and
          not getattr(type(optimizer), "_hpc_ops_distributed", False) and
          getattr(type(inner), "_hpc_ops_distributed", False))


def _make_callback_class():
  import keras

  class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """At the start of training, copies the `root_rank` process's model
    weights and optimizer state to every process (so that all start from
    the same point)."""

    def __init__(self, root_rank=0):
      super().__init__()
      self.root_rank = root_rank
      self._done = False

    def on_train_begin(self, logs=None):
      if self._done:
        return
      if getattr(self.model, "jit_compile", False):
        raise ValueError(
            "hpc_ops: compile the model with jit_compile=False; XLA cannot "
            "compile the MPI collectives of hpc_ops.distributed")
      optimizer = getattr(self.model, "optimizer", None)
      if _combines_after_loss_scaling(optimizer):
        raise ValueError(
            "hpc_ops: the model's LossScaleOptimizer wraps a "
            "DistributedOptimizer, so each process checks only its own "
            "gradients for overflow, and one that skips a step leaves the "
            "others' allreduce waiting. Compile with DistributedOptimizer("
            "keras.optimizers.LossScaleOptimizer(optimizer)) instead (what "
            "DistributedOptimizer does itself when the mixed_float16 policy "
            "is set before it is called)")
      variables = list(self.model.weights)
      if optimizer is not None:
        variables += list(optimizer.variables)
      broadcast_variables(variables, self.root_rank)
      self._done = True

  return BroadcastGlobalVariablesCallback


def __getattr__(name):
  # Keras is imported only when its helpers are used (PEP 562).
  if name == "BroadcastGlobalVariablesCallback":
    cls = _make_callback_class()
    globals()[name] = cls
    return cls
  raise AttributeError("module %r has no attribute %r" % (__name__, name))
