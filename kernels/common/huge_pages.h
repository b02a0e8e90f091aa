// Transparent huge pages for large fresh outputs, shared by the CPU kernels
// of every op family.
//
// TensorFlow's default CPU allocator maps every large tensor afresh, so each
// 4 KiB page of an output costs a page fault (and zeroing) on its first
// write; on VMs that can cost more than the kernel's own memory traffic. For
// such fresh memory we ask Linux for transparent huge pages on the 2 MiB
// aligned interior of the buffer: one fault per 2 MiB, and no huge page
// reaches beyond the buffer. Buffers the allocator reuses (BFC) are already
// backed and left alone. Advisory only: where THP is off nothing changes.
#ifndef HPC_OPS_KERNELS_COMMON_HUGE_PAGES_H_
#define HPC_OPS_KERNELS_COMMON_HUGE_PAGES_H_

#include <cstdint>
#include <cstdio>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace hpc_ops {

constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;

// Whether transparent huge pages can be had with madvise (Linux's
// /sys/kernel/mm/transparent_hugepage/enabled is "always" or "madvise").
inline bool HugePagesAvailable() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool available = [] {
    std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f == nullptr) return false;
    char buf[128] = {0};
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    return std::strstr(buf, "[never]") == nullptr &&
           (std::strstr(buf, "[always]") != nullptr ||
            std::strstr(buf, "[madvise]") != nullptr);
  }();
  return available;
#else
  return false;
#endif
}

// The 2 MiB-aligned range inside [p, p + bytes); empty if there is none.
inline void InnerHugePages(const void* p, int64_t bytes, uintptr_t* begin,
                           uintptr_t* end) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  *begin = (start + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  *end = (start + static_cast<uintptr_t>(bytes)) & ~(kHugePageBytes - 1);
  if (*end < *begin) *end = *begin;
}

// Advises huge pages for the 2 MiB-aligned interior of [p, p + bytes).
inline void AdviseHugePages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  uintptr_t begin, end;
  InnerHugePages(p, bytes, &begin, &end);
  if (end > begin) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)p;
  (void)bytes;
#endif
}

// If [p, p + bytes) is at least `min_bytes` and its first aligned huge page
// is not yet backed (a fresh mapping, not a buffer the allocator reuses),
// advises huge pages for its aligned interior. Returns whether the buffer
// was fresh.
inline bool AdviseHugePagesIfFresh(void* p, int64_t bytes, int64_t min_bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  uintptr_t begin, end;
  InnerHugePages(p, bytes, &begin, &end);
  if (bytes < min_bytes || end <= begin) return false;
  unsigned char resident = 1;
  if (mincore(reinterpret_cast<void*>(begin), 4096, &resident) != 0) return false;
  const bool fresh = (resident & 1) == 0;
  if (fresh && HugePagesAvailable()) AdviseHugePages(p, bytes);
  return fresh;
#else
  (void)p;
  (void)bytes;
  (void)min_bytes;
  return false;
#endif
}

}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_COMMON_HUGE_PAGES_H_
