// See docs in ../ops/rms_norm_ops.cc.
#include "kernels/rms_norm_op.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>


#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/cpu_parallel.h"
#include "kernels/common/huge_pages.h"
#include "kernels/rms_norm_op_simd.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"

namespace hpc_ops {

using CPUDevice = Eigen::ThreadPoolDevice;
using tensorflow::DataTypeString;
using tensorflow::DataTypeToEnum;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::TensorShapeUtils;
using tensorflow::TTypes;

namespace {

using rms_norm_simd::Add;
using rms_norm_simd::Fma;
using rms_norm_simd::FromStat;
using rms_norm_simd::HorizontalSum;
using rms_norm_simd::Mul;
using rms_norm_simd::SimdIo;
using rms_norm_simd::ToStat;

template <typename T>
using StatOf = typename RmsNormStat<T>::type;

// Outputs at least this large are written with non-temporal (streaming)
// stores: they cannot stay in the caches anyway, and streaming skips reading
// every destination line before overwriting it (a third of the traffic of a
// one-pass kernel). Smaller outputs are likely read again soon from L2/L3.
constexpr int64_t kStreamMinBytes = 16 << 20;

// Fresh outputs at least this large are given transparent huge pages.
constexpr int64_t kHugePageMinBytes = 4 << 20;

// Estimated cycles per element of one row pass (read, scale, write; about
// 1 ns per float32 element on one Zen 3 core from L2): the thread pool
// splits rows only when that pays for the hand-off. An estimate that is too
// high splits small batches (32-64 rows of 1024) whose hand-off costs more
// than the work.
constexpr int64_t kCyclesPerElement = 3;

// sum_j x[j]^2, with four independent vector accumulators (the FMA latency
// would otherwise bound the loop).
template <typename T>
inline StatOf<T> SumOfSquares(const T* x, int64_t n) {
  using Io = SimdIo<T>;
  using V = typename Io::V;
  constexpr int64_t L = Io::kLanes;
  const V zero = Io::Splat(0);
  V a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    const V v0 = Io::Load(x + j);
    const V v1 = Io::Load(x + j + L);
    const V v2 = Io::Load(x + j + 2 * L);
    const V v3 = Io::Load(x + j + 3 * L);
    a0 = Fma(v0, v0, a0);
    a1 = Fma(v1, v1, a1);
    a2 = Fma(v2, v2, a2);
    a3 = Fma(v3, v3, a3);
  }
  for (; j + L <= n; j += L) {
    const V v = Io::Load(x + j);
    a0 = Fma(v, v, a0);
  }
  StatOf<T> sum = HorizontalSum(Add(Add(a0, a1), Add(a2, a3)));
  for (; j < n; ++j) {
    const StatOf<T> v = ToStat(x[j]);
    sum = Fma(v, v, sum);
  }
  return sum;
}

// sum_j a[j] * b[j] * c[j], where b may be of the statistics type.
template <typename T, typename B>
inline StatOf<T> SumOfTripleProducts(const T* a, const B* b, const T* c,
                                     int64_t n) {
  using Io = SimdIo<T>;
  using BIo = SimdIo<B>;
  using V = typename Io::V;
  constexpr int64_t L = Io::kLanes;
  static_assert(BIo::kLanes == L, "b must load as many lanes as a");
  const V zero = Io::Splat(0);
  V s0 = zero, s1 = zero, s2 = zero, s3 = zero;
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    s0 = Fma(Mul(Io::Load(a + j), BIo::Load(b + j)), Io::Load(c + j), s0);
    s1 = Fma(Mul(Io::Load(a + j + L), BIo::Load(b + j + L)),
             Io::Load(c + j + L), s1);
    s2 = Fma(Mul(Io::Load(a + j + 2 * L), BIo::Load(b + j + 2 * L)),
             Io::Load(c + j + 2 * L), s2);
    s3 = Fma(Mul(Io::Load(a + j + 3 * L), BIo::Load(b + j + 3 * L)),
             Io::Load(c + j + 3 * L), s3);
  }
  for (; j + L <= n; j += L) {
    s0 = Fma(Mul(Io::Load(a + j), BIo::Load(b + j)), Io::Load(c + j), s0);
  }
  StatOf<T> sum = HorizontalSum(Add(Add(s0, s1), Add(s2, s3)));
  for (; j < n; ++j) {
    sum = Fma(ToStat(a[j]) * ToStat(b[j]), ToStat(c[j]), sum);
  }
  return sum;
}

