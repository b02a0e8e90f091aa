// See docs in ../ops/collective_ops.cc and collective_op_runtime.h.
//
// Protocol. Every process runs one background thread (the "engine"). Two
// private duplicates of MPI_COMM_WORLD carry the traffic:
//   control: a worker tells the coordinator (rank 0) which named requests it
//     has (kTagRequest, a list of TensorMeta); the coordinator, once a name
//     was reported by every rank, checks that the reports agree and sends
//     every worker the same ordered list of Responses (kTagResponse): execute
//     these keys (several small allreduces fused into one), or fail this key
//     with FailedPrecondition. kTagAbort carries a fatal error from any rank.
//   data: the execution of the Responses, strictly one at a time and in the
//     same order on every rank, with nonblocking point-to-point messages
//     (allreduce, allgather) or MPI_Ibcast (broadcast).
// Nothing waits on another process without a deadline: every MPI request is
// polled with MPI_Test*, and when a process does not answer within
// HPC_OPS_TIMEOUT_SECONDS the engine "breaks": every pending and later request
// fails with the same DeadlineExceeded error, and the other ranks are told.
//
// Allreduce algorithm: reduce-scatter then allgather, both direct (every rank
// exchanges one chunk with every other rank). Rank r reduces chunk r of the
// buffer, combining the ranks' chunks in rank order, so each element is
// combined in the same order whatever the fusion grouping: results are
// bit-identical on every rank and from run to run. The reduce-scatter is
// pipelined in segments so that the receive buffer stays small and in cache.
#include "kernels/collective_op_runtime.h"

#include <sched.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/collective_op.h"
#include "kernels/common/huge_pages.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"

#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

namespace hpc_ops {
namespace collective {

using CPUDevice = Eigen::ThreadPoolDevice;
using Clock = std::chrono::steady_clock;
using tensorflow::DataType;
using tensorflow::Tensor;
using tensorflow::TensorShape;

const char* OpTypeName(OpType op) {
  switch (op) {
    case OpType::kAllreduce:
      return "HpcAllreduce";
    case OpType::kBroadcast:
      return "HpcBroadcast";
    case OpType::kAllgather:
      return "HpcAllgather";
  }
  return "HpcUnknownCollective";
}

const char* ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kAverage:
      return "average";
    case ReduceOp::kMin:
      return "min";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kProduct:
      return "product";
  }
  return "unknown";
}

namespace {

// ---------------------------------------------------------------------------
// Constants and configuration.

constexpr int kTagRequest = 1;
constexpr int kTagResponse = 2;
constexpr int kTagAbort = 3;
constexpr int kTagReduceScatter = 11;
constexpr int kTagAllgatherPhase = 12;
constexpr int kTagGather = 13;

// MPI counts are ints: larger buffers travel as several messages.
constexpr int64_t kMaxMessageBytes = int64_t{1} << 30;
// Reduce-scatter pipeline: segment size range and segments in flight per
// peer.
constexpr int64_t kSegmentBytes = int64_t{1} << 20;
constexpr int64_t kMinSegmentBytes = int64_t{512} << 10;
constexpr int kSegmentsInFlight = 4;
static_assert(kSegmentBytes <= kMaxMessageBytes, "a segment is one message");
// Polling: spin (yielding the CPU) this long after the last progress, then
// sleep between polls; an idle engine wakes this often to look for aborts.
constexpr auto kSpinWindow = std::chrono::microseconds(300);
constexpr auto kIdleSpinWindow = std::chrono::microseconds(100);
constexpr auto kWaitingPoll = std::chrono::microseconds(50);
constexpr auto kIdlePoll = std::chrono::milliseconds(50);
constexpr auto kDeadlineCheckInterval = std::chrono::milliseconds(10);
// Workers give the coordinator this long beyond the timeout to report a
// missing rank itself before they blame the coordinator.
constexpr double kWorkerGraceSeconds = 1.0;

struct Config {
  double timeout_seconds = 30.0;
  int64_t fusion_threshold = int64_t{4} << 20;
  double cycle_time_ms = 1.0;
  int use_mpi = -1;  // -1: auto, 0: never, 1: always
};

absl::Status ParseDouble(const char* name, double min_value, double* out) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return absl::OkStatus();
  char* end = nullptr;
  double d = std::strtod(v, &end);
  if (end == v || *end != '\0' || !(d >= min_value) ||
      d > 1e9) {  // also rejects NaN
    return absl::InvalidArgumentError(absl::StrCat(
        "hpc_ops: ", name, "='", v, "' is not a number >= ", min_value));
  }
  *out = d;
  return absl::OkStatus();
}

absl::Status ReadConfig(Config* c) {
  TF_RETURN_IF_ERROR(
      ParseDouble("HPC_OPS_TIMEOUT_SECONDS", 0.001, &c->timeout_seconds));
  double threshold = static_cast<double>(c->fusion_threshold);
  TF_RETURN_IF_ERROR(ParseDouble("HPC_OPS_FUSION_THRESHOLD", 0, &threshold));
  c->fusion_threshold = static_cast<int64_t>(threshold);
  TF_RETURN_IF_ERROR(
      ParseDouble("HPC_OPS_CYCLE_TIME_MS", 0, &c->cycle_time_ms));
  const char* mpi = std::getenv("HPC_OPS_MPI");
  if (mpi != nullptr && *mpi != '\0') {
    if (std::strcmp(mpi, "0") == 0) {
      c->use_mpi = 0;
    } else if (std::strcmp(mpi, "1") == 0) {
      c->use_mpi = 1;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("hpc_ops: HPC_OPS_MPI='", mpi, "' must be 0 or 1"));
    }
  }
  return absl::OkStatus();
}

