"""spaCy's English tokenizer and sentencizer, reproduced from their rules without spaCy.

The quality filters count words and sentences as `spacy.blank("en")` and spaCy's sentencizer
do (data_prep/words.py says why). spaCy's tokenizer is rule-driven: its rules (prefix,
suffix and infix regular expressions, a URL pattern, 1,300-odd special cases such as
"don't" -> "do", "n't") are data, exported once from the installed spaCy into
`rule_tokenizer_en.json` (`python -m data_prep.rule_tokenizer --export-rules`, which records
the spaCy version it read). This module interprets that data the way spaCy 3.x applies it
(`Tokenizer._tokenize_affixes`, `_split_affixes`, `_attach_tokens`, `_apply_special_cases`
in spacy/tokenizer.pyx; `Sentencizer.predict`), so spaCy is not needed to run it.

Why it is fast: spaCy splits text at whitespace and tokenizes each whitespace-delimited chunk
independently, so the tokens of a chunk can be cached. Text is split with `str.split()`
(the same whitespace as spaCy's `str.isspace` test) and each chunk costs one dict lookup after
its first occurrence; the regular expressions run only on chunks not yet seen. A new chunk
costs less where its rest is known: once a prefix or suffix is peeled off ("word," ->
"word"), the rest is tokenized as it would be alone, so a cached rest ends the work; and no
pattern can match inside a run of ASCII letters (proved on the patterns when they load), so
such a rest needs no regular expression. The patterns that do run skip what cannot match,
read from the parsed patterns when they load (data_prep/affix_patterns.py): a chunk without a
"." cannot be a URL; no suffix ends with a character that no alternative ends with; infix
and suffix matches start with a character from a small set, which a lookahead checks
before the alternation is tried.

Memory: each cache holds at most two generations of `cache_entries` chunks (a chunk found in
the old generation moves to the new one; when the new one is full the old one is dropped: an
approximate LRU at one dict lookup per hit). A chunk's words cost ~210 bytes, so the default
2 x 131,072 entries bound the words at ~55 MB per process, whatever the corpus size; the
sentence cache shares its keys and values, ~100 bytes an entry. 131,072 is about the number
of distinct chunks in 30 MB of Python's documentation sources, so hits dominate on real text.
The rare chunks that the special-case pass changes are kept apart, at most `cache_entries` of
them (all caches are emptied when they would be more).

One step is not per chunk: spaCy's final special-case pass (a PhraseMatcher over the whole
document) can see a match across two chunks, which changes nothing itself but can block a
match inside one of them. Chunks whose own tokens that pass changed are rare (emoticons,
"10a.m."); a text with one of them takes an exact, uncached path (`_tokens_exact`).
"""
from __future__ import annotations

import argparse
import json
import re
import unicodedata
from itertools import chain
from pathlib import Path

from data_prep import affix_patterns as patterns

RULES_FILE = Path(__file__).with_name("rule_tokenizer_en.json")
CACHE_ENTRIES = 1 << 17
# Whitespace that is not one space between two chunks: spaCy makes it a token of its own.
_NOT_ONE_SPACE = re.compile(r"\s{2,}|[^\S ]")


def is_punct(token: str) -> bool:
    """spaCy's lexical IS_PUNCT: every character in a Unicode punctuation category (P*)."""
    return all(unicodedata.category(c).startswith("P") for c in token)


class BoundedMemo(dict):
    """A memo of at most 2 x `limit` entries: the current generation is this dict, `old` the
    previous one, `fill` computes a missing value. Used through `__getitem__`, so
    `map(memo.__getitem__, keys)` runs at C speed on hits."""

    def __init__(self, fill, limit: int):
        super().__init__()
        self.fill, self.limit, self.old = fill, limit, {}

    def __missing__(self, key):
        value = self.old.get(key)
        if value is None:
            value = self.fill(key)
        if len(self) >= self.limit:
            self.old = dict(self)
            self.clear()
        self[key] = value
        return value