template <bool kStream, typename T, typename V>
inline void Put(T* p, V v) {
  if (kStream) {
    SimdIo<T>::Stream(p, v);
  } else {
    SimdIo<T>::Store(p, v);
  }
}

// Runs vec(j) on whole vectors and scalar(j) on the other elements of a row
// of n outputs starting at `out`. When streaming, the scalar head makes
// every vector store aligned (non-temporal stores require it). vec and
// scalar compute the same values, so the split does not change results.
template <bool kStream, typename T, typename VecFn, typename ScalarFn>
inline void ForEachInRow(const T* out, int64_t n, VecFn vec, ScalarFn scalar) {
  constexpr int64_t L = SimdIo<T>::kLanes;
  int64_t j = 0;
  if (kStream) {
    constexpr uintptr_t kAlign = L * sizeof(T);
    const uintptr_t misaligned = reinterpret_cast<uintptr_t>(out) % kAlign;
    if (misaligned != 0) {
      const int64_t head =
          std::min<int64_t>(n, (kAlign - misaligned) / sizeof(T));
      for (; j < head; ++j) scalar(j);
    }
  }
  for (; j + L <= n; j += L) vec(j);
  for (; j < n; ++j) scalar(j);
}

// Rows [begin, end) of the forward pass: one read of the row to reduce, one
// (from L1/L2) to scale and write.
template <bool kStream, typename T>
void RmsNormRows(const T* x, const StatOf<T>* gamma, StatOf<T> epsilon, T* y,
                 StatOf<T>* inv_rms, int64_t cols, int64_t begin, int64_t end) {
  using S = StatOf<T>;
  using Io = SimdIo<T>;
  using GIo = SimdIo<S>;
  using V = typename Io::V;
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    // While this row is scaled from L1, the next one streams into L2.
    const T* xn = r + 1 < end ? xr + cols : xr;
    const S mean_square = SumOfSquares(xr, cols) / static_cast<S>(cols);
    const S inv = S(1) / std::sqrt(mean_square + epsilon);
    inv_rms[r] = inv;
    const V vinv = Io::Splat(inv);
    ForEachInRow<kStream>(
        yr, cols,
        [&](int64_t j) {
          rms_norm_simd::PrefetchL2(xn + j);
          Put<kStream>(yr + j,
                       Mul(Mul(Io::Load(xr + j), vinv), GIo::Load(gamma + j)));
        },
        [&](int64_t j) {
          yr[j] = FromStat<T>(ToStat(xr[j]) * inv * ToStat(gamma[j]));
        });
  }
  if (kStream) rms_norm_simd::StreamFence();
}

// Rows [begin, end) of the backward pass. `partial` (cols values) receives
// this shard's sum over its rows of dy * x * inv_rms.
template <bool kStream, typename T>
void RmsNormGradRows(const T* dy, const T* x, const StatOf<T>* gamma,
                     const StatOf<T>* inv_rms, T* dx, StatOf<T>* partial,
                     int64_t cols, int64_t begin, int64_t end) {
  using S = StatOf<T>;
  using Io = SimdIo<T>;
  using GIo = SimdIo<S>;
  using PartialIo = SimdIo<S>;
  using V = typename Io::V;
  std::fill(partial, partial + cols, S(0));
  for (int64_t r = begin; r < end; ++r) {
    const T* dyr = dy + r * cols;
    const T* xr = x + r * cols;
    T* dxr = dx + r * cols;
    // The next rows stream into L2 while this one is finished from cache.
    const T* dyn = r + 1 < end ? dyr + cols : dyr;
    const T* xn = r + 1 < end ? xr + cols : xr;
    const S inv = inv_rms[r];
    // dx = inv * gamma * dy - x * inv^3 * mean(dy * gamma * x). Multiplied
    // left to right so a zero row gives 0, not 0 * inf, for a huge inv.
    const S c = SumOfTripleProducts(dyr, gamma, xr, cols) /
                static_cast<S>(cols) * inv * inv * inv;
    const V vinv = Io::Splat(inv);
    const V vneg_c = Io::Splat(-c);
    ForEachInRow<kStream>(
        dxr, cols,
        [&](int64_t j) {
          rms_norm_simd::PrefetchL2(dyn + j);
          rms_norm_simd::PrefetchL2(xn + j);
          const V d = Io::Load(dyr + j);
          const V xv = Io::Load(xr + j);
          const V g = GIo::Load(gamma + j);
          PartialIo::Store(partial + j,
                           Fma(d, Mul(xv, vinv), PartialIo::Load(partial + j)));
          Put<kStream>(dxr + j, Fma(vneg_c, xv, Mul(vinv, Mul(g, d))));
        },
        [&](int64_t j) {
          const S d = ToStat(dyr[j]);
          const S xv = ToStat(xr[j]);
          const S g = ToStat(gamma[j]);
          partial[j] = Fma(d, xv * inv, partial[j]);
          dxr[j] = FromStat<T>(Fma(-c, xv, inv * (g * d)));
        });
  }
  if (kStream) rms_norm_simd::StreamFence();
}

