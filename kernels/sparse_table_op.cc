// See docs in ../ops/sparse_table_ops.cc.
//
// OpKernels of the sparse_table family. Every kernel re-validates its inputs
// (raw_ops, eager mode and fuzzers bypass the shape functions) and reaches
// the table only through HandleFromInput + LookupResource<SparseTable>,
// which checks the handle's resource type.
#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "kernels/common/cpu_parallel.h"
#include "kernels/sparse_table_op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/lib/core/errors.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace hpc_ops {

using CPUDevice = Eigen::ThreadPoolDevice;
using sparse_table::AllShardsLock;
using sparse_table::KeyGroups;
using sparse_table::KeyHash;
using sparse_table::Shard;
using sparse_table::SparseTable;
using sparse_table::TableConfig;
using tensorflow::AllocatorAttributes;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::ResourceHandle;
using Status = absl::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::TensorShapeUtils;
namespace errors = ::hpc_ops::sparse_table::errors;

namespace {

// Looks the table up from input 0, which must be a scalar handle to a
// SparseTable (a tf.Variable's handle, say, is refused by the type check).
Status GetTable(OpKernelContext* ctx, const char* op,
                tensorflow::core::RefCountPtr<SparseTable>* table) {
  const Tensor& h = ctx->input(0);
  if (h.dtype() != tensorflow::DT_RESOURCE || !TensorShapeUtils::IsScalar(h.shape())) {
    return errors::InvalidArgument(op, ": table_handle must be a scalar resource, got a ",
                                   tensorflow::DataTypeString(h.dtype()), " tensor of shape ",
                                   h.shape().DebugString());
  }
  ResourceHandle handle;
  TF_RETURN_IF_ERROR(HandleFromInput(ctx, 0, &handle));
  Status s = LookupResource(ctx, handle, table);
  if (!s.ok()) {
    return Status(s.code(), absl::StrCat(
                                op, ": table_handle is not a live SparseTable: ",
                                s.message()));
  }
  return Status();
}

Status CheckScalar(const char* op, const char* name, const Tensor& t) {
  if (TensorShapeUtils::IsScalar(t.shape())) return Status();
  return errors::InvalidArgument(op, ": ", name, " must be a scalar, got shape ",
                                 t.shape().DebugString());
}

}  // namespace

// ---------------------------------------------------------------------------
// SparseTableHandle: creates (or finds) the table in the resource manager,
// like HashTableV2; an empty shared_name makes it private to this kernel.
class SparseTableHandleOp : public OpKernel {
 public:
  explicit SparseTableHandleOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, TableConfig::FromAttrs(ctx, &config_));
  }

  ~SparseTableHandleOp() override {
    if (initialized_ && cinfo_.resource_is_private_to_kernel()) {
      cinfo_.resource_manager()
          ->Delete<SparseTable>(cinfo_.container(), cinfo_.name())
          .IgnoreError();  // already deleted (DestroyResourceOp) is fine
    }
  }

  void Compute(OpKernelContext* ctx) override {
    absl::MutexLock l(&mu_);
    if (!initialized_) {
      OP_REQUIRES_OK(ctx, cinfo_.Init(ctx->resource_manager(), def()));
      initialized_ = true;
    }
    const ResourceHandle handle =
        tensorflow::MakeResourceHandle<SparseTable>(ctx, cinfo_.container(), cinfo_.name());
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, tensorflow::LookupOrCreateResource<SparseTable>(
                            ctx, handle, &table, [this](SparseTable** t) {
                              *t = new SparseTable(config_);
                              return Status();
                            }));
    OP_REQUIRES(ctx, table->config() == config_,
                errors::InvalidArgument(
                    "SparseTableHandle: the table '", cinfo_.name(),
                    "' already exists with another configuration: existing ",
                    table->config().DebugString(), "; requested ", config_.DebugString()));
    Tensor* out = nullptr;
    AllocatorAttributes attr;
    attr.set_on_host(true);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out, attr));
    out->scalar<ResourceHandle>()() = handle;
  }

 private:
  TableConfig config_;
  absl::Mutex mu_;
  tensorflow::ContainerInfo cinfo_ ABSL_GUARDED_BY(mu_);
  bool initialized_ ABSL_GUARDED_BY(mu_) = false;
};

