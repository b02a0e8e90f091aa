"""The main job, tiny: examples/ctr_train.py on a few hundred generated rows,
one process and two MPI workers, including export, rewrite and reload."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "ctr_train.py")
TINY = ["--rows", "600", "--eval-rows", "400", "--vocab", "50", "--epochs",
        "1", "--table-lr", "0.1", "--lr", "3e-3", "--verbose", "0"]
GLOBAL_BATCH = 50  # the same steps for any number of workers


def run_example(tmp_path, workers):
  summary = tmp_path / "summary.json"
  cmd = [EXAMPLE] + TINY + ["--batch-size", str(GLOBAL_BATCH // workers),
                            "--work-dir", str(tmp_path / "work"),
                            "--summary-json", str(summary)]
  if workers > 1:
    cmd = [sys.executable, "-m", "hpc_ops.run", "-np", str(workers)] + cmd
  else:
    cmd = [sys.executable] + cmd
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HPC_OPS_TIMEOUT_SECONDS="120")
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "=== summary ===" in proc.stdout
  with open(summary) as f:
    return json.load(f), proc.stdout


def check(summary, workers):
  assert summary["workers"] == workers
  # Well above chance, below the planted model's optimum.
  assert 0.6 < summary["eval_auc"] <= summary["planted_optimal_auc"] + 0.02, summary
  assert summary["table_rows"] > 26  # rows were created by pulls
  assert summary["exported_predictions_equal"] is True, summary
  assert summary["exported_max_abs_diff"] < 1e-5


def test_single_process(tmp_path):
  summary, out = run_example(tmp_path, 1)
  check(summary, 1)
  assert summary["replicas_equal"] is None
  # The hand-written RMS normalisation was fused by the rewrite tool.
  assert "rms_norm" in out and "verification" in out and "PASSED" in out


def test_two_workers(tmp_path):
  summary, _ = run_example(tmp_path, 2)
  check(summary, 2)
  assert summary["replicas_equal"] is True
