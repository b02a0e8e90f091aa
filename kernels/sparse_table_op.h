// See docs in ../ops/sparse_table_ops.cc.
//
// The sparse embedding table: a TensorFlow resource holding int64 key ->
// float32 row (plus the row's optimizer slots), split into shards that each
// have their own reader/writer lock, row arena and hash index
// (sparse_table_op_map.h). The pull and push algorithms are functors
// specialised for CPU in sparse_table_op_cpu.cc; the OpKernels are in
// sparse_table_op.cc.
#ifndef HPC_OPS_KERNELS_SPARSE_TABLE_OP_H_
#define HPC_OPS_KERNELS_SPARSE_TABLE_OP_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/sparse_table_op_map.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_base.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/status.h"

namespace hpc_ops {
namespace sparse_table {

// Error helpers (absl status codes, StrCat-formatted messages).
namespace errors {
template <typename... Args>
absl::Status InvalidArgument(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}
template <typename... Args>
absl::Status ResourceExhausted(const Args&... args) {
  return absl::ResourceExhaustedError(absl::StrCat(args...));
}
template <typename... Args>
absl::Status FailedPrecondition(const Args&... args) {
  return absl::FailedPreconditionError(absl::StrCat(args...));
}
template <typename... Args>
absl::Status Internal(const Args&... args) {
  return absl::InternalError(absl::StrCat(args...));
}
}  // namespace errors

enum class InitializerKind { kZeros, kUniform, kTruncatedNormal };
enum class OptimizerKind { kSgd, kAdagrad, kAdam, kFtrl };

// Everything fixed when a table is created (the SparseTableHandle attrs).
struct TableConfig {
  static constexpr int64_t kMaxDim = 1 << 16;
  static constexpr int kMaxShards = 4096;

  int64_t dim = 0;
  InitializerKind initializer = InitializerKind::kUniform;
  float init_scale = 0.05f;
  int64_t seed = 0;
  OptimizerKind optimizer = OptimizerKind::kSgd;
  float initial_accumulator_value = 0.1f;  // adagrad, ftrl
  float epsilon = 1e-7f;                    // adagrad, adam
  float beta1 = 0.9f, beta2 = 0.999f;       // adam
  float learning_rate_power = -0.5f;        // ftrl
  float l1 = 0.0f, l2 = 0.0f;               // ftrl
  int num_shards = 64;                      // a power of two
  int64_t admission_min_count = 0;          // <= 1: every key is admitted
  bool track_usage = false;                 // per-row frequency + last step

  // Reads and validates the attrs of a SparseTableHandle node.
  static absl::Status FromAttrs(tensorflow::OpKernelConstruction* ctx,
                                      TableConfig* config);
  bool operator==(const TableConfig& o) const;
  std::string DebugString() const;

