"""Exact and MinHash deduplication on planted duplicates, through the real prepare and dedup
stages (files on disk, partitions, the streamed merge)."""
import random
import sys
from pathlib import Path

import numpy as np

from prep_corpus import real_documents, tiny_config, write_jsonl
from data_prep.config import MinHashConfig, PrepConfig
from data_prep import dedup
from data_prep.dedup import KIND_EXACT, KIND_NEAR, PAIR_DTYPE, jaccard, merge, shingle_sets
from data_prep.executor import LocalExecutor
from data_prep.stages import STAGES, open_context

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
# The benchmark's edits and its reading of a run's result, so that both measure the same thing.
from near_dedup import dedup_outcomes, scattered_edits  # noqa: E402


def _dedup(tmp_path: Path, files: dict[str, list[dict]]) -> dict[str, tuple[str, str]]:
    """Run prepare + dedup; return {doc id: (kind, survivor id)} for removed documents."""
    for name, rows in files.items():
        write_jsonl(tmp_path / "in" / name, rows)
    cfg = PrepConfig.model_validate(tiny_config([{"name": "web", "type": "jsonl", "paths": [str(tmp_path / "in")], "id_field": "id"}]))
    ctx = open_context(cfg, tmp_path / "out")
    ex = LocalExecutor(2)
    for st in (st for st in STAGES if st.command in ("prepare", "dedup")):
        st.run(ctx, ex)
    return dedup_outcomes(ctx)


def _jaccard(a: str, b: str) -> float:
    """Exact Jaccard on the shingles dedup uses (the config's default n-gram)."""
    return jaccard(*shingle_sets([a, b], MinHashConfig().ngram))


def test_planted_near_duplicates_recall_and_no_low_similarity_merges(tmp_path):
    # Copies with 2-6% of their words changed at scattered positions. Failed first: the old
    # 5-gram 14x8 design found 11-24% of them.
    rng = random.Random(0)
    docs = real_documents(200)
    vocab = sorted({w for d in docs for w in d.split()})
    base, rest = docs[:100], docs[100:]
    rows = [{"id": f"base{i}", "text": d} for i, d in enumerate(base)]
    copies = []
    for i, d in enumerate(base):
        edited = " ".join(scattered_edits(d.split(), rng.uniform(0.02, 0.06), rng, vocab))
        copies.append({"id": f"copy{i}", "text": edited})
    # Low-similarity pairs: B repeats most of A plus text of its own, so that its
    # shingle Jaccard with A is between 0.3 and 0.5 (the zone LSH may still collide on).
    low = []
    for j in range(0, len(rest) - 1, 2):
        a_words, other = rest[j].split(), rest[j + 1].split()
        for f in (0.7, 0.6, 0.5):
            b_text = " ".join(a_words[: int(f * len(a_words))] + other[: int(0.45 * len(a_words))])
            if 0.3 <= _jaccard(rest[j], b_text) < 0.5:
                low.append({"id": f"lowA{j}", "text": rest[j]})
                low.append({"id": f"lowB{j}", "text": b_text})
                break
    removed = _dedup(tmp_path, {"a.jsonl": rows + low, "b.jsonl": copies})

    found = sum(1 for i in range(len(base)) if removed.get(f"copy{i}") == ("near", f"base{i}"))
    assert found / len(base) >= 0.95, f"recall {found / len(base):.2f}"
    assert not any(k.startswith("base") for k in removed)  # the first copy always survives

    by_id = {r["id"]: r["text"] for r in rows + low + copies}
    for doc, (_, survivor) in removed.items():
        assert _jaccard(by_id[doc], by_id[survivor]) >= 0.5, (doc, survivor)
    low_pairs = [(low[k]["id"], low[k + 1]["id"]) for k in range(0, len(low), 2)]
    sims = [_jaccard(by_id[a], by_id[b]) for a, b in low_pairs]
    assert max(sims) < 0.5 and min(sims) >= 0.3 and len(sims) >= 20
    assert not any(a in removed or b in removed for a, b in low_pairs)


def test_exact_duplicates_across_files_keep_the_first_copy(tmp_path):
    docs = real_documents(60)[:20]
    first = [{"id": f"f{i}", "text": d} for i, d in enumerate(docs)]
    # Same documents, different case and whitespace, in a later file and twice in the same file.
    second = [{"id": f"s{i}", "text": "  " + d.upper().replace(" ", "   ") + "\n"} for i, d in enumerate(docs)]
    second += [{"id": "s0-again", "text": docs[0]}]
    removed = _dedup(tmp_path, {"1.jsonl": first, "2.jsonl": second})
    assert removed == {**{f"s{i}": ("exact", f"f{i}") for i in range(20)}, "s0-again": ("exact", "f0")}


