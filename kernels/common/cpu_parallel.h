// Helpers shared by the CPU kernels of every op family.
#ifndef HPC_OPS_KERNELS_COMMON_CPU_PARALLEL_H_
#define HPC_OPS_KERNELS_COMMON_CPU_PARALLEL_H_

#include <cstdint>
#include <functional>

#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/platform/threadpool.h"

namespace hpc_ops {

// Runs fn(begin, end) over [0, total) on TensorFlow's intra-op CPU thread
// pool. `cost_per_unit` is the estimated cycles per unit of work; the pool
// only splits the range when that pays for the hand-off. Small work runs
// inline on the calling thread.
inline void CpuParallelFor(tensorflow::OpKernelContext* ctx, int64_t total,
                           int64_t cost_per_unit,
                           const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  using Params = tsl::thread::ThreadPool::SchedulingParams;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(total, Params::Adaptive(cost_per_unit), fn);
}

// Splits [0, total) into exactly `shards` nearly equal contiguous ranges and
// runs fn(shard, begin, end) for each on the CPU thread pool. For kernels
// that keep one partial result per shard (deterministic reductions).
inline void CpuForEachShard(
    tensorflow::OpKernelContext* ctx, int64_t total, int shards,
    const std::function<void(int, int64_t, int64_t)>& fn) {
  if (total <= 0 || shards <= 0) return;
  using Params = tsl::thread::ThreadPool::SchedulingParams;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(shards, Params::Fixed(1),
                    [&](int64_t s_begin, int64_t s_end) {
                      for (int64_t s = s_begin; s < s_end; ++s) {
                        const int64_t begin = total * s / shards;
                        const int64_t end = total * (s + 1) / shards;
                        fn(static_cast<int>(s), begin, end);
                      }
                    });
}

// The number of threads CpuParallelFor can use.
inline int CpuNumThreads(tensorflow::OpKernelContext* ctx) {
  return ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
}

}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_COMMON_CPU_PARALLEL_H_
