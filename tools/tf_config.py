"""Finds TensorFlow (and MPI) and prints the Bazel settings for them.

Run with the Python whose TensorFlow the ops are built against:
  python tools/tf_config.py            lines for .tf_configure.bazelrc
  python tools/tf_config.py --flags    bare --repo_env flags (setup.py)
What was found goes to stderr, one line each.
"""
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _fail(msg):
  sys.exit("configure: " + msg)


try:
  import tensorflow as tf
except ImportError as e:
  _fail("%s cannot import tensorflow (%s); install it (pip install "
        "tensorflow-cpu) or point PYTHON_BIN_PATH at a Python that has it."
        % (sys.executable, e))


def _one(flags, prefix, what):
  found = [f[len(prefix):] for f in flags if f.startswith(prefix)]
  if not found:
    _fail("tf.sysconfig gives no %s flag (%s): this TensorFlow install "
          "is unusual; reinstall it." % (prefix, what))
  return found[0]


def _mpi():
  """(include dirs, link flags, description), or None without MPI."""
  mpicc = os.environ.get("MPICC") or shutil.which("mpicc")
  if not mpicc:
    return None
  try:
    inc = subprocess.check_output([mpicc, "--showme:incdirs"], text=True).split()
    link = subprocess.check_output([mpicc, "--showme:link"], text=True).split()
  except (OSError, subprocess.CalledProcessError):
    return None  # not Open MPI's wrapper
  try:
    ver = subprocess.run(["mpirun", "--version"], capture_output=True,
                         text=True).stdout.splitlines()[0]
  except (OSError, IndexError):
    ver = "unknown version"
  return inc, link, "%s (%s)" % (ver, mpicc)


def _default_copts():
  # The TensorFlow wheel is built for a baseline x86-64; our kernels use the
  # vector units this machine has unless HPC_OPS_COPTS says otherwise (set it
  # to "-O3" for a wheel meant for other machines).
  if "HPC_OPS_COPTS" in os.environ:
    return os.environ["HPC_OPS_COPTS"]
  copts = "-O3"
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l for l in f if l.startswith("flags")), "").split()
    if "avx2" in flags and "fma" in flags:
      copts += " -mavx2 -mfma -mf16c"
  except OSError:
    pass
  return copts


def settings():
  cflags = tf.sysconfig.get_compile_flags()
  lflags = tf.sysconfig.get_link_flags()
  out = [
      # The interpreter and the site-packages holding this TensorFlow: the
      # wrapper-generating genrule runs them (in pip's isolated build env
      # too, whose site-packages is only on sys.path through PYTHONPATH).
      ("PYTHON_BIN_PATH", sys.executable),
      ("TF_PYTHONPATH", os.path.dirname(os.path.dirname(tf.__file__))),
      ("TF_HEADER_DIR", _one(cflags, "-I", "headers")),
      ("TF_SHARED_LIBRARY_DIR", _one(lflags, "-L", "library dir")),
      ("TF_SHARED_LIBRARY_NAME", _one(lflags, "-l:", "framework library")),
      # ABI, -std and Eigen alignment exactly as this TensorFlow was built.
      ("TF_CXXOPTS", " ".join(f for f in cflags if not f.startswith("-I"))),
      ("TF_VERSION", tf.__version__),
      ("HPC_OPS_COPTS", _default_copts()),
  ]
  mpi = None if os.environ.get("HPC_OPS_NO_MPI") else _mpi()
  out += [("MPI_INCLUDE_DIRS", " ".join(mpi[0]) if mpi else ""),
          ("MPI_LINKOPTS", " ".join(mpi[1]) if mpi else "")]
  report = [
      "TensorFlow %s (%s)" % (tf.__version__, sys.executable),
      "compile flags: %s" % dict(out)["TF_CXXOPTS"],
      "kernel flags: %s" % dict(out)["HPC_OPS_COPTS"],
      "MPI: %s" % (mpi[2] if mpi else
                   "not found (no mpicc): the collective ops will not be "
                   "built; apt-get install libopenmpi-dev openmpi-bin"),
      "CUDA: not used (CPU build)",
  ]
  return out, report


def main(argv):
  values, report = settings()
  for line in report:
    print("configure: " + line, file=sys.stderr)
  if "--flags" in argv:
    for k, v in values:
      print("--repo_env=%s=%s" % (k, v))
  else:
    print("# Written by ./configure.sh for TensorFlow %s; do not edit."
          % tf.__version__)
    for k, v in values:
      print('build --repo_env=%s="%s"' % (k, v))


if __name__ == "__main__":
  main(sys.argv[1:])
