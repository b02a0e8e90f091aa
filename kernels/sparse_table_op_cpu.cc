// See docs in ../ops/sparse_table_ops.cc.
//
// The SparseTable resource and the CPU pull/push algorithms. A pull reads
// the batch in order, in chunks the threads share out, under every shard's
// reader lock; only the keys it missed are grouped by shard
// (GroupKeysByShard: a parallel counting sort that keeps batch order inside
// each shard) and inserted. A push splits the batch into parts that own
// disjoint ranges of shards (about four per thread): each part sums its
// keys' gradients in batch order, then updates its shards one at a time
// under their writer locks, so no two threads of one op ever wait for the
// same shard lock.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "absl/base/attributes.h"
#include "absl/base/optimization.h"
#include "kernels/common/cpu_parallel.h"
#include "kernels/sparse_table_op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/lib/core/errors.h"
#include "tensorflow/core/lib/strings/str_util.h"
#include "tensorflow/core/lib/strings/strcat.h"

namespace hpc_ops {
namespace sparse_table {

using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using Status = absl::Status;
namespace errors = ::hpc_ops::sparse_table::errors;

// ---------------------------------------------------------------------------
// TableConfig

namespace {

Status ParseInitializer(const std::string& s, InitializerKind* k) {
  if (s == "zeros") *k = InitializerKind::kZeros;
  else if (s == "uniform") *k = InitializerKind::kUniform;
  else if (s == "truncated_normal") *k = InitializerKind::kTruncatedNormal;
  else
    return errors::InvalidArgument(
        "SparseTableHandle: initializer must be 'zeros', 'uniform' or "
        "'truncated_normal', got '", s, "'");
  return Status();
}

Status ParseOptimizer(const std::string& s, OptimizerKind* k) {
  if (s == "sgd") *k = OptimizerKind::kSgd;
  else if (s == "adagrad") *k = OptimizerKind::kAdagrad;
  else if (s == "adam") *k = OptimizerKind::kAdam;
  else if (s == "ftrl") *k = OptimizerKind::kFtrl;
  else
    return errors::InvalidArgument(
        "SparseTableHandle: optimizer must be 'sgd', 'adagrad', 'adam' or "
        "'ftrl', got '", s, "'");
  return Status();
}

const char* InitializerName(InitializerKind k) {
  switch (k) {
    case InitializerKind::kZeros: return "zeros";
    case InitializerKind::kUniform: return "uniform";
    case InitializerKind::kTruncatedNormal: return "truncated_normal";
  }
  return "?";
}

Status CheckFinite(const char* name, float v, float lo, bool lo_open,
                   float hi = std::numeric_limits<float>::infinity(),
                   bool hi_open = true) {
  const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) &&
                  (hi_open ? v < hi : v <= hi);
  if (ok) return Status();
  return errors::InvalidArgument(
      "SparseTableHandle: attr ", name, "=", v, " must be finite and ",
      lo_open ? "> " : ">= ", lo,
      std::isinf(hi) ? std::string()
                     : absl::StrCat(hi_open ? " and < " : " and <= ", hi));
}

}  // namespace

const char* OptimizerName(OptimizerKind k) {
  switch (k) {
    case OptimizerKind::kSgd: return "sgd";
    case OptimizerKind::kAdagrad: return "adagrad";
    case OptimizerKind::kAdam: return "adam";
    case OptimizerKind::kFtrl: return "ftrl";
  }
  return "?";
}

Status TableConfig::FromAttrs(OpKernelConstruction* ctx, TableConfig* c) {
  std::string init, opt;
  int64_t num_shards = 0;
  TF_RETURN_IF_ERROR(ctx->GetAttr("dim", &c->dim));
  TF_RETURN_IF_ERROR(ctx->GetAttr("initializer", &init));
  TF_RETURN_IF_ERROR(ctx->GetAttr("init_scale", &c->init_scale));
  TF_RETURN_IF_ERROR(ctx->GetAttr("seed", &c->seed));
  TF_RETURN_IF_ERROR(ctx->GetAttr("optimizer", &opt));
  TF_RETURN_IF_ERROR(ctx->GetAttr("initial_accumulator_value",
                                  &c->initial_accumulator_value));
  TF_RETURN_IF_ERROR(ctx->GetAttr("epsilon", &c->epsilon));
  TF_RETURN_IF_ERROR(ctx->GetAttr("beta1", &c->beta1));
  TF_RETURN_IF_ERROR(ctx->GetAttr("beta2", &c->beta2));
  TF_RETURN_IF_ERROR(ctx->GetAttr("learning_rate_power", &c->learning_rate_power));
  TF_RETURN_IF_ERROR(ctx->GetAttr("l1", &c->l1));
  TF_RETURN_IF_ERROR(ctx->GetAttr("l2", &c->l2));
  TF_RETURN_IF_ERROR(ctx->GetAttr("num_shards", &num_shards));
  TF_RETURN_IF_ERROR(ctx->GetAttr("admission_min_count", &c->admission_min_count));
  TF_RETURN_IF_ERROR(ctx->GetAttr("track_usage", &c->track_usage));

  if (c->dim < 1 || c->dim > kMaxDim) {
    return errors::InvalidArgument("SparseTableHandle: attr dim=", c->dim,
                                   " must be in [1, ", kMaxDim, "]");
  }
  if (num_shards < 1 || num_shards > kMaxShards ||
      (num_shards & (num_shards - 1)) != 0) {
    return errors::InvalidArgument(
        "SparseTableHandle: attr num_shards=", num_shards,
        " must be a power of two in [1, ", kMaxShards, "]");
  }
  c->num_shards = static_cast<int>(num_shards);
  if (c->admission_min_count < 0) {
    return errors::InvalidArgument("SparseTableHandle: attr admission_min_count=",
                                   c->admission_min_count, " must be >= 0");
  }
  TF_RETURN_IF_ERROR(ParseInitializer(init, &c->initializer));
  TF_RETURN_IF_ERROR(ParseOptimizer(opt, &c->optimizer));
  TF_RETURN_IF_ERROR(CheckFinite("init_scale", c->init_scale, 0.0f, false));
  switch (c->optimizer) {
    case OptimizerKind::kSgd:
      break;
    case OptimizerKind::kAdagrad:
      TF_RETURN_IF_ERROR(CheckFinite("initial_accumulator_value",
                                     c->initial_accumulator_value, 0.0f, false));
      TF_RETURN_IF_ERROR(CheckFinite("epsilon", c->epsilon, 0.0f, false));
      if (c->epsilon == 0.0f && c->initial_accumulator_value == 0.0f) {
        return errors::InvalidArgument(
            "SparseTableHandle: adagrad needs epsilon > 0 or "
            "initial_accumulator_value > 0 (else a zero gradient divides 0 "
            "by 0)");
      }
      break;
    case OptimizerKind::kAdam:
      TF_RETURN_IF_ERROR(CheckFinite("beta1", c->beta1, 0.0f, false, 1.0f, true));
      TF_RETURN_IF_ERROR(CheckFinite("beta2", c->beta2, 0.0f, false, 1.0f, true));
      TF_RETURN_IF_ERROR(CheckFinite("epsilon", c->epsilon, 0.0f, true));
      break;
    case OptimizerKind::kFtrl:
      TF_RETURN_IF_ERROR(CheckFinite("initial_accumulator_value",
                                     c->initial_accumulator_value, 0.0f, false));
      TF_RETURN_IF_ERROR(CheckFinite("l1", c->l1, 0.0f, false));
      TF_RETURN_IF_ERROR(CheckFinite("l2", c->l2, 0.0f, false));
      if (!std::isfinite(c->learning_rate_power) || c->learning_rate_power > 0.0f) {
        return errors::InvalidArgument(
            "SparseTableHandle: attr learning_rate_power=", c->learning_rate_power,
            " must be finite and <= 0");
      }
      break;
  }
  return Status();
}

bool TableConfig::operator==(const TableConfig& o) const {
  return dim == o.dim && initializer == o.initializer &&
         init_scale == o.init_scale && seed == o.seed &&
         optimizer == o.optimizer &&
         initial_accumulator_value == o.initial_accumulator_value &&
         epsilon == o.epsilon && beta1 == o.beta1 && beta2 == o.beta2 &&
         learning_rate_power == o.learning_rate_power && l1 == o.l1 &&
         l2 == o.l2 && num_shards == o.num_shards &&
         admission_min_count == o.admission_min_count &&
         track_usage == o.track_usage;
}

std::string TableConfig::DebugString() const {
  return absl::StrCat(
      "dim=", dim, " initializer=", InitializerName(initializer), "(",
      init_scale, ", seed=", seed, ") optimizer=", OptimizerName(optimizer),
      "(initial_accumulator_value=", initial_accumulator_value,
      ", epsilon=", epsilon, ", beta1=", beta1, ", beta2=", beta2,
      ", learning_rate_power=", learning_rate_power, ", l1=", l1, ", l2=", l2,
      ") num_shards=", num_shards, " admission_min_count=", admission_min_count,
      " track_usage=", track_usage ? "true" : "false");
}

// ---------------------------------------------------------------------------
// Initial values

void InitialValues(const TableConfig& c, int64_t key, float* out) {
  const int64_t d = c.dim;
  if (c.initializer == InitializerKind::kZeros || c.init_scale == 0.0f) {
    std::memset(out, 0, d * sizeof(float));
    return;
  }
  constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
  const uint64_t base =
      SplitMix64(SplitMix64(static_cast<uint64_t>(c.seed)) ^ static_cast<uint64_t>(key));
  auto word = [base](uint64_t counter) { return SplitMix64(base + counter * kGamma); };
  if (c.initializer == InitializerKind::kUniform) {
    // u in [0, 1) on a 2^-24 grid, then scale * (2u - 1) in [-scale, scale).
    for (int64_t j = 0; j < d; ++j) {
      const float u = static_cast<float>(word(j) >> 40) * (1.0f / 16777216.0f);
      out[j] = c.init_scale * (2.0f * u - 1.0f);
    }
    return;
  }
  // Truncated normal (|z| <= 2, like tf.random.truncated_normal): Box-Muller
  // on counters (column pair, attempt). Attempt a of pair p gives two
  // independent normals, r cos(t) for column 2p and r sin(t) for column
  // 2p+1; each column takes the first of its values within two standard
  // deviations (95.4 % of draws). 64 failed attempts (p < 1e-85) give 0.
  constexpr int kAttempts = 64;
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (int64_t c0 = 0; c0 < d; c0 += 2) {
    const bool has_pair = c0 + 1 < d;
    bool done0 = false, done1 = !has_pair;
    float v0 = 0.0f, v1 = 0.0f;
    for (int a = 0; a < kAttempts && !(done0 && done1); ++a) {
      const uint64_t ctr = (static_cast<uint64_t>(c0 / 2) * kAttempts + a) * 2;
      const double u1 = (static_cast<double>(word(ctr) >> 11) + 1.0) * 0x1.0p-53;
      const double u2 = static_cast<double>(word(ctr + 1) >> 11) * 0x1.0p-53;
      const double r = std::sqrt(-2.0 * std::log(u1));
      double sin_t, cos_t;
      sincos(kTwoPi * u2, &sin_t, &cos_t);
      const double z0 = r * cos_t, z1 = r * sin_t;
      if (!done0 && std::fabs(z0) <= 2.0) {
        v0 = static_cast<float>(z0 * c.init_scale);
        done0 = true;
      }
      if (!done1 && std::fabs(z1) <= 2.0) {
        v1 = static_cast<float>(z1 * c.init_scale);
        done1 = true;
      }
    }
    out[c0] = v0;
    if (has_pair) out[c0 + 1] = v1;
  }
}

// ---------------------------------------------------------------------------
// SparseTable

SparseTable::SparseTable(const TableConfig& config)
    : config_(config), shard_bits_(config.shard_bits()), pool_(config.row_bytes()) {
  shards_.reserve(config_.num_shards);
  for (int s = 0; s < config_.num_shards; ++s) {
    shards_.push_back(std::make_unique<Shard>(&pool_));
  }
}

std::string SparseTable::DebugString() const {
  return absl::StrCat("SparseTable(", config_.DebugString(), ")");
}

int64_t SparseTable::Size() const {
  int64_t n = 0;
  for (const auto& sh : shards_) {
    absl::ReaderMutexLock l(&sh->mu);
    n += static_cast<int64_t>(sh->arena.size());
  }
  return n;
}

int64_t SparseTable::MemoryUsed() const {
  int64_t bytes = sizeof(*this) + pool_.BytesAllocated();
  for (const auto& sh : shards_) {
    absl::ReaderMutexLock l(&sh->mu);
    bytes += sizeof(Shard) + sh->arena.BookkeepingBytes() +
             sh->index.BytesAllocated() + sh->candidates.BytesAllocated();
  }
  return bytes;
}

char* SparseTable::AppendRow(Shard& sh, uint64_t hash, int64_t key, Status* status) {
  const uint64_t n = sh.arena.size();
  if (n >= ShardIndex::kMaxRows) {
    *status = errors::ResourceExhausted(
        "SparseTable: a shard reached ", ShardIndex::kMaxRows,
        " rows; create the table with more shards");
    return nullptr;
  }
  if (!sh.index.HasRoomFor(n + 1) && !sh.index.Grow(sh.arena)) {
    *status = errors::ResourceExhausted(
        "SparseTable: out of memory growing the index of a shard with ", n, " rows");
    return nullptr;
  }
  const int64_t r = sh.arena.Append();
  if (r < 0) {
    *status = errors::ResourceExhausted(
        "SparseTable: out of memory adding a row to a shard with ", n, " rows");
    return nullptr;
  }
  sh.index.Insert(hash, static_cast<uint32_t>(r));
  char* row = sh.arena.Row(r);
  std::memcpy(row, &key, sizeof(key));
  // Zero the counters (and their padding) and the row's tail padding; the
  // caller writes the values and slots.
  const int64_t header = config_.header_bytes();
  std::memset(row + sizeof(key), 0, header - sizeof(key));
  const int64_t end = header + (1 + config_.num_slots()) * config_.dim * 4;
  std::memset(row + end, 0, config_.row_bytes() - end);
  return row;
}

char* SparseTable::InsertRow(Shard& sh, uint64_t hash, int64_t key, int64_t step,
                             Status* status) {
  char* row = AppendRow(sh, hash, key, status);
  if (row == nullptr) return nullptr;
  float* w = Values(row);
  InitialValues(config_, key, w);
  const int64_t d = config_.dim;
  float* slots = w + d;
  switch (config_.optimizer) {
    case OptimizerKind::kAdagrad:
      std::fill(slots, slots + d, config_.initial_accumulator_value);
      break;
    case OptimizerKind::kFtrl:  // accumulator, linear = 0
      std::fill(slots, slots + d, config_.initial_accumulator_value);
      std::fill(slots + d, slots + 2 * d, 0.0f);
      break;
    case OptimizerKind::kAdam:  // m = v = 0 (the step counter is 0)
      std::fill(slots, slots + 2 * d, 0.0f);
      break;
    case OptimizerKind::kSgd:
      break;
  }
  if (config_.track_usage) {
    Counters(row)[config_.last_step_counter()] = StepCounter(step);
  }
  return row;
}

void SparseTable::ApplyUpdate(char* row, const float* grad, float lr) const {
  float* w = Values(row);
  float* slots = w + config_.dim;
  uint32_t* counters = Counters(row);
  switch (config_.optimizer) {
    case OptimizerKind::kSgd: SgdUpdate()(config_, lr, grad, w, slots, counters); break;
    case OptimizerKind::kAdagrad: AdagradUpdate()(config_, lr, grad, w, slots, counters); break;
    case OptimizerKind::kAdam: AdamUpdate()(config_, lr, grad, w, slots, counters); break;
    case OptimizerKind::kFtrl: FtrlUpdate()(config_, lr, grad, w, slots, counters); break;
  }
}

AllShardsLock::AllShardsLock(SparseTable* table, bool exclusive)
    : table_(table), exclusive_(exclusive) {
  for (int s = 0; s < table_->num_shards(); ++s) {
    if (exclusive_) table_->shard(s).mu.Lock();
    else table_->shard(s).mu.ReaderLock();
  }
}

AllShardsLock::~AllShardsLock() {
  for (int s = table_->num_shards() - 1; s >= 0; --s) {
    if (exclusive_) table_->shard(s).mu.Unlock();
    else table_->shard(s).mu.ReaderUnlock();
  }
}

// ---------------------------------------------------------------------------
// Grouping by shard

absl::Status CallScratch::Reserve(OpKernelContext* ctx, size_t bytes) {
  used_ = 0;
  if (bytes > kReusedBytes) {
    TF_RETURN_IF_ERROR(ctx->allocate_temp(
        tensorflow::DT_INT8, tensorflow::TensorShape({static_cast<int64_t>(bytes) + 64}),
        &temp_));
    base_ = reinterpret_cast<char*>(
        (reinterpret_cast<uintptr_t>(temp_.flat<int8_t>().data()) + 63) & ~uintptr_t{63});
    return Status();
  }
  struct ThreadBuffer {
    char* data = nullptr;
    size_t size = 0;
    ~ThreadBuffer() { tensorflow::port::AlignedFree(data); }
  };
  thread_local ThreadBuffer buffer;
  if (buffer.size < bytes) {
    const size_t grown = std::min(kReusedBytes, std::max(bytes, 2 * buffer.size));
    void* p = tensorflow::port::AlignedMalloc(grown, std::align_val_t{64});
    if (p == nullptr) {
      return errors::ResourceExhausted("SparseTable: out of memory for ", grown,
                                       " bytes of scratch");
    }
    tensorflow::port::AlignedFree(buffer.data);
    buffer.data = static_cast<char*>(p);
    buffer.size = grown;
  }
  base_ = buffer.data;
  return Status();
}

void GroupKeysByHashPrefix(OpKernelContext* ctx, const int64_t* keys, int64_t n, int bits,
                           CallScratch* scratch, KeyGroups* g) {
  const int G = 1 << bits;
  g->begin.assign(G + 1, 0);
  g->entries = scratch->Take<GroupedKey>(n);
  uint16_t* group_of = scratch->Take<uint16_t>(n);
  if (n == 0) return;

  // Blocks of at least 16k keys, at most one per thread: counts per
  // (block, group), then each block scatters into its own ranges, which
  // keeps batch order inside every group. Each block counts in its own
  // vector (blocks' counters sharing cache lines cost tens of cycles a key).
  const int blocks = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(CpuNumThreads(ctx), n / 16384)));
  auto block_begin = [&](int64_t b) { return n * b / blocks; };
  std::vector<int64_t> counts(static_cast<size_t>(blocks) * G, 0);
  CpuShareChunks(ctx, blocks, blocks, [&](int64_t b) {
    std::vector<int64_t> c(G, 0);
    const int64_t end = block_begin(b + 1);
    for (int64_t i = block_begin(b); i < end; ++i) {
      const int s = ShardOfHash(KeyHash(keys[i]), bits);
      group_of[i] = static_cast<uint16_t>(s);
      ++c[s];
    }
    std::copy(c.begin(), c.end(), counts.begin() + static_cast<size_t>(b) * G);
  });
  int64_t total = 0;
  for (int s = 0; s < G; ++s) {
    g->begin[s] = total;
    for (int b = 0; b < blocks; ++b) {
      int64_t& c = counts[static_cast<size_t>(b) * G + s];
      const int64_t k = c;
      c = total;  // becomes the block's write cursor for group s
      total += k;
    }
  }
  g->begin[G] = total;
  GroupedKey* out = g->entries;
  CpuShareChunks(ctx, blocks, blocks, [&](int64_t b) {
    std::vector<int64_t> cursor(counts.begin() + static_cast<size_t>(b) * G,
                                counts.begin() + static_cast<size_t>(b + 1) * G);
    const int64_t end = block_begin(b + 1);
    for (int64_t i = block_begin(b); i < end; ++i) {
      GroupedKey& e = out[cursor[group_of[i]]++];
      e.key = keys[i];
      e.pos = i;
    }
  });
}

}  // namespace sparse_table

