"""Run under hpc_ops.run by tests/test_collective.py with a short
HPC_OPS_TIMEOUT_SECONDS: one rank dies or stops issuing collectives, and
the others must fail with a clear error within the timeout, never hang.

    failures.py kill RANK    RANK SIGKILLs itself after a first allreduce
    failures.py stop RANK    RANK sleeps (2 x timeout + 1 s), then tries again

Each surviving rank prints `RESULT rank=<r> error=<type> elapsed=<s> ...`
and exits with status 3.
"""
import os
import signal
import sys
import time

from common import hd, say, tf

mode, victim = sys.argv[1], int(sys.argv[2])
hd.init()
R = hd.rank()
timeout = float(os.environ["HPC_OPS_TIMEOUT_SECONDS"])
first = hd.allreduce(tf.ones([3]), op="sum", name="first").numpy()
assert (first == hd.size()).all(), first
say("FIRST rank=%d ok" % R)

if R == victim:
  if mode == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  time.sleep(2 * timeout + 1)  # "stop": alive, but issuing nothing

# A graph with a large and a small tensor pending at the same time, traced
# before the clock starts.
@tf.function
def step(x):
  return hd.allreduce(x, op="sum"), hd.allreduce(x[:5] * 2, op="max")


step = step.get_concrete_function(tf.TensorSpec([300_000], tf.float32))
t0 = time.time()
try:
  step(tf.ones([300_000]))
  say("RESULT rank=%d error=None" % R)
  sys.exit(0)
except tf.errors.OpError as e:
  elapsed = time.time() - t0
  say("RESULT rank=%d error=%s elapsed=%.2f message=%s"
      % (R, type(e).__name__, elapsed, e.message.replace("\n", " ")))
# Every later collective fails at once with the same error.
t1 = time.time()
try:
  hd.allreduce(tf.ones([2]), name="later")
except tf.errors.OpError as e:
  say("LATER rank=%d error=%s elapsed=%.2f message=%s"
      % (R, type(e).__name__, time.time() - t1, e.message.replace("\n", " ")))
sys.exit(3)
