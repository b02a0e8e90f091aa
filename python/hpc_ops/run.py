"""Runs a Python script on N processes with Open MPI's mpirun.

    python -m hpc_ops.run -np 4 train.py --epochs 3
    python -m hpc_ops.run -np 8 -H node1:4,node2:4 train.py

This builds and runs (print it with --dry-run)

    mpirun -np 4 --oversubscribe [--allow-run-as-root] \\
        --mca orte_abort_on_non_zero_status 0 \\
        --mca orte_allowed_exit_without_sync 1 \\
        [--mca btl_tcp_if_include lo --mca oob_tcp_if_include lo] \\
        [-x HPC_OPS_TIMEOUT_SECONDS ...] \\
        python .../hpc_ops/run.py --rank-shim STATUS_DIR -- train.py --epochs 3

--oversubscribe allows more processes than cores; --allow-run-as-root is
added when running as root; the loopback-only transports are used when no
hosts are given (one machine, no network needed); -x forwards HPC_OPS_*,
TF_*, PYTHONPATH and friends to remote hosts. By default mpirun kills every
process as soon as one fails (or exits without MPI_Finalize, which hpc_ops
skips after a failure); here it lets the others run, so that they report
hpc_ops' own error (a collective that times out after
HPC_OPS_TIMEOUT_SECONDS naming the missing rank) and exit by themselves. For
that, each process runs under a small shim that turns death by a signal into
an exit status (mpirun 4.1 never finishes if a process dies by a signal while
aborting is off) and records it; the launcher's exit status is the first
failing process's (128 + N for signal N), with one line per failed process.

The plain form works too; mpirun then stops the whole job when one process
fails or dies (the others are killed rather than reporting themselves):

    mpirun -np 4 --oversubscribe python train.py   # + --allow-run-as-root

This file uses only the standard library (no TensorFlow import), so it also
runs as a script: python path/to/hpc_ops/run.py -np 2 script.py.
"""
import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile

# Environment variables forwarded to remote hosts (mpirun -x).
_FORWARD_PREFIXES = ("HPC_OPS_", "TF_", "OMP_", "KMP_", "MALLOC_")
_FORWARD_NAMES = ("PYTHONPATH", "PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV",
                  "PYTHONUNBUFFERED")
_FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                      signal.SIGUSR1, signal.SIGUSR2)