// True when an MPI launcher started this process.
bool LaunchedByMpi() {
  for (const char* var :
       {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE",
        "MPI_LOCALNRANKS", "HYDI_CONTROL_FD", "SLURM_STEP_ID"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

std::string MpiErrorString(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) {
    return absl::StrCat("MPI error ", code);
  }
  return std::string(buf, len);
}

absl::Status MpiCheck(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("hpc_ops: ", call, " failed: ", MpiErrorString(rc)));
}

double Seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

std::string ShapeString(const std::vector<int64_t>& dims) {
  return absl::StrCat("[", absl::StrJoin(dims, ","), "]");
}

std::string RanksString(const std::vector<int>& ranks) {
  return absl::StrJoin(ranks, ", ");
}

// "'name'" or "'name' (call 3 with this name)" from a key "name#3".
std::string DisplayKey(const std::string& key) {
  size_t hash = key.rfind('#');
  if (hash == std::string::npos) return absl::StrCat("'", key, "'");
  std::string name = key.substr(0, hash);
  std::string occurrence = key.substr(hash + 1);
  if (occurrence == "0") return absl::StrCat("'", name, "'");
  return absl::StrCat("'", name, "' (call ", occurrence, " with this name)");
}

// The type an allreduce is computed in: 16-bit floats are reduced in float32.
DataType ReductionType(DataType dt) {
  return (dt == tensorflow::DT_HALF || dt == tensorflow::DT_BFLOAT16)
             ? tensorflow::DT_FLOAT
             : dt;
}

bool SupportedType(DataType dt) {
  switch (dt) {
    case tensorflow::DT_INT32:
    case tensorflow::DT_INT64:
    case tensorflow::DT_HALF:
    case tensorflow::DT_BFLOAT16:
    case tensorflow::DT_FLOAT:
    case tensorflow::DT_DOUBLE:
      return true;
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------
// Wire format: little helpers over a byte string. Every process runs the same
// binary, so native byte order and widths are fine.

class Writer {
 public:
  void U8(uint8_t v) { buf_.push_back(static_cast<char>(v)); }
  void I32(int32_t v) { Raw(&v, sizeof(v)); }
  void I64(int64_t v) { Raw(&v, sizeof(v)); }
  void Str(const std::string& s) {
    I64(static_cast<int64_t>(s.size()));
    buf_.append(s);
  }
  void I64s(const std::vector<int64_t>& v) {
    I64(static_cast<int64_t>(v.size()));
    for (int64_t x : v) I64(x);
  }
  std::string& buf() { return buf_; }

 private:
  void Raw(const void* p, size_t n) {
    buf_.append(static_cast<const char*>(p), n);
  }
  std::string buf_;
};

class Reader {
 public:
  explicit Reader(const std::string& s) : p_(s.data()), end_(p_ + s.size()) {}
  bool ok() const { return ok_; }
  bool done() const { return p_ == end_; }
  uint8_t U8() {
    uint8_t v = 0;
    Raw(&v, 1);
    return v;
  }
  int32_t I32() {
    int32_t v = 0;
    Raw(&v, sizeof(v));
    return v;
  }
  int64_t I64() {
    int64_t v = 0;
    Raw(&v, sizeof(v));
    return v;
  }
  std::string Str() {
    int64_t n = I64();
    if (!ok_ || n < 0 || n > end_ - p_) {
      ok_ = false;
      return "";
    }
    std::string s(p_, n);
    p_ += n;
    return s;
  }
  std::vector<int64_t> I64s() {
    int64_t n = I64();
    std::vector<int64_t> v;
    if (!ok_ || n < 0 || n > (end_ - p_) / 8) {
      ok_ = false;
      return v;
    }
    v.reserve(n);
    for (int64_t i = 0; i < n; ++i) v.push_back(I64());
    return v;
  }

 private:
  void Raw(void* out, size_t n) {
    if (!ok_ || static_cast<size_t>(end_ - p_) < n) {
      ok_ = false;
      return;
    }
    std::memcpy(out, p_, n);
    p_ += n;
  }
  const char* p_;
  const char* end_;
  bool ok_ = true;
};

// What one rank reports about one request.
struct TensorMeta {
  std::string key;
  OpType op = OpType::kAllreduce;
  DataType dtype = tensorflow::DT_INVALID;
  ReduceOp reduce_op = ReduceOp::kSum;
  int32_t root_rank = 0;
  std::vector<int64_t> shape;
};

void WriteMeta(const TensorMeta& m, Writer* w) {
  w->Str(m.key);
  w->U8(static_cast<uint8_t>(m.op));
  w->I32(static_cast<int32_t>(m.dtype));
  w->U8(static_cast<uint8_t>(m.reduce_op));
  w->I32(m.root_rank);
  w->I64s(m.shape);
}

bool ReadMeta(Reader* r, TensorMeta* m) {
  m->key = r->Str();
  uint8_t op = r->U8();
  int32_t dtype = r->I32();
  uint8_t reduce_op = r->U8();
  m->root_rank = r->I32();
  m->shape = r->I64s();
  if (!r->ok() || op > 2 || reduce_op > 4) return false;
  m->op = static_cast<OpType>(op);
  m->dtype = static_cast<DataType>(dtype);
  m->reduce_op = static_cast<ReduceOp>(reduce_op);
  return SupportedType(m->dtype);
}

// What the coordinator decides, identical on every rank.
struct Response {
  enum Kind : uint8_t { kExecute = 0, kError = 1 };
  Kind kind = kExecute;
  OpType op = OpType::kAllreduce;
  // Allreduce: the reduction type (several input types may share it).
  DataType dtype = tensorflow::DT_INVALID;
  ReduceOp reduce_op = ReduceOp::kSum;
  int32_t root_rank = 0;
  std::vector<std::string> keys;    // fused allreduces: in packing order
  std::vector<int64_t> first_dims;  // allgather: per rank
  std::string error;                // kError: the message for every rank
};

void WriteResponse(const Response& r, Writer* w) {
  w->U8(r.kind);
  w->U8(static_cast<uint8_t>(r.op));
  w->I32(static_cast<int32_t>(r.dtype));
  w->U8(static_cast<uint8_t>(r.reduce_op));
  w->I32(r.root_rank);
  w->I64(static_cast<int64_t>(r.keys.size()));
  for (const auto& k : r.keys) w->Str(k);
  w->I64s(r.first_dims);
  w->Str(r.error);
}

bool ReadResponse(Reader* rd, Response* r) {
  uint8_t kind = rd->U8();
  uint8_t op = rd->U8();
  int32_t dtype = rd->I32();
  uint8_t reduce_op = rd->U8();
  r->root_rank = rd->I32();
  int64_t n = rd->I64();
  if (!rd->ok() || kind > 1 || op > 2 || reduce_op > 4 || n < 0) return false;
  r->kind = static_cast<Response::Kind>(kind);
  r->op = static_cast<OpType>(op);
  r->dtype = static_cast<DataType>(dtype);
  r->reduce_op = static_cast<ReduceOp>(reduce_op);
  r->keys.clear();
  for (int64_t i = 0; i < n && rd->ok(); ++i) r->keys.push_back(rd->Str());
  r->first_dims = rd->I64s();
  r->error = rd->Str();
  return rd->ok();
}

// ---------------------------------------------------------------------------
// Element-wise helpers dispatched on the reduction type.

template <typename T>
void ReduceTyped(tensorflow::OpKernelContext* ctx, ReduceOp op,
                 const std::vector<const char*>& operands, int64_t n,
                 int64_t divisor, char* dst) {
  std::vector<const T*> typed(operands.size());
  for (size_t i = 0; i < operands.size(); ++i) {
    typed[i] = reinterpret_cast<const T*>(operands[i]);
  }
  functor::CollectiveReduce<CPUDevice, T>()(ctx, op, typed.data(),
                                            static_cast<int>(typed.size()), n,
                                            divisor, reinterpret_cast<T*>(dst));
}

void Reduce(tensorflow::OpKernelContext* ctx, DataType rt, ReduceOp op,
            const std::vector<const char*>& operands, int64_t n,
            int64_t divisor, char* dst) {
  switch (rt) {
    case tensorflow::DT_FLOAT:
      return ReduceTyped<float>(ctx, op, operands, n, divisor, dst);
    case tensorflow::DT_DOUBLE:
      return ReduceTyped<double>(ctx, op, operands, n, divisor, dst);
    case tensorflow::DT_INT32:
      return ReduceTyped<int32_t>(ctx, op, operands, n, divisor, dst);
    case tensorflow::DT_INT64:
      return ReduceTyped<int64_t>(ctx, op, operands, n, divisor, dst);
    default:
      return;  // ReductionType() only yields the four types above.
  }
}

// Copies (or converts to the reduction type) a request's input into `dst`.
void PackInput(tensorflow::OpKernelContext* ctx, const Tensor& in, char* dst) {
  const int64_t n = in.NumElements();
  if (n == 0) return;
  switch (in.dtype()) {
    case tensorflow::DT_HALF:
      functor::CollectiveConvert<CPUDevice, Eigen::half, float>()(
          ctx, in.flat<Eigen::half>().data(), n, reinterpret_cast<float*>(dst));
      return;
    case tensorflow::DT_BFLOAT16:
      functor::CollectiveConvert<CPUDevice, Eigen::bfloat16, float>()(
          ctx, in.flat<Eigen::bfloat16>().data(), n,
          reinterpret_cast<float*>(dst));
      return;
    default:
      std::memcpy(dst, in.tensor_data().data(), in.TotalBytes());
  }
}

// The inverse of PackInput, into a request's output.
void UnpackOutput(tensorflow::OpKernelContext* ctx, const char* src,
                  Tensor* out) {
  const int64_t n = out->NumElements();
  if (n == 0) return;
  switch (out->dtype()) {
    case tensorflow::DT_HALF:
      functor::CollectiveConvert<CPUDevice, float, Eigen::half>()(
          ctx, reinterpret_cast<const float*>(src), n,
          out->flat<Eigen::half>().data());
      return;
    case tensorflow::DT_BFLOAT16:
      functor::CollectiveConvert<CPUDevice, float, Eigen::bfloat16>()(
          ctx, reinterpret_cast<const float*>(src), n,
          out->flat<Eigen::bfloat16>().data());
      return;
    default:
      std::memcpy(const_cast<char*>(out->tensor_data().data()), src,
                  out->TotalBytes());
  }
}

char* MutableData(Tensor* t) {
  return const_cast<char*>(t->tensor_data().data());
}

// Large outputs are often fresh memory from the allocator (mmap): asking for
// transparent huge pages replaces thousands of 4 KiB first-touch faults by a
// few 2 MiB ones. Only a hint (no effect where THP is off or the pages are
// already there).
void AdviseLargeOutput(char* p, int64_t bytes) {
  if (bytes >= int64_t{8} << 20) AdviseHugePages(p, bytes);
}

// A grow-only, 64-byte aligned buffer. Kept across collectives so that its
// pages are touched once (first touches are slow on some VMs).
class Buffer {
 public:
  ~Buffer() { std::free(data_); }
  char* Reserve(int64_t bytes) {
    if (bytes > capacity_) {
      std::free(data_);
      const int64_t rounded = (bytes + 63) / 64 * 64;
      data_ = static_cast<char*>(std::aligned_alloc(64, rounded));
      capacity_ = data_ == nullptr ? 0 : rounded;
    }
    return data_;
  }
  // Gives memory back after an unusually large collective.
  void ShrinkTo(int64_t limit) {
    if (capacity_ > limit) {
      std::free(data_);
      data_ = nullptr;
      capacity_ = 0;
    }
  }

 private:
  char* data_ = nullptr;
  int64_t capacity_ = 0;
};

// ---------------------------------------------------------------------------
// Executions: one Response being carried out on this rank.

class Execution {
 public:
  Execution(std::vector<std::unique_ptr<Request>> requests, MPI_Comm comm,
            int rank, int size)
      : requests_(std::move(requests)), comm_(comm), rank_(rank), size_(size) {}
  virtual ~Execution() = default;

  // Posts the first messages.
  virtual absl::Status Start() = 0;
  // Polls; sets *progressed when a message completed and *finished when the
  // outputs are ready.
  absl::Status Progress(bool* progressed, bool* finished) {
    *progressed = false;
    *finished = false;
    if (active_ > 0) {
      int outcount = 0;
      indices_.resize(mpi_.size());
      int rc = MPI_Testsome(static_cast<int>(mpi_.size()), mpi_.data(),
                            &outcount, indices_.data(), MPI_STATUSES_IGNORE);
      TF_RETURN_IF_ERROR(MpiCheck(rc, "MPI_Testsome"));
      if (outcount != MPI_UNDEFINED && outcount > 0) {
        *progressed = true;
        active_ -= outcount;
        // OnComplete may post (and compact mpi_/info_): copy first.
        completed_.clear();
        for (int i = 0; i < outcount; ++i) {
          completed_.push_back(info_[indices_[i]]);
        }
        for (const MessageInfo& info : completed_) {
          TF_RETURN_IF_ERROR(OnComplete(info));
        }
      }
    }
    if (active_ == 0) {
      bool done = false;
      TF_RETURN_IF_ERROR(OnIdle(&done));
      if (done) {
        *finished = true;
        *progressed = true;
      }
    }
    return absl::OkStatus();
  }

  std::vector<std::unique_ptr<Request>>& requests() { return requests_; }

  std::string Describe() const {
    std::string what = absl::StrCat(OpTypeName(requests_[0]->op), " of ",
                                    DisplayKey(requests_[0]->key));
    if (requests_.size() > 1) {
      absl::StrAppend(&what, " and ", requests_.size() - 1,
                      " other tensors fused with it");
    }
    return what;
  }

  // Ranks with an incomplete message (-1: unknown, e.g. a broadcast).
  std::vector<int> WaitingOn() const {
    std::vector<int> ranks;
    for (size_t i = 0; i < mpi_.size(); ++i) {
      if (mpi_[i] != MPI_REQUEST_NULL) ranks.push_back(info_[i].peer);
    }
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
    return ranks;
  }

 protected:
  struct MessageInfo {
    int peer;
    int kind;     // execution-specific
    int64_t seg;  // execution-specific
  };

  virtual absl::Status OnComplete(const MessageInfo& info) {
    return absl::OkStatus();
  }
  // Called when no message is in flight: post the next phase or finish.
  virtual absl::Status OnIdle(bool* done) = 0;

  absl::Status Post(bool send, char* buf, int64_t bytes, int peer, int tag,
                    int kind, int64_t seg) {
    // Drop completed slots once they are the majority.
    if (mpi_.size() > 64 && active_ * 2 < static_cast<int64_t>(mpi_.size())) {
      size_t j = 0;
      for (size_t i = 0; i < mpi_.size(); ++i) {
        if (mpi_[i] != MPI_REQUEST_NULL) {
          mpi_[j] = mpi_[i];
          info_[j] = info_[i];
          ++j;
        }
      }
      mpi_.resize(j);
      info_.resize(j);
    }
    for (int64_t off = 0; off < bytes; off += kMaxMessageBytes) {
      const int count =
          static_cast<int>(std::min(kMaxMessageBytes, bytes - off));
      MPI_Request req;
      int rc =
          send ? MPI_Isend(buf + off, count, MPI_BYTE, peer, tag, comm_, &req)
               : MPI_Irecv(buf + off, count, MPI_BYTE, peer, tag, comm_, &req);
      TF_RETURN_IF_ERROR(MpiCheck(rc, send ? "MPI_Isend" : "MPI_Irecv"));
      mpi_.push_back(req);
      // Pieces may complete in any order: only a message sent in one piece
      // reports its completion (segments always are).
      info_.push_back({peer, bytes <= kMaxMessageBytes ? kind : -1, seg});
      ++active_;
    }
    return absl::OkStatus();
  }

  void Track(MPI_Request req, int peer) {
    mpi_.push_back(req);
    info_.push_back({peer, -1, 0});
    ++active_;
  }

  std::vector<std::unique_ptr<Request>> requests_;
  MPI_Comm comm_;
  int rank_;
  int size_;
  std::vector<MPI_Request> mpi_;
  std::vector<MessageInfo> info_;
  std::vector<int> indices_;
  std::vector<MessageInfo> completed_;
  int64_t active_ = 0;
};

// Allreduce of one tensor, or of several packed into the fusion buffer.
//
// Rank r owns chunk r of the buffer. Reduce-scatter: every rank sends each
// peer that peer's chunk, segment by segment; rank r receives its chunk's
// segments into a small ring of slots and reduces them in order. Allgather,
// pipelined with it: each reduced segment is sent to every peer at once, and
// a peer's reduced segment is received straight into place once this rank's
// send of the same region has completed (so that in-place buffers are never
// overwritten while MPI may still read them).
class AllreduceExecution : public Execution {
 public:
  AllreduceExecution(std::vector<std::unique_ptr<Request>> requests,
                     MPI_Comm comm, int rank, int size, DataType rt,
                     ReduceOp op, Buffer* fusion, Buffer* scratch)
      : Execution(std::move(requests), comm, rank, size),
        rt_(rt),
        op_(op),
        fusion_(fusion),
        scratch_(scratch) {}

  absl::Status Start() override {
    esize_ = tensorflow::DataTypeSize(rt_);
    n_ = 0;
    for (const auto& r : requests_) n_ += r->input.NumElements();
    ctx_ = requests_[0]->ctx;
    TF_RETURN_IF_ERROR(AllocateOutputs());
    // Several requests, or a conversion: the fused layout.
    const bool packed =
        requests_.size() > 1 || requests_[0]->input.dtype() != rt_;
    if (packed && OutputsAdjacent()) {
      // The outputs tile one region in the fused layout (see
      // AllocateOutputs): pack the inputs there and reduce in place, with
      // nothing to unpack afterwards.
      for (const auto& r : requests_) {
        char* out = MutableData(&r->output);
        if (r->input.tensor_data().data() != out) {
          PackInput(ctx_, r->input, out);
        }
      }
      src_ = dst_ = MutableData(&requests_[0]->output);
    } else if (packed) {
      char* buf = fusion_->Reserve(n_ * esize_);
      if (buf == nullptr && n_ > 0) {
        return absl::ResourceExhaustedError(
            absl::StrCat("hpc_ops: cannot allocate a fusion buffer of ",
                         n_ * esize_, " bytes"));
      }
      int64_t off = 0;
      for (const auto& r : requests_) {
        PackInput(ctx_, r->input, buf + off * esize_);
        off += r->input.NumElements();
      }
      src_ = dst_ = buf;
      unpack_ = true;
    } else {
      src_ = const_cast<char*>(requests_[0]->input.tensor_data().data());
      dst_ = MutableData(&requests_[0]->output);
      if (dst_ != src_) AdviseLargeOutput(dst_, n_ * esize_);
    }
    // A function of (n, size) only: every rank must cut a chunk the same
    // way. About four segments per chunk, 512 KiB to 1 MiB each: every
    // segment is a rendezvous between two processes, and below 512 KiB
    // the handshakes cost more than the overlap gains (a 1 MB allreduce of
    // two processes is one segment per chunk).
    const int64_t seg_bytes = std::clamp<int64_t>(
        n_ * esize_ / (int64_t{size_} * 4), kMinSegmentBytes, kSegmentBytes);
    seg_ = std::max<int64_t>(1, seg_bytes / esize_);
    c0_ = ChunkBegin(rank_);
    nseg_ = Segments(rank_);
    if (size_ == 1) {
      for (int64_t k = 0; k < nseg_; ++k) ReduceSegment(k, {});
      next_reduce_ = nseg_;
      return absl::OkStatus();
    }
    // Send every peer its chunk of this rank's data, segment by segment,
    // before posting the receives: receiving a message that already
    // arrived copies it on the spot (single-copy shared memory), and the
    // peers can copy this rank's data meanwhile. Each rank starts with the
    // next rank. Out of place, the peers' reduced segments may land in the
    // output at once; in place, only once the region they overwrite went
    // out.
    sent_.assign(size_, {});
    next_gather_.assign(size_, 0);
    for (int i = 1; i < size_; ++i) {
      const int q = (rank_ + i) % size_;
      sent_[q].assign(Segments(q), false);
      for (int64_t j = 0; j < Segments(q); ++j) {
        TF_RETURN_IF_ERROR(Post(true, src_ + SegBegin(q, j) * esize_,
                                SegLen(q, j) * esize_, q, kTagReduceScatter,
                                kScatterSend, j));
      }
      if (dst_ != src_) {
        for (int64_t j = 0; j < Segments(q); ++j) {
          TF_RETURN_IF_ERROR(Post(false, dst_ + SegBegin(q, j) * esize_,
                                  SegLen(q, j) * esize_, q, kTagAllgatherPhase,
                                  kGather, j));
        }
        next_gather_[q] = Segments(q);
      }
    }
    if (nseg_ > 0) {
      slot_elems_ = std::min(seg_, ChunkBegin(rank_ + 1) - c0_);
      const int64_t scratch_bytes =
          int64_t{size_ - 1} * kSegmentsInFlight * slot_elems_ * esize_;
      slots_ = scratch_->Reserve(scratch_bytes);
      if (slots_ == nullptr) {
        return absl::ResourceExhaustedError(
            absl::StrCat("hpc_ops: cannot allocate ", scratch_bytes,
                         " bytes of receive buffers"));
      }
      remaining_.assign(nseg_, size_ - 1);
      for (int64_t k = 0; k < std::min<int64_t>(nseg_, kSegmentsInFlight);
           ++k) {
        TF_RETURN_IF_ERROR(PostSegmentReceives(k));
      }
    }
    return absl::OkStatus();
  }

 protected:
  enum Kind { kScatterSend = 0, kSegmentReceive = 1, kGather = 2 };

  absl::Status OnComplete(const MessageInfo& info) override {
    if (info.kind == kScatterSend) {
      // The region went out: the peer's reduced segment may land there.
      const int q = info.peer;
      if (dst_ != src_) return absl::OkStatus();  // already posted
      sent_[q][info.seg] = true;
      while (next_gather_[q] < Segments(q) && sent_[q][next_gather_[q]]) {
        const int64_t j = next_gather_[q]++;
        TF_RETURN_IF_ERROR(Post(false, dst_ + SegBegin(q, j) * esize_,
                                SegLen(q, j) * esize_, q, kTagAllgatherPhase,
                                kGather, j));
      }
      return absl::OkStatus();
    }
    if (info.kind != kSegmentReceive) return absl::OkStatus();
    --remaining_[info.seg];
    // Reduce in segment order, so that the allgather messages to each peer
    // go out in the order the peer posts its receives.
    while (next_reduce_ < nseg_ && remaining_[next_reduce_] == 0) {
      const int64_t k = next_reduce_++;
      std::vector<const char*> operands(size_);
      for (int r = 0; r < size_; ++r) {
        operands[r] = r == rank_ ? nullptr : Slot(r, k);
      }
      ReduceSegment(k, operands);
      for (int q = 0; q < size_; ++q) {
        if (q == rank_) continue;
        TF_RETURN_IF_ERROR(Post(true, dst_ + SegBegin(rank_, k) * esize_,
                                SegLen(rank_, k) * esize_, q,
                                kTagAllgatherPhase, kGather, k));
      }
      if (k + kSegmentsInFlight < nseg_) {
        TF_RETURN_IF_ERROR(PostSegmentReceives(k + kSegmentsInFlight));
      }
    }
    return absl::OkStatus();
  }

  absl::Status OnIdle(bool* done) override {
    bool complete = next_reduce_ == nseg_;
    for (int q = 0; q < size_ && complete; ++q) {
      complete = q == rank_ || next_gather_[q] == Segments(q);
    }
    if (!complete) {
      return absl::InternalError(
          "hpc_ops: allreduce stalled with no message in flight");
    }
    if (unpack_) {
      int64_t off = 0;
      for (auto& r : requests_) {
        UnpackOutput(ctx_, dst_ + off * esize_, &r->output);
        off += r->output.NumElements();
      }
    }
    *done = true;
    return absl::OkStatus();
  }

 private:
  // The outputs the kernels left to the runtime. When every request of a
  // fused operation left its output, is of the reduction type and (but the
  // last) a multiple of 64 bytes long, the outputs are consecutive pieces of
  // one buffer in the fused layout, so that the operation runs in place
  // there (see OutputsAdjacent); otherwise each is allocated on its own.
  absl::Status AllocateOutputs() {
    bool tile = requests_.size() > 1 && n_ > 0;
    for (size_t i = 0; i < requests_.size() && tile; ++i) {
      const Request& r = *requests_[i];
      tile = r.output_pending && r.input.dtype() == rt_ &&
             (i + 1 == requests_.size() || r.input.TotalBytes() % 64 == 0);
    }
    Tensor flat;
    if (tile) {
      TF_RETURN_IF_ERROR(ctx_->allocate_temp(rt_, TensorShape({n_}), &flat));
    }
    int64_t off = 0;
    for (auto& r : requests_) {
      const int64_t elems = r->input.NumElements();
      if (tile) {
        if (!r->output.CopyFrom(flat.Slice(off, off + elems),
                                r->input.shape())) {
          return absl::InternalError("hpc_ops: allreduce output reshape");
        }
        r->ctx->set_output(r->output_index, r->output);
      } else if (r->output_pending) {
        Tensor* out = nullptr;
        TF_RETURN_IF_ERROR(
            r->ctx->allocate_output(r->output_index, r->input.shape(), &out));
        r->output = *out;
      }
      r->output_pending = false;
      off += elems;
    }
    return absl::OkStatus();
  }

  // True when every request's input is of the reduction type and the
  // outputs lie back to back in request order (the fused layout), so that
  // the region they tile can serve as the fusion buffer.
  bool OutputsAdjacent() const {
    const char* next = nullptr;
    for (const auto& r : requests_) {
      if (r->input.dtype() != rt_ || r->output.dtype() != rt_) return false;
      const char* out = r->output.tensor_data().data();
      if (out == nullptr || (next != nullptr && out != next)) return false;
      next = out + r->output.TotalBytes();
    }
    return true;
  }

  int64_t ChunkBegin(int r) const {
    return static_cast<int64_t>(static_cast<__int128>(n_) * r / size_);
  }
  int64_t Segments(int r) const {
    return (ChunkBegin(r + 1) - ChunkBegin(r) + seg_ - 1) / seg_;
  }
  int64_t SegBegin(int r, int64_t k) const { return ChunkBegin(r) + k * seg_; }
  int64_t SegLen(int r, int64_t k) const {
    return std::min(seg_, ChunkBegin(r + 1) - SegBegin(r, k));
  }

  char* Slot(int r, int64_t k) const {
    const int peer_index = r < rank_ ? r : r - 1;
    return slots_ +
           ((int64_t{peer_index} * kSegmentsInFlight + k % kSegmentsInFlight) *
            slot_elems_) *
               esize_;
  }

  absl::Status PostSegmentReceives(int64_t k) {
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      TF_RETURN_IF_ERROR(Post(false, Slot(q, k), SegLen(rank_, k) * esize_, q,
                              kTagReduceScatter, kSegmentReceive, k));
    }
    return absl::OkStatus();
  }

  // dst[segment k of my chunk] = the ranks' segments combined in rank order;
  // operands[rank_] is this rank's own data (a null placeholder on input).
  void ReduceSegment(int64_t k, std::vector<const char*> operands) {
    const int64_t b = SegBegin(rank_, k);
    const int64_t len = SegLen(rank_, k);
    if (operands.empty()) operands.assign(1, nullptr);
    for (auto& p : operands) {
      if (p == nullptr) p = src_ + b * esize_;
    }
    if (operands.size() == 1 && op_ != ReduceOp::kAverage) {
      if (dst_ != src_) {
        std::memcpy(dst_ + b * esize_, operands[0], len * esize_);
      }
      return;
    }
    Reduce(ctx_, rt_, op_, operands, len, size_, dst_ + b * esize_);
  }

  DataType rt_;
  ReduceOp op_;
  Buffer* fusion_;
  Buffer* scratch_;
  tensorflow::OpKernelContext* ctx_ = nullptr;
  int64_t esize_ = 0;
  int64_t n_ = 0;
  bool unpack_ = false;  // packed into the fusion buffer
  char* src_ = nullptr;
  char* dst_ = nullptr;
  int64_t c0_ = 0;  // this rank's chunk starts here (elements)
  int64_t seg_ = 1, nseg_ = 0, slot_elems_ = 0;
  char* slots_ = nullptr;
  std::vector<int> remaining_;  // receives outstanding per own segment
  int64_t next_reduce_ = 0;
  std::vector<std::vector<bool>> sent_;  // [peer][segment] scatter sent
  std::vector<int64_t> next_gather_;     // [peer] next gather receive
};

class BroadcastExecution : public Execution {
 public:
  BroadcastExecution(std::vector<std::unique_ptr<Request>> requests,
                     MPI_Comm comm, int rank, int size, int root)
      : Execution(std::move(requests), comm, rank, size), root_(root) {}

  absl::Status Start() override {
    Tensor& out = requests_[0]->output;
    char* buf = MutableData(&out);
    const int64_t bytes = out.TotalBytes();
    if (size_ == 1) return absl::OkStatus();
    for (int64_t off = 0; off < bytes; off += kMaxMessageBytes) {
      const int count =
          static_cast<int>(std::min(kMaxMessageBytes, bytes - off));
      MPI_Request req;
      TF_RETURN_IF_ERROR(
          MpiCheck(MPI_Ibcast(buf + off, count, MPI_BYTE, root_, comm_, &req),
                   "MPI_Ibcast"));
      Track(req, rank_ == root_ ? -1 : root_);
    }
    return absl::OkStatus();
  }

 protected:
  absl::Status OnIdle(bool* done) override {
    *done = true;
    return absl::OkStatus();
  }

 private:
  int root_;
};

class AllgatherExecution : public Execution {
 public:
  AllgatherExecution(std::vector<std::unique_ptr<Request>> requests,
                     MPI_Comm comm, int rank, int size,
                     std::vector<int64_t> first_dims)
      : Execution(std::move(requests), comm, rank, size),
        first_dims_(std::move(first_dims)) {}

  absl::Status Start() override {
    Request& r = *requests_[0];
    if (static_cast<int>(first_dims_.size()) != size_ ||
        first_dims_[rank_] != r.input.dim_size(0)) {
      return absl::InternalError(
          "hpc_ops: the coordinator's allgather sizes do not match this rank");
    }
    TensorShape shape = r.input.shape();
    int64_t rows = 0;
    for (int64_t d : first_dims_) rows += d;
    shape.set_dim(0, rows);
    Tensor* out = nullptr;
    TF_RETURN_IF_ERROR(r.ctx->allocate_output(0, shape, &out));
    r.output = *out;
    AdviseLargeOutput(MutableData(&r.output), r.output.TotalBytes());
    int64_t row_bytes = tensorflow::DataTypeSize(r.input.dtype());
    for (int i = 1; i < r.input.dims(); ++i) row_bytes *= r.input.dim_size(i);
    char* dst = MutableData(&r.output);
    std::vector<int64_t> offset(size_ + 1, 0);
    for (int q = 0; q < size_; ++q) {
      offset[q + 1] = offset[q] + first_dims_[q] * row_bytes;
    }
    const int64_t mine = offset[rank_ + 1] - offset[rank_];
    char* src = const_cast<char*>(r.input.tensor_data().data());
    if (mine > 0) std::memcpy(dst + offset[rank_], src, mine);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      if (mine > 0) {
        TF_RETURN_IF_ERROR(Post(true, src, mine, q, kTagGather, 0, 0));
      }
      const int64_t theirs = offset[q + 1] - offset[q];
      if (theirs > 0) {
        TF_RETURN_IF_ERROR(
            Post(false, dst + offset[q], theirs, q, kTagGather, 0, 0));
      }
    }
    return absl::OkStatus();
  }

 protected:
  absl::Status OnIdle(bool* done) override {
    *done = true;
    return absl::OkStatus();
  }

 private:
  std::vector<int64_t> first_dims_;
};

// ---------------------------------------------------------------------------
// The engine.

void Finish(std::unique_ptr<Request> r, const absl::Status& s) {
  if (!s.ok()) r->ctx->SetStatus(s);
  auto done = std::move(r->done);
  r.reset();
  done();
}

// A request's own view of a runtime-wide failure.
absl::Status ForRequest(const Request& r, const absl::Status& s) {
  const std::string prefix =
      absl::StrCat(OpTypeName(r.op), " ", DisplayKey(r.key), ": ");
  if (absl::StartsWith(s.message(), prefix)) return s;
  return absl::Status(
      s.code(), absl::StrCat(prefix, "collectives stopped: ", s.message()));
}

class Engine;
Engine* GetEngine();

class Engine {
 public:
  absl::Status Initialize();
  void Enqueue(std::unique_ptr<Request> r);
  void Shutdown();

  // Collectives completed: data operations, and tensors (a fused
  // operation carries several).
  std::atomic<int64_t> stat_operations_{0};
  std::atomic<int64_t> stat_tensors_{0};
  std::atomic<int64_t> stat_in_place_{0};

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }

 private:
  // Background thread.
  void Run();
  absl::Status InitMpi();
  absl::Status WaitInit(std::vector<MPI_Request>* reqs, const char* what);
  void MainLoop();
  void HandleNew(std::vector<std::unique_ptr<Request>> fresh);
  absl::Status PollControl(bool* progressed);
  absl::Status HandleMessage(int source, int tag, const std::string& buf);
  void Register(int rank, TensorMeta meta);
  absl::Status Plan(bool* progressed);
  std::string Validate(const std::vector<TensorMeta>& metas) const;
  void ApplyError(const Response& r);
  absl::Status ProgressExecution(bool* progressed);
  absl::Status StartNext();
  void CheckDeadlines();
  void SendAsync(int dest, int tag, std::string buf);
  bool ProgressSends();
  void Break(const absl::Status& s, bool tell_others);
  void FailAll(const absl::Status& s);
  void Bury(Request* r);
  void Idle(bool progressed);
  void Finalize();

  Config config_;
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  bool use_mpi_ = false;
  bool owns_mpi_ = false;
  MPI_Comm ctrl_ = MPI_COMM_NULL;
  MPI_Comm data_ = MPI_COMM_NULL;

  // Shared with the kernels' threads.
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable state_cv_;
  std::vector<std::unique_ptr<Request>> queue_;
  // Lock-free hints for the polling loop (the mutex guards the real state).
  std::atomic<int64_t> queue_size_{0};
  std::atomic<bool> shutdown_flag_{false};
  std::unordered_map<std::string, int64_t> occurrences_;
  bool started_ = false;
  bool init_done_ = false;
  bool shutdown_requested_ = false;
  bool exited_ = false;
  absl::Status init_status_;
  absl::Status broken_;  // OK while healthy
  std::thread thread_;

  // Background thread only.
  std::unordered_map<std::string, std::unique_ptr<Request>> pending_;
  std::deque<Response> exec_queue_;
  std::unique_ptr<Execution> current_;
  struct PendingSend {
    MPI_Request req;
    std::string buf;
  };
  std::list<PendingSend> sends_;
  struct Entry {
    std::vector<TensorMeta> metas;
    std::vector<bool> has;
    int count = 0;
    Clock::time_point first;
  };
  std::unordered_map<std::string, Entry> table_;  // coordinator
  std::vector<std::string> ready_;                // coordinator, in order
  Clock::time_point ready_since_;
  Clock::time_point last_progress_;  // of the data plane
  Clock::time_point last_response_;  // worker: last word from rank 0
  Clock::time_point last_activity_;
  Clock::time_point last_deadline_check_;
  bool is_broken_ = false;
  std::vector<Tensor> graveyard_;  // buffers MPI may still touch after a break
  Buffer fusion_;
  Buffer scratch_;
};