// ---------------------------------------------------------------------------
namespace {

// The combiner attr of the pull ops.
Status ParseCombiner(const char* op, const std::string& name, functor::PullCombiner* combiner) {
  if (name == "none") {
    *combiner = functor::PullCombiner::kNone;
  } else if (name == "sum") {
    *combiner = functor::PullCombiner::kSum;
  } else if (name == "mean") {
    *combiner = functor::PullCombiner::kMean;
  } else {
    return errors::InvalidArgument(op, ": attr combiner='", name,
                                   "' must be 'none', 'sum' or 'mean'");
  }
  return Status();
}

// The groups of dense keys' last axis (keys of rank >= 1, checked by the
// caller): each keys[i..., :] is a group; *rows is keys' shape without that
// axis.
Status LastAxisGroups(const Tensor& keys, TensorShape* rows, functor::RowGroups* groups) {
  *rows = keys.shape();
  groups->keys_per_group = keys.dim_size(keys.dims() - 1);
  TF_RETURN_IF_ERROR(rows->RemoveLastDimsWithStatus(1));
  groups->count = rows->num_elements();
  return Status();
}

// The groups of a ragged op: keys (input 1) of rank 1 and their row splits
// (input 2: rank 1, int32 or int64, from 0 to the number of keys, never
// decreasing), checked before anything reads them. int32 splits are
// widened into *converted.
Status RaggedGroups(OpKernelContext* ctx, const char* op, const Tensor& keys,
                    functor::RowGroups* groups, std::vector<int64_t>* converted) {
  const Tensor& splits = ctx->input(2);
  if (keys.dims() != 1) {
    return errors::InvalidArgument(op, ": keys must have rank 1, got shape ",
                                   keys.shape().DebugString());
  }
  if (splits.dims() != 1 || splits.NumElements() < 1) {
    return errors::InvalidArgument(op, ": row_splits must have rank 1 and at least one "
                                   "element, got shape ", splits.shape().DebugString());
  }
  const int64_t n = keys.NumElements();
  const int64_t count = splits.NumElements() - 1;
  const int64_t* s = nullptr;
  if (splits.dtype() == tensorflow::DT_INT64) {
    s = splits.flat<int64_t>().data();
  } else if (splits.dtype() == tensorflow::DT_INT32) {
    const auto in = splits.flat<int32_t>();
    converted->assign(in.data(), in.data() + in.size());
    s = converted->data();
  } else {
    return errors::InvalidArgument(op, ": row_splits must be int32 or int64");
  }
  if (s[0] != 0 || s[count] != n) {
    return errors::InvalidArgument(op, ": row_splits must start at 0 and end at the "
                                   "number of keys, ", n, ", got ", s[0], " and ", s[count]);
  }
  for (int64_t r = 0; r < count; ++r) {
    if (s[r] > s[r + 1]) {
      return errors::InvalidArgument(op, ": row_splits must not decrease, got ", s[r],
                                     " then ", s[r + 1], " at ", r);
    }
  }
  groups->count = count;
  groups->splits = s;
  return Status();
}

}  // namespace

// SparseTablePull and SparseTablePullRagged: the same attrs, checks and
// functor; each op says how its keys make output rows (Groups).
template <typename Device>
class PullOpBase : public OpKernel {
 public:
  PullOpBase(OpKernelConstruction* ctx, const char* op) : OpKernel(ctx), op_(op) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("dim", &dim_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("insert_missing", &insert_missing_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("combiner", &combiner_name_));
    OP_REQUIRES(ctx, dim_ >= 1 && dim_ <= TableConfig::kMaxDim,
                errors::InvalidArgument(op, ": attr dim=", dim_, " must be in [1, ",
                                        TableConfig::kMaxDim, "]"));
    OP_REQUIRES_OK(ctx, ParseCombiner(op, combiner_name_, &combiner_));
  }

  void Compute(OpKernelContext* ctx) final {
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, op_, &table));
    const Tensor& keys = ctx->input(1);
    OP_REQUIRES(ctx, keys.dtype() == tensorflow::DT_INT64,
                errors::InvalidArgument(op_, ": keys must be int64, got ",
                                        tensorflow::DataTypeString(keys.dtype())));
    OP_REQUIRES(ctx, table->dim() == dim_,
                errors::InvalidArgument(op_, ": attr dim=", dim_,
                                        " does not match the table's dim ", table->dim()));
    TensorShape out_shape;
    functor::RowGroups groups;
    std::vector<int64_t> splits;
    OP_REQUIRES_OK(ctx, Groups(ctx, keys, &out_shape, &groups, &splits));
    OP_REQUIRES_OK(ctx, out_shape.AddDimWithStatus(dim_));
    Tensor* values = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, out_shape, &values));
    OP_REQUIRES_OK(ctx, functor::SparseTablePull<Device>()(
                            ctx, table.get(), keys.flat<int64_t>().data(), keys.NumElements(),
                            insert_missing_, combiner_, groups, values->flat<float>().data()));
  }

 protected:
  // The output's shape without its last axis (dim), and the groups of keys
  // a combining pull sums (their splits, if any, kept in *splits or in an
  // input).
  virtual Status Groups(OpKernelContext* ctx, const Tensor& keys, TensorShape* rows,
                              functor::RowGroups* groups, std::vector<int64_t>* splits) = 0;

  const char* const op_;
  int64_t dim_;
  bool insert_missing_;
  std::string combiner_name_;
  functor::PullCombiner combiner_ = functor::PullCombiner::kNone;
};

template <typename Device>
class SparseTablePullOp : public PullOpBase<Device> {
 public:
  explicit SparseTablePullOp(OpKernelConstruction* ctx)
      : PullOpBase<Device>(ctx, "SparseTablePull") {}

 private:
  Status Groups(OpKernelContext*, const Tensor& keys, TensorShape* rows,
                      functor::RowGroups* groups, std::vector<int64_t>*) override {
    *rows = keys.shape();
    if (this->combiner_ == functor::PullCombiner::kNone) return Status();
    if (keys.dims() < 1) {
      return errors::InvalidArgument("SparseTablePull: combiner '", this->combiner_name_,
                                     "' needs keys of rank >= 1 (their last axis is "
                                     "combined), got a scalar");
    }
    return LastAxisGroups(keys, rows, groups);
  }
};

