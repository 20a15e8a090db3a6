"""A prep run is a list of stages; each stage is a list of tasks handed to an executor.

    prepare -> duplicate_ids -> exact_dedup -> near_dedup -> merge_dedup -> train_tokenizer -> tokenize -> finalize

Every task checks its completion marker first, so running the same command again after a
kill redoes only unfinished tasks, and every output is a deterministic function of the
config and the input: a resumed run is byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from data_prep import dedup, ids
from data_prep.config import PrepConfig, canonical_json
from data_prep.executor import LocalExecutor
from data_prep.io_utils import NpyAppender, atomic_write_bytes, atomic_write_text, clean_stale_tmp, staged_dir, tmp_name
from data_prep.plan import Task, load_plan, make_plan, number_lines, save_plan
from data_prep.prepare import run_prepare
from data_prep.readers import first_record_fields
from data_prep.shards import build_manifest, run_tokenize
from data_prep.stats import aggregate, dump, write_plots, write_summary


class StageError(RuntimeError):
    pass


@dataclass
class Context:
    cfg: PrepConfig
    out: Path
    plan: list[Task]

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def prepare_dir(self) -> Path:
        return self.work / "prepare"

    @property
    def dedup_dir(self) -> Path:
        return self.work / "dedup"

    @property
    def tokenizer_dir(self) -> Path:
        return self.out / "tokenizer"

    @property
    def model_file(self) -> Path:
        """The tokenizer file that is the source of truth for ids (tokenizer.type)."""
        return self.tokenizer_dir / self.cfg.tokenizer.file_name

    @property
    def shard_dir(self) -> Path:
        return self.out / "shards"

    def task_dirs(self) -> list[Path]:
        return [self.prepare_dir / f"task-{t.index:05d}" for t in self.plan]

    @property
    def dedup_off(self) -> list[str]:
        """The dedup stages the config switches off (a corpus deduplicated upstream)."""
        return [name for name, on in (("exact_dedup", self.cfg.exact_dedup.enabled), ("near_dedup", self.cfg.minhash.enabled))
                if not on]

    def exact_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """All exact pairs, sorted by gid, as memory-mapped (gid, survivor) columns."""
        d = self.dedup_dir / "exact"
        if not self.cfg.exact_dedup.enabled:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
        return np.load(d / "gid.npy", mmap_mode="r"), np.load(d / "survivor.npy", mmap_mode="r")

    def task_sizes(self) -> np.ndarray:
        """The number of gids each task can have (its input records), by task index."""
        sizes = np.zeros(max(t.index for t in self.plan) + 1, dtype=np.uint64)
        for t, d in zip(self.plan, self.task_dirs()):
            sizes[t.index] = json.loads((d / "stats.json").read_text())["records"].get("input", 0)
        return sizes


# What each output depends on, by config field prefix ("" is every field). A config may change
# under an existing --out as long as nothing on disk depends on a changed field: the retry after
# "vocab_size is more than the sample supports" keeps the prepared and deduplicated work.
_PREPARED = ("sources", "read", "clean", "filters", "filter_sets", "minhash", "exact_dedup", "output")
_SAMPLE = (*_PREPARED, "tokenizer.sample_bytes", "shards.validation_fraction", "shards.split_seed")
_DEPENDS = (("work/plan.json", ("sources",)), ("work/prepare", _PREPARED), ("work/dedup", _PREPARED),
            ("work/sample", _SAMPLE), ("work/tokenizer_sample.txt", _SAMPLE),
            ("tokenizer/tokenizer.model", (*_SAMPLE, "tokenizer")), ("tokenizer/tokenizer.json", (*_SAMPLE, "tokenizer")),
            ("work/tokenize", ("",)),
            ("shards/manifest.json", ("",)), ("stats.json", ("",)))


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(value, list) and any(isinstance(x, (dict, list)) for x in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _with_defaults(pinned: dict) -> dict:
    """A config pinned by an earlier version, with the defaults of fields added since: a field it
    did not have ran as its default, so it is no change (e.g. tokenizer.type "sentencepiece")."""
    try:
        return PrepConfig.model_validate({**pinned, "executor": {}}).resolved()
    except ValueError:  # a field since removed or renamed: compare as written
        return pinned


def _refuse_change(out: Path, old: dict, new: dict) -> None:
    """StageError naming the first changed field that an existing output depends on."""
    before, after = _flat(old), _flat(new)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, "(unset)") != after.get(k, "(unset)"))
    for rel, prefixes in _DEPENDS:
        path = out / rel
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            continue
        hit = [k for k in changed if any(k == p or k.startswith((f"{p}.", f"{p}[")) or not p for p in prefixes)]
        if hit:
            k = hit[0]
            more = f" (and {len(hit) - 1} more field(s))" if len(hit) > 1 else ""
            raise StageError(f"{out}: {k} changed from {before.get(k, '(unset)')!r} to {after.get(k, '(unset)')!r}{more}, "
                             f"but {path} was made with the old value; use a new --out, or remove it and what comes "
                             "after it to redo it")


def open_context(cfg: PrepConfig, out: Path, ex=None) -> Context:
    """Create OUT/work, or check that an existing one was made by the same config. A new plan
    has its cut files' line numbers counted by `ex` (default: this process)."""
    if out.exists() and not out.is_dir():
        raise StageError(f"{out}: --out must be a directory (it is a file)")
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work / "config.json"
    resolved = cfg.resolved()
    pinned = cfg_file.read_text() if cfg_file.exists() else None
    if pinned != canonical_json(resolved):
        if pinned is not None:
            _refuse_change(out, _with_defaults(json.loads(pinned)), resolved)
        atomic_write_text(cfg_file, canonical_json(resolved))
    plan_file = work / "plan.json"
    if not plan_file.exists():
        save_plan(number_lines(make_plan(cfg), ex or LocalExecutor(1)), plan_file)
    for d in (work / "prepare", work / "dedup", work / "sample", work / "tokenize", out / "shards", out / "tokenizer", out, work):
        clean_stale_tmp(d)
    return Context(cfg, out, load_plan(plan_file))


