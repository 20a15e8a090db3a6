"""Clean stage: Unicode repair and normalisation, control characters, whitespace, optional
HTML-to-text and PII masking. Input: a Record with text; output: the same Record, text
cleaned, or a bad-input reason ("empty") when nothing is left."""
from __future__ import annotations

import re
import unicodedata

from data_prep.config import CleanConfig

# ANSI escape sequences (CSI ... final byte, OSC ... BEL/ST) and lone ESC.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b")
# C0 controls except \t and \n, DEL, C1 controls; \r is handled as a line break first.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Unicode spaces (NBSP, en/em spaces, ideographic space, ...) and zero-width characters.
_SPACES = re.compile(r"[ \t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_ZERO_WIDTH = re.compile(r"[\u200b\u200c\u200d\u2060\ufeff]")
_LINE_EDGE_SPACE = re.compile(r" +(?=\n)|(?<=\n) +")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")


_BLOCKS = "p, div, li, br, h1, h2, h3, h4, h5, h6, tr, table, ul, ol, section, article, header, footer, blockquote, pre, dd, dt"


def html_to_text(html: str) -> str:
    # selectolax (lexbor): a real HTML5 parser, ~10x faster than BeautifulSoup.
    from selectolax.lexbor import LexborHTMLParser as HTMLParser

    tree = HTMLParser(html)
    for node in tree.css("script, style, noscript, template, svg, head"):
        node.decompose()
    # Block elements end a line; inline ones (<b>, <a>) must not split words.
    for node in tree.css(_BLOCKS):
        node.insert_after("\n")
    root = tree.body or tree.root
    return root.text(separator="", strip=False) if root is not None else ""


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# ftfy's badness pattern: every alternative holds a non-ASCII character and spans at most 7
# characters ("ГўВЂВ.x"); searching only within this many characters of each run of non-ASCII
# characters finds a match wherever the whole-text search does.
_BADNESS_REACH = 16


def _is_bad(text: str) -> bool:
    """ftfy.badness.is_bad(text), searched only around non-ASCII characters. The whole-text
    search tries the pattern's 40-odd alternatives at every position (~8 MB/s); web and
    documentation text is mostly ASCII with a few curly quotes or dashes, so this looks at a
    small part of it. `^` in the pattern still matches only at the text's start: `search`
    from a later position does not treat that position as a start."""
    from ftfy.badness import BADNESS_RE

    search, n = BADNESS_RE.search, len(text)
    start = end = -1
    for m in _NON_ASCII.finditer(text):
        lo, hi = max(0, m.start() - _BADNESS_REACH), min(n, m.end() + _BADNESS_REACH)
        if lo > end:  # a new window: search the one before
            if end > start and search(text, start, end):
                return True
            start = lo
        end = hi
    return end > start and search(text, start, end) is not None


class Cleaner:
    name = "clean"

    def __init__(self, cfg: CleanConfig, html: bool = False):
        self.cfg = cfg
        self.html = html

    def clean(self, text: str) -> str:
        if self.html:
            text = html_to_text(text)
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.isascii():
            if self.cfg.ftfy and _is_bad(text):
                import ftfy

                # ftfy repairs mojibake ("cafÃ©" -> "café") but runs at ~3 MB/s; its own
                # badness heuristic (a single regex) picks the documents that need it, and
                # pure-ASCII text has no mojibake at all.
                text = ftfy.fix_text(text, normalization="NFC")
            else:
                text = unicodedata.normalize("NFC", text)
            text = _ZERO_WIDTH.sub("", text)
        text = _ANSI.sub("", text)
        text = _CONTROL.sub("", text)
        text = _SPACES.sub(" ", text)
        text = _LINE_EDGE_SPACE.sub("", text)
        text = _MANY_NEWLINES.sub("\n\n", text).strip()
        if self.cfg.pii:
            text = _EMAIL.sub(self.cfg.email_replacement, text)
            text = _IPV4.sub(self.cfg.ip_replacement, text)
        return text

    def __call__(self, rec) -> str | None:
        rec.text = self.clean(rec.text)
        return None if rec.text else "empty"