template <typename Device>
class SparseTablePullRaggedOp : public PullOpBase<Device> {
 public:
  explicit SparseTablePullRaggedOp(OpKernelConstruction* ctx)
      : PullOpBase<Device>(ctx, "SparseTablePullRagged") {}

 private:
  Status Groups(OpKernelContext* ctx, const Tensor& keys, TensorShape* rows,
                      functor::RowGroups* groups, std::vector<int64_t>* converted) override {
    TF_RETURN_IF_ERROR(RaggedGroups(ctx, this->op_, keys, groups, converted));
    *rows = TensorShape({groups->count});
    return Status();
  }
};

// ---------------------------------------------------------------------------
// SparseTablePush and SparseTablePushRagged: the same checks and functor;
// each op says which gradient row its keys take (Groups). Inputs: the
// table, the keys, then (the ragged op's row splits,) grads and the
// learning rate.
template <typename Device>
class PushOpBase : public OpKernel {
 public:
  PushOpBase(OpKernelConstruction* ctx, const char* op, int grads_index)
      : OpKernel(ctx), op_(op), grads_index_(grads_index) {
    std::string combiner;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("combiner", &combiner));
    OP_REQUIRES(ctx, combiner == "sum" || combiner == "mean",
                errors::InvalidArgument(op, ": attr combiner='", combiner,
                                        "' must be 'sum' or 'mean'"));
    mean_ = combiner == "mean";
  }

  void Compute(OpKernelContext* ctx) final {
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, op_, &table));
    const Tensor& keys = ctx->input(1);
    const Tensor& grads = ctx->input(grads_index_);
    const Tensor& lr = ctx->input(grads_index_ + 1);
    OP_REQUIRES(ctx,
                keys.dtype() == tensorflow::DT_INT64 &&
                    grads.dtype() == tensorflow::DT_FLOAT &&
                    lr.dtype() == tensorflow::DT_FLOAT,
                errors::InvalidArgument(
                    op_, ": expected int64 keys, float grads and a float "
                    "learning_rate, got ", tensorflow::DataTypeString(keys.dtype()), ", ",
                    tensorflow::DataTypeString(grads.dtype()), " and ",
                    tensorflow::DataTypeString(lr.dtype())));
    OP_REQUIRES_OK(ctx, CheckScalar(op_, "learning_rate", lr));
    TensorShape expected;
    functor::RowGroups groups;
    std::vector<int64_t> splits;
    std::string what;
    OP_REQUIRES_OK(ctx, Groups(ctx, keys, &expected, &groups, &splits, &what));
    OP_REQUIRES_OK(ctx, expected.AddDimWithStatus(table->dim()));
    OP_REQUIRES(ctx, grads.shape() == expected,
                errors::InvalidArgument(op_, ": grads shape ", grads.shape().DebugString(),
                                        " does not match ", what, " + [dim=", table->dim(),
                                        "]"));
    const int64_t n = keys.NumElements();
    // Distinct keys are numbered, and ragged keys' gradient rows kept, in
    // 32 bits.
    OP_REQUIRES(ctx, n <= std::numeric_limits<uint32_t>::max(),
                errors::InvalidArgument(op_, ": at most 2^32-1 keys per push, got ", n));
    OP_REQUIRES(ctx, groups.count <= std::numeric_limits<uint32_t>::max(),
                errors::InvalidArgument(op_, ": at most 2^32-1 gradient rows per push, got ",
                                        groups.count));
    const float learning_rate = lr.scalar<float>()();
    if (table->config().optimizer == sparse_table::OptimizerKind::kFtrl) {
      OP_REQUIRES(ctx, learning_rate > 0.0f,
                  errors::InvalidArgument(
                      op_, ": learning_rate must be > 0 for the ftrl optimizer, got ",
                      learning_rate));
    }
    const float* g = grads.flat<float>().data();
    Tensor means;
    if (mean_ && n > 0) {  // each row divided by the number of keys sharing it
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, grads.shape(), &means));
      float* out = means.flat<float>().data();
      const int64_t dim = table->dim();
      for (int64_t r = 0; r < groups.count; ++r) {
        const float size =
            static_cast<float>(std::max<int64_t>(1, groups.Begin(r + 1) - groups.Begin(r)));
        for (int64_t j = 0; j < dim; ++j) out[r * dim + j] = g[r * dim + j] / size;
      }
      g = out;
    }
    Tensor* step = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &step));
    OP_REQUIRES_OK(ctx, functor::SparseTablePush<Device>()(ctx, table.get(),
                                                           keys.flat<int64_t>().data(), n, g,
                                                           groups, learning_rate,
                                                           &step->scalar<int64_t>()()));
  }

 protected:
  // grads' shape without its last axis (dim), the groups of keys sharing a
  // gradient row (their splits, if any, kept in *splits or in an input),
  // and what that shape is, for the error message.
  virtual Status Groups(OpKernelContext* ctx, const Tensor& keys, TensorShape* rows,
                        functor::RowGroups* groups, std::vector<int64_t>* splits,
                        std::string* what) = 0;

  const char* const op_;
  const int grads_index_;
  bool mean_ = false;
};

