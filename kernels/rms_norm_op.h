// See docs in ../ops/rms_norm_ops.cc.
#ifndef HPC_OPS_KERNELS_RMS_NORM_OP_H_
#define HPC_OPS_KERNELS_RMS_NORM_OP_H_

#include <algorithm>
#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor_types.h"

namespace hpc_ops {

// The statistics (inv_rms, accumulator, dgamma partial sums) type for an
// element type T: float for half, bfloat16 and float, double for double.
template <typename T>
struct RmsNormStat {
  using type = float;
};
template <>
struct RmsNormStat<double> {
  using type = double;
};

namespace functor {

// x and y are [rows, cols] (cols > 0), gamma is [cols], inv_rms is [rows].
// y may alias x. Specialised per device (CPU in rms_norm_op.cc).
template <typename Device, typename T, typename U>
struct RmsNorm {
  void operator()(tensorflow::OpKernelContext* ctx,
                  typename tensorflow::TTypes<T>::ConstMatrix x,
                  typename tensorflow::TTypes<T>::ConstVec gamma, U epsilon,
                  typename tensorflow::TTypes<T>::Matrix y,
                  typename tensorflow::TTypes<U>::Vec inv_rms);
};

// dy, x and dx are [rows, cols] (cols > 0), gamma and dgamma are [cols],
// inv_rms is [rows]. dx may alias dy or x. `partial` is scratch space of
// [RmsNormGradShards(rows, cols), cols]: one row of dgamma partial sums per
// shard of rows, added up in shard order at the end.
template <typename Device, typename T, typename U>
struct RmsNormGrad {
  void operator()(tensorflow::OpKernelContext* ctx,
                  typename tensorflow::TTypes<T>::ConstMatrix dy,
                  typename tensorflow::TTypes<T>::ConstMatrix x,
                  typename tensorflow::TTypes<T>::ConstVec gamma,
                  typename tensorflow::TTypes<U>::ConstVec inv_rms,
                  typename tensorflow::TTypes<T>::Matrix dx,
                  typename tensorflow::TTypes<T>::Vec dgamma,
                  typename tensorflow::TTypes<U>::Matrix partial);
};

// The number of row shards of RmsNormGrad. It depends on the shape only (not
// on the thread count or timing), so dgamma's summation order, and hence its
// value, is the same on every run and every machine. At least 1.
inline int64_t RmsNormGradShards(int64_t rows, int64_t cols) {
  // Shards of at least ~16k elements amortise the scheduling and the final
  // reduction; 64 shards balance the load on pools of up to ~32 threads.
  constexpr int64_t kMaxShards = 64;
  constexpr int64_t kMinElementsPerShard = 16384;
  const int64_t by_size =
      cols > 0
          ? std::max<int64_t>(
                1, rows / std::max<int64_t>(1, kMinElementsPerShard / cols))
          : 1;
  return std::max<int64_t>(1, std::min({rows, kMaxShards, by_size}));
}

}  // namespace functor
}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_RMS_NORM_OP_H_
