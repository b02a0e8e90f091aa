// See docs in ../ops/collective_ops.cc.
//
// The process-wide collective runtime: one background thread owns MPI (it
// initialises it with MPI_THREAD_FUNNELED and is the only thread that calls
// it). Kernels hand it Requests; it negotiates with the other processes which
// named tensors are ready everywhere (rank 0 coordinates), fuses small
// allreduces into one buffer, moves the data with nonblocking MPI calls that
// it polls against a deadline, and calls each request's `done` exactly once.
//
// Configuration (environment, read once at initialisation):
//   HPC_OPS_TIMEOUT_SECONDS    how long to wait for another process before
//                              every pending and later collective fails with
//                              DeadlineExceeded (default 30).
//   HPC_OPS_FUSION_THRESHOLD   bytes: allreduces of the same reduction type
//                              and op that are ready together are packed into
//                              one buffer of at most this size (default
//                              4 MiB; 0 disables fusion).
//   HPC_OPS_CYCLE_TIME_MS      how long the coordinator may hold tensors that
//                              are ready on every process while other tensors
//                              are ready on only some, to fuse them (default
//                              1; 0 never waits).
//   HPC_OPS_MPI                1: use MPI even when no MPI launcher is
//                              detected (an MPI singleton); 0: never use MPI
//                              (size 1). Default: use MPI when started by
//                              mpirun/mpiexec/srun or when MPI is already
//                              initialised in the process.
#ifndef HPC_OPS_KERNELS_COLLECTIVE_OP_RUNTIME_H_
#define HPC_OPS_KERNELS_COLLECTIVE_OP_RUNTIME_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "kernels/collective_op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace hpc_ops {
namespace collective {

enum class OpType : int { kAllreduce = 0, kBroadcast, kAllgather };

const char* OpTypeName(OpType op);      // "HpcAllreduce", ...
const char* ReduceOpName(ReduceOp op);  // "sum", ...

// One collective call on this process.
struct Request {
  OpType op = OpType::kAllreduce;
  // The matching name: the tensor_name attr, or the node name.
  std::string name;
  // name + "#" + how many earlier requests had this name (set by Enqueue).
  std::string key;
  tensorflow::OpKernelContext* ctx = nullptr;
  tensorflow::Tensor input;
  // Broadcast: allocated by the kernel (shares its buffer with the op's
  // output 0). Allreduce: likewise, unless output_pending. Allgather:
  // allocated by the runtime.
  tensorflow::Tensor output;
  // Allreduce: the runtime allocates the op's output `output_index` when the
  // operation starts.
  bool output_pending = false;
  int output_index = 0;
  ReduceOp reduce_op = ReduceOp::kSum;
  int root_rank = 0;
  std::chrono::steady_clock::time_point enqueued;
  std::function<void()> done;
};

// Starts the runtime on first use (initialising MPI) and waits until it is
// ready; returns the initialisation error, or DeadlineExceeded when MPI did
// not come up within HPC_OPS_TIMEOUT_SECONDS.
absl::Status EnsureInitialized();

// Valid after EnsureInitialized() returned OK.
int Rank();
int Size();
int LocalRank();

// Takes the request; its `done` is called exactly once (on this or another
// thread), after the op's status was set on its context.
void Enqueue(std::unique_ptr<Request> request);

// Fails pending requests, finalises MPI (when the runtime initialised it) and
// stops the background thread. Later collectives fail with Aborted.
void Shutdown();

// Data operations completed so far, the tensors they carried, and the
// allreduced tensors whose result overwrote their own input.
void Stats(int64_t* operations, int64_t* tensors, int64_t* in_place);

}  // namespace collective
}  // namespace hpc_ops

#endif  // HPC_OPS_KERNELS_COLLECTIVE_OP_RUNTIME_H_