def _set_parent_death_signal(sig):
  """Linux: deliver `sig` to this process when its parent dies."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _rank_from_env():
  for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
    if var in os.environ:
      return os.environ[var]
  return "0"


def rank_shim(status_dir, command):
  """Runs `command`, records its exit status in status_dir/rank.<rank>, and
  exits with it (128 + N when it died by signal N)."""
  _set_parent_death_signal(signal.SIGTERM)  # mpirun/orted went away
  child = subprocess.Popen(
      command,
      preexec_fn=lambda: _set_parent_death_signal(signal.SIGKILL))

  def forward(signum, _frame):
    try:
      child.send_signal(signum)
    except ProcessLookupError:
      pass

  for sig in _FORWARDED_SIGNALS:
    signal.signal(sig, forward)
  rc = child.wait()
  status = rc if rc >= 0 else 128 - rc
  path = os.path.join(status_dir, "rank.%s" % _rank_from_env())
  with open(path + ".tmp", "w") as f:
    f.write("%d\n" % rc)
  os.replace(path + ".tmp", path)
  return status


def mpirun_command(np, script_args, hosts=None, hostfile=None, extra=(),
                   status_dir=None, mpirun="mpirun", python=None):
  """The mpirun command line that runs `python script_args...` on np
  processes (under the rank shim when status_dir is given)."""
  python = python or sys.executable
  cmd = [mpirun, "-np", str(np), "--oversubscribe"]
  if hasattr(os, "geteuid") and os.geteuid() == 0:
    cmd.append("--allow-run-as-root")
  cmd += ["--mca", "orte_abort_on_non_zero_status", "0",
          "--mca", "orte_allowed_exit_without_sync", "1"]
  if hosts:
    cmd += ["-H", hosts]
  if hostfile:
    cmd += ["--hostfile", hostfile]
  if not hosts and not hostfile:
    # One machine: shared memory between the processes, and loopback for
    # Open MPI's own wiring, whatever network interfaces exist.
    cmd += ["--mca", "btl_tcp_if_include", "lo",
            "--mca", "oob_tcp_if_include", "lo"]
  for name in sorted(os.environ):
    if name.startswith(_FORWARD_PREFIXES) or name in _FORWARD_NAMES:
      cmd += ["-x", name]
  cmd += list(extra)
  if status_dir is not None:
    cmd += [python, os.path.abspath(__file__), "--rank-shim", status_dir, "--",
            python] + list(script_args)
  else:
    cmd += [python] + list(script_args)
  return cmd


def _describe(rc):
  if rc < 0:
    try:
      name = signal.Signals(-rc).name
    except ValueError:
      name = "signal %d" % -rc
    return "was killed by %s" % name
  return "exited with status %d" % rc


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--rank-shim"]:
    if len(argv) < 4 or argv[2] != "--":
      sys.exit("usage: run.py --rank-shim STATUS_DIR -- COMMAND...")
    return rank_shim(argv[1], argv[3:])

  parser = argparse.ArgumentParser(
      prog="python -m hpc_ops.run",
      description="Run a Python script on N processes with mpirun "
                  "(see the module docstring for the exact command).")
  parser.add_argument("-np", "-n", dest="np", type=int, required=True,
                      help="number of processes")
  parser.add_argument("-H", "--host", dest="hosts",
                      help="hosts, e.g. node1:4,node2:4 (default: this one)")
  parser.add_argument("--hostfile", help="an Open MPI hostfile")
  parser.add_argument("--mpirun", default=os.environ.get("MPIRUN", "mpirun"),
                      help="the mpirun to use (default: mpirun on PATH)")
  parser.add_argument("--mpirun-args", default="",
                      help="extra mpirun arguments, one string")
  parser.add_argument("--dry-run", action="store_true",
                      help="print the mpirun command instead of running it")
  parser.add_argument("script", help="the Python script")
  parser.add_argument("args", nargs=argparse.REMAINDER,
                      help="arguments for the script")
  a = parser.parse_args(argv)
  if a.np < 1:
    parser.error("-np must be >= 1")
  if shutil.which(a.mpirun) is None:
    sys.exit("hpc_ops.run: %r not found; install Open MPI (Debian/Ubuntu: "
             "apt-get install openmpi-bin libopenmpi-dev)" % a.mpirun)
  script_args = [a.script] + a.args
  extra = a.mpirun_args.split()
  if a.dry_run:
    print(" ".join(mpirun_command(a.np, script_args, a.hosts, a.hostfile,
                                  extra, "STATUS_DIR", a.mpirun)))
    return 0

  status_dir = tempfile.mkdtemp(prefix="hpc_ops_run_")
  try:
    cmd = mpirun_command(a.np, script_args, a.hosts, a.hostfile, extra,
                         status_dir, a.mpirun)
    proc = subprocess.Popen(cmd)

    def forward(signum, _frame):
      try:
        proc.send_signal(signum)
      except ProcessLookupError:
        pass

    for sig in (signal.SIGTERM, signal.SIGHUP):
      signal.signal(sig, forward)
    try:
      mpirun_rc = proc.wait()
    except KeyboardInterrupt:  # mpirun got the SIGINT too: let it clean up
      mpirun_rc = proc.wait()
    failed = []
    for r in range(a.np):
      path = os.path.join(status_dir, "rank.%d" % r)
      try:
        with open(path) as f:
          rc = int(f.read().strip())
      except (OSError, ValueError):
        failed.append((r, None))
        continue
      if rc != 0:
        failed.append((r, rc))
    for r, rc in failed:
      what = "did not report an exit status" if rc is None else _describe(rc)
      print("hpc_ops.run: rank %d %s" % (r, what), file=sys.stderr)
    if failed:
      rc = failed[0][1]
      if rc is None:
        return mpirun_rc or 1
      return rc if rc > 0 else 128 - rc
    return mpirun_rc
  finally:
    shutil.rmtree(status_dir, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