// ---------------------------------------------------------------------------
// Pull

namespace functor {

using CPUDevice = Eigen::ThreadPoolDevice;
using Status = absl::Status;
using tensorflow::OpKernelContext;
namespace errors = ::hpc_ops::sparse_table::errors;
using sparse_table::GroupedKey;
using sparse_table::KeyGroups;
using sparse_table::KeyHash;
using sparse_table::Shard;
using sparse_table::SparseTable;

namespace {

// Shard loops hide memory latency with two prefetch stages: key i + 16's
// index bucket, and key i + 8's (probable) row, found through its bucket.
constexpr int64_t kBucketAhead = 16;
constexpr int64_t kRowAhead = 8;
constexpr int64_t kRing = 64;  // power of two > every "ahead" distance
// The pull's batch-order loop does less work per key (most keys of a skewed
// batch are hot and hit the caches), so it looks further ahead for the rare
// cold keys: a bucket must arrive before its row can be prefetched. Rows of
// up to 16 floats (two lines to prefetch) are fetched 32 keys ahead and
// their buckets 64; wider rows 16 and 32. In-process A/B on an Intel Xeon
// VM against 16 and 32: pull calls 1.02x-1.10x faster at 1e7 ids, D 16,
// 1.02x-1.03x at D 8, 1.08x-1.12x at 1e6 ids, D 16 (48/24 and 96/48 as fast
// as 64/32, 24/12 slower), 0.98x-1.00x at D 64, where a row is five lines.
template <int kDim>
constexpr int64_t PullRowAhead() {
  return kDim > 0 && kDim <= 16 ? 32 : 16;
}
template <int kDim>
constexpr int64_t PullBucketAhead() {
  return 2 * PullRowAhead<kDim>();
}
constexpr int64_t kPullRing = 128;  // power of two > every pull distance

// Prefetches the cache lines of [p, p + bytes) (for writing if `write`):
// those of p, p + 64, ... below p + bytes - 1, and that of the last byte,
// so the number of prefetches depends on `bytes` alone (the last line may
// be prefetched twice). A loop over the lines the range touches would run
// once or twice for a 40-byte row (a dim-8 value and its key), as the row
// happens to start: a branch that cannot be predicted, which made dim-8
// pulls 1.14x-1.30x as long (1.2x-1.5x with Adam and FTRL rows).
template <bool write>
inline void PrefetchBytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes - 1; off += 64) __builtin_prefetch(c + off, write ? 1 : 0);
  __builtin_prefetch(c + bytes - 1, write ? 1 : 0);
}

