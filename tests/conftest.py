"""Shared test helpers. Tests import hpc_ops from wherever it is installed
(the repo's python/ through the dev venv, or an installed wheel)."""
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, timeout=300, env=None, check=True):
  """Runs `code` in a fresh Python process; returns CompletedProcess."""
  full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=timeout,
                        env=full_env)
  if check and proc.returncode != 0:
    raise AssertionError("subprocess failed (rc=%d)\nstdout:\n%s\nstderr:\n%s"
                         % (proc.returncode, proc.stdout, proc.stderr[-5000:]))
  return proc


@pytest.fixture
def fresh_python():
  return run_python