// How a large output is written: fresh outputs get transparent huge pages
// (common/huge_pages.h); large outputs are then written with streaming
// stores, except on fresh 4 KiB pages, whose lines the fault has just zeroed
// in cache. Returns whether to stream.
bool PrepareOutput(void* out, int64_t bytes) {
  if (reinterpret_cast<uintptr_t>(out) % 64 != 0) return false;
  const bool fresh = AdviseHugePagesIfFresh(out, bytes, kHugePageMinBytes);
  return bytes >= kStreamMinBytes && (!fresh || HugePagesAvailable());
}

// gamma in the statistics type: the tensor itself for float and double,
// otherwise widened once per call into `scratch`, so that the row loops do
// not convert it again for every row. nullptr (with ctx's status set) if
// the temporary cannot be allocated.
template <typename T, typename U>
const U* GammaAsStat(OpKernelContext* ctx, const T* gamma, int64_t cols,
                     Tensor* scratch) {
  if constexpr (std::is_same<T, U>::value) {
    return gamma;
  } else {
    const absl::Status s = ctx->allocate_temp(DataTypeToEnum<U>::v(),
                                              TensorShape({cols}), scratch);
    if (!s.ok()) {
      ctx->SetStatus(s);
      return nullptr;
    }
    U* g = scratch->flat<U>().data();
    for (int64_t j = 0; j < cols; ++j) g[j] = ToStat(gamma[j]);
    return g;
  }
}

}  // namespace

namespace functor {

template <typename T, typename U>
struct RmsNorm<CPUDevice, T, U> {
  static_assert(std::is_same<U, StatOf<T>>::value, "U must be StatOf<T>");
  void operator()(OpKernelContext* ctx, typename TTypes<T>::ConstMatrix x,
                  typename TTypes<T>::ConstVec gamma, U epsilon,
                  typename TTypes<T>::Matrix y,
                  typename TTypes<U>::Vec inv_rms) {
    const int64_t rows = x.dimension(0);
    const int64_t cols = x.dimension(1);
    const T* xp = x.data();
    Tensor gamma_scratch;
    const U* gp = GammaAsStat<T, U>(ctx, gamma.data(), cols, &gamma_scratch);
    if (gp == nullptr) return;
    T* yp = y.data();
    U* ip = inv_rms.data();
    const bool stream = PrepareOutput(yp, rows * cols * sizeof(T));
    CpuParallelFor(
        ctx, rows, cols * kCyclesPerElement, [=](int64_t begin, int64_t end) {
          if (stream) {
            RmsNormRows<true>(xp, gp, epsilon, yp, ip, cols, begin, end);
          } else {
            RmsNormRows<false>(xp, gp, epsilon, yp, ip, cols, begin, end);
          }
        });
  }
};

template <typename T, typename U>
struct RmsNormGrad<CPUDevice, T, U> {
  static_assert(std::is_same<U, StatOf<T>>::value, "U must be StatOf<T>");
  void operator()(OpKernelContext* ctx, typename TTypes<T>::ConstMatrix dy,
                  typename TTypes<T>::ConstMatrix x,
                  typename TTypes<T>::ConstVec gamma,
                  typename TTypes<U>::ConstVec inv_rms,
                  typename TTypes<T>::Matrix dx, typename TTypes<T>::Vec dgamma,
                  typename TTypes<U>::Matrix partial) {
    const int64_t rows = x.dimension(0);
    const int64_t cols = x.dimension(1);
    const int64_t shards = partial.dimension(0);
    const T* dyp = dy.data();
    const T* xp = x.data();
    Tensor gamma_scratch;
    const U* gp = GammaAsStat<T, U>(ctx, gamma.data(), cols, &gamma_scratch);
    if (gp == nullptr) return;
    const U* ip = inv_rms.data();
    T* dxp = dx.data();
    U* pp = partial.data();
    const bool stream = PrepareOutput(dxp, rows * cols * sizeof(T));
    // Fixed shards (not the pool's adaptive split): shard s always covers the
    // same rows and owns partial row s, whichever thread runs it.
    CpuForEachShard(
        ctx, rows, static_cast<int>(shards),
        [=](int s, int64_t begin, int64_t end) {
          U* ps = pp + s * cols;
          if (stream) {
            RmsNormGradRows<true>(dyp, xp, gp, ip, dxp, ps, cols, begin, end);
          } else {
            RmsNormGradRows<false>(dyp, xp, gp, ip, dxp, ps, cols, begin, end);
          }
        });
    // dgamma[j] = partial[0][j] + partial[1][j] + ... in shard order,
    // accumulated in place in partial row 0 (in U) and rounded once.
    T* dgp = dgamma.data();
    CpuParallelFor(ctx, cols, shards * 2, [=](int64_t begin, int64_t end) {
      U* acc = pp;
      if (rows == 0) std::fill(acc + begin, acc + end, U(0));
      for (int64_t s = 1; s < shards; ++s) {
        const U* ps = pp + s * cols;
        for (int64_t j = begin; j < end; ++j) acc[j] += ps[j];
      }
      for (int64_t j = begin; j < end; ++j) dgp[j] = FromStat<T>(acc[j]);
    });
  }
};

}  // namespace functor