def _require(ctx: Context, paths: list[Path], before: str) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise StageError(f"{len(missing)} of {len(paths)} outputs of '{before}' are missing "
                         f"(first: {missing[0]}); run `python -m data_prep {before}` first")


def _require_dedup(ctx: Context) -> None:
    """The dedup result the later stages read: removed.npy, unless both dedups are off (then
    there is none, and every document that passed the filters is kept)."""
    if len(ctx.dedup_off) < 2:
        _require(ctx, [ctx.dedup_dir / "removed.npy"], "dedup")


# ---- stage task functions (module level: executors pickle them) ----

def _prepare(ctx: Context, task: Task) -> dict:
    return run_prepare(ctx.cfg, task, ctx.prepare_dir)


def _pairs(ctx: Context, name: str, p: int) -> int:
    """Partition p's repeated hashes in the tasks' NAME-PPP.npy (texts: exact, ids: ids), into dedup/."""
    out = ctx.dedup_dir / f"{name}-{p:03d}.npy"
    if not out.exists():
        _save_npy(out, dedup.exact_pairs(ctx.task_dirs(), p, name))
    return p


def _merge_exact(ctx: Context) -> None:
    """The partitions' exact pairs into one gid-sorted pair of columns (what near edges and the
    merge look representatives up in), streamed."""
    parts = [np.load(ctx.dedup_dir / f"exact-{p:03d}.npy", mmap_mode="r") for p in range(ctx.cfg.minhash.partitions)]
    with staged_dir(ctx.dedup_dir / "exact") as tmp:
        gid, survivor = NpyAppender(tmp / "gid.npy", np.uint64), NpyAppender(tmp / "survivor.npy", np.uint64)
        for block in dedup.merge_sorted(parts):
            gid.append(np.ascontiguousarray(block["gid"]))
            survivor.append(np.ascontiguousarray(block["survivor"]))
        gid.close(create=True)
        survivor.close(create=True)


