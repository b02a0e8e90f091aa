// Op registrations for the rms_norm family. Kernels: ../kernels/rms_norm_op.cc
#include <cmath>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/types.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

// The statistics type U must be float for 16/32-bit T and double for double.
absl::Status CheckStatisticsType(InferenceContext* c, const char* op) {
  DataType t, u;
  TF_RETURN_IF_ERROR(c->GetAttr("T", &t));
  TF_RETURN_IF_ERROR(c->GetAttr("U", &u));
  const DataType want = t == DT_DOUBLE ? DT_DOUBLE : DT_FLOAT;
  if (u != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": U (the inv_rms type) must be ", DataTypeString(want),
        " for T=", DataTypeString(t), ", got ", DataTypeString(u)));
  }
  return absl::OkStatus();
}

// Replaces a failed shape check's generic message with one that names the op
// and the input, like the kernels' messages.
absl::Status Explain(const absl::Status& s, const char* op,
                     const std::string& what) {
  if (s.ok()) return s;
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": ", what, " (", s.message(), ")"));
}

// x: rank >= 1 with last dimension H; gamma: [H]. Sets *x_out to x with its
// last dimension merged with gamma's, and *h to that dimension.
absl::Status MergeXAndGamma(InferenceContext* c, const char* op, int x_index,
                            int gamma_index, ShapeHandle* x_out,
                            DimensionHandle* h) {
  ShapeHandle x, gamma;
  const ShapeHandle x_in = c->input(x_index);
  const ShapeHandle gamma_in = c->input(gamma_index);
  TF_RETURN_IF_ERROR(Explain(
      c->WithRankAtLeast(x_in, 1, &x), op,
      absl::StrCat("x must have rank >= 1, got shape ", c->DebugString(x_in))));
  const std::string gamma_mismatch =
      absl::StrCat("gamma shape ", c->DebugString(gamma_in),
                   " does not match [H], the last dimension of x shape ",
                   c->DebugString(x_in));
  TF_RETURN_IF_ERROR(
      Explain(c->WithRank(gamma_in, 1, &gamma), op, gamma_mismatch));
  if (c->RankKnown(x)) {
    TF_RETURN_IF_ERROR(Explain(c->Merge(c->Dim(x, -1), c->Dim(gamma, 0), h), op,
                               gamma_mismatch));
    TF_RETURN_IF_ERROR(c->ReplaceDim(x, -1, *h, &x));
  } else {
    *h = c->Dim(gamma, 0);
  }
  if (c->ValueKnown(*h) && c->Value(*h) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        op,
        ": the last dimension of x must not be empty (the mean square of "
        "an empty row is undefined), got x shape ",
        c->DebugString(x_in)));
  }
  *x_out = x;
  return absl::OkStatus();
}

absl::Status RmsNormShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatisticsType(c, "RmsNorm"));
  float epsilon;
  TF_RETURN_IF_ERROR(c->GetAttr("epsilon", &epsilon));
  if (!(epsilon > 0.0f) || !std::isfinite(epsilon)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "RmsNorm: epsilon must be a finite number > 0, got ", epsilon));
  }
  ShapeHandle x, rows;
  DimensionHandle h;
  TF_RETURN_IF_ERROR(MergeXAndGamma(c, "RmsNorm", 0, 1, &x, &h));
  c->set_output(0, x);
  if (c->RankKnown(x)) {
    TF_RETURN_IF_ERROR(c->Subshape(x, 0, -1, &rows));
  } else {
    rows = c->UnknownShape();
  }
  c->set_output(1, rows);
  return absl::OkStatus();
}

absl::Status RmsNormGradShape(InferenceContext* c) {
  TF_RETURN_IF_ERROR(CheckStatisticsType(c, "RmsNormGrad"));
  ShapeHandle x, rows;
  DimensionHandle h;
  TF_RETURN_IF_ERROR(MergeXAndGamma(c, "RmsNormGrad", 1, 2, &x, &h));
  TF_RETURN_IF_ERROR(Explain(
      c->Merge(x, c->input(0), &x), "RmsNormGrad",
      absl::StrCat("dy shape ", c->DebugString(c->input(0)),
                   " does not match x shape ", c->DebugString(c->input(1)))));
  if (c->RankKnown(x)) {
    TF_RETURN_IF_ERROR(c->Subshape(x, 0, -1, &rows));
    TF_RETURN_IF_ERROR(Explain(
        c->Merge(rows, c->input(3), &rows), "RmsNormGrad",
        absl::StrCat("inv_rms shape ", c->DebugString(c->input(3)),
                     " does not match x.shape[:-1] = ", c->DebugString(rows))));
    // inv_rms may have taught us leading dimensions of x.
    TF_RETURN_IF_ERROR(c->Concatenate(rows, c->Vector(h), &x));
  }
  c->set_output(0, x);
  c->set_output(1, c->Vector(h));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("RmsNorm")
    .Input("x: T")
    .Input("gamma: T")
    .Output("y: T")
    .Output("inv_rms: U")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .Attr("epsilon: float = 1e-6")
    .SetShapeFn(RmsNormShape)
    .Doc(R"doc(
Root-mean-square normalisation over the last axis (RMSNorm).

For each row r of x (all dimensions but the last, of size H):
  inv_rms[r] = 1 / sqrt(mean(x[r, :]^2) + epsilon)
  y[r, j]    = x[r, j] * inv_rms[r] * gamma[j]
The statistics are computed in U (float32 for half, bfloat16 and float32;
float64 for float64), so 16-bit inputs do not lose range or precision.

x: A tensor of rank >= 1 whose last dimension H is not empty.
gamma: The per-feature scale, shape [H].
y: The normalised tensor, shaped like x.
inv_rms: 1 / rms of each row, shape x.shape[:-1]; kept for the gradient.
T: The element type of x, gamma and y.
U: The statistics type: float for half, bfloat16 and float; double for double.
epsilon: Added to the mean square before the square root; finite and > 0.
)doc");

REGISTER_OP("RmsNormGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: T")
    .Input("inv_rms: U")
    .Output("dx: T")
    .Output("dgamma: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("U: {float, double}")
    .SetShapeFn(RmsNormGradShape)
    .Doc(R"doc(
The gradient of RmsNorm's y with respect to x and gamma.

With S[r] = sum_j dy[r, j] * gamma[j] * x[r, j]:
  dx[r, j]  = inv_rms[r] * gamma[j] * dy[r, j]
              - x[r, j] * inv_rms[r]^3 * S[r] / H
  dgamma[j] = sum_r dy[r, j] * x[r, j] * inv_rms[r]
accumulated in U; dgamma is reduced in a fixed order, so results are
deterministic.

dy: The gradient with respect to y, shaped like x.
x: RmsNorm's input, rank >= 1 with a non-empty last dimension H.
gamma: RmsNorm's scale, shape [H].
inv_rms: RmsNorm's inv_rms output, shape x.shape[:-1].
dx: The gradient with respect to x, shaped like x.
dgamma: The gradient with respect to gamma, shape [H].
T: The element type of dy, x, gamma, dx and dgamma.
U: The statistics type: float for half, bfloat16 and float; double for double.
)doc");

}  // namespace tensorflow