absl::Status Engine::Initialize() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!started_) {
    started_ = true;
    absl::Status s = ReadConfig(&config_);
    if (!s.ok()) {
      init_status_ = s;
      broken_ = s;
      init_done_ = true;
      return s;
    }
    thread_ = std::thread(&Engine::Run, this);
    // Python's atexit normally shuts down first (hpc_ops/collective.py); this
    // covers programs that load the library some other way.
    std::atexit([] { GetEngine()->Shutdown(); });
  }
  if (init_done_) return init_status_;
  const auto timeout = std::chrono::duration<double>(config_.timeout_seconds);
  if (!state_cv_.wait_for(lock, timeout, [this] { return init_done_; })) {
    return absl::DeadlineExceededError(absl::StrCat(
        "hpc_ops: MPI initialisation did not finish within "
        "HPC_OPS_TIMEOUT_SECONDS=",
        config_.timeout_seconds,
        " s; are all processes of the job starting and reaching their first "
        "collective?"));
  }
  return init_status_;
}

void Engine::Enqueue(std::unique_ptr<Request> r) {
  absl::Status s = Initialize();
  if (s.ok()) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!broken_.ok()) {
      s = broken_;
    } else if (shutdown_requested_) {
      s = absl::AbortedError(
          "hpc_ops: the collective runtime was shut down "
          "(hpc_ops.distributed.shutdown() or interpreter exit)");
    } else {
      r->key = absl::StrCat(r->name, "#", occurrences_[r->name]++);
      r->enqueued = Clock::now();
      queue_.push_back(std::move(r));
      queue_size_.fetch_add(1, std::memory_order_relaxed);
      lock.unlock();
      wake_.notify_one();
      return;
    }
  }
  if (r->key.empty()) r->key = r->name;
  absl::Status rs = ForRequest(*r, s);
  Finish(std::move(r), rs);
}

