// See docs in ../ops/collective_ops.cc.
//
// The kernels validate their inputs, allocate what they can, and hand a
// Request to the collective runtime (collective_op_runtime.cc), which calls
// `done` once the other processes took part. The element-wise functors used
// by the runtime are specialised for the CPU here.
#include "kernels/collective_op.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/collective_op_runtime.h"
#include "kernels/common/cpu_parallel.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/overflow.h"

namespace hpc_ops {

using CPUDevice = Eigen::ThreadPoolDevice;
using collective::ReduceOp;
using tensorflow::AsyncOpKernel;
using tensorflow::DataTypeString;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

// absl::InvalidArgumentError over the concatenation of the arguments.
template <typename... Args>
absl::Status InvalidArgument(const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(args...));
}

namespace functor {
namespace {

// Integer sums and products wrap around (computed unsigned: no UB).
template <typename T>
struct SumOp {
  T operator()(T a, T b) const {
    if constexpr (std::is_integral_v<T>) {
      using U = std::make_unsigned_t<T>;
      return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
    } else {
      return a + b;
    }
  }
};

template <typename T>
struct ProductOp {
  T operator()(T a, T b) const {
    if constexpr (std::is_integral_v<T>) {
      using U = std::make_unsigned_t<T>;
      return static_cast<T>(static_cast<U>(a) * static_cast<U>(b));
    } else {
      return a * b;
    }
  }
};

// Min and max return NaN when either operand is NaN.
template <typename T>
struct MinOp {
  T operator()(T a, T b) const { return (a < b || a != a) ? a : b; }
};

template <typename T>
struct MaxOp {
  T operator()(T a, T b) const { return (a > b || a != a) ? a : b; }
};

// Combines operands[*][begin, end) into dst through a block-sized
// accumulator, so dst may alias any operand.
template <typename T, typename F>
void ReduceRange(F f, const T* const* operands, int num_operands, int64_t begin,
                 int64_t end, bool average, int64_t divisor, T* dst) {
  if (num_operands == 2) {
    // The common case (two processes): one pass, element-wise in place.
    const T* a0 = operands[0];
    const T* a1 = operands[1];
    if (!average) {
      for (int64_t i = begin; i < end; ++i) dst[i] = f(a0[i], a1[i]);
    } else {
      // Integers truncate toward zero; divisor >= 1.
      const T d = static_cast<T>(divisor);
      for (int64_t i = begin; i < end; ++i) dst[i] = f(a0[i], a1[i]) / d;
    }
    return;
  }
  constexpr int64_t kBlock = 2048;
  alignas(64) T acc[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    const T* a0 = operands[0] + b;
    if (num_operands == 1) {
      std::memcpy(acc, a0, len * sizeof(T));
    } else {
      const T* a1 = operands[1] + b;
      for (int64_t i = 0; i < len; ++i) acc[i] = f(a0[i], a1[i]);
      for (int k = 2; k < num_operands; ++k) {
        const T* ak = operands[k] + b;
        for (int64_t i = 0; i < len; ++i) acc[i] = f(acc[i], ak[i]);
      }
    }
    if (average) {
      // Integers truncate toward zero; divisor >= 1.
      const T d = static_cast<T>(divisor);
      for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] / d;
    }
    std::memcpy(dst + b, acc, len * sizeof(T));
  }
}

}  // namespace

template <typename T>
struct CollectiveReduce<CPUDevice, T> {
  void operator()(OpKernelContext* ctx, ReduceOp op, const T* const* operands,
                  int num_operands, int64_t n, int64_t divisor, T* dst) {
    if (n <= 0 || num_operands <= 0) return;
    const bool average = op == ReduceOp::kAverage;
    auto work = [=](int64_t begin, int64_t end) {
      switch (op) {
        case ReduceOp::kSum:
        case ReduceOp::kAverage:
          ReduceRange(SumOp<T>(), operands, num_operands, begin, end, average,
                      divisor, dst);
          break;
        case ReduceOp::kMin:
          ReduceRange(MinOp<T>(), operands, num_operands, begin, end, false,
                      divisor, dst);
          break;
        case ReduceOp::kMax:
          ReduceRange(MaxOp<T>(), operands, num_operands, begin, end, false,
                      divisor, dst);
          break;
        case ReduceOp::kProduct:
          ReduceRange(ProductOp<T>(), operands, num_operands, begin, end, false,
                      divisor, dst);
          break;
      }
    };
    if (ctx == nullptr) {
      work(0, n);
    } else {
      // Memory bound: about one cycle per operand per element.
      CpuParallelFor(ctx, n, /*cost_per_unit=*/num_operands + 1, work);
    }
  }
};