def _near(ctx: Context, p: int) -> int:
    out = ctx.dedup_dir / f"near-{p:03d}.npy"
    if not out.exists():
        store = dedup.SignatureStore(ctx.prepare_dir)
        mh = ctx.cfg.minhash
        pairs = dedup.near_pairs(ctx.task_dirs(), p, store, mh.threshold, mh.ngram, mh.min_shingles)
        _save_npy(out, dedup.representative_edges(pairs, *ctx.exact_columns()))
    return p


def _merge(ctx: Context, near: list[Path]) -> None:
    work = tmp_name(ctx.dedup_dir / "merge")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    sizes = ctx.task_sizes()
    survivors = dedup.Bitmap(sizes, work / "survivors.bits")
    dedup.merge_to(work, *ctx.exact_columns(), [np.load(f, mmap_mode="r") for f in near], sizes, work / "removed.npy",
                   survivors)
    if not (ctx.dedup_dir / "survivors").exists():  # a killed run may have got this far
        dedup.SurvivorIds.write(ctx.dedup_dir / "survivors", ctx.task_dirs(), survivors)
    os.replace(work / "removed.npy", ctx.dedup_dir / "removed.npy")  # the stage's completion marker
    shutil.rmtree(work)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def _tokenize(ctx: Context, task: Task) -> dict:
    return run_tokenize(ctx.cfg, task, ctx.work, ctx.shard_dir, ctx.model_file, dedup.SurvivorIds(ctx.dedup_dir / "survivors"))


class Stage:
    name = ""
    command = ""  # the CLI command that runs it

    def run(self, ctx: Context, ex) -> None:
        raise NotImplementedError


class Prepare(Stage):
    name, command = "prepare", "prepare"

    def run(self, ctx, ex):
        ex.map("read+clean+filter", partial(_prepare, ctx), ctx.plan, [t.bytes for t in ctx.plan], unit="B")


class DuplicateIds(Stage):
    """Records of an id_field source whose id repeats an earlier record's (data_prep/ids.py):
    dedup/ids-PPP.npy, then dedup/duplicate_ids.json (the stage's completion marker)."""
    name, command = "duplicate_ids", "dedup"

    def run(self, ctx, ex):
        _require(ctx, ctx.task_dirs(), "prepare")
        out = ctx.dedup_dir / "duplicate_ids.json"
        if out.exists():
            return
        P = ctx.cfg.minhash.partitions if any(s.id_field for s in ctx.cfg.sources) else 0
        if P:
            ex.map("duplicate ids", partial(_pairs, ctx, "ids"), list(range(P)))
        parts = [np.load(ctx.dedup_dir / f"ids-{p:03d}.npy", mmap_mode="r") for p in range(P)]
        tasks = {t.index: (t.source, d) for t, d in zip(ctx.plan, ctx.task_dirs())}
        LocalSingle().run("report ids", lambda: atomic_write_text(out, dump(ids.report(parts, tasks))))


class ExactDedup(Stage):
    name, command = "exact_dedup", "dedup"

    def run(self, ctx, ex):
        _require(ctx, ctx.task_dirs(), "prepare")
        if ctx.cfg.exact_dedup.enabled:
            ex.map("exact dedup", partial(_pairs, ctx, "exact"), list(range(ctx.cfg.minhash.partitions)))
            if not (ctx.dedup_dir / "exact").exists():
                LocalSingle().run("merge exact", lambda: _merge_exact(ctx))


class NearDedup(Stage):
    name, command = "near_dedup", "dedup"

    def run(self, ctx, ex):
        _require(ctx, ctx.task_dirs(), "prepare")
        if ctx.cfg.minhash.enabled:
            if ctx.cfg.exact_dedup.enabled:  # near edges are moved onto exact groups' representatives
                _require(ctx, [ctx.dedup_dir / "exact"], "dedup")
            ex.map("minhash dedup", partial(_near, ctx), list(range(ctx.cfg.minhash.partitions)))


