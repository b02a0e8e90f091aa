"""Run under mpirun (-np 2 or 4) by tests/test_collective.py. Every rank
runs the same checks, in the same order, and compares its results with numpy
(every rank can rebuild every rank's input from the seeds).

    python -m hpc_ops.run -np 2 tests/collective_workers/checks.py [--training]
"""
import sys
import threading
import time

from common import DTYPES, OPS, Checks, as_f64, expect_error, hd, np, tf

import hpc_ops.collective as coll

hd.init()
R, P = hd.rank(), hd.size()
SHAPES = [(), (0,), (7,), (3, 5), (2, 0, 3), (1031,)]


def rank_values(r, dtype, shape, op, salt=0):
  """Rank r's input (float64 or int64 numpy): small integers for integer
  types, normals for floats, values near +-1 for products."""
  seed = [r, DTYPES.index(dtype), OPS.index(op), len(shape), salt]
  rng = np.random.default_rng(seed + list(shape))
  if dtype.is_integer:
    lo, hi = (-3, 4) if op == "product" else (-50, 51)
    return rng.integers(lo, hi, size=shape)
  if op == "product":
    return rng.uniform(0.5, 1.5, size=shape) * rng.choice([-1, 1], size=shape)
  return rng.normal(size=shape) * 4


def rank_tensor(r, dtype, shape, op, salt=0):
  return tf.cast(tf.constant(rank_values(r, dtype, shape, op, salt)), dtype)


