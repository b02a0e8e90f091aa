// See docs in ../ops/zero_out_ops.cc.
#ifndef HPC_OPS_KERNELS_ZERO_OUT_OP_H_
#define HPC_OPS_KERNELS_ZERO_OUT_OP_H_

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_types.h"

namespace hpc_ops {
namespace functor {

// out[0] = in[0], out[i] = 0 for i > 0. Specialised per device (CPU in
// zero_out_op.cc; a GPU build would add zero_out_op_gpu.cu.cc).
template <typename Device, typename T>
struct ZeroOut {
  void operator()(tensorflow::OpKernelContext* ctx,
                  typename tensorflow::TTypes<T>::ConstFlat in,
                  typename tensorflow::TTypes<T>::Flat out);
};

}  // namespace functor
}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_ZERO_OUT_OP_H_
