// Op registrations for the sparse_table family: an embedding table keyed by
// arbitrary int64 ids that grows as new ids arrive, with its optimizer on the
// table side. Kernels: ../kernels/sparse_table_op.cc (OpKernels) and
// ../kernels/sparse_table_op_cpu.cc (the table and the pull/push algorithms).
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

namespace {

// Replaces a failed shape check's generic message with one that names the
// op, the input and what was expected (the kernels say the same at run time).
absl::Status Explain(const absl::Status& s, const char* op,
                     const std::string& what) {
  if (s.ok()) return s;
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": ", what, " (", s.message(), ")"));
}

// `name` (input i) must have rank `rank`.
absl::Status CheckRank(InferenceContext* c, const char* op, int i,
                       const char* name, int rank, ShapeHandle* out) {
  return Explain(c->WithRank(c->input(i), rank, out), op,
                 absl::StrCat(name, " must have rank ", rank, ", got shape ",
                              c->DebugString(c->input(i))));
}

// Every sparse_table op takes the table handle as a scalar input 0.
absl::Status ValidateTableHandle(InferenceContext* c, const char* op) {
  ShapeHandle unused;
  return Explain(c->WithRank(c->input(0), 0, &unused), op,
                 absl::StrCat("table_handle must be a scalar resource, got "
                              "shape ",
                              c->DebugString(c->input(0))));
}

// The ragged ops' keys (input 1) and row splits (input 2) must have rank
// 1; *rows is the number of ragged rows, one less than the splits.
absl::Status RaggedRows(InferenceContext* c, const char* op, DimensionHandle* rows) {
  ShapeHandle keys, splits;
  TF_RETURN_IF_ERROR(CheckRank(c, op, 1, "keys", 1, &keys));
  TF_RETURN_IF_ERROR(CheckRank(c, op, 2, "row_splits", 1, &splits));
  return c->Subtract(c->Dim(splits, 0), 1, rows);
}

// grads (input `grads_index`) must be keys.shape + [dim]; with
// `shared_grads` (a row shared by the keys of keys[..., :]) keys.shape[:-1]
// + [dim].
absl::Status MergeGrads(InferenceContext* c, const char* op, int keys_index,
                        int grads_index, ShapeHandle* grads,
                        bool shared_grads = false) {
  ShapeHandle keys = c->input(keys_index);
  if (shared_grads) {
    TF_RETURN_IF_ERROR(Explain(c->WithRankAtLeast(keys, 1, &keys), op,
                               "keys must have rank >= 1 with shared_grads"));
    TF_RETURN_IF_ERROR(c->Subshape(keys, 0, -1, &keys));
  }
  ShapeHandle expected;
  TF_RETURN_IF_ERROR(c->Concatenate(
      keys, c->Vector(InferenceContext::kUnknownDim), &expected));
  return Explain(
      c->Merge(c->input(grads_index), expected, grads), op,
      absl::StrCat("grads shape ", c->DebugString(c->input(grads_index)),
                   " does not match keys shape ",
                   c->DebugString(c->input(keys_index)),
                   shared_grads ? " without its last axis + [dim] (shared_grads)"
                                : " + [dim]"));
}

}  // namespace

REGISTER_OP("SparseTableHandle")
    .Output("table_handle: resource")
    .Attr("dim: int >= 1")
    .Attr("initializer: {'zeros', 'uniform', 'truncated_normal'} = 'uniform'")
    .Attr("init_scale: float = 0.05")
    .Attr("seed: int = 0")
    .Attr("optimizer: {'sgd', 'adagrad', 'adam', 'ftrl'} = 'adagrad'")
    .Attr("initial_accumulator_value: float = 0.1")
    .Attr("epsilon: float = 1e-7")
    .Attr("beta1: float = 0.9")
    .Attr("beta2: float = 0.999")
    .Attr("learning_rate_power: float = -0.5")
    .Attr("l1: float = 0.0")
    .Attr("l2: float = 0.0")
    .Attr("num_shards: int = 64")
    .Attr("admission_min_count: int = 0")
    .Attr("track_usage: bool = false")
    .Attr("container: string = ''")
    .Attr("shared_name: string = ''")
    .SetIsStateful()
    .SetShapeFn(shape_inference::ScalarShape)
    .Doc(R"doc(
Creates a sparse embedding table, or returns the existing one with this
container/shared_name (its configuration must then be the same).

An empty shared_name makes a table private to this kernel (deleted with it).
Rows are float32 vectors of `dim` elements keyed by int64 ids.

dim: Row width, in [1, 65536].
initializer: Initial row values, a pure function of (seed, key): 'zeros',
  'uniform' in [-init_scale, init_scale), or 'truncated_normal' with stddev
  init_scale truncated at two standard deviations.
init_scale: Scale of the initializer (>= 0).
seed: Seed of the initializer.
optimizer: The table-side optimizer applied by SparseTablePush:
  'sgd': w -= lr * g.
  'adagrad': acc += g^2; w -= lr * g / (sqrt(acc) + epsilon).
  'adam': per-row step t; m, v as in TF's ApplyAdam with
    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t).
  'ftrl': TF's ApplyFtrl (FTRL-proximal with l1, l2, learning_rate_power).