void Engine::Shutdown() {
  std::unique_lock<std::mutex> lock(mu_);
  if (!thread_.joinable() || shutdown_requested_) return;
  shutdown_requested_ = true;
  shutdown_flag_ = true;
  wake_.notify_all();
  const auto period = std::chrono::duration<double>(config_.timeout_seconds);
  bool noted = false;
  while (!state_cv_.wait_for(lock, period, [this] { return exited_; })) {
    if (!init_done_) {
      // Stuck in MPI_Init (a process of the job never started): leave.
      std::fprintf(stderr,
                   "hpc_ops: MPI initialisation did not finish; "
                   "exiting without MPI_Finalize\n");
      lock.unlock();
      thread_.detach();
      return;
    }
    // MPI_Finalize returns once every process of the job called it, as
    // in any MPI program: a process that finishes early waits here.
    if (!noted) {
      std::fprintf(stderr,
                   "hpc_ops: rank %d is waiting for the other "
                   "processes to finish (MPI_Finalize)\n",
                   rank_);
      noted = true;
    }
  }
  lock.unlock();
  thread_.join();
}

void Engine::Run() {
  // The polls below sleep for tens of microseconds; the default timer slack
  // (50 us) would double that.
  prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
  absl::Status s = InitMpi();
  {
    std::lock_guard<std::mutex> lock(mu_);
    init_status_ = s;
    if (!s.ok()) broken_ = s;
    init_done_ = true;
  }
  state_cv_.notify_all();
  if (s.ok()) {
    MainLoop();
  } else {
    is_broken_ = true;
  }
  // Fail whatever is left, then leave MPI.
  std::vector<std::unique_ptr<Request>> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(queue_);
  }
  absl::Status stop =
      is_broken_ ? broken_
                 : absl::AbortedError(
                       "hpc_ops: the collective runtime was shut down while "
                       "this collective was pending");
  for (auto& r : left) pending_.emplace(r->key, std::move(r));
  FailAll(stop);
  Finalize();
  {
    std::lock_guard<std::mutex> lock(mu_);
    exited_ = true;
  }
  state_cv_.notify_all();
}

