"""What a regular expression can match, read from its parse, to skip the work that cannot match.

spaCy's tokenizer rules are a few large regular expressions (prefix, suffix, infix, URL) whose
character classes list hundreds of Unicode ranges, tried at every position of every chunk.
data_prep/rule_tokenizer.py applies them unchanged; this module reads the parsed patterns
(`re._parser`) once, when the rules load, and builds equivalent searchers that try less:

- `may_match_letters` / `may_match_within`: proof that a pattern cannot match inside a string of
  given characters (a run of ASCII letters needs no regular expression at all);
- `ascii_only` / `by_script`: the same pattern with its classes cut to ASCII, for ASCII strings
  (one bitmap lookup per class instead of a walk over its ranges);
- `infix_finditer` / `suffix_search`: finditer and search that try, at each character, only the
  alternatives that can start (infix) or end (suffix) with it, compiled per character on first
  use and kept for at most `PER_CHAR` characters.

Each gives the same matches as the pattern itself: tests/data_prep/test_rule_tokenizer.py
compares them on real text and on random strings. A construct not understood here makes the
searcher fall back to the pattern as it is.
"""
from __future__ import annotations

import re

_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _has_letter(lo: int, hi: int) -> bool:
    return any(lo <= ord(c) <= hi for c in _ASCII_LETTERS)


def has_not_dot(lo: int, hi: int) -> bool:
    return not lo == hi == ord(".")


def may_match_letters(pattern: re.Pattern | None) -> bool:
    """False only when the pattern provably cannot match anywhere inside a string of ASCII
    letters (see may_match_within)."""
    return may_match_within(pattern, _has_letter)


def may_match_within(pattern: re.Pattern | None, allowed) -> bool:
    """False only when the pattern provably cannot match anywhere inside a string of the
    allowed characters (`allowed(lo, hi)`: whether one is in that code point range): it needs
    a character (or a lookaround needs one) that is not allowed. Read from the parsed
    pattern; any construct not understood here counts as a possible match."""
    if pattern is None:
        return False
    from re import _constants as C, _parser

    def in_class(items) -> bool:
        for op, av in items:
            if op is C.LITERAL and allowed(av, av):
                return True
            if op is C.RANGE and allowed(*av):
                return True
            if op not in (C.LITERAL, C.RANGE):  # categories, negation: assume an allowed one is in
                return True
        return False

    def may(items) -> bool:  # can this sequence match within the allowed characters?
        for op, av in items:
            if op is C.LITERAL:
                ok = allowed(av, av)
            elif op is C.IN:
                ok = in_class(av)
            elif op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
                ok = av[0] == 0 or may(av[2].data)
            elif op is C.SUBPATTERN:
                ok = bool(av[1] & re.IGNORECASE) or may(av[3].data)
            elif op is C.BRANCH:
                ok = any(may(b.data) for b in av[1])
            elif op is C.ASSERT:  # a lookaround must see its characters, allowed ones here
                ok = may(av[1].data)
            else:  # anchors, negative lookarounds, anything else: no constraint known
                ok = True
            if not ok:
                return False
        return True

    return pattern.flags & re.IGNORECASE != 0 or may(_parser.parse(pattern.pattern, pattern.flags).data)


def _end_items(items, last: bool) -> list | None:
    """The class items (literals, ranges) that the first (`last`: the last) character every
    match of a parsed sequence consumes is one of; None when the sequence can match nothing
    there or has a construct not understood here. Lookarounds and anchors consume nothing."""
    from re import _constants as C

    for op, av in (reversed(items) if last else items):
        if op in (C.ASSERT, C.ASSERT_NOT, C.AT):
            continue
        if op is C.LITERAL:
            return [(op, av)]
        if op is C.IN:
            return None if any(o not in (C.LITERAL, C.RANGE) for o, _ in av) else list(av)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT) and av[0] >= 1:
            return _end_items(av[2].data, last)
        if op is C.SUBPATTERN and not av[1] and not av[2]:  # no inline flags
            return _end_items(av[3].data, last)
        if op is C.BRANCH:
            out = []
            for branch in av[1]:
                got = _end_items(branch.data, last)
                if got is None:
                    return None
                out += got
            return out
        return None
    return None