template <typename Device>
class SparseTablePushOp : public PushOpBase<Device> {
 public:
  explicit SparseTablePushOp(OpKernelConstruction* ctx)
      : PushOpBase<Device>(ctx, "SparseTablePush", 2) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shared_grads", &shared_grads_));
    OP_REQUIRES(ctx, !this->mean_ || shared_grads_,
                errors::InvalidArgument("SparseTablePush: combiner 'mean' needs shared_grads"));
  }

 private:
  // With shared_grads the keys of keys[..., j] share grads[..., :].
  Status Groups(OpKernelContext*, const Tensor& keys, TensorShape* rows,
                functor::RowGroups* groups, std::vector<int64_t>*,
                std::string* what) override {
    *what = absl::StrCat("keys shape ", keys.shape().DebugString());
    if (!shared_grads_) {
      *rows = keys.shape();
      groups->count = keys.NumElements();
      return Status();
    }
    if (keys.dims() < 1) {
      return errors::InvalidArgument(
          "SparseTablePush: keys must have rank >= 1 with shared_grads, got shape ",
          keys.shape().DebugString());
    }
    absl::StrAppend(what, " without its last axis");
    return LastAxisGroups(keys, rows, groups);
  }

  bool shared_grads_ = false;
};

// Key i takes the gradient row r of the ragged row holding it:
// row_splits[r] <= i < row_splits[r + 1].
template <typename Device>
class SparseTablePushRaggedOp : public PushOpBase<Device> {
 public:
  explicit SparseTablePushRaggedOp(OpKernelConstruction* ctx)
      : PushOpBase<Device>(ctx, "SparseTablePushRagged", 3) {}

 private:
  Status Groups(OpKernelContext* ctx, const Tensor& keys, TensorShape* rows,
                functor::RowGroups* groups, std::vector<int64_t>* converted,
                std::string* what) override {
    TF_RETURN_IF_ERROR(RaggedGroups(ctx, this->op_, keys, groups, converted));
    *rows = TensorShape({groups->count});
    *what = absl::StrCat("the ", groups->count, " rows of row_splits");
    return Status();
  }
};

// ---------------------------------------------------------------------------
class SparseTableSizeOp : public OpKernel {
 public:
  explicit SparseTableSizeOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableSize", &table));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<int64_t>()() = table->Size();
  }
};

// ---------------------------------------------------------------------------
// SparseTableExport: every shard is read-locked for the whole copy, so the
// keys, values, slots and counters are one consistent snapshot.
class SparseTableExportOp : public OpKernel {
 public:
  explicit SparseTableExportOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableExport", &table));
    const TableConfig& c = table->config();
    const int S = table->num_shards();
    const int64_t dim = c.dim;
    const int num_slots = c.num_slots();
    const int num_counters = c.num_counters();

    AllShardsLock lock(table.get(), /*exclusive=*/false);
    std::vector<int64_t> begin(S + 1, 0);
    for (int s = 0; s < S; ++s) {
      begin[s + 1] = begin[s] + static_cast<int64_t>(table->shard(s).arena.size());
    }
    const int64_t n = begin[S];
    Tensor *keys, *values, *slots, *counters, *step;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n}), &keys));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n, dim}), &values));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({n, num_slots, dim}), &slots));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({n, num_counters}), &counters));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({}), &step));
    step->scalar<int64_t>()() = table->step();
    int64_t* k_out = keys->flat<int64_t>().data();
    float* v_out = values->flat<float>().data();
    float* s_out = slots->flat<float>().data();
    int64_t* c_out = counters->flat<int64_t>().data();
    const int64_t header = c.header_bytes();
    const int64_t slot_floats = num_slots * dim;
    // The copy runs on this thread: waiting for the thread pool while
    // holding shard locks could deadlock with pool tasks (another op's pull
    // or push) blocked on those locks.
    for (int s = 0; s < S; ++s) {
      const sparse_table::RowArena& arena = table->shard(s).arena;
      for (int64_t r = 0, i = begin[s]; i < begin[s + 1]; ++r, ++i) {
        const char* row = arena.Row(r);
        std::memcpy(&k_out[i], row, sizeof(int64_t));
        const float* w = reinterpret_cast<const float*>(row + header);
        std::memcpy(v_out + i * dim, w, dim * sizeof(float));
        std::memcpy(s_out + i * slot_floats, w + dim, slot_floats * sizeof(float));
        const uint32_t* cnt = reinterpret_cast<const uint32_t*>(row + 8);
        for (int j = 0; j < num_counters; ++j) c_out[i * num_counters + j] = cnt[j];
      }
    }
  }
};

