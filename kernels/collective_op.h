// See docs in ../ops/collective_ops.cc.
//
// Element-wise building blocks of the collectives: the reduction of one
// chunk from every rank and the 16-bit <-> float32 conversions. The
// communication itself lives in collective_op_runtime.{h,cc}.
#ifndef HPC_OPS_KERNELS_COLLECTIVE_OP_H_
#define HPC_OPS_KERNELS_COLLECTIVE_OP_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace hpc_ops {
namespace collective {

// The reduce_op attr of HpcAllreduce.
enum class ReduceOp : int { kSum = 0, kAverage, kMin, kMax, kProduct };

}  // namespace collective

namespace functor {

// dst[i] = ((operands[0][i] op operands[1][i]) op operands[2][i]) ..., the
// operands combined left to right (rank order, so every rank computes
// bit-identical results); for kAverage the sum is then divided by `divisor`
// (integers truncate toward zero). Min/max propagate NaN. Integer sums and
// products wrap around. dst may alias any operand. `ctx` (may be null)
// supplies the CPU thread pool.
template <typename Device, typename T>
struct CollectiveReduce {
  void operator()(tensorflow::OpKernelContext* ctx, collective::ReduceOp op,
                  const T* const* operands, int num_operands, int64_t n,
                  int64_t divisor, T* dst);
};

// dst[i] = To(src[i]); narrowing float conversions round to nearest even.
template <typename Device, typename From, typename To>
struct CollectiveConvert {
  void operator()(tensorflow::OpKernelContext* ctx, const From* src, int64_t n,
                  To* dst);
};

}  // namespace functor
}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_COLLECTIVE_OP_H_