initial_accumulator_value: Initial accumulator of adagrad and ftrl (>= 0).
epsilon: adagrad (>= 0) and adam (> 0) epsilon.
beta1: adam, in [0, 1).
beta2: adam, in [0, 1).
learning_rate_power: ftrl, <= 0.
l1: ftrl L1 regularization strength, >= 0.
l2: ftrl L2 regularization strength, >= 0.
num_shards: Number of independently locked shards, a power of two in
  [1, 4096].
admission_min_count: If > 1, a key gets a trainable row only after it has
  been pulled (with insert_missing) this many times; until then it reads its
  initial value and its gradients are dropped.
track_usage: Keep per-row push frequency and last push step (needed by
  SparseTableEvict).
table_handle: The table.
)doc");

REGISTER_OP("SparseTablePull")
    .Input("table_handle: resource")
    .Input("keys: int64")
    .Output("values: float")
    .Attr("dim: int >= 1")
    .Attr("insert_missing: bool = true")
    .Attr("combiner: {'none', 'sum', 'mean'} = 'none'")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTablePull";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      int64_t dim;
      TF_RETURN_IF_ERROR(c->GetAttr("dim", &dim));
      std::string combiner;
      TF_RETURN_IF_ERROR(c->GetAttr("combiner", &combiner));
      ShapeHandle rows = c->input(1);
      if (combiner != "none") {
        TF_RETURN_IF_ERROR(Explain(
            c->WithRankAtLeast(rows, 1, &rows), kOp,
            absl::StrCat("combiner '", combiner, "' needs keys of rank >= 1 "
                         "(their last axis is combined), got a scalar")));
        TF_RETURN_IF_ERROR(c->Subshape(rows, 0, -1, &rows));
      }
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->Concatenate(rows, c->Vector(dim), &out));
      c->set_output(0, out);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Reads the rows of `keys` (any shape) from the table.

Keys without a row get one, set to their initial value, when insert_missing
is true (subject to the table's admission rule); with insert_missing false
(serving) the table is never changed and such keys read their initial value.

dim: Must equal the table's dim (gives the output its static shape).
combiner: 'none': a row per key. 'sum' / 'mean': the rows of each
  keys[i..., :] (keys of rank >= 1) added in order into one row, divided by
  their number for 'mean' (an empty last axis gives rows of zeros), as
  reduce_sum / reduce_mean of the rows over that axis give, without a row
  per key in memory.
values: keys.shape + [dim]; with a combiner keys.shape[:-1] + [dim].
)doc");

REGISTER_OP("SparseTablePullRagged")
    .Input("table_handle: resource")
    .Input("keys: int64")
    .Input("row_splits: Tsplits")
    .Output("values: float")
    .Attr("dim: int >= 1")
    .Attr("insert_missing: bool = true")
    .Attr("combiner: {'sum', 'mean'} = 'sum'")
    .Attr("Tsplits: {int32, int64} = DT_INT64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTablePullRagged";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      DimensionHandle rows;
      TF_RETURN_IF_ERROR(RaggedRows(c, kOp, &rows));
      int64_t dim;
      TF_RETURN_IF_ERROR(c->GetAttr("dim", &dim));
      c->set_output(0, c->Matrix(rows, dim));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Reads the rows of ragged keys, each ragged row's rows added into one.

Output row r is the sum of the rows of keys[row_splits[r]:row_splits[r + 1]],
added in order (divided by their number for 'mean'; an empty row gives
zeros): tf.reduce_sum of the rows of a tf.RaggedTensor of keys over its
ragged axis, without a row per key in memory. Keys without a row are
handled as in SparseTablePull.

keys: The ragged keys' values.
row_splits: Their row splits: from 0 to the number of keys, never
  decreasing.
dim: Must equal the table's dim.
values: [row_splits.shape[0] - 1, dim].
)doc");