  // ---- derived layout ----
  // A row is: int64 key | uint32 counters[] (padded to 8 bytes) |
  // float value[dim] | float slots[num_slots()][dim] (padded to 8 bytes).
  int num_slots() const {
    switch (optimizer) {
      case OptimizerKind::kAdagrad: return 1;              // accumulator
      case OptimizerKind::kAdam: return 2;                 // m, v
      case OptimizerKind::kFtrl: return 2;                 // accumulator, linear
      default: return 0;
    }
  }
  // Counters: adam's per-row step, then (track_usage) frequency, last step.
  int num_counters() const {
    return (optimizer == OptimizerKind::kAdam ? 1 : 0) + (track_usage ? 2 : 0);
  }
  int adam_step_counter() const { return 0; }
  int frequency_counter() const { return optimizer == OptimizerKind::kAdam ? 1 : 0; }
  int last_step_counter() const { return frequency_counter() + 1; }
  int64_t header_bytes() const { return 8 + ((num_counters() + 1) / 2) * 8; }
  int64_t row_bytes() const {
    const int64_t b = header_bytes() + (1 + num_slots()) * dim * 4;
    return (b + 7) / 8 * 8;
  }
  int shard_bits() const {
    int b = 0;
    while ((1 << b) < num_shards) ++b;
    return b;
  }
};

const char* OptimizerName(OptimizerKind k);

// ---------------------------------------------------------------------------
// Initial values. A row's initial value is a pure function of (seed, key):
// column c is drawn from a counter-based generator (SplitMix64 over
// (seed, key, counter)), never from a stateful stream, so it does not depend
// on batch order, threads or which op inserted the row.
inline uint64_t SplitMix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Writes the initial value of `key`'s row into out[0, dim).
void InitialValues(const TableConfig& config, int64_t key, float* out);

// ---------------------------------------------------------------------------
// Optimizer functors: one update of one row with the batch's summed gradient
// `g` (the table sums duplicate keys first). `w` is the row's value, `slots`
// its slot vectors (dim floats each), `counters` its counters. The AVX loops
// and their scalar tails use the same operations in the same order (with
// fused multiply-adds where written), so a column's result does not depend
// on its position in the row.
#if defined(__AVX2__) && defined(__FMA__)
#define HPC_OPS_SPARSE_TABLE_AVX 1
#endif

struct SgdUpdate {
  void operator()(const TableConfig& c, float lr, const float* g, float* w,
                  float* slots, uint32_t* counters) const {
    const int64_t d = c.dim;
    int64_t j = 0;
#ifdef HPC_OPS_SPARSE_TABLE_AVX
    const __m256 vlr = _mm256_set1_ps(lr);
    for (; j + 8 <= d; j += 8) {
      _mm256_storeu_ps(w + j, _mm256_fnmadd_ps(vlr, _mm256_loadu_ps(g + j),
                                               _mm256_loadu_ps(w + j)));
    }
#endif
    for (; j < d; ++j) w[j] = std::fma(-lr, g[j], w[j]);
  }
};

// TF's ApplyAdagradV2: accum += g^2; w -= lr * g / (sqrt(accum) + epsilon).
struct AdagradUpdate {
  void operator()(const TableConfig& c, float lr, const float* g, float* w,
                  float* slots, uint32_t* counters) const {
    const int64_t d = c.dim;
    const float eps = c.epsilon;
    float* acc = slots;
    int64_t j = 0;
#ifdef HPC_OPS_SPARSE_TABLE_AVX
    const __m256 vlr = _mm256_set1_ps(lr);
    const __m256 veps = _mm256_set1_ps(eps);
    for (; j + 8 <= d; j += 8) {
      const __m256 vg = _mm256_loadu_ps(g + j);
      const __m256 va = _mm256_fmadd_ps(vg, vg, _mm256_loadu_ps(acc + j));
      _mm256_storeu_ps(acc + j, va);
      const __m256 q = _mm256_div_ps(_mm256_mul_ps(vlr, vg),
                                     _mm256_add_ps(_mm256_sqrt_ps(va), veps));
      _mm256_storeu_ps(w + j, _mm256_sub_ps(_mm256_loadu_ps(w + j), q));
    }
#endif
    for (; j < d; ++j) {
      acc[j] = std::fma(g[j], g[j], acc[j]);
      w[j] = w[j] - (lr * g[j]) / (std::sqrt(acc[j]) + eps);
    }
  }
};

// TF's ApplyAdam with a per-row step t (the number of pushes that updated
// the row, saturating at 2^32-1): alpha = lr * sqrt(1 - beta2^t) /
// (1 - beta1^t), beta^t computed in double; m += (g - m) * (1 - beta1);
// v += (g^2 - v) * (1 - beta2); w -= m * alpha / (sqrt(v) + epsilon).
struct AdamUpdate {
  void operator()(const TableConfig& c, float lr, const float* g, float* w,
                  float* slots, uint32_t* counters) const {
    uint32_t& step = counters[c.adam_step_counter()];
    if (step < UINT32_MAX) ++step;
    const double t = static_cast<double>(step);
    const float alpha = static_cast<float>(
        static_cast<double>(lr) * std::sqrt(1.0 - std::pow(double{c.beta2}, t)) /
        (1.0 - std::pow(double{c.beta1}, t)));
    const int64_t d = c.dim;
    const float b1c = 1.0f - c.beta1;
    const float b2c = 1.0f - c.beta2;
    const float eps = c.epsilon;
    float* m = slots;
    float* v = slots + d;
    int64_t j = 0;
#ifdef HPC_OPS_SPARSE_TABLE_AVX
    const __m256 vb1c = _mm256_set1_ps(b1c), vb2c = _mm256_set1_ps(b2c);
    const __m256 valpha = _mm256_set1_ps(alpha), veps = _mm256_set1_ps(eps);
    for (; j + 8 <= d; j += 8) {
      const __m256 vg = _mm256_loadu_ps(g + j);
      __m256 vm = _mm256_loadu_ps(m + j);
      __m256 vv = _mm256_loadu_ps(v + j);
      vm = _mm256_fmadd_ps(_mm256_sub_ps(vg, vm), vb1c, vm);
      vv = _mm256_fmadd_ps(_mm256_fmsub_ps(vg, vg, vv), vb2c, vv);
      _mm256_storeu_ps(m + j, vm);
      _mm256_storeu_ps(v + j, vv);
      const __m256 q = _mm256_div_ps(_mm256_mul_ps(vm, valpha),
                                     _mm256_add_ps(_mm256_sqrt_ps(vv), veps));
      _mm256_storeu_ps(w + j, _mm256_sub_ps(_mm256_loadu_ps(w + j), q));
    }
#endif
    for (; j < d; ++j) {
      m[j] = std::fma(g[j] - m[j], b1c, m[j]);
      v[j] = std::fma(std::fma(g[j], g[j], -v[j]), b2c, v[j]);
      w[j] = w[j] - (m[j] * alpha) / (std::sqrt(v[j]) + eps);
    }
  }
};

// TF's ApplyFtrl (FTRL-proximal, no shrinkage):
//   accum_new = accum + g^2
//   linear += g - (accum_new^-p - accum^-p) / lr * w        (p = lr_power)
//   quadratic = accum_new^-p / lr + 2 * l2
//   w = |linear| > l1 ? (sign(linear) * l1 - linear) / quadratic : 0
struct FtrlUpdate {
  void operator()(const TableConfig& c, float lr, const float* g, float* w,
                  float* slots, uint32_t* counters) const {
    const int64_t d = c.dim;
    float* acc = slots;
    float* lin = slots + d;
    const float l1 = c.l1;
    const float two_l2 = 2.0f * c.l2;
    const float p = c.learning_rate_power;
    const bool sqrt_power = p == -0.5f;
    for (int64_t j = 0; j < d; ++j) {
      const float acc_new = acc[j] + g[j] * g[j];
      const float pow_new = sqrt_power ? std::sqrt(acc_new) : std::pow(acc_new, -p);
      const float pow_old = sqrt_power ? std::sqrt(acc[j]) : std::pow(acc[j], -p);
      lin[j] += g[j] - (pow_new - pow_old) / lr * w[j];
      const float quadratic = pow_new / lr + two_l2;
      const float x = (lin[j] > 0.0f ? l1 : (lin[j] < 0.0f ? -l1 : 0.0f)) - lin[j];
      w[j] = std::fabs(lin[j]) > l1 ? x / quadratic : 0.0f;
      acc[j] = acc_new;
    }
  }
};

// ---------------------------------------------------------------------------
// One shard: its lock and the storage it guards. Cache-line aligned so
// neighbouring shards' locks do not share a line.
struct alignas(64) Shard {
  explicit Shard(ChunkPool* pool) : arena(pool) {}
  mutable absl::Mutex mu;  // reader/writer
  RowArena arena ABSL_GUARDED_BY(mu);
  ShardIndex index ABSL_GUARDED_BY(mu);
  KeyCounter candidates ABSL_GUARDED_BY(mu);  // admission counts
};

class SparseTable : public tensorflow::ResourceBase {
 public:
  explicit SparseTable(const TableConfig& config);