def reference(dtype, shape, op, salt=0):
  """The expected allreduce: the ranks' inputs combined in rank order in the
  reduction type (float32 for 16-bit floats), rounded back once."""
  work = {tf.float16: np.float32, tf.bfloat16: np.float32,
          tf.float32: np.float32, tf.float64: np.float64,
          tf.int32: np.int32, tf.int64: np.int64}[dtype]
  xs = [as_f64(rank_tensor(r, dtype, shape, op, salt)).astype(work)
        for r in range(P)]
  combine = {"sum": np.add, "average": np.add, "min": np.minimum,
             "max": np.maximum, "product": np.multiply}[op]
  acc = xs[0].copy()
  for x in xs[1:]:
    acc = combine(acc, x)
  if op == "average":
    if dtype.is_integer:  # truncation toward zero
      acc = (np.sign(acc) * (np.abs(acc) // P)).astype(work)
    else:
      acc = (acc / work(P)).astype(work)
  return as_f64(tf.cast(tf.constant(acc), dtype))


def check_process_info():
  assert P == int(sys.argv[sys.argv.index("--np") + 1]), P
  assert 0 <= R < P
  # One host: the local rank is the rank.
  assert hd.local_rank() == R, (hd.local_rank(), R)
  ranks = hd.allgather(tf.constant([R]), name="info.ranks").numpy()
  assert ranks.tolist() == list(range(P)), ranks


def check_allreduce_eager(dtype):
  for op in OPS:
    for shape in SHAPES:
      x = rank_tensor(R, dtype, shape, op)
      tag = "%s.%s.%s" % (dtype.name, op, shape)
      y = hd.allreduce(x, op=op, name="eager." + tag)
      assert y.dtype == dtype and y.shape == x.shape
      np.testing.assert_array_equal(as_f64(y), reference(dtype, shape, op),
                                    err_msg=tag)


def check_allreduce_function(dtype):
  # All ops and shapes of one dtype issued together: they run concurrently,
  # in any order, and the small ones are fused.
  cases = [(op, shape) for op in OPS for shape in SHAPES]

  @tf.function
  def f(xs):
    return [coll.allreduce(x, op) for x, (op, _) in zip(xs, cases, strict=True)]

  ys = f([rank_tensor(R, dtype, shape, op, salt=1) for op, shape in cases])
  for y, (op, shape) in zip(ys, cases, strict=True):
    np.testing.assert_array_equal(as_f64(y), reference(dtype, shape, op, 1),
                                  err_msg="%s %s %s" % (dtype.name, op, shape))


def check_large():
  # Several pipeline segments per rank (512 KiB to 1 MiB each), unfused, in
  # place (the input is forwarded to the output) and out of place (the
  # caller keeps the input: the peers' results land in the output while
  # this rank's data is still being sent from the input).
  for dtype, n, op, in_place in [(tf.float32, 3_000_017, "sum", True),
                                 (tf.float32, 3_000_017, "sum", False),
                                 (tf.float64, 700_001, "average", True),
                                 (tf.bfloat16, 600_001, "max", True),
                                 (tf.int64, 500_003, "min", True),
                                 (tf.int64, 500_003, "min", False)]:
    x = rank_tensor(R, dtype, (n,), op, salt=2)
    before = as_f64(x)
    y = hd.allreduce(x * 1 if in_place else x, op=op,
                     name="large.%s.%s" % (dtype.name, in_place))
    np.testing.assert_array_equal(as_f64(y), reference(dtype, (n,), op, 2))
    np.testing.assert_array_equal(as_f64(x), before)  # the input is intact


def check_nan_propagates():
  x = np.arange(6, dtype=np.float32)
  if R == P - 1:
    x[2] = np.nan
    x[4] = np.inf
  for op in OPS:
    y = hd.allreduce(tf.constant(x), op=op, name="nan." + op).numpy()
    assert np.isnan(y[2]), (op, y)
    if op in ("sum", "average", "max"):
      assert y[4] == np.inf, (op, y)
    assert not np.isnan(y[[0, 1, 3, 5]]).any(), (op, y)


def check_broadcast():
  root = P - 1
  for dtype in DTYPES:
    for shape in SHAPES:
      x = rank_tensor(R, dtype, shape, "sum", salt=3)
      y = hd.broadcast(x, root, name="bcast.%s.%s" % (dtype.name, shape))
      np.testing.assert_array_equal(
          as_f64(y), as_f64(rank_tensor(root, dtype, shape, "sum", salt=3)))

  @tf.function
  def f(x):
    return coll.broadcast(x, 0), coll.broadcast(x * 2, root)

  a, b = f(tf.fill([5], float(R + 1)))
  np.testing.assert_array_equal(a.numpy(), np.full(5, 1.0))
  np.testing.assert_array_equal(b.numpy(), np.full(5, 2.0 * P))


def gather_rows(r, kind):
  return {"rows": r + 1, "zero_on_0": 0 if r == 0 else 2, "same": 3}[kind]


def check_allgather():
  for dtype in DTYPES:
    for kind, tail in [("rows", (3,)), ("zero_on_0", (2, 2)), ("same", ()),
                       ("rows", (0,))]:
      def part(r):
        return rank_tensor(r, dtype, (gather_rows(r, kind),) + tail, "sum", 4)
      y = hd.allgather(part(R),
                       name="gather.%s.%s.%s" % (dtype.name, kind, tail))
      expect = np.concatenate([as_f64(part(r)) for r in range(P)])
      assert y.shape == expect.shape, (y.shape, expect.shape)
      np.testing.assert_array_equal(as_f64(y), expect)

  @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32)])
  def f(x):
    y = coll.allgather(x)
    assert y.shape.as_list() == [None, 2]  # static shape from the C++ shape fn
    return y

  y = f(tf.fill([R + 1, 2], float(R)))
  expect = np.concatenate([np.full((r + 1, 2), float(r)) for r in range(P)])
  np.testing.assert_array_equal(y.numpy(), expect)


def check_out_of_order():
  # Rank 0 issues a then b, the last rank b then a (the other input is held
  # back by a sleep): the coordinator matches them by name.
  def late(x, delay):
    def sleep(v):
      time.sleep(delay)
      return v
    return tf.py_function(sleep, [x], x.dtype)

  @tf.function
  def f(a, b):
    if R == 0:
      b = late(b, 0.3)
    elif R == P - 1:
      a = late(a, 0.3)
    return (coll.allreduce(a, "sum", name="ooo_a"),
            coll.allreduce(b, "max", name="ooo_b"))

  ya, yb = f(tf.fill([4], float(R)), tf.fill([3], float(R) * 10))
  np.testing.assert_array_equal(ya.numpy(), np.full(4, sum(range(P))))
  np.testing.assert_array_equal(yb.numpy(), np.full(3, 10.0 * (P - 1)))


