"""Quality filters: each a small object whose call returns None (keep) or the rule that
removed the document ("gopher_quality:min_doc_words"). Thresholds are the published ones; see
config.py for the source of each default. Some rules (C4 lines) edit the text they keep.
"""
from __future__ import annotations

import re

from data_prep.config import (
    C4Config,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
)

_WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)
_PARAS = re.compile(r"\n{2,}")
_ALPHA = re.compile(r"[^\W\d_]", re.UNICODE)
# Gopher's stop words: a document needs at least two of them.
_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_BULLETS = ("•", "‣", "⁃", "◦", "▪", "▫", "●", "-", "*")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_SENTENCE_END = re.compile(r"[.!?]+(?:[\"'”’)\]]*)(?:\s|$)")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_LIST_START = re.compile(r"^\s*(?:[-*•‣◦▪●]|\d+[.)])\s")


def words_of(text: str) -> list[str]:
    return text.split()


class GopherQuality:
    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig):
        self.c = cfg

    def __call__(self, rec) -> str | None:
        c, text = self.c, rec.text
        words = _WORD.findall(text)
        n = len(words)
        if n < c.min_doc_words:
            return "min_doc_words"
        if n > c.max_doc_words:
            return "max_doc_words"
        avg = sum(map(len, words)) / n
        if avg < c.min_avg_word_length:
            return "min_avg_word_length"
        if avg > c.max_avg_word_length:
            return "max_avg_word_length"
        if (text.count("#") + text.count("...") + text.count("…")) / n > c.max_symbol_word_ratio:
            return "symbol_word_ratio"
        lines = text.split("\n")
        if sum(l.lstrip().startswith(_BULLETS) for l in lines) / len(lines) > c.max_bullet_lines_ratio:
            return "bullet_lines_ratio"
        if sum(l.rstrip().endswith(("...", "…")) for l in lines) / len(lines) > c.max_ellipsis_lines_ratio:
            return "ellipsis_lines_ratio"
        raw = text.split()
        if sum(1 for w in raw if _ALPHA.search(w)) / max(len(raw), 1) < c.max_non_alpha_words_ratio:
            return "alpha_words_ratio"
        lower = {w.lower() for w in words}
        if len(lower & _STOP_WORDS) < c.min_stop_words:
            return "stop_words"
        return None


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(number, characters) of items that repeat an earlier item."""
    seen: set[str] = set()
    n = chars = 0
    for it in items:
        if it in seen:
            n += 1
            chars += len(it)
        else:
            seen.add(it)
    return n, chars


class GopherRepetition:
    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig):
        self.c = cfg

    def __call__(self, rec) -> str | None:
        c, text = self.c, rec.text
        paras = [p for p in _PARAS.split(text.strip()) if p]
        n, chars = _dup_stats(paras)
        if paras and n / len(paras) > c.dup_para_frac:
            return "dup_para_frac"
        if chars / max(len(text), 1) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = [l for l in text.split("\n") if l]
        n, chars = _dup_stats(lines)
        if lines and n / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if chars / max(len(text), 1) > c.dup_line_char_frac:
            return "dup_line_char_frac"
        words = _WORD.findall(text.lower())
        if not words:
            return None
        return _ngram_rules(words, c.top_n_grams, c.dup_n_grams)


def _ngram_rules(words: list[str], top_n_grams, dup_n_grams) -> str | None:
    """Gopher's n-gram repetition rules, vectorised: word ids -> n-gram hashes by shifted
    slices, repeats by np.unique. Equality of ids stands in for equality of words (a 64-bit
    collision inside one document is not a practical concern)."""
    import numpy as np

    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lens.sum()) or 1
    cum = np.concatenate([[0], np.cumsum(lens)])
    mult = np.uint64(0x9E3779B97F4A7C15)
    h = ids.copy()
    with np.errstate(over="ignore"):
        for k in range(2, max(n for n, _ in list(top_n_grams) + list(dup_n_grams)) + 1):
            m = len(words) - k + 1
            if m <= 0:
                break
            h = h[:m] * mult + ids[k - 1 : k - 1 + m]
            top = next((f for n, f in top_n_grams if n == k), None)
            dup = next((f for n, f in dup_n_grams if n == k), None)
            if top is None and dup is None:
                continue
            _, first, inverse, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
            if top is not None:
                best = counts.max()
                if best > 1:
                    # Ties go to the n-gram seen first, as Counter.most_common does.
                    start = int(first[counts == best].min())
                    if (cum[start + k] - cum[start]) * best / total > top:
                        return f"top_{k}_gram"
            if dup is not None:
                starts = np.flatnonzero(counts[inverse] > 1)
                if len(starts):
                    cover = np.zeros(len(words) + 1, dtype=np.int64)
                    np.add.at(cover, starts, 1)
                    np.add.at(cover, starts + k, -1)
                    covered = np.cumsum(cover[:-1]) > 0
                    if lens[covered].sum() / total > dup:
                        return f"dup_{k}_gram"
    return None


class C4Rules:
    """C4's line rules (drop lines; they edit the document) and document rules."""

    name = "c4"

    def __init__(self, cfg: C4Config):
        self.c = cfg

    def __call__(self, rec) -> str | None:
        c = self.c
        low = rec.text.lower()
        if c.filter_lorem_ipsum and "lorem ipsum" in low:
            return "lorem_ipsum"
        if c.filter_curly_bracket and "{" in rec.text:
            return "curly_bracket"
        kept = []
        for line in rec.text.split("\n"):
            line = _CITATION.sub("", line).strip()
            if not line:
                continue
            words = line.split()
            if c.remove_lines_without_terminal_punct and not line.endswith(_TERMINAL):
                continue
            if len(words) < c.min_words_per_line:
                continue
            if max(map(len, words)) > c.max_word_length:
                continue
            ll = line.lower()
            if c.filter_javascript and "javascript" in ll:
                continue
            if c.filter_policy and any(p in ll for p in _POLICY):
                continue
            kept.append(line)
        text = "\n".join(kept)
        if not text:
            return "no_lines_left"
        if len(_SENTENCE_END.findall(text)) < c.min_num_sentences:
            return "min_num_sentences"
        rec.text = text
        return None


