// Op registrations for the collective family: allreduce, broadcast and
// allgather across the processes of an MPI job. Kernels:
// ../kernels/collective_op.cc; the background thread that owns MPI:
// ../kernels/collective_op_runtime.cc.
//
// The collectives are deliberately not marked stateful: TensorFlow chains
// every stateful op of a tf.function in program order, which would run the
// collectives one after the other and defeat both out-of-order execution and
// tensor fusion. They are matched across processes by name instead (see
// `tensor_name`), so common-subexpression elimination or pruning, which act
// identically on every process, cannot pair the wrong calls.
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {

namespace {

constexpr char kTensorNameDoc[] = R"doc(
tensor_name: The name that matches this call with the calls of the other
  processes: every process must issue each name the same number of times;
  the k-th call with a name on one process is combined with the k-th call
  with that name on the others, whatever the order in which differently
  named calls are issued. Eager callers must pass one. Empty (the default):
  `function_name:node name`, or the node name alone when function_name is
  empty.
function_name: Set by the Python wrappers when they build the op inside a
  tf.function: the function's name, the same on every process. A node name
  is unique in its graph only; with it, the default names of two different
  functions that run at the same time differ too.
)doc";

}  // namespace

REGISTER_OP("HpcAllreduce")
    .Input("tensor: T")
    .Output("reduced: T")
    .Attr("T: {int32, int64, half, bfloat16, float, double}")
    .Attr("reduce_op: {'sum', 'average', 'min', 'max', 'product'} = 'sum'")
    .Attr("tensor_name: string = ''")
    .Attr("function_name: string = ''")
    .SetShapeFn(shape_inference::UnchangedShape)
    .Doc(std::string(R"doc(
Combines a tensor element-wise across all processes; every process receives
the result.

tensor: The same shape and type on every process (any shape, empty included).
reduced: reduce_op over the processes' tensors: sum, average (the sum divided
  by the number of processes; integer types truncate toward zero), min, max
  (NaN wins) or product. Every process gets bit-identical values: each element
  is combined in rank order. half and bfloat16 are converted to float32,
  reduced, and rounded back once.
)doc") + kTensorNameDoc);

REGISTER_OP("HpcGroupedAllreduce")
    .Input("tensors: N * T")
    .Output("reduced: N * T")
    .Attr("N: int >= 1")
    .Attr("T: {int32, int64, half, bfloat16, float, double}")
    .Attr("reduce_op: {'sum', 'average'} = 'sum'")
    .Attr("tensor_name: string = ''")
    .Attr("function_name: string = ''")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      for (int i = 0; i < c->num_inputs(); ++i) c->set_output(i, c->input(i));
      return absl::OkStatus();
    })
    .Doc(std::string(R"doc(
HpcAllreduce of N tensors of one type in one kernel: the tensors are handed
to the runtime together (and fused when they fit the fusion buffer), and the
op completes once, when all of them are reduced. For many small tensors,
such as a model's gradients, this saves TensorFlow's per-kernel scheduling
and completion cost. Tensor i is matched across processes under the name
`<name>/i`.

tensors: N tensors, each the same shape on every process.
reduced: The sums (or averages) of the processes' tensors, bit-identical to
  HpcAllreduce's.
)doc") + kTensorNameDoc);

REGISTER_OP("HpcBroadcast")
    .Input("tensor: T")
    .Output("broadcast: T")
    .Attr("T: {int32, int64, half, bfloat16, float, double}")
    .Attr("root_rank: int >= 0")
    .Attr("tensor_name: string = ''")
    .Attr("function_name: string = ''")
    .SetShapeFn(shape_inference::UnchangedShape)
    .Doc(std::string(R"doc(
Copies the root process's tensor to every process.

tensor: The same shape and type on every process; only the root's values
  are used.
broadcast: The root process's tensor.
root_rank: The rank of the process whose tensor is sent; less than the
  number of processes.
)doc") + kTensorNameDoc);

REGISTER_OP("HpcAllgather")
    .Input("tensor: T")
    .Output("gathered: T")
    .Attr("T: {int32, int64, half, bfloat16, float, double}")
    .Attr("tensor_name: string = ''")
    .Attr("function_name: string = ''")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle in;
      if (!c->WithRankAtLeast(c->input(0), 1, &in).ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "HpcAllgather: tensor must have rank >= 1 (it is concatenated "
            "along dimension 0), got shape ",
            c->DebugString(c->input(0))));
      }
      shape_inference::ShapeHandle out;
      // The first dimension may differ per process: unknown until run time.
      TF_RETURN_IF_ERROR(c->ReplaceDim(in, 0, c->UnknownDim(), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(std::string(R"doc(
Concatenates the processes' tensors along the first dimension, in rank order.

tensor: Rank >= 1. The first dimension may differ per process; the other
  dimensions and the type must be the same on every process.
gathered: [sum of the first dimensions] + tensor.shape[1:].
)doc") + kTensorNameDoc);

REGISTER_OP("HpcRank")
    .Output("rank: int32")
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc(R"doc(
This process's rank in the job, 0 <= rank < size (0 without mpirun).
Initialises MPI on first use.
)doc");

REGISTER_OP("HpcSize")
    .Output("size: int32")
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc(R"doc(
The number of processes in the job (1 without mpirun).
Initialises MPI on first use.
)doc");

REGISTER_OP("HpcLocalRank")
    .Output("local_rank: int32")
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc(R"doc(
This process's rank among the processes of its host (same processor name).
Initialises MPI on first use.
)doc");

}  // namespace tensorflow