REGISTER_OP("SparseTablePush")
    .Input("table_handle: resource")
    .Input("keys: int64")
    .Input("grads: float")
    .Input("learning_rate: float")
    .Output("step: int64")
    .Attr("shared_grads: bool = false")
    .Attr("combiner: {'sum', 'mean'} = 'sum'")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTablePush";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      ShapeHandle unused;
      bool shared_grads = false;
      TF_RETURN_IF_ERROR(c->GetAttr("shared_grads", &shared_grads));
      std::string combiner;
      TF_RETURN_IF_ERROR(c->GetAttr("combiner", &combiner));
      if (combiner == "mean" && !shared_grads) {
        return absl::InvalidArgumentError(
            "SparseTablePush: combiner 'mean' needs shared_grads");
      }
      TF_RETURN_IF_ERROR(MergeGrads(c, kOp, 1, 2, &unused, shared_grads));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 3, "learning_rate", 0, &unused));
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Applies one step of the table's optimizer with the gradients of `keys`.

Gradients of equal keys are summed first (in batch order), then every
distinct key's row and slots are updated once. Keys without a row get one
first (unless admission has not let them in: their gradients are dropped).
Advances the table's step by one.

keys: Any shape (rank >= 1 with shared_grads).
grads: keys.shape + [dim]; with shared_grads keys.shape[:-1] + [dim].
learning_rate: A scalar (> 0 for ftrl).
step: The table's step after this push (1 for the first push).
shared_grads: Whether the keys of keys[..., j] share one gradient row: the
  key at [i..., j] takes grads[i..., :], as the ids of one example summed
  into one embedding do, with no copy of the row per key.
combiner: With shared_grads, 'mean' divides each gradient row by the number
  of keys sharing it (the gradient of SparseTablePull's 'mean'); 'sum' uses
  it as it is.
)doc");

REGISTER_OP("SparseTablePushRagged")
    .Input("table_handle: resource")
    .Input("keys: int64")
    .Input("row_splits: Tsplits")
    .Input("grads: float")
    .Input("learning_rate: float")
    .Output("step: int64")
    .Attr("combiner: {'sum', 'mean'} = 'sum'")
    .Attr("Tsplits: {int32, int64} = DT_INT64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTablePushRagged";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      DimensionHandle rows, merged;
      TF_RETURN_IF_ERROR(RaggedRows(c, kOp, &rows));
      ShapeHandle grads, unused;
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 3, "grads", 2, &grads));
      TF_RETURN_IF_ERROR(Explain(
          c->Merge(c->Dim(grads, 0), rows, &merged), kOp,
          absl::StrCat("grads shape ", c->DebugString(grads),
                       " does not match the rows of row_splits shape ",
                       c->DebugString(c->input(2)), " + [dim]")));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 4, "learning_rate", 0, &unused));
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
SparseTablePush for ragged keys, one gradient row per ragged row.

Key i takes grads[r, :], r its ragged row (row_splits[r] <= i <
row_splits[r + 1]): the gradient of SparseTablePullRagged's combined rows,
used for each of the row's keys without a copy per key. Otherwise as
SparseTablePush.

keys: The ragged keys' values.
row_splits: Their row splits: from 0 to the number of keys, never
  decreasing.
grads: [row_splits.shape[0] - 1, dim].
learning_rate: A scalar (> 0 for ftrl).
step: The table's step after this push (1 for the first push).
combiner: 'mean' divides grads[r] by the size of row r (the gradient of
  SparseTablePullRagged's 'mean'); 'sum' uses it as it is.
)doc");