// Whether `candidate`, the row a prefetch stage found for a key's hash (or
// nullptr), is the row of `key`, as it almost always is.
inline bool HoldsKey(const char* candidate, int64_t key) {
  return candidate != nullptr && sparse_table::RowKey(candidate) == key;
}

// The row of `key` (hash `hash`) in `sh`, or nullptr, found through the
// index: for the rare key whose candidate is not its row, so out of line.
ABSL_ATTRIBUTE_NOINLINE char* FindRowSlow(const Shard& sh, uint64_t hash, int64_t key) {
  const int64_t r = sh.index.Find(hash, key, sh.arena);
  return r >= 0 ? sh.arena.Row(r) : nullptr;
}

// The row of `key` (hash `hash`) in `sh`, or nullptr: `candidate` when it
// holds the key, else the one the index finds.
inline char* FindRow(const Shard& sh, uint64_t hash, int64_t key, char* candidate) {
  if (ABSL_PREDICT_TRUE(HoldsKey(candidate, key))) return candidate;
  return FindRowSlow(sh, hash, key);
}

// Calls fn(i, KeyHash(e[i].key), candidate) for i in [0, k), in order,
// prefetching the bucket and then the first `row_bytes` of the row of keys
// further ahead; `candidate` is the row prefetched for e[i].key (almost
// always its row: see FindRow) or nullptr.
template <typename Fn>
void ForEachKeyPrefetched(const Shard& sh, const GroupedKey* e, int64_t k,
                          int64_t row_bytes, Fn fn)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  uint64_t hashes[kRing];
  char* candidates[kRing];
  auto bucket_stage = [&](int64_t j) {
    const uint64_t h = KeyHash(e[j].key);
    hashes[j & (kRing - 1)] = h;
    sh.index.Prefetch(h);
  };
  auto row_stage = [&](int64_t j) {
    const int64_t r = sh.index.FirstCandidate(hashes[j & (kRing - 1)]);
    char* row = r >= 0 ? sh.arena.Row(r) : nullptr;
    candidates[j & (kRing - 1)] = row;
    if (row != nullptr) PrefetchBytes<false>(row, row_bytes);
  };
  const int64_t a = std::min(k, kBucketAhead);
  for (int64_t j = 0; j < a; ++j) bucket_stage(j);
  const int64_t b = std::min(k, kRowAhead);
  for (int64_t j = 0; j < b; ++j) row_stage(j);
  for (int64_t i = 0; i < k; ++i) {
    if (i + kBucketAhead < k) bucket_stage(i + kBucketAhead);
    if (i + kRowAhead < k) row_stage(i + kRowAhead);
    fn(i, hashes[i & (kRing - 1)], candidates[i & (kRing - 1)]);
  }
}

