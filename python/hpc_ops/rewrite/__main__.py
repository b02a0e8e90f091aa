"""python -m hpc_ops.rewrite SRC DST [--rules ...] [--map Old=New] [--verify N]
[--dry-run] [--load LIB.so] [--json REPORT.json]

SRC is a SavedModel directory (TF2 or TF1) or a MetaGraphDef file (.meta
binary, .pbtxt text); DST must not exist. Exit status: 0 done, 1 the
verification found a mismatch (DST not written), 2 bad input or usage.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser():
  p = argparse.ArgumentParser(
      prog="python -m hpc_ops.rewrite",
      description="Replace native subgraphs of a saved model with hpc_ops ops.")
  p.add_argument("src", help="SavedModel directory or MetaGraphDef file")
  p.add_argument("dst",
                 nargs="?",
                 help="output path (must not exist); "
                 "not needed with --dry-run")
  p.add_argument("--rules",
                 default="rms_norm,zero_out",
                 help="comma-separated rules (default: rms_norm,zero_out)")
  p.add_argument("--map",
                 action="append",
                 default=[],
                 metavar="OLD=NEW",
                 help="op_map rule: replace op OLD by NEW (identical "
                 "signatures); repeatable")
  p.add_argument("--verify",
                 type=int,
                 default=0,
                 metavar="N",
                 help="run original and rewritten on N random batches per "
                 "signature in a fresh process and compare (SavedModels)")
  p.add_argument("--dry-run",
                 action="store_true",
                 help="report what would change, write nothing")
  p.add_argument("--load",
                 action="append",
                 default=[],
                 metavar="LIB.so",
                 help="load another op library (ops the model uses)")
  p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
  p.add_argument("--seed", type=int, default=0, help="seed of --verify inputs")
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  if not args.dry_run and not args.dst:
    print("error: DST is required unless --dry-run is given", file=sys.stderr)
    return 2
  import tensorflow as tf
  from hpc_ops import rewrite
  from hpc_ops.rewrite import rules as rules_lib
  try:
    for lib in args.load:
      try:
        tf.load_library(lib)
      except (tf.errors.NotFoundError, OSError) as e:
        raise rewrite.RewriteError("cannot load %s: %s" % (lib, e)) from e
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if args.map:
      rules.append("op_map:" + ",".join(args.map))
    rule_objs = rules_lib.resolve(rules)
    if os.path.isdir(args.src):
      report = rewrite.rewrite_saved_model(args.src,
                                           args.dst,
                                           rule_objs,
                                           verify=args.verify,
                                           dry_run=args.dry_run,
                                           seed=args.seed)
    else:
      report = rewrite.rewrite_meta_graph_file(args.src,
                                               args.dst,
                                               rule_objs,
                                               dry_run=args.dry_run)
      if args.verify:
        report.notes.append("verification skipped, because a MetaGraphDef "
                            "file holds no variable values to run it with "
                            "(rewrite the SavedModel instead)")
  except rewrite.RewriteError as e:
    print("error: %s" % e, file=sys.stderr)
    return 2
  print(report)
  if args.dry_run:
    print("dry run: nothing written")
  elif report.verification is None or report.verification["ok"]:
    print("wrote %s" % args.dst)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report.to_dict(), f, indent=1)
  if report.verification is not None and not report.verification["ok"]:
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