// ---------------------------------------------------------------------------
// SparseTableImport: validates everything and builds the new shards without
// holding any table lock, then swaps them in under every shard's writer
// lock. A bad input leaves the table as it was.
class SparseTableImportOp : public OpKernel {
 public:
  explicit SparseTableImportOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
    constexpr char kOp[] = "SparseTableImport";
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, kOp, &table));
    const TableConfig& c = table->config();
    const Tensor& keys = ctx->input(1);
    const Tensor& values = ctx->input(2);
    const Tensor& slots = ctx->input(3);
    const Tensor& counters = ctx->input(4);
    const Tensor& step = ctx->input(5);
    OP_REQUIRES(ctx,
                keys.dtype() == tensorflow::DT_INT64 && values.dtype() == tensorflow::DT_FLOAT &&
                    slots.dtype() == tensorflow::DT_FLOAT &&
                    counters.dtype() == tensorflow::DT_INT64 &&
                    step.dtype() == tensorflow::DT_INT64,
                errors::InvalidArgument(
                    kOp, ": expected int64 keys, float values and slots, int64 counters "
                    "and step, got ", tensorflow::DataTypeString(keys.dtype()), ", ",
                    tensorflow::DataTypeString(values.dtype()), ", ",
                    tensorflow::DataTypeString(slots.dtype()), ", ",
                    tensorflow::DataTypeString(counters.dtype()), " and ",
                    tensorflow::DataTypeString(step.dtype())));
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(keys.shape()),
                errors::InvalidArgument(kOp, ": keys must be a vector, got shape ",
                                        keys.shape().DebugString()));
    const int64_t n = keys.dim_size(0);
    const int64_t dim = c.dim;
    OP_REQUIRES(ctx, TensorShapeUtils::IsMatrix(values.shape()) && values.dim_size(0) == n,
                errors::InvalidArgument(kOp, ": values must have shape [", n, ", ", dim,
                                        "] (one row per key), got ",
                                        values.shape().DebugString()));
    OP_REQUIRES(ctx, values.dim_size(1) == dim,
                errors::InvalidArgument(kOp, ": values have dim ", values.dim_size(1),
                                        " but the table has dim ", dim));
    OP_REQUIRES(ctx,
                slots.dims() == 3 && slots.dim_size(0) == n &&
                    slots.dim_size(1) == c.num_slots() && slots.dim_size(2) == dim,
                errors::InvalidArgument(kOp, ": slots must have shape [", n, ", ",
                                        c.num_slots(), ", ", dim, "] for optimizer '",
                                        sparse_table::OptimizerName(c.optimizer),
                                        "', got ", slots.shape().DebugString()));
    OP_REQUIRES(ctx,
                counters.dims() == 2 && counters.dim_size(0) == n &&
                    counters.dim_size(1) == c.num_counters(),
                errors::InvalidArgument(kOp, ": counters must have shape [", n, ", ",
                                        c.num_counters(), "], got ",
                                        counters.shape().DebugString()));
    OP_REQUIRES_OK(ctx, CheckScalar(kOp, "step", step));
    const int64_t new_step = step.scalar<int64_t>()();
    OP_REQUIRES(ctx, new_step >= 0,
                errors::InvalidArgument(kOp, ": step must be >= 0, got ", new_step));
    const int64_t* cnt = counters.flat<int64_t>().data();
    const int64_t num_cnt = counters.NumElements();
    for (int64_t i = 0; i < num_cnt; ++i) {
      OP_REQUIRES(ctx, cnt[i] >= 0 && cnt[i] <= std::numeric_limits<uint32_t>::max(),
                  errors::InvalidArgument(kOp, ": counters[", i / c.num_counters(), ", ",
                                          i % c.num_counters(), "] = ", cnt[i],
                                          " is outside [0, 2^32-1]"));
    }

    // Build the new shards.
    const int S = table->num_shards();
    sparse_table::CallScratch scratch;
    OP_REQUIRES_OK(ctx, scratch.Reserve(ctx, sparse_table::GroupScratchBytes(n)));
    KeyGroups g;
    sparse_table::GroupKeysByShard(ctx, *table, keys.flat<int64_t>().data(), n, &scratch, &g);
    std::vector<std::unique_ptr<Shard>> fresh(S);
    std::vector<Status> status(S);
    const float* v_in = values.flat<float>().data();
    const float* s_in = slots.flat<float>().data();
    const int64_t slot_floats = c.num_slots() * dim;
    const int num_counters = c.num_counters();
    CpuParallelFor(
        ctx, S, std::max<int64_t>(1, n / S) * (8 * dim + 200) + 1, [&](int64_t sb, int64_t se) {
          for (int64_t s = sb; s < se; ++s) {
            fresh[s] = std::make_unique<Shard>(table->chunk_pool());
            Shard& sh = *fresh[s];
            absl::MutexLock l(&sh.mu);  // uncontended; keeps the invariants
            const int64_t k = g.begin[s + 1] - g.begin[s];
            if (!sh.index.Reset(k)) {
              status[s] = errors::ResourceExhausted(kOp, ": out of memory");
              continue;
            }
            for (int64_t i = g.begin[s]; i < g.begin[s + 1]; ++i) {
              const int64_t key = g.entries[i].key;
              const int64_t pos = g.entries[i].pos;
              const uint64_t h = KeyHash(key);
              if (sh.index.Find(h, key, sh.arena) >= 0) {
                status[s] = errors::InvalidArgument(kOp, ": duplicate key ", key,
                                                    " (at index ", pos, ")");
                break;
              }
              char* row = table->AppendRow(sh, h, key, &status[s]);
              if (row == nullptr) break;
              float* w = table->Values(row);
              std::memcpy(w, v_in + pos * dim, dim * sizeof(float));
              std::memcpy(w + dim, s_in + pos * slot_floats, slot_floats * sizeof(float));
              uint32_t* rc = table->Counters(row);
              for (int j = 0; j < num_counters; ++j) {
                rc[j] = static_cast<uint32_t>(cnt[pos * num_counters + j]);
              }
            }
          }
        });
    for (const Status& s : status) OP_REQUIRES_OK(ctx, s);

    // Swap them in; the old contents are freed after the locks are released.
    {
      AllShardsLock lock(table.get(), /*exclusive=*/true);
      for (int s = 0; s < S; ++s) {
        Shard& live = table->shard(s);
        live.arena.Swap(fresh[s]->arena);
        live.index.Swap(fresh[s]->index);
        live.candidates.Clear();
      }
      table->set_step(new_step);
    }
  }
};