// Copies one row of floats inline (a libc call per row costs more than the
// copy for the usual widths).
inline void CopyFloats(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX__)
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_loadu_ps(src + j));
  }
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

// dst[0, n) += src[0, n), one add per column (the same result at any width).
inline void AddFloats(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX__)
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_add_ps(_mm256_loadu_ps(dst + j), _mm256_loadu_ps(src + j)));
  }
#endif
  for (; j < n; ++j) dst[j] += src[j];
}

// A pull whose output is at least this large writes it with streaming
// (non-temporal) stores: such an output does not stay in the caches for its
// consumer anyway, and ordinary stores would first read every output line
// and evict the table's rows for it. Measured in one process on a 2-vCPU
// VM with 32 MiB of L3, 65,536 keys over 1e7 ids, pull alone / pull then
// reduce_sum(v * C): D 64 (16 MiB) 1.23-1.25x / 1.17-1.18x faster,
// D 32 (8 MiB) 1.13x / 1.09-1.11x, D 16 (4 MiB) 1.01-1.02x / 0.97-0.99x.
constexpr int64_t kStreamOutputBytes = int64_t{8} << 20;

// Whether a pull of n rows of `dim` floats into `out` streams its output
// (StreamFloats): large enough, and every row a whole number of aligned
// 32-byte lanes.
inline bool StreamPullOutput(const float* out, int64_t n, int64_t dim) {
#if defined(__AVX__)
  return dim % 8 == 0 && reinterpret_cast<uintptr_t>(out) % 32 == 0 &&
         n * dim * static_cast<int64_t>(sizeof(float)) >= kStreamOutputBytes;
#else
  return false;
#endif
}

// CopyFloats with streaming stores, for StreamPullOutput(); dst 32-byte
// aligned and n a multiple of 8. The writing thread must StoreFence()
// before another thread may read dst.
inline void StreamFloats(float* dst, const float* src, int64_t n) {
#if defined(__AVX__)
  for (int64_t j = 0; j < n; j += 8) {
    _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
  }
#else
  CopyFloats(dst, src, n);
#endif
}

