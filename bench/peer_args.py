"""The command line both peer loops (bench/bare_deepspeed_loop.py, bench/plain_torch_loop.py)
take from bench/train_throughput.py: the same profile, data, steps and overrides as our run."""

import argparse


def peer_parser(doc: str, profile_help: str = "JSON profile (see ds_configs/)") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help=profile_help)
    p.add_argument("--manifest", required=True, help="prepared data: shards/manifest.json")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to time")
    p.add_argument("--out", required=True, help="JSON file for the step times (written by rank 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="profile override, as for pipeline.train (repeatable)")
    return p