def check_concurrent_functions():
  """Two different tf.functions whose collectives are unnamed (both nodes are
  "HpcAllreduce"), called at the same time from two threads, in opposite
  orders on even and odd ranks: each call must be combined with the same
  function's call on the other ranks (the default name includes the
  function's name), not with whichever came first."""

  @tf.function
  def scale_gradients(x):
    return coll.allreduce(x, "sum")

  @tf.function
  def sync_statistics(x):
    return coll.allreduce(x, "sum")

  fns = {"a": scale_gradients, "b": sync_statistics}
  base = {"a": 100.0, "b": 10000.0}
  # Trace now: the delays below set the order.
  traced = [fn.get_concrete_function(tf.TensorSpec([8], tf.float32))
            for fn in fns.values()]
  node_names = [op.name for cf in traced for op in cf.graph.get_operations()
                if op.type == "HpcAllreduce"]
  assert node_names == ["HpcAllreduce"] * 2, node_names
  results, errors = {}, []

  def call(key, delay):
    try:
      time.sleep(delay)
      results[key] = fns[key](tf.fill([8], base[key] + R)).numpy()
    except Exception as e:  # noqa: BLE001 - re-raised below
      errors.append(e)

  order = ("a", "b") if R % 2 == 0 else ("b", "a")
  threads = [threading.Thread(target=call, args=(key, 0.4 * i))
             for i, key in enumerate(order)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  for key in fns:
    expect = np.full(8, sum(base[key] + r for r in range(P)), np.float32)
    np.testing.assert_array_equal(results[key], expect, err_msg=key)


def check_fusion():
  # 64 small tensors of three float types issued together fuse into far
  # fewer operations (HPC_OPS_CYCLE_TIME_MS is raised by the test so that
  # a busy machine does not break the batch up).
  dtypes = [tf.float32, tf.float16, tf.bfloat16, tf.float64]

  @tf.function
  def f(xs):
    return [coll.allreduce(x, "sum") for x in xs]

  xs = [rank_tensor(R, dtypes[i % 4], (4096,), "sum", salt=100 + i)
        for i in range(64)]
  f(xs)  # trace
  before = coll.stats()
  ys = f(xs)
  after = coll.stats()
  tensors = after["tensors"] - before["tensors"]
  operations = after["operations"] - before["operations"]
  assert tensors == 64, (before, after)
  assert operations < 64, (before, after)
  for i, y in enumerate(ys):
    np.testing.assert_array_equal(
        as_f64(y), reference(dtypes[i % 4], (4096,), "sum", 100 + i))

  # Separate allreduces whose outputs the runtime allocates when their fused
  # operation starts: one buffer for all when every byte size but the last
  # is a multiple of 64 (reduced in place there), one allocation each
  # otherwise; inputs forwarded in place beside them; the inputs intact.
  for d in (tf.int32, tf.float32, tf.float64):
    per = 64 // d.size
    for k, shapes in enumerate([[(per * 5,), (0,), (per * 300, 3), (7,)],
                                [(per,), (9,), (per * 40,)]]):
      for op in ("sum", "average"):
        xs = [rank_tensor(R, d, s, op, salt=500 + i)
              for i, s in enumerate(shapes)]
        before = [as_f64(x) for x in xs]
        held = tf.function(lambda v, op=op: [
            coll.allreduce(x, op) for x in v])(xs)
        some_forwarded = tf.function(lambda v, op=op: [
            coll.allreduce(x * 1 if i == 1 else x, op)
            for i, x in enumerate(v)])(xs)
        for ys in (held, some_forwarded):
          for i, (y, s) in enumerate(zip(ys, shapes, strict=True)):
            assert y.dtype == d and y.shape == s, (y.dtype, y.shape, d, s)
            np.testing.assert_array_equal(
                as_f64(y), reference(d, s, op, 500 + i),
                err_msg="separate %s %s %s %d" % (op, d.name, s, k))
        for x, b in zip(xs, before):
          np.testing.assert_array_equal(as_f64(x), b)


def check_grouped_allreduce():
  # Every dtype, mixed shapes (empty and scalar included), sum and average,
  # eager and in tf.function: the same results as HpcAllreduce, and 64 small
  # tensors fused into fewer operations with one kernel per dtype.
  for op in ("sum", "average"):
    cases = [(d, shape) for d in DTYPES for shape in SHAPES]
    xs = [rank_tensor(R, d, shape, op, salt=200 + i)
          for i, (d, shape) in enumerate(cases)]
    eager = hd.grouped_allreduce(xs, op=op, name="grouped." + op)
    traced = tf.function(lambda v, op=op: hd.grouped_allreduce(v, op=op))(xs)
    for ys in (eager, traced):
      assert len(ys) == len(xs)
      for i, (y, (d, shape)) in enumerate(zip(ys, cases, strict=True)):
        assert y.dtype == d and y.shape == shape, (y.dtype, y.shape, d, shape)
        np.testing.assert_array_equal(
            as_f64(y), reference(d, shape, op, 200 + i),
            err_msg="%s %s %s" % (op, d.name, shape))

  @tf.function
  def many(v):
    return hd.grouped_allreduce(v, op="sum")

  xs = [rank_tensor(R, tf.float32, (4096,), "sum", salt=300 + i)
        for i in range(64)]
  many(xs)  # trace
  kernels = [n for n in many.get_concrete_function(xs).graph.as_graph_def().node
             if n.op.startswith("Hpc")]
  assert [n.op for n in kernels] == ["HpcGroupedAllreduce"], kernels
  before = coll.stats()
  ys = many(xs)
  after = coll.stats()
  assert after["tensors"] - before["tensors"] == 64, (before, after)
  assert after["operations"] - before["operations"] < 64, (before, after)
  for i, y in enumerate(ys):
    np.testing.assert_array_equal(as_f64(y),
                                  reference(tf.float32, (4096,), "sum", 300 + i))

  # Byte sizes that are multiples of 64: the outputs of inputs held
  # elsewhere tile one buffer, where the tensors are reduced (no unpacking
  # from the fusion buffer), with empty tensors
  # between them, several pipeline segments per rank (2.5 MB in all) and
  # chunk boundaries inside tensors; the inputs stay intact.
  for d in (tf.int32, tf.int64, tf.float32, tf.float64):
    per = 64 // d.size
    shapes = [(3 * per,), (0,), (1001 * per, 2), (0, 4), (37003 * per,), (per,)]
    for op in ("sum", "average"):
      xs = [rank_tensor(R, d, s, op, salt=400 + i) for i, s in enumerate(shapes)]
      before = [as_f64(x) for x in xs]
      eager = hd.grouped_allreduce(xs, op=op, name="tiled.%s.%s" % (d.name, op))
      traced = tf.function(lambda v, op=op: hd.grouped_allreduce(v, op=op))(xs)
      # Inputs that nothing else holds are reduced in place instead: all of
      # them, or every other one.
      forwarded = tf.function(lambda v, op=op: hd.grouped_allreduce(
          [t * 1 for t in v], op=op))(xs)
      mixed = tf.function(lambda v, op=op: hd.grouped_allreduce(
          [t * 1 if i % 2 else t for i, t in enumerate(v)], op=op))(xs)
      for ys in (eager, traced, forwarded, mixed):
        for i, (y, s) in enumerate(zip(ys, shapes, strict=True)):
          assert y.dtype == d and y.shape == s, (y.dtype, y.shape, d, s)
          np.testing.assert_array_equal(
              as_f64(y), reference(d, s, op, 400 + i),
              err_msg="tiled %s %s %s" % (op, d.name, s))
      for x, b in zip(xs, before):
        np.testing.assert_array_equal(as_f64(x), b)


def check_in_place():
  # An allreduce whose input nothing else holds writes its result over that
  # input (the kernel forwards the buffer); one whose input the caller holds
  # does not, and leaves the input intact. Counted by the runtime.
  x = rank_tensor(R, tf.float32, (4096,), "sum", salt=600)
  kept = as_f64(x)
  want = reference(tf.float32, (4096,), "sum", 600)

  @tf.function
  def chain(v):
    v = coll.allreduce(v, "sum")
    for _ in range(2):  # inputs that are intermediates
      v = coll.allreduce(v, "max")
    return [v]

  @tf.function
  def grouped(v):  # v * 2 and v * 4 are intermediates, v is the caller's
    return hd.grouped_allreduce([v * 2, v, v * 4, v], op="sum")

  # (function, allreduced tensors, of them in place, result scales)
  for fn, tensors, in_place, scales in ((chain, 3, 2, [1]),
                                        (grouped, 4, 2, [2, 1, 4, 1])):
    fn(x)  # trace
    before = coll.stats()
    ys = fn(x)
    after = coll.stats()
    assert after["tensors"] - before["tensors"] == tensors, (before, after)
    got = after["in_place"] - before["in_place"]
    assert got == in_place, (fn.__name__, before, after)
    assert len(ys) == len(scales)
    for y, c in zip(ys, scales):  # scaling by 2^k is exact
      np.testing.assert_array_equal(as_f64(y), want * c, err_msg=fn.__name__)
  np.testing.assert_array_equal(as_f64(x), kept)
  before = coll.stats()
  np.testing.assert_array_equal(as_f64(coll.allreduce(x, "sum")), want)
  assert coll.stats()["in_place"] == before["in_place"]  # x is held


def check_mismatch_errors():
  F = tf.errors.FailedPreconditionError
  other = "on rank 1"  # the first rank that disagrees with rank 0
  expect_error(lambda: hd.allreduce(tf.ones([2 + (R > 0)]), name="mm.shape"),
               F, "HpcAllreduce", "'mm.shape'",
               "[2] on rank 0 but [3] " + other)
  expect_error(
      lambda: hd.allreduce(tf.ones([2], tf.float32 if R == 0 else tf.float64),
                           name="mm.dtype"),
      F, "dtype float on rank 0 but double " + other)
  expect_error(lambda: hd.allreduce(tf.ones([2]), op="sum" if R == 0 else "max",
                                    name="mm.op"),
               F, "reduce_op 'sum' on rank 0 but 'max' " + other)
  expect_error(lambda: (hd.allreduce if R == 0 else hd.allgather)(
      tf.ones([2]), name="mm.kind"),
               F, "HpcAllreduce on rank 0 but an HpcAllgather " + other)
  expect_error(lambda: hd.broadcast(tf.ones([2]), 0 if R == 0 else P - 1,
                                    name="mm.root"),
               F, "root_rank 0 on rank 0 but %d %s" % (P - 1, other))
  expect_error(lambda: hd.allgather(tf.ones([2, 3 + (R > 0)]), name="mm.tail"),
               F, "[2,3] on rank 0 but [2,4] " + other,
               "all dimensions but the first")
  # Same name, second call, mismatching again: the call number is named.
  expect_error(lambda: hd.allreduce(tf.ones([1 + R]), name="mm.shape"),
               F, "'mm.shape' (call 1 with this name)")
  # In a tf.function too, and the runtime stays usable afterwards.
  @tf.function
  def g(x):
    return coll.allreduce(x, "sum", name="mm_graph")

  expect_error(lambda: g(tf.ones([3 + R])), F, "[3] on rank 0 but")
  y = hd.allreduce(tf.ones([2]), op="sum", name="mm.after")
  np.testing.assert_array_equal(y.numpy(), [P, P])


def check_bad_inputs():
  InvalidArgument = tf.errors.InvalidArgumentError
  expect_error(lambda: hd.allgather(tf.constant(1.0), name="bad.scalar"),
               InvalidArgument, "rank >= 1")
  expect_error(lambda: hd.broadcast(tf.ones([2]), P, name="bad.root"),
               InvalidArgument, "root_rank %d is out of range" % P)
  try:
    hd.allreduce(tf.ones([2]), op="mean")
  except ValueError as e:
    assert "sum, average, min, max, product" in str(e)
  else:
    raise AssertionError("op='mean' accepted")
  y = hd.allreduce(tf.ones([2]), op="sum", name="bad.after")
  np.testing.assert_array_equal(y.numpy(), [P, P])


# ---------------------------------------------------------------------------
# Gradients: finite differences of the global objective sum_r <w_r, f(x_r)>.


def fd_check(tag, fn, x, w):
  """`fn` is a collective; x, w are this rank's float64 input and weights."""
  x = np.asarray(x, np.float64)

  def objective(xv):
    local = tf.reduce_sum(tf.constant(w) * fn(tf.constant(xv)))
    return float(hd.allreduce(local, "sum", name="fd.%s.total" % tag))

  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    loss = tf.reduce_sum(tf.constant(w) * fn(xt))
  analytic = tape.gradient(loss, xt).numpy()

  @tf.function
  def graph_grad(v):
    with tf.GradientTape() as t:
      t.watch(v)
      value = tf.reduce_sum(tf.constant(w) * fn(v))
    return t.gradient(value, v)

  np.testing.assert_allclose(graph_grad(xt).numpy(), analytic, rtol=1e-12,
                             atol=1e-12)
  sizes = hd.allgather(tf.constant([x.size], tf.int64),
                       name="fd.%s.sizes" % tag).numpy()
  numeric = np.zeros_like(x)
  eps = 1e-6
  for a in range(P):
    for i in range(int(sizes[a])):
      values = []
      for sign in (1, -1):
        xp = x.copy()
        if R == a:
          xp.flat[i] += sign * eps
        values.append(objective(xp))
      if R == a:
        numeric.flat[i] = (values[0] - values[1]) / (2 * eps)
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-6,
                             err_msg=tag)


