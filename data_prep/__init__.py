"""Data preparation: raw text -> cleaned, filtered, deduplicated documents -> SentencePiece
tokenizer -> Arrow token shards + manifest (see docs/formats.md and data_prep/README.md)."""
