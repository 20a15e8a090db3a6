"""Quality filters: published thresholds, one removal reason each, and the vectorised n-gram
rules agree with a plain reading of the Gopher rules."""
from collections import Counter

from prep_corpus import real_documents, real_paragraphs
from data_prep.config import C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig, LanguageConfig
from data_prep.filters import _WORD, C4Rules, FineWebRules, GopherQuality, GopherRepetition, LanguageFilter, _ngram_rules
from data_prep.records import Record


def _rec(text):
    return Record("f", 1, "id", text)


def _reference_ngram_rules(words, top_n_grams, dup_n_grams):
    total = sum(map(len, words)) or 1
    for k, frac in top_n_grams:
        if len(words) < k:
            continue
        gram, count = Counter(zip(*(words[i:] for i in range(k)))).most_common(1)[0]
        if count > 1 and sum(map(len, gram)) * count / total > frac:
            return f"top_{k}_gram"
    for k, frac in dup_n_grams:
        if len(words) < k:
            continue
        grams = list(zip(*(words[i:] for i in range(k))))
        counts = Counter(grams)
        covered = [False] * len(words)
        for i, g in enumerate(grams):
            if counts[g] > 1:
                covered[i : i + k] = [True] * k
        if sum(len(w) for w, c in zip(words, covered) if c) / total > frac:
            return f"dup_{k}_gram"
    return None


def test_vectorised_ngram_rules_match_reference():
    c = GopherRepetitionConfig()
    paras = real_paragraphs()
    texts = real_documents(80)[:150]
    # Documents with planted repetition of various amounts.
    texts += [" ".join([paras[i]] * r + paras[i + 1 : i + 1 + s]) for i, r, s in zip(range(0, 120, 3), [2, 3, 4] * 14, [1, 2, 3, 5] * 10)]
    decided = Counter()
    for t in texts:
        words = _WORD.findall(t.lower())
        ref = _reference_ngram_rules(words, c.top_n_grams, c.dup_n_grams)
        assert _ngram_rules(words, c.top_n_grams, c.dup_n_grams) == ref
        decided[ref] += 1
    assert decided[None] > 20 and sum(v for k, v in decided.items() if k) > 20


def test_gopher_quality_rules():
    g = GopherQuality(GopherQualityConfig())
    good = real_documents(120)[0]
    assert g(_rec(good)) is None
    assert g(_rec("too short to be a document")) == "min_doc_words"
    assert g(_rec(" ".join(["# heading"] * 60) + " the and of")) == "symbol_word_ratio"
    assert g(_rec(" ".join(["12345 67890"] * 60))) == "alpha_words_ratio"
    assert g(_rec(" ".join(["lorem ipsum dolor sit amet"] * 20))) == "stop_words"


def test_repetition_c4_fineweb_and_language():
    doc = real_documents(120)[1]
    r = GopherRepetition(GopherRepetitionConfig())
    assert r(_rec(doc)) is None
    assert r(_rec("\n\n".join([doc.split("\n\n")[0]] * 4))) == "dup_para_frac"
    c4 = C4Rules(C4Config(enabled=True))
    rec = _rec("This line ends well and has words.\nno punctuation here\nEnable javascript to continue.\n" + doc.replace("\n\n", "\n"))
    assert c4(rec) is None and "no punctuation here" not in rec.text and "javascript" not in rec.text
    assert c4(_rec("lorem ipsum dolor sit amet. " * 10)) == "lorem_ipsum"
    assert c4(_rec("function f() { return 1; } is code. " * 10)) == "curly_bracket"
    fw = FineWebRules(FineWebConfig())
    assert fw(_rec(doc)) is None
    assert fw(_rec("\n".join(["short line"] * 40))) == "line_punct_ratio"
    lang = LanguageFilter(LanguageConfig())
    assert lang(_rec(doc)) is None
    assert lang(_rec("Dies ist ein ganz normaler deutscher Satz über das Wetter und die Arbeit in der Stadt.")) == "not_en"


def test_filter_sets_per_source_and_summary(tmp_path):
    """Web rules run on the source marked web only; the summary shows per source and rule what
    went, with samples. Failed first: every source got the web filters, and the summary had no
    per-source rule table or samples."""
    import json

    from prep_corpus import write_jsonl
    from data_prep.config import PrepConfig
    from data_prep.plan import make_plan
    from data_prep.prepare import run_prepare
    from data_prep.stats import aggregate, write_summary

    docs = real_documents(120)[:5]
    notes = [{"id": f"n{i}", "text": f"Short note {i}: see the manual."} for i in range(4)]
    rows = [{"id": f"d{i}", "text": d} for i, d in enumerate(docs)] + notes
    for name in ("crawl", "books", "code"):
        write_jsonl(tmp_path / name / "a.jsonl", rows)
    cfg = PrepConfig.model_validate({
        "sources": [{"name": n, "type": "jsonl", "paths": [str(tmp_path / n)], "id_field": "id", "filters": f}
                    for n, f in (("crawl", "web"), ("books", "books"), ("code", "mine"))],
        "filters": {"language": {"enabled": False}},
        "filter_sets": {"mine": {k: {"enabled": False} for k in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb")}},
        "minhash": {"enabled": False}, "exact_dedup": {"enabled": False}})
    prep = [run_prepare(cfg, t, tmp_path / "prep") for t in make_plan(cfg)]
    kept = {p["source"]: p["records"].get("passed_filters", 0) for p in prep}
    assert kept["books"] == kept["code"] == 9 and kept["crawl"] <= 5
    stats = aggregate(prep, [{"records": {}, "bytes": {}, "tokens": 0, "tokens_hist": {}}] * len(prep))
    crawl = stats["sources"]["crawl"]
    assert crawl["reasons"]["filtered:gopher_quality:min_doc_words"] == 4 and sum(crawl["reasons"].values()) == 9 - kept["crawl"]
    assert stats["sources"]["books"]["reasons"] == stats["sources"]["code"]["reasons"] == {}
    assert crawl["reason_bytes"]["filtered:gopher_quality:min_doc_words"] == sum(len(json.dumps(n)) + 1 for n in notes)  # as read
    summary = write_summary(stats, tmp_path)
    assert "| crawl | filtered:gopher_quality:min_doc_words | 4 |" in summary
    assert "### crawl: filtered:gopher_quality:min_doc_words" in summary and "id `n0`: Short note 0: see the manual." in summary
    with __import__("pytest").raises(ValueError, match="sources.0.filters: 'webb' is neither"):
        PrepConfig.model_validate({"sources": [{"name": "x", "type": "jsonl", "paths": ["a"], "filters": "webb"}]})