def check_gradients():
  rng = np.random.default_rng([R, 77])
  x = rng.normal(size=(2, 3))
  w = rng.normal(size=(2, 3))
  for op in OPS:
    xx = rng.uniform(0.5, 1.5, size=(2, 3)) if op == "product" else x
    fd_check(op, lambda v, op=op: coll.allreduce(v, op, name="fd.ar." + op),
             xx, w)
  fd_check("grouped", lambda v: tf.add_n(coll.grouped_allreduce(
      [v, 3 * v], "average", name="fd.grouped")), x, w)
  fd_check("bcast", lambda v: coll.broadcast(v, P - 1, name="fd.bcast"), x, w)
  rows = R + 1
  xg = rng.normal(size=(rows, 2))
  total = sum(r + 1 for r in range(P))
  wg = rng.normal(size=(total, 2))
  fd_check("gather", lambda v: coll.allgather(v, name="fd.gather"), xg, wg)


# ---------------------------------------------------------------------------
# Training helpers.


def check_broadcast_variables():
  a = tf.Variable(np.full((3, 2), float(R)))
  b = tf.Variable(tf.constant([R, R * 2], tf.int64))
  c = tf.Variable(R % 2 == 1)
  d = tf.Variable(tf.constant([R], tf.uint8))
  hd.broadcast_variables([a, b, c, d], root_rank=P - 1)
  np.testing.assert_array_equal(a.numpy(), np.full((3, 2), P - 1.0))
  np.testing.assert_array_equal(b.numpy(), [P - 1, 2 * (P - 1)])
  assert bool(c.numpy()) == ((P - 1) % 2 == 1)
  np.testing.assert_array_equal(d.numpy(), [P - 1])