class MergeDedup(Stage):
    name, command = "merge_dedup", "dedup"

    def run(self, ctx, ex):
        out = ctx.dedup_dir / "removed.npy"
        if out.exists() or len(ctx.dedup_off) == 2:  # both off: nothing to merge, no removed.npy
            return
        P = ctx.cfg.minhash.partitions
        exact = [ctx.dedup_dir / "exact"] if ctx.cfg.exact_dedup.enabled else []
        near = [ctx.dedup_dir / f"near-{p:03d}.npy" for p in range(P)] if ctx.cfg.minhash.enabled else []
        _require(ctx, exact + near, "dedup")
        LocalSingle().run("merge clusters", lambda: _merge(ctx, near))


class LocalSingle:
    """One job in this process, with the same kind of progress line as the executors."""

    def run(self, label: str, fn):
        from data_prep.executor import _bar

        with _bar(label, 1, "job") as bar:
            res = fn()
            bar.update(1)
        return res


class TrainTokenizer(Stage):
    name, command = "train_tokenizer", "train-tokenizer"

    def run(self, ctx, ex):
        from data_prep.sample import write_sample
        from data_prep.tokenizer import export_hf

        tc = ctx.cfg.tokenizer
        _require(ctx, ctx.task_dirs(), "prepare")
        _some_document_left(ctx)
        ctx.tokenizer_dir.mkdir(parents=True, exist_ok=True)
        if not ctx.model_file.exists():
            existing = tc.existing if tc.type == "bpe" else tc.existing_model
            if existing:
                tmp = ctx.model_file.with_name(f".{ctx.model_file.name}.tmp")
                shutil.copyfile(existing, tmp)
                os.replace(tmp, ctx.model_file)
            else:
                _require_dedup(ctx)
                sample = ctx.work / "tokenizer_sample.txt"
                if not sample.exists():
                    write_sample(ctx, ex, sample)
                threads = tc.threads or os.cpu_count() or 1
                LocalSingle().run("train tokenizer", lambda: _train(sample, ctx.tokenizer_dir, tc, threads))
        if tc.type == "bpe":
            _check_special_tokens(ctx)
        elif not (ctx.tokenizer_dir / "tokenizer.json").exists():
            LocalSingle().run("export HF files", lambda: export_hf(ctx.model_file, ctx.tokenizer_dir))


def _check_special_tokens(ctx: Context) -> None:
    """BOS and EOS found before any document is tokenized (data_prep.bpe.special_tokens)."""
    from data_prep.bpe import TokenizerFileError, special_tokens

    try:
        special_tokens(ctx.model_file, ctx.cfg.tokenizer.bos_token, ctx.cfg.tokenizer.eos_token)
    except TokenizerFileError as e:
        raise StageError(str(e)) from None