namespace {

template <typename T, typename U>
constexpr bool kValidTypes = std::is_same<U, StatOf<T>>::value;

// U must be float for 16/32-bit T and double for double; kernels exist for
// every (T, U) pair so that a wrong pair is an InvalidArgument, not a
// missing kernel.
template <typename T, typename U>
void CheckTypes(OpKernelConstruction* ctx, const char* op) {
  OP_REQUIRES(ctx, (kValidTypes<T, U>),
              absl::InvalidArgumentError(absl::StrCat(
                  op, ": U (the inv_rms type) must be ",
                  DataTypeString(DataTypeToEnum<StatOf<T>>::v()),
                  " for T=", DataTypeString(DataTypeToEnum<T>::v()), ", got ",
                  DataTypeString(DataTypeToEnum<U>::v()))));
}

// Validates x (rank >= 1, non-empty last dimension) and gamma ([H]); returns
// H, or -1 after setting an error on ctx.
int64_t CheckXAndGamma(OpKernelContext* ctx, const char* op, const Tensor& x,
                       const Tensor& gamma) {
  if (!TensorShapeUtils::IsVectorOrHigher(x.shape())) {
    ctx->CtxFailure(absl::InvalidArgumentError(absl::StrCat(
        op, ": x must have rank >= 1, got shape ", x.shape().DebugString())));
    return -1;
  }
  const int64_t cols = x.dim_size(x.dims() - 1);
  if (!TensorShapeUtils::IsVector(gamma.shape()) || gamma.dim_size(0) != cols) {
    ctx->CtxFailure(absl::InvalidArgumentError(absl::StrCat(
        op, ": gamma shape ", gamma.shape().DebugString(),
        " does not match [H] = [", cols, "], the last dimension of x shape ",
        x.shape().DebugString())));
    return -1;
  }
  if (cols == 0) {
    ctx->CtxFailure(absl::InvalidArgumentError(absl::StrCat(
        op,
        ": the last dimension of x must not be empty (the mean square of "
        "an empty row is undefined), got x shape ",
        x.shape().DebugString())));
    return -1;
  }
  return cols;
}

}  // namespace