def check_gradient_tape():
  data = np.random.default_rng(5)
  xs = [data.normal(size=(4, 3)) for _ in range(P)]
  ys = [data.normal(size=(4, 1)) for _ in range(P)]
  w0 = np.random.default_rng([R, 6]).normal(size=(3, 1))  # differs per rank
  w = tf.Variable(w0)
  hd.broadcast_variables([w], 0)
  w_root = np.random.default_rng([0, 6]).normal(size=(3, 1))
  np.testing.assert_array_equal(w.numpy(), w_root)
  per_rank = [2.0 / 4 * xs[q].T @ (xs[q] @ w_root - ys[q]) for q in range(P)]

  def loss_fn():
    return tf.reduce_mean((tf.constant(xs[R]) @ w - tf.constant(ys[R])) ** 2)

  for op, expect in [("average", sum(per_rank) / P), ("sum", sum(per_rank))]:
    with tf.GradientTape() as tape:
      loss = loss_fn()
    (g,) = hd.DistributedGradientTape(tape, op=op).gradient(loss, [w])
    np.testing.assert_allclose(g.numpy(), expect, rtol=1e-12)

  unused = tf.Variable(1.0)

  @tf.function
  def step():
    with hd.DistributedGradientTape(tf.GradientTape()) as tape:
      loss = loss_fn()
    return tape.gradient(loss, {"w": w, "unused": unused})

  grads = step()
  np.testing.assert_allclose(grads["w"].numpy(), sum(per_rank) / P, rtol=1e-12)
  assert grads["unused"] is None

  # Sparse gradients (embedding lookups) are gathered, or made dense.
  table = tf.Variable(np.zeros((6, 2)))
  ids = [np.array([q, q + 1, 5]) for q in range(P)]
  coeff = [np.full((3, 2), q + 1.0) for q in range(P)]
  dense = np.zeros((6, 2))
  for q in range(P):
    np.add.at(dense, ids[q], coeff[q])
  for sparse_as_dense in (False, True):
    with tf.GradientTape() as tape:
      loss = tf.reduce_sum(tf.gather(table, ids[R]) * coeff[R])
    (g,) = hd.DistributedGradientTape(
        tape, sparse_as_dense=sparse_as_dense).gradient(loss, [table])
    assert isinstance(g, tf.IndexedSlices) != sparse_as_dense, type(g)
    np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), dense / P)


