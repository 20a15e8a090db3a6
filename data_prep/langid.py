"""The language classifier of the language filter (py3langid, whose model ships in its wheel):
one model per process, loaded on first use. config.py checks language codes against it and
filters.py classifies with it, so neither imports the other.

py3langid walks its feature DFA over the text's bytes in a Python loop (~2.5 MB/s, a third of
a prepare task's time with the web filters). `_walk` is the same walk compiled by numba; it
hands py3langid's own scoring the same {feature: count} in the same order (first occurrence,
as its Counter), so scores are bit for bit py3langid's (tests/data_prep/test_filters.py). It
overrides py3langid 0.4.0's `_raw_score` (the version requirements.txt pins) and reads the
model tables that method walks; that test fails if another version changes them.
"""
from __future__ import annotations

import numpy as np
from numba import njit

_identifier = None


@njit(cache=True, nogil=True)
def _walk(nextmove, rowbase, output, text, counts, order) -> int:
    """Count the features the DFA emits over text's bytes into counts, listing each feature
    in `order` at its first occurrence; returns how many were listed."""
    state = 0
    n = 0
    for b in text:
        state = nextmove[rowbase[state] + b]
        f = output[state]
        if f >= 0:
            if counts[f] == 0:
                order[n] = f
                n += 1
            counts[f] += 1
    return n


def identifier():
    global _identifier
    if _identifier is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        class _Compiled(LanguageIdentifier):
            def _raw_score(self, text: bytes):
                if not hasattr(self, "_nm"):
                    self._nm = np.frombuffer(self.tk_nextmove, dtype=f"u{self.tk_nextmove.itemsize}")  # no copy
                    self._rows = np.asarray(self._rowbase, dtype=np.int64)
                    self._out = np.asarray(self.tk_output, dtype=np.int64)
                    self._counts = np.zeros(len(self.nb_ptc), dtype=np.int64)
                order = np.empty(len(text), dtype=np.int64)
                n = _walk(self._nm, self._rows, self._out, np.frombuffer(text, dtype=np.uint8), self._counts, order)
                if n == 0:  # no features: py3langid's own answer for that case
                    return super()._raw_score(text)
                feats = order[:n]
                visits = dict(zip(feats.tolist(), self._counts[feats].tolist()))
                self._counts[feats] = 0
                return self._sparse_score(visits, self.nb_ptc)

        _identifier = _Compiled.from_model_file(MODEL_FILE, norm_probs=True)
    return _identifier


def known_languages() -> list[str]:
    """The language codes the classifier can answer (ISO 639-1)."""
    return list(identifier().nb_classes)
