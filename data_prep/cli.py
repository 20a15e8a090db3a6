"""python -m data_prep {run,prepare,dedup,train-tokenizer,tokenize,finalize,config} --help"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COMMANDS = {
    "run": ("every stage, in order (resumes where a killed run stopped)",
            ["prepare", "duplicate_ids", "exact_dedup", "near_dedup", "merge_dedup", "train_tokenizer", "tokenize", "finalize"]),
    "prepare": ("read, clean, filter; text and id hashes and MinHash signatures per input task", ["prepare"]),
    "dedup": ("exact and MinHash near-duplicate deduplication over the whole corpus; repeated ids",
              ["duplicate_ids", "exact_dedup", "near_dedup", "merge_dedup"]),
    "train-tokenizer": ("train SentencePiece or byte-level BPE (tokenizer.type) on a bounded sample, or take tokenizer.existing[_model]", ["train_tokenizer"]),
    "tokenize": ("tokenize kept documents into Arrow shards", ["tokenize"]),
    "finalize": ("write shards/manifest.json, stats.json, summary.md and plots", ["finalize"]),
}


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 (got {value!r})")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m data_prep", description="Prepare pretraining data: "
                                "clean, filter, deduplicate, train a tokenizer, tokenize, shard. See data_prep/README.md.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (help_, _) in COMMANDS.items():
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("--config", type=Path, default=None,
                       help="prep config JSON (default: data_prep/configs/demo.json, the installed packages' docs)")
        c.add_argument("--out", type=Path, required=True, help="output directory (created; reruns resume in it)")
        c.add_argument("--executor", choices=["local", "ray"], default=None, help="override executor.type")
        c.add_argument("--workers", type=_positive, default=None, help="override executor.workers (default: all cores)")
        c.add_argument("--ray-address", default=None, help="override executor.ray_address, e.g. 'auto'")
        c.add_argument("--strict", action="store_true",
                       help="exit 1 when the finished run lost input (a file not read to its end, bad records) "
                            "or found records that repeat an id")
    c = sub.add_parser("config", help="print the resolved config (defaults filled in) as JSON",
                       description="print the resolved config (defaults filled in) as JSON")
    c.add_argument("--config", type=Path, default=None, help="prep config JSON (default: the demo config)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from data_prep.config import ConfigError, load_config
    from data_prep.executor import ExecutorError
    from data_prep.readers import ReadError
    from data_prep.stages import STAGES, StageError, open_context
    from data_prep.stats import dump

    try:
        cfg = load_config(args.config)
        if args.command == "config":
            print(dump(cfg.model_dump(mode="json")), end="")
            return 0
        ex_cfg = cfg.executor
        kind = args.executor or ex_cfg.type
        workers = args.workers or ex_cfg.workers
        from data_prep.executor import make_executor

        t0 = time.time()
        executor = make_executor(kind, workers, args.ray_address or ex_cfg.ray_address)
        ctx = open_context(cfg, args.out, executor)
        wanted = COMMANDS[args.command][1]
        for stage in STAGES:
            if stage.name in wanted:
                stage.run(ctx, executor)
    except (ConfigError, ExecutorError, ReadError, StageError) as e:
        for line in str(e).splitlines():  # a config names each wrong field on a line of its own
            print(f"error: {line}", file=sys.stderr)
        return 2
    out = args.out
    print(f"done in {time.time() - t0:.1f}s: {args.command}", file=sys.stderr)
    if "finalize" not in wanted:
        print(f"outputs under {out}")
        return 0
    print(f"shards + manifest: {out / 'shards' / 'manifest.json'}")
    print(f"tokenizer:         {out / 'tokenizer'}")
    print(f"stats:             {out / 'stats.json'}  summary: {out / 'summary.md'}  plots: {out / 'plots'}")
    problems = input_problems(json.loads((out / "stats.json").read_text()))
    for line in problems:
        print(f"warning: {line}", file=sys.stderr)
    if problems and args.strict:
        print(f"error: --strict: the input has {len(problems)} problem(s), named above (details in "
              f"{out / 'summary.md'})", file=sys.stderr)
        return 1
    return 0


# Reasons a record was not used that say nothing is wrong with the input: an empty text, and a
# .py file with no docstring (text_files and site_packages read only the docstrings of Python
# files), are valid records with nothing to keep. They are counted, not warned about.
NOTHING_TO_KEEP = ("bad_input:empty", "bad_input:no_docstrings")


def input_problems(stats: dict) -> list[str]:
    """One line per file not read to its end, one counting the bad records by reason (not those
    in NOTHING_TO_KEEP), and one counting the records that repeat an id."""
    from data_prep.stats import repeated_ids

    lines = [f"{f['file']} could not be read to its end: {f['records_read']:,} records read before the cut; "
             "the rest of the file is not in the output" for f in stats["accounting"].get("incomplete_files", [])]
    bad = {r.split(":", 1)[1]: n for r, n in stats["reasons"].items()
           if r.startswith("bad_input:") and r not in (*NOTHING_TO_KEEP, "bad_input:truncated_file")}
    if bad:
        lines.append(f"{sum(bad.values()):,} bad input record(s) were not used: "
                     + ", ".join(f"{reason} {n:,}" for reason, n in sorted(bad.items()))
                     + " (examples with file and line in stats.json bad_input_examples)")
    if stats["duplicate_ids"]["records"]:
        lines.append(f"{repeated_ids(stats['duplicate_ids'])} (examples with file and line in stats.json duplicate_ids)")
    return lines