template <typename From, typename To>
struct CollectiveConvert<CPUDevice, From, To> {
  void operator()(OpKernelContext* ctx, const From* src, int64_t n, To* dst) {
    if (n <= 0) return;
    auto work = [=](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        dst[i] = static_cast<To>(static_cast<float>(src[i]));
      }
    };
    if (ctx == nullptr) {
      work(0, n);
    } else {
      CpuParallelFor(ctx, n, /*cost_per_unit=*/4, work);
    }
  }
};

template struct CollectiveReduce<CPUDevice, int32_t>;
template struct CollectiveReduce<CPUDevice, int64_t>;
template struct CollectiveReduce<CPUDevice, float>;
template struct CollectiveReduce<CPUDevice, double>;
template struct CollectiveConvert<CPUDevice, Eigen::half, float>;
template struct CollectiveConvert<CPUDevice, float, Eigen::half>;
template struct CollectiveConvert<CPUDevice, Eigen::bfloat16, float>;
template struct CollectiveConvert<CPUDevice, float, Eigen::bfloat16>;

}  // namespace functor

namespace {

using collective::OpType;
using collective::Request;

// Shared by the three collectives: the matching name, and the hand-off.
class CollectiveOpKernel : public AsyncOpKernel {
 public:
  explicit CollectiveOpKernel(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("tensor_name", &tensor_name_));
    std::string function_name;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("function_name", &function_name));
    // Graph mode: the node name is unique in its graph and the same on every
    // process that built the same graph (inlined function calls and lowered
    // control flow prefix it with their path); the function's name tells
    // two graphs apart. ':' cannot occur in a node name.
    if (tensor_name_.empty()) {
      tensor_name_ = function_name.empty()
                         ? name()
                         : absl::StrCat(function_name, ":", name());
    }
  }

 protected:
  // A request for input `index`, matched under the op's name.
  std::unique_ptr<Request> NewRequest(OpKernelContext* ctx, OpType op,
                                      DoneCallback done, int index = 0) const {
    auto r = std::make_unique<Request>();
    r->op = op;
    r->name = tensor_name_;
    r->ctx = ctx;
    r->input = ctx->input(index);
    r->done = std::move(done);
    return r;
  }

  // Rejects tensors whose byte size (as float64/int64) would overflow. The
  // input is named "tensor", or "tensors[index]" for a list input.
  static absl::Status CheckSize(const char* op, const Tensor& t,
                                int index = -1) {
    if (tensorflow::MultiplyWithoutOverflow(t.NumElements(), 8) >= 0) {
      return absl::OkStatus();
    }
    const std::string what =
        index < 0 ? "tensor" : absl::StrCat("tensors[", index, "]");
    return InvalidArgument(op, ": ", what, " of shape ", t.shape().DebugString(),
                           " is too large: its size as 8-byte elements must "
                           "fit in int64");
  }

  std::string tensor_name_;
};

// The reduce_op attr (every reduction, or only sum and average).
absl::Status ParseReduceOp(OpKernelConstruction* ctx, const char* kernel,
                           bool all_ops, ReduceOp* out) {
  std::string op;
  TF_RETURN_IF_ERROR(ctx->GetAttr("reduce_op", &op));
  static constexpr struct {
    const char* name;
    ReduceOp op;
  } kOps[] = {{"sum", ReduceOp::kSum},
              {"average", ReduceOp::kAverage},
              {"min", ReduceOp::kMin},
              {"max", ReduceOp::kMax},
              {"product", ReduceOp::kProduct}};
  const int known = all_ops ? 5 : 2;
  for (int i = 0; i < known; ++i) {
    if (op == kOps[i].name) {
      *out = kOps[i].op;
      return absl::OkStatus();
    }
  }
  return InvalidArgument(kernel, ": reduce_op must be one of ",
                         all_ops ? "sum, average, min, max, product"
                                 : "sum, average",
                         "; got '", op, "'");
}