template <typename Device, typename T, typename U>
class RmsNormOp : public OpKernel {
 public:
  explicit RmsNormOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    CheckTypes<T, U>(ctx, "RmsNorm");
    if (!ctx->status().ok()) return;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES(
        ctx, epsilon_ > 0.0f && std::isfinite(epsilon_),
        absl::InvalidArgumentError(absl::StrCat(
            "RmsNorm: epsilon must be a finite number > 0, got ", epsilon_)));
  }

  void Compute(OpKernelContext* ctx) override {
    if constexpr (kValidTypes<T, U>) {
      const Tensor& x = ctx->input(0);
      const Tensor& gamma = ctx->input(1);
      const int64_t cols = CheckXAndGamma(ctx, "RmsNorm", x, gamma);
      if (cols < 0) return;
      const int64_t rows = x.NumElements() / cols;
      TensorShape row_shape = x.shape();
      row_shape.RemoveLastDims(1);

      Tensor* y = nullptr;
      // y may take over x's buffer when nothing else holds it.
      OP_REQUIRES_OK(
          ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
      Tensor* inv_rms = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, row_shape, &inv_rms));
      if (rows == 0) return;
      functor::RmsNorm<Device, T, U>()(ctx, x.shaped<T, 2>({rows, cols}),
                                       gamma.vec<T>(), static_cast<U>(epsilon_),
                                       y->shaped<T, 2>({rows, cols}),
                                       inv_rms->flat<U>());
    }
  }

 private:
  float epsilon_ = 0.0f;
};

template <typename Device, typename T, typename U>
class RmsNormGradOp : public OpKernel {
 public:
  explicit RmsNormGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    CheckTypes<T, U>(ctx, "RmsNormGrad");
  }

  void Compute(OpKernelContext* ctx) override {
    if constexpr (kValidTypes<T, U>) {
      const Tensor& dy = ctx->input(0);
      const Tensor& x = ctx->input(1);
      const Tensor& gamma = ctx->input(2);
      const Tensor& inv_rms = ctx->input(3);
      const int64_t cols = CheckXAndGamma(ctx, "RmsNormGrad", x, gamma);
      if (cols < 0) return;
      OP_REQUIRES(ctx, dy.shape() == x.shape(),
                  absl::InvalidArgumentError(absl::StrCat(
                      "RmsNormGrad: dy shape ", dy.shape().DebugString(),
                      " does not match x shape ", x.shape().DebugString())));
      TensorShape row_shape = x.shape();
      row_shape.RemoveLastDims(1);
      OP_REQUIRES(
          ctx, inv_rms.shape() == row_shape,
          absl::InvalidArgumentError(absl::StrCat(
              "RmsNormGrad: inv_rms shape ", inv_rms.shape().DebugString(),
              " does not match x.shape[:-1] = ", row_shape.DebugString())));
      const int64_t rows = x.NumElements() / cols;

      Tensor* dx = nullptr;
      // dx may take over dy's or x's buffer when nothing else holds it.
      OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output(
                              {0, 1}, 0, x.shape(), &dx));
      Tensor* dgamma = nullptr;
      OP_REQUIRES_OK(ctx, ctx->allocate_output(1, gamma.shape(), &dgamma));
      const int64_t shards = functor::RmsNormGradShards(rows, cols);
      Tensor partial;
      OP_REQUIRES_OK(ctx,
                     ctx->allocate_temp(DataTypeToEnum<U>::v(),
                                        TensorShape({shards, cols}), &partial));
      functor::RmsNormGrad<Device, T, U>()(
          ctx, dy.shaped<T, 2>({rows, cols}), x.shaped<T, 2>({rows, cols}),
          gamma.vec<T>(), inv_rms.flat<U>(), dx->shaped<T, 2>({rows, cols}),
          dgamma->vec<T>(), partial.matrix<U>());
    }
  }
};

#define REGISTER_CPU(T, U)                                    \
  REGISTER_KERNEL_BUILDER(Name("RmsNorm")                     \
                              .Device(tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T")         \
                              .TypeConstraint<U>("U"),        \
                          RmsNormOp<CPUDevice, T, U>);        \
  REGISTER_KERNEL_BUILDER(Name("RmsNormGrad")                 \
                              .Device(tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T")         \
                              .TypeConstraint<U>("U"),        \
                          RmsNormGradOp<CPUDevice, T, U>);
#define REGISTER_CPU_ALL_U(T) \
  REGISTER_CPU(T, float)      \
  REGISTER_CPU(T, double)

REGISTER_CPU_ALL_U(Eigen::half);
REGISTER_CPU_ALL_U(Eigen::bfloat16);
REGISTER_CPU_ALL_U(float);
REGISTER_CPU_ALL_U(double);

#undef REGISTER_CPU_ALL_U
#undef REGISTER_CPU

}  // namespace hpc_ops