absl::Status Engine::WaitInit(std::vector<MPI_Request>* reqs,
                              const char* what) {
  const auto start = Clock::now();
  const auto deadline =
      start + std::chrono::duration_cast<Clock::duration>(
                  std::chrono::duration<double>(config_.timeout_seconds));
  while (true) {
    int flag = 0;
    TF_RETURN_IF_ERROR(
        MpiCheck(MPI_Testall(static_cast<int>(reqs->size()), reqs->data(),
                             &flag, MPI_STATUSES_IGNORE),
                 what));
    if (flag) return absl::OkStatus();
    const auto now = Clock::now();
    if (now > deadline) {
      return absl::DeadlineExceededError(absl::StrCat(
          "hpc_ops: ", what,
          " did not complete within "
          "HPC_OPS_TIMEOUT_SECONDS=",
          config_.timeout_seconds, " s; is every process of the job running?"));
    }
    // A matched control message above the eager limit (a long list of
    // requests) needs a few more polls: spin for those, sleep only when
    // waiting for another process (initialisation).
    if (now - start < kSpinWindow) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
}

absl::Status Engine::InitMpi() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    if (config_.use_mpi == 0 || (config_.use_mpi < 0 && !LaunchedByMpi())) {
      return absl::OkStatus();  // one process, no MPI
    }
    int provided = 0;
    TF_RETURN_IF_ERROR(MpiCheck(
        MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided),
        "MPI_Init_thread"));
    owns_mpi_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      return absl::FailedPreconditionError(
          "hpc_ops: the MPI library does not support MPI_THREAD_FUNNELED");
    }
  } else {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) {
      return absl::FailedPreconditionError(
          "hpc_ops: MPI was already finalised in this process");
    }
    // Someone else initialised MPI on another thread: this thread may only
    // call it concurrently with them under MPI_THREAD_MULTIPLE.
    int provided = 0;
    MPI_Query_thread(&provided);
    if (provided < MPI_THREAD_MULTIPLE) {
      return absl::FailedPreconditionError(
          "hpc_ops: MPI was initialised by another library without "
          "MPI_THREAD_MULTIPLE; initialise it with MPI_THREAD_MULTIPLE (the "
          "mpi4py default) or let hpc_ops initialise it first");
    }
  }
  use_mpi_ = true;
  std::vector<MPI_Request> reqs(2);
  TF_RETURN_IF_ERROR(MpiCheck(MPI_Comm_idup(MPI_COMM_WORLD, &ctrl_, &reqs[0]),
                              "MPI_Comm_idup"));
  TF_RETURN_IF_ERROR(MpiCheck(MPI_Comm_idup(MPI_COMM_WORLD, &data_, &reqs[1]),
                              "MPI_Comm_idup"));
  TF_RETURN_IF_ERROR(WaitInit(&reqs, "MPI_Comm_idup"));
  // Errors come back as return codes (and become TF errors), never abort.
  TF_RETURN_IF_ERROR(MpiCheck(MPI_Comm_set_errhandler(ctrl_, MPI_ERRORS_RETURN),
                              "MPI_Comm_set_errhandler"));
  TF_RETURN_IF_ERROR(MpiCheck(MPI_Comm_set_errhandler(data_, MPI_ERRORS_RETURN),
                              "MPI_Comm_set_errhandler"));
  MPI_Comm_rank(ctrl_, &rank_);
  MPI_Comm_size(ctrl_, &size_);
  // Local rank: the ranks before this one with the same processor name.
  std::vector<char> names(static_cast<size_t>(size_) * MPI_MAX_PROCESSOR_NAME,
                          '\0');
  std::vector<char> mine(MPI_MAX_PROCESSOR_NAME, '\0');
  int len = 0;
  TF_RETURN_IF_ERROR(MpiCheck(MPI_Get_processor_name(mine.data(), &len),
                              "MPI_Get_processor_name"));
  reqs.assign(1, MPI_REQUEST_NULL);
  TF_RETURN_IF_ERROR(
      MpiCheck(MPI_Iallgather(mine.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR,
                              names.data(), MPI_MAX_PROCESSOR_NAME, MPI_CHAR,
                              ctrl_, &reqs[0]),
               "MPI_Iallgather"));
  TF_RETURN_IF_ERROR(WaitInit(&reqs, "the exchange of host names"));
  local_rank_ = 0;
  for (int r = 0; r < rank_; ++r) {
    if (std::strncmp(
            names.data() + static_cast<size_t>(r) * MPI_MAX_PROCESSOR_NAME,
            mine.data(), MPI_MAX_PROCESSOR_NAME) == 0) {
      ++local_rank_;
    }
  }
  return absl::OkStatus();
}