inline void StoreFence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Where PullPresent puts the rows it reads, for a table of dim kDim (0: a
// dim known only at run time). RowPerKey writes key i's row to row i of the
// output (kStream: with StreamFloats, see StreamPullOutput).
template <int kDim, bool kStream>
class RowPerKey {
 public:
  RowPerKey(float* out, int64_t dim) : out_(out), dim_(dim) {}
  void Row(int64_t i, const float* src) {
    if (kStream) {
      StreamFloats(out_ + i * dim(), src, dim());
    } else {
      CopyFloats(out_ + i * dim(), src, dim());
    }
  }
  void Initial(const sparse_table::TableConfig& c, int64_t i, int64_t key) {
    sparse_table::InitialValues(c, key, out_ + i * dim());
  }
  void Missing(int64_t) {}
  void Done() {
    if (kStream) StoreFence();
  }

 private:
  int64_t dim() const { return kDim > 0 ? kDim : dim_; }
  float* const out_;
  const int64_t dim_;
};

// SumPerRow sums the rows of each group of keys (RowGroups), in key order,
// into the group's output row, starting with the first non-empty group from
// group `first` on (the caller writes empty groups' zeros), and divides the
// sum by the group's size for a mean, as reduce_sum / reduce_mean over the
// keys' last axis do. A group with a missing key gets an unfinished row:
// the caller reads it again once the key has its row.
template <int kDim>
class SumPerRow {
 public:
  SumPerRow(float* values, int64_t dim, const RowGroups& groups, int64_t first, bool mean)
      : values_(values), dim_(dim), groups_(groups), mean_(mean), r_(first - 1) {
    NextGroup(groups.Begin(first));
  }
  void Row(int64_t, const float* src) { Add(src); }
  void Initial(const sparse_table::TableConfig& c, int64_t, int64_t key) {
    if (initial_ == nullptr) initial_ = std::make_unique<float[]>(dim());
    sparse_table::InitialValues(c, key, initial_.get());
    Add(initial_.get());
  }
  void Missing(int64_t) { Next(); }
  void Done() {}

 private:
  int64_t dim() const { return kDim > 0 ? kDim : dim_; }
  void Add(const float* src) {
    if (k_ == begin_) {
      CopyFloats(row_, src, dim());
    } else {
      AddFloats(row_, src, dim());
    }
    Next();
  }
  void Next() {
    if (++k_ < end_) return;
    if (mean_) {
      const float count = static_cast<float>(end_ - begin_);
      for (int64_t j = 0; j < dim(); ++j) row_[j] /= count;
    }
    NextGroup(k_);
  }
  // Moves to the first non-empty group after r_, whose first key is k.
  void NextGroup(int64_t k) {
    k_ = begin_ = k;
    do {
      ++r_;
    } while (r_ < groups_.count && groups_.Begin(r_ + 1) == k);
    end_ = r_ < groups_.count ? groups_.Begin(r_ + 1) : k;
    row_ = values_ + r_ * dim();
  }
  float* const values_;
  const int64_t dim_;
  const RowGroups& groups_;
  const bool mean_;
  int64_t r_;                  // the group being summed
  int64_t k_ = 0;              // the next key
  int64_t begin_ = 0, end_ = 0;  // the group's keys
  float* row_ = nullptr;
  std::unique_ptr<float[]> initial_;  // a missing key's initial value (serving)
};

// Reads the rows of keys[begin, end) that exist into `out` (a RowPerKey or a
// SumPerRow, in batch order) and stores the batch positions of the others
// in misses[0, m), returning m. The caller holds every shard's reader lock.
// Without `insert_missing` a missing key reads its initial value at once
// and is not counted. kDim: the table's dim, or 0 for a dim known only at
// run time.
template <int kDim, typename Out>
int64_t PullPresent(SparseTable& t, const int64_t* keys, int64_t begin, int64_t end,
                    bool insert_missing, Out& out, int64_t* misses)
    ABSL_NO_THREAD_SAFETY_ANALYSIS {
  constexpr int64_t kPullBucketAhead = PullBucketAhead<kDim>();
  constexpr int64_t kPullRowAhead = PullRowAhead<kDim>();
  static_assert(kPullBucketAhead < kPullRing, "the ring must hold every key in flight");
  const sparse_table::TableConfig& c = t.config();
  const int64_t dim = kDim > 0 ? kDim : c.dim;
  const int64_t value_offset = c.header_bytes();
  const int64_t row_bytes = value_offset + dim * static_cast<int64_t>(sizeof(float));
  uint64_t hashes[kPullRing];
  const Shard* shards[kPullRing];
  char* rows[kPullRing];
  auto bucket_stage = [&](int64_t j) {
    const uint64_t h = KeyHash(keys[j]);
    const Shard* sh = &t.shard(t.ShardOf(h));
    hashes[j & (kPullRing - 1)] = h;
    shards[j & (kPullRing - 1)] = sh;
    sh->index.Prefetch(h);
  };
  auto row_stage = [&](int64_t j) {
    const Shard& sh = *shards[j & (kPullRing - 1)];
    const int64_t r = sh.index.FirstCandidate(hashes[j & (kPullRing - 1)]);
    char* row = r >= 0 ? sh.arena.Row(r) : nullptr;
    rows[j & (kPullRing - 1)] = row;
    if (row != nullptr) PrefetchBytes<false>(row, row_bytes);
  };
  const int64_t a = std::min(end, begin + kPullBucketAhead);
  for (int64_t j = begin; j < a; ++j) bucket_stage(j);
  const int64_t b = std::min(end, begin + kPullRowAhead);
  for (int64_t j = begin; j < b; ++j) row_stage(j);
  int64_t m = 0;
  auto read = [&](int64_t i) {
    // The row prefetched for this key is almost always its own: then the
    // index need not be searched again, nor the row's address recomputed,
    // and the key's hash and shard need not be read back (FindRow's
    // arguments, loaded before its check: pulls 1.01x faster without).
    const char* row = rows[i & (kPullRing - 1)];
    if (ABSL_PREDICT_FALSE(!HoldsKey(row, keys[i]))) {
      row = FindRowSlow(*shards[i & (kPullRing - 1)], hashes[i & (kPullRing - 1)], keys[i]);
    }
    if (row != nullptr) {
      out.Row(i, reinterpret_cast<const float*>(row + value_offset));
    } else if (insert_missing) {
      misses[m++] = i;
      out.Missing(i);
    } else {
      out.Initial(c, i, keys[i]);
    }
  };
  // The loop without its last kPullBucketAhead keys runs both stages
  // unconditionally (1.01x-1.05x per pull call at D 16, together with the
  // streaming choice made at compile time, in six in-process A/B runs).
  int64_t i = begin;
  for (; i < end - kPullBucketAhead; ++i) {
    bucket_stage(i + kPullBucketAhead);
    row_stage(i + kPullRowAhead);
    read(i);
  }
  for (; i < end; ++i) {
    if (i + kPullRowAhead < end) row_stage(i + kPullRowAhead);
    read(i);
  }
  out.Done();
  return m;
}

// fn(std::integral_constant<int, kDim>()) for a table's dim: loops are
// compiled for the common widths (the row copy and the output offsets then
// have a fixed size: 1.07-1.10x faster pull kernels at dim 8 and 16 in an
// in-process A/B), with kDim 0 for any other width.
template <typename Fn>
auto WithDim(int64_t dim, Fn fn) {
  switch (dim) {
    case 8: return fn(std::integral_constant<int, 8>());
    case 16: return fn(std::integral_constant<int, 16>());
    case 32: return fn(std::integral_constant<int, 32>());
    case 64: return fn(std::integral_constant<int, 64>());
    default: return fn(std::integral_constant<int, 0>());
  }
}

// Creates the rows of one shard's missing keys (subject to admission) and,
// unless `out` is null, reads them into out, under the shard's writer lock.
// A key may have been inserted meanwhile (or earlier in this batch): then
// its row is read.
Status InsertMissing(SparseTable& t, Shard& sh, const GroupedKey* e, int64_t k,
                     int64_t step, float* out) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const sparse_table::TableConfig& c = t.config();
  const int64_t dim = c.dim;
  const int64_t value_offset = c.header_bytes();
  const bool admission = c.admission_min_count > 1;
  absl::MutexLock l(&sh.mu);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t key = e[i].key;
    const uint64_t h = KeyHash(key);
    float* dst = out == nullptr ? nullptr : out + e[i].pos * dim;
    int64_t r = sh.index.Find(h, key, sh.arena);
    if (r >= 0) {
      if (dst) CopyFloats(dst, reinterpret_cast<const float*>(sh.arena.Row(r) + value_offset), dim);
      continue;
    }
    if (admission) {
      if (sh.candidates.Increment(h, key) < static_cast<uint64_t>(c.admission_min_count)) {
        if (dst) sparse_table::InitialValues(c, key, dst);
        continue;
      }
      sh.candidates.Erase(h, key);
    }
    Status s;
    char* row = t.InsertRow(sh, h, key, step, &s);
    if (row == nullptr) return s;
    if (dst) CopyFloats(dst, reinterpret_cast<const float*>(row + value_offset), dim);
  }
  return Status();
}

