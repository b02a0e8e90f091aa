"""Checks a rewritten SavedModel against the original: both are loaded (with
every hpc_ops op library registered) in a fresh process, each signature is
fed N random batches that match its input specs, and every output is
compared with a tolerance that depends on its dtype.

`verify_saved_models(original, rewritten, n)` runs the check in a child
process (`python -m hpc_ops.rewrite.verify ORIGINAL REWRITTEN N`), so the
models load in a process that has never seen them, as a server would.
"""
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

# dtype name -> (rtol, atol). The rewritten ops compute the same math with
# another summation order (and float32 statistics for 16-bit inputs), so
# results agree to a few units in the last place of the output type.
TOLERANCES = {
    "float64": (1e-9, 1e-9),
    "float32": (1e-4, 1e-5),
    "float16": (2e-2, 2e-2),
    "bfloat16": (5e-2, 5e-2),
    "complex64": (1e-4, 1e-5),
    "complex128": (1e-9, 1e-9),
}
_MARK = "HPC_OPS_VERIFY_RESULT "


def verify_saved_models(original,
                        rewritten,
                        n,
                        seed=0,
                        timeout=1200,
                        int_limit=None):
  """Returns a JSON-able dict: {"ok": bool, "signatures": [...],
  "error": str or None}. `int_limit`: random integer inputs are drawn below
  min(4, int_limit) (a rule's bound, e.g. the smallest vocabulary of a
  rewritten embedding lookup)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [
      sys.executable, "-m", "hpc_ops.rewrite.verify", original, rewritten,
      str(int(n)), "--seed",
      str(int(seed))
  ]
  if int_limit is not None:
    cmd += ["--int-limit", str(int(int_limit))]
  try:
    proc = subprocess.run(cmd,
                          capture_output=True,
                          text=True,
                          env=env,
                          timeout=timeout)
  except subprocess.TimeoutExpired:
    return {
        "ok": False,
        "batches": n,
        "signatures": [],
        "error": "verification timed out after %d s" % timeout
    }
  for line in proc.stdout.splitlines():
    if line.startswith(_MARK):
      return json.loads(line[len(_MARK):])
  return {
      "ok":
          False,
      "batches":
          n,
      "signatures": [],
      "error":
          "the verification process failed (rc=%d): %s" %
          (proc.returncode, proc.stderr.strip()[-2000:])
  }


def format_result(res):
  """Report lines for a verify_saved_models result."""
  lines = [
      "verification (%s random batches per signature): %s" %
      (res.get("batches"), "PASSED" if res["ok"] else "FAILED")
  ]
  if res.get("int_high", 4) < 4:
    lines.append("  integer inputs drawn in [0, %d): the smallest vocabulary "
                 "of a rewritten lookup" % res["int_high"])
  if res.get("error"):
    lines.append("  error: " + res["error"])
  for sig in res.get("signatures", []):
    lines.append(
        "  signature %r (%s): %s" %
        (sig["name"], sig["meta_graph"], "ok" if sig["ok"] else "MISMATCH"))
    for out in sig.get("outputs", []):
      lines.append(
          "    %s %s: max |diff| %.3g (rtol %g, atol %g)%s" %
          (out["name"], out["dtype"], out["max_abs_diff"], out["rtol"],
           out["atol"], "" if out["ok"] else "  <-- " + out.get("why", "")))
    for note in sig.get("notes", []):
      lines.append("    " + note)
  return lines


# ---------------------------------------------------------------------------
# Child process
# ---------------------------------------------------------------------------


def _random_value(spec, rng, batch, int_high=4):
  shape = []
  dims = spec.shape.as_list() if spec.shape.rank is not None else [None]
  for i, d in enumerate(dims):
    shape.append(d if d is not None else (batch if i == 0 else 3))
  dt = spec.dtype
  if dt.is_floating or dt.is_complex:
    x = rng.standard_normal(shape)
    return tf.cast(tf.constant(x), dt)
  if dt.is_bool:
    return tf.constant(rng.random(shape) < 0.5)
  if dt.is_integer:
    # Small non-negative values: valid as ids, indices and counts.
    return tf.cast(tf.constant(rng.integers(0, int_high, size=shape)), dt)
  if dt == tf.string:
    words = np.array([b"a", b"bc", b"def", b""], dtype=object)
    return tf.constant(words[rng.integers(0, 4, size=shape)])
  raise TypeError("cannot make random inputs of dtype %s" % dt.name)


def _compare(name, a, b):
  out = {
      "name": name,
      "dtype": a.dtype.name,
      "max_abs_diff": 0.0,
      "rtol": 0.0,
      "atol": 0.0,
      "ok": True
  }
  if a.dtype != b.dtype or a.shape != b.shape:
    out.update(
        ok=False,
        max_abs_diff=float("inf"),
        why="dtype/shape %s%s vs %s%s" %
        (a.dtype.name, a.shape.as_list(), b.dtype.name, b.shape.as_list()))
    return out
  an, bn = a.numpy(), b.numpy()
  if a.dtype.is_floating or a.dtype.is_complex:
    rtol, atol = TOLERANCES.get(a.dtype.name, (1e-4, 1e-5))
    an = an.astype(np.complex128 if a.dtype.is_complex else np.float64)
    bn = bn.astype(an.dtype)
    same_nan = np.array_equal(np.isnan(an), np.isnan(bn))
    finite = np.isfinite(an) & np.isfinite(bn)
    diff = np.abs(an - bn)[finite]
    out["max_abs_diff"] = float(diff.max()) if diff.size else 0.0
    out.update(rtol=rtol, atol=atol)
    ok = same_nan and np.array_equal(an[~finite & ~np.isnan(an)],
                                     bn[~finite & ~np.isnan(bn)])
    ok = ok and np.allclose(an[finite], bn[finite], rtol=rtol, atol=atol)
    if not ok:
      out.update(
          ok=False,
          why="outside tolerance" if same_nan else "NaN positions differ")
    return out
  if not np.array_equal(an, bn):
    out.update(ok=False, max_abs_diff=float("nan"), why="values differ")
  return out


def _run(original, rewritten, n, seed, int_limit=None):
  from hpc_ops.rewrite import core
  failed = core.load_hpc_ops_libraries()
  sm, _, _ = core.read_saved_model(original)
  result = {"ok": True, "batches": n, "signatures": [], "error": None}
  int_high = 4 if int_limit is None else max(1, min(4, int_limit))
  result["int_high"] = int_high
  if failed:
    result["notes"] = [
        "op library not loaded: %s: %s" % kv for kv in sorted(failed.items())
    ]
  any_sig = False
  for mg in sm.meta_graphs:
    tags = list(mg.meta_info_def.tags) or None
    label = ",".join(tags or []) or "untagged"
    if not mg.signature_def:
      continue
    models = [tf.saved_model.load(p, tags=tags) for p in (original, rewritten)]
    names = sorted(set(models[0].signatures.keys()) & set(mg.signature_def))
    for name in names:
      if name not in models[1].signatures:
        result["ok"] = False
        result["signatures"].append({
            "name": name,
            "meta_graph": label,
            "ok": False,
            "outputs": [],
            "notes": ["signature missing from the rewritten model"]
        })
        continue
      fns = [m.signatures[name] for m in models]
      _, kwargs = fns[0].structured_input_signature
      sig = {
          "name": name,
          "meta_graph": label,
          "ok": True,
          "outputs": [],
          "notes": []
      }
      worst = {}
      agreed_errors = 0
      for i in range(n):
        rng = np.random.default_rng([seed, i])
        batch = int(rng.choice([1, 2, 5, 16]))
        feed = {
            k: _random_value(s, rng, batch, int_high)
            for k, s in sorted(kwargs.items())
        }
        outs, errs = [], []
        for fn in fns:
          try:
            outs.append(fn(**feed))
            errs.append(None)
          except (tf.errors.OpError, ValueError, TypeError) as e:
            outs.append(None)
            errs.append(e)
        if errs[0] is not None or errs[1] is not None:
          if (errs[0] is None) != (errs[1] is None) or type(
              errs[0]) is not type(errs[1]):
            sig["ok"] = False
            sig["notes"].append("batch %d: original %s, rewritten %s" %
                                (i, _err(errs[0]), _err(errs[1])))
          else:
            agreed_errors += 1
          continue
        for key in sorted(outs[0]):
          if key not in outs[1]:
            sig["ok"] = False
            sig["notes"].append("output %r missing from the rewritten model" %
                                key)
            continue
          c = _compare(key, outs[0][key], outs[1][key])
          prev = worst.get(key)
          if prev is None or (prev["ok"] and not c["ok"]) or (
              prev["ok"] == c["ok"] and
              c["max_abs_diff"] > prev["max_abs_diff"]):
            worst[key] = c
          sig["ok"] = sig["ok"] and c["ok"]
      if agreed_errors:
        sig["notes"].append(
            "%d batch(es) raised the same error in both models" % agreed_errors)
        if agreed_errors == n:
          sig["ok"] = False
          sig["notes"].append("no batch ran: nothing was compared")
      sig["outputs"] = [worst[k] for k in sorted(worst)]
      result["signatures"].append(sig)
      result["ok"] = result["ok"] and sig["ok"]
      any_sig = True
  if not any_sig:
    result["ok"] = False
    result["error"] = "the model has no signature to run"
  return result


def _err(e):
  return "ran" if e is None else "raised %s: %s" % (
      type(e).__name__, str(e).splitlines()[0][:200])


def main(argv):
  import argparse
  p = argparse.ArgumentParser(prog="python -m hpc_ops.rewrite.verify")
  p.add_argument("original")
  p.add_argument("rewritten")
  p.add_argument("n", type=int)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--int-limit", type=int, default=None)
  args = p.parse_args(argv)
  try:
    res = _run(args.original, args.rewritten, args.n, args.seed,
               args.int_limit)
  except Exception as e:
    res = {
        "ok": False,
        "batches": args.n,
        "signatures": [],
        "error": "%s: %s" % (type(e).__name__, e)
    }
  sys.stdout.write(_MARK + json.dumps(res) + "\n")
  return 0 if res["ok"] else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
