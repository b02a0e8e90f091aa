"""A sparse table's state in forms tests compare: its export in key order
(rows may be stored in any order) and its admission counts as a dict."""
import numpy as np

from hpc_ops import gen_sparse_table_ops


def sorted_export(snap):
  """A TableSnapshot as numpy arrays in key order: [keys, values, slots,
  counters, step]."""
  order = np.argsort(snap.keys.numpy(), kind="stable")
  return [snap.keys.numpy()[order], snap.values.numpy()[order],
          snap.slots.numpy()[order], snap.counters.numpy()[order],
          snap.step.numpy()]


def admission_counts(table):
  """{key: count} of the admission counts of `table` (a SparseTable, or the
  table of a loaded SavedModel: anything with its resource_handle)."""
  adm = gen_sparse_table_ops.sparse_table_export_admission(
      table.resource_handle)
  return dict(zip(adm.keys.numpy().tolist(), adm.counts.numpy().tolist()))
