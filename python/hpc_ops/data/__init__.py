"""Input pipelines for hpc_ops models (`hpc_ops.data.criteo`)."""
