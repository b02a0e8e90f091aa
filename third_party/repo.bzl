"""Offline repository rules: the pip TensorFlow, the system MPI, and stubs.

Nothing here downloads anything. Paths come from --repo_env values that
./configure.sh writes into .tf_configure.bazelrc (setup.py passes the same
values on the command line).
"""

_TF_ENV = [
    "PYTHON_BIN_PATH",
    "TF_PYTHONPATH",
    "TF_HEADER_DIR",
    "TF_SHARED_LIBRARY_DIR",
    "TF_SHARED_LIBRARY_NAME",
    "TF_CXXOPTS",
    "TF_VERSION",
    "HPC_OPS_COPTS",
]

_MPI_ENV = ["MPI_INCLUDE_DIRS", "MPI_LINKOPTS"]

def _env(ctx, name):
    value = ctx.os.environ.get(name, "")
    if not value:
        fail("\n%s is not set: run ./configure.sh first (it writes .tf_configure.bazelrc)." % name)
    return value

def _split(value):
    return [o for o in value.split(" ") if o]

def _tf_configure_impl(ctx):
    python = _env(ctx, "PYTHON_BIN_PATH")
    pythonpath = _env(ctx, "TF_PYTHONPATH")
    header_dir = _env(ctx, "TF_HEADER_DIR")
    lib_dir = _env(ctx, "TF_SHARED_LIBRARY_DIR")
    lib_name = _env(ctx, "TF_SHARED_LIBRARY_NAME")
    cxxopts = _split(_env(ctx, "TF_CXXOPTS"))
    version = _env(ctx, "TF_VERSION")
    extra = _split(ctx.os.environ.get("HPC_OPS_COPTS", ""))

    for path in [python, header_dir, lib_dir + "/" + lib_name]:
        if not ctx.path(path).exists:
            fail("\n%s does not exist: re-run ./configure.sh with the right Python." % path)

    ctx.symlink(header_dir, "include")
    ctx.symlink(lib_dir + "/" + lib_name, lib_name)
    ctx.file(
        "python.sh",
        "#!/bin/sh\nPYTHONPATH='%s' exec '%s' \"$@\"\n" % (pythonpath, python),
        executable = True,
    )
    ctx.file("defs.bzl", "TF_CXXOPTS = %r\nTF_VERSION = %r\nHPC_OPS_COPTS = %r\n" % (
        cxxopts,
        version,
        extra,
    ))
    ctx.file("BUILD", """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

cc_library(
    name = "tf_header_lib",
    hdrs = glob(["include/**"]),
    includes = ["include"],
)

cc_library(
    name = "libtensorflow_framework",
    srcs = ["{lib}"],
)

exports_files(["python.sh", "defs.bzl"])

# Python toolchain = the configured interpreter, so py_test can import TF.
py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(name = "py_runtime_pair", py3_runtime = ":py3_runtime")

toolchain(
    name = "py_toolchain",
    toolchain = ":py_runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(lib = lib_name, python = python))

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = _TF_ENV,
    local = True,
)

def _mpi_configure_impl(ctx):
    include_dirs = _split(ctx.os.environ.get("MPI_INCLUDE_DIRS", ""))
    linkopts = _split(ctx.os.environ.get("MPI_LINKOPTS", ""))
    found = bool(include_dirs) and bool(linkopts)
    if found:
        for i, d in enumerate(include_dirs):
            if not ctx.path(d).exists:
                fail("\nMPI include dir %s does not exist: re-run ./configure.sh." % d)
            ctx.symlink(d, "include%d" % i)
    ctx.file("defs.bzl", "MPI_FOUND = %r\n" % found)
    ctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "mpi",
    hdrs = glob(["include*/**/*.h"]),
    includes = {includes},
    linkopts = {linkopts},
)
""".format(
        includes = repr(["include%d" % i for i in range(len(include_dirs))]),
        linkopts = repr(linkopts),
    ))

mpi_configure = repository_rule(
    implementation = _mpi_configure_impl,
    environ = _MPI_ENV,
    local = True,
)

def _forwarders(names):
    return "".join(["def %s(**kw):\n    native.%s(**kw)\n" % (n, n) for n in names])

_NO_COVERAGE = """
sh_binary(name = "coverage_report_generator", srcs = ["no_coverage.sh"], visibility = ["//visibility:public"])
sh_binary(name = "lcov_merger", srcs = ["no_coverage.sh"], visibility = ["//visibility:public"])
"""

# Offline stand-ins for repositories that Bazel 4.2.3's default WORKSPACE
# suffix would download:
# - rules_cc, rules_java: loaded by @bazel_tools even for a pure C++ build;
#   they forward to the native rules.
# - remote_coverage_tools: an implicit dependency of every test rule.
_STUBS = {
    "remote_coverage_tools": {
        "BUILD": _NO_COVERAGE,
        "no_coverage.sh": "#!/bin/sh\necho 'coverage tools are not available offline' >&2\nexit 1\n",
    },
    "rules_cc": {"cc/defs.bzl": _forwarders([
        "cc_binary", "cc_import", "cc_library", "cc_proto_library", "cc_test",
        "cc_toolchain", "cc_toolchain_suite", "fdo_prefetch_hints",
        "fdo_profile", "objc_import", "objc_library",
    ])},
    "rules_java": {"java/defs.bzl": _forwarders([
        "java_binary", "java_import", "java_library", "java_lite_proto_library",
        "java_package_configuration", "java_plugin", "java_proto_library",
        "java_runtime", "java_test", "java_toolchain",
    ])},
}

def _rules_stub_impl(ctx):
    ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % ctx.name)
    ctx.file("BUILD", "")
    for path, content in _STUBS[ctx.name].items():
        if path.endswith(".bzl"):
            ctx.file(path.rpartition("/")[0] + "/BUILD", "")
        ctx.file(path, content, executable = path.endswith(".sh"))

rules_stub = repository_rule(implementation = _rules_stub_impl)
