"""The package itself: version-checked loading and `python -m hpc_ops`."""
import os
import sys

import pytest
import tensorflow as tf

import hpc_ops
from hpc_ops import _loader


def test_version_check_accepts_same_minor():
  _loader.check_tf_version("_x_ops.so", tf.__version__)
  major, minor = tf.__version__.split(".")[:2]
  _loader.check_tf_version("_x_ops.so", "%s.%s.99" % (major, minor))


def test_version_check_names_both_versions_and_the_fix():
  with pytest.raises(ImportError) as e:
    _loader.check_tf_version("_zero_out_ops.so", "2.20.0", running="2.21.0")
  msg = str(e.value)
  assert "_zero_out_ops.so was built against TensorFlow 2.20.0" in msg
  assert "TensorFlow 2.21.0 is installed" in msg
  assert "install tensorflow 2.20.*" in msg and "rebuild" in msg


def test_mismatched_generated_wrapper_refuses_to_load(fresh_python):
  """A wrapper built for another TF minor version raises the clear error
  instead of dlopen's undefined-symbol failure."""
  gen = os.path.join(os.path.dirname(hpc_ops.__file__), "gen_zero_out_ops.py")
  with open(gen) as f:
    source = f.read()
  assert "built_for=%r" % tf.__version__ in source
  proc = fresh_python("""
      import sys, types
      import hpc_ops
      src = open(%r).read().replace("built_for=%r", "built_for='1.15.0'")
      mod = types.ModuleType("hpc_ops.gen_fake_ops")
      try:
        exec(compile(src, "gen_fake_ops.py", "exec"), mod.__dict__)
      except ImportError as e:
        print("ERROR:", e)
      else:
        print("LOADED")
  """ % (gen, tf.__version__))
  out = proc.stdout.strip()
  assert out.startswith("ERROR: hpc_ops: _zero_out_ops.so was built against "
                        "TensorFlow 1.15.0 but TensorFlow %s is installed"
                        % tf.__version__), out


def test_python_dash_m_lists_libraries_and_ops(fresh_python):
  proc = fresh_python("import runpy; runpy.run_module('hpc_ops', run_name='__main__')",
                      check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "TensorFlow running: %s" % tf.__version__ in proc.stdout
  assert "_zero_out_ops.so  built against TensorFlow" in proc.stdout
  assert "ZeroOut" in proc.stdout