class HpcAllreduceOp : public CollectiveOpKernel {
 public:
  explicit HpcAllreduceOp(OpKernelConstruction* ctx) : CollectiveOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseReduceOp(ctx, "HpcAllreduce", /*all_ops=*/true, &op_));
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_OK_ASYNC(ctx, collective::EnsureInitialized(), done);
    const Tensor& input = ctx->input(0);
    OP_REQUIRES_OK_ASYNC(ctx, CheckSize("HpcAllreduce", input), done);
    // Reduce in place when nothing else holds the input (asked before the
    // request takes its own reference to the input); otherwise the runtime
    // allocates the output when the operation starts (the outputs of a fused
    // operation then share one buffer, reduced in place).
    Tensor* output = nullptr;
    const bool forwarded =
        ctx->forward_input_to_output_with_shape(0, 0, input.shape(), &output);
    auto r = NewRequest(ctx, OpType::kAllreduce, std::move(done));
    r->reduce_op = op_;
    if (forwarded) {
      r->output = *output;
    } else {
      r->output_pending = true;
    }
    collective::Enqueue(std::move(r));
  }

 private:
  ReduceOp op_ = ReduceOp::kSum;
};

// N allreduces handed to the runtime together; `done` runs once, after the
// last of them completed (the runtime reports errors on the shared context).
class HpcGroupedAllreduceOp : public CollectiveOpKernel {
 public:
  explicit HpcGroupedAllreduceOp(OpKernelConstruction* ctx)
      : CollectiveOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ParseReduceOp(ctx, "HpcGroupedAllreduce",
                                      /*all_ops=*/false, &op_));
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_OK_ASYNC(ctx, collective::EnsureInitialized(), done);
    const int n = ctx->num_inputs();
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK_ASYNC(
          ctx, CheckSize("HpcGroupedAllreduce", ctx->input(i), i), done);
    }
    struct Group {
      std::atomic<int> pending;
      DoneCallback done;
    };
    auto group = std::make_shared<Group>();
    group->pending.store(n);
    group->done = std::move(done);
    // Every request is built before the first is handed over: the runtime
    // thread may allocate outputs on `ctx` as soon as it has one.
    std::vector<std::unique_ptr<Request>> requests;
    requests.reserve(n);
    for (int i = 0; i < n; ++i) {
      // As in HpcAllreduce: an input that nothing else holds is reduced in
      // place; the runtime allocates the other outputs when their operation
      // starts.
      Tensor* output = nullptr;
      const bool forwarded = ctx->forward_input_to_output_with_shape(
          i, i, ctx->input(i).shape(), &output);
      auto r = NewRequest(
          ctx, OpType::kAllreduce,
          [group] {
            if (group->pending.fetch_sub(1) == 1) group->done();
          },
          i);
      r->name = absl::StrCat(r->name, "/", i);
      r->reduce_op = op_;
      if (forwarded) {
        r->output = *output;
      } else {
        r->output_pending = true;
        r->output_index = i;
      }
      requests.push_back(std::move(r));
    }
    for (auto& r : requests) collective::Enqueue(std::move(r));
  }

 private:
  ReduceOp op_ = ReduceOp::kSum;
};