def _class_text(items) -> str:
    """A character class (pattern text) of parsed class items (literals, ranges)."""
    from re import _constants as C

    esc = lambda c: f"\\U{c:08x}"  # noqa: E731  (every character escaped: no class syntax leaks)
    return "[" + "".join(esc(av) if op is C.LITERAL else f"{esc(av[0])}-{esc(av[1])}" for op, av in items) + "]"


def _branches(pattern: re.Pattern) -> list[tuple[str, list, list, object]] | None:
    """The top-level alternatives of `pattern`: (source text, class items of the first
    character each match consumes, of the last, the parsed alternative), or None when the pattern is not such an
    alternation (inline flags, a top-level group, an alternative whose ends cannot be read)."""
    from re import _constants as C, _parser

    if pattern.pattern.startswith("(?"):
        return None
    tree = _parser.parse(pattern.pattern, pattern.flags)
    if len(tree.data) != 1 or tree.data[0][0] is not C.BRANCH:
        return None
    parsed, texts = tree.data[0][1][1], _top_level_split(pattern.pattern)
    if len(texts) != len(parsed):
        return None
    out = []
    for text, branch in zip(texts, parsed):
        first, last = _end_items(branch.data, False), _end_items(branch.data, True)
        if not first or not last or _parser.parse(text, pattern.flags).getwidth() != branch.getwidth():
            return None
        out.append((text, first, last, branch))
    return out


def _top_level_split(pattern: str) -> list[str]:
    """A pattern's text split at the "|"s outside groups and classes."""
    out, start, depth, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
            i += 2 if pattern[i + 1 : i + 2] == "]" else 3 if pattern[i + 1 : i + 3] == "^]" else 1  # a leading "]" is literal
            continue
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
        i += 1
    return out + [pattern[start:]]