// Runs fn(shard) for every shard with keys, in parallel, and returns the
// first error in shard order. Each shard is handled by one thread (so no two
// threads of one op contend for a shard lock). Shard sizes are very uneven
// under skewed keys (the shard of the hottest id can hold a tenth of a
// batch), so the threads claim the shards largest first.
template <typename Fn>
Status ForEachShard(OpKernelContext* ctx, const KeyGroups& g, int num_shards,
                    int64_t cost_per_key, Fn fn) {
  std::vector<Status> status(num_shards);
  const int64_t n = g.begin[num_shards];
  std::vector<int> order;
  order.reserve(num_shards);
  for (int s = 0; s < num_shards; ++s) {
    if (g.begin[s + 1] > g.begin[s]) order.push_back(s);
  }
  auto size = [&](int s) { return g.begin[s + 1] - g.begin[s]; };
  const int workers = static_cast<int>(std::min<int64_t>(
      CpuNumThreads(ctx),
      std::max<int64_t>(1, n * cost_per_key / 50000)));  // >= ~20 us of work each
  if (workers > 1) {
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return size(a) > size(b); });
  }
  CpuShareChunks(ctx, static_cast<int64_t>(order.size()), workers,
                 [&](int64_t i) { status[order[i]] = fn(order[i]); });
  for (const Status& s : status) TF_RETURN_IF_ERROR(s);
  return Status();
}

}  // namespace

// A pull reads in batch order: the threads take the batch's chunks in
// order, each thread under every shard's reader lock (taken in shard order,
// like every multi-shard lock here), so rows are never torn while the output
// is written sequentially. Only the keys that were missing
// are then grouped by shard and inserted, each shard under its writer lock.
// A combining pull sums each group's rows as it reads them; a group with a
// missing key is summed again, in key order, once the key has its row.
template <>
Status SparseTablePull<CPUDevice>::operator()(OpKernelContext* ctx, SparseTable* table,
                                              const int64_t* keys, int64_t n,
                                              bool insert_missing, PullCombiner combiner,
                                              const RowGroups& groups, float* values) {
  const bool combine = combiner != PullCombiner::kNone;
  const bool mean = combiner == PullCombiner::kMean;
  const int64_t dim = table->dim();
  if (combine && (groups.splits != nullptr || groups.keys_per_group == 0)) {
    // Empty groups (ragged rows without keys, or every group of keys whose
    // last axis is empty) read no key: their zeros are written here.
    for (int64_t r = 0; r < groups.count; ++r) {
      if (groups.Begin(r + 1) == groups.Begin(r)) std::fill_n(values + r * dim, dim, 0.0f);
    }
  }
  if (n == 0) return Status();
  using sparse_table::CallScratch;
  sparse_table::CallScratch scratch;
  TF_RETURN_IF_ERROR(scratch.Reserve(ctx, 2 * CallScratch::Round(n * sizeof(int64_t)) +
                                              sparse_table::GroupScratchBytes(n)));
  int64_t* misses = scratch.Take<int64_t>(n);
  int64_t m = 0;  // misses, compacted in batch order
  // The batch is read in chunks that the threads claim in order
  // (CpuShareChunks), each thread under every shard's reader lock (taken
  // once per thread): a thread that starts late (the cores are shared with
  // the caller's other threads) leaves its share to the others. Chunks of
  // 4,096 keys shrink to 256 near the end (ShrinkingChunks), so the threads
  // finish within a few microseconds of each other instead of up to one
  // 4,096-key chunk (about 55 us) apart. One thread per 8k keys at most (a
  // thread pays num_shards lock round trips and a hand-off). A combining
  // pull's chunks hold whole groups (as many as hold about as many keys).
  constexpr int64_t kMaxChunk = 4096;
  constexpr int64_t kMinChunk = 256;
  constexpr int64_t kKeysPerThread = 8192;
  const int workers = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(CpuNumThreads(ctx), n / kKeysPerThread)));
  const int64_t per_group = combine ? std::max<int64_t>(1, n / std::max<int64_t>(1, groups.count)) : 1;
  std::vector<int64_t> bounds;  // in groups (keys when not combining)
  ShrinkingChunks(combine ? groups.count : n, workers,
                  std::max<int64_t>(1, kMaxChunk / per_group),
                  std::max<int64_t>(1, kMinChunk / per_group), &bounds);
  const int64_t chunks = static_cast<int64_t>(bounds.size()) - 1;
  auto first_key = [&](int64_t c) { return combine ? groups.Begin(bounds[c]) : bounds[c]; };
  std::vector<int64_t> chunk_misses(chunks, 0);
  const bool stream = !combine && StreamPullOutput(values, n, dim);
  // Reads keys[begin, end) into values; when combining, the keys of the
  // groups from `group` on.
  auto pull = [&](int64_t begin, int64_t end, int64_t group, bool insert, int64_t* miss) {
    return WithDim(dim, [&](auto d) -> int64_t {
      constexpr int kDim = decltype(d)::value;
      if (combine) {
        SumPerRow<kDim> out(values, dim, groups, group, mean);
        return PullPresent<kDim>(*table, keys, begin, end, insert, out, miss);
      }
      if (stream) {
        RowPerKey<kDim, true> out(values, dim);
        return PullPresent<kDim>(*table, keys, begin, end, insert, out, miss);
      }
      RowPerKey<kDim, false> out(values, dim);
      return PullPresent<kDim>(*table, keys, begin, end, insert, out, miss);
    });
  };
  auto all_shards = [&] { return sparse_table::AllShardsLock(table, /*exclusive=*/false); };
  CpuShareChunks(ctx, chunks, workers, all_shards, [&](int64_t c) {
    const int64_t begin = first_key(c);
    chunk_misses[c] = pull(begin, first_key(c + 1), bounds[c], insert_missing, misses + begin);
  });
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = first_key(c);
    if (m != begin && chunk_misses[c] > 0) {
      std::memmove(misses + m, misses + begin, chunk_misses[c] * sizeof(int64_t));
    }
    m += chunk_misses[c];
  }
  if (m == 0) return Status();

  int64_t* miss_keys = scratch.Take<int64_t>(m);
  for (int64_t i = 0; i < m; ++i) miss_keys[i] = keys[misses[i]];
  KeyGroups g;
  GroupKeysByShard(ctx, *table, miss_keys, m, &scratch, &g);
  for (int64_t i = 0; i < m; ++i) g.entries[i].pos = misses[g.entries[i].pos];
  const int64_t step = table->step();
  TF_RETURN_IF_ERROR(
      ForEachShard(ctx, g, table->num_shards(), 400 + 4 * dim, [&](int s) {
        return InsertMissing(*table, table->shard(s), g.entries + g.begin[s],
                             g.begin[s + 1] - g.begin[s], step, combine ? nullptr : values);
      }));
  if (!combine) return Status();
  // The groups with a key that was missing, summed again. A key still
  // without a row (admission has not let it in, or another op evicted it
  // since) reads its initial value, as in a pull that does not combine.
  std::vector<int64_t> redo;  // groups, ascending
  for (int64_t i = 0; i < m; ++i) {
    const int64_t r = groups.GroupOf(misses[i]);
    if (redo.empty() || redo.back() != r) redo.push_back(r);
  }
  constexpr int64_t kRedoChunk = 64;  // groups
  const int64_t redo_groups = static_cast<int64_t>(redo.size());
  const int redo_workers = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(CpuNumThreads(ctx), m / kKeysPerThread)));
  CpuShareChunks(ctx, (redo_groups + kRedoChunk - 1) / kRedoChunk, redo_workers, all_shards,
                 [&](int64_t c) {
                   const int64_t last = std::min(redo_groups, (c + 1) * kRedoChunk);
                   for (int64_t i = c * kRedoChunk; i < last; ++i) {
                     const int64_t r = redo[i];
                     pull(groups.Begin(r), groups.Begin(r + 1), r, /*insert=*/false, nullptr);
                   }
                 });
  return Status();
}

