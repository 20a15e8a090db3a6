"""What flows between the read, clean and filter stages: one `Record` per input record."""
from __future__ import annotations

from dataclasses import dataclass, field

# Outcomes: every input record ends in exactly one of these (stats.json adds them up).
KEPT = "kept"
BAD_INPUT = "bad_input"
FILTERED = "filtered"
EXACT_DUP = "exact_duplicate"
NEAR_DUP = "near_duplicate"
OUTCOMES = (KEPT, BAD_INPUT, FILTERED, EXACT_DUP, NEAR_DUP)


@dataclass(slots=True)
class Record:
    file: str
    line: int  # 1-based line (jsonl), row (parquet, hf_dataset) or 1 (one file, one document)
    id: str | None = None
    text: str | None = None
    bad: str | None = None  # bad-input reason; text is None then
    nbytes: int = 0  # size of the raw record as read
    read_before: int = 0  # truncated_file: records read from the file before the cut
    words_cache: tuple | None = field(default=None, repr=False, compare=False)  # words.words()

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"