// ---------------------------------------------------------------------------
// SparseTableExportAdmission: every shard's admission counts, read under
// every shard's lock (one moment).
class SparseTableExportAdmissionOp : public OpKernel {
 public:
  explicit SparseTableExportAdmissionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, "SparseTableExportAdmission", &table));
    const int S = table->num_shards();
    AllShardsLock lock(table.get(), /*exclusive=*/false);
    int64_t n = 0;
    for (int s = 0; s < S; ++s) n += static_cast<int64_t>(table->shard(s).candidates.size());
    Tensor *keys, *counts;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n}), &keys));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({n}), &counts));
    int64_t* k_out = keys->flat<int64_t>().data();
    int64_t* c_out = counts->flat<int64_t>().data();
    int64_t i = 0;
    for (int s = 0; s < S; ++s) {
      table->shard(s).candidates.ForEach([&](int64_t key, uint32_t count) {
        k_out[i] = key;
        c_out[i] = count;
        ++i;
      });
    }
  }
};

// ---------------------------------------------------------------------------
// SparseTableImportAdmission: validates the counts, then replaces every
// shard's under every shard's writer lock; keys that have a row are skipped.
class SparseTableImportAdmissionOp : public OpKernel {
 public:
  explicit SparseTableImportAdmissionOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
    constexpr char kOp[] = "SparseTableImportAdmission";
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, kOp, &table));
    const Tensor& keys = ctx->input(1);
    const Tensor& counts = ctx->input(2);
    OP_REQUIRES(ctx,
                keys.dtype() == tensorflow::DT_INT64 && counts.dtype() == tensorflow::DT_INT64,
                errors::InvalidArgument(kOp, ": expected int64 keys and counts, got ",
                                        tensorflow::DataTypeString(keys.dtype()), " and ",
                                        tensorflow::DataTypeString(counts.dtype())));
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(keys.shape()),
                errors::InvalidArgument(kOp, ": keys must be a vector, got shape ",
                                        keys.shape().DebugString()));
    const int64_t n = keys.dim_size(0);
    OP_REQUIRES(ctx, TensorShapeUtils::IsVector(counts.shape()) && counts.dim_size(0) == n,
                errors::InvalidArgument(kOp, ": counts must have shape [", n,
                                        "] (one count per key), got ",
                                        counts.shape().DebugString()));
    const int64_t* k = keys.flat<int64_t>().data();
    const int64_t* cnt = counts.flat<int64_t>().data();
    for (int64_t i = 0; i < n; ++i) {
      OP_REQUIRES(ctx, cnt[i] >= 1 && cnt[i] <= std::numeric_limits<uint32_t>::max(),
                  errors::InvalidArgument(kOp, ": counts[", i, "] = ", cnt[i],
                                          " is outside [1, 2^32-1]"));
    }
    std::vector<int64_t> sorted(k, k + n);
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    OP_REQUIRES(ctx, dup == sorted.end(),
                errors::InvalidArgument(kOp, ": duplicate key ", dup == sorted.end() ? 0 : *dup));
    if (table->config().admission_min_count <= 1) return;  // every key is admitted

    AllShardsLock lock(table.get(), /*exclusive=*/true);
    for (int s = 0; s < table->num_shards(); ++s) table->shard(s).candidates.Clear();
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t h = KeyHash(k[i]);
      Shard& sh = table->shard(table->ShardOf(h));
      if (sh.index.Find(h, k[i], sh.arena) >= 0) continue;
      sh.candidates.Set(h, k[i], static_cast<uint32_t>(cnt[i]));
    }
  }
};

// ---------------------------------------------------------------------------
// SparseTableInitFromDense: inserts key i -> values[i] on the first run for
// a table; later runs only validate their input and return.
class SparseTableInitFromDenseOp : public OpKernel {
 public:
  explicit SparseTableInitFromDenseOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    constexpr char kOp[] = "SparseTableInitFromDense";
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, kOp, &table));
    const Tensor& values = ctx->input(1);
    OP_REQUIRES(ctx, values.dtype() == tensorflow::DT_FLOAT,
                errors::InvalidArgument(kOp, ": values must be float, got ",
                                        tensorflow::DataTypeString(values.dtype())));
    OP_REQUIRES(ctx,
                TensorShapeUtils::IsMatrix(values.shape()) &&
                    values.dim_size(1) == table->dim(),
                errors::InvalidArgument(kOp, ": values must have shape [n, ", table->dim(),
                                        "] (the table's dim), got ",
                                        values.shape().DebugString()));
    if (table->dense_initialized()) return;
    absl::MutexLock once(table->dense_init_mu());
    if (table->dense_initialized()) return;
    const int64_t n = values.dim_size(0);
    const int64_t dim = table->dim();
    const float* v = values.flat<float>().data();
    const int64_t step = table->step();
    for (int64_t key = 0; key < n; ++key) {
      const uint64_t h = KeyHash(key);
      Shard& sh = table->shard(table->ShardOf(h));
      absl::MutexLock l(&sh.mu);
      if (sh.index.Find(h, key, sh.arena) >= 0) continue;
      Status s;
      char* row = table->InsertRow(sh, h, key, step, &s);
      OP_REQUIRES_OK(ctx, s);
      std::memcpy(table->Values(row), v + key * dim, dim * sizeof(float));
    }
    table->set_dense_initialized();
  }
};

