"""The rule tokenizer gives spaCy's tokens and sentence counts (spaCy stays installed for the
tests: it is the reference), on real text of several kinds and on the hard cases one by one;
its caches stay bounded; its rules file is the installed spaCy's; and `prepare` runs without
spaCy. The agreement of whole filters with datatrove is in test_filters.py."""
import json
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from prep_corpus import real_documents
from data_prep.affix_patterns import PER_CHAR, ascii_only, infix_finditer, suffix_search
from data_prep.rule_tokenizer import RULES_FILE, RuleTokenizer, export_rules
from data_prep.words import sentence_count, split_words

ROOT = Path(__file__).resolve().parents[2]


def _spacy(text):
    return split_words(text, "spacy"), sentence_count(text, "spacy")


def _real_texts() -> dict[str, list[str]]:
    """Small slices of three kinds of real text that every machine with this Python has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    code = [p.read_text(encoding="utf-8", errors="replace")[:20_000] for p in sorted(stdlib.glob("*.py"))[::6]]
    markup = [p.read_text(encoding="utf-8", errors="replace")[:20_000]
              for p in (sorted(site.glob("*.dist-info/METADATA"))[::4] + sorted(site.glob("*/*.md"))[::3]) if p.is_file()]
    return {"prose": real_documents(300), "code": code, "markup": markup}


def test_same_tokens_and_sentences_as_spacy_on_real_text():
    """Every document's words and every line's sentence count, on docstring prose, Python
    source and package READMEs/metadata (markdown, reStructuredText, HTML fragments). Failed
    first: there was no splitter but spaCy's and a regex (the regex differs on most documents)."""
    rt = RuleTokenizer()
    for kind, texts in _real_texts().items():
        assert sum(map(len, texts)) > 200_000, kind
        lines = 0
        for text in texts:
            words = split_words(text, "spacy")
            assert rt.words(text) == words, kind
            assert rt.word_count(text) == len(words)
            for line in text.splitlines()[:300]:
                line = line.strip()
                if line:
                    lines += 1
                    assert rt.sentence_count(line) == sentence_count(line, "spacy"), (kind, line)
        assert lines > 1000, kind
    assert split_words(real_documents(300)[0], "regex") != split_words(real_documents(300)[0], "spacy")


HARD = {
    # contractions and their special cases, in any case
    "I don't know, y'all can't say I'm wrong; DON'T. Ain't it? He'd've gone 'cause o'clock.": None,
    "dont Im cannot gonna wanna ma'am rock'n'roll O'Neil's": None,
    # URLs, e-mail, paths, handles
    "See https://example.com/a_b?c=d&e=f#g, www.python.org. or mail me@host.org (http://x.y/z).": None,
    "~/bin/tool --flag=1 ./a/b.py:12 C:\\Users\\x #tag @user 192.168.0.1:8080": None,
    # emoticons, and the special-case pass across chunks: in code, "):" is one token unless a
    # match across the space before it (": (") covers its first token
    "Nice :) :-( (: ;) <3 ^_^ (-_-) o.O xD :P": ["Nice", ":)", ":-(", "(:", ";)", "<3", "^_^", "(-_-)", "o.O", "xD", ":P"],
    "def f(x): return g(y):": None,
    "z.:( ;)where": ["z.", ":(", ";", ")", "where"],
    "Note: (:class:`str`) and x(y): (:ref:`z`)": None,
    # hyphens and dashes
    "co-operate well-known --verbose a--b 1990-2000 -5 —dash– x-": None,
    # numbers, units and money
    "3.5km $5.00 1,000,000 10:30am 5' 6\" 50% 1st 2nd 3.14159e-10 +1 #1 £3 €4": None,
    # quotes and brackets
    "\u201cHello,\u201d she said. \u2018Quoted\u2019 'single' \"double\" (nested [brackets {braces}])": None,
    # ellipses and sentence ends
    "Wait... what?! Really?? Yes. No!... \u2026 Ok\u2026 e.g. U.S.A. etc. Mr. Smith vs. Dr. Who.": None,
    # non-ASCII letters, other scripts, other whitespace
    "na\u00efve Stra\u00dfe caf\u00e9s \u65e5\u672c\u8a9e\u3002\u6587 \u041f\u0440\u0438\u0432\u0435\u0442! \u00bd \u00b2 \u2122 \ufb01 a\u3000b\xa0c": None,
}