def ascii_only(pattern: str, flags: int) -> str:
    """The pattern's text with each character class cut to its ASCII characters (a class with
    none left becomes [^\\x00-\\x7f]): the same matches on ASCII strings, faster, as re tests a
    class that reaches beyond Latin-1 by walking its ranges, an ASCII class by one bitmap
    lookup (spaCy's classes list hundreds of Unicode ranges)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if ch != "[":
            out.append(ch)
            i += 1
            continue
        j = i + 1 + (pattern[i + 1 : i + 2] == "^")
        j += pattern[j : j + 1] == "]"  # a leading "]" is literal
        while pattern[j] != "]":
            j += 2 if pattern[j] == "\\" else 1
        member = re.compile(pattern[i : j + 1], flags).match
        chars = "".join(f"\\x{ord(c):02x}" for c in map(chr, range(128)) if member(c))
        out.append(f"[{chars}]" if chars else "[^\\x00-\\x7f]")
        i = j + 1
    return "".join(out)


def by_script(text: str, flags: int, method: str) -> tuple:
    """(the pattern's `method` for ASCII strings (see ascii_only), for any string)."""
    return getattr(re.compile(ascii_only(text, flags), flags), method), getattr(re.compile(text, flags), method)


def _char_search(items, flags: int):
    """search(string, pos) for one character of a class (see by_script)."""
    ascii_search, search = by_script(_class_text(items), flags, "search")

    def char_search(string: str, pos: int = 0):
        return (ascii_search if string.isascii() else search)(string, pos)

    return char_search


class _PerChar(dict):
    """char -> compile_for(char), made on first use (see _per_char); at most `PER_CHAR`
    characters are kept (then emptied): memory is bounded whatever the text."""

    def __init__(self, compile_for):
        super().__init__()
        self.compile_for = compile_for

    def __missing__(self, ch):
        if len(self) >= PER_CHAR:
            self.clear()
        got = self[ch] = self.compile_for(ch)
        return got


PER_CHAR = 4096


def _no_match(string: str, pos: int = 0) -> None:
    return None


_NO_MATCH = (_no_match, _no_match)


def _per_char(branches, end: int, flags: int, compile_alternatives) -> _PerChar:
    """char -> compile_alternatives(the alternatives whose first (end 1) or last (end 2)
    consumed character can be char, in the pattern's order; maybe none). Characters with the
    same alternatives share one compiled pattern (a handful of distinct sets)."""
    can_be = [re.compile(_class_text(b[end]), flags).match for b in branches]
    by_set: dict[tuple[int, ...], object] = {}

    def compile_for(ch: str):
        kept = tuple(i for i, m in enumerate(can_be) if m(ch))
        if kept not in by_set:
            by_set[kept] = compile_alternatives([branches[i] for i in kept])
        return by_set[kept]

    return _PerChar(compile_for)


def infix_finditer(pattern: re.Pattern):
    """pattern.finditer for spaCy's infix pattern, faster: every alternative consumes a
    character from a small set (punctuation, symbols) first, so matches can start only at
    those characters: each is found by a class search (ASCII chunks against an ASCII bitmap),
    and tried with the alternatives that can start with it alone (lookbehinds still see the
    characters before it). The same matches as finditer, left to right and non-overlapping:
    every alternative consumes a character, so none is empty. A pattern whose alternatives'
    first characters cannot be read is searched as it is."""
    branches = _branches(pattern)
    if branches is None:
        return pattern.finditer
    find = _char_search([item for b in branches for item in b[1]], pattern.flags)
    match_at = _per_char(branches, 1, pattern.flags, lambda alternatives: by_script(
        "|".join(b[0] for b in alternatives), pattern.flags, "match") if alternatives else _NO_MATCH)

    def infix_finditer(string: str) -> list:
        out = []
        script = 0 if string.isascii() else 1
        m = find(string)
        while m is not None:
            pos = m.start()
            got = match_at[string[pos]][script](string, pos)
            if got is None:
                m = find(string, pos + 1)
            else:
                out.append(got)
                m = find(string, got.end())
        return out

    infix_finditer.per_char = match_at
    return infix_finditer


def suffix_search(pattern: re.Pattern):
    """pattern.search for a suffix pattern, faster. Every alternative of spaCy's suffix
    pattern ends at the end of the chunk ($), so only the alternatives whose last character
    can be the chunk's last can match: a pattern of those alone is searched (none for most
    characters; 5 of 82 alternatives for an ASCII letter), behind a lookahead for their first
    characters. All but `\\.\\.+$` match at most a few characters (W): unless the chunk ends
    with a character that an unbounded alternative must end with, the leftmost match starts in
    the last W characters, and a search from there finds it (lookbehinds still see the
    characters before). A chunk ending in a newline ($ also matches before one) and any other
    shape of pattern are searched whole."""
    from re import _constants as C

    branches = _branches(pattern)
    if branches is None:
        return pattern.search
    width, last_chars = 0, set()
    for _, _, _, branch in branches:
        items = branch.data
        if items[-1] != (C.AT, C.AT_END):
            return pattern.search
        hi = branch.getwidth()[1]
        if hi < C.MAXREPEAT:
            width = max(width, hi)
            continue
        op, av = items[-2] if len(items) > 1 else (None, None)
        if op is C.MAX_REPEAT and av[0] >= 1 and len(av[2].data) == 1:
            op, av = av[2].data[0]
        if op is not C.LITERAL:
            return pattern.search
        last_chars.add(chr(av))

    def compile_for(alternatives):
        if not alternatives:
            return None
        first = _class_text([item for b in alternatives for item in b[1]])
        return by_script(f"(?={first})(?:{'|'.join(b[0] for b in alternatives)})", pattern.flags, "search")

    search_for = _per_char(branches, 2, pattern.flags, compile_for)

    def suffix_search(string: str):
        if not string or string[-1] == "\n":
            return pattern.search(string)
        searches = search_for[string[-1]]
        if searches is None:
            return None
        search = searches[0] if string.isascii() else searches[1]
        if string[-1] in last_chars or len(string) <= width:
            return search(string)
        return search(string, len(string) - width)

    suffix_search.per_char = search_for
    return suffix_search
