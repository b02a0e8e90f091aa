"""`python -m hpc_ops`: what was built, for which TensorFlow, with which ops."""
import importlib
import os
import pkgutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import hpc_ops  # noqa: E402
from hpc_ops import _loader  # noqa: E402


def main():
  print("hpc_ops %s (%s)" % (hpc_ops.__version__, os.path.dirname(hpc_ops.__file__)))
  print("TensorFlow running: %s" % tf.__version__)
  failed = []
  for mod in sorted(m.name for m in pkgutil.iter_modules(hpc_ops.__path__)
                    if m.name.startswith("gen_") and m.name.endswith("_ops")):
    try:
      importlib.import_module("hpc_ops." + mod)
    except ImportError as e:
      failed.append((mod, e))
  if not _loader.LOADED and not failed:
    print("no op libraries found: build them with tools/dev.sh build")
    return 1
  for name, (path, built_for, ops) in sorted(_loader.LOADED.items()):
    print("%s  built against TensorFlow %s" % (os.path.basename(path), built_for))
    print("    ops: %s" % ", ".join(ops))
  for mod, e in failed:
    print("%s: NOT LOADED: %s" % (mod, e))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