def check_keras_fit(run_eagerly):
  import keras  # noqa: PLC0415

  def build():
    return keras.Sequential([keras.Input((5,)),
                             keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])

  keras.utils.set_random_seed(100 + R)  # a different start on every rank
  model = build()
  root_init = [hd.broadcast(v, 0, name="fit.init.%d.%d" % (run_eagerly, i))
               .numpy() for i, v in enumerate(model.get_weights())]
  optimizer = hd.DistributedOptimizer(keras.optimizers.Adam(0.01))
  assert type(optimizer).__name__ == "Adam"
  model.compile(optimizer=optimizer, loss="mse", jit_compile=False,
                run_eagerly=run_eagerly)
  data = np.random.default_rng(8)
  x = data.normal(size=(16 * P, 5)).astype(np.float32)
  y = data.normal(size=(16 * P, 1)).astype(np.float32)
  shard = slice(16 * R, 16 * (R + 1))
  model.fit(x[shard], y[shard], batch_size=16, epochs=3, shuffle=False,
            verbose=0, callbacks=[hd.BroadcastGlobalVariablesCallback(0)])
  flat = np.concatenate([v.reshape(-1) for v in model.get_weights()])
  everyone = hd.allgather(tf.constant(flat[None]),
                          name="fit.final.%d" % run_eagerly).numpy()
  for q in range(P):  # bit-identical on every rank
    np.testing.assert_array_equal(everyone[q], flat)
  # Same as one process training on the whole batch from the root's start.
  ref = build()
  ref.set_weights(root_init)
  ref.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
              jit_compile=False)
  ref.fit(x, y, batch_size=16 * P, epochs=3, shuffle=False, verbose=0)
  expect = np.concatenate([v.reshape(-1) for v in ref.get_weights()])
  np.testing.assert_allclose(flat, expect, rtol=2e-4, atol=2e-5)
  assert not np.allclose(flat, np.concatenate(
      [v.reshape(-1) for v in root_init])), "training did not move"