def _pairs(rows):
    a = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    out = np.empty(len(a), dtype=PAIR_DTYPE)
    out["survivor"], out["gid"] = a[:, 0], a[:, 1]
    return out


def test_merge_never_chains_and_names_kept_survivors():
    # 3~5, 5~7 and 7~9 form a chain; 3 and 7 were never verified against each other, so 7 must
    # stay (union-find removed it, and 9, as copies of 3: failed first). 9 is verified with 7, a
    # survivor. 11 is an exact copy of 5, which is near-removed: 11 names 5's survivor, 3 (the old
    # merge named the removed 5). 20~21 is another cluster.
    exact = _pairs([(5, 11)])
    near = _pairs([(3, 5), (5, 7), (7, 9), (20, 21)])
    res = merge([exact], [near[::-1]])
    got = {int(r["gid"]): (int(r["kind"]), int(r["survivor"])) for r in res}
    assert got == {5: (KIND_NEAR, 3), 9: (KIND_NEAR, 7), 11: (KIND_NEAR, 3), 21: (KIND_NEAR, 20)}
    assert list(res["gid"]) == sorted(res["gid"])
    assert not set(res["survivor"].tolist()) & set(res["gid"].tolist())


def test_chain_of_real_documents_is_not_merged(tmp_path):
    # A~B and B~C with A and C far apart, through the real stages: B is removed as a copy of A,
    # C is kept. Failed first: union-find removed C as a copy of A.
    docs = real_documents(300)
    a, other = docs[0].split(), " ".join(docs[1:4]).split()
    q = len(a) // 4
    b = other[:q] + a[q:]                      # the first quarter replaced
    c = b[: 2 * q] + other[q : 2 * q] + b[3 * q :]  # and then the third quarter too
    texts = {"A": " ".join(a), "B": " ".join(b), "C": " ".join(c)}
    assert _jaccard(texts["A"], texts["B"]) >= 0.5 and _jaccard(texts["B"], texts["C"]) >= 0.5
    assert _jaccard(texts["A"], texts["C"]) < 0.5
    removed = _dedup(tmp_path, {"a.jsonl": [{"id": k, "text": t} for k, t in texts.items()]})
    assert removed == {"B": ("near", "A")}


def _merge_in_one_heap(exact, near):
    """The merge as it was, every edge in Python dicts: the reference the streamed one must match."""
    rep = dict(zip(exact["gid"].tolist(), exact["survivor"].tolist()))
    earlier: dict[int, set[int]] = {}
    for a, b in zip(near["survivor"].tolist(), near["gid"].tolist()):
        a, b = rep.get(a, a), rep.get(b, b)
        if a != b:
            earlier.setdefault(max(a, b), set()).add(min(a, b))
    near_of: dict[int, int] = {}
    for doc in sorted(earlier):
        kept = [g for g in earlier[doc] if g not in near_of]
        if kept:
            near_of[doc] = min(kept)
    rows = {g: (KIND_NEAR, near_of[r]) if r in near_of else (KIND_EXACT, r) for g, r in rep.items()}
    rows.update((g, (KIND_NEAR, s)) for g, s in near_of.items())
    return dict(sorted(rows.items()))


