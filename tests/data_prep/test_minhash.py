"""MinHash estimates match exact shingle Jaccard; shingling is batch-independent."""
import random

import numpy as np

from data_prep.minhash import EMPTY, MinHasher, band_keys, estimated_jaccard, shingle_hashes


def _jaccard(a, b):
    ha, _ = shingle_hashes([a], 5)
    hb, _ = shingle_hashes([b], 5)
    sa, sb = set(ha.tolist()), set(hb.tolist())
    return len(sa & sb) / len(sa | sb)


def test_estimate_is_unbiased_with_binomial_spread():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    mh = MinHasher(112)
    errs = []
    for _ in range(200):
        base = [rng.choice(vocab) for _ in range(300)]
        other = list(base)
        for i in rng.sample(range(300), rng.randint(0, 300)):
            other[i] = rng.choice(vocab)
        a, b = " ".join(base), " ".join(other)
        sig = mh([a, b], 5)
        errs.append(estimated_jaccard(sig[0], sig[1]) - _jaccard(a, b))
    errs = np.array(errs)
    assert abs(errs.mean()) < 0.01 and errs.std() < 0.05  # binomial std at J=0.5, 112 perms: 0.047


def test_shingles_ignore_case_punctuation_and_batching():
    texts = ["The quick, brown fox jumps over the lazy dog again.", "short text", "", "x " * 10]
    h, off = shingle_hashes(texts, 5)
    assert list(np.diff(off)) == [6, 0, 0, 6]
    alone = [shingle_hashes([t], 5)[0] for t in texts]
    assert all(np.array_equal(h[off[i] : off[i + 1]], alone[i]) for i in range(len(texts)))
    assert np.array_equal(alone[0], shingle_hashes(["the QUICK brown fox; jumps over the lazy dog again"], 5)[0])
    sig = MinHasher(16)(texts, 5)
    assert (sig[1] == EMPTY).all() and (sig[0] != EMPTY).all()
    keys = band_keys(sig, 4, 4)
    assert keys.shape == (4, 4) and len(set(keys[0].tolist())) == 4  # the band index is mixed in


def test_a_batch_is_shingled_in_bounded_chunks_with_the_same_signatures():
    import tracemalloc

    from data_prep import minhash

    rng = random.Random(1)
    vocab = [f"word{i}" for i in range(3000)]
    # 1.5 M characters: a prepare batch's order of size; at once, shingling would hold ~60 MB
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(50, 300))) for _ in range(1500)]
    mh = MinHasher(112)
    mh(texts[:2], 3)  # the kernel's first call (numba's cache) is not the batch's memory
    tracemalloc.start()
    sig = mh(texts, 3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 25e6 + sig.nbytes, peak  # ~42 bytes x SHINGLE_CHARS, plus the result
    # a document's signature depends on its own shingles only: chunks change nothing
    assert np.array_equal(sig, mh.signatures(*shingle_hashes(texts, 3)))
    assert np.array_equal(sig[7], mh([texts[7]], 3)[0])
    assert sum(map(len, texts)) > 4 * minhash.SHINGLE_CHARS  # several chunks were made
