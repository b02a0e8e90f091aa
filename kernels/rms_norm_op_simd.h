// Vector helpers for the CPU kernels of the rms_norm family (see
// rms_norm_op.cc). Each element type T gets a SimdIo<T> that loads kLanes
// elements into a vector of its statistics type (float or double) and stores
// them back rounded to nearest even, so half and bfloat16 rows are processed
// as float32 without an intermediate buffer. With AVX2 + FMA + F16C (the
// package's compile flags) the vectors are __m256 / __m256d; otherwise they
// are plain scalars and the same loops run one element at a time.
#ifndef HPC_OPS_KERNELS_RMS_NORM_OP_SIMD_H_
#define HPC_OPS_KERNELS_RMS_NORM_OP_SIMD_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "unsupported/Eigen/CXX11/Tensor"  // Eigen::half, Eigen::bfloat16

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HPC_OPS_RMS_NORM_AVX2 1
#else
#define HPC_OPS_RMS_NORM_AVX2 0
#endif

namespace hpc_ops {
namespace rms_norm_simd {

// ---- scalar arithmetic (used for row tails, and as the whole vector type
// without AVX2). Fma is exactly fused where the vector code is, so a row's
// results do not depend on which elements fall in the scalar tail.
inline float Fma(float a, float b, float c) {
#if HPC_OPS_RMS_NORM_AVX2
  return std::fma(a, b, c);  // one vfmadd instruction with -mfma
#else
  return a * b + c;
#endif
}
inline double Fma(double a, double b, double c) {
#if HPC_OPS_RMS_NORM_AVX2
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}
inline float Mul(float a, float b) { return a * b; }
inline double Mul(double a, double b) { return a * b; }
inline float Add(float a, float b) { return a + b; }
inline double Add(double a, double b) { return a + b; }
inline float HorizontalSum(float v) { return v; }
inline double HorizontalSum(double v) { return v; }
// Asks for the cache line holding p in L2 ahead of its use (prefetcht1 on
// x86); a prefetch never faults.
inline void PrefetchL2(const void* p) { __builtin_prefetch(p, 0, 2); }

inline void StreamFence() {
#if HPC_OPS_RMS_NORM_AVX2
  _mm_sfence();
#endif
}

// bfloat16 <-> float, round to nearest even; a NaN stays a (quiet) NaN of
// the same sign. The AVX2 version below does the same bit operations.
inline float Bf16ToFloat(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline uint16_t FloatToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (std::isnan(f)) return static_cast<uint16_t>((bits | 0x00400000u) >> 16);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Scalar conversions between an element type and its statistics type.
inline float ToStat(float v) { return v; }
inline double ToStat(double v) { return v; }
inline float ToStat(Eigen::half v) { return static_cast<float>(v); }
inline float ToStat(Eigen::bfloat16 v) {
  return Bf16ToFloat(Eigen::numext::bit_cast<uint16_t>(v));
}
template <typename T>
inline T FromStat(float v);
template <>
inline float FromStat<float>(float v) {
  return v;
}
template <>
inline Eigen::half FromStat<Eigen::half>(float v) {
  return Eigen::half(v);  // IEEE round to nearest even (F16C when present)
}
template <>
inline Eigen::bfloat16 FromStat<Eigen::bfloat16>(float v) {
  return Eigen::numext::bit_cast<Eigen::bfloat16>(FloatToBf16(v));
}
template <typename T>
inline T FromStat(double v);
template <>
inline double FromStat<double>(double v) {
  return v;
}

#if HPC_OPS_RMS_NORM_AVX2

inline __m256 Mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256d Mul(__m256d a, __m256d b) { return _mm256_mul_pd(a, b); }
inline __m256 Add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256d Add(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
inline __m256 Fma(__m256 a, __m256 b, __m256 c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline __m256d Fma(__m256d a, __m256d b, __m256d c) {
  return _mm256_fmadd_pd(a, b, c);
}
// Fixed pairwise order: deterministic.
inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline double HorizontalSum(__m256d v) {
  __m128d s =
      _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

inline __m128i FloatToBf16x8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb =
      _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i quiet_nan =
      _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i out =
      _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet_nan, is_nan), 16);
  // Every lane is <= 0xffff, so the saturating pack is exact.
  return _mm_packus_epi32(_mm256_castsi256_si128(out),
                          _mm256_extracti128_si256(out, 1));
}

template <typename T>
struct SimdIo;

template <>
struct SimdIo<float> {
  using Stat = float;
  using V = __m256;
  static constexpr int kLanes = 8;
  static V Splat(Stat s) { return _mm256_set1_ps(s); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  // p must be aligned to kLanes elements.
  static void Stream(float* p, V v) { _mm256_stream_ps(p, v); }
};

template <>
struct SimdIo<double> {
  using Stat = double;
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V Splat(Stat s) { return _mm256_set1_pd(s); }
  static V Load(const double* p) { return _mm256_loadu_pd(p); }
  static void Store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void Stream(double* p, V v) { _mm256_stream_pd(p, v); }
};

template <>
struct SimdIo<Eigen::half> {
  using Stat = float;
  using V = __m256;
  static constexpr int kLanes = 8;
  static V Splat(Stat s) { return _mm256_set1_ps(s); }
  static V Load(const Eigen::half* p) {
    return _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m128i Pack(V v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void Store(Eigen::half* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), Pack(v));
  }
  static void Stream(Eigen::half* p, V v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), Pack(v));
  }
};

template <>
struct SimdIo<Eigen::bfloat16> {
  using Stat = float;
  using V = __m256;
  static constexpr int kLanes = 8;
  static V Splat(Stat s) { return _mm256_set1_ps(s); }
  static V Load(const Eigen::bfloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static void Store(Eigen::bfloat16* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), FloatToBf16x8(v));
  }
  static void Stream(Eigen::bfloat16* p, V v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), FloatToBf16x8(v));
  }
};

#else  // !HPC_OPS_RMS_NORM_AVX2: one element per "vector".

template <typename T>
struct SimdIo {
  using Stat = decltype(ToStat(T()));
  using V = Stat;
  static constexpr int kLanes = 1;
  static V Splat(Stat s) { return s; }
  static V Load(const T* p) { return ToStat(*p); }
  static void Store(T* p, V v) { *p = FromStat<T>(v); }
  static void Stream(T* p, V v) { *p = FromStat<T>(v); }
};

#endif  // HPC_OPS_RMS_NORM_AVX2

}  // namespace rms_norm_simd
}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_RMS_NORM_OP_SIMD_H_