// ---------------------------------------------------------------------------
class SparseTableEvictOp : public OpKernel {
 public:
  explicit SparseTableEvictOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override ABSL_NO_THREAD_SAFETY_ANALYSIS {
    constexpr char kOp[] = "SparseTableEvict";
    tensorflow::core::RefCountPtr<SparseTable> table;
    OP_REQUIRES_OK(ctx, GetTable(ctx, kOp, &table));
    const Tensor& min_freq_t = ctx->input(1);
    const Tensor& max_idle_t = ctx->input(2);
    OP_REQUIRES_OK(ctx, CheckScalar(kOp, "min_frequency", min_freq_t));
    OP_REQUIRES_OK(ctx, CheckScalar(kOp, "max_idle_steps", max_idle_t));
    const TableConfig& c = table->config();
    OP_REQUIRES(ctx, c.track_usage,
                errors::FailedPrecondition(
                    kOp, ": the table was created without track_usage, so it has no "
                    "per-row frequency or last step to evict by"));
    const int64_t min_freq = min_freq_t.scalar<int64_t>()();
    const int64_t max_idle = max_idle_t.scalar<int64_t>()();
    const int64_t now = table->step();
    const int S = table->num_shards();
    std::vector<int64_t> removed(S, 0);
    std::vector<Status> status(S);
    auto keep = [&](const char* row) {
      const uint32_t* cnt = reinterpret_cast<const uint32_t*>(row + 8);
      const int64_t freq = cnt[c.frequency_counter()];
      const int64_t last = cnt[c.last_step_counter()];
      if (min_freq > 0 && freq < min_freq) return false;
      if (max_idle >= 0 && now - last > max_idle) return false;
      return true;
    };
    CpuParallelFor(ctx, S, 100000, [&](int64_t sb, int64_t se) {
      for (int64_t s = sb; s < se; ++s) {
        Shard& sh = table->shard(s);
        absl::MutexLock l(&sh.mu);
        uint64_t kept = 0;
        for (uint64_t r = 0; r < sh.arena.size(); ++r) kept += keep(sh.arena.Row(r));
        if (kept == sh.arena.size()) continue;
        // Allocate the new index before touching the rows: on failure the
        // shard is unchanged.
        sparse_table::ShardIndex index;
        if (!index.Reset(kept)) {
          status[s] = errors::ResourceExhausted(kOp, ": out of memory");
          continue;
        }
        removed[s] = static_cast<int64_t>(sh.arena.Compact(keep));
        index.InsertAll(sh.arena);
        sh.index.Swap(index);
      }
    });
    for (const Status& s : status) OP_REQUIRES_OK(ctx, s);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    int64_t total = 0;
    for (int64_t r : removed) total += r;
    out->scalar<int64_t>()() = total;
  }
};

// ---------------------------------------------------------------------------
// SparseTableUniqueGrads: one sequential pass with a flat open-addressing
// map key -> distinct id, then the sums in batch order.
class SparseTableUniqueGradsOp : public OpKernel {
 public:
  explicit SparseTableUniqueGradsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    constexpr char kOp[] = "SparseTableUniqueGrads";
    const Tensor& keys = ctx->input(0);
    const Tensor& grads = ctx->input(1);
    OP_REQUIRES(ctx, grads.dims() == keys.dims() + 1,
                errors::InvalidArgument(kOp, ": grads must have rank keys.rank + 1 = ",
                                        keys.dims() + 1, ", got shape ",
                                        grads.shape().DebugString()));
    const int64_t dim = grads.dim_size(grads.dims() - 1);
    TensorShape expected = keys.shape();
    OP_REQUIRES_OK(ctx, expected.AddDimWithStatus(dim));
    OP_REQUIRES(ctx, grads.shape() == expected,
                errors::InvalidArgument(kOp, ": grads shape ", grads.shape().DebugString(),
                                        " does not match keys shape ",
                                        keys.shape().DebugString(), " + [dim=", dim, "]"));
    const int64_t n = keys.NumElements();
    const int64_t* k = keys.flat<int64_t>().data();
    const float* g = grads.flat<float>().data();