class RuleTokenizer:
    """Tokens and sentence counts of spaCy's English rules (see the module docstring)."""

    def __init__(self, rules_file: Path = RULES_FILE, cache_entries: int = CACHE_ENTRIES):
        rules = json.loads(Path(rules_file).read_text(encoding="utf-8"))
        self.spacy_version = rules["spacy_version"]

        def compiled(key):
            pat = rules[key]
            return None if pat is None else re.compile(pat["pattern"], pat["flags"])

        # Whether no prefix, suffix, infix or URL pattern can match inside a chunk of ASCII
        # letters (proved on the patterns): such a chunk is then one token unless it is
        # a special case ("dont"), and costs no regular expression.
        self._letters_plain = not any(patterns.may_match_letters(compiled(k)) for k in
                                      ("prefix_search", "suffix_search", "infix_finditer", "token_match", "url_match"))
        prefix = compiled("prefix_search")
        # (the ASCII-only pattern for ASCII chunks, see patterns.ascii_only: a chunk's rest is ASCII too)
        self._prefix_ascii, self._prefix = patterns.by_script(prefix.pattern, prefix.flags, "search")
        self._suffix = patterns.suffix_search(compiled("suffix_search"))
        self._infix = patterns.infix_finditer(compiled("infix_finditer"))
        token_match, url_match = compiled("token_match"), compiled("url_match")
        self._token_match = token_match.match if token_match else None
        self._url_match = url_match.match if url_match else None
        # spaCy's URL pattern needs a "." (in the host): a chunk without one needs no match.
        self._url_needs_dot = not patterns.may_match_within(url_match, patterns.has_not_dot)
        self._specials: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in rules["special_cases"].items()}
        self._punct_chars = frozenset(rules["sentencizer_punct_chars"])
        # The final special-case pass matches the affix split of a special case (computed
        # without special cases) among a chunk's tokens. With spaCy's default
        # faster_heuristics only special cases that an affix rule would split take part. A
        # one-token pattern that its special case leaves as it is ("'") changes nothing and,
        # shortest of all, blocks no other match: it is left out.
        self._matcher: dict[tuple[str, ...], str] = {}
        for string in sorted(self._specials):
            if (not rules["faster_heuristics"] or " " in string or self._affix_len(self._prefix, string)
                    or self._affix_len(self._suffix, string) or any(True for _ in self._infix(string))):
                pattern = tuple(self._split_chunk(string, False))
                if len(pattern) > 1 or pattern != self._specials[string]:
                    self._matcher[pattern] = string
        self._lengths_from: dict[str, list[int]] = {}  # first token -> pattern lengths, longest first
        for p in self._matcher:
            self._lengths_from.setdefault(p[0], []).append(len(p))
        for lengths in self._lengths_from.values():
            lengths.sort(reverse=True)
        self._pattern_pairs = frozenset(p[:2] for p in self._matcher if len(p) > 1)
        self._pattern_singles = frozenset(p[0] for p in self._matcher if len(p) == 1)
        # A match across a chunk boundary ends the left chunk with a token that is not a
        # pattern's last and starts the right one with a token that is not a pattern's first.
        self._not_last = frozenset(t for p in self._matcher for t in p[:-1])
        self._not_first = frozenset(t for p in self._matcher for t in p[1:])
        self.words_of_chunk = BoundedMemo(self._chunk_words, cache_entries)
        self._sentence_steps = BoundedMemo(self._chunk_sentence_steps, cache_entries)
        self._steps: dict[tuple, tuple] = {}
        # Chunks the special-case pass changed -> their tokens before it (see _chunk_words).
        self._passed: dict[str, list[str]] = {}

    # ---- tokens -------------------------------------------------------------------------

    @staticmethod
    def _affix_len(search, string: str) -> int:
        m = search(string)
        return m.end() - m.start() if m is not None else 0

    def _split_chunk(self, string: str, with_specials: bool) -> list[str]:
        """The tokens of one whitespace-free chunk, before the final special-case pass."""
        specials = self._specials if with_specials else {}
        if string in specials:
            return list(specials[string])
        token_match = self._token_match
        plain = self._letters_plain
        prefix_search, suffix_search = self._prefix_ascii if string.isascii() else self._prefix, self._suffix
        # (the caches are not yet there in __init__, which splits without special cases)
        new, old = (self.words_of_chunk, self.words_of_chunk.old) if with_specials else ({}, {})
        prefixes: list[str] = []
        suffixes: list[str] = []
        last = 0
        # Peel prefixes and suffixes until neither rule matches, stopping early at a token
        # match or at a special case, which then decides the rest.
        while string and len(string) != last:
            if token_match is not None and token_match(string):
                break
            if string in specials:
                break
            if plain and string.isascii() and string.isalpha():
                break  # no pattern can match inside it (see _letters_plain): nothing to peel
            last = len(string)
            m = prefix_search(string)
            pre_len = m.end() - m.start() if m is not None else 0
            if pre_len:
                prefix, minus_pre = string[:pre_len], string[pre_len:]
                if minus_pre and minus_pre in specials:
                    string = minus_pre
                    prefixes.append(prefix)
                    break
            m = suffix_search(string[pre_len:] if pre_len else string)
            suf_len = m.end() - m.start() if m is not None else 0
            if suf_len:
                suffix, minus_suf = string[-suf_len:], string[:-suf_len]
                if minus_suf and minus_suf in specials:
                    string = minus_suf
                    suffixes.append(suffix)
                    break
            if pre_len and suf_len and pre_len + suf_len <= len(string):
                string = string[pre_len:-suf_len]
                prefixes.append(prefix)
                suffixes.append(suffix)
            elif pre_len:
                string = minus_pre
                prefixes.append(prefix)
            elif suf_len:
                string = minus_suf
                suffixes.append(suffix)
            else:
                break  # nothing peeled: the loop would end here
            # The loop's decisions depend on the string alone, so the rest of a chunk is
            # tokenized as that string would be on its own: if it was ("word" of "word,"),
            # its tokens before the special-case pass are known.
            core = new.get(string) or old.get(string)  # (a chunk's tokens are never empty)
            if core is not None:
                pre = self._passed.get(string)
                tokens = prefixes + list(core if pre is None else pre)
                tokens.extend(reversed(suffixes))
                return tokens
        tokens = prefixes
        if string:
            if string in specials:
                tokens.extend(specials[string])
            elif plain and string.isascii() and string.isalpha():
                tokens.append(string)
            elif (token_match is not None and token_match(string)) or (
                    self._url_match is not None and ("." in string or not self._url_needs_dot) and self._url_match(string)):
                tokens.append(string)
            else:
                start = 0
                for m in self._infix(string):
                    s, e = m.start(), m.end()
                    if s == 0:  # an infix at the very start splits nothing
                        continue
                    if s != start:
                        tokens.append(string[start:s])
                    if s != e:
                        tokens.append(string[s:e])
                    start = e
                if string[start:]:
                    tokens.append(string[start:])
        tokens.extend(reversed(suffixes))
        return tokens

    def _special_pass(self, tokens: list[str], owner: list[int] | None = None) -> list[str]:
        """Re-split token runs that spell a special case (spaCy's _apply_special_cases).
        Matches are taken longest first, then earliest; a match is dropped when its first or
        last token is covered by a match seen before it, taken or not (spaCy marks the tokens
        of every match it looks at). `owner[i]` is the chunk of token i: a match across two
        chunks has a space in its text, so spaCy finds no rule for it and leaves its tokens,
        but it still covers them."""
        # Almost every chunk has no pattern's first two tokens side by side (nor a one-token
        # pattern): checked at C speed before any matching.
        if self._pattern_pairs.isdisjoint(zip(tokens, tokens[1:])) and self._pattern_singles.isdisjoint(tokens):
            return tokens
        starts = self._lengths_from
        matches = []
        n = len(tokens)
        for i, tok in enumerate(tokens):
            for length in starts.get(tok, ()):
                string = self._matcher.get(tuple(tokens[i : i + length])) if i + length <= n else None
                if string is not None:
                    matches.append((i, i + length, string))
        if not matches:
            return tokens
        matches.sort(key=lambda m: (m[0] - m[1], m[0]))
        covered: set[int] = set()
        taken = []
        for start, end, string in matches:
            if start not in covered and end - 1 not in covered and (owner is None or owner[start] == owner[end - 1]):
                taken.append((start, end, string))
            covered.update(range(start, end))
        out, i = [], 0
        for start, end, string in sorted(taken):
            out.extend(tokens[i:start])
            out.extend(self._specials[string])
            i = end
        out.extend(tokens[i:])
        return out

    def _chunk_words(self, chunk: str) -> tuple[str, ...]:
        tokens = self._split_chunk(chunk, True)
        if len(tokens) == 1:
            return (chunk,)  # the key itself: a one-word entry costs no second string
        final = self._special_pass(tokens)
        if final != tokens:
            # The special-case pass changed this chunk: a match across it and its neighbour
            # could block that (see _special_pass), so texts with it take the exact path.
            if len(self._passed) >= self.words_of_chunk.limit:
                self._clear()
            self._passed[chunk] = tokens
        return tuple(final)

    def _clear(self):
        for cache in (self.words_of_chunk, self._sentence_steps):
            cache.clear()
            cache.old = {}
        self._passed.clear()

    def _pre_tokens(self, chunk: str):
        """A cached chunk's tokens before the special-case pass."""
        pre = self._passed.get(chunk)
        return self.words_of_chunk[chunk] if pre is None else pre

    def _straddles(self, left: str, right: str) -> bool:
        """Whether a special-case match could cross the boundary between two chunks."""
        return self._pre_tokens(left)[-1] in self._not_last and self._pre_tokens(right)[0] in self._not_first

    def _risky_pairs(self, chunks: list[str]):
        """Neighbouring chunks across which a match could block one that the pass made inside
        a chunk: only next to a chunk that the pass changed (rare: "):" and ";)" in code,
        emoticons, "10a.m.")."""
        passed = self._passed
        if not passed or passed.keys().isdisjoint(chunks):
            return
        last = len(chunks) - 1
        for i, c in enumerate(chunks):
            if c in passed:
                if i > 0 and self._straddles(chunks[i - 1], c):
                    yield chunks[i - 1], c
                if i < last and self._straddles(c, chunks[i + 1]):
                    yield c, chunks[i + 1]

    def _run_tokens(self, run: list[str]) -> list[str]:
        """The tokens of chunks joined by single spaces, the special-case pass over all of
        them when a match could cross chunks (see _risky_pairs)."""
        if len(run) < 2 or next(self._risky_pairs(run), None) is None:
            return list(chain.from_iterable(map(self.words_of_chunk.__getitem__, run)))
        tokens, owner = [], []
        for k, chunk in enumerate(run):
            pre = self._pre_tokens(chunk)
            tokens += pre
            owner += [k] * len(pre)
        return self._special_pass(tokens, owner)

    def _tokens_exact(self, text: str) -> list[str]:
        """All of spaCy's tokens of text, whitespace tokens included. Whitespace between chunks
        other than one space is a token and ends a run of chunks: no special-case pattern
        holds one, so no match crosses it."""
        pieces = re.split(r"(\S+)", text)  # gap, chunk, gap, ..., chunk, gap
        out: list[str] = []
        run: list[str] = []
        for i in range(1, len(pieces), 2):
            gap = pieces[i - 1]
            if gap and (i == 1 or gap != " "):  # a lone space after a token belongs to it
                out += self._run_tokens(run)
                run.clear()
                out.append(gap if i == 1 or gap[0] != " " else gap[1:])
            run.append(pieces[i])
        out += self._run_tokens(run)
        tail = pieces[-1][1:] if pieces[-1][:1] == " " else pieces[-1]
        if tail:
            out.append(tail)
        return out

    def words(self, text: str) -> list[str]:
        """spaCy's token texts, whitespace tokens left out (as datatrove strips them)."""
        chunks = text.split()
        out = list(chain.from_iterable(map(self.words_of_chunk.__getitem__, chunks)))
        # Such a pair matters only with one space between its chunks.
        if not any(f"{left} {right}" in text for left, right in self._risky_pairs(chunks)):
            return out
        out = []
        for run in _NOT_ONE_SPACE.split(text):
            out += self._run_tokens(run.split())
        return out

    def word_count(self, text: str) -> int:
        """len(self.words(text)), without building the list."""
        chunks = text.split()
        n = sum(map(len, map(self.words_of_chunk.__getitem__, chunks)))
        if any(f"{left} {right}" in text for left, right in self._risky_pairs(chunks)):
            return len(self.words(text))
        return n

    # ---- sentences ----------------------------------------------------------------------

    def _sentence_starts(self, tokens, seen: bool) -> tuple[int, bool]:
        starts = 0
        for tok in tokens:
            if tok in self._punct_chars:
                seen = True
            elif seen and not is_punct(tok):
                starts += 1
                seen = False
        return starts, seen

    def _chunk_sentence_steps(self, chunk: str) -> tuple[int, bool, int, bool]:
        """The sentencizer over one chunk's tokens, from either state: (sentence starts,
        state after) when no sentence-ending punctuation was pending, then when it was."""
        tokens = self.words_of_chunk[chunk]
        steps = self._sentence_starts(tokens, False) + self._sentence_starts(tokens, True)
        return self._steps.setdefault(steps, steps)  # a handful of distinct values, shared

    def sentence_count(self, text: str) -> int:
        """len(list(nlp(text).sents)) for spaCy's sentencizer: a sentence starts at the first
        token that is not punctuation after a token in its punct_chars list. Whitespace other
        than one space after a chunk is a token of its own (spaCy keeps it), which can start a
        sentence."""
        chunks = text.split()
        if not chunks:
            return 1 if text else 0
        steps = list(map(self._sentence_steps.__getitem__, chunks))
        if any(f"{left} {right}" in text for left, right in self._risky_pairs(chunks)):
            return 1 + self._sentence_starts(self._tokens_exact(text), False)[0]
        count, seen = 1, False
        if " ".join(chunks) == text:  # no whitespace tokens
            for s0, e0, s1, e1 in steps:
                count, seen = (count + s1, e1) if seen else (count + s0, e0)
            return count
        gaps = re.split(r"\S+", text)
        for i, (s0, e0, s1, e1) in enumerate(steps):
            if seen and gaps[i] != " ":  # (gaps[0] is the leading whitespace; nothing is pending there)
                count, seen = count + 1, False
            count, seen = (count + s1, e1) if seen else (count + s0, e0)
        trailing = gaps[-1][1:] if gaps[-1][:1] == " " else gaps[-1]
        return count + 1 if seen and trailing else count


