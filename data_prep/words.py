"""Words and sentences as the reference filters count them.

Gopher, C4 and FineWeb thresholds were set on counts from a particular word splitter; the
reference implementation FineWeb used (datatrove) splits English with spaCy's rule-based
tokenizer (`spacy.blank("en")`: punctuation marks are tokens of their own, "don't" is "do" +
"n't"), and counts C4 sentences with spaCy's sentencizer. So do we, so that a threshold means
what it meant there (tests/data_prep/test_filters.py checks agreement against datatrove).

Three splitters (`filters.words`):
- "rules" (default): spaCy's English rules applied without spaCy (data_prep/rule_tokenizer.py):
  the same tokens and sentence counts, each distinct whitespace-delimited chunk tokenized once
  per process; 11-14x faster than spaCy from an empty cache (bench/filter_agreement.py
  measures both).
- "spacy": spaCy itself (imported only then), ~0.2-1 MB/s per core: the reference.
- "regex": one regular expression; its agreement with datatrove is not measured.

A document is split once and its words are shared by every filter (`words(rec)`); datatrove
splits it again in each filter.
"""
from __future__ import annotations

import re

import regex

# datatrove.utils.text.PUNCTUATION: a token made only of these is a symbol, not a word.
PUNCTUATION = set(
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))))
)
# Lines "end in terminal punctuation" (FineWeb): Unicode's Sentence_Terminal characters as
# datatrove lists them (its table predates Unicode 16 and adds three Khmer signs).
_TERMINAL_END = regex.compile(
    r"[[\p{Sentence_Terminal}៖៙៚]--[\u1b4e\u1b4f\u1b7f․⳹⳺⳻\u2e60\u2e61︒︕︖\U000113d4\U000113d5\U00016d6e\U00016d6f]]\Z",
    regex.V1)
_REGEX_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]", re.UNICODE)

_nlp = None
_rules = None


def _spacy():
    global _nlp
    if _nlp is None:
        import spacy

        _nlp = spacy.blank("en")
        _nlp.add_pipe("sentencizer")
    return _nlp


def rule_tokenizer():
    """The process's RuleTokenizer (its caches are per process and bounded)."""
    global _rules
    if _rules is None:
        from data_prep.rule_tokenizer import RuleTokenizer

        _rules = RuleTokenizer()
    return _rules


def split_words(text: str, splitter: str = "rules") -> list[str]:
    if splitter == "rules":
        return rule_tokenizer().words(text)
    if splitter == "regex":
        return _REGEX_WORD.findall(text)
    nlp = _spacy()
    nlp.max_length = len(text) + 10
    with nlp.memory_zone():
        # Only the tokenizer: the sentencizer is for sentence_count.
        return [s for s in (t.text.strip() for t in nlp.tokenizer(text)) if s]


def words(rec, splitter: str = "rules") -> list[str]:
    """The words of rec.text, computed once per text (C4 may edit the text in between)."""
    cached = rec.words_cache
    if cached is None or cached[0] is not rec.text or cached[1] != splitter:
        cached = rec.words_cache = (rec.text, splitter, split_words(rec.text, splitter))
    return cached[2]


def word_count(rec, splitter: str = "rules") -> int:
    """len(words(rec)); after C4 has edited the text, FineWeb only needs the count."""
    cached = rec.words_cache
    if cached is not None and cached[0] is rec.text and cached[1] == splitter:
        return len(cached[2])
    if splitter == "rules":
        return rule_tokenizer().word_count(rec.text)
    return len(words(rec, splitter))


def sentence_count(line: str, splitter: str = "rules") -> int:
    if splitter == "rules":
        return rule_tokenizer().sentence_count(line)
    if splitter == "regex":
        return max(1, len(re.findall(r"[.!?]+(?:[\"'”’)\]]*)(?:\s|$)", line)))
    nlp = _spacy()
    nlp.max_length = len(line) + 10
    with nlp.memory_zone():
        return sum(1 for _ in nlp(line).sents)


def ends_in_terminal(line: str) -> bool:
    return _TERMINAL_END.search(line) is not None
