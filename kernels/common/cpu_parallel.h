// Helpers shared by the CPU kernels of every op family.
#ifndef HPC_OPS_KERNELS_COMMON_CPU_PARALLEL_H_
#define HPC_OPS_KERNELS_COMMON_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

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

namespace internal {

// The CPU the calling thread runs on, or -1 where that is not known.
inline int CurrentCpu() {
#if defined(__linux__)
  return sched_getcpu();
#else
  return -1;
#endif
}

// While alive, keeps the calling thread off CPU `cpu` if it is running there
// and its affinity mask allows another CPU (by taking `cpu` out of the mask
// for that time); then restores the mask it found. For a pool thread woken to
// help a caller running on `cpu`: see CpuShareChunks.
class OffCpu {
 public:
  explicit OffCpu(int cpu) {
#if defined(__linux__)
    if (cpu < 0 || CurrentCpu() != cpu) return;
    if (sched_getaffinity(0, sizeof(saved_), &saved_) != 0) return;
    if (!CPU_ISSET(cpu, &saved_) || CPU_COUNT(&saved_) < 2) return;
    cpu_set_t others = saved_;
    CPU_CLR(cpu, &others);
    moved_ = sched_setaffinity(0, sizeof(others), &others) == 0;
#endif
  }
  ~OffCpu() {
#if defined(__linux__)
    if (moved_) sched_setaffinity(0, sizeof(saved_), &saved_);
#endif
  }
  OffCpu(const OffCpu&) = delete;
  OffCpu& operator=(const OffCpu&) = delete;

 private:
#if defined(__linux__)
  cpu_set_t saved_;
#endif
  bool moved_ = false;
};

}  // namespace internal

// Runs fn(chunk) for every chunk in [0, chunks) on the calling thread and on
// up to `workers - 1` threads of the intra-op pool, which claim chunks in
// order from a shared counter. begin(), called on a thread before its first
// chunk (only on threads that get one), is for per-thread set-up such as
// taking locks; it returns an object that lives until that thread has run
// its last chunk. Returns when every chunk has run.
//
// Unlike ParallelFor, the caller does not wait for pool threads that wake up
// after every chunk is claimed (on a VM, waking an idle vCPU can take longer
// than a whole short kernel): a helper that starts late finds nothing to do
// and returns without touching the caller's state, and the caller waits
// only for helpers that hold a chunk, by spinning, since those finish within
// one chunk's time.
//
// A helper must also run beside its caller, not on the caller's CPU. On a
// machine with few CPUs Linux may queue the woken pool thread on the CPU
// its waker runs on, though another is idle, and keep it there: the helper
// then either waits until the caller is done or takes the CPU from the
// caller, and the "parallel" work runs on one CPU. (On a 2-vCPU VM that
// happened for whole stretches of calls, about half of them: a 65,536-key
// pull then took 0.8-1.1 ms in its kernel instead of about 0.45.) So a helper
// that starts on the CPU its caller last reported moves off it for its
// chunks (internal::OffCpu), and a caller whose helpers have not started
// after its first chunk yields once, so that a helper queued behind it
// can start and move.
template <typename Begin, typename Fn>
void CpuShareChunks(tensorflow::OpKernelContext* ctx, int64_t chunks, int workers, Begin begin,
                    Fn fn) {
  if (chunks <= 0) return;
  struct Claims {
    std::atomic<int64_t> next{0};
    std::atomic<int> active{0};   // helpers between their claim and their last chunk
    std::atomic<int> started{0};  // helpers that have started
    std::atomic<int> caller_cpu{-1};
  };
  auto claims = std::make_shared<Claims>();
  const int helpers = static_cast<int>(std::min<int64_t>(workers, chunks)) - 1;
  // Runs the chunks that this thread claims, starting with `first`. The
  // caller also reports its CPU after each chunk (it may have moved) and,
  // after its first, yields once if no helper has started.
  auto run = [&](int64_t first, bool caller) {
    if (first >= chunks) return;
    [[maybe_unused]] auto scope = begin();
    const bool report = caller && helpers > 0;
    bool waited = !report;
    for (int64_t c = first; c < chunks; c = claims->next.fetch_add(1)) {
      fn(c);
      if (report) claims->caller_cpu.store(internal::CurrentCpu(), std::memory_order_relaxed);
      if (!waited) {
        waited = true;
        if (claims->started.load() == 0) std::this_thread::yield();
      }
    }
  };
  if (helpers > 0) {
    claims->caller_cpu.store(internal::CurrentCpu(), std::memory_order_relaxed);
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    for (int h = 0; h < helpers; ++h) {
      // `run` (the caller's frame) is used only after a successful claim,
      // and the caller does not return while a claim is held: a helper
      // counts itself active before it claims, and the caller, once its own
      // claim has failed, waits until no helper is active. (Sequentially
      // consistent: a claim that succeeds is ordered before the caller's
      // failed one, so its helper's increment is visible to the caller.)
      pool->Schedule([claims, chunks, &run] {
        claims->started.fetch_add(1);
        claims->active.fetch_add(1);
        const int64_t c = claims->next.fetch_add(1);
        if (c < chunks) {
          internal::OffCpu off(claims->caller_cpu.load(std::memory_order_relaxed));
          run(c, /*caller=*/false);
        }
        claims->active.fetch_sub(1);
      });
    }
  }
  run(claims->next.fetch_add(1), /*caller=*/true);
  // Spin a little, then yield (a helper's chunk may be long: a push part).
  for (int spins = 0; claims->active.load() != 0;) {
    if (spins < 64) {
      ++spins;
    } else {
      std::this_thread::yield();
    }
  }
}

// Boundaries for CpuShareChunks over [0, n) items: chunk c is
// [(*bounds)[c], (*bounds)[c + 1]). Chunks are `max_chunk` items long
// until half of each worker's share of what remains is shorter, then that
// long, down to `min_chunk` (lengths rounded up to a multiple of
// `min_chunk`; the last chunk may be shorter). The threads' last chunks are
// then short, so they finish close together: with equal chunks one thread
// may still be a whole chunk from its end when the others find none left.
inline void ShrinkingChunks(int64_t n, int workers, int64_t max_chunk, int64_t min_chunk,
                            std::vector<int64_t>* bounds) {
  bounds->clear();
  bounds->push_back(0);
  const int64_t per = 2 * static_cast<int64_t>(std::max(workers, 1));
  for (int64_t s = 0; s < n;) {
    int64_t len = std::clamp((n - s) / per, min_chunk, max_chunk);
    len = (len + min_chunk - 1) / min_chunk * min_chunk;
    s = std::min(n, s + len);
    bounds->push_back(s);
  }
}

// CpuShareChunks for work without per-thread set-up.
template <typename Fn>
void CpuShareChunks(tensorflow::OpKernelContext* ctx, int64_t chunks, int workers, Fn fn) {
  CpuShareChunks(ctx, chunks, workers, [] { return 0; }, std::move(fn));
}

}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_COMMON_CPU_PARALLEL_H_
