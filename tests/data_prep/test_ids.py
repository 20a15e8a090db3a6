"""data_prep/ids.py: what a prepare task writes for the duplicate-id check, read back."""
import json

import numpy as np

from data_prep.dedup import exact_pairs
from data_prep.ids import IdHashes, locate
from data_prep.records import Record


def test_every_record_is_located_and_only_records_with_an_id_are_hashed(tmp_path):
    # One task of several files (grouped text files, a jsonl range from line 7), a bad record
    # without an id, and an id that two files share.
    recs = [Record("docs/a.txt", 1, "same"), Record("docs/b.jsonl", 7, "x"), Record("docs/b.jsonl", 8, bad="malformed_json"),
            Record("docs/b.jsonl", 9, "same"), Record("docs/c.txt", 1, "c")]
    ids = IdHashes(tmp_path, "docs", 4)
    gids = [(3 << 32) | i for i in range(len(recs))]
    for gid, rec in zip(gids, recs):
        ids.add(gid, rec)
    ids.close()
    where = json.loads((tmp_path / "where.json").read_text())
    assert len(where) == 3  # one run per file: the bad record's line continues its file's run
    assert [locate(where, g) for g in gids] == [(r.file, r.line) for r in recs]
    pairs = np.concatenate([exact_pairs([tmp_path], p, "ids") for p in range(4)])
    assert pairs.tolist() == [(gids[3], gids[0])]  # (the repeat, the id's first record)
    assert sum(len(np.load(f)) for f in tmp_path.glob("ids-*.npy")) == 4
