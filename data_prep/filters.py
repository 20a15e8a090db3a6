"""Quality filters: each a small object whose call returns None (keep) or the rule that
removed the document ("gopher_quality:min_doc_words"). Thresholds are the published ones; see
config.py for the source of each default. Some rules (C4 lines) edit the text they keep.
"""
from __future__ import annotations

import re
from itertools import repeat

from data_prep.config import (
    C4Config,
    FiltersConfig,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
)
from data_prep.langid import identifier
from data_prep.rule_tokenizer import BoundedMemo
from data_prep.words import PUNCTUATION, ends_in_terminal, sentence_count, word_count
from data_prep.words import words as words_of

# Written with a literal newline first (the same as \n{2,} and \n+): re then skips to each
# newline at C speed instead of trying the pattern at every character (2.5-6x faster).
_PARAS = re.compile(r"\n\n\n*")
_LINES = re.compile(r"\n\n*")
_PUNCT = "".join(PUNCTUATION)
# Gopher's stop words: a document needs at least two of them (case-sensitive, as datatrove).
_STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
_C4_END = (".", "?", "!", '"', "'")
_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")

# What GopherQuality sums over a document's tokens, packed into one integer per distinct
# token (memoised, bounded like the splitter's caches), so that one sum(map(...)) at C speed
# gives all four: tokens; words (a token with a character that is not punctuation: "," and
# "--" are not); tokens with a letter (the alpha ratio counts them, punctuation included); the
# characters of words. Fields are _FIELD bits apart (no document has 2**40 tokens); the last
# is unbounded.
_FIELD = 40
_MASK = (1 << _FIELD) - 1


def _token_facts(token: str) -> int:
    word = bool(token.strip(_PUNCT))
    return 1 | word << _FIELD | any(map(str.isalpha, token)) << 2 * _FIELD | (len(token) if word else 0) << 3 * _FIELD


_TOKEN_FACTS = BoundedMemo(_token_facts, 1 << 17)

# Each rule below follows datatrove 0.10.1's filter of the same name (the implementation
# FineWeb used) step for step, with the same words (data_prep.words); the removal reasons are
# ours.


