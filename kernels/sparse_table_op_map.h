// See docs in ../ops/sparse_table_ops.cc.
//
// The storage of one shard of a sparse table: a row arena and a flat hash
// index over it, plus the key counter used for admission, and the chunk pool
// the shards of a table share. Only the pool locks; the owner (SparseTable in
// sparse_table_op.h) guards each shard with its own reader/writer lock.
#ifndef HPC_OPS_KERNELS_SPARSE_TABLE_OP_MAP_H_
#define HPC_OPS_KERNELS_SPARSE_TABLE_OP_MAP_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "absl/synchronization/mutex.h"
#include "kernels/common/huge_pages.h"
#include "tensorflow/core/platform/mem.h"

namespace hpc_ops {
namespace sparse_table {

// ---------------------------------------------------------------------------
// Hashing and routing. Every key goes through KeyHash() exactly once per use;
// ShardOfHash() is the only place that decides which shard owns a key (a
// multi-process table would route keys to processes here as well).

// MurmurHash3's 64-bit finaliser: a bijection on 64-bit words with full
// avalanche, so sequential ids and ids that are already hashes both spread.
inline uint64_t KeyHash(int64_t key) {
  uint64_t h = static_cast<uint64_t>(key);
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

// The top `shard_bits` bits of the hash pick the shard; the bucket and the
// tag inside a shard use the low bits, so the two choices are independent.
inline int ShardOfHash(uint64_t hash, int shard_bits) {
  return shard_bits == 0 ? 0 : static_cast<int>(hash >> (64 - shard_bits));
}

inline int ShardOfKey(int64_t key, int shard_bits) {
  return ShardOfHash(KeyHash(key), shard_bits);
}

// ---------------------------------------------------------------------------
// ChunkPool: the memory of one table's row chunks (all of one size, set by
// the row stride), shared by its shards. Once the table holds a few
// megabytes of rows, chunks are carved from 2 MiB-aligned slabs for which
// Linux is asked for transparent huge pages (common/huge_pages.h): a pull or
// push reads rows at random over tens of megabytes, and one TLB entry then
// covers 2 MiB of rows instead of 4 KiB. The first slabs are smaller (no
// huge pages), so a small table does not take 2 MiB. A slab whose chunks
// are all free is freed; freed chunks are reused first.
// Thread-safe: shards allocate and free under their own locks.
class ChunkPool {
 public:
  // Chunks hold a power of two of rows, about kChunkBytes in all.
  static constexpr int64_t kChunkBytes = 32 << 10;
  static constexpr size_t kSlabBytes = size_t{2} << 20;

  explicit ChunkPool(int64_t stride) : stride_(stride) {
    int shift = 0;
    while ((int64_t{2} << shift) * stride_ <= kChunkBytes) ++shift;
    chunk_shift_ = shift;
    chunk_bytes_ = static_cast<size_t>(stride_) << shift;
  }
  ~ChunkPool() {
    for (auto& it : slabs_) tensorflow::port::AlignedFree(it.second.base);
  }
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;

  int64_t stride() const { return stride_; }
  int chunk_shift() const { return chunk_shift_; }
  size_t chunk_bytes() const { return chunk_bytes_; }

  // A chunk of chunk_bytes() (uninitialised), or nullptr when memory runs
  // out.
  char* Allocate() {
    absl::MutexLock l(&mu_);
    if (!available_.empty()) {
      Slab& slab = *available_.back();
      char* chunk = slab.free.back();
      slab.free.pop_back();
      ++slab.used;
      if (slab.free.empty()) {
        slab.available = false;
        available_.pop_back();
      }
      return chunk;
    }
    // A new slab: as large as what the table already has (at least one
    // chunk, at most kSlabBytes); full-size slabs are aligned to and
    // advised as huge pages.
    const size_t want = std::min(kSlabBytes, std::max(chunk_bytes_, bytes_));
    const size_t chunks = std::max<size_t>(1, want / chunk_bytes_);
    const bool huge = want == kSlabBytes;
    const size_t bytes = huge ? kSlabBytes : chunks * chunk_bytes_;
    void* base = tensorflow::port::AlignedMalloc(
        bytes, std::align_val_t{huge ? kSlabBytes : size_t{64}});
    if (base == nullptr) return nullptr;
    if (huge && HugePagesAvailable()) AdviseHugePages(base, static_cast<int64_t>(bytes));
    bytes_ += bytes;
    Slab& slab = slabs_[reinterpret_cast<uintptr_t>(base)];
    slab.base = static_cast<char*>(base);
    slab.bytes = bytes;
    slab.free.reserve(chunks);
    for (size_t i = chunks; i-- > 1;) slab.free.push_back(slab.base + i * chunk_bytes_);
    slab.used = 1;
    if (!slab.free.empty()) {
      slab.available = true;
      available_.push_back(&slab);
    }
    return slab.base;
  }

  // Returns a chunk from Allocate().
  void Free(char* chunk) {
    absl::MutexLock l(&mu_);
    auto it = slabs_.upper_bound(reinterpret_cast<uintptr_t>(chunk));
    if (it == slabs_.begin()) return;  // not a chunk of this pool
    --it;  // the slab holding `chunk`
    Slab& slab = it->second;
    slab.free.push_back(chunk);
    if (--slab.used == 0) {
      if (slab.available) {
        available_.erase(std::find(available_.begin(), available_.end(), &slab));
      }
      bytes_ -= slab.bytes;
      tensorflow::port::AlignedFree(slab.base);
      slabs_.erase(it);
    } else if (!slab.available) {
      slab.available = true;
      available_.push_back(&slab);
    }
  }

  int64_t BytesAllocated() const {
    absl::MutexLock l(&mu_);
    return static_cast<int64_t>(bytes_);
  }

 private:
  struct Slab {
    char* base = nullptr;
    size_t bytes = 0;
    std::vector<char*> free;  // its free chunks
    size_t used = 0;          // chunks handed out
    bool available = false;   // in available_
  };

  const int64_t stride_;
  int chunk_shift_ = 0;
  size_t chunk_bytes_ = 0;
  mutable absl::Mutex mu_;
  std::map<uintptr_t, Slab> slabs_ ABSL_GUARDED_BY(mu_);  // by base address
  std::vector<Slab*> available_ ABSL_GUARDED_BY(mu_);     // exactly the slabs with free chunks
  size_t bytes_ ABSL_GUARDED_BY(mu_) = 0;                 // of all slabs
};

// ---------------------------------------------------------------------------
// The key stored at the start of a row.
inline int64_t RowKey(const char* row) {
  int64_t k;
  std::memcpy(&k, row, sizeof(k));
  return k;
}

// RowArena: rows of a fixed byte stride in fixed-size chunks from the
// table's ChunkPool. A row index stays valid until the row is moved by
// Compact(); growth never moves rows (no realloc), and the unused tail is
// at most one chunk per shard.
class RowArena {
 public:
  explicit RowArena(ChunkPool* pool)
      : pool_(pool), stride_(pool->stride()), chunk_shift_(pool->chunk_shift()),
        chunk_mask_((uint64_t{1} << pool->chunk_shift()) - 1) {}
  ~RowArena() { Release(); }
  RowArena(const RowArena&) = delete;
  RowArena& operator=(const RowArena&) = delete;

  int64_t stride() const { return stride_; }
  uint64_t size() const { return size_; }
  uint64_t capacity() const { return chunks_.size() << chunk_shift_; }

  char* Row(uint64_t idx) const {
    return chunks_[idx >> chunk_shift_] + (idx & chunk_mask_) * stride_;
  }
  int64_t Key(uint64_t idx) const { return RowKey(Row(idx)); }

  // Appends one row (uninitialised) and returns its index, or -1 when memory
  // runs out.
  int64_t Append() {
    if (size_ == capacity()) {
      char* chunk = pool_->Allocate();
      if (chunk == nullptr) return -1;
      chunks_.push_back(chunk);
    }
    return static_cast<int64_t>(size_++);
  }

  // Keeps the rows for which keep(row) is true, in their order, moving them
  // to the front; frees chunks no longer needed. Returns the number removed.
  template <typename Keep>
  uint64_t Compact(Keep keep) {
    uint64_t out = 0;
    for (uint64_t i = 0; i < size_; ++i) {
      char* row = Row(i);
      if (!keep(row)) continue;
      if (out != i) std::memcpy(Row(out), row, stride_);
      ++out;
    }
    const uint64_t removed = size_ - out;
    size_ = out;
    const uint64_t chunks_needed = (size_ + chunk_mask_) >> chunk_shift_;
    while (chunks_.size() > chunks_needed) {
      pool_->Free(chunks_.back());
      chunks_.pop_back();
    }
    return removed;
  }

  // Exchanges the contents of two arenas of the same pool.
  void Swap(RowArena& other) {
    std::swap(size_, other.size_);
    chunks_.swap(other.chunks_);
  }

  // Bytes of the chunk list (the chunks themselves are the pool's).
  int64_t BookkeepingBytes() const {
    return static_cast<int64_t>(chunks_.capacity() * sizeof(char*));
  }

 private:
  void Release() {
    for (char* c : chunks_) pool_->Free(c);
    chunks_.clear();
    size_ = 0;
  }

  ChunkPool* const pool_;
  const int64_t stride_;
  const int chunk_shift_;
  const uint64_t chunk_mask_;
  uint64_t size_ = 0;
  std::vector<char*> chunks_;
};

// ---------------------------------------------------------------------------
// ShardIndex: key -> row index, open addressing over 64-byte buckets (one
// cache line each): 12 one-byte tags, a fill count and 12 row indices. A
// probe compares the 12 tags at once (SSE2) and reads a row's key only on a
// tag match (1 in 255 false positives). Buckets fill front to back and rows
// are never deleted one by one (eviction rebuilds the index), so a probe
// ends at the first bucket that is not full. Buckets are probed linearly;
// the index doubles when more than 7/8 of its slots are used.
struct alignas(64) IndexBucket {
  static constexpr int kSlots = 12;
  uint8_t tags[kSlots];  // 0 = empty
  uint8_t count;         // slots used; always the first `count`
  uint8_t pad[3];
  uint32_t rows[kSlots];
};
static_assert(sizeof(IndexBucket) == 64, "one bucket per cache line");

class ShardIndex {
 public:
  // A shard holds at most this many rows (row indices are 32-bit).
  static constexpr uint64_t kMaxRows = std::numeric_limits<uint32_t>::max();

  ShardIndex() = default;
  ~ShardIndex() { tensorflow::port::AlignedFree(buckets_); }
  ShardIndex(const ShardIndex&) = delete;
  ShardIndex& operator=(const ShardIndex&) = delete;

  static uint8_t TagOf(uint64_t hash) {
    const uint8_t t = static_cast<uint8_t>(hash);
    return t == 0 ? 1 : t;
  }
  uint64_t BucketOf(uint64_t hash) const { return (hash >> 8) & mask_; }

  // Prefetches the first bucket `hash` probes (no-op on an empty index).
  void Prefetch(uint64_t hash) const {
    if (buckets_ != nullptr) __builtin_prefetch(&buckets_[BucketOf(hash)]);
  }

  // The row of the first slot of the home bucket whose tag matches `hash`
  // (most likely the key's row), or -1; used to prefetch rows.
  int64_t FirstCandidate(uint64_t hash) const {
    if (buckets_ == nullptr) return -1;
    const IndexBucket& bucket = buckets_[BucketOf(hash)];
    const uint32_t match = MatchTags(bucket, TagOf(hash));
    if (match == 0) return -1;
    return static_cast<int64_t>(bucket.rows[__builtin_ctz(match)]);
  }

  // The row holding `key`, or -1.
  int64_t Find(uint64_t hash, int64_t key, const RowArena& arena) const {
    if (buckets_ == nullptr) return -1;
    const uint8_t tag = TagOf(hash);
    uint64_t b = BucketOf(hash);
    while (true) {
      const IndexBucket& bucket = buckets_[b];
      uint32_t match = MatchTags(bucket, tag);
      while (match != 0) {
        const int slot = __builtin_ctz(match);
        const uint32_t row = bucket.rows[slot];
        if (arena.Key(row) == key) return row;
        match &= match - 1;
      }
      if (bucket.count < IndexBucket::kSlots) return -1;
      b = (b + 1) & mask_;
    }
  }

  // Whether one more row fits without growing.
  bool HasRoomFor(uint64_t rows) const { return rows <= max_rows_; }

  // Adds `row` under `hash`; the key must be absent and HasRoomFor(size + 1)
  // must hold.
  void Insert(uint64_t hash, uint32_t row) {
    uint64_t b = BucketOf(hash);
    while (buckets_[b].count == IndexBucket::kSlots) b = (b + 1) & mask_;
    IndexBucket& bucket = buckets_[b];
    bucket.tags[bucket.count] = TagOf(hash);
    bucket.rows[bucket.count] = row;
    ++bucket.count;
  }

  // Replaces the index by an empty one with room for at least `min_rows`
  // rows. Returns false (index unchanged) when memory runs out.
  bool Reset(uint64_t min_rows) {
    uint64_t nb = 1;
    while (MaxRowsFor(nb) < min_rows) nb <<= 1;
    return ResetBuckets(nb);
  }

  // Indexes rows [0, arena.size()); the index must have room for them.
  void InsertAll(const RowArena& arena) {
    for (uint64_t r = 0; r < arena.size(); ++r) {
      Insert(KeyHash(arena.Key(r)), static_cast<uint32_t>(r));
    }
  }

  // Doubles the bucket count and re-indexes the arena's rows. Returns false
  // (index unchanged) when memory runs out.
  bool Grow(const RowArena& arena) {
    ShardIndex bigger;
    if (!bigger.ResetBuckets(num_buckets_ == 0 ? 1 : 2 * num_buckets_)) {
      return false;
    }
    bigger.InsertAll(arena);
    Swap(bigger);
    return true;
  }

  void Swap(ShardIndex& other) {
    std::swap(buckets_, other.buckets_);
    std::swap(num_buckets_, other.num_buckets_);
    std::swap(mask_, other.mask_);
    std::swap(max_rows_, other.max_rows_);
  }

  int64_t BytesAllocated() const {
    return static_cast<int64_t>(num_buckets_ * sizeof(IndexBucket));
  }

 private:
  bool ResetBuckets(uint64_t nb) {
    auto* fresh = static_cast<IndexBucket*>(
        tensorflow::port::AlignedMalloc(nb * sizeof(IndexBucket), std::align_val_t{64}));
    if (fresh == nullptr) return false;
    std::memset(static_cast<void*>(fresh), 0, nb * sizeof(IndexBucket));
    tensorflow::port::AlignedFree(buckets_);
    buckets_ = fresh;
    num_buckets_ = nb;
    mask_ = nb - 1;
    max_rows_ = MaxRowsFor(nb);
    return true;
  }

  static uint64_t MaxRowsFor(uint64_t buckets) {
    const uint64_t slots = buckets * IndexBucket::kSlots;
    return slots - slots / 8;
  }

  static uint32_t MatchTags(const IndexBucket& bucket, uint8_t tag) {
#if defined(__SSE2__)
    const __m128i v =
        _mm_load_si128(reinterpret_cast<const __m128i*>(bucket.tags));
    const __m128i eq = _mm_cmpeq_epi8(v, _mm_set1_epi8(static_cast<char>(tag)));
    return static_cast<uint32_t>(_mm_movemask_epi8(eq)) & 0xFFFu;
#else
    uint32_t m = 0;
    for (int i = 0; i < IndexBucket::kSlots; ++i) {
      m |= static_cast<uint32_t>(bucket.tags[i] == tag) << i;
    }
    return m;
#endif
  }

  IndexBucket* buckets_ = nullptr;
  uint64_t num_buckets_ = 0;
  uint64_t mask_ = 0;
  uint64_t max_rows_ = 0;
};

// ---------------------------------------------------------------------------
// KeyCounter: occurrence counts of keys that do not have a row yet (the
// admission filter). Linear probing with backward-shift deletion; a count of
// 0 marks an empty slot.
class KeyCounter {
 public:
  // Adds one occurrence of `key` and returns its count (saturating).
  uint32_t Increment(uint64_t hash, int64_t key) {
    Slot& s = Claim(hash, key);
    if (s.count < std::numeric_limits<uint32_t>::max()) ++s.count;
    return s.count;
  }

  void Erase(uint64_t hash, int64_t key) {
    if (slots_.empty()) return;
    const uint64_t mask = slots_.size() - 1;
    uint64_t i = hash & mask;
    while (slots_[i].count != 0 && slots_[i].key != key) i = (i + 1) & mask;
    if (slots_[i].count == 0) return;
    // Backward shift: pull later entries of the cluster into the hole when
    // their home slot does not lie strictly between the hole and them.
    uint64_t hole = i;
    uint64_t j = i;
    while (true) {
      j = (j + 1) & mask;
      if (slots_[j].count == 0) break;
      const uint64_t home = KeyHash(slots_[j].key) & mask;
      const bool between = hole <= j ? (hole < home && home <= j)
                                     : (hole < home || home <= j);
      if (between) continue;
      slots_[hole] = slots_[j];
      hole = j;
    }
    slots_[hole] = Slot();
    --size_;
  }

  // Sets the count of `key` (> 0), adding the key if it is not counted yet.
  void Set(uint64_t hash, int64_t key, uint32_t count) { Claim(hash, key).count = count; }

  // fn(key, count) for every counted key, in slot order.
  template <typename Fn>
  void ForEach(Fn fn) const {
    for (const Slot& s : slots_) {
      if (s.count != 0) fn(s.key, s.count);
    }
  }

  void Clear() {
    std::vector<Slot>().swap(slots_);
    size_ = 0;
  }
  uint64_t size() const { return size_; }
  int64_t BytesAllocated() const {
    return static_cast<int64_t>(slots_.capacity() * sizeof(Slot));
  }

 private:
  struct Slot {
    int64_t key = 0;
    uint32_t count = 0;
  };

  // The slot of `key`, taken for it (count still 0, to be set by the caller)
  // if the key is not counted yet.
  Slot& Claim(uint64_t hash, int64_t key) {
    if ((size_ + 1) * 4 > slots_.size() * 3) Resize(slots_.empty() ? 16 : 2 * slots_.size());
    const uint64_t mask = slots_.size() - 1;
    uint64_t i = hash & mask;
    while (slots_[i].count != 0 && slots_[i].key != key) i = (i + 1) & mask;
    Slot& s = slots_[i];
    if (s.count == 0) {
      s.key = key;
      ++size_;
    }
    return s;
  }

  void Resize(uint64_t n) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(n, Slot());
    const uint64_t mask = n - 1;
    for (const Slot& s : old) {
      if (s.count == 0) continue;
      uint64_t i = KeyHash(s.key) & mask;
      while (slots_[i].count != 0) i = (i + 1) & mask;
      slots_[i] = s;
    }
  }

  std::vector<Slot> slots_;
  uint64_t size_ = 0;
};

}  // namespace sparse_table
}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_SPARSE_TABLE_OP_MAP_H_
