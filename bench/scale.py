"""How data prep and the training loader scale with the corpus (bench only; not a unit test).

    python bench/scale.py [--sizes 2,20,200] [--workers 2] [--loader both] [--json scale.json]
    python bench/scale.py --quick          # tiny sizes, one `run` command per size: checks that everything runs

Data prep. For each size, a synthetic corpus of jsonl files is resampled from real text: the
distinct paragraphs of the docs, licences, package metadata and docstrings under this
interpreter's site-packages (the demo corpus's text; 20 MB of it), each document 3-12
paragraphs drawn from anywhere in it.
A few percent of the documents are planted copies of an earlier one: exact copies (case and
whitespace changed, which exact dedup normalises away) and near copies with 2-6% of their
words edited. The corpus is deterministic given --seed and the installed packages. The
number of files stays the same at every size (--files; or one file, --single-file), so each
file grows with the corpus, as real shards of a larger crawl do.

Every stage runs as its own `python -m data_prep STAGE --config C --out O --workers W` with
the same config: the `books` filter set (language identification only: cheap, so the figures
show the pipeline's own costs rather than spaCy's), exact + MinHash dedup with the defaults,
SentencePiece on a fixed 1 MB sample, 1 MiB shards, so that every bound the config sets is
reached at all but the smallest size and any growth left comes from the corpus. --stages picks
the commands (`run`: every stage in one command, what --quick measures, so that the check
pays two interpreter starts rather than ten). Per stage:

  wall s        the command, interpreter start included (about 2 s of imports)
  MB/s/core     corpus input MB / wall s / workers (the corpus size for every stage)
  peak memory   each process's own peaks, polled every 0.1 s over the stage's process tree from
                /proc/PID/status: anonymous memory (RssAnon: heap, stacks, private copies;
                the peak over the polls) and the resident set's high-water mark (VmHWM);
                reported for the driver and for the worst other process (pool workers: their
                memory includes pages shared with the driver after fork). A process that
                lives less than 0.1 s can escape the polling, so the exact maximum RSS over the
                whole tree, from wait4's ru_maxrss when the command ends, is reported beside them.
                The verdict uses the anonymous peaks: VmHWM also counts every page of a
                memory-mapped file the process touched (signatures, sorted columns, texts),
                which is page cache, shared and reclaimable under pressure, not the
                process's own memory; a job that maps a larger input reads more of it.
  growth        peak memory at the largest size / at the smallest (goal: within 1.2 for the
                anonymous peaks, the verdict `flat`; otherwise `grows`); seconds
                per MB at the largest / at the smallest, which a fixed cost per command pulls
                below 1; and the slope ratio: seconds per extra MB between the two largest
                sizes / between the two smallest (goal: about 1, linear); with three sizes or
                more, the same peaks at the largest size / at the one before it (last step):
                a stage whose batches fill up between the small sizes rises from the smallest
                size and stays level over the last step

Loader. The sample order of a simulated 1T-token, 3-source mixture at sequence 2048 (sources
of 0.6, 0.3 and 0.1 of 1e12 / 2048 samples, weighted by size): peak memory to build it
(tracemalloc peak and the process's RSS high-water mark over its RSS before) and the mean
time to locate 1,000 random positions (source index, sample index within the source). Each
measurement runs in a fresh interpreter. `current` is what pipeline/data.py had before
BlendOrder: blend_counts + build_blend_index (one entry per sample; the script's own copy
where pipeline.data no longer has it) + one permutation per source; it is measured at 1/1000
and 1/100 of the scale (arrays of the full size would need tens of GB) and extrapolated
linearly from 1/100, labelled so. `blendorder` measures
`pipeline.data.BlendOrder(sizes, weights, seed)` at the full scale.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "dedup", "train-tokenizer", "tokenize", "finalize"]
QUICK_STAGES = ["run"]  # `python -m data_prep run`: every stage, in order, in one command
TOKENS, SEQ_LEN, FRACTIONS = 10**12, 2048, (0.6, 0.3, 0.1)
MB = 1e6
POLL_S = 0.1
FLAT = 1.2  # the largest size's anonymous peak over the smallest's, at most, for "flat"


# --- corpus ---------------------------------------------------------------------------------

DOC_FILES = re.compile(r"(\.(md|rst|txt)|/(LICEN[CS]E[^/]*|METADATA))$")
# Docstrings, found as triple-quoted strings: ast.parse is 20x slower and finds the same text.
DOCSTRING = re.compile(r'"""(.*?)"""', re.S)


def paragraph_pool(max_bytes: int) -> list[str]:
    """Distinct paragraphs (8+ words) of the docs, licences and metadata under site-packages,
    then of its docstrings, in path order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["purelib"])
    seen, pool, total = set(), [], 0
    docs = sorted(p for p in root.rglob("*") if DOC_FILES.search(p.as_posix()) and p.is_file())
    for path in docs + sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        blocks = [m.group(1) for m in DOCSTRING.finditer(text)] if path.suffix == ".py" else [text]
        for para in (p for b in blocks for p in re.split(r"\n\s*\n", b)):
            para = "\n".join(line.strip() for line in para.strip().splitlines())
            if len(para.split()) >= 8 and len(para) <= 5000 and para not in seen:
                seen.add(para)
                pool.append(para)
                total += len(para)
        if total >= max_bytes:
            break
    return pool


