"""Rewrite a saved model's native subgraphs into hpc_ops ops.

    from hpc_ops import rewrite
    report = rewrite.rewrite_saved_model("model", "model_fast", verify=4)
    print(report)

    new_meta_graph, report = rewrite.rewrite_meta_graph(meta_graph_def)

or `python -m hpc_ops.rewrite SRC DST [--rules ...] [--verify N] [--dry-run]`.
Inputs: TF2 and TF1 SavedModels, standalone MetaGraphDef files (.meta binary,
.pbtxt text). Rules: rms_norm, zero_out (the defaults), embedding (opt-in)
and op_map:OldOp=NewOp. See docs/rewrite.md.
"""
from hpc_ops.rewrite.core import Replacement  # noqa: F401
from hpc_ops.rewrite.core import Report  # noqa: F401
from hpc_ops.rewrite.core import RewriteError  # noqa: F401
from hpc_ops.rewrite.core import Rule  # noqa: F401
from hpc_ops.rewrite.core import Skip  # noqa: F401
from hpc_ops.rewrite.core import load_hpc_ops_libraries
from hpc_ops.rewrite.core import rewrite_meta_graph  # noqa: F401
from hpc_ops.rewrite.core import rewrite_meta_graph_file  # noqa: F401
from hpc_ops.rewrite.core import rewrite_saved_model  # noqa: F401

# The replacements' OpDefs come from the registry: load every built family.
load_hpc_ops_libraries()
