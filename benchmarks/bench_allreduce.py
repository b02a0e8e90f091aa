"""Allreduce across 2 processes on loopback: hpc_ops vs the MPI limit (mpi4py
Allreduce on the same buffers), Horovod (when importable) and TensorFlow's
own cross-process collective (MultiWorkerMirroredStrategy on 127.0.0.1).

    python benchmarks/bench_allreduce.py [--quick] [--np 2]

Run it as a plain script: it launches every peer itself (mpirun for the MPI
peers, TF_CONFIG subprocesses for TensorFlow), first with the default
allocators, then again with TF_CPU_ALLOCATOR_USE_BFC=true and
MALLOC_MMAP_THRESHOLD_=1073741824 (no fresh pages for big buffers; see
benchmarks/bench_util.py), and prints one Markdown table per setting.

Workload: float32 SUM of 4 KB ... 64 MB tensors, plus 64 tensors of 16 KB
issued together vs one 1 MB tensor. Each figure is the time per allreduce on
rank 0 (every call synchronises the ranks): the median over blocks of
back-to-back calls, then the median over rounds (--rounds, default 3; the
peers take turns in each round, so load from other processes hits all of
them alike):
  hpc_ops tf.function   one allreduce per tf.function call (the training
                        path: dispatch included)
  hpc_ops eager         one allreduce per eager op call (no tf.function:
                        the op's own dispatch, without a function call's)
  hpc_ops chained       K dependent allreduces inside one tf.function, per
                        allreduce (dispatch amortised)
  paired                mpi4py Allreduce, hpc_ops tf.function, eager and
                        chained in the same pair of processes, taking turns
                        block by block, with an empty tf.function call on
                        the same input (what a call costs without any
                        collective); ratios per block (this VM has periods
                        of tens of seconds in which memory-bound steps, MPI's
                        too, run several times slower, so peers measured in
                        separate processes can land in different periods)
  mpi4py                comm.Allreduce(x, y) on preallocated numpy buffers
  Horovod               hvd.allreduce in a tf.function, one per call
  TF collective         replica_ctx.all_reduce under MultiWorkerMirrored-
                        Strategy, one per tf.function call
bandwidth ratio = mpi4py time / hpc_ops time (>= 0.9 wanted from 1 MB up).
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_util  # noqa: E402

SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 1 << 20, 16 << 20]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824",
              "MALLOC_TRIM_THRESHOLD_": "4294967295"}


def reps_for(nbytes, quick):
  """(blocks, calls per block)."""
  if nbytes <= 64 << 10:
    return (5, 100) if not quick else (3, 40)
  if nbytes <= 1 << 20:
    return (5, 30) if not quick else (3, 10)
  if nbytes <= 16 << 20:
    return (5, 6) if not quick else (3, 3)
  return (4, 3) if not quick else (2, 2)


def block_median(fn, blocks, calls):
  fn()
  fn()
  times = []
  for _ in range(blocks):
    t0 = time.perf_counter()
    for _ in range(calls):
      fn()
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def emit(rank, **kv):
  if rank == 0:
    print("RESULT " + json.dumps(kv), flush=True)


# ---------------------------------------------------------------------------
# Workers (one process per rank).


def hpc_ops_functions(nbytes):
  """(one, eager, chained, k): one allreduce (sum) per tf.function call, one
  per eager call, and k dependent allreduces (average) in one
  tf.function."""
  import tensorflow as tf
  import hpc_ops.collective as coll
  k = 10 if nbytes <= 1 << 20 else 3
  one = tf.function(lambda v: coll.allreduce(v, "sum"))
  eager = lambda v: coll.allreduce(v, "sum", name="bench_eager")  # noqa: E731

  @tf.function
  def chained(v):
    for _ in range(k):
      v = coll.allreduce(v, "average")
    return v

  return one, eager, chained, k


def worker_hpc_ops(sizes, quick):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  import hpc_ops.collective as coll
  import hpc_ops.distributed as hd
  hd.init()
  r, p = hd.rank(), hd.size()
  for nbytes in sizes:
    blocks, calls = reps_for(nbytes, quick)
    x = tf.fill([nbytes // 4], float(r + 1))
    one, eager, chained, k = hpc_ops_functions(nbytes)
    for y in (one(x), eager(x)):
      assert float(y[0]) == p * (p + 1) / 2 and float(y[-1]) == float(y[0])
    t_one = block_median(lambda: one(x), blocks, calls)
    t_eager = block_median(lambda: eager(x), blocks, calls)
    t_chain = block_median(lambda: chained(x), blocks,
                           max(1, calls // k)) / k
    emit(r, peer="hpc_ops", bytes=nbytes, seconds=t_one)
    emit(r, peer="hpc_ops_eager", bytes=nbytes, seconds=t_eager)
    emit(r, peer="hpc_ops_chained", bytes=nbytes, seconds=t_chain)

  # 64 tensors of 16 KB issued together vs one tensor of 1 MB. The 64 come
  # from one [64, 4096] input and go back into one output, so that both
  # functions pass one tensor in and out.
  blocks, calls = reps_for(1 << 20, quick)
  small = tf.fill([64, 4096], float(r + 1))
  big = tf.fill([1 << 18], float(r + 1))
  many = tf.function(lambda v: tf.stack(
      [coll.allreduce(t, "sum") for t in tf.unstack(v)]))
  grouped = tf.function(lambda v: tf.stack(
      coll.grouped_allreduce(tf.unstack(v), "sum")))
  single = tf.function(lambda v: coll.allreduce(v, "sum"))
  many(small)
  grouped(small)
  before = coll.stats()
  t_many = block_median(lambda: many(small), blocks, calls)
  after = coll.stats()
  t_grouped = block_median(lambda: grouped(small), blocks, calls)
  t_single = block_median(lambda: single(big), blocks, calls)
  fused = (after["tensors"] - before["tensors"]) / max(
      1, after["operations"] - before["operations"])
  emit(r, peer="hpc_ops_64x16KB", bytes=1 << 20, seconds=t_many,
       tensors_per_operation=fused)
  emit(r, peer="hpc_ops_64x16KB_grouped", bytes=1 << 20, seconds=t_grouped)
  emit(r, peer="hpc_ops_1x1MB", bytes=1 << 20, seconds=t_single)


def worker_mpi4py(sizes, quick):
  import numpy as np
  from mpi4py import MPI
  comm = MPI.COMM_WORLD
  r = comm.Get_rank()
  for nbytes in sizes:
    blocks, calls = reps_for(nbytes, quick)
    x = np.full(nbytes // 4, r + 1, np.float32)
    y = np.empty_like(x)
    t = block_median(lambda: comm.Allreduce(x, y, op=MPI.SUM), blocks,
                     calls * 3)
    assert y[0] == comm.Get_size() * (comm.Get_size() + 1) / 2
    emit(r, peer="mpi4py", bytes=nbytes, seconds=t)


def worker_horovod(sizes, quick):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  import horovod.tensorflow as hvd
  hvd.init()
  r = hvd.rank()
  for nbytes in sizes:
    blocks, calls = reps_for(nbytes, quick)
    x = tf.fill([nbytes // 4], float(r + 1))
    one = tf.function(lambda v: hvd.allreduce(v, op=hvd.Sum))
    t = block_median(lambda: one(x), blocks, calls)
    emit(r, peer="horovod", bytes=nbytes, seconds=t)


def worker_tf_collective(sizes, quick):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  comm = tf.distribute.experimental.CommunicationOptions(
      implementation=(
          tf.distribute.experimental.CommunicationImplementation.RING))
  strategy = tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=comm)
  r = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
  device = strategy.extended.worker_devices[0]
  total = tf.distribute.ReduceOp.SUM
  for nbytes in sizes:
    blocks, calls = reps_for(nbytes, quick)
    with strategy.scope():
      x = tf.fill([nbytes // 4], float(r + 1))

    def replica_fn(v):
      with tf.device(device):  # all_reduce needs a placed input
        v = tf.identity(v)
      return tf.distribute.get_replica_context().all_reduce(total, v)

    step = tf.function(lambda v: strategy.run(replica_fn, args=(v,)))
    t = block_median(lambda: step(x).numpy(), blocks, max(1, calls // 2))
    emit(r, peer="tf_collective", bytes=nbytes, seconds=t)


def worker_paired(sizes, quick):
  """mpi4py and hpc_ops in the same pair of processes, block after block:
  this VM has periods (tens of seconds) in which every memory-bound step of
  an exchange runs several times slower, for MPI as for us, so separate
  processes can land in different periods. mpi4py initialises MPI
  (MPI_THREAD_MULTIPLE, its default); hpc_ops' runtime then uses it."""
  import numpy as np
  from mpi4py import MPI
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  import hpc_ops.distributed as hd
  hd.init()
  comm = MPI.COMM_WORLD
  r = comm.Get_rank()
  for nbytes in sizes:
    blocks, calls = reps_for(nbytes, quick)
    blocks *= 2
    xn = np.full(nbytes // 4, r + 1, np.float32)
    yn = np.empty_like(xn)
    x = tf.fill([nbytes // 4], float(r + 1))
    one, eager, chained, k = hpc_ops_functions(nbytes)
    # An empty tf.function call on the same input: the part of "one" that
    # is the call itself, not the allreduce.
    empty = tf.function(tf.identity)
    fns = {"mpi4py": (lambda: comm.Allreduce(xn, yn, op=MPI.SUM), calls * 3, 1),
           "one": (lambda: one(x), calls, 1),
           "empty": (lambda: empty(x), calls, 1),
           "eager": (lambda: eager(x), calls, 1),
           "chained": (lambda: chained(x), max(1, calls // k), k)}
    for fn, _, _ in fns.values():
      fn()
      fn()
    times = {name: [] for name in fns}
    for b in range(blocks):
      names = list(fns)[b % len(fns):] + list(fns)[:b % len(fns)]
      for name in names:
        fn, n, per = fns[name]
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
          fn()
        times[name].append((time.perf_counter() - t0) / n / per)
    assert yn[0] == comm.Get_size() * (comm.Get_size() + 1) / 2
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: statistics.median(
        m / t for m, t in zip(times["mpi4py"], times[name], strict=True))
             for name in ("one", "eager", "chained")}
    emit(r, peer="paired", bytes=nbytes, mpi4py=med["mpi4py"],
         one=med["one"], empty=med["empty"], eager=med["eager"],
         chained=med["chained"],
         ratio_one=ratio["one"], ratio_eager=ratio["eager"],
         ratio_chained=ratio["chained"], seconds=med["chained"])


WORKERS = {"hpc_ops": worker_hpc_ops, "mpi4py": worker_mpi4py,
           "paired": worker_paired,
           "horovod": worker_horovod, "tf_collective": worker_tf_collective}


# ---------------------------------------------------------------------------
# Launchers (the parent process).


def importable(module):
  code = "import importlib.util, sys; " \
         "sys.exit(0 if importlib.util.find_spec(%r) else 1)" % module
  return subprocess.run([sys.executable, "-c", code]).returncode == 0


def run_collect(cmd, env, timeout):
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  results = [json.loads(line[len("RESULT "):])
             for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  if proc.returncode != 0 or not results:
    print("  (%s failed, rc=%d: %s)" % (cmd[-3], proc.returncode,
                                         proc.stderr.strip()[-800:]))
  return results


def launch_mpi(peer, args, env):
  cmd = ["mpirun", "-np", str(args.np), "--oversubscribe"]
  if os.geteuid() == 0:
    cmd.append("--allow-run-as-root")
  for name in env:
    if name.startswith(("HPC_OPS_", "TF_", "MALLOC_")):
      cmd += ["-x", name]
  cmd += [sys.executable, os.path.abspath(__file__), "--worker", peer]
  if args.quick:
    cmd.append("--quick")
  return run_collect(cmd, env, timeout=900)


def launch_tf_collective(args, env):
  ports = []
  for _ in range(args.np):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    ports.append(s.getsockname()[1])
    s.close()
  cluster = {"worker": ["127.0.0.1:%d" % p for p in ports]}
  procs = []
  for i in range(args.np):
    wenv = dict(env, TF_CONFIG=json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}}))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           "tf_collective"] + (["--quick"] if args.quick else [])
    procs.append(subprocess.Popen(cmd, env=wenv, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  results = []
  try:
    out, err = procs[0].communicate(timeout=900)
    for p in procs[1:]:
      p.communicate(timeout=60)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = [json.loads(line[len("RESULT "):]) for line in out.splitlines()
             if line.startswith("RESULT ")]
  if not results:
    print("  (TF collective failed: %s)" % err.strip()[-800:])
  return results


def fmt_size(nbytes):
  if nbytes < 1 << 20:
    return "%d KB" % (nbytes >> 10)
  return "%d MB" % (nbytes >> 20)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer sizes/reps")
  parser.add_argument("--np", type=int, default=2, help="processes")
  parser.add_argument("--rounds", type=int, default=3,
                      help="rounds of every peer (full run; --quick: 1)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  sizes = QUICK_SIZES if args.quick else SIZES
  if args.worker:
    WORKERS[args.worker](sizes, args.quick)
    return

  setting = bench_util.allocator_name()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  if setting == "BFC":
    env.update(MALLOC_ENV)
  label = ("TF default allocator, glibc malloc defaults" if setting == "default"
           else "TF_CPU_ALLOCATOR_USE_BFC=true, "
           "MALLOC_MMAP_THRESHOLD_=1073741824")
  print("\n## Allreduce, float32 SUM, %d processes on loopback (%s)" %
        (args.np, label), flush=True)
  if shutil.which("mpirun") is None:
    sys.exit("mpirun not found: install Open MPI")
  have_mpi4py, have_horovod = importable("mpi4py"), importable("horovod")
  if not have_mpi4py:
    print("  note: mpi4py is not installed, so the MPI-limit column is empty "
          "(MPICC=mpicc pip install --no-binary mpi4py mpi4py)")
  if not have_horovod:
    print("  note: Horovod is not importable, so its column is empty")
  # Peers take turns, round after round, and each figure is the median over
  # rounds: a burst of load from other processes then hits every peer alike
  # instead of one of them.
  rounds = 1 if args.quick else args.rounds
  results = []
  print("  load average before: %.2f %.2f %.2f" % os.getloadavg(), flush=True)
  for i in range(rounds):
    print("  round %d/%d: hpc_ops" % (i + 1, rounds), flush=True)
    results += launch_mpi("hpc_ops", args, env)
    if have_mpi4py:
      print("  round %d/%d: mpi4py" % (i + 1, rounds), flush=True)
      results += launch_mpi("mpi4py", args, env)
      print("  round %d/%d: mpi4py and hpc_ops in the same processes" %
            (i + 1, rounds), flush=True)
      results += launch_mpi("paired", args, env)
    if have_horovod:
      print("  round %d/%d: Horovod" % (i + 1, rounds), flush=True)
      results += launch_mpi("horovod", args, env)
    print("  round %d/%d: TF MultiWorkerMirroredStrategy" % (i + 1, rounds),
          flush=True)
    results += launch_tf_collective(args, env)
  print("  load average after: %.2f %.2f %.2f" % os.getloadavg(), flush=True)

  grouped = {}
  for r in results:
    grouped.setdefault((r["peer"], r["bytes"]), []).append(r)
  by = {}
  for key, rs in grouped.items():
    rs.sort(key=lambda r: r["seconds"])
    by[key] = rs[len(rs) // 2]  # the median round

  def t(peer, nbytes):
    r = by.get((peer, nbytes))
    return r["seconds"] if r else None

  def cell(sec):
    return bench_util.fmt_time(sec) if sec else "-"

  def ratio(a, b):
    return "%.2fx" % (a / b) if a and b else "-"

  rows = []
  for nbytes in sizes:
    ours, chain = t("hpc_ops", nbytes), t("hpc_ops_chained", nbytes)
    eager = t("hpc_ops_eager", nbytes)
    mpi, hvd, tfc = (t("mpi4py", nbytes), t("horovod", nbytes),
                     t("tf_collective", nbytes))
    rows.append([fmt_size(nbytes), cell(ours), cell(eager), cell(chain),
                 "%.2f GB/s" % (nbytes / ours / 1e9) if ours else "-",
                 cell(mpi), ratio(mpi, ours), ratio(mpi, eager),
                 ratio(mpi, chain), cell(hvd),
                 ratio(hvd, ours), cell(tfc), ratio(tfc, ours)])
  bench_util.print_table(
      "Time per allreduce (%s)" % label,
      ["size", "hpc_ops tf.function", "hpc_ops eager", "hpc_ops chained",
       "hpc_ops algbw", "mpi4py", "bw vs mpi4py", "eager bw vs mpi4py",
       "chained bw vs mpi4py", "Horovod",
       "speedup vs Horovod", "TF collective", "speedup vs TF"], rows)
  paired_rows = []
  for nbytes in sizes:
    rs = grouped.get(("paired", nbytes))
    if not rs:
      continue
    med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
    paired_rows.append([fmt_size(nbytes), cell(med("mpi4py")), cell(med("one")),
                        cell(med("empty")), cell(med("eager")), cell(med("chained")),
                        "%.2fx" % med("ratio_one"), "%.2fx" % med("ratio_eager"),
                        "%.2fx" % med("ratio_chained")])
  if paired_rows:
    bench_util.print_table(
        "The same pair of processes, mpi4py and hpc_ops taking turns block "
        "by block (MPI initialised by mpi4py; ratios: median over blocks of "
        "mpi4py time / hpc_ops time, median over rounds) (%s)" % label,
        ["size", "mpi4py", "hpc_ops tf.function", "empty tf.function call",
         "hpc_ops eager", "hpc_ops chained", "bw vs mpi4py",
         "eager bw vs mpi4py",
         "chained bw vs mpi4py"], paired_rows)
  many = by.get(("hpc_ops_64x16KB", 1 << 20))
  in_one = t("hpc_ops_64x16KB_grouped", 1 << 20)
  single = t("hpc_ops_1x1MB", 1 << 20)
  if many and single and in_one:
    bench_util.print_table(
        "64 tensors of 16 KB issued together vs one 1 MB tensor (%s)" % label,
        ["64 x allreduce(16 KB)", "grouped_allreduce(64 x 16 KB)",
         "1 x 1 MB", "ratio, 64 ops", "ratio, grouped",
         "tensors per fused operation (64 ops)"],
        [[cell(many["seconds"]), cell(in_one), cell(single),
          "%.2fx" % (many["seconds"] / single),
          "%.2fx" % (in_one / single),
          "%.1f" % many["tensors_per_operation"]]])
  if setting == "default":
    bench_util.run_under_both_allocators()


if __name__ == "__main__":
  main()
