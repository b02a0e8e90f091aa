"""Builds the hpc_ops wheel: Bazel builds every op library and its generated
wrapper, then they are packaged next to the hand-written Python files.

  pip install .                         # TF from build-system.requires
  pip install --no-build-isolation .    # against the TF already installed

Needs `bazel` (or `bazelisk`) on PATH; Debian: apt-get install bazel-bootstrap.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
  with open(os.path.join(ROOT, "python", "hpc_ops", "__init__.py")) as f:
    return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _bazel():
  for name in [os.environ.get("BAZEL", ""), "bazel", "bazelisk"]:
    if name and shutil.which(name):
      return shutil.which(name)
  sys.exit("hpc_ops: no `bazel` on PATH (Debian: apt-get install bazel-bootstrap).")


class BazelBuildPy(build_py):
  """build_py that first builds the op libraries and wrappers with Bazel."""

  def run(self):
    # Flags for the TensorFlow importable here (in pip's isolated build env,
    # the one from build-system.requires), passed on the command line so a
    # developer's .tf_configure.bazelrc is left alone.
    tf_flags = subprocess.check_output(
        [sys.executable, os.path.join(ROOT, "tools", "tf_config.py"), "--flags"],
        text=True).splitlines()
    # A Bazel server and output tree of its own: a wheel built against
    # another TensorFlow (pip's isolated env) neither invalidates the
    # developer build's cache nor repoints its bazel-* symlinks.
    bazel = [_bazel(), "--output_base=" + os.path.join(
        tempfile.gettempdir(),
        "hpc_ops_wheel_bazel_" + hashlib.sha1(ROOT.encode()).hexdigest()[:12])]
    flags = tf_flags + ["--symlink_prefix=/"]
    try:
      subprocess.check_call(bazel + ["build"] + flags + ["//:hpc_ops"], cwd=ROOT)
      bazel_bin = subprocess.check_output(
          bazel + ["info"] + flags + ["bazel-bin"], cwd=ROOT, text=True).strip()
      super().run()
      dest = os.path.join(self.build_lib, "hpc_ops")
      os.makedirs(dest, exist_ok=True)
      built = [n for n in os.listdir(bazel_bin)
               if re.fullmatch(r"_\w+_ops\.so|gen_\w+_ops\.py", n)]
      if not built:
        sys.exit("hpc_ops: Bazel built no op libraries in %s" % bazel_bin)
      for name in built:
        target = os.path.join(dest, name)
        if os.path.exists(target):
          os.remove(target)
        shutil.copyfile(os.path.join(bazel_bin, name), target)
    finally:
      # Don't leave the wheel build's Bazel server (~0.5 GB) running.
      subprocess.call(bazel + ["shutdown"], cwd=ROOT)


class BinaryDistribution(Distribution):
  """Marks the wheel as platform-specific (it carries .so files)."""

  def has_ext_modules(self):
    return True


setup(
    name="hpc_ops",
    version=_version(),
    description="Fast TensorFlow custom ops: sparse embedding tables, RMSNorm, "
                "MPI allreduce, graph rewriting.",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    package_dir={"": "python"},
    packages=find_packages("python"),
    python_requires=">=3.9",
    # The op libraries load only into the TensorFlow minor version they were
    # built against (checked at import, with a clear message). TensorFlow is
    # not a hard requirement so that `tensorflow` and `tensorflow-cpu` users
    # are both served; pick one with an extra if you like.
    install_requires=["numpy"],
    extras_require={
        "cpu": ["tensorflow-cpu~=2.21.0"],
        "gpu": ["tensorflow~=2.21.0"],
        "test": ["pytest", "hypothesis"],
    },
    cmdclass={"build_py": BazelBuildPy},
    distclass=BinaryDistribution,
    zip_safe=False,
)
