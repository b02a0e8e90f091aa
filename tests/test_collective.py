"""collective: MPI allreduce/broadcast/allgather and hpc_ops.distributed.

In-process tests run as a job of one process (no mpirun). The multi-process
tests launch worker scripts (tests/collective_workers/) with hpc_ops.run on
loopback, 2 and 4 processes, and parse their `CHECK name rank=r PASS|FAIL`
lines; a killed or stopped rank must make the others fail within
HPC_OPS_TIMEOUT_SECONDS. Every launch bounds its own wait and kills its whole
process tree on timeout.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(REPO, "tests", "collective_workers")

if shutil.which("mpicc") is None:  # ./configure.sh skipped the family
  pytest.skip("no MPI: the collective ops are not built",
              allow_module_level=True)
import hpc_ops.collective as coll  # noqa: E402
import hpc_ops.distributed as hd  # noqa: E402
from hpc_ops import gen_collective_ops  # noqa: E402
from hpc_ops import run as hpc_run  # noqa: E402

DTYPES = [tf.int32, tf.int64, tf.float16, tf.bfloat16, tf.float32, tf.float64]
OPS = ["sum", "average", "min", "max", "product"]
HAVE_MPIRUN = shutil.which("mpirun") is not None
needs_mpirun = pytest.mark.skipif(not HAVE_MPIRUN, reason="mpirun not found")


# ---------------------------------------------------------------------------
# One process (size 1).


def test_single_process_info():
  assert hd.rank() == 0 and hd.size() == 1 and hd.local_rank() == 0
  assert int(gen_collective_ops.hpc_size()) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 0, 3), (3, 4)], ids=str)
def test_single_process_ops_are_identities(dtype, shape):
  x = tf.cast(tf.reshape(tf.range(int(np.prod(shape)), dtype=tf.float32) - 3,
                         shape), dtype)
  for op in OPS:
    y = hd.allreduce(x, op=op, name="single.%s" % op)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y.numpy(), x.numpy())
  np.testing.assert_array_equal(hd.broadcast(x, 0).numpy(), x.numpy())
  if shape:
    np.testing.assert_array_equal(hd.allgather(x).numpy(), x.numpy())


def test_single_process_tf_function_and_shapes():
  @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
  def f(x):
    a = coll.allreduce(x, "sum")
    b = coll.broadcast(x, 0)
    c = coll.allgather(x)
    assert a.shape.as_list() == [None, 3] and b.shape.as_list() == [None, 3]
    assert c.shape.as_list() == [None, 3]
    return a, b, c

  x = tf.reshape(tf.range(6.0), [2, 3])
  for y in f(x):
    np.testing.assert_array_equal(y.numpy(), x.numpy())


@pytest.mark.parametrize("which", ["allreduce_sum", "allreduce_average",
                                   "allreduce_max", "allreduce_product",
                                   "broadcast", "allgather"])
def test_single_process_gradients_match_numerical(which):
  fn = {
      "allreduce_sum": lambda x: coll.allreduce(x, "sum", name="g1"),
      "allreduce_average": lambda x: coll.allreduce(x, "average", name="g2"),
      "allreduce_max": lambda x: coll.allreduce(x, "max", name="g3"),
      "allreduce_product": lambda x: coll.allreduce(x, "product", name="g4"),
      "broadcast": lambda x: coll.broadcast(x, 0, name="g5"),
      "allgather": lambda x: coll.allgather(x, name="g6"),
  }[which]
  x = tf.constant(np.random.default_rng(1).uniform(0.5, 2, size=(3, 2)))
  theoretical, numerical = tf.test.compute_gradient(fn, [x])
  np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-8)
  np.testing.assert_allclose(theoretical[0], np.eye(6), atol=1e-12)


def _allreduce_attrs(concrete):
  """(node name, function_name) of every HpcAllreduce in a concrete function,
  its control-flow bodies included."""
  graph_def = concrete.graph.as_graph_def()
  nodes = list(graph_def.node)
  for fdef in graph_def.library.function:
    nodes += list(fdef.node_def)
  return sorted((n.name, n.attr["function_name"].s.decode()) for n in nodes
                if n.op == "HpcAllreduce")


def test_default_names_include_the_function_name():
  """Inside tf.function the matching name is `function name:node name`; the
  function name must not depend on per-process counters (control-flow
  bodies are named "while_body_<n>") or on the input shapes."""

  @tf.function
  def train_step(x):
    a = coll.allreduce(x, "sum")

    def body(i, v):
      return i + 1, coll.allreduce(v, "max")

    _, b = tf.while_loop(lambda i, v: i < 2, body, [0, a])
    return tf.cond(b[0] > 0, lambda: coll.allreduce(b, "min"), lambda: b)

  for n in (3, 5):  # a retrace for another shape: the same names
    attrs = _allreduce_attrs(
        train_step.get_concrete_function(tf.TensorSpec([n], tf.float32)))
    assert [a[1] for a in attrs] == ["train_step"] * 3, attrs
  np.testing.assert_array_equal(train_step(tf.ones([3])).numpy(), np.ones(3))

  @tf.function
  def other(x):
    return coll.allreduce(x, "sum")

  assert _allreduce_attrs(other.get_concrete_function(
      tf.TensorSpec([3], tf.float32))) == [("HpcAllreduce", "other")]

  class Graph:  # TF names the gradient of a tf.function called eagerly so
    building_function = True
    outer_graph = None

    def __init__(self, name):
      self.name = name

  assert coll._function_name(Graph("__backward_other_1234")) == \
      "__backward_other"
  assert coll._function_name(Graph("step_2")) == "step_2"
  assert coll._function_name(tf.Graph()) == ""  # TF1-style graphs
  with tf.Graph().as_default():
    op = coll.allreduce(tf.ones([2]), "sum").op
    assert op.get_attr("function_name") == b"" and op.name == "HpcAllreduce"


def test_single_process_bad_inputs():
  with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 1"):
    gen_collective_ops.hpc_allgather(tf.constant(3.0), tensor_name="s")
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="root_rank 1 is out of range for a job of 1"):
    gen_collective_ops.hpc_broadcast(tf.ones([2]), root_rank=1,
                                     tensor_name="b")
  with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
    gen_collective_ops.hpc_broadcast(tf.ones([2]), root_rank=-1,
                                     tensor_name="b")
  with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
    gen_collective_ops.hpc_allreduce(tf.ones([2]), reduce_op="mean")
  with pytest.raises(ValueError, match="sum, average, min, max, product"):
    hd.allreduce(tf.ones([2]), op="mean")
  for bad in (tf.constant(["a"]), tf.constant([True]),
              tf.constant([1], tf.uint8)):
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError,
                        tf.errors.NotFoundError)):
      gen_collective_ops.hpc_allreduce(bad)

  @tf.function
  def scalar_gather(x):
    return coll.allgather(x)

  with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                     match="rank"):
    scalar_gather(tf.constant(1.0))


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES),
       shape=st.lists(st.integers(0, 4), max_size=4),
       op=st.sampled_from(OPS),
       name=st.text(max_size=12),
       root=st.integers(-2, 3),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_generated_wrappers(dtype, shape, op, name, root, seed):
  """Random types, shapes (empty included), names (any text, '#' included)
  and roots through the generated wrappers, which skip Python's checks:
  a correct result or a clean InvalidArgumentError, never a crash."""
  x = tf.cast(tf.constant(np.random.default_rng(seed).normal(size=shape) * 9),
              dtype)
  y = gen_collective_ops.hpc_allreduce(x, reduce_op=op, tensor_name=name)
  np.testing.assert_array_equal(y.numpy(), x.numpy())
  if shape:
    g = gen_collective_ops.hpc_allgather(x, tensor_name=name)
    np.testing.assert_array_equal(g.numpy(), x.numpy())
  else:
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 1"):
      gen_collective_ops.hpc_allgather(x, tensor_name=name)
  if root == 0:
    b = gen_collective_ops.hpc_broadcast(x, root_rank=root, tensor_name=name)
    np.testing.assert_array_equal(b.numpy(), x.numpy())
  else:
    with pytest.raises(tf.errors.InvalidArgumentError, match="root_rank"):
      gen_collective_ops.hpc_broadcast(x, root_rank=root, tensor_name=name)


def test_distributed_helpers_single_process():
  v = tf.Variable([1.0, 2.0])
  assert hd.broadcast_variables([v], 0) is None
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(v * v)
  (g,) = hd.DistributedGradientTape(tape).gradient(loss, [v])
  np.testing.assert_allclose(g.numpy(), [2.0, 4.0])
  with pytest.raises(ValueError, match="'sum' or 'average'"):
    hd.DistributedGradientTape(tape, op="max")
  s = hd.allreduce(tf.IndexedSlices(tf.ones([2, 2]), tf.constant([0, 3]),
                                    tf.constant([5, 2])), op="sum")
  assert isinstance(s, tf.IndexedSlices)
  np.testing.assert_array_equal(s.indices.numpy(), [0, 3])


def test_keras_helpers_single_process():
  import keras
  opt = hd.DistributedOptimizer(keras.optimizers.SGD(0.1))
  assert isinstance(opt, keras.optimizers.SGD)
  assert type(opt).__name__ == "SGD"
  config = keras.optimizers.serialize(opt)
  assert config["class_name"] == "SGD"
  with pytest.raises(TypeError, match="keras.optimizers.Optimizer"):
    hd.DistributedOptimizer("sgd")
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  model.compile(optimizer=opt, loss="mse", jit_compile=False)
  x = np.ones((4, 2), np.float32)
  model.fit(x, np.ones((4, 1), np.float32), verbose=0,
            callbacks=[hd.BroadcastGlobalVariablesCallback(0)])
  jit = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
  jit.compile(optimizer="sgd", loss="mse", jit_compile=True)
  with pytest.raises(ValueError, match="jit_compile=False"):
    jit.fit(x, np.ones((4, 1), np.float32), verbose=0,
            callbacks=[hd.BroadcastGlobalVariablesCallback(0)])


def test_callback_refuses_loss_scaling_around_the_allreduce():
  """A DistributedOptimizer made before the mixed_float16 policy was set
  gets wrapped by compile in a LossScaleOptimizer that checks each
  process's own gradients: the callback refuses it, naming the fix, which
  then trains."""
  import keras
  x, y = np.ones((4, 2), np.float32), np.ones((4, 1), np.float32)
  early = hd.DistributedOptimizer(keras.optimizers.SGD(0.1))
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=early, loss="mse", jit_compile=False)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    with pytest.raises(ValueError, match=r"DistributedOptimizer\(keras."
                       r"optimizers.LossScaleOptimizer\(optimizer\)\)"):
      model.fit(x, y, verbose=0,
                callbacks=[hd.BroadcastGlobalVariablesCallback(0)])
    fixed = hd.DistributedOptimizer(keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0))  # no overflow
    model.compile(optimizer=fixed, loss="mse", jit_compile=False)
    before = model.get_weights()[0].copy()
    model.fit(x, y, verbose=0,
              callbacks=[hd.BroadcastGlobalVariablesCallback(0)])
    assert not np.array_equal(model.get_weights()[0], before)
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_import_without_the_library(fresh_python):
  """`import hpc_ops` works without _collective_ops.so (a build without
  MPI); hpc_ops.distributed explains itself on use."""
  proc = fresh_python("""
      import sys
      sys.modules["hpc_ops.gen_collective_ops"] = None  # as if never built
      import hpc_ops, hpc_ops.distributed as hd
      try:
        hd.rank()
      except ImportError as e:
        print("ERROR:", e)
  """)
  assert "ERROR: hpc_ops: the collective ops (_collective_ops.so) are not " \
         "built" in proc.stdout
  assert "apt-get install libopenmpi-dev openmpi-bin" in proc.stdout


@pytest.mark.parametrize("cpus,env,spinning", [
    ("one", {}, False),            # bound to one CPU: spinning off
    ("one", {"HPC_OPS_TF_SPINNING": "1"}, True),  # opted out
    ("all", {}, True),             # several CPUs: TensorFlow's default
    ("one, after an op", {}, True),  # the context had started: left alone
])
def test_pool_spinning_is_off_in_a_process_on_one_cpu(fresh_python, cpus,
                                                      env, spinning):
  proc = fresh_python("""
      import os
      if %r.startswith("one"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
      import tensorflow as tf
      if %r.endswith("after an op"):
        tf.constant(1) + 1
      import hpc_ops.distributed as hd
      from tensorflow.python.eager import context
      cfg = context.context().config
      print("SPIN_OFF", cfg.experimental.disable_thread_spinning)
      print("SUM", float(hd.allreduce(tf.ones([3]), op="sum")[0]))
  """ % (cpus, cpus), env=env)
  assert "SPIN_OFF %s" % (not spinning) in proc.stdout, proc.stdout
  assert "SUM 1.0" in proc.stdout, proc.stdout


def test_launcher_command_line():
  cmd = hpc_run.mpirun_command(4, ["train.py", "--x", "1"], status_dir="/s")
  joined = " ".join(cmd)
  assert cmd[:4] == ["mpirun", "-np", "4", "--oversubscribe"]
  assert "--mca orte_abort_on_non_zero_status 0" in joined
  assert "--mca btl_tcp_if_include lo" in joined
  assert joined.endswith("--rank-shim /s -- %s train.py --x 1"
                         % sys.executable)
  remote = " ".join(hpc_run.mpirun_command(2, ["t.py"], hosts="a:1,b:1"))
  assert "-H a:1,b:1" in remote and "if_include lo" not in remote
  plain = hpc_run.mpirun_command(2, ["t.py"])
  assert plain[-2:] == [sys.executable, "t.py"]


def test_settings_are_validated(fresh_python):
  proc = fresh_python("""
      import tensorflow as tf
      import hpc_ops.distributed as hd
      for attempt in range(2):  # the same error again, no hang at exit
        try:
          hd.allreduce(tf.ones([1]))
        except tf.errors.InvalidArgumentError as e:
          print("ERROR:", e.message)
  """, env={"HPC_OPS_TIMEOUT_SECONDS": "soon", "HPC_OPS_MPI": "2"})
  assert proc.stdout.count("HPC_OPS_TIMEOUT_SECONDS='soon' is not a number "
                           ">= 0.001") == 2, proc.stdout
  proc = fresh_python("""
      import tensorflow as tf
      import hpc_ops.distributed as hd
      try:
        hd.init()
      except tf.errors.InvalidArgumentError as e:
        print("ERROR:", e.message)
  """, env={"HPC_OPS_MPI": "2"})
  assert "HPC_OPS_MPI='2' must be 0 or 1" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------
# Several processes, launched by hpc_ops.run.


def launch(np_, args, env=None, timeout=240, as_module=False):
  """Runs a worker on np_ processes; returns (returncode, output, seconds).
  On timeout the whole process tree is killed and the test fails; so it does
  if any process of this launch outlives it."""
  if as_module:
    cmd = [sys.executable, "-m", "hpc_ops.run"]
  else:
    cmd = [sys.executable, hpc_run.__file__]
  # A mark on this launch's command lines (the workers ignore it), to find
  # its processes and no one else's.
  token = "launch-%s" % uuid.uuid4().hex
  cmd += ["-np", str(np_)] + args + ["--launch-id", token]
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
  t0 = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=full_env,
                          cwd=REPO, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGTERM)  # mpirun stops its ranks
    try:
      out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, _ = proc.communicate()
    pytest.fail("launch did not finish within %d s:\n%s"
                % (timeout, out[-8000:]))
  elapsed = time.time() - t0
  left = leftover_processes(token)
  for line in left:
    try:
      os.kill(int(line.split()[0]), signal.SIGKILL)
    except ProcessLookupError:
      pass
  assert not left, "processes outlived the launch:\n%s" % "\n".join(left)
  return proc.returncode, out, elapsed


def leftover_processes(marker):
  """Processes whose command line mentions `marker` (a worker path). Reads
  /proc rather than running ps: procps' ps deadlocks in textdomain() when
  the ASan runtime is preloaded (tools/asan_test.sh)."""
  found = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      with open("/proc/%s/cmdline" % pid, "rb") as f:
        args = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # the process just exited
      continue
    if marker in args:
      found.append("%s %s" % (pid, args.strip()))
  return found


CHECKS = ["process_info"] + [
    "allreduce_%s_%s" % (mode, d.name) for d in DTYPES
    for mode in ("eager", "function")] + [
    "large", "nan_propagates", "broadcast", "allgather", "out_of_order",
    "concurrent_functions", "fusion", "grouped_allreduce", "mismatch_errors", "bad_inputs", "gradients"]
TRAINING_CHECKS = ["broadcast_variables", "gradient_tape", "keras_fit",
                   "keras_fit_eager", "keras_fit_mixed_float16",
                   "keras_fit_mixed_float16_table"]
# Generous fusion window: the fusion check must not depend on how busy the
# machine is.
CHECK_ENV = {"HPC_OPS_CYCLE_TIME_MS": "50", "HPC_OPS_TIMEOUT_SECONDS": "60"}


@pytest.fixture(scope="module")
def checks_np2():
  if not HAVE_MPIRUN:
    pytest.skip("mpirun not found")
  worker = os.path.join(WORKERS, "checks.py")
  return launch(2, [worker, "--np", "2", "--training"], env=CHECK_ENV,
                as_module=True)


@pytest.fixture(scope="module")
def checks_np4():
  if not HAVE_MPIRUN:
    pytest.skip("mpirun not found")
  worker = os.path.join(WORKERS, "checks.py")
  return launch(4, [worker, "--np", "4"], env=CHECK_ENV)


def assert_check(result, name, nprocs):
  rc, out, _ = result
  for r in range(nprocs):
    line = "CHECK %s rank=%d " % (name, r)
    assert line + "PASS" in out, (
        "%s did not pass on rank %d (launch rc=%d):\n%s"
        % (name, r, rc, out[-12000:]))


@pytest.mark.parametrize("name", CHECKS + TRAINING_CHECKS)
def test_two_processes(checks_np2, name):
  assert_check(checks_np2, name, 2)


@pytest.mark.parametrize("name", CHECKS)
def test_four_processes(checks_np4, name):
  assert_check(checks_np4, name, 4)


def test_launches_exit_cleanly(checks_np2, checks_np4):
  for rc, out, _ in (checks_np2, checks_np4):
    assert rc == 0, out[-5000:]
    assert "FAIL" not in out


def parse_results(out, tag):
  results = {}
  for m in re.finditer(r"^%s rank=(\d+) error=(\w+)(?: elapsed=([\d.]+) "
                       r"message=(.*))?$" % tag, out, re.M):
    results[int(m.group(1))] = (m.group(2), float(m.group(3) or 0),
                                m.group(4) or "")
  return results


FAILURE_TIMEOUT = 2.0


@needs_mpirun
@pytest.mark.parametrize("mode,np_,victim", [("kill", 3, 1), ("kill", 2, 0),
                                             ("stop", 2, 1)],
                         ids=["kill_worker", "kill_coordinator", "stop"])
def test_dead_or_silent_rank_fails_the_others(mode, np_, victim):
  worker = os.path.join(WORKERS, "failures.py")
  rc, out, _ = launch(np_, [worker, mode, str(victim)], timeout=180,
                      env={"HPC_OPS_TIMEOUT_SECONDS": str(FAILURE_TIMEOUT)})
  assert rc != 0, out
  assert out.count("FIRST rank=") == np_, out
  results = parse_results(out, "RESULT")
  later = parse_results(out, "LATER")
  survivors = [r for r in range(np_) if r != victim]
  for r in survivors:
    assert r in results, "rank %d reported nothing:\n%s" % (r, out)
    error, elapsed, message = results[r]
    assert error == "DeadlineExceededError", out
    assert "HPC_OPS_TIMEOUT_SECONDS=%g s" % FAILURE_TIMEOUT in message, out
    # Within the timeout (+1 s of grace when the coordinator is the one
    # that vanished), with slack for a busy machine; never a hang.
    assert elapsed < FAILURE_TIMEOUT + 6, out
    if mode == "stop" or victim != 0:
      assert "rank(s) %d did not submit it" % victim in message, out
    else:
      assert "no answer from the coordinator (rank 0)" in message, out
    # Every later collective fails at once with the same error.
    assert later[r][0] == "DeadlineExceededError" and later[r][1] < 1, out
  if mode == "kill":
    assert "hpc_ops.run: rank %d was killed by SIGKILL" % victim in out, out
  else:
    # The silent rank learns about the failure and fails fast itself.
    assert results[victim][0] == "DeadlineExceededError", out
    assert results[victim][1] < 1, out
  for r in survivors:
    assert "hpc_ops.run: rank %d exited with status 3" % r in out, out
