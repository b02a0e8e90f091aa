"""A sparse table's export in key order, for tests that compare tables
whose rows are stored in any order."""
import numpy as np


def sorted_export(snap):
  """A TableSnapshot as numpy arrays in key order: [keys, values, slots,
  counters, step]."""
  order = np.argsort(snap.keys.numpy(), kind="stable")
  return [snap.keys.numpy()[order], snap.values.numpy()[order],
          snap.slots.numpy()[order], snap.counters.numpy()[order],
          snap.step.numpy()]
