"""hpc_ops: fast TensorFlow custom ops for recommender and LLM training.

Op families (each also importable as `hpc_ops.gen_<family>_ops`, the raw
generated wrappers):
  zero_out      hpc_ops.zero_out
  rms_norm      hpc_ops.rms_norm, hpc_ops.layers.RMSNorm
  sparse_table  hpc_ops.SparseTable, hpc_ops.layers.SparseEmbedding
  collective    hpc_ops.distributed (MPI allreduce etc.), python -m hpc_ops.run
"""
__version__ = "0.1.0"

from hpc_ops.zero_out import zero_out  # noqa: F401,E402
from hpc_ops.rms_norm import rms_norm  # noqa: F401,E402
from hpc_ops.sparse_table import SparseTable  # noqa: F401,E402
from hpc_ops import layers  # noqa: F401,E402  (hpc_ops.layers.<Layer>)
from hpc_ops import distributed  # noqa: F401,E402  (loads MPI ops on first use)