REGISTER_OP("SparseTableSize")
    .Input("table_handle: resource")
    .Output("size: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, "SparseTableSize"));
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
The number of rows in the table.
)doc");

REGISTER_OP("SparseTableExport")
    .Input("table_handle: resource")
    .Output("keys: int64")
    .Output("values: float")
    .Output("slots: float")
    .Output("counters: int64")
    .Output("step: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, "SparseTableExport"));
      DimensionHandle n = c->UnknownDim();
      DimensionHandle d = c->UnknownDim();
      c->set_output(0, c->Vector(n));
      c->set_output(1, c->Matrix(n, d));
      c->set_output(2, c->MakeShape({n, c->UnknownDim(), d}));
      c->set_output(3, c->Matrix(n, c->UnknownDim()));
      c->set_output(4, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
A consistent snapshot of the whole table (taken under every shard's lock).

keys: [n], the keys.
values: [n, dim], their rows.
slots: [n, num_slots, dim], their optimizer slots: none for sgd,
  [accumulator] for adagrad, [m, v] for adam, [accumulator, linear] for ftrl.
counters: [n, num_counters]: adam's per-row step, then (track_usage) the
  push frequency and last push step.
step: The table's step (number of pushes).
)doc");

REGISTER_OP("SparseTableImport")
    .Input("table_handle: resource")
    .Input("keys: int64")
    .Input("values: float")
    .Input("slots: float")
    .Input("counters: int64")
    .Input("step: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTableImport";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      ShapeHandle keys, values, slots, counters, unused;
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 1, "keys", 1, &keys));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 2, "values", 2, &values));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 3, "slots", 3, &slots));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 4, "counters", 2, &counters));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 5, "step", 0, &unused));
      DimensionHandle n = c->Dim(keys, 0);
      const char* kRows[] = {"values", "slots", "counters"};
      const ShapeHandle rows[] = {values, slots, counters};
      for (int i = 0; i < 3; ++i) {
        TF_RETURN_IF_ERROR(Explain(
            c->Merge(n, c->Dim(rows[i], 0), &n), kOp,
            absl::StrCat(kRows[i], " shape ", c->DebugString(rows[i]),
                         " must have one row per key (keys shape ",
                         c->DebugString(keys), ")")));
      }
      DimensionHandle d = c->Dim(values, 1);
      TF_RETURN_IF_ERROR(Explain(
          c->Merge(d, c->Dim(slots, 2), &d), kOp,
          absl::StrCat("slots shape ", c->DebugString(slots),
                       " must end in values' dim (values shape ",
                       c->DebugString(values), ")")));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Replaces the table's contents with the output of SparseTableExport.

All-or-nothing: everything is validated and the new contents built before
the table is swapped under every shard's lock. Admission counts are cleared.

keys: [n], distinct keys.
values: [n, dim] with the table's dim.
slots: [n, num_slots, dim] for the table's optimizer.
counters: [n, num_counters], each in [0, 2^32 - 1].
step: The table's new step, >= 0.
)doc");

REGISTER_OP("SparseTableExportAdmission")
    .Input("table_handle: resource")
    .Output("keys: int64")
    .Output("counts: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, "SparseTableExportAdmission"));
      DimensionHandle n = c->UnknownDim();
      c->set_output(0, c->Vector(n));
      c->set_output(1, c->Vector(n));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The admission counts: the keys that were pulled (inserting) but have no row
yet, and how often each was seen. Empty for a table without admission.
Taken under every shard's lock, so the counts are from one moment.

keys: [n], distinct keys without a row.
counts: [n], their counts, each in [1, 2^32 - 1].
)doc");

REGISTER_OP("SparseTableImportAdmission")
    .Input("table_handle: resource")
    .Input("keys: int64")
    .Input("counts: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTableImportAdmission";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      ShapeHandle keys, counts;
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 1, "keys", 1, &keys));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 2, "counts", 1, &counts));
      DimensionHandle n;
      return Explain(c->Merge(c->Dim(keys, 0), c->Dim(counts, 0), &n), kOp,
                     absl::StrCat("counts shape ", c->DebugString(counts),
                                  " must have one count per key (keys shape ",
                                  c->DebugString(keys), ")"));
    })
    .Doc(R"doc(
Replaces the admission counts with the output of SparseTableExportAdmission.

All-or-nothing: the input is validated before the table is touched. Keys
that have a row by now are skipped; a table without admission ignores the
counts. Run it after SparseTableImport, which clears the counts.

keys: [n], distinct keys.
counts: [n], each in [1, 2^32 - 1].
)doc");

