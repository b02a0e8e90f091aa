"""sparse_table persistence: tf.train.Checkpoint round trips (bit-exact,
1e6 keys with adam slots), consistent snapshots under concurrent pushes,
corrupt/truncated/mismatched checkpoints, and SavedModel serving in a fresh
process."""
import glob
import json
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

import hpc_ops
from table_snapshot import admission_counts, sorted_export


def snapshot(t):
  keys, values, slots, counters, step = sorted_export(t.export())
  return {"keys": keys, "values": values, "slots": slots, "counters": counters,
          "step": int(step)}


def assert_bit_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.shape == y.shape, k
    if x.dtype == np.float32:  # compare bits (NaN payloads, -0.0 included)
      x, y = x.view(np.uint32), y.view(np.uint32)
    np.testing.assert_array_equal(x, y, err_msg=k)


def test_checkpoint_roundtrip_1e6_keys_adam_is_bit_exact(tmp_path):
  n, dim = 1_000_000, 4
  rng = np.random.default_rng(0)
  keys = (np.arange(n, dtype=np.int64) * 0x9E3779B97F4A7C1) ^ 0x5DEECE66D
  t = hpc_ops.SparseTable(dim, optimizer="adam", track_usage=True, seed=7,
                          initializer="truncated_normal", init_scale=0.1)
  for part in np.array_split(keys, 4):
    t.pull(part)
  # Two pushes for half the keys, one for the rest: per-row adam steps,
  # frequencies and last steps differ.
  g = rng.normal(size=(n, dim)).astype(np.float32)
  t.push(keys, g, 0.01)
  t.push(keys[: n // 2], g[: n // 2] * 3, 0.02)
  saved = snapshot(t)
  assert len(saved["keys"]) == n and saved["step"] == 2
  assert set(np.unique(saved["counters"][:, 0])) == {1, 2}

  ckpt = tf.train.Checkpoint(table=t)
  path = ckpt.save(str(tmp_path / "ckpt"))
  # Change everything, then restore: the saved key set comes back exactly.
  t.push(keys[:1000], g[:1000], 0.5)
  t.pull(np.arange(5000, dtype=np.int64))
  ckpt.restore(path).assert_consumed()
  assert_bit_equal(snapshot(t), saved)

  # Into a fresh table with another shard count.
  t2 = hpc_ops.SparseTable(dim, optimizer="adam", track_usage=True, seed=7,
                           initializer="truncated_normal", init_scale=0.1,
                           num_shards=16)
  tf.train.Checkpoint(table=t2).restore(path).assert_consumed()
  assert_bit_equal(snapshot(t2), saved)
  # Training continues identically in both.
  t.push(keys[:10], g[:10], 0.01)
  t2.push(keys[:10], g[:10], 0.01)
  assert_bit_equal(snapshot(t), snapshot(t2))


def test_snapshot_is_consistent_under_concurrent_pushes(tmp_path):
  """Adagrad with unit gradients: a row pushed t times has accumulator 1 + t
  and value -sum_{i<=t} 1/sqrt(1 + i). Every exported row must satisfy
  that pair (values and slots from the same moment) while pushes run."""
  n, steps = 4000, 60
  t = hpc_ops.SparseTable(2, optimizer="adagrad", initializer="zeros",
                          optimizer_options={"initial_accumulator_value": 1.0,
                                             "epsilon": 0.0})
  keys = tf.constant(np.arange(n, dtype=np.int64) * 7)
  ones = tf.ones([n, 2])
  t.pull(keys)
  expected = np.zeros(steps + 1, np.float32)
  acc = np.float32(1.0)
  for i in range(1, steps + 1):
    acc = np.float32(acc + 1)
    expected[i] = np.float32(expected[i - 1] - np.float32(1) / np.sqrt(acc))
  done = threading.Event()
  errors, checked = [], []

  def pusher():
    for _ in range(steps):
      t.push(keys, ones, 1.0)
    done.set()

  def exporter():
    try:
      while True:
        finished = done.is_set()
        s = snapshot(t)
        pushes = s["slots"][:, 0, 0] - 1.0
        assert np.array_equal(pushes, np.round(pushes))
        np.testing.assert_allclose(s["values"][:, 0], expected[pushes.astype(int)],
                                   rtol=1e-6)
        assert np.array_equal(s["values"][:, 0], s["values"][:, 1])
        checked.append(1)
        if finished:
          return
    except Exception as e:  # reported below
      errors.append(e)
      done.set()

  # Daemon threads and bounded joins: a deadlock between exports and pushes
  # fails the test instead of hanging it.
  threads = [threading.Thread(target=f, daemon=True) for f in (pusher, exporter)]
  for th in threads:
    th.start()
  for th in threads:
    th.join(timeout=120)
  assert not any(th.is_alive() for th in threads), "export/push deadlock"
  assert not errors, errors
  assert len(checked) >= 2
  np.testing.assert_allclose(snapshot(t)["values"][:, 0], expected[steps], rtol=1e-6)


@pytest.fixture
def saved_table(tmp_path):
  t = hpc_ops.SparseTable(3, optimizer="ftrl", seed=1)
  t.pull(np.arange(2000, dtype=np.int64))
  t.push(np.arange(100, dtype=np.int64), np.ones((100, 3), np.float32), 0.1)
  ckpt = tf.train.Checkpoint(table=t)
  return t, ckpt, ckpt.save(str(tmp_path / "ckpt"))


def _data_file(path):
  files = glob.glob(path + ".data-*")
  assert len(files) == 1
  return files[0]


def test_corrupted_checkpoint_is_a_clean_error(saved_table):
  t, ckpt, path = saved_table
  before = snapshot(t)
  data = _data_file(path)
  with open(data, "r+b") as f:
    raw = bytearray(f.read())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    f.seek(0)
    f.write(raw)
  t.pull([999999])  # changes the table; a failed restore must not undo it
  changed = snapshot(t)
  with pytest.raises(tf.errors.DataLossError, match="(?i)checksum|crc|corrupt"):
    ckpt.restore(path)
  assert_bit_equal(snapshot(t), changed)
  assert len(before["keys"]) + 1 == len(changed["keys"])


def test_truncated_checkpoint_is_a_clean_error(saved_table):
  t, ckpt, path = saved_table
  data = _data_file(path)
  size = os.path.getsize(data)
  with open(data, "r+b") as f:
    f.truncate(size // 3)
  before = snapshot(t)
  # TensorFlow's checkpoint reader reports a short read as an IndexError.
  with pytest.raises((tf.errors.OpError, IndexError)):
    ckpt.restore(path)
  assert_bit_equal(snapshot(t), before)


def test_missing_checkpoint_files_are_a_clean_error(saved_table):
  t, ckpt, path = saved_table
  os.remove(path + ".index")
  with pytest.raises((tf.errors.NotFoundError, tf.errors.DataLossError, ValueError)):
    ckpt.restore(path)


def test_restore_into_a_table_of_another_shape_fails_cleanly(saved_table):
  _, _, path = saved_table
  other_dim = hpc_ops.SparseTable(5, optimizer="ftrl")
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match="values have dim 3 but the table has dim 5"):
    tf.train.Checkpoint(table=other_dim).restore(path)
  other_opt = hpc_ops.SparseTable(3, optimizer="sgd")
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"slots must have shape \[2000, 0, 3\] for optimizer 'sgd'"):
    tf.train.Checkpoint(table=other_opt).restore(path)
  assert int(other_dim.size()) == 0 and int(other_opt.size()) == 0


def test_checkpoint_manager_keeps_the_previous_checkpoint(tmp_path):
  t = hpc_ops.SparseTable(2, optimizer="sgd", initializer="zeros")
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(table=t),
                                       str(tmp_path), max_to_keep=2)
  t.push([1], [[1.0, 1.0]], 1.0)
  first = manager.save()
  t.push([1], [[1.0, 1.0]], 1.0)
  second = manager.save()
  # A save that dies half way leaves temporary files; both checkpoints load.
  with open(second + ".data-00000-of-00001.tempstate123", "wb") as f:
    f.write(b"partial")
  t3 = hpc_ops.SparseTable(2, optimizer="sgd", initializer="zeros")
  tf.train.Checkpoint(table=t3).restore(first)
  np.testing.assert_array_equal(t3.pull([1]).numpy(), [[-1.0, -1.0]])
  tf.train.Checkpoint(table=t3).restore(manager.latest_checkpoint)
  np.testing.assert_array_equal(t3.pull([1]).numpy(), [[-2.0, -2.0]])