def check_keras_fit_mixed_float16():
  """Under mixed_float16 Keras checks the gradients for overflow (a loss-scale
  optimizer) and skips the steps that overflowed. Rank 0's targets are large
  enough that its float16 gradients overflow while rank 1's do not: the
  check must see the combined gradients, so that every rank skips the same
  steps and the weights stay identical."""
  import keras  # noqa: PLC0415
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    keras.utils.set_random_seed(5)  # the same start on every rank
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(1, dtype="float32")])
    start = np.concatenate([v.reshape(-1) for v in model.get_weights()])
    optimizer = hd.DistributedOptimizer(keras.optimizers.SGD(0.001))
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    assert model.optimizer is optimizer, type(model.optimizer)
    data = np.random.default_rng(9)
    x = data.normal(size=(16, 5)).astype(np.float32)
    y = data.normal(size=(16, 1)).astype(np.float32) * (300.0 if R == 0 else 1.0)
    model.fit(x, y, batch_size=16, epochs=10, shuffle=False, verbose=0)
    scale = float(optimizer.dynamic_scale.numpy())
    flat = np.concatenate([v.reshape(-1) for v in model.get_weights()])
    everyone = hd.allgather(tf.constant(np.append(flat, scale)[None]),
                            name="fit.mixed.final").numpy()
    for q in range(P):  # the same steps skipped, the same weights everywhere
      np.testing.assert_array_equal(everyone[q], np.append(flat, scale))
    assert scale < 2.0 ** 15, scale  # rank 0's overflow lowered the scale
    assert np.isfinite(flat).all() and not np.array_equal(flat, start)
  finally:
    keras.mixed_precision.set_global_policy("float32")