@pytest.mark.parametrize("text", list(HARD))
def test_hard_cases(text):
    rt = RuleTokenizer()
    words, sents = _spacy(text)
    assert rt.words(text) == words
    assert rt.sentence_count(text) == sents
    if HARD[text] is not None:
        assert words == HARD[text]


def test_special_cases_side_by_side():
    """Special cases and their pieces glued together and spaced apart at random (fixed seed):
    the final special-case pass, its longest-first order and the matches across chunks that
    block one inside a chunk ("z.:( ;)where") are where a reimplementation slips."""
    import random

    rt = RuleTokenizer()
    pieces = sorted({t for p in rt._matcher for t in p} | set(rt._matcher.values()) | set(rt._specials))
    rng = random.Random(20)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) + rng.choice(["", "", " ", " ", "  ", "\n", ". "]) for _ in range(rng.randint(2, 6)))
        assert rt.words(text) == split_words(text, "spacy"), text
        assert rt.sentence_count(text) == sentence_count(text, "spacy"), text


@pytest.mark.parametrize("text", ["One.  Two", "One.\tTwo", "One. \nTwo", " One. Two ", "One.  ", "One! ? Two", "  ",
                                  "Dr. Who? Yes.", "x.:( ;)y. (: z"])
def test_whitespace_tokens_in_sentence_counts(text):
    """spaCy keeps whitespace other than one space as a token, which can start a sentence."""
    assert RuleTokenizer().sentence_count(text) == sentence_count(text, "spacy")


def test_guarded_affix_searches_answer_as_the_patterns():
    """The suffix search and infix finditer skip chunks and positions where no alternative can
    start or end (read from the parsed patterns); they answer as the plain patterns do, on
    random chunks of printable ASCII, Latin-1, other scripts and symbols. The URL pattern,
    skipped on chunks without a ".", matches none of them."""
    rules = json.loads(RULES_FILE.read_text(encoding="utf-8"))
    suffix = re.compile(rules["suffix_search"]["pattern"], rules["suffix_search"]["flags"])
    infix = re.compile(rules["infix_finditer"]["pattern"], rules["infix_finditer"]["flags"])
    fast_suffix, fast_infix = suffix_search(suffix), infix_finditer(infix)
    assert fast_suffix is not suffix.search and fast_infix is not infix.finditer  # the fast paths are in use
    url = re.compile(rules["url_match"]["pattern"], rules["url_match"]["flags"])
    assert RuleTokenizer()._url_needs_dot
    assert url.match("a.bc/d") and url.match("user@host.org:80/x?y=z")
    alphabet = [chr(c) for c in range(33, 127)] * 4 + [chr(c) for c in range(0xA0, 0x2200, 7)] + ["\U0001f600"]
    rnd = random.Random(0)
    for _ in range(40_000):
        chunk = "".join(rnd.choices(alphabet, k=rnd.randint(0, 12)))
        m, f = suffix.search(chunk), fast_suffix(chunk)
        assert (m and m.span()) == (f and f.span()), chunk
        assert [m.span() for m in infix.finditer(chunk)] == [m.span() for m in fast_infix(chunk)], chunk
        assert "." in chunk or not url.match(chunk + "com"), chunk


def test_per_character_patterns_answer_as_the_patterns_and_are_bounded():
    """The suffix search and the infix finditer try, at a character, only the alternatives
    that can end (start) with it, compiled once per set of alternatives and kept for at most
    PER_CHAR characters: on chunks over thousands of distinct characters, some ending in a
    newline (where $ also matches before it), they answer as the plain patterns, and the
    per-character tables stay within the bound."""
    rules = json.loads(RULES_FILE.read_text(encoding="utf-8"))
    suffix = re.compile(rules["suffix_search"]["pattern"], rules["suffix_search"]["flags"])
    infix = re.compile(rules["infix_finditer"]["pattern"], rules["infix_finditer"]["flags"])
    fast_suffix, fast_infix = suffix_search(suffix), infix_finditer(infix)
    punct = list("-.,:;!?'\"()[]{}<>/+*^~=_$%&#@") + ["...", "\n"]
    alphabet = [chr(c) for c in range(0x100, 0x100 + 3 * PER_CHAR)] + [chr(c) for c in range(48, 123)]
    rnd = random.Random(1)
    for i in range(3 * PER_CHAR):
        chunk = "".join(rnd.choice(alphabet) if rnd.random() < 0.7 else rnd.choice(punct) for _ in range(rnd.randint(1, 8)))
        chunk += alphabet[i]  # every character ends some chunk
        for c in (chunk, chunk + rnd.choice(punct)):
            m, f = suffix.search(c), fast_suffix(c)
            assert (m and m.span()) == (f and f.span()), c
            assert [m.span() for m in infix.finditer(c)] == [m.span() for m in fast_infix(c)], c
    assert 0 < len(fast_suffix.per_char) <= PER_CHAR and 0 < len(fast_infix.per_char) <= PER_CHAR


