"""Keras 3 layers built on hpc_ops (`hpc_ops.layers.<Layer>`)."""
from hpc_ops.rms_norm import RMSNorm  # noqa: F401,E402
from hpc_ops.sparse_table import SparseEmbedding  # noqa: F401,E402