def test_streamed_merge_in_small_blocks_decides_as_in_one_heap(monkeypatch):
    # Random exact groups and near edges over three tasks, merged with blocks of 7 rows (so a
    # document's candidates and long runs of one gid cross block edges), against the merge that
    # held everything in dicts.
    monkeypatch.setattr(dedup, "MERGE_ROWS", 7)
    rng = np.random.default_rng(0)
    gids = np.sort(rng.choice(3 * 400, 400, replace=False)).astype(np.uint64)
    gids = (gids // 400 << np.uint64(32)) | (gids % 400)  # tasks 0-2, ordinals < 400
    firsts = rng.choice(len(gids) - 1, 40, replace=False)
    exact = _pairs([(gids[i], gids[j]) for i in firsts for j in rng.choice(np.arange(i + 1, len(gids)), 2, replace=False)])
    _, first = np.unique(exact["gid"], return_index=True)  # a document has one exact group
    exact = exact[first]
    exact = exact[~np.isin(exact["gid"], exact["survivor"])]
    a, b = rng.integers(0, len(gids), (2, 1500))
    near = _pairs([(gids[min(x, y)], gids[max(x, y)]) for x, y in zip(a, b) if x != y])
    # A hub: one document with more candidates than a block holds.
    near = np.concatenate([near, _pairs([(gids[i], gids[-1]) for i in range(30)])])
    parts = np.array_split(rng.permutation(near), 4)
    got = merge([exact[: len(exact) // 2], exact[len(exact) // 2 :]], parts)
    want = _merge_in_one_heap(exact, near)
    assert len(want) > 150
    assert {int(r["gid"]): (int(r["kind"]), int(r["survivor"])) for r in got} == want
    assert list(got["gid"]) == sorted(want)


# Real short texts (Debian's fortunes package), as the fortune files have them.
MONEY, STUPIDITY = "Money is its own reward.", "Stupidity is its own reward."
MOUNTAIN = "A wise man can see more from a mountain top than a fool can from the bottom\nof a well."
WELL = "A wise man can see more from the bottom of a well than a fool can from a\nmountain top."
DYING = '"I\'m not afraid of dying, I just don\'t want to be there when it happens."\n\t\t-- Woody Allen'
DEATH = "I'm not afraid of death -- I just don't want to be there when it happens.\n\t\t-- Woody Allen"
FIFTH = ("Fifth Law of Procrastination:\n\tProcrastination avoids boredom; one never has the feeling that\n"
         "\tthere is nothing important to do.")
LAW = ("Law of Procrastination:\n\tProcrastination avoids boredom; one never has\n"
       "\tthe feeling that there is nothing important to do.")


def _shingles(a: str, b: str) -> tuple[int, int, float]:
    sa, sb = shingle_sets([a, b], MinHashConfig().ngram)
    return len(sa), len(sb), jaccard(sa, sb)


def test_short_texts_are_merged_only_on_enough_evidence_for_their_size(tmp_path):
    # Failed first (3-gram shingles, no size rule): "Money/Stupidity is its own reward." (3-gram
    # Jaccard 2/4) and the mountain top / bottom of a well statement and its opposite (3-gram
    # Jaccard 0.64) were removed as near duplicates, and so was the 14-shingle Law of
    # Procrastination without its "Fifth".
    assert MinHashConfig().min_shingles == 15
    assert _shingles(MOUNTAIN, WELL)[2] < 0.5  # 16 shingles each: the threshold alone decides
    assert _shingles(FIFTH, LAW) == (15, 14, 14 / 15)  # past the threshold, but 14 shingles
    assert _shingles(DYING, DEATH) == (15, 15, 0.5)  # "dying" -> "death": exactly at both bounds
    rows = [{"id": k, "text": t} for k, t in [("money", MONEY), ("stupidity", STUPIDITY), ("mountain", MOUNTAIN), ("well", WELL),
                                               ("fifth", FIFTH), ("law", LAW), ("dying", DYING), ("death", DEATH),
                                               ("money-again", "MONEY is its own reward!")]]
    removed = _dedup(tmp_path, {"a.jsonl": rows})
    # Different statements stay apart; a 14-shingle text is merged only with the same words
    # (here: its case and punctuation differ), and a 15-shingle one with one word replaced in
    # its middle is a near duplicate.
    assert removed == {"money-again": ("near", "money"), "death": ("near", "dying")}


def test_min_shingles_is_the_size_at_which_one_replaced_word_still_meets_the_threshold():
    # The derivation in dedup.is_near_duplicate, checked on real text for each n-gram size: a
    # document with min_shingles shingles and one word replaced in its middle reaches the
    # threshold; one shingle fewer does not.
    from data_prep.minhash import normalise_for_shingles

    words = normalise_for_shingles(real_documents(60)[0]).decode().split()  # the words as shingled
    for ngram, threshold in ((3, 0.5), (5, 0.5), (5, 0.7)):
        m = MinHashConfig(ngram=ngram, threshold=threshold).min_shingles
        for size, passes in ((m, True), (m - 1, False)):
            text = words[: size + ngram - 1]
            edited = text[: len(text) // 2] + ["zyzzyva"] + text[len(text) // 2 + 1 :]
            a, b = shingle_sets([" ".join(text), " ".join(edited)], ngram)
            assert len(a) == size and (jaccard(a, b) >= threshold) == passes, (ngram, threshold, size)
            assert dedup.is_near_duplicate(a, b, threshold, m) == passes
