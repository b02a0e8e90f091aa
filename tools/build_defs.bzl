"""hpc_op_library: one macro that builds every op family.

An op family `F` is the files
    ops/F_ops.cc            REGISTER_OP + shape functions
    kernels/F_op*.{h,cc}    functor, OpKernels, REGISTER_KERNEL_BUILDER
and becomes two build outputs at the workspace root of bazel-bin:
    _F_ops.so               the op library (tf.load_library)
    gen_F_ops.py            its Python wrappers, generated from the ops the
                            library registers (as tf_gen_op_wrapper_py does)
tools/dev.sh and setup.py copy both into the hpc_ops Python package.
"""

load("@local_config_tf//:defs.bzl", "HPC_OPS_COPTS", "TF_CXXOPTS", "TF_VERSION")
load("@local_config_mpi//:defs.bzl", "MPI_FOUND")

# Families that need more than TensorFlow. A family whose needs are missing is
# skipped (with one line saying why); the others build regardless.
_MPI_FAMILIES = ["collective"]

def op_families(ops_srcs):
    """Family names from the list of ops/<family>_ops.cc files."""
    return [s[len("ops/"):-len("_ops.cc")] for s in ops_srcs]

def hpc_op_library(family):
    """Builds _<family>_ops.so and gen_<family>_ops.py. Returns the target
    labels, or [] when the family is skipped."""
    deps = [
        "@local_config_tf//:libtensorflow_framework",
        "@local_config_tf//:tf_header_lib",
    ]
    if family in _MPI_FAMILIES:
        if not MPI_FOUND:
            # buildifier: disable=print
            print("hpc_ops: MPI not found by ./configure.sh, so the %s ops are not built." % family)
            return []
        deps.append("@local_config_mpi//:mpi")

    so = "_%s_ops.so" % family
    native.cc_binary(
        name = so,
        srcs = ["ops/%s_ops.cc" % family] + native.glob(
            [
                "kernels/%s_op*.cc" % family,
                "kernels/%s_op*.h" % family,
                "kernels/common/*.h",  # helpers shared by every family
            ],
            exclude = ["kernels/*.cu.cc"],
        ),
        copts = TF_CXXOPTS + HPC_OPS_COPTS,
        linkshared = 1,
        deps = deps,
    )
    gen = "gen_%s_ops" % family
    native.genrule(
        name = gen,
        srcs = [":" + so],
        outs = [gen + ".py"],
        cmd = "$(location @local_config_tf//:python.sh) $(location //tools:gen_op_wrapper.py) " +
              "$(location :%s) $@ %s %s" % (so, so, TF_VERSION),
        tools = [
            "//tools:gen_op_wrapper.py",
            "@local_config_tf//:python.sh",
        ],
    )
    return [":" + so, ":" + gen]
