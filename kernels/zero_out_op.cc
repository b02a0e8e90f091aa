// See docs in ../ops/zero_out_ops.cc.
#include "kernels/zero_out_op.h"

#include <cstring>

#include "kernels/common/cpu_parallel.h"
#include "kernels/common/huge_pages.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"

namespace hpc_ops {

using CPUDevice = Eigen::ThreadPoolDevice;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TTypes;

namespace functor {

template <typename T>
struct ZeroOut<CPUDevice, T> {
  void operator()(OpKernelContext* ctx, typename TTypes<T>::ConstFlat in,
                  typename TTypes<T>::Flat out) {
    const int64_t n = out.size();
    if (n == 0) return;
    // Zero-filling is memory bound: split it across the pool in large
    // blocks (a block of 64 KiB costs about 16k cycles to write). All six
    // types have an all-zero-bits representation of 0.
    // Read the first element before zeroing: `out` may alias `in`.
    const T first = in(0);
    T* dst = out.data();
    // A fresh output's first touches cost more than the zeroing itself.
    AdviseHugePagesIfFresh(dst, n * static_cast<int64_t>(sizeof(T)), kHugePageBytes);
    CpuParallelFor(ctx, n, /*cost_per_unit=*/1,
                   [dst](int64_t begin, int64_t end) {
                     std::memset(static_cast<void*>(dst + begin), 0,
                                 (end - begin) * sizeof(T));
                   });
    dst[0] = first;
  }
};

}  // namespace functor

template <typename Device, typename T>
class ZeroOutOp : public OpKernel {
 public:
  explicit ZeroOutOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& input = ctx->input(0);
    Tensor* output = nullptr;
    // The output may reuse the input's buffer when nothing else holds it.
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                            {0}, 0, input.shape(), &output));
    functor::ZeroOut<Device, T>()(ctx, input.flat<T>(), output->flat<T>());
  }
};

#define REGISTER_CPU(T)                                          \
  REGISTER_KERNEL_BUILDER(                                       \
      Name("ZeroOut").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      ZeroOutOp<CPUDevice, T>)

REGISTER_CPU(int32_t);
REGISTER_CPU(int64_t);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);
REGISTER_CPU(float);
REGISTER_CPU(double);

#undef REGISTER_CPU

}  // namespace hpc_ops