  std::string DebugString() const override;
  int64_t MemoryUsed() const override;

  const TableConfig& config() const { return config_; }
  int64_t dim() const { return config_.dim; }
  int num_shards() const { return config_.num_shards; }
  int shard_bits() const { return shard_bits_; }
  Shard& shard(int s) { return *shards_[s]; }
  // Where every shard's rows live (new shards, e.g. import's, too).
  ChunkPool* chunk_pool() { return &pool_; }

  // Key -> shard: the one routing function (see ShardOfHash).
  int ShardOf(uint64_t hash) const { return ShardOfHash(hash, shard_bits_); }

  // Number of rows (each shard read under its lock).
  int64_t Size() const;

  // The table's step: the number of SparseTablePush calls so far (restored
  // by import). Tick() advances it and returns the new value.
  int64_t step() const { return step_.load(std::memory_order_relaxed); }
  int64_t Tick() { return step_.fetch_add(1, std::memory_order_relaxed) + 1; }
  void set_step(int64_t s) { step_.store(s, std::memory_order_relaxed); }
  // The step as stored in a row's last-step counter (saturating).
  static uint32_t StepCounter(int64_t step) {
    return step >= UINT32_MAX ? UINT32_MAX : static_cast<uint32_t>(step);
  }

  // Row accessors (the caller holds the shard's lock).
  float* Values(char* row) const {
    return reinterpret_cast<float*>(row + config_.header_bytes());
  }
  uint32_t* Counters(char* row) const {
    return reinterpret_cast<uint32_t*>(row + 8);
  }

