// Op registrations for the zero_out family. Kernels: ../kernels/zero_out_op.cc
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {

REGISTER_OP("ZeroOut")
    .Input("to_zero: T")
    .Output("zeroed: T")
    .Attr("T: {int32, int64, half, bfloat16, float, double}")
    .SetShapeFn(shape_inference::UnchangedShape)
    .Doc(R"doc(
Keeps the first element of a tensor and zeros all the others.

to_zero: A tensor of any shape (rank 0 and empty included).
zeroed: A tensor of the same shape and type; its first element (in row-major
  order) is to_zero's first element, every other element is zero.
)doc");

}  // namespace tensorflow
