"""Typed prep config: JSON on disk, pydantic here, validated once at the edge.

Every default below is the documented default; `data_prep/README.md` has the reference table.
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_prep.config_errors import error_lines


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Text, licence and metadata files of the installed packages: real text that every machine
# has, with real exact duplicates (the same licence many times) and near duplicates.
# Python files contribute their docstrings only (see readers.python_docstrings).
SITE_PACKAGES_PATTERNS = ["*.dist-info/METADATA", "*LICENSE*", "*LICENCE*", "*COPYING*", "*.md", "*.rst", "*.txt", "*.py"]


class SourceConfig(_Strict):
    name: str = Field(min_length=1)
    # jsonl covers .jsonl, .jsonl.gz and .jsonl.zst (chosen by file suffix).
    type: Literal["jsonl", "parquet", "hf_dataset", "text_files", "site_packages"]
    paths: list[str] = Field(default_factory=list, description="files, directories or glob patterns")
    text_field: str = "text"
    id_field: str | None = None
    html: bool = False
    patterns: list[str] = Field(default_factory=lambda: list(SITE_PACKAGES_PATTERNS))
    max_bytes: int | None = Field(default=None, gt=0, description="stop adding input files past this many bytes")
    # The unit of parallelism: an uncompressed jsonl file is cut at line boundaries into ranges
    # of about this size (default 64 MiB), small text files are grouped into tasks of about this
    # size (default 4 MiB). Compressed files and parquet/Arrow files are one task each.
    task_bytes: int | None = Field(default=None, gt=0, description="input bytes per task (64 MiB jsonl, 4 MiB text_files)")
    # Which quality filters this source gets: web-crawl rules (Gopher, C4, FineWeb) throw away
    # good books, code and documentation. "web" is the `filters` section, "books" its language
    # filter only, "code" and "none" nothing; any other name is a set of `filter_sets`.
    filters: str = "none"

    @model_validator(mode="after")
    def _paths_needed(self):
        if self.type != "site_packages" and not self.paths:
            raise ValueError(f"source '{self.name}': paths must name at least one file, directory or glob")
        if self.task_bytes is None:  # resolved here, so the manifest records the number that ran
            self.task_bytes = 4 << 20 if self.type in ("text_files", "site_packages") else 64 << 20
        return self


class ReadConfig(_Strict):
    # Documents with more text than this are removed as "too_large" (filtered, with their id):
    # Gopher/C4 rules and ftfy are super-linear or slow on multi-megabyte pages.
    max_doc_bytes: int = Field(default=2 << 20, gt=0)
    # A jsonl line up to this size is parsed to learn its id; a longer one is skipped in bounded
    # chunks without parsing (too_large without an id). This bounds a reader's memory.
    max_record_bytes: int = Field(default=64 << 20, gt=0)


class CleanConfig(_Strict):
    ftfy: bool = True
    pii: bool = False
    email_replacement: str = "email@example.com"
    ip_replacement: str = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never a real host


class GopherQualityConfig(_Strict):
    # Rae et al. 2021 (Gopher), appendix A; same numbers as datatrove's GopherQualityFilter.
    enabled: bool = True
    min_doc_words: int = 50
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2


class GopherRepetitionConfig(_Strict):
    # Gopher table A1.
    enabled: bool = True
    dup_line_frac: float = 0.3
    dup_para_frac: float = 0.3
    dup_line_char_frac: float = 0.2
    dup_para_char_frac: float = 0.2
    top_n_grams: list[tuple[int, float]] = [(2, 0.2), (3, 0.18), (4, 0.16)]
    dup_n_grams: list[tuple[int, float]] = [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]


class C4Config(_Strict):
    # Raffel et al. 2020 (T5/C4) section 2.2; defaults of datatrove's C4QualityFilter.
    enabled: bool = False
    min_words_per_line: int = 3
    max_word_length: int = 1000
    min_num_sentences: int = 5
    remove_lines_without_terminal_punct: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebConfig(_Strict):
    # Penedo et al. 2024 (FineWeb) extra rules; defaults of datatrove's FineWebQualityFilter.
    enabled: bool = True
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class LanguageConfig(_Strict):
    # FineWeb keeps English at fastText score >= 0.65; py3langid ships its model in the wheel.
    enabled: bool = True
    languages: list[str] = ["en"]
    min_score: float = 0.65
    max_chars: int = 10_000  # classify the first N characters: linear cost, same answer in practice

    @model_validator(mode="after")
    def _known_codes(self):
        if self.enabled:
            from data_prep.langid import known_languages  # loads the model: not at import

            known = known_languages()
            for i, code in enumerate(self.languages):
                if code not in known:
                    raise ValueError(f"languages.{i}: '{code}' is not a language code the classifier knows "
                                     f"(ISO 639-1, e.g. 'en', 'de'; {len(known)} known)")
        return self


class FiltersConfig(_Strict):
    # How the Gopher/C4/FineWeb rules count words and sentences. The thresholds were set on
    # spaCy's English tokenizer and sentencizer, as datatrove counts them: "rules" applies
    # spaCy's rules without spaCy (data_prep/rule_tokenizer.py; same tokens, 11-14x faster),
    # "spacy" runs spaCy itself, "regex" is one regular expression (agreement not measured).
    words: Literal["rules", "spacy", "regex"] = "rules"
    # A factory: the default's validation loads the classifier, which importing must not do.
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()


BUILTIN_FILTER_SETS = ("web", "books", "code", "none")
FILTER_NAMES = ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb")


class ExactDedupConfig(_Strict):
    enabled: bool = True


class MinHashConfig(_Strict):
    # Tuned for the near duplicates people make: copies with 2-6% of their words changed at
    # scattered positions. Each changed word breaks up to `ngram` shingles, so such a copy has
    # a 5-gram Jaccard of ~0.6-0.8 (2% of them fall below 0.5). 28 bands x 4 rows (112
    # permutations): the S-curve 1-(1-s^4)^28 is 0.98 at s=0.6 and 0.04 at s=0.2. Candidates
    # are then verified on their exact shingle Jaccard against the survivor (>= threshold), and
    # clusters never chain (dedup.merge). 5-grams, not 3: a 3-gram Jaccard of 0.5 lets through
    # reordered sentences ("... from a mountain top than a fool can from the bottom of a well"
    # and its reverse: 3-gram Jaccard 0.64, 5-gram 0.23) and copies with ~13% of the words
    # changed. FineWeb/datatrove use 5-grams, 14x8 with no verification, which finds about 60%
    # of such copies (bench/near_dedup.py measures both).
    enabled: bool = True
    ngram: int = Field(default=5, ge=1)
    bands: int = Field(default=28, ge=1)
    rows: int = Field(default=4, ge=1)
    threshold: float = Field(default=0.5, gt=0, le=1, description="min exact shingle Jaccard of a removed document and its survivor")
    # A pair whose smaller document has fewer shingles than this is merged only when both have
    # the same shingles (the same words in the same order, up to case and punctuation). None:
    # ngram * (1 + threshold) / (1 - threshold), rounded up (15 for the defaults), the fewest
    # shingles at which a copy with one word replaced in its middle still reaches the
    # threshold; dedup.is_near_duplicate says why.
    min_shingles: int | None = Field(default=None, ge=1, description="fewer shingles: near-merged only at Jaccard 1")
    seed: int = 1
    partitions: int = Field(default=16, ge=1, description="dedup partitions written to disk and clustered independently")

    @model_validator(mode="after")
    def _derive_min_shingles(self):
        import math

        if self.min_shingles is None:  # resolved here, so the manifest records the number that ran
            t = self.threshold  # at 1, every merge needs the same shingles anyway
            self.min_shingles = 1 if t >= 1 else math.ceil(round(self.ngram * (1 + t) / (1 - t), 6))
        return self

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


# SentencePiece's own options: set with tokenizer.type "bpe", they would be silently unused.
SENTENCEPIECE_ONLY = ("model_type", "character_coverage", "user_defined_symbols", "max_sentence_length", "existing_model")


class TokenizerConfig(_Strict):
    # "sentencepiece": LLaMA-2-like SentencePiece BPE (data_prep/tokenizer.py); "bpe": byte-level
    # BPE with Hugging Face `tokenizers` and Llama 3's pre-tokenizer (data_prep/bpe.py).
    type: Literal["sentencepiece", "bpe"] = "sentencepiece"
    vocab_size: int = Field(default=32000, ge=300)
    sample_bytes: int = Field(default=1 << 30, gt=0, description="deterministic training sample size")
    model_type: Literal["bpe", "unigram"] = "bpe"  # SentencePiece's model type
    character_coverage: float = 0.99995
    user_defined_symbols: list[str] = []
    max_sentence_length: int = 16384
    seed: int = 1
    threads: int | None = None
    existing_model: str | None = Field(default=None, description="use this SentencePiece tokenizer.model instead of training")
    existing: str | None = Field(default=None, description="type bpe: use this tokenizer.json unchanged instead of training")
    # type bpe: the special tokens a trained tokenizer gets for BOS and EOS, or, with `existing`,
    # which of its added tokens are BOS and EOS (None: data_prep.bpe.special_tokens finds them).
    bos_token: str | None = Field(default=None, min_length=1)
    eos_token: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _fits_type(self):
        for name in ("existing_model", "existing"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        if self.type == "bpe":
            mixed = sorted(set(SENTENCEPIECE_ONLY) & self.model_fields_set)
            if mixed:
                raise ValueError(f"{mixed[0]}: a SentencePiece option, but tokenizer.type is 'bpe'; remove it "
                                 f"(or set type 'sentencepiece')")
        else:
            for name in ("existing", "bos_token", "eos_token"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: an option of tokenizer.type 'bpe' (got type '{self.type}'); set type 'bpe'"
                                     + (", or existing_model for a SentencePiece .model" if name == "existing" else ""))
        return self

    @property
    def file_name(self) -> str:
        """The tokenizer file that is the source of truth for ids."""
        return "tokenizer.json" if self.type == "bpe" else "tokenizer.model"


class ShardsConfig(_Strict):
    target_bytes: int = Field(default=256 << 20, gt=0)
    validation_fraction: float = Field(default=0.01, ge=0, lt=1)
    add_bos: bool = True
    add_eos: bool = True
    split_seed: int = 0


class OutputConfig(_Strict):
    write_removed: bool = False  # write removed documents with their reasons to OUT/removed/


class ExecutorConfig(_Strict):
    type: Literal["local", "ray"] = "local"
    workers: int | None = Field(default=None, ge=1, description="local: processes (default: all cores)")
    ray_address: str | None = None


class PrepConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    read: ReadConfig = ReadConfig()
    clean: CleanConfig = CleanConfig()
    filters: FiltersConfig = Field(default_factory=FiltersConfig)  # the "web" filter set
    filter_sets: dict[str, FiltersConfig] = {}  # custom sets, named by sources[].filters
    exact_dedup: ExactDedupConfig = ExactDedupConfig()
    minhash: MinHashConfig = MinHashConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    shards: ShardsConfig = ShardsConfig()
    output: OutputConfig = OutputConfig()
    executor: ExecutorConfig = ExecutorConfig()

    @model_validator(mode="after")
    def _unique_sources(self):
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        clash = sorted(set(self.filter_sets) & set(BUILTIN_FILTER_SETS))
        if clash:
            raise ValueError(f"filter_sets: {clash} are built-in set names; choose other names")
        for i, src in enumerate(self.sources):
            if src.filters not in BUILTIN_FILTER_SETS and src.filters not in self.filter_sets:
                raise ValueError(f"sources.{i}.filters: '{src.filters}' is neither a built-in set "
                                 f"{list(BUILTIN_FILTER_SETS)} nor a name in filter_sets {sorted(self.filter_sets)}")
        return self

    def filters_for(self, source: SourceConfig) -> FiltersConfig:
        """The filter set a source gets (see SourceConfig.filters)."""
        name = source.filters
        if name == "web":
            return self.filters
        if name in self.filter_sets:
            return self.filter_sets[name]
        off = {k: {"enabled": False} for k in FILTER_NAMES}
        if name == "books":
            off["language"] = self.filters.language.model_dump()
        return FiltersConfig.model_validate(off)

    def resolved(self) -> dict:
        """The config as it ran: what the manifest records and what resume compares.

        The executor is left out: where the work ran does not change the output.
        """
        d = self.model_dump(mode="json", exclude={"executor"})
        for s in d["sources"]:
            if s["type"] == "site_packages" and not s["paths"]:
                s["paths"] = [site_packages_dir()]
        return d

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.resolved()).encode()).hexdigest()


def site_packages_dir() -> str:
    return sysconfig.get_paths()["purelib"]


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None) -> PrepConfig:
    """Load and validate; a ConfigError names the file and the field ('sources.0.type: ...')."""
    if path is None:
        path = DEMO_CONFIG
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    try:
        return PrepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(error_lines(str(path), PrepConfig, e))) from None


DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.json"