void Engine::MainLoop() {
  last_progress_ = last_response_ = last_activity_ = last_deadline_check_ =
      Clock::now();
  while (true) {
    std::vector<std::unique_ptr<Request>> fresh;
    bool stop = false;
    if (queue_size_.load(std::memory_order_relaxed) > 0 ||
        shutdown_flag_.load(std::memory_order_relaxed)) {
      std::lock_guard<std::mutex> lock(mu_);
      fresh.swap(queue_);
      queue_size_.store(0, std::memory_order_relaxed);
      stop = shutdown_requested_;
    }
    if (stop) {
      for (auto& r : fresh) pending_.emplace(r->key, std::move(r));
      return;
    }
    bool progressed = false;
    if (!fresh.empty()) {
      progressed = true;
      if (is_broken_) {
        for (auto& r : fresh) {
          absl::Status s = ForRequest(*r, broken_);
          Finish(std::move(r), s);
        }
      } else {
        HandleNew(std::move(fresh));
      }
    }
    if (!is_broken_) {
      absl::Status s;
      bool p = false;
      if (use_mpi_ && size_ > 1) {
        s = PollControl(&p);
        progressed |= p;
      }
      if (s.ok() && rank_ == 0) {
        s = Plan(&p);
        progressed |= p;
      }
      if (s.ok()) {
        s = ProgressExecution(&p);
        progressed |= p;
      }
      if (!s.ok()) Break(s, /*tell_others=*/true);
    }
    if (use_mpi_) progressed |= ProgressSends();
    if (!is_broken_) CheckDeadlines();
    Idle(progressed);
  }
}

void Engine::HandleNew(std::vector<std::unique_ptr<Request>> fresh) {
  Writer w;
  w.I64(static_cast<int64_t>(fresh.size()));
  for (auto& r : fresh) {
    TensorMeta m;
    m.key = r->key;
    m.op = r->op;
    m.dtype = r->input.dtype();
    m.reduce_op = r->reduce_op;
    m.root_rank = r->root_rank;
    for (int i = 0; i < r->input.dims(); ++i) {
      m.shape.push_back(r->input.dim_size(i));
    }
    if (is_broken_) {
      absl::Status s = ForRequest(*r, broken_);
      Finish(std::move(r), s);
      continue;
    }
    const std::string key = r->key;
    pending_.emplace(key, std::move(r));
    if (rank_ == 0) {
      Register(0, std::move(m));
    } else {
      WriteMeta(m, &w);
    }
  }
  if (is_broken_) return;
  if (rank_ != 0) SendAsync(0, kTagRequest, std::move(w.buf()));
}

void Engine::SendAsync(int dest, int tag, std::string buf) {
  sends_.push_back(PendingSend{MPI_REQUEST_NULL, std::move(buf)});
  PendingSend& ps = sends_.back();
  int rc = MPI_Isend(ps.buf.data(), static_cast<int>(ps.buf.size()), MPI_BYTE,
                     dest, tag, ctrl_, &ps.req);
  if (rc != MPI_SUCCESS) {
    sends_.pop_back();
    if (!is_broken_) Break(MpiCheck(rc, "MPI_Isend"), /*tell_others=*/false);
  }
}

bool Engine::ProgressSends() {
  bool progressed = false;
  for (auto it = sends_.begin(); it != sends_.end();) {
    int flag = 0;
    int rc = MPI_Test(&it->req, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      // The message buffer stays owned by the list: MPI may still read it.
      if (!is_broken_) Break(MpiCheck(rc, "MPI_Test"), /*tell_others=*/false);
      return progressed;
    }
    if (flag) {
      it = sends_.erase(it);
      progressed = true;
    } else {
      ++it;
    }
  }
  return progressed;
}

absl::Status Engine::PollControl(bool* progressed) {
  *progressed = false;
  while (true) {
    int flag = 0;
    MPI_Message msg;
    MPI_Status status;
    TF_RETURN_IF_ERROR(MpiCheck(
        MPI_Improbe(MPI_ANY_SOURCE, MPI_ANY_TAG, ctrl_, &flag, &msg, &status),
        "MPI_Improbe"));
    if (!flag) return absl::OkStatus();
    *progressed = true;
    int count = 0;
    TF_RETURN_IF_ERROR(
        MpiCheck(MPI_Get_count(&status, MPI_BYTE, &count), "MPI_Get_count"));
    std::string buf(static_cast<size_t>(count), '\0');
    MPI_Request req;
    TF_RETURN_IF_ERROR(MpiCheck(
        MPI_Imrecv(buf.data(), count, MPI_BYTE, &msg, &req), "MPI_Imrecv"));
    // The message is matched: it arrives as fast as the sender can push it.
    std::vector<MPI_Request> reqs{req};
    TF_RETURN_IF_ERROR(WaitInit(&reqs, "receiving a control message"));
    TF_RETURN_IF_ERROR(HandleMessage(status.MPI_SOURCE, status.MPI_TAG, buf));
    if (is_broken_) return absl::OkStatus();
  }
}