def check_keras_fit_mixed_float16_table():
  """The same with a SparseEmbedding whose pushes are allgathered (a table
  replicated on every rank, as examples/ctr_train.py does): the push learns
  the loss scale, skips the steps that overflowed on any rank together with
  the optimizer, and the replicas stay bit-identical."""
  import keras  # noqa: PLC0415

  from hpc_ops.layers import SparseEmbedding  # noqa: PLC0415

  def replicated(keys, grads):
    return (hd.allgather(keys, name="fit.mixed.keys"),
            hd.allgather(grads / float(P), name="fit.mixed.grads"))

  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    keras.utils.set_random_seed(6)
    inp = keras.Input((3,), dtype="int64")
    emb = SparseEmbedding(4, combiner="sum", optimizer="adagrad",
                          learning_rate=0.05, push_transform=replicated)
    model = keras.Model(inp, keras.layers.Dense(1, dtype="float32")(emb(inp)))
    optimizer = hd.DistributedOptimizer(keras.optimizers.SGD(0.001))
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    data = np.random.default_rng(10 + R)  # each rank its own ids
    ids = data.integers(0, 40, size=(16, 3)).astype(np.int64)
    y = data.normal(size=(16, 1)).astype(np.float32) * (300.0 if R == 0 else 1.0)
    model.fit(ids, y, batch_size=16, epochs=10, shuffle=False, verbose=0)
    snap = emb.table.export()
    order = np.argsort(snap.keys.numpy())
    state = np.concatenate([
        snap.keys.numpy()[order].astype(np.float64),
        snap.values.numpy()[order].reshape(-1).astype(np.float64),
        snap.slots.numpy()[order].reshape(-1).astype(np.float64),
        [float(snap.step.numpy()), float(optimizer.dynamic_scale.numpy())]])
    sizes = hd.allgather(tf.constant([state.size]), name="fit.mixed.n").numpy()
    assert (sizes == state.size).all(), sizes
    everyone = hd.allgather(tf.constant(state[None]),
                            name="fit.mixed.table").numpy()
    for q in range(P):  # the same rows, slots, pushes and scale everywhere
      np.testing.assert_array_equal(everyone[q], state)
    steps, scale = int(snap.step.numpy()), float(optimizer.dynamic_scale.numpy())
    skipped = int(np.log2(2.0 ** 15 / scale))
    assert skipped > 0 and steps == 10 - skipped, (steps, scale)
    assert np.isfinite(snap.values.numpy()).all()
  finally:
    keras.mixed_precision.set_global_policy("float32")


def main():
  checks = Checks()
  checks.run("process_info", check_process_info)
  for dtype in DTYPES:
    checks.run("allreduce_eager_" + dtype.name, check_allreduce_eager, dtype)
    checks.run("allreduce_function_" + dtype.name, check_allreduce_function,
               dtype)
  checks.run("large", check_large)
  checks.run("nan_propagates", check_nan_propagates)
  checks.run("broadcast", check_broadcast)
  checks.run("allgather", check_allgather)
  checks.run("out_of_order", check_out_of_order)
  checks.run("concurrent_functions", check_concurrent_functions)
  checks.run("fusion", check_fusion)
  checks.run("grouped_allreduce", check_grouped_allreduce)
  checks.run("in_place", check_in_place)
  checks.run("mismatch_errors", check_mismatch_errors)
  checks.run("bad_inputs", check_bad_inputs)
  checks.run("gradients", check_gradients)
  if "--training" in sys.argv:
    checks.run("broadcast_variables", check_broadcast_variables)
    checks.run("gradient_tape", check_gradient_tape)
    checks.run("keras_fit", check_keras_fit, False)
    checks.run("keras_fit_eager", check_keras_fit, True)
    checks.run("keras_fit_mixed_float16", check_keras_fit_mixed_float16)
    checks.run("keras_fit_mixed_float16_table",
               check_keras_fit_mixed_float16_table)
  checks.finish()


if __name__ == "__main__":
  main()
