"""Agreement of our quality filters with datatrove 0.10.1's, and of our word splitter with
spaCy's, on real corpora of several kinds (bench only).

    python bench/filter_agreement.py --datatrove-python .venv-bench/bin/python \\
        [--corpus prose docs markup demo] [--mb 14] [--cache runs/corpora] [--words rules]

Corpora (bench/corpora.py builds and caches them from Debian packages): English prose,
technical documentation and man pages, markup- and code-heavy text, and the demo corpus
(docs, licences and docstrings of the installed packages). Every document is cleaned by our
clean stage first. For each corpus the script prints:
- the splitter's agreement with spaCy itself (`spacy.blank("en")`, whitespace tokens left
  out, as datatrove does): the share of documents whose token lists are identical, and the
  share of lines whose sentencizer counts are identical;
- per rule (Gopher repetition, Gopher quality, C4, FineWeb), ours in this process and
  datatrove's in its own venv: the share of documents on which both make the same keep/remove
  decision, (a) each rule alone on every document and (b) in the chain, on the documents that
  reach the rule in both (passed every rule before it; C4's line edits carried on to FineWeb);
- every disagreement with the document id, both decisions and its cause: the first token
  where our words and spaCy's differ, the first line whose sentence count differs, or, where
  both are the same, that the rule itself decided differently.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RULES = ("gopher_repetition", "gopher_quality", "c4", "fineweb")  # the chain's order (filters.build_filters)

DATATROVE = r'''
import json, sys
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, C4QualityFilter, FineWebQualityFilter
rules = {"gopher_repetition": GopherRepetitionFilter(), "gopher_quality": GopherQualityFilter(),
         "c4": C4QualityFilter(filter_no_terminal_punct=True), "fineweb": FineWebQualityFilter()}

def decide(f, doc):
    r = f.filter(doc)
    return None if r is True or (isinstance(r, tuple) and r[0]) else (r[1] if isinstance(r, tuple) else "removed")

alone = {k: [] for k in rules}
chain = {k: [] for k in rules}
for i, line in enumerate(open(sys.argv[1])):
    text = json.loads(line)
    for k, f in rules.items():
        alone[k].append(decide(f, Document(text=text, id=str(i))))
    doc, out = Document(text=text, id=str(i)), None
    for k, f in rules.items():  # removal reason, or None: kept; "-": did not reach the rule
        out = decide(f, doc) if out is None else "-"
        chain[k].append(out)
print(json.dumps({"alone": alone, "chain": chain}))
'''


def our_rules(words: str = "rules") -> dict:
    from data_prep.config import FiltersConfig
    from data_prep.filters import C4Rules, FineWebRules, GopherQuality, GopherRepetition

    fc = FiltersConfig.model_validate({"c4": {"enabled": True}, "language": {"enabled": False}, "words": words})
    return {"gopher_repetition": GopherRepetition(fc.gopher_repetition, fc.words),
            "gopher_quality": GopherQuality(fc.gopher_quality, fc.words),
            "c4": C4Rules(fc.c4, fc.words), "fineweb": FineWebRules(fc.fineweb, fc.words)}


def our_decisions(texts: list[str], words: str = "rules") -> tuple[dict, dict, list[dict]]:
    """Removal reasons (None: kept) of each rule alone and in the chain ("-": not reached), and
    for each document the text each rule of the chain saw."""
    from data_prep.records import Record

    rules = our_rules(words)
    alone = {k: [] for k in rules}
    chain = {k: [] for k in rules}
    seen = []
    for t in texts:
        rec = Record("f", 1, "id", t)  # the rules that only read a text share its words, as in a run
        for k, f in rules.items():
            alone[k].append(f(Record("f", 1, "id", t) if k == "c4" else rec))  # C4 edits the text
        rec, out, saw = Record("f", 1, "id", t), None, {}
        for k, f in rules.items():
            if out is None:
                saw[k] = rec.text
            out = f(rec) if out is None else "-"
            chain[k].append(out)
        seen.append(saw)
    return alone, chain, seen


def run_datatrove(texts: list[str], datatrove_python: str, ours) -> tuple[dict, object]:
    """datatrove's decisions, computed in its own process while `ours()` runs in this one."""
    with tempfile.TemporaryDirectory() as d:
        inp = Path(d) / "texts.jsonl"
        inp.write_text("".join(json.dumps(t) + "\n" for t in texts))
        p = subprocess.Popen([datatrove_python, "-c", DATATROVE, str(inp)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        mine = ours()
        out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"datatrove run failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), mine


def decisions(texts: list[str], datatrove_python: str, words: str = "rules") -> dict[str, tuple[list[bool], list[bool]]]:
    """rule -> (our keep decisions, datatrove's), each rule alone on every text."""
    theirs, (alone, _, _) = run_datatrove(texts, datatrove_python, lambda: our_decisions(texts, words))
    return {k: ([r is None for r in alone[k]], [r is None for r in theirs["alone"][k]]) for k in RULES}


def c4_lines(text: str) -> list[str]:
    """The lines that pass C4's word-length, punctuation and length rules: those whose
    sentences C4 counts, and the few it then drops for "javascript" or policy text."""
    from data_prep.config import C4Config
    from data_prep.filters import _C4_END, _CITATION

    c, out = C4Config(), []
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if any(len(w) > c.max_word_length for w in words):
            continue
        line = _CITATION.sub("", line)
        if not line.endswith(_C4_END) or line.endswith("...") or len(words) < c.min_words_per_line:
            continue
        out.append(line)
    return out


def cause(rule: str, text: str, splitter: str) -> str:
    """Why a rule decided differently on text: where our words or sentences differ from spaCy's."""
    from data_prep.words import sentence_count, split_words

    if splitter != "spacy":
        ours, ref = split_words(text, splitter), split_words(text, "spacy")
        if ours != ref:
            i = next(i for i, (a, b) in enumerate(zip_longest(ours, ref)) if a != b)
            return (f"words differ from token {i} on (ours {len(ours)}, spaCy {len(ref)}): ours {ours[i:i + 3]}, "
                    f"spaCy {ref[i:i + 3]}, after {ref[max(0, i - 3):i]}")
        if rule == "c4":
            for line in c4_lines(text):
                a, b = sentence_count(line, splitter), sentence_count(line, "spacy")
                if a != b:
                    return f"sentence count {a}, spaCy {b}, of line {line[:120]!r}"
    return "same words and sentences as spaCy: the rule itself decided differently"


def token_agreement(texts: list[str], splitter: str) -> dict:
    """Documents whose words equal spaCy's, lines whose sentence counts equal spaCy's, and the
    time each splitter took (one process)."""
    from data_prep.words import sentence_count, split_words

    out = {"docs": len(texts), "docs_same": 0, "lines": 0, "lines_same": 0, "differ": [], "s": {splitter: 0.0, "spacy": 0.0}}
    for i, t in enumerate(texts):
        got = {}
        for s in (splitter, "spacy"):
            t0 = time.perf_counter()
            got[s] = split_words(t, s), [sentence_count(line, s) for line in c4_lines(t)]
            out["s"][s] += time.perf_counter() - t0
        out["docs_same"] += got[splitter][0] == got["spacy"][0]
        out["lines"] += len(got["spacy"][1])
        out["lines_same"] += sum(a == b for a, b in zip(got[splitter][1], got["spacy"][1]))
        if got[splitter] != got["spacy"]:
            out["differ"].append(i)
    return out


def report(name: str, ids: list[str], texts: list[str], dt_python: str, splitter: str) -> dict:
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    theirs, (alone, chain, seen) = run_datatrove(texts, dt_python, lambda: our_decisions(texts, splitter))
    tok = token_agreement(texts, splitter)
    res = {"corpus": name, "documents": len(texts), "MB": mb, "words": splitter, "rules": {}, "disagreements": [],
           "tokens": {k: tok[k] for k in ("docs", "docs_same", "lines", "lines_same")},
           "splitter_MBps": {s: mb / max(v, 1e-9) for s, v in tok["s"].items()}}
    print(f"\n== {name}: {len(texts)} documents, {mb:.1f} MB after cleaning; words: {splitter!r}")
    print(f"words identical to spaCy's: {tok['docs_same']}/{tok['docs']} documents "
          f"({100 * tok['docs_same'] / tok['docs']:.3f}%); sentence counts identical: {tok['lines_same']}/{tok['lines']} "
          f"C4 lines ({100 * tok['lines_same'] / max(tok['lines'], 1):.3f}%)")
    print(f"splitter speed, words and C4-line sentences, one process: {splitter} "
          f"{res['splitter_MBps'][splitter]:.2f} MB/s, spaCy {res['splitter_MBps']['spacy']:.2f} MB/s "
          f"({res['splitter_MBps'][splitter] / res['splitter_MBps']['spacy']:.1f}x)")
    for i in tok["differ"]:
        print(f"  tokens differ: {ids[i]}: {cause('', texts[i], splitter)}")
    print(f"{'rule':<19}{'alone: agree':>13}{'ours rm':>9}{'dt rm':>7}{'chain: reach':>14}{'agree':>9}{'ours rm':>9}{'dt rm':>7}")
    for k in RULES:
        a_o, a_t = alone[k], theirs["alone"][k]
        c_o, c_t = chain[k], theirs["chain"][k]
        reach = [i for i in range(len(texts)) if c_o[i] != "-" and c_t[i] != "-"]
        agree_a = sum((x is None) == (y is None) for x, y in zip(a_o, a_t))
        agree_c = sum((c_o[i] is None) == (c_t[i] is None) for i in reach)
        rm = lambda xs, idx: sum(xs[i] is not None for i in idx)  # noqa: E731
        every = range(len(texts))
        res["rules"][k] = {"alone": {"docs": len(texts), "agree": agree_a, "ours_removes": rm(a_o, every), "datatrove_removes": rm(a_t, every)},
                           "chain": {"reach": len(reach), "agree": agree_c, "ours_removes": rm(c_o, reach), "datatrove_removes": rm(c_t, reach)}}
        print(f"{k:<19}{100 * agree_a / len(texts):>12.3f}%{rm(a_o, every):>9}{rm(a_t, every):>7}"
              f"{len(reach):>14}{100 * agree_c / max(len(reach), 1):>8.3f}%{rm(c_o, reach):>9}{rm(c_t, reach):>7}")
        for where, idx, o, t in (("alone", every, a_o, a_t), ("chain", reach, c_o, c_t)):
            for i in idx:
                if (o[i] is None) != (t[i] is None):
                    text = texts[i] if where == "alone" else seen[i][k]
                    d = {"where": where, "rule": k, "id": ids[i], "ours": o[i] or "keep", "datatrove": t[i] or "keep",
                         "cause": cause(k, text, splitter)}
                    res["disagreements"].append(d)
    for d in res["disagreements"]:
        print(f"  disagreement [{d['where']}] {d['rule']} {d['id']}: ours {d['ours']}, datatrove {d['datatrove']}; {d['cause']}")
    if not res["disagreements"]:
        print("  no disagreements")
    return res


def main() -> None:
    from corpora import CORPORA, build, read

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datatrove-python", required=True, help="python of a venv with datatrove 0.10.1 (make bench-install)")
    ap.add_argument("--corpus", nargs="+", choices=CORPORA, default=["prose", "docs", "markup"])
    ap.add_argument("--mb", type=float, default=14, help="size of each corpus in MB of text (default 14: >= 10 MB after cleaning)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "corpora", help="where corpora are built and kept")
    ap.add_argument("--words", choices=["rules", "spacy", "regex"], default="rules", help="our word splitter (filters.words)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "filter_agreement.json", help="results as JSON")
    args = ap.parse_args()
    from data_prep.clean import Cleaner
    from data_prep.config import CleanConfig

    results = []
    for name in args.corpus:
        cleaner = Cleaner(CleanConfig())
        docs = [(i, cleaner.clean(t)) for i, t in read(build(name, args.mb, args.cache))]
        docs = [(i, t) for i, t in docs if t]
        results.append(report(name, [i for i, _ in docs], [t for _, t in docs], args.datatrove_python, args.words))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nresult: {args.out}")


if __name__ == "__main__":
    main()
