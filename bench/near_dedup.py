"""Near-duplicate detection quality on real text: planted edited copies, and real short texts
(bench only).

    python bench/near_dedup.py [--mb 10] [--copies 500] [--ngram 5 --bands 28 --rows 4 --min-shingles 15]
    python bench/near_dedup.py --short-texts [--without-size-rule] [--datatrove-python .venv-bench/bin/python]

Demo corpus (always): the demo corpus (docs, licences, docstrings of the installed packages) as
jsonl. For `--copies` documents of at least 100 words, an edited copy is planted at a random
position of a later file: 2-6% of its words (uniform per copy) replaced, deleted or inserted at
scattered positions, one word at a time (typos, substitutions, small edits). The prep
pipeline's prepare + dedup stages run on it with the given MinHash settings, and the script
reports:

  recall        planted copies removed as duplicates
  false merges  removed documents whose exact 5-gram shingle Jaccard (data_prep's shingles:
                lowercase, ASCII punctuation removed) with the document they were removed in
                favour of is below 0.5 (precision = 1 - false / removed)
  removed_not_planted  real duplicates the demo corpus has of its own (vendored copies,
                licence variants), each also checked against the 0.5 bound

--short-texts (a second corpus): real short texts, none written for this bench: every fortune
of Debian's `fortunes` and `fortunes-min` packages (quotations, jokes, one fortune a document;
`apt-get install fortunes fortunes-min`, or `apt-get download` them and `dpkg -x` into a folder
given as --fortunes), the one-line docstrings of the installed Python packages (a docstring
whose quotes open and close on one line), and sentences of their longer docstrings. Nothing is
planted: every near merge joins two texts that exist apart. It reports each merge whose texts
have different words (5-gram Jaccard < 1), with its Jaccard, sizes, a cause (the words that
differ, where) and both texts, and counts those below 0.5 as false merges. With
--without-size-rule the same corpus runs again with `minhash.min_shingles` = 1 (no size rule),
and the merges the rule prevents are listed the same way.

With --datatrove-python, datatrove 0.10.1's MinHash dedup (FineWeb's settings: 5-grams,
14x8, union of bucket matches) runs on the same files with the same number of workers, and
is scored the same way (its removed documents against their cluster's kept document).
Both times cover reading the jsonl files, signatures and clustering.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JUDGE_NGRAM = 5  # every side is judged on exact 5-gram Jaccard, whatever it ran with
FORTUNES = Path("/usr/share/games/fortunes")


def scattered_edits(words: list[str], frac: float, rng: random.Random, vocab: list[str]) -> list[str]:
    """frac of the words changed one at a time at random positions: half replaced by a word of
    vocab, a quarter deleted, a quarter with a word inserted before them."""
    out = list(words)
    for _ in range(max(1, round(frac * len(words)))):
        i = rng.randrange(len(out))
        op = rng.random()
        if op < 0.5:
            out[i] = rng.choice(vocab)
        elif op < 0.75:
            del out[i]
        else:
            out.insert(i, rng.choice(vocab))
    return out


def singletons(texts: list[str], below: float = 0.2) -> list[bool]:
    """Whether each text has no near duplicate of its own in the list: its estimated 5-gram
    Jaccard (256 MinHash permutations, standard deviation <= 0.031) with every other text is
    below `below`."""
    import numpy as np

    from data_prep.minhash import MinHasher

    sig = MinHasher(256, seed=7)(texts, JUDGE_NGRAM)
    best = np.zeros(len(texts))
    for i in range(0, len(texts), 64):
        est = (sig[i : i + 64, None, :] == sig[None, :, :]).mean(axis=-1)
        est[np.arange(len(est)), np.arange(i, i + len(est))] = 0  # not itself
        best[i : i + 64] = est.max(axis=1)
    return (best < below).tolist()


def plant(corpus: Path, copies: int, seed: int) -> dict[str, str]:
    """Append edited copies to the corpus files; returns {copy id: original id}.

    Originals are documents of at least 100 words without a near duplicate of their own
    (singletons), so that each copy's one match is its original. A copy of a document that
    is itself a near duplicate of an earlier one (the demo corpus has hundreds of licence
    variants) may have a Jaccard below the threshold with every kept document; keeping it is
    then what the merge must do (it never chains), and counting it as missed would measure
    the corpus, not the dedup.
    """
    rng = random.Random(seed)
    files = sorted(corpus.glob("*.jsonl"))
    docs = [json.loads(l) for f in files for l in open(f)]
    vocab = sorted({w for d in docs[:2000] for w in d["text"].split()})
    pool = [d for d, alone in zip(docs, singletons([d["text"] for d in docs])) if alone and len(d["text"].split()) >= 100]
    planted = {}
    with open(corpus / "zz-copies.jsonl", "w") as out:  # sorts last: the originals come first
        for k, d in enumerate(rng.sample(pool, min(copies, len(pool)))):
            cid = f"copy{k}-of-{d['id']}"
            text = " ".join(scattered_edits(d["text"].split(), rng.uniform(0.02, 0.06), rng, vocab))
            out.write(json.dumps({"id": cid, "text": text}) + "\n")
            planted[cid] = d["id"]
    return planted


# ---- the short-text corpus ----

# A docstring whose triple quotes open and close on the same line, alone on it.
_ONE_LINE_DOCSTRING = re.compile(r'^[ \t]*[rRuU]?(?:"""([^"\n\\]{3,}?)"""|\'\'\'([^\'\n\\]{3,}?)\'\'\')[ \t]*$', re.M)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def fortunes(folder: Path) -> list[tuple[str, str]]:
    """(id, text) of every fortune: the files of a fortune folder are entries separated by lines
    holding a single '%' (the .dat files are their indexes, the .u8 names links to them)."""
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_symlink() or not f.is_file() or f.suffix:
            continue
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for k, entry in enumerate(re.split(r"^%\n", text, flags=re.M)):
            if entry.strip():
                out.append((f"fortune:{f.name}:{k}", entry.strip()))
    return out


def docstring_texts(max_sentences: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(one-line docstrings, sentences of the other docstrings) of the installed packages' .py
    files, in path order: each (id, text)."""
    from data_prep.config import site_packages_dir
    from data_prep.readers import python_docstrings

    root = Path(site_packages_dir())
    one, sentences = [], []
    for p in sorted(root.rglob("*.py")):
        try:
            src = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        rel = p.relative_to(root)
        for k, (a, b) in enumerate(_ONE_LINE_DOCSTRING.findall(src)):
            one.append((f"doc:{rel}:{k}", (a or b).strip()))
        if len(sentences) < max_sentences:
            for k, para in enumerate(python_docstrings(src).split("\n\n")):
                para = " ".join(para.split())
                if "\n" in para or sum(c.isalpha() for c in para) < 0.6 * len(para):
                    continue  # code, tables, parameter lists
                for j, s in enumerate(_SENTENCE_END.split(para)):
                    if len(s.split()) >= 3:
                        sentences.append((f"sent:{rel}:{k}.{j}", s))
    return one, sentences[:max_sentences]


def build_short_corpus(out: Path, fortune_dir: Path, max_sentences: int) -> dict[str, int]:
    if not fortune_dir.is_dir():
        raise SystemExit(f"--fortunes {fortune_dir}: no such folder; `apt-get install fortunes fortunes-min`, or "
                         f"`apt-get download fortunes fortunes-min` and `dpkg -x` each .deb into a folder, then "
                         f"--fortunes FOLDER/usr/share/games/fortunes")
    out.mkdir(parents=True, exist_ok=True)
    one, sentences = docstring_texts(max_sentences)
    parts = {"fortunes": fortunes(fortune_dir), "one_line_docstrings": one, "sentences": sentences}
    for i, (name, rows) in enumerate(parts.items()):
        with open(out / f"{i}-{name}.jsonl", "w") as f:
            for doc_id, text in rows:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    return {k: len(v) for k, v in parts.items()}


# ---- the two dedups ----

DATATROVE = r"""
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.dedup import MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import MinhashConfig
corpus, work, workers, files = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = MinhashConfig()  # FineWeb's: 5-grams, 14 buckets x 8 hashes
t0 = time.perf_counter()
def run(name, pipeline, tasks):
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=f"{work}/logs/{name}").run()
run("s1", [JsonlReader(corpus), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)], files)
run("s2", [MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)], cfg.num_buckets)
run("s3", [MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/ids", config=cfg, save_cluster_id=True)], 1)
run("s4", [JsonlReader(corpus), MinhashDedupFilter(input_folder=f"{work}/ids", load_cluster_ids=True,
           exclusion_writer=JsonlWriter(f"{work}/removed")), JsonlWriter(f"{work}/kept")], files)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_datatrove(python: str, corpus: Path, work: Path, workers: int) -> tuple[dict[str, str], float]:
    """datatrove's MinHash dedup on the same files: ({removed id: the kept id of its cluster}, s)."""
    import gzip
    import subprocess

    files = len(list(corpus.glob("*.jsonl")))
    r = subprocess.run([python, "-c", DATATROVE, str(corpus), str(work), str(workers), str(files)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"datatrove run failed:\n{r.stderr[-3000:]}")
    seconds = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]

    def docs(folder):
        for f in sorted((work / folder).glob("*.jsonl.gz")):
            for line in gzip.open(f, "rt"):
                d = json.loads(line)
                yield d["id"], d["metadata"].get("minhash_cluster_id", -1)

    survivor = {c: i for i, c in docs("kept") if c != -1}
    return {i: survivor[c] for i, c in docs("removed")}, seconds


def dedup_outcomes(ctx) -> dict[str, tuple[str, str]]:
    """{document id: ("exact" or "near", survivor id)} for every document the dedup stages of a
    run (ctx: stages.Context) removed. Reads every task's ids: for benchmarks and tests."""
    import numpy as np

    from data_prep.dedup import KIND_EXACT, KIND_NEAR, gids_and_ids

    removed = np.load(ctx.dedup_dir / "removed.npy")
    wanted = np.union1d(removed["gid"], removed["survivor"])
    ids = {}
    for d in ctx.task_dirs():
        for gids, col in gids_and_ids(d):
            for i in np.flatnonzero(np.isin(gids, wanted)):
                ids[int(gids[i])] = col[int(i)].as_py()
    kinds = {KIND_EXACT: "exact", KIND_NEAR: "near"}
    return {ids[int(r["gid"])]: (kinds[int(r["kind"])], ids[int(r["survivor"])]) for r in removed}


def run_ours(corpus: Path, work: Path, workers: int, minhash: dict) -> tuple[dict[str, tuple[str, str]], float, dict]:
    from data_prep.config import PrepConfig
    from data_prep.executor import LocalExecutor
    from data_prep.stages import STAGES, open_context

    cfg = PrepConfig.model_validate({
        "sources": [{"name": "bench", "type": "jsonl", "paths": [str(corpus)], "id_field": "id"}], "minhash": minhash})
    ctx = open_context(cfg, work)
    ex = LocalExecutor(workers)
    t0 = time.perf_counter()
    # prepare (read, clean, signatures) and dedup; not the id check, which datatrove has no part like
    for st in (st for st in STAGES if st.command in ("prepare", "dedup") and st.name != "duplicate_ids"):
        st.run(ctx, ex)
    seconds = time.perf_counter() - t0
    return dedup_outcomes(ctx), seconds, cfg.minhash.model_dump()


# ---- scoring ----

def _words(text: str) -> list[str]:
    from data_prep.minhash import normalise_for_shingles

    return normalise_for_shingles(text).decode("utf-8", "surrogatepass").split()


def similarities(removed: dict[str, str], texts: dict[str, str]) -> dict[str, float]:
    """Each removed document's exact 5-gram Jaccard with the document it was removed in favour
    of. The same words in the same order (as shingled: case and punctuation aside) is 1, also
    for a text too short to have a shingle."""
    from data_prep.dedup import jaccard, shingle_sets

    ids = sorted(set(removed) | set(removed.values()))
    sets = dict(zip(ids, shingle_sets([texts[i] for i in ids], JUDGE_NGRAM)))
    return {d: 1.0 if _words(texts[d]) == _words(texts[s]) else jaccard(sets[d], sets[s]) for d, s in removed.items()}


def score(removed: dict[str, str], planted: dict[str, str], texts: dict[str, str]) -> dict:
    """Recall on the planted copies; false merges: removed documents whose exact 5-gram Jaccard
    with the document they are kept in favour of is below 0.5."""
    sims = similarities(removed, texts)
    found = sum(1 for c in planted if c in removed)
    false = sum(1 for x in sims.values() if x < 0.5)
    return {"recall": round(found / len(planted), 4), "found": found, "removed": len(removed),
            "false_merges_below_0.5": false, "precision": round(1 - false / max(len(removed), 1), 4),
            "removed_not_planted": sum(1 for d in removed if d not in planted),
            "removed_not_planted_below_0.5": sum(1 for d, x in sims.items() if x < 0.5 and d not in planted)}


def cause(a: str, b: str) -> tuple[str, str]:
    """(kind, what) of the difference between two texts' words as shingled: the kind is
    "same words" (case or punctuation differ), "reordered", "words replaced" or "words added or
    removed"; `what` lists the changes and where they are (within the first or last
    JUDGE_NGRAM - 1 words: "at the ends", where a change costs the fewest shingles)."""
    import difflib

    wa, wb = _words(a), _words(b)
    if wa == wb:
        return "same words", "case or punctuation differ"
    if sorted(wa) == sorted(wb):
        return "reordered", "the same words in another order"
    ops = [op for op in difflib.SequenceMatcher(None, wa, wb, autojunk=False).get_opcodes() if op[0] != "equal"]
    edge = JUDGE_NGRAM - 1
    where = "at the ends" if all(i2 <= edge or i1 >= len(wa) - edge for _, i1, i2, _, _ in ops) else "inside"
    changes = []
    for tag, i1, i2, j1, j2 in ops[:3]:
        x, y = " ".join(wa[i1:i2]), " ".join(wb[j1:j2])
        changes.append({"replace": f"'{x}' -> '{y}'", "delete": f"-'{x}'", "insert": f"+'{y}'"}[tag])
    more = f" (+{len(ops) - 3} more)" if len(ops) > 3 else ""
    changed = sum(max(i2 - i1, j2 - j1) for _, i1, i2, j1, j2 in ops)
    kind = "words replaced" if any(op[0] == "replace" for op in ops) else "words added or removed"
    return kind, f"{changed} of {max(len(wa), len(wb))} words differ, {where}: {'; '.join(changes)}{more}"


def short_report(removed: dict[str, str], texts: dict[str, str], show: int) -> dict:
    """Merges on the short-text corpus: how many, how many join texts with different words (by
    kind of difference), and each of those (up to `show`, lowest Jaccard first) with its cause."""
    from collections import Counter

    from data_prep.dedup import shingle_sets

    sims = similarities(removed, texts)
    diff = sorted((x, d) for d, x in sims.items() if x < 1.0)
    kinds: Counter = Counter()
    rows = []
    for k, (x, d) in enumerate(diff):
        s = removed[d]
        kind, what = cause(texts[s], texts[d])
        kinds[kind] += 1
        if k < show:
            na, nb = (len(v) for v in shingle_sets([texts[d], texts[s]], JUDGE_NGRAM))
            rows.append({"removed": d, "survivor": s, "jaccard5": round(x, 3), "shingles": [na, nb], "cause": f"{kind}: {what}",
                         "texts": [" ".join(texts[s].split())[:200], " ".join(texts[d].split())[:200]]})
    return {"removed": len(removed), "same_words": len(removed) - len(diff), "different_words": len(diff),
            "different_words_by_kind": dict(sorted(kinds.items())),
            "false_merges_below_0.5": sum(1 for x, _ in diff if x < 0.5), "merges_with_different_words": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=10, help="demo corpus size")
    ap.add_argument("--copies", type=int, default=500, help="edited copies planted in the demo corpus (at most one per singleton)")
    ap.add_argument("--ngram", type=int, default=None, help="default: the config default")
    ap.add_argument("--bands", type=int, default=None)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--min-shingles", type=int, default=None, help="minhash.min_shingles (default: derived, see the config)")
    ap.add_argument("--short-texts", action="store_true", help="also run the short-text corpus (fortunes, docstrings, sentences)")
    ap.add_argument("--fortunes", type=Path, default=FORTUNES, help=f"a fortune folder (default {FORTUNES})")
    ap.add_argument("--sentences", type=int, default=30000, help="docstring sentences in the short-text corpus")
    ap.add_argument("--without-size-rule", action="store_true",
                    help="also run the short-text corpus with minhash.min_shingles = 1 and list the merges the rule prevents")
    ap.add_argument("--show", type=int, default=40, help="merges of texts with different words listed per run")
    ap.add_argument("--datatrove-python", default=None, help="also run datatrove's MinHash (.venv-bench/bin/python)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/near_dedup_bench"))
    args = ap.parse_args()
    from prep_throughput import build_corpus

    shutil.rmtree(args.work, ignore_errors=True)
    corpus = args.work / "corpus"
    mb = build_corpus(corpus, args.mb, 4)
    planted = plant(corpus, args.copies, args.seed)
    texts = {d["id"]: d["text"] for f in sorted(corpus.glob("*.jsonl")) for d in map(json.loads, open(f))}
    mh = {k: v for k, v in (("ngram", args.ngram), ("bands", args.bands), ("rows", args.rows), ("threshold", args.threshold),
                            ("min_shingles", args.min_shingles)) if v}
    out, seconds, used = run_ours(corpus, args.work / "ours", args.workers, mh)
    settings = {k: used[k] for k in ("ngram", "bands", "rows", "threshold", "min_shingles") if k in used}
    result = {"demo": {"corpus_MB": round(mb, 2), "documents": len(texts), "planted": len(planted), "workers": args.workers,
                       "judged_on_word_ngrams": JUDGE_NGRAM,
                       "data_prep": {"minhash": settings, "seconds": round(seconds, 1),
                                     **score({d: s for d, (_, s) in out.items()}, planted, texts)}}}
    if args.datatrove_python:
        removed, seconds = run_datatrove(args.datatrove_python, corpus, args.work / "datatrove", args.workers)
        result["demo"]["datatrove"] = {"minhash": {"ngram": 5, "bands": 14, "rows": 8}, "seconds": round(seconds, 1),
                                       **score(removed, planted, texts)}
    if args.short_texts:
        short = args.work / "short"
        parts = build_short_corpus(short, args.fortunes, args.sentences)
        texts = {d["id"]: d["text"] for f in sorted(short.glob("*.jsonl")) for d in map(json.loads, open(f))}
        res = {"documents": parts, "MB": round(sum(f.stat().st_size for f in short.glob("*.jsonl")) / 1e6, 2)}
        out, seconds, _ = run_ours(short, args.work / "ours-short", args.workers, mh)
        near = {d: s for d, (k, s) in out.items() if k == "near"}
        res["data_prep"] = {"minhash": settings, "seconds": round(seconds, 1), "exact_removed": len(out) - len(near),
                            "near": short_report(near, texts, args.show)}
        if args.without_size_rule:
            off, seconds, _ = run_ours(short, args.work / "ours-short-no-rule", args.workers, {**mh, "min_shingles": 1})
            off_near = {d: s for d, (k, s) in off.items() if k == "near"}
            # Removed without the rule, kept with it (an exact copy of a document that the rule
            # keeps is an exact duplicate in both runs, named near in the first: not counted).
            prevented = {d: s for d, s in off_near.items() if d not in out}
            res["data_prep_without_size_rule"] = {"seconds": round(seconds, 1), "near": short_report(off_near, texts, 0),
                                                  "merges_the_rule_prevents": short_report(prevented, texts, args.show)}
        if args.datatrove_python:
            removed, seconds = run_datatrove(args.datatrove_python, short, args.work / "datatrove-short", args.workers)
            res["datatrove"] = {"seconds": round(seconds, 1), "near": short_report(removed, texts, args.show)}
        result["short_texts"] = res
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