// ---------------------------------------------------------------------------
// Push

namespace {

// A push in parts: part p owns a contiguous range of shards (the top bits
// of the shard number), so parts never share a shard lock.
struct PartKey {
  int64_t key;
  uint32_t count;  // occurrences in the batch (saturating)
  uint32_t shard;
};

// Parts of one push at most (a power of two).
constexpr int kMaxParts = 64;

// Dedup table of one part: (unique + 1) per slot, 0 = empty.
int64_t PartDedupSize(int64_t k) {
  int64_t p = 16;
  while (p < 2 * k) p <<= 1;
  return p;
}

// One part of a push, e[0, k) its keys in batch order: (1) one pass numbers
// the distinct keys by first occurrence and sums their gradients (so every
// sum is formed in batch order: deterministic); (2) the distinct keys are
// grouped by shard (stable); (3) each shard, under its writer lock, finds or
// creates every distinct key's row and applies one optimizer step.
// Key i's gradient row is grads[row_of[i]] for ragged groups, else
// grads[i / keys_per_grad] (a 32-bit division: a push holds under 2^32
// keys).
template <typename Update>
Status PushPart(SparseTable& t, const GroupedKey* e, int64_t k, int part, int part_bits,
                const float* grads, uint32_t keys_per_grad, const uint32_t* row_of,
                float lr, int64_t step,
                PartKey* uniques, float* sums, uint32_t* dedup, int64_t dedup_size,
                GroupedKey* entries) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  const sparse_table::TableConfig& c = t.config();
  const int64_t dim = c.dim;
  const int64_t grad_bytes = dim * static_cast<int64_t>(sizeof(float));
  auto grad_row = [&](int64_t pos) {
    const int64_t r = row_of != nullptr ? row_of[pos]
                      : keys_per_grad == 1
                          ? pos
                          : static_cast<uint32_t>(pos) / keys_per_grad;
    return grads + r * dim;
  };
  std::memset(dedup, 0, dedup_size * sizeof(uint32_t));
  const uint64_t mask = static_cast<uint64_t>(dedup_size) - 1;
  // Dedup slots and gradient rows are prefetched kBucketAhead keys ahead;
  // kRowAhead keys ahead, the slot found there gives the distinct key's
  // entry and sum to prefetch (when the key was seen before).
  uint64_t hashes[kRing];
  auto prefetch = [&](int64_t j) {
    const uint64_t h = KeyHash(e[j].key);
    hashes[j & (kRing - 1)] = h;
    __builtin_prefetch(&dedup[h & mask]);
    PrefetchBytes<false>(grad_row(e[j].pos), grad_bytes);
  };
  auto prefetch_sum = [&](int64_t j) {
    const uint32_t v = dedup[hashes[j & (kRing - 1)] & mask];
    if (v != 0) {
      __builtin_prefetch(&uniques[v - 1]);
      PrefetchBytes<false>(sums + (v - 1) * dim, grad_bytes);
    }
  };
  for (int64_t j = 0; j < std::min(k, kBucketAhead); ++j) prefetch(j);
  for (int64_t j = 0; j < std::min(k, kRowAhead); ++j) prefetch_sum(j);
  int64_t num_unique = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (j + kBucketAhead < k) prefetch(j + kBucketAhead);
    if (j + kRowAhead < k) prefetch_sum(j + kRowAhead);
    const uint64_t h = hashes[j & (kRing - 1)];
    const int64_t key = e[j].key;
    const float* g = grad_row(e[j].pos);
    uint64_t slot = h & mask;
    while (true) {
      const uint32_t v = dedup[slot];
      if (v == 0) {
        const int64_t u = num_unique++;
        dedup[slot] = static_cast<uint32_t>(u + 1);
        uniques[u] = PartKey{key, 1, static_cast<uint32_t>(t.ShardOf(h))};
        CopyFloats(sums + u * dim, g, dim);
        break;
      }
      PartKey& pk = uniques[v - 1];
      if (pk.key == key) {
        if (pk.count < UINT32_MAX) ++pk.count;
        AddFloats(sums + (v - 1) * dim, g, dim);
        break;
      }
      slot = (slot + 1) & mask;
    }
  }
  if (num_unique == 0) return Status();

  // Group by shard: the part's shards are [first, first + shards).
  const int bits = t.shard_bits();
  const int shards = 1 << (bits - part_bits);
  const int first = part << (bits - part_bits);
  std::vector<int64_t> begin(shards + 1, 0);
  for (int64_t u = 0; u < num_unique; ++u) ++begin[uniques[u].shard - first + 1];
  for (int s = 0; s < shards; ++s) begin[s + 1] += begin[s];
  std::vector<int64_t> cursor(begin.begin(), begin.end() - 1);
  for (int64_t u = 0; u < num_unique; ++u) {
    entries[cursor[uniques[u].shard - first]++] = GroupedKey{uniques[u].key, u};
  }

  const bool admission = c.admission_min_count > 1;
  const int64_t value_offset = c.header_bytes();
  const uint32_t step_counter = SparseTable::StepCounter(step);
  Update update;
  Status status;
  for (int s = 0; s < shards && status.ok(); ++s) {
    const int64_t n = begin[s + 1] - begin[s];
    if (n == 0) continue;
    Shard& sh = t.shard(first + s);
    const GroupedKey* d = entries + begin[s];
    absl::MutexLock l(&sh.mu);
    ForEachKeyPrefetched(
        sh, d, n, c.row_bytes(),
        [&](int64_t i, uint64_t h, char* candidate) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          if (!status.ok()) return;
          // The sums are in order of first occurrence, read here in shard
          // order: fetch them as far ahead as the rows.
          if (i + kRowAhead < n) {
            PrefetchBytes<false>(sums + d[i + kRowAhead].pos * dim, grad_bytes);
          }
          char* row = FindRow(sh, h, d[i].key, candidate);
          if (row == nullptr) {
            if (admission) return;  // not admitted yet: the gradient is dropped
            row = t.InsertRow(sh, h, d[i].key, step, &status);
            if (row == nullptr) return;
          }
          float* w = reinterpret_cast<float*>(row + value_offset);
          uint32_t* counters = t.Counters(row);
          update(c, lr, sums + d[i].pos * dim, w, w + dim, counters);
          if (c.track_usage) {
            const uint32_t count = uniques[d[i].pos].count;
            uint32_t& freq = counters[c.frequency_counter()];
            freq = count > UINT32_MAX - freq ? UINT32_MAX : freq + count;
            counters[c.last_step_counter()] = step_counter;
          }
        });
  }
  return status;
}