def _some_document_left(ctx: Context) -> None:
    stats = [json.loads((d / "stats.json").read_text()) for d in ctx.task_dirs()]
    if sum(s["records"].get("passed_filters", 0) for s in stats) == 0:
        n = sum(s["records"].get("input", 0) for s in stats)
        reasons: dict = {}
        for s in stats:
            for k, v in s["reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        if set(reasons) == {"bad_input:missing_text"}:
            raise StageError(_no_text_field(ctx))
        top = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
        raise StageError(f"no document is left after reading and filtering ({n} input records; {top or 'none read'}); "
                         f"see {ctx.prepare_dir}/task-*/rejected.jsonl, and disable or relax filters in the config")


def _no_text_field(ctx: Context) -> str:
    """Every record read lacks its text field: a wrong `text_field`, not filters, is the cause."""
    task = next(t for t in ctx.plan if t.files)
    src = next(s for s in ctx.cfg.sources if s.name == task.source)
    fields = first_record_fields(task.files[0]) if task.kind == "jsonl" else []
    present = f" (its records have {', '.join(fields)})" if fields else ""
    return (f"{task.files[0]}: no record has the text field {src.text_field!r}{present}; "
            f"set sources[].text_field of source '{src.name}'")


def _train(sample: Path, out_dir: Path, tc, threads: int) -> None:
    import re

    from data_prep.tokenizer import train_sentencepiece

    if tc.type == "bpe":
        return _train_bpe(sample, out_dir, tc)
    try:
        train_sentencepiece(sample, out_dir, tc, threads)
    except RuntimeError as e:
        m = re.search(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        if m:
            raise _too_few(tc.vocab_size, f"at most {m.group(2)}") from None
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m:
            raise StageError(f"tokenizer.vocab_size: {tc.vocab_size} is less than the {m.group(2)} pieces every "
                             "token needs (the sample's characters at tokenizer.character_coverage, the 256 byte "
                             f"pieces and the special tokens); raise it to at least {m.group(2)}, or lower "
                             "tokenizer.character_coverage") from None
        raise


def _train_bpe(sample: Path, out_dir: Path, tc) -> None:
    """`tokenizers` stops early, without an error, when the sample has no more pairs to merge:
    that is refused here, as SentencePiece refuses it, before the file is written."""
    from data_prep.bpe import save, train_bpe, vocab_size

    tok = train_bpe(sample, tc)
    if vocab_size(tok) < tc.vocab_size:
        raise _too_few(tc.vocab_size, f"{vocab_size(tok)} tokens")
    save(tok, out_dir / "tokenizer.json")


def _too_few(asked: int, supported: str) -> StageError:
    return StageError(f"tokenizer.vocab_size: {asked} is more than the training sample supports "
                      f"({supported}); lower it, or raise tokenizer.sample_bytes or add input")


class Tokenize(Stage):
    name, command = "tokenize", "tokenize"

    def run(self, ctx, ex):
        _require(ctx, ctx.task_dirs(), "prepare")
        _require(ctx, [ctx.model_file], "train-tokenizer")
        _require_dedup(ctx)
        from data_prep import encoders

        # Loaded here before the workers fork: for a tokenizer.json this sets one thread per
        # process, so `tokenizers` does not warn in each worker after training used its pool.
        encoders.load(ctx.model_file, ctx.cfg.tokenizer)
        ctx.shard_dir.mkdir(parents=True, exist_ok=True)
        (ctx.work / "tokenize").mkdir(parents=True, exist_ok=True)
        ex.map("tokenize+shard", partial(_tokenize, ctx), ctx.plan, [t.bytes for t in ctx.plan], unit="B")


class Finalize(Stage):
    name, command = "finalize", "finalize"

    def run(self, ctx, ex):
        from data_prep import encoders

        tok_markers = [ctx.work / "tokenize" / f"task-{t.index:05d}.json" for t in ctx.plan]
        _require(ctx, tok_markers, "tokenize")
        _require(ctx, [ctx.dedup_dir / "duplicate_ids.json"], "dedup")
        prep = [json.loads((d / "stats.json").read_text()) for d in ctx.task_dirs()]
        toks = [json.loads(p.read_text()) for p in tok_markers]
        vocab = encoders.load(ctx.model_file, ctx.cfg.tokenizer).vocab()
        stats = aggregate(prep, toks, off=ctx.dedup_off,
                          duplicate_ids=json.loads((ctx.dedup_dir / "duplicate_ids.json").read_text()))
        stats["splits"] = {s: {k: sum(t["splits"][s][k] for t in toks) for k in ("documents", "tokens")} for s in ("train", "validation")}
        stats["bad_input_examples"] = _examples(ctx, 20)
        if not stats["accounting"]["ok"]:
            raise StageError(f"accounting does not add up: {stats['accounting']}")
        write_plots(stats, ctx.out / "plots")
        atomic_write_text(ctx.out / "stats.json", dump(stats))
        atomic_write_text(ctx.out / "summary.md", write_summary(stats, ctx.out))
        atomic_write_text(ctx.shard_dir / "manifest.json", dump(build_manifest(ctx.cfg, toks, ctx.model_file, vocab)))


def _examples(ctx: Context, limit: int) -> list[dict]:
    out = []
    for d in ctx.task_dirs():
        with open(d / "rejected.jsonl") as f:
            for line in f:
                row = json.loads(line)
                if row["outcome"] == "bad_input":
                    out.append({k: row[k] for k in ("file", "line", "reason")})
                    if len(out) >= limit:
                        return out
    return out


STAGES: list[Stage] = [Prepare(), DuplicateIds(), ExactDedup(), NearDedup(), MergeDedup(), TrainTokenizer(), Tokenize(), Finalize()]