  // Appends a row for `key` (absent) to shard `sh` and indexes it: the key
  // and zero counters are written, the values and slots are left to the
  // caller. Requires the shard's writer lock. Returns the row, or
  // nullptr with *status set when the shard is out of memory or rows.
  char* AppendRow(Shard& sh, uint64_t hash, int64_t key,
                  absl::Status* status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(sh.mu);

  // Appends a fresh row for `key` (absent) to shard `sh`: initial value,
  // initial slots, zero counters and last step = `step`. Requires the
  // shard's writer lock. Returns the row, or nullptr with *status set when
  // the shard is out of memory or rows.
  char* InsertRow(Shard& sh, uint64_t hash, int64_t key, int64_t step,
                  absl::Status* status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(sh.mu);

  // SparseTableInitFromDense runs at most once per table: it holds
  // dense_init_mu() while it inserts and then sets dense_initialized().
  bool dense_initialized() const {
    return dense_initialized_.load(std::memory_order_acquire);
  }
  void set_dense_initialized() {
    dense_initialized_.store(true, std::memory_order_release);
  }
  absl::Mutex* dense_init_mu() { return &dense_init_mu_; }

  // Applies the table's optimizer to one row.
  void ApplyUpdate(char* row, const float* grad, float lr) const;

 private:
  const TableConfig config_;
  const int shard_bits_;
  ChunkPool pool_;  // outlives the shards
  std::vector<std::unique_ptr<Shard>> shards_;
  std::atomic<int64_t> step_{0};
  absl::Mutex dense_init_mu_;
  std::atomic<bool> dense_initialized_{false};
};

// Locks every shard in index order (the one global lock order; pull and
// push hold one shard lock at a time, so this cannot deadlock with them).
// Rule for every kernel: never wait for the CPU thread pool while holding a
// shard lock (pool threads may be blocked on that lock).
class AllShardsLock {
 public:
  AllShardsLock(SparseTable* table, bool exclusive);
  ~AllShardsLock();
  AllShardsLock(const AllShardsLock&) = delete;
  AllShardsLock& operator=(const AllShardsLock&) = delete;

 private:
  SparseTable* table_;
  bool exclusive_;
};

// Memory for the temporaries of one kernel call, handed out in 64-byte
// aligned pieces. Up to kReusedBytes it is a buffer of the calling thread,
// reused by that thread's next call: TF's default CPU allocator hands out
// fresh pages for every large temporary (a page fault per 4 KiB). Larger
// requests get a temporary tensor. A thread runs one kernel call at a time
// (it waits until the call's parallel work is done), so its buffer is never
// shared by two calls.
class CallScratch {
 public:
  static constexpr size_t kReusedBytes = size_t{32} << 20;
  static size_t Round(size_t bytes) { return (bytes + 63) & ~size_t{63}; }

  // Makes `bytes` (the sum of the Round()ed pieces) available.
  absl::Status Reserve(tensorflow::OpKernelContext* ctx, size_t bytes);

  // The next `count` elements of T (uninitialised).
  template <typename T>
  T* Take(size_t count) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += Round(count * sizeof(T));
    return p;
  }

 private:
  char* base_ = nullptr;
  size_t used_ = 0;
  tensorflow::Tensor temp_;
};

// A batch's keys grouped by shard: entries[begin[s], begin[s+1]) are the
// keys of shard s with their batch positions, in batch order.
struct GroupedKey {
  int64_t key;
  int64_t pos;
};
struct KeyGroups {
  std::vector<int64_t> begin;  // num_shards + 1 offsets
  GroupedKey* entries = nullptr;
};

// Scratch bytes GroupKeysByHashPrefix takes for n keys.
inline size_t GroupScratchBytes(int64_t n) {
  return CallScratch::Round(n * sizeof(GroupedKey)) +
         CallScratch::Round(n * sizeof(uint16_t));
}

// One pass over the keys (split across the CPU pool for large batches):
// a counting sort by ShardOfHash(KeyHash(key), bits), i.e. into 2^bits
// groups of consecutive shards (bits <= 16); no per-key allocation.
void GroupKeysByHashPrefix(tensorflow::OpKernelContext* ctx, const int64_t* keys, int64_t n,
                           int bits, CallScratch* scratch, KeyGroups* groups);

// GroupKeysByHashPrefix by the table's shards.
inline void GroupKeysByShard(tensorflow::OpKernelContext* ctx, const SparseTable& table,
                             const int64_t* keys, int64_t n, CallScratch* scratch,
                             KeyGroups* groups) {
  GroupKeysByHashPrefix(ctx, keys, n, table.shard_bits(), scratch, groups);
}

}  // namespace sparse_table

namespace functor {

// How a pull gives its rows: one per key (kNone), or one per group of keys
// (RowGroups), their rows' sum (kSum) or mean (kMean).
enum class PullCombiner { kNone, kSum, kMean };

// Groups of keys that share one row: an output row of a combining pull (the
// sum of their rows) or a gradient row of a push (used for each of them).
// Group r is keys [Begin(r), Begin(r + 1)), for r in [0, count):
// `keys_per_group` consecutive keys each (the last axis of dense keys), or,
// with `splits` (count + 1 offsets from 0 to the number of keys,
// nondecreasing), the rows of ragged keys, which may be empty.
struct RowGroups {
  int64_t count = 0;
  int64_t keys_per_group = 1;
  const int64_t* splits = nullptr;
  int64_t Begin(int64_t r) const { return splits != nullptr ? splits[r] : r * keys_per_group; }
  // The group of key i (in [0, number of keys)): the last one starting at
  // or before it.
  int64_t GroupOf(int64_t i) const {
    if (splits == nullptr) return i / keys_per_group;
    return std::upper_bound(splits, splits + count + 1, i) - splits - 1;
  }
};

// values[i, :] = row of keys[i]; missing keys get a new row (insert_missing,
// subject to admission) or read their initial value. With a combiner,
// values[r, :] = the sum (or mean) of the rows of group r's keys, added in
// key order (an empty group gives zeros).
template <typename Device>
struct SparseTablePull {
  absl::Status operator()(tensorflow::OpKernelContext* ctx,
                          sparse_table::SparseTable* table, const int64_t* keys,
                          int64_t n, bool insert_missing, PullCombiner combiner,
                          const RowGroups& groups, float* values);
};

// Advances the table's step (returned in *step), sums the gradients of
// equal keys, then applies the table's optimizer once per distinct key. The
// keys of group r take the gradient grads[r, :] (groups.count rows, fewer
// than 2^32; a plain push has a group per key).
template <typename Device>
struct SparseTablePush {
  absl::Status operator()(tensorflow::OpKernelContext* ctx,
                          sparse_table::SparseTable* table, const int64_t* keys,
                          int64_t n, const float* grads, const RowGroups& groups,
                          float learning_rate, int64_t* step);
};

}  // namespace functor
}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_SPARSE_TABLE_OP_H_
