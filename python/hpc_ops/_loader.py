"""Loads hpc_ops' op libraries, refusing a TensorFlow they were not built for.

Each generated gen_<family>_ops.py calls load_op_library() before defining
its wrappers. TensorFlow's C++ ABI changes between minor releases, so a
library built for another minor version fails on an undefined symbol (or
worse); this checks first and says what to do in one sentence.
"""
import os

import tensorflow as tf

# module name -> (library path, TF version built for, op names)
LOADED = {}


class VersionMismatchError(ImportError):
  """The op library was built for another TensorFlow minor version."""


def _minor(version):
  return tuple(version.split(".")[:2])


def check_tf_version(so_name, built_for, running=None):
  """Raises VersionMismatchError unless major.minor of the two agree."""
  running = running or tf.__version__
  if _minor(built_for) != _minor(running):
    raise VersionMismatchError(
        "hpc_ops: %s was built against TensorFlow %s but TensorFlow %s is "
        "installed; install tensorflow %s.* (or tensorflow-cpu), or rebuild "
        "hpc_ops against the installed TensorFlow (./configure.sh && "
        "tools/dev.sh build, or pip install --no-build-isolation .)."
        % (so_name, built_for, running, ".".join(_minor(built_for))))


def load_op_library(module_name, so_name, built_for, ops):
  """Checks the version, then registers the library's ops and kernels."""
  check_tf_version(so_name, built_for)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), so_name)
  try:
    # tf.load_library, not tf.load_op_library: the generated module already
    # holds the wrappers, so a second in-memory copy is not needed.
    tf.load_library(path)
  except tf.errors.NotFoundError as e:
    raise ImportError(
        "hpc_ops: could not load %s (built against TensorFlow %s, running "
        "%s): %s" % (path, built_for, tf.__version__, e)) from e
  LOADED[module_name] = (path, built_for, tuple(ops))