absl::Status Engine::HandleMessage(int source, int tag,
                                   const std::string& buf) {
  Reader rd(buf);
  if (tag == kTagAbort) {
    int32_t code = rd.I32();
    std::string message = rd.Str();
    if (!rd.ok() || code <= 0 || code > 16) {
      code = static_cast<int32_t>(absl::StatusCode::kInternal);
      message = "hpc_ops: malformed abort message";
    }
    Break(absl::Status(static_cast<absl::StatusCode>(code), message),
          /*tell_others=*/false);
    return absl::OkStatus();
  }
  if (tag == kTagRequest && rank_ == 0) {
    int64_t n = rd.I64();
    for (int64_t i = 0; i < n && rd.ok(); ++i) {
      TensorMeta m;
      if (!ReadMeta(&rd, &m)) break;
      Register(source, std::move(m));
    }
    if (!rd.ok() || !rd.done()) {
      return absl::InternalError(absl::StrCat(
          "hpc_ops: malformed request message from rank ", source));
    }
    return absl::OkStatus();
  }
  if (tag == kTagResponse && source == 0) {
    int64_t n = rd.I64();
    for (int64_t i = 0; i < n && rd.ok(); ++i) {
      Response r;
      if (!ReadResponse(&rd, &r)) break;
      if (r.kind == Response::kError) {
        ApplyError(r);
      } else {
        exec_queue_.push_back(std::move(r));
      }
    }
    if (!rd.ok() || !rd.done()) {
      return absl::InternalError(
          "hpc_ops: malformed response message from the coordinator");
    }
    last_response_ = Clock::now();
    return absl::OkStatus();
  }
  return absl::InternalError(
      absl::StrCat("hpc_ops: unexpected control message (tag ", tag,
                   ") from rank ", source));
}

void Engine::Register(int rank, TensorMeta meta) {
  Entry& e = table_[meta.key];
  if (e.count == 0) {
    e.metas.resize(size_);
    e.has.assign(size_, false);
    e.first = Clock::now();
  }
  if (e.has[rank]) {
    Break(
        absl::InternalError(absl::StrCat("hpc_ops: rank ", rank, " submitted ",
                                         DisplayKey(meta.key), " twice")),
        /*tell_others=*/true);
    return;
  }
  e.has[rank] = true;
  const std::string key = meta.key;
  e.metas[rank] = std::move(meta);
  if (++e.count == size_) {
    if (ready_.empty()) ready_since_ = Clock::now();
    ready_.push_back(key);
  }
}

std::string Engine::Validate(const std::vector<TensorMeta>& metas) const {
  const TensorMeta& a = metas[0];
  const std::string who =
      absl::StrCat(OpTypeName(a.op), ": tensor ", DisplayKey(a.key));
  for (int r = 1; r < size_; ++r) {
    const TensorMeta& b = metas[r];
    if (b.op != a.op) {
      return absl::StrCat(who, " is an ", OpTypeName(a.op),
                          " on rank 0 but an ", OpTypeName(b.op), " on rank ",
                          r,
                          "; every process must issue the same collective "
                          "under one name");
    }
    if (b.dtype != a.dtype) {
      return absl::StrCat(
          who, " has dtype ", tensorflow::DataTypeString(a.dtype),
          " on rank 0 but ", tensorflow::DataTypeString(b.dtype), " on rank ",
          r, "; every process must pass the same dtype");
    }
    if (a.op == OpType::kAllreduce && b.reduce_op != a.reduce_op) {
      return absl::StrCat(who, " has reduce_op '", ReduceOpName(a.reduce_op),
                          "' on rank 0 but '", ReduceOpName(b.reduce_op),
                          "' on rank ", r);
    }
    if (a.op == OpType::kBroadcast && b.root_rank != a.root_rank) {
      return absl::StrCat(who, " has root_rank ", a.root_rank,
                          " on rank 0 but ", b.root_rank, " on rank ", r);
    }
    if (a.op == OpType::kAllgather) {
      bool same = a.shape.size() == b.shape.size() && !a.shape.empty();
      for (size_t i = 1; same && i < a.shape.size(); ++i) {
        same = a.shape[i] == b.shape[i];
      }
      if (!same) {
        return absl::StrCat(who, " has shape ", ShapeString(a.shape),
                            " on rank 0 but ", ShapeString(b.shape),
                            " on rank ", r,
                            "; all dimensions but the first must match");
      }
    } else if (b.shape != a.shape) {
      return absl::StrCat(who, " has shape ", ShapeString(a.shape),
                          " on rank 0 but ", ShapeString(b.shape), " on rank ",
                          r, "; every process must pass the same shape");
    }
  }
  if (a.op == OpType::kAllgather) {
    // The gathered tensor must be representable.
    int64_t rows = 0;
    for (const auto& m : metas) {
      if (m.shape.empty() || m.shape[0] < 0 ||
          m.shape[0] > std::numeric_limits<int64_t>::max() - rows) {
        return absl::StrCat(who, ": the gathered first dimension overflows");
      }
      rows += m.shape[0];
    }
    TensorShape s;
    std::vector<int64_t> dims = a.shape;
    dims[0] = rows;
    if (!TensorShape::BuildTensorShape(dims, &s).ok()) {
      return absl::StrCat(who, ": the gathered shape ", ShapeString(dims),
                          " is too large");
    }
  }
  return "";
}

absl::Status Engine::Plan(bool* progressed) {
  *progressed = false;
  if (ready_.empty() || current_ != nullptr || !exec_queue_.empty()) {
    return absl::OkStatus();
  }
  const auto now = Clock::now();
  const bool partial = table_.size() > ready_.size();
  if (partial && config_.cycle_time_ms > 0 &&
      Seconds(now - ready_since_) * 1e3 < config_.cycle_time_ms) {
    // Others are on their way: wait a little to fuse them, unless the ready
    // ones already fill a fusion buffer.
    int64_t bytes = 0;
    for (const auto& key : ready_) {
      const TensorMeta& m = table_[key].metas[0];
      int64_t n = 1;
      for (int64_t d : m.shape) n *= d;
      bytes += n * tensorflow::DataTypeSize(ReductionType(m.dtype));
    }
    if (bytes < config_.fusion_threshold) return absl::OkStatus();
  }
  std::vector<Response> out;
  std::vector<int64_t> group_bytes;
  std::map<std::pair<int, int>, size_t> open;  // (type, op) -> index in out
  for (const auto& key : ready_) {
    auto node = table_.extract(key);
    const std::vector<TensorMeta>& metas = node.mapped().metas;
    std::string err = Validate(metas);
    Response r;
    r.keys.push_back(key);
    if (!err.empty()) {
      r.kind = Response::kError;
      r.error = std::move(err);
      out.push_back(std::move(r));
      group_bytes.push_back(0);
      continue;
    }
    const TensorMeta& m = metas[0];
    r.op = m.op;
    r.dtype = m.dtype;
    r.reduce_op = m.reduce_op;
    r.root_rank = m.root_rank;
    if (m.op == OpType::kAllreduce) {
      r.dtype = ReductionType(m.dtype);
      int64_t n = 1;
      for (int64_t d : m.shape) n *= d;
      const int64_t bytes = n * tensorflow::DataTypeSize(r.dtype);
      if (bytes <= config_.fusion_threshold) {
        const auto group = std::make_pair(static_cast<int>(r.dtype),
                                          static_cast<int>(r.reduce_op));
        auto it = open.find(group);
        if (it != open.end() &&
            group_bytes[it->second] + bytes <= config_.fusion_threshold) {
          out[it->second].keys.push_back(key);
          group_bytes[it->second] += bytes;
          continue;
        }
        open[group] = out.size();
      }
      group_bytes.push_back(bytes);
    } else {
      if (m.op == OpType::kAllgather) {
        for (const auto& mm : metas) r.first_dims.push_back(mm.shape[0]);
      }
      group_bytes.push_back(0);
    }
    out.push_back(std::move(r));
  }
  ready_.clear();
  *progressed = true;
  if (size_ > 1) {
    Writer w;
    w.I64(static_cast<int64_t>(out.size()));
    for (const auto& r : out) WriteResponse(r, &w);
    for (int q = 1; q < size_; ++q) SendAsync(q, kTagResponse, w.buf());
  }
  for (auto& r : out) {
    if (r.kind == Response::kError) {
      ApplyError(r);
    } else {
      exec_queue_.push_back(std::move(r));
    }
  }
  return absl::OkStatus();
}

void Engine::ApplyError(const Response& r) {
  for (const auto& key : r.keys) {
    auto node = pending_.extract(key);
    if (node.empty()) continue;
    Finish(std::move(node.mapped()), absl::FailedPreconditionError(r.error));
  }
}

absl::Status Engine::StartNext() {
  Response r = std::move(exec_queue_.front());
  exec_queue_.pop_front();
  std::vector<std::unique_ptr<Request>> reqs;
  for (const auto& key : r.keys) {
    auto node = pending_.extract(key);
    if (node.empty()) {
      // Put back what was taken so that Break() fails it.
      for (auto& q : reqs) pending_.emplace(q->key, std::move(q));
      return absl::InternalError(
          absl::StrCat("hpc_ops: the coordinator scheduled ", DisplayKey(key),
                       " which rank ", rank_, " has not submitted"));
    }
    reqs.push_back(std::move(node.mapped()));
  }
  switch (r.op) {
    case OpType::kAllreduce:
      current_ = std::make_unique<AllreduceExecution>(
          std::move(reqs), data_, rank_, size_, r.dtype, r.reduce_op, &fusion_,
          &scratch_);
      break;
    case OpType::kBroadcast:
      current_ = std::make_unique<BroadcastExecution>(
          std::move(reqs), data_, rank_, size_, r.root_rank);
      break;
    case OpType::kAllgather:
      current_ = std::make_unique<AllgatherExecution>(
          std::move(reqs), data_, rank_, size_, std::move(r.first_dims));
      break;
  }
  last_progress_ = Clock::now();
  return current_->Start();
}