    // ids[i] = distinct id of keys[i]. Map slots hold id + 1 (0 = empty).
    int64_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    Tensor ids_t, slot_key_t, slot_id_t;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({n}), &ids_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({cap}), &slot_key_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_INT64, TensorShape({cap}), &slot_id_t));
    int64_t* ids = ids_t.flat<int64_t>().data();
    int64_t* slot_key = slot_key_t.flat<int64_t>().data();
    int64_t* slot_id = slot_id_t.flat<int64_t>().data();
    std::memset(slot_id, 0, cap * sizeof(int64_t));
    const uint64_t mask = static_cast<uint64_t>(cap) - 1;
    int64_t u = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint64_t s = KeyHash(k[i]) & mask;
      while (slot_id[s] != 0 && slot_key[s] != k[i]) s = (s + 1) & mask;
      if (slot_id[s] == 0) {
        slot_key[s] = k[i];
        slot_id[s] = ++u;
      }
      ids[i] = slot_id[s] - 1;
    }
    Tensor *unique_keys, *sums;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({u}), &unique_keys));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({u, dim}), &sums));
    int64_t* uk = unique_keys->flat<int64_t>().data();
    float* sm = sums->flat<float>().data();
    std::vector<bool> seen(u, false);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[i];
      float* dst = sm + id * dim;
      const float* src = g + i * dim;
      if (!seen[id]) {
        seen[id] = true;
        uk[id] = k[i];
        std::memcpy(dst, src, dim * sizeof(float));
      } else {
        for (int64_t j = 0; j < dim; ++j) dst[j] += src[j];
      }
    }
  }
};

// ---------------------------------------------------------------------------
// SparseTableRowSplits: one pass checks the row indices, one writes the
// splits.
class SparseTableRowSplitsOp : public OpKernel {
 public:
  explicit SparseTableRowSplitsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    constexpr char kOp[] = "SparseTableRowSplits";
    const Tensor& indices = ctx->input(0);
    const Tensor& dense_shape = ctx->input(1);
    OP_REQUIRES(ctx, dense_shape.dims() == 1 && dense_shape.NumElements() >= 1,
                errors::InvalidArgument(kOp, ": dense_shape must have rank 1 and at least "
                                        "one element, got shape ",
                                        dense_shape.shape().DebugString()));
    const int64_t rank = dense_shape.NumElements();
    OP_REQUIRES(ctx, indices.dims() == 2 && indices.dim_size(1) == rank,
                errors::InvalidArgument(kOp, ": indices must have shape [n, ", rank,
                                        "] (one column per axis of dense_shape), got ",
                                        indices.shape().DebugString()));
    const int64_t rows = dense_shape.flat<int64_t>()(0);
    OP_REQUIRES(ctx, rows >= 0 && rows < std::numeric_limits<int64_t>::max(),
                errors::InvalidArgument(kOp, ": dense_shape[0] must be >= 0, got ", rows));
    const int64_t n = indices.dim_size(0);
    const int64_t* idx = indices.flat<int64_t>().data();
    auto row = [&](int64_t i) { return idx[i * rank]; };
    for (int64_t i = 0; i < n; ++i) {
      OP_REQUIRES(ctx, row(i) >= 0 && row(i) < rows,
                  errors::InvalidArgument(kOp, ": indices[", i, ", 0] = ", row(i),
                                          " is not in [0, dense_shape[0] = ", rows, ")"));
      OP_REQUIRES(ctx, i == 0 || row(i) >= row(i - 1),
                  errors::InvalidArgument(
                      kOp, ": indices must be in row-major order (tf.sparse.reorder), got "
                      "row ", row(i - 1), " then ", row(i), " at ", i));
    }
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({rows + 1}), &out));
    int64_t* splits = out->flat<int64_t>().data();
    // splits[r] = the entries in rows below r: row r starts at the first
    // entry whose row is >= r.
    splits[0] = 0;
    int64_t r = 1;
    for (int64_t i = 0; i < n; ++i) {
      while (r <= row(i)) splits[r++] = i;
    }
    while (r <= rows) splits[r++] = n;
  }
};

#define REGISTER_CPU(name, ...) \
  REGISTER_KERNEL_BUILDER(Name(name).Device(tensorflow::DEVICE_CPU), __VA_ARGS__)

REGISTER_CPU("SparseTableHandle", SparseTableHandleOp);
REGISTER_CPU("SparseTablePull", SparseTablePullOp<CPUDevice>);
REGISTER_CPU("SparseTablePullRagged", SparseTablePullRaggedOp<CPUDevice>);
REGISTER_CPU("SparseTablePush", SparseTablePushOp<CPUDevice>);
REGISTER_CPU("SparseTablePushRagged", SparseTablePushRaggedOp<CPUDevice>);
REGISTER_CPU("SparseTableSize", SparseTableSizeOp);
REGISTER_CPU("SparseTableExport", SparseTableExportOp);
REGISTER_CPU("SparseTableImport", SparseTableImportOp);
REGISTER_CPU("SparseTableExportAdmission", SparseTableExportAdmissionOp);
REGISTER_CPU("SparseTableImportAdmission", SparseTableImportAdmissionOp);
REGISTER_CPU("SparseTableInitFromDense", SparseTableInitFromDenseOp);
REGISTER_CPU("SparseTableEvict", SparseTableEvictOp);
REGISTER_CPU("SparseTableUniqueGrads", SparseTableUniqueGradsOp);
REGISTER_CPU("SparseTableRowSplits", SparseTableRowSplitsOp);

#undef REGISTER_CPU

}  // namespace hpc_ops