def test_checkpoint_keeps_admission_counts(tmp_path):
  t = hpc_ops.SparseTable(4, admission_min_count=3, seed=1, num_shards=8)
  t.pull([5, 5, 7, 9, 9, 9])  # 5 seen twice, 7 once, 9 admitted
  path = tf.train.Checkpoint(table=t).save(str(tmp_path / "ckpt"))
  t.pull([5, 7, 7])  # after the save: 5 and 7 admitted
  assert int(t.size()) == 3
  tf.train.Checkpoint(table=t).restore(path).assert_consumed()
  assert t.export().keys.numpy().tolist() == [9]
  assert admission_counts(t) == {5: 2, 7: 1}
  fresh = hpc_ops.SparseTable(4, admission_min_count=3, seed=1, num_shards=2)
  tf.train.Checkpoint(table=fresh).restore(path).assert_consumed()
  assert admission_counts(fresh) == {5: 2, 7: 1}
  fresh.pull([5])  # the third occurrence, counted across the restore
  assert sorted(fresh.export().keys.numpy().tolist()) == [5, 9]
  # A table without admission takes the rows and has no use for the counts.
  plain = hpc_ops.SparseTable(4, seed=1)
  tf.train.Checkpoint(table=plain).restore(path).expect_partial()
  assert plain.export().keys.numpy().tolist() == [9]
  # A SavedModel restores the counts too.
  module = tf.Module()
  module.table = t
  tf.saved_model.save(module, str(tmp_path / "saved"))
  loaded = tf.saved_model.load(str(tmp_path / "saved"))
  assert admission_counts(loaded.table) == {5: 2, 7: 1}


