"""Keras 3 layers built on hpc_ops (`hpc_ops.layers.<Layer>`)."""
