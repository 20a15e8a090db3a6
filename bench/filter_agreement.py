"""Per-rule agreement of our quality filters with datatrove's implementations (bench only).

    python bench/filter_agreement.py --datatrove-python /tmp/dtvenv/bin/python [--mb 5]

Corpus: the demo corpus (docs, licences, docstrings of the installed packages) as jsonl,
cleaned by our clean stage. Each rule (Gopher quality, Gopher repetition, C4, FineWeb) runs
alone on every document, ours in this process and datatrove 0.10.1's in its own venv; the
script prints, per rule, the share of documents on which both make the same keep/remove
decision, and how many each removes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATATROVE = r'''
import json, sys
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter, FineWebQualityFilter
rules = {"gopher_quality": GopherQualityFilter(), "gopher_repetition": GopherRepetitionFilter(),
         "c4": C4QualityFilter(filter_no_terminal_punct=True), "fineweb": FineWebQualityFilter()}
out = {k: [] for k in rules}
for i, line in enumerate(open(sys.argv[1])):
    text = json.loads(line)
    for k, f in rules.items():
        r = f.filter(Document(text=text, id=str(i)))
        out[k].append(bool(r if isinstance(r, bool) else r[0]))
print(json.dumps(out))
'''


def decisions(texts: list[str], datatrove_python: str) -> dict[str, tuple[list[bool], list[bool]]]:
    """rule -> (our keep decisions, datatrove's), each rule alone on every text."""
    from data_prep.config import FiltersConfig
    from data_prep.filters import C4Rules, FineWebRules, GopherQuality, GopherRepetition
    from data_prep.records import Record

    fc = FiltersConfig.model_validate({"c4": {"enabled": True}, "language": {"enabled": False}})
    rules = {"gopher_quality": GopherQuality(fc.gopher_quality), "gopher_repetition": GopherRepetition(fc.gopher_repetition),
             "c4": C4Rules(fc.c4), "fineweb": FineWebRules(fc.fineweb)}
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "texts.jsonl"
        inp.write_text("".join(json.dumps(t) + "\n" for t in texts))
        # datatrove runs in its own process while ours runs here.
        p = subprocess.Popen([datatrove_python, "-c", DATATROVE, str(inp)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        # One record per text for the rules that only read it (they share its words, as in a
        # run); C4 edits the text, so it gets its own.
        recs = [Record("f", 1, "id", t) for t in texts]
        ours = {k: [(f(Record("f", 1, "id", r.text)) if k == "c4" else f(r)) is None for r in recs] for k, f in rules.items()}
        out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"datatrove run failed:\n{err[-3000:]}")
    theirs = json.loads(out.strip().splitlines()[-1])
    return {k: (ours[k], theirs[k]) for k in rules}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datatrove-python", required=True)
    ap.add_argument("--mb", type=float, default=5)
    args = ap.parse_args()
    from prep_throughput import build_corpus

    from data_prep.clean import Cleaner
    from data_prep.config import CleanConfig

    with tempfile.TemporaryDirectory() as d:
        build_corpus(Path(d) / "c", args.mb, 1)
        cleaner = Cleaner(CleanConfig())
        texts = [t for t in (cleaner.clean(json.loads(l)["text"]) for l in open(Path(d) / "c" / "part-000.jsonl")) if t]
    print(f"{len(texts)} documents; keep/remove decisions of each rule alone")
    print(f"{'rule':<20}{'agree':>8}{'ours removes':>14}{'datatrove removes':>19}")
    for k, (mine, theirs) in decisions(texts, args.datatrove_python).items():
        agree = sum(a == b for a, b in zip(mine, theirs)) / len(texts)
        print(f"{k:<20}{100 * agree:>7.1f}%{mine.count(False):>14}{theirs.count(False):>19}")


if __name__ == "__main__":
    main()