class _Served(tf.Module):

  def __init__(self, table):
    super().__init__()
    self.table = table

  @tf.function(input_signature=[tf.TensorSpec([None], tf.int64)])
  def serve(self, keys):
    return {"values": self.table.pull(keys, insert_missing=False)}

  @tf.function(input_signature=[])
  def size(self):
    return self.table.size()


def test_saved_model_serves_the_table_in_a_fresh_process(tmp_path, fresh_python):
  t = hpc_ops.SparseTable(4, optimizer="adagrad", seed=3)
  keys = np.arange(0, 300, 3, dtype=np.int64)
  t.pull(keys)
  t.push(keys, np.random.default_rng(1).normal(size=(100, 4)).astype(np.float32), 0.5)
  module = _Served(t)
  probe = np.array([0, 3, 297, 1, -5, 2**60], np.int64)  # last three unknown
  expected = module.serve(tf.constant(probe))["values"].numpy()
  path = str(tmp_path / "served")
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
  proc = fresh_python("""
      import json, numpy as np, tensorflow as tf
      import hpc_ops
      m = tf.saved_model.load(%r)
      keys = tf.constant(%r, tf.int64)
      out = m.signatures["serving_default"](keys=keys)["values"]
      out2 = m.serve(keys)["values"]
      assert np.array_equal(out.numpy(), out2.numpy())
      print(json.dumps({"values": out.numpy().tolist(), "size": int(m.size())}))
  """ % (path, probe.tolist()))
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["size"] == 100  # serving pulls never insert
  np.testing.assert_array_equal(np.array(result["values"], np.float32), expected)


def test_saved_model_of_a_keras_model_with_the_layer(tmp_path, fresh_python):
  import keras
  ids = keras.Input(shape=(3,), dtype="int64")
  emb = hpc_ops.layers.SparseEmbedding(4, combiner="sum", seed=5)
  model = keras.Model(ids, keras.layers.Dense(1)(emb(ids)))
  batch = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
  model.compile(optimizer="adam", loss="mse")
  model.fit(batch, np.ones((2, 1), np.float32), epochs=2, verbose=0)

  class Wrapper(tf.Module):

    def __init__(self, model):
      super().__init__()
      self.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int64)])
    def serve(self, ids):
      return {"y": self.model(ids, training=False)}

  wrapper = Wrapper(model)
  expected = wrapper.serve(tf.constant(batch))["y"].numpy()
  path = str(tmp_path / "keras_served")
  tf.saved_model.save(wrapper, path, signatures={"serving_default": wrapper.serve})
  proc = fresh_python("""
      import json, tensorflow as tf
      import hpc_ops
      m = tf.saved_model.load(%r)
      y = m.signatures["serving_default"](ids=tf.constant(%r, tf.int64))["y"]
      print(json.dumps(y.numpy().tolist()))
  """ % (path, batch.tolist()))
  got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]), np.float32)
  np.testing.assert_array_equal(got, expected)