class FineWebRules:
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig):
        self.c = cfg

    def __call__(self, rec) -> str | None:
        c, text = self.c, rec.text
        lines = [l for l in text.split("\n") if l.strip()]
        if not lines:
            return "empty_lines"
        if sum(l.rstrip().endswith(_TERMINAL) for l in lines) / len(lines) < c.line_punct_thr:
            return "line_punct_ratio"
        if sum(len(l) <= c.short_line_length for l in lines) / len(lines) > c.short_line_thr:
            return "short_line_ratio"
        _, dup_chars = _dup_stats(lines)
        if dup_chars / max(len(text.replace("\n", "")), 1) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(len(text.split()), 1) > c.new_line_ratio:
            return "new_line_ratio"
        return None


class LanguageFilter:
    name = "language"
    _identifier = None  # one model per process, loaded on first use

    def __init__(self, cfg: LanguageConfig):
        self.c = cfg

    @classmethod
    def identifier(cls):
        if cls._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            cls._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return cls._identifier

    def __call__(self, rec) -> str | None:
        lang, score = self.identifier().classify(rec.text[: self.c.max_chars].replace("\n", " "))
        if lang not in self.c.languages:
            return f"not_{'_'.join(self.c.languages)}"
        if score < self.c.min_score:
            return "low_score"
        return None


def build_filters(cfg: FiltersConfig) -> list:
    """The filter stages in the order they run: cheap and text-editing rules first."""
    stages = []
    if cfg.language.enabled:
        stages.append(LanguageFilter(cfg.language))
    if cfg.c4.enabled:
        stages.append(C4Rules(cfg.c4))
    if cfg.gopher_quality.enabled:
        stages.append(GopherQuality(cfg.gopher_quality))
    if cfg.gopher_repetition.enabled:
        stages.append(GopherRepetition(cfg.gopher_repetition))
    if cfg.fineweb.enabled:
        stages.append(FineWebRules(cfg.fineweb))
    return stages