def test_ascii_only_patterns_match_as_the_patterns_on_ascii():
    """Each of spaCy's patterns, its classes cut to their ASCII characters, finds the same
    matches on ASCII strings (random printable ASCII and punctuation runs); so do classes with
    negation, a leading "]", escapes and none of ASCII left (under a quantifier and in a
    lookbehind)."""
    rules = json.loads(RULES_FILE.read_text(encoding="utf-8"))
    patterns = [re.compile(rules[k]["pattern"], rules[k]["flags"]) for k in ("prefix_search", "suffix_search", "infix_finditer", "url_match")]
    patterns += [re.compile(p) for p in (r"[^a-z\]]+", r"[]x]y", r"(?<=[\u00e0-\u00ff])a|b[\u0400-\u04ff]*c", r"[\w\-.]{2,}[\d\u0660]")]
    alphabet = [chr(c) for c in range(32, 127)] + list("....---''")
    rnd = random.Random(3)
    strings = ["".join(rnd.choices(alphabet, k=rnd.randint(0, 14))) for _ in range(20_000)]
    for p in patterns:
        cut = re.compile(ascii_only(p.pattern, p.flags), p.flags)
        assert len(cut.pattern) < len(p.pattern) or p.pattern.isascii()
        for s in strings:
            assert [m.span() for m in p.finditer(s)] == [m.span() for m in cut.finditer(s)], (p.pattern[:40], s)


def test_caches_are_bounded():
    """Memory is bounded by cache_entries whatever the input: two generations of at most that
    many chunks each, and the results do not depend on what was evicted."""
    rt = RuleTokenizer(cache_entries=500)
    texts = real_documents(300)[:40]
    first = [rt.words(t) for t in texts]
    assert max(len(rt.words_of_chunk), len(rt.words_of_chunk.old)) <= 500
    assert len(rt.words_of_chunk) + len(rt.words_of_chunk.old) > 500  # the bound was reached
    assert [rt.words(t) for t in texts] == first == [split_words(t, "spacy") for t in texts]


def test_rules_file_is_the_installed_spacys(tmp_path):
    """The committed rules are what `--export-rules` reads from the installed spaCy (after a
    spaCy upgrade: run it again and commit the file)."""
    fresh = export_rules(tmp_path / "rules.json")
    assert fresh == json.loads(RULES_FILE.read_text(encoding="utf-8"))
    assert RuleTokenizer(tmp_path / "rules.json").spacy_version == fresh["spacy_version"]


def test_prepare_and_config_need_neither_spacy_nor_a_cycle(tmp_path):
    """A prepare task with the web filters imports no spaCy, and the config validates a
    language code without importing the filters. Failed first: the default splitter was spaCy,
    and config.py imported filters.py, which imports config.py."""
    rows = [{"id": f"d{i}", "text": t} for i, t in enumerate(real_documents(120)[:20])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = f"""
import json, sys
from data_prep.config import LanguageConfig, PrepConfig
LanguageConfig(languages=["en", "de"])
assert "data_prep.filters" not in sys.modules, "config imported the filters"
from data_prep.plan import make_plan
from data_prep.prepare import run_prepare
cfg = PrepConfig.model_validate({{"sources": [{{"name": "w", "type": "jsonl", "paths": [{str(tmp_path / 'in.jsonl')!r}],
    "filters": "web"}}], "filters": {{"c4": {{"enabled": True}}}}}})
stats = [run_prepare(cfg, t, __import__("pathlib").Path({str(tmp_path / 'prep')!r})) for t in make_plan(cfg)]
print(json.dumps([sorted(m for m in sys.modules if m.split(".")[0] == "spacy"), stats[0]["filter_inputs"]]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    spacy_modules, inputs = json.loads(r.stdout.strip().splitlines()[-1])
    assert spacy_modules == []
    assert dict(inputs)["gopher_quality"] > 0 and dict(inputs)["c4"] > 0  # the word rules ran