absl::Status Engine::ProgressExecution(bool* progressed) {
  *progressed = false;
  while (true) {
    if (current_ == nullptr) {
      if (exec_queue_.empty()) return absl::OkStatus();
      *progressed = true;
      TF_RETURN_IF_ERROR(StartNext());
    }
    bool p = false, finished = false;
    TF_RETURN_IF_ERROR(current_->Progress(&p, &finished));
    if (p) {
      *progressed = true;
      last_progress_ = Clock::now();
    }
    if (!finished) return absl::OkStatus();
    std::vector<std::unique_ptr<Request>> reqs =
        std::move(current_->requests());
    current_.reset();
    // Release an unusually large scratch/fusion buffer.
    const int64_t keep = std::max<int64_t>(config_.fusion_threshold, 64 << 20);
    fusion_.ShrinkTo(keep);
    scratch_.ShrinkTo(keep);
    stat_operations_.fetch_add(1, std::memory_order_relaxed);
    stat_tensors_.fetch_add(static_cast<int64_t>(reqs.size()),
                            std::memory_order_relaxed);
    int64_t in_place = 0;
    for (const auto& r : reqs) {
      in_place += r->op == OpType::kAllreduce && r->input.NumElements() > 0 &&
                  r->output.tensor_data().data() ==
                      r->input.tensor_data().data();
    }
    stat_in_place_.fetch_add(in_place, std::memory_order_relaxed);
    for (auto& r : reqs) Finish(std::move(r), absl::OkStatus());
  }
}

void Engine::CheckDeadlines() {
  const auto now = Clock::now();
  if (now - last_deadline_check_ < kDeadlineCheckInterval) return;
  last_deadline_check_ = now;
  const double timeout = config_.timeout_seconds;
  const std::string limit =
      absl::StrCat("HPC_OPS_TIMEOUT_SECONDS=", timeout, " s");
  if (current_ != nullptr) {
    if (Seconds(now - last_progress_) > timeout) {
      std::vector<int> ranks = current_->WaitingOn();
      std::string who = (ranks.empty() || ranks[0] < 0)
                            ? std::string("the other processes")
                            : absl::StrCat("rank(s) ", RanksString(ranks));
      Break(absl::DeadlineExceededError(
                absl::StrCat(current_->Describe(), ": no data from ", who,
                             " within ", limit, " (rank ", rank_,
                             " waited); a process may have died or "
                             "stopped")),
            /*tell_others=*/true);
    }
    return;
  }
  if (rank_ == 0) {
    for (const auto& kv : table_) {
      const Entry& e = kv.second;
      if (e.count == size_) continue;
      const auto since = std::max(e.first, last_progress_);
      if (Seconds(now - since) <= timeout) continue;
      std::vector<int> missing, present;
      for (int r = 0; r < size_; ++r)
        (e.has[r] ? present : missing).push_back(r);
      const TensorMeta& m = e.metas[present[0]];
      Break(absl::DeadlineExceededError(absl::StrCat(
                OpTypeName(m.op), " ", DisplayKey(kv.first), ": rank(s) ",
                RanksString(missing), " did not submit it within ", limit,
                " (rank(s) ", RanksString(present),
                " did); a process may "
                "have died, stopped issuing collectives, or issued different "
                "ones")),
            /*tell_others=*/true);
      return;
    }
    return;
  }
  // Worker: the coordinator decides everything; blame it if it stays silent.
  if (pending_.empty() || !exec_queue_.empty()) return;
  const Request* oldest = nullptr;
  for (const auto& kv : pending_) {
    if (oldest == nullptr || kv.second->enqueued < oldest->enqueued) {
      oldest = kv.second.get();
    }
  }
  const auto since =
      std::max({oldest->enqueued, last_progress_, last_response_});
  if (Seconds(now - since) > timeout + kWorkerGraceSeconds) {
    Break(absl::DeadlineExceededError(absl::StrCat(
              OpTypeName(oldest->op), " ", DisplayKey(oldest->key),
              ": no answer from the coordinator (rank 0) within ", limit,
              " (rank ", rank_, " waited); rank 0 may have died or stopped")),
          /*tell_others=*/true);
  }
}

void Engine::Bury(Request* r) {
  // MPI may still read or write these buffers (a message that never
  // completed): keep them alive for the life of the process.
  if (r->input.IsInitialized()) graveyard_.push_back(r->input);
  if (r->output.IsInitialized()) graveyard_.push_back(r->output);
}

void Engine::FailAll(const absl::Status& s) {
  if (current_ != nullptr) {
    for (auto& r : current_->requests()) {
      Bury(r.get());
      absl::Status rs = ForRequest(*r, s);
      Finish(std::move(r), rs);
    }
    current_.reset();
  }
  exec_queue_.clear();
  for (auto& kv : pending_) {
    absl::Status rs = ForRequest(*kv.second, s);
    Finish(std::move(kv.second), rs);
  }
  pending_.clear();
  table_.clear();
  ready_.clear();
}

void Engine::Break(const absl::Status& s, bool tell_others) {
  if (is_broken_) return;
  is_broken_ = true;
  absl::Status status = s;
  std::fprintf(stderr, "hpc_ops: rank %d: collectives stopped: %s\n", rank_,
               std::string(status.message()).c_str());
  {
    std::lock_guard<std::mutex> lock(mu_);
    broken_ = status;
  }
  if (tell_others && use_mpi_) {
    Writer w;
    w.I32(static_cast<int32_t>(status.code()));
    w.Str(std::string(status.message()));
    for (int q = 0; q < size_; ++q) {
      if (q != rank_) SendAsync(q, kTagAbort, w.buf());
    }
  }
  FailAll(status);
}

void Engine::Idle(bool progressed) {
  const auto now = Clock::now();
  if (progressed) {
    last_activity_ = now;
    return;
  }
  const bool waiting =
      !is_broken_ && (current_ != nullptr || !exec_queue_.empty() ||
                      !pending_.empty() || !sends_.empty());
  // Spin (yielding) for a while after the last progress: the next message,
  // or the next collective of a training step, usually comes within
  // microseconds, and waking a sleeping thread costs more than that.
  if (now - last_activity_ < (waiting ? kSpinWindow : kIdleSpinWindow)) {
    if (queue_size_.load(std::memory_order_relaxed) == 0) sched_yield();
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  const auto wait =
      waiting ? Clock::duration(kWaitingPoll) : Clock::duration(kIdlePoll);
  wake_.wait_for(lock, wait,
                 [this] { return !queue_.empty() || shutdown_requested_; });
}

void Engine::Finalize() {
  if (!use_mpi_) return;
  if (is_broken_ || current_ != nullptr) {
    // Messages to a dead or silent process may never complete, and
    // MPI_Finalize would wait for them (and for that process).
    return;
  }
  // Let the last control messages go out, within the timeout.
  const auto deadline =
      Clock::now() +
      std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(config_.timeout_seconds));
  while (!sends_.empty() && Clock::now() < deadline) {
    ProgressSends();
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  if (!sends_.empty()) return;
  if (owns_mpi_) {
    MPI_Finalize();  // also frees the communicators
  } else {
    MPI_Comm_free(&ctrl_);
    MPI_Comm_free(&data_);
  }
}

Engine* GetEngine() {
  static Engine* engine = new Engine();  // never destroyed: see Shutdown()
  return engine;
}

}  // namespace

absl::Status EnsureInitialized() { return GetEngine()->Initialize(); }
int Rank() { return GetEngine()->rank(); }
int Size() { return GetEngine()->size(); }
int LocalRank() { return GetEngine()->local_rank(); }
void Enqueue(std::unique_ptr<Request> request) {
  GetEngine()->Enqueue(std::move(request));
}
void Shutdown() { GetEngine()->Shutdown(); }
void Stats(int64_t* operations, int64_t* tensors, int64_t* in_place) {
  *operations = GetEngine()->stat_operations_.load();
  *tensors = GetEngine()->stat_tensors_.load();
  *in_place = GetEngine()->stat_in_place_.load();
}

}  // namespace collective
}  // namespace hpc_ops

// For Python's atexit (through ctypes): MPI_Finalize must run before the
// interpreter exits, on the thread that initialised MPI.
extern "C" void HpcCollectiveShutdown() { hpc_ops::collective::Shutdown(); }

// For tests and tuning (through ctypes): out[0] = data operations completed,
// out[1] = tensors they carried (more tensors than operations: fusion),
// out[2] = allreduced tensors whose result was written over their own input
// (the kernel forwarded the input buffer).
extern "C" void HpcCollectiveStats(int64_t* out) {
  hpc_ops::collective::Stats(&out[0], &out[1], &out[2]);
}