def write_corpus(out: Path, size_mb: float, files: int, dup_frac: float, seed: int, pool: list[str]) -> dict:
    """Documents of 3-12 random paragraphs as jsonl, round-robin into `files` files, until
    size_mb MB; dup_frac of them are planted copies (half exact, half near) of a recent one."""
    from near_dedup import scattered_edits

    rng = random.Random(seed)
    vocab = sorted({w for p in pool[:3000] for w in p.split()})
    out.mkdir(parents=True, exist_ok=True)
    handles = [open(out / f"part-{i:04d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    recent: list[str] = []  # originals a copy may come from: bounded, like a crawl's locality
    written, n, exact, near = 0, 0, 0, 0
    while written < size_mb * MB:
        r = rng.random()
        if recent and r < dup_frac / 2:
            text = rng.choice(recent).upper() if rng.random() < 0.5 else "  " + rng.choice(recent) + "\n"
            exact += 1
        elif recent and r < dup_frac:
            text = " ".join(scattered_edits(rng.choice(recent).split(), rng.uniform(0.02, 0.06), rng, vocab))
            near += 1
        else:
            text = "\n\n".join(rng.sample(pool, rng.randint(3, 12)))
            recent.append(text)
            if len(recent) > 2000:
                recent.pop(rng.randrange(len(recent)))
        line = json.dumps({"id": f"d{n}", "text": text}, ensure_ascii=False) + "\n"
        handles[n % files].write(line)
        written += len(line.encode())
        n += 1
    for h in handles:
        h.close()
    return {"bytes": written, "documents": n, "planted_exact": exact, "planted_near": near, "files": files}


def prep_config(corpus: Path, quick: bool) -> dict:
    return {
        "sources": [{"name": "scale", "type": "jsonl", "paths": [str(corpus)], "id_field": "id", "filters": "books"}],
        "tokenizer": {"vocab_size": 1000 if quick else 4096, "sample_bytes": 1_000_000},
        "shards": {"target_bytes": 1 << 20},
    }


# --- per-process peak memory of a command's process tree ------------------------------------

def proc_status(pid: int, keys=("VmHWM", "RssAnon")) -> dict[str, int] | None:
    """Fields of /proc/PID/status in bytes (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(keys))
    except OSError:
        return None
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


def vm_hwm(pid: int) -> int | None:
    """The process's own peak resident set size in bytes (None once it is gone)."""
    return (proc_status(pid) or {}).get("VmHWM")


def run_measured(cmd: list[str], log: Path, env: dict) -> dict:
    """Run cmd; its wall time, the driver's and the worst descendant's peak RSS (polled), and the
    exact peak over the whole tree (wait4's ru_maxrss covers every reaped descendant); the same
    for the anonymous memory (RssAnon), whose peak is the largest value polled."""
    peaks: dict[int, int] = {}
    anon: dict[int, int] = {}
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    driver = psutil.Process(proc.pid)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            pids = [proc.pid] + [c.pid for c in driver.children(recursive=True)]
        except psutil.NoSuchProcess:
            pids = [proc.pid]
        for p in pids:
            st = proc_status(p)
            if st:
                peaks[p] = max(peaks.get(p, 0), st["VmHWM"])
                anon[p] = max(anon.get(p, 0), st["RssAnon"])
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; its output: {log}\n"
                         + log.read_text()[-3000:])
    others = [v for p, v in peaks.items() if p != proc.pid]
    others_anon = [v for p, v in anon.items() if p != proc.pid]
    return {"wall_s": wall, "driver_peak_mb": peaks.get(proc.pid, 0) / MB,
            "worker_peak_mb": max(others) / MB if others else None,
            "driver_anon_mb": anon.get(proc.pid, 0) / MB,
            "worker_anon_mb": max(others_anon) / MB if others_anon else None,
            "tree_peak_mb": usage.ru_maxrss * 1024 / MB, "processes": len(peaks)}


def bench_prep(args, pool: list[str], work: Path) -> tuple[list[dict], list[dict]]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    rows, corpora = [], []
    for size in args.sizes:
        corpus, out = work / f"corpus-{size:g}MB", work / f"out-{size:g}MB"
        shutil.rmtree(corpus, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        info = write_corpus(corpus, size, 1 if args.single_file else args.files, args.dup_frac, args.seed, pool)
        config = work / f"prep-{size:g}MB.json"
        config.write_text(json.dumps(prep_config(corpus, args.quick)))
        print(f"{size:g} MB: {info['documents']:,} documents in {info['files']} file(s), "
              f"{info['planted_exact']:,} exact and {info['planted_near']:,} near copies planted", file=sys.stderr)
        for stage in args.stages:
            cmd = [sys.executable, "-m", "data_prep", stage, "--config", str(config), "--out", str(out),
                   "--workers", str(args.workers)]
            m = run_measured(cmd, work / f"{stage}-{size:g}MB.log", env)
            m.update(stage=stage, size_mb=size, input_mb=info["bytes"] / MB,
                     mb_s_core=info["bytes"] / MB / m["wall_s"] / args.workers)
            rows.append(m)
            print(f"  {stage:<16} {m['wall_s']:7.1f} s  anon: driver {m['driver_anon_mb']:5.0f} MB  "
                  f"worker {m['worker_anon_mb'] or 0:5.0f} MB   RSS: driver {m['driver_peak_mb']:5.0f} MB  "
                  f"worker {m['worker_peak_mb'] or 0:5.0f} MB", file=sys.stderr)
        # finalize writes stats.json; without it (--stages short of finalize) the outcomes are not known
        stats = out / "stats.json"
        records = json.loads(stats.read_text())["records"] if stats.exists() else None
        info.update({k: records.get(k, 0) if records else None
                     for k in ("input", "kept", "filtered", "exact_duplicate", "near_duplicate")}, size_mb=size)
        corpora.append(info)
        if not args.keep:
            shutil.rmtree(corpus)
            shutil.rmtree(out)
    return rows, corpora


def peak_growth(small: dict, large: dict) -> dict:
    """Peak memory and seconds per MB of one stage at a larger size over a smaller one; `flat`
    where both anonymous peaks grew at most FLAT."""
    def ratio(key):
        return large[key] / small[key] if small[key] and large[key] else None

    anon = [ratio("driver_anon_mb"), ratio("worker_anon_mb")]
    return {"driver_peak": ratio("driver_peak_mb"), "worker_peak": ratio("worker_peak_mb"),
            "tree_peak": ratio("tree_peak_mb"), "driver_anon": anon[0], "worker_anon": anon[1],
            "flat": all(r <= FLAT for r in anon if r is not None),
            "s_per_mb": (large["wall_s"] / large["input_mb"]) / (small["wall_s"] / small["input_mb"])}


def growth(rows: list[dict], sizes: list[float], stages: list[str]) -> dict:
    """Per stage: peak_growth from the smallest size to the largest, and the marginal seconds
    per MB (the slope between consecutive sizes) of the last step over the first: s/MB includes
    a fixed cost (interpreter start, imports, the tokenizer's fixed sample) that makes it fall
    with size even where the work is linear; the slope does not. With three sizes or more, also
    `last_step`: peak_growth over the last 10x alone, which tells a peak still rising with the
    corpus from one that rose only until the stage's batches were full."""
    out = {}
    for stage in stages:
        by_size = [next(r for r in rows if r["stage"] == stage and r["size_mb"] == z) for z in sizes]

        def slope(a, b):
            return (b["wall_s"] - a["wall_s"]) / (b["input_mb"] - a["input_mb"])

        first, last = slope(*by_size[:2]), slope(*by_size[-2:])
        out[stage] = peak_growth(by_size[0], by_size[-1])
        out[stage]["marginal_s_per_mb"] = last / first if len(sizes) > 2 and first > 0 and last > 0 else None
        out[stage]["last_step"] = peak_growth(by_size[-2], by_size[-1]) if len(sizes) > 2 else None
    return out


# --- loader ---------------------------------------------------------------------------------

def loader_sizes(scale: int) -> list[int]:
    total = TOKENS // SEQ_LEN
    return [round(total * f / scale) for f in FRACTIONS]


def rss_now() -> int:
    return psutil.Process().memory_info().rss


def reset_hwm() -> None:
    """Set VmHWM back to the current RSS (Linux >= 4.0), so the next peak is this build's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def per_sample_index(counts):
    """The per-sample blend index pipeline/data.py built before BlendOrder (build_blend_index),
    kept here so that the comparison can still be run once it is gone: each source's draws
    spread evenly over the epoch, ties broken by source id, one (source, draw) per sample."""
    import numpy as np

    times = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
    ids = np.concatenate([np.full(c, s, dtype=np.int32) for s, c in enumerate(counts) if c])
    draws = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c])
    order = np.lexsort((ids, times))
    return ids[order], draws[order]


def probe(method: str, scale: int, seed: int = 1, positions: int = 1000) -> dict:
    """Build the order of the simulated mixture at 1/scale, in this (fresh) process: build time,
    RSS high-water mark over the RSS before, tracemalloc peak of a second build, mean locate time."""
    import tracemalloc

    import numpy as np

    from pipeline import data

    sizes = loader_sizes(scale)
    weights = [float(s) for s in sizes]

    if method == "current":
        def build():
            counts = data.blend_counts(sizes, weights)
            ids, draws = getattr(data, "build_blend_index", per_sample_index)(counts)
            perms = [np.random.Generator(np.random.PCG64([seed, s, 0])).permutation(n) for s, n in enumerate(sizes)]
            return counts, ids, draws, perms

        def locate(order, p):
            counts, ids, draws, perms = order
            epoch, i = divmod(p, len(ids))
            s = int(ids[i])
            return s, int(perms[s][int(draws[i])])  # epoch 0: positions are drawn within one epoch
    else:
        def build():
            return data.BlendOrder(sizes, weights, seed)

        def locate(order, p):
            return order.locate(p)

    before = rss_now()
    reset_hwm()
    t0 = time.perf_counter()
    order = build()
    build_s = time.perf_counter() - t0
    rss_delta = (vm_hwm(os.getpid()) or rss_now()) - before
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    pos = [int(p) for p in rng.integers(0, total, positions)]
    t0 = time.perf_counter()
    located = [locate(order, p) for p in pos]
    locate_us = (time.perf_counter() - t0) / positions * 1e6
    assert all(0 <= s < len(sizes) and 0 <= i < sizes[s] for s, i in located), "locate out of range"
    del order
    tracemalloc.start()
    order = build()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"method": method, "scale": scale, "samples": total, "build_s": build_s, "rss_delta_mb": rss_delta / MB,
            "tracemalloc_peak_mb": traced_peak / MB, "locate_us": locate_us, "extrapolated": False}


def run_probe(method: str, scale: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--probe", f"{method}:{scale}"], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"loader probe {method} 1/{scale} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def has_blend_order() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import pipeline.data as d; print(hasattr(d, 'BlendOrder'))"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    return proc.stdout.strip() == "True"


def bench_loader(args) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    if args.loader in ("current", "both"):
        scales = [100_000, 10_000] if args.quick else [1000, 100]
        for scale in scales:
            rows.append(run_probe("current", scale))
        base = rows[-1]
        k = base["scale"]  # linear in the number of samples: the arrays have one entry per sample
        rows.append({**base, "scale": 1, "samples": sum(loader_sizes(1)), "build_s": base["build_s"] * k,
                     "rss_delta_mb": base["rss_delta_mb"] * k, "tracemalloc_peak_mb": base["tracemalloc_peak_mb"] * k,
                     "extrapolated": True})
    if args.loader in ("blendorder", "both"):
        if has_blend_order():
            rows.append(run_probe("blendorder", 10_000 if args.quick else 1))
        elif args.loader == "blendorder":
            raise SystemExit("error: pipeline.data has no BlendOrder at this commit (use --loader current)")
        else:
            notes.append("pipeline.data has no BlendOrder at this commit: only the current index is measured")
    return rows, notes


# --- report ---------------------------------------------------------------------------------

def fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def growth_row(stage: str, small: float, large: float, g: dict, slope: str) -> str:
    return (f"| {stage}: {small:g} -> {large:g} MB | {'flat' if g['flat'] else 'grows'} | s/MB x{g['s_per_mb']:.2f} | "
            f"{slope} | x{fmt(g['driver_anon'], '.2f')} | x{fmt(g['worker_anon'], '.2f')} | "
            f"x{fmt(g['driver_peak'], '.2f')} | x{fmt(g['worker_peak'], '.2f')} | x{fmt(g['tree_peak'], '.2f')} |")


def markdown(args, prep: list[dict], grow: dict, corpora: list[dict], loader: list[dict], notes: list[str]) -> str:
    lines = []
    if prep:
        lines += [f"Data prep, {args.workers} workers, `books` filters (language only), "
                  f"{'one file' if args.single_file else f'{args.files} files'} per size; MB/s/core = corpus MB / wall s / workers; "
                  "peak memory per process in MB: anonymous (RssAnon) and RSS (VmHWM, mapped files' page cache "
                  "included) of the driver and of the worst other process; exact maximum RSS over the tree. "
                  f"Growth rows: largest size over smallest, `flat` where both anonymous peaks grew at most x{FLAT}; "
                  "slope = seconds per extra MB between the two largest "
                  "sizes over the same between the two smallest (1 = linear); with three sizes or more a second "
                  "row, the largest size over the one before it.", "",
                  "| stage | corpus MB | wall s | MB/s/core | driver anon | worker anon | driver RSS | worker RSS | tree RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for stage in args.stages:
            for r in (r for r in prep if r["stage"] == stage):
                lines.append(f"| {stage} | {r['size_mb']:g} | {r['wall_s']:.1f} | {r['mb_s_core']:.3f} | "
                             f"{fmt(r['driver_anon_mb'])} | {fmt(r['worker_anon_mb'])} | "
                             f"{fmt(r['driver_peak_mb'])} | {fmt(r['worker_peak_mb'])} | {fmt(r['tree_peak_mb'])} |")
            g = grow[stage]
            lines.append(growth_row(stage, args.sizes[0], args.sizes[-1], g, f"slope x{fmt(g['marginal_s_per_mb'], '.2f')}"))
            if g["last_step"]:
                lines.append(growth_row(stage, args.sizes[-2], args.sizes[-1], g["last_step"], "last step"))
        lines += ["", "| corpus MB | documents | planted exact | planted near | kept | filtered | exact dups | near dups |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in corpora:
            lines.append(f"| {c['size_mb']:g} | {c['documents']:,} | {c['planted_exact']:,} | {c['planted_near']:,} | "
                         f"{fmt(c['kept'], ',')} | {fmt(c['filtered'], ',')} | {fmt(c['exact_duplicate'], ',')} | "
                         f"{fmt(c['near_duplicate'], ',')} |")
    if loader:
        lines += ["", f"Loader: sample order of a {TOKENS:.0e}-token mixture at sequence {SEQ_LEN}, sources "
                  f"{'/'.join(str(f) for f in FRACTIONS)} of {TOKENS // SEQ_LEN:,} samples.", "",
                  "| loader | scale | samples | build s | tracemalloc peak MB | RSS delta MB | locate µs |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in loader:
            k = loader[loader.index(r) - 1]["scale"] if r["extrapolated"] else 1
            name = "current index" if r["method"] == "current" else "BlendOrder"
            scale = "1T, extrapolated" if r["extrapolated"] else ("1T" if r["scale"] == 1 else f"1/{r['scale']:,}")
            locate = f"{r['locate_us']:.2f}" + (f" (at 1/{k:,})" if r["extrapolated"] else "")
            lines.append(f"| {name} | {scale} | {r['samples']:,} | {r['build_s']:.2f} | {r['tracemalloc_peak_mb']:.1f} | "
                         f"{r['rss_delta_mb']:.1f} | {locate} |")
    lines += [f"Note: {n}" for n in notes]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2,20,200", help="corpus sizes in MB, comma-separated (default 2,20,200)")
    p.add_argument("--files", type=int, default=8, help="jsonl files per corpus (default 8)")
    p.add_argument("--single-file", action="store_true", help="one jsonl file per corpus")
    p.add_argument("--workers", type=int, default=2, help="data_prep --workers (default 2)")
    p.add_argument("--dup-frac", type=float, default=0.04, help="fraction of planted copies, half exact, half near")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loader", choices=["current", "blendorder", "both", "none"], default="both",
                   help="which sample orders to measure (default both; BlendOrder only where pipeline.data has it)")
    p.add_argument("--no-prep", action="store_true", help="measure the loader only")
    p.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and outputs under --work")
    p.add_argument("--json", type=Path, help="also write the results here as JSON")
    p.add_argument("--stages", help=f"data_prep commands to measure, in order, comma-separated (default "
                   f"{','.join(STAGES)}; with --quick {','.join(QUICK_STAGES)}: every stage in one command)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (0.05,0.5 MB), the stages as one `run` command per size, and loader scales "
                        "(1/100,000 and 1/10,000): checks that it all runs")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # METHOD:SCALE, one loader measurement in this process
    args = p.parse_args(argv)
    if args.quick and args.sizes == p.get_default("sizes"):
        args.sizes = "0.05,0.5"
    args.sizes = sorted(float(s) for s in args.sizes.split(","))
    args.stages = args.stages.split(",") if args.stages else QUICK_STAGES if args.quick else STAGES
    for stage in args.stages:
        if stage not in STAGES + QUICK_STAGES:
            p.error(f"--stages: unknown stage {stage!r} (expected some of {', '.join(STAGES + QUICK_STAGES)})")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe:
        method, scale = args.probe.split(":")
        print(json.dumps(probe(method, int(scale))))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    work.mkdir(parents=True, exist_ok=True)
    prep, grow, corpora = [], {}, []
    try:
        if not args.no_prep:
            pool = paragraph_pool(2_000_000 if args.quick else 20_000_000)
            print(f"paragraph pool: {len(pool):,} distinct paragraphs, {sum(map(len, pool)) / MB:.1f} MB", file=sys.stderr)
            prep, corpora = bench_prep(args, pool, work)
            grow = growth(prep, args.sizes, args.stages)
        loader, notes = bench_loader(args) if args.loader != "none" else ([], [])
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(args, prep, grow, corpora, loader, notes))
    if args.json:
        result = {"sizes_mb": args.sizes, "stages": args.stages, "workers": args.workers, "files": 1 if args.single_file else args.files,
                  "config": prep_config(Path("CORPUS"), args.quick), "prep": prep, "growth": grow,
                  "corpora": corpora, "loader": loader, "notes": notes}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