class GopherQuality:
    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig, splitter: str = "rules"):
        self.c, self.splitter = cfg, splitter

    def __call__(self, rec) -> str | None:
        c, text = self.c, rec.text
        words = words_of(rec, self.splitter)
        n = len(words)
        facts = sum(map(_TOKEN_FACTS.__getitem__, words))
        n_real = facts >> _FIELD & _MASK
        if n_real < c.min_doc_words:
            return "min_doc_words"
        if n_real > c.max_doc_words:
            return "max_doc_words"
        avg = (facts >> 3 * _FIELD) / n_real  # the average length of words, symbols left out
        if avg < c.min_avg_word_length:
            return "min_avg_word_length"
        if avg > c.max_avg_word_length:
            return "max_avg_word_length"
        if text.count("#") / n > c.max_symbol_word_ratio:
            return "hash_word_ratio"
        if (text.count("...") + text.count("…")) / n > c.max_symbol_word_ratio:
            return "ellipsis_word_ratio"
        lines = text.splitlines()
        # (map over str methods: no Python frame per line)
        if sum(map(str.startswith, map(str.lstrip, lines), repeat(("•", "-")))) / len(lines) > c.max_bullet_lines_ratio:
            return "bullet_lines_ratio"
        if sum(map(str.endswith, map(str.rstrip, lines), repeat(("...", "…")))) / len(lines) > c.max_ellipsis_lines_ratio:
            return "ellipsis_lines_ratio"
        # Every token counts here, punctuation included: the 80% is of tokens with a letter.
        if (facts >> 2 * _FIELD & _MASK) / n < c.max_non_alpha_words_ratio:
            return "alpha_words_ratio"
        if len(_STOP_WORDS.intersection(words)) < c.min_stop_words:
            return "stop_words"
        return None


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(number, characters) of items that repeat an earlier item: all of them but the first
    of each distinct one (set and sums at C speed, no Python loop)."""
    distinct = set(items)
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


class GopherRepetition:
    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig, splitter: str = "rules"):
        from data_prep.repetition import ngram_rules  # numpy and numba: imported when built

        self.c, self.splitter, self._ngram_rules = cfg, splitter, ngram_rules

    def __call__(self, rec) -> str | None:
        c, text = self.c, rec.text
        paras = _PARAS.split(text.strip())
        n, chars = _dup_stats(paras)
        if n / len(paras) > c.dup_para_frac:
            return "dup_para_frac"
        if chars / len(text) > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        n, chars = _dup_stats(lines)
        if n / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if chars / len(text) > c.dup_line_char_frac:
            return "dup_line_char_frac"
        words = words_of(rec, self.splitter)
        if not words:
            return None
        # Character fractions are of the whole text, as in datatrove.
        return self._ngram_rules(words, c.top_n_grams, c.dup_n_grams, len(text))


class C4Rules:
    """C4's line rules (drop lines; they edit the document) and document rules."""

    name = "c4"

    def __init__(self, cfg: C4Config, splitter: str = "rules"):
        self.c, self.splitter = cfg, splitter

    def __call__(self, rec) -> str | None:
        c = self.c
        kept, sentences = [], 0
        for line in rec.text.splitlines():
            line = line.strip()
            words = line.split()
            if len(line) > c.max_word_length and any(len(w) > c.max_word_length for w in words):
                continue
            line = _CITATION.sub("", line)
            if c.remove_lines_without_terminal_punct and (not line.endswith(_C4_END) or line.endswith("...")):
                continue
            if len(words) < c.min_words_per_line:
                continue
            low = line.lower()
            # Document rules apply to the lines that survive the line rules, as in C4's code.
            if c.filter_lorem_ipsum and "lorem ipsum" in low:
                return "lorem_ipsum"
            if c.filter_javascript and "javascript" in low:
                continue
            if c.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if c.filter_policy and any(p in low for p in _POLICY):
                continue
            sentences += sentence_count(line, self.splitter)
            kept.append(line)
        if sentences < c.min_num_sentences:
            return "min_num_sentences"
        rec.text = "\n".join(kept).strip()
        return None


class FineWebRules:
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig, splitter: str = "rules"):
        self.c, self.splitter = cfg, splitter

    def __call__(self, rec) -> str | None:
        c, text = self.c, rec.text
        lines = [l for l in text.split("\n") if l.strip()]
        if not lines:
            return "empty_lines"
        if sum(map(ends_in_terminal, lines)) / len(lines) < c.line_punct_thr:
            return "line_punct_ratio"
        if sum(len(l) <= c.short_line_length for l in lines) / len(lines) > c.short_line_thr:
            return "short_line_ratio"
        _, dup_chars = _dup_stats(lines)
        if dup_chars / len(text.replace("\n", "")) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(word_count(rec, self.splitter), 1) > c.new_line_ratio:
            return "new_line_ratio"
        return None


class LanguageFilter:
    name = "language"

    def __init__(self, cfg: LanguageConfig):
        self.c = cfg

    def __call__(self, rec) -> str | None:
        lang, score = identifier().classify(rec.text[: self.c.max_chars].replace("\n", " "))
        if lang not in self.c.languages:
            return f"not_{'_'.join(self.c.languages)}"
        if score < self.c.min_score:
            return "low_score"
        return None


def build_filters(cfg: FiltersConfig) -> list:
    """The filter stages in the order they run."""
    stages = []
    if cfg.language.enabled:
        stages.append(LanguageFilter(cfg.language))
    # FineWeb's order: repetition, quality, C4 (which edits lines), then FineWeb's own rules.
    for on, rule, c in ((cfg.gopher_repetition.enabled, GopherRepetition, cfg.gopher_repetition),
                        (cfg.gopher_quality.enabled, GopherQuality, cfg.gopher_quality),
                        (cfg.c4.enabled, C4Rules, cfg.c4), (cfg.fineweb.enabled, FineWebRules, cfg.fineweb)):
        if on:
            stages.append(rule(c, cfg.words))
    return stages