template <typename Update>
Status PushParts(OpKernelContext* ctx, SparseTable* table, const int64_t* keys, int64_t n,
                 const float* grads, const RowGroups& groups, float lr, int64_t step) {
  const int64_t dim = table->dim();
  // Parts: a power of two, at most the shards, about four per thread (a
  // part holding the batch's hottest keys takes longer, and more parts
  // than threads let the threads that claim them even that out: against
  // two per thread, at 65,536 keys on 2 threads, pushes 1.02-1.10x as fast
  // over 1e7 ids and 0.98x over 1e6, pull+push 1.04-1.07x; eight per thread
  // was slower), and one for small batches.
  int part_bits = 0;
  while ((1 << part_bits) < std::min(4 * CpuNumThreads(ctx), kMaxParts) &&
         part_bits < table->shard_bits() && (n >> part_bits) >= 8192) {
    ++part_bits;
  }
  const int parts = 1 << part_bits;
  using sparse_table::CallScratch;
  sparse_table::CallScratch scratch;
  TF_RETURN_IF_ERROR(scratch.Reserve(
      ctx, sparse_table::GroupScratchBytes(n) + CallScratch::Round(n * sizeof(PartKey)) +
               CallScratch::Round(n * dim * sizeof(float)) +
               CallScratch::Round(n * sizeof(GroupedKey)) +
               CallScratch::Round((4 * n + 16 * parts) * sizeof(uint32_t)) +
               (groups.splits != nullptr ? CallScratch::Round(n * sizeof(uint32_t)) : 0)));
  KeyGroups g;  // the parts' keys, each in batch order
  sparse_table::GroupKeysByHashPrefix(ctx, keys, n, part_bits, &scratch, &g);
  PartKey* uniques = scratch.Take<PartKey>(n);
  float* sums = scratch.Take<float>(n * dim);
  GroupedKey* entries = scratch.Take<GroupedKey>(n);
  std::vector<int64_t> dedup_base(parts + 1, 0);
  for (int p = 0; p < parts; ++p) {
    const int64_t k = g.begin[p + 1] - g.begin[p];
    dedup_base[p + 1] = dedup_base[p] + (k == 0 ? 0 : PartDedupSize(k));
  }
  uint32_t* dedup = scratch.Take<uint32_t>(dedup_base[parts]);
  // Ragged groups: each key's gradient row, written once (count < 2^32,
  // checked by the op).
  uint32_t* row_of = nullptr;
  if (groups.splits != nullptr) {
    row_of = scratch.Take<uint32_t>(n);
    for (int64_t r = 0; r < groups.count; ++r) {
      std::fill(row_of + groups.splits[r], row_of + groups.splits[r + 1],
                static_cast<uint32_t>(r));
    }
  }
  // n > 0: keys_per_group is in [1, n] for dense groups.
  const uint32_t keys_per_grad = static_cast<uint32_t>(groups.keys_per_group);

  std::vector<Status> status(parts);
  auto push_part = [&](int64_t p) {
    const int64_t b = g.begin[p];
    if (g.begin[p + 1] == b) return;
    status[p] = PushPart<Update>(*table, g.entries + b, g.begin[p + 1] - b,
                                 static_cast<int>(p), part_bits, grads, keys_per_grad,
                                 row_of, lr, step,
                                 uniques + b, sums + b * dim, dedup + dedup_base[p],
                                 dedup_base[p + 1] - dedup_base[p], entries + b);
  };
  CpuShareChunks(ctx, parts, CpuNumThreads(ctx), push_part);
  for (const Status& s : status) TF_RETURN_IF_ERROR(s);
  return Status();
}

}  // namespace

// A push is split into parts by the top bits of the shard number (about four
// per thread); each part sums its keys' gradients in batch order and then
// updates its shards one at a time under their writer locks.
template <>
Status SparseTablePush<CPUDevice>::operator()(OpKernelContext* ctx, SparseTable* table,
                                              const int64_t* keys, int64_t n,
                                              const float* grads, const RowGroups& groups,
                                              float lr, int64_t* step_out) {
  const int64_t step = table->Tick();
  *step_out = step;
  if (n == 0) return Status();
  using sparse_table::OptimizerKind;
  switch (table->config().optimizer) {
    case OptimizerKind::kSgd:
      return PushParts<sparse_table::SgdUpdate>(ctx, table, keys, n, grads, groups, lr, step);
    case OptimizerKind::kAdagrad:
      return PushParts<sparse_table::AdagradUpdate>(ctx, table, keys, n, grads, groups, lr,
                                                    step);
    case OptimizerKind::kAdam:
      return PushParts<sparse_table::AdamUpdate>(ctx, table, keys, n, grads, groups, lr,
                                                 step);
    case OptimizerKind::kFtrl:
      return PushParts<sparse_table::FtrlUpdate>(ctx, table, keys, n, grads, groups, lr,
                                                 step);
  }
  return errors::Internal("SparseTablePush: unknown optimizer");
}

}  // namespace functor
}  // namespace hpc_ops