REGISTER_OP("SparseTableInitFromDense")
    .Input("table_handle: resource")
    .Input("values: float")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTableInitFromDense";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      ShapeHandle unused;
      return CheckRank(c, kOp, 1, "values", 2, &unused);
    })
    .Doc(R"doc(
Initialises a table from a dense embedding matrix, once.

The first run on a table gives key i the row values[i] (i in [0, n)) with
fresh optimizer slots; keys that already have a row keep it. Every later run
on the same table returns at once without reading `values`, so a serving
graph may run it before each pull: hpc_ops.rewrite's `embedding` rule turns
a gather from an embedding variable into this op followed by SparseTablePull.
Concurrent first runs initialise the table exactly once.

values: [n, dim] with the table's dim.
)doc");

REGISTER_OP("SparseTableEvict")
    .Input("table_handle: resource")
    .Input("min_frequency: int64")
    .Input("max_idle_steps: int64")
    .Output("num_evicted: int64")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTableEvict";
      TF_RETURN_IF_ERROR(ValidateTableHandle(c, kOp));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 1, "min_frequency", 0, &unused));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 2, "max_idle_steps", 0, &unused));
      c->set_output(0, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Removes rows pushed fewer than min_frequency times in total (if
min_frequency > 0) or not pushed during the last max_idle_steps steps (if
max_idle_steps >= 0). Needs a table created with track_usage.

num_evicted: The number of rows removed.
)doc");

REGISTER_OP("SparseTableUniqueGrads")
    .Input("keys: int64")
    .Input("grads: float")
    .Output("unique_keys: int64")
    .Output("summed_grads: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle grads;
      TF_RETURN_IF_ERROR(MergeGrads(c, "SparseTableUniqueGrads", 0, 1, &grads));
      DimensionHandle u = c->UnknownDim();
      c->set_output(0, c->Vector(u));
      c->set_output(1, c->Matrix(u, c->Dim(grads, -1)));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The distinct keys of a batch and the sums of their gradients: what a push
applies, before it is applied (e.g. to exchange pushes between workers).

keys: Any shape.
grads: keys.shape + [dim].
unique_keys: [u], in order of first occurrence.
summed_grads: [u, dim]; each the sum, in batch order, of the grads of one key.
)doc");

REGISTER_OP("SparseTableRowSplits")
    .Input("indices: int64")
    .Input("dense_shape: int64")
    .Output("row_splits: int64")
    .SetShapeFn([](InferenceContext* c) {
      constexpr char kOp[] = "SparseTableRowSplits";
      ShapeHandle indices, dense_shape;
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 0, "indices", 2, &indices));
      TF_RETURN_IF_ERROR(CheckRank(c, kOp, 1, "dense_shape", 1, &dense_shape));
      DimensionHandle rank;
      TF_RETURN_IF_ERROR(Explain(
          c->Merge(c->Dim(indices, 1), c->Dim(dense_shape, 0), &rank), kOp,
          absl::StrCat("indices shape ", c->DebugString(indices),
                       " does not match dense_shape shape ",
                       c->DebugString(dense_shape), " (one column per axis)")));
      c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
      return absl::OkStatus();
    })
    .Doc(R"doc(
The row splits of a SparseTensor: the rows of its first axis, ragged.

row_splits[r] is the number of entries in rows below r, so the values of
row r are values[row_splits[r]:row_splits[r + 1]], in their order, as
SparseTablePullRagged and SparseTablePushRagged take keys. The indices must
be in row-major order (tf.sparse.reorder gives it); unlike
tf.RaggedTensor.from_sparse, the other columns may have gaps.

indices: [n, rank], rank >= 1; indices[:, 0] nondecreasing, each in
  [0, dense_shape[0]).
dense_shape: [rank].
row_splits: [dense_shape[0] + 1], from 0 to n.
)doc");

}  // namespace tensorflow