class HpcBroadcastOp : public CollectiveOpKernel {
 public:
  explicit HpcBroadcastOp(OpKernelConstruction* ctx) : CollectiveOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("root_rank", &root_rank_));
    OP_REQUIRES(ctx, root_rank_ >= 0,
                InvalidArgument("HpcBroadcast: root_rank must be >= 0, got ",
                                root_rank_));
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_OK_ASYNC(ctx, collective::EnsureInitialized(), done);
    OP_REQUIRES_ASYNC(ctx, root_rank_ < collective::Size(),
                      InvalidArgument("HpcBroadcast: root_rank ", root_rank_,
                                      " is out of range for a job of ",
                                      collective::Size(), " process(es)"),
                      done);
    const Tensor& input = ctx->input(0);
    OP_REQUIRES_OK_ASYNC(ctx, CheckSize("HpcBroadcast", input), done);
    Tensor* output = nullptr;
    OP_REQUIRES_OK_ASYNC(
        ctx,
        ctx->forward_input_or_allocate_output({0}, 0, input.shape(), &output),
        done);
    // The root sends from its output buffer.
    if (collective::Rank() == root_rank_ &&
        output->tensor_data().data() != input.tensor_data().data() &&
        input.TotalBytes() > 0) {
      std::memcpy(const_cast<char*>(output->tensor_data().data()),
                  input.tensor_data().data(), input.TotalBytes());
    }
    auto r = NewRequest(ctx, OpType::kBroadcast, std::move(done));
    r->root_rank = root_rank_;
    r->output = *output;
    collective::Enqueue(std::move(r));
  }

 private:
  int root_rank_ = 0;
};

class HpcAllgatherOp : public CollectiveOpKernel {
 public:
  explicit HpcAllgatherOp(OpKernelConstruction* ctx)
      : CollectiveOpKernel(ctx) {}

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    OP_REQUIRES_OK_ASYNC(ctx, collective::EnsureInitialized(), done);
    const Tensor& input = ctx->input(0);
    OP_REQUIRES_ASYNC(
        ctx, input.dims() >= 1,
        InvalidArgument(
            "HpcAllgather: tensor must have rank >= 1 (it is concatenated "
            "along dimension 0), got shape ",
            input.shape().DebugString()),
        done);
    OP_REQUIRES_OK_ASYNC(ctx, CheckSize("HpcAllgather", input), done);
    // The output shape is known once every process reported its first
    // dimension: the runtime allocates it.
    collective::Enqueue(NewRequest(ctx, OpType::kAllgather, std::move(done)));
  }
};

// HpcRank, HpcSize, HpcLocalRank.
template <int (*Value)()>
class ProcessInfoOp : public OpKernel {
 public:
  explicit ProcessInfoOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OP_REQUIRES_OK(ctx, collective::EnsureInitialized());
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int32_t>()() = Value();
  }
};

#define REGISTER_CPU(T)                                       \
  REGISTER_KERNEL_BUILDER(Name("HpcAllreduce")                \
                              .Device(tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),        \
                          HpcAllreduceOp);                    \
  REGISTER_KERNEL_BUILDER(Name("HpcGroupedAllreduce")         \
                              .Device(tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),        \
                          HpcGroupedAllreduceOp);             \
  REGISTER_KERNEL_BUILDER(Name("HpcBroadcast")                \
                              .Device(tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),        \
                          HpcBroadcastOp);                    \
  REGISTER_KERNEL_BUILDER(Name("HpcAllgather")                \
                              .Device(tensorflow::DEVICE_CPU) \
                              .TypeConstraint<T>("T"),        \
                          HpcAllgatherOp)

REGISTER_CPU(int32_t);
REGISTER_CPU(int64_t);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);
REGISTER_CPU(float);
REGISTER_CPU(double);

#undef REGISTER_CPU

REGISTER_KERNEL_BUILDER(Name("HpcRank").Device(tensorflow::DEVICE_CPU),
                        ProcessInfoOp<collective::Rank>);
REGISTER_KERNEL_BUILDER(Name("HpcSize").Device(tensorflow::DEVICE_CPU),
                        ProcessInfoOp<collective::Size>);
REGISTER_KERNEL_BUILDER(Name("HpcLocalRank").Device(tensorflow::DEVICE_CPU),
                        ProcessInfoOp<collective::LocalRank>);

}  // namespace
}  // namespace hpc_ops