def export_rules(out: Path = RULES_FILE) -> dict:
    """Write spaCy's English tokenizer rules and sentencizer punctuation to `out` (run where
    spaCy is installed; the data is MIT-licensed, see the file's `source` field)."""
    import spacy
    from spacy.attrs import ORTH
    from spacy.pipeline.sentencizer import Sentencizer

    tok = spacy.blank("en").tokenizer

    def pattern(fn):
        return None if fn is None else {"pattern": fn.__self__.pattern, "flags": int(fn.__self__.flags)}

    data = {
        "source": f"spaCy {spacy.__version__} (MIT licence, Explosion AI): spacy.blank('en').tokenizer rules "
                  "and Sentencizer.default_punct_chars; written by python -m data_prep.rule_tokenizer --export-rules",
        "spacy_version": spacy.__version__,
        "prefix_search": pattern(tok.prefix_search),
        "suffix_search": pattern(tok.suffix_search),
        "infix_finditer": pattern(tok.infix_finditer),
        "token_match": pattern(tok.token_match),
        "url_match": pattern(tok.url_match),
        "faster_heuristics": bool(tok.faster_heuristics),
        "special_cases": {k: [t[ORTH] for t in v] for k, v in sorted(tok.rules.items())},
        "sentencizer_punct_chars": list(Sentencizer.default_punct_chars),
    }
    Path(out).write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    return data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_prep.rule_tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-rules", action="store_true", help="read the installed spaCy's English rules into --out")
    ap.add_argument("--out", type=Path, default=RULES_FILE, help=f"rules file (default {RULES_FILE.name} beside this module)")
    ap.add_argument("text", nargs="*", help="without --export-rules: print the tokens and sentence count of TEXT")
    args = ap.parse_args(argv)
    if args.export_rules:
        data = export_rules(args.out)
        print(f"{args.out}: spaCy {data['spacy_version']}, {len(data['special_cases'])} special cases")
        return
    tok = RuleTokenizer(args.out)
    text = " ".join(args.text)
    print(json.dumps({"words": tok.words(text), "sentences": tok.sentence_count(text)}, ensure_ascii=False))


if __name__ == "__main__":
    main()
