"""Export of real 2-process CPU checkpoints of both engines to Hugging Face directories.

The checkpoints are those of the suite's reference runs (tests/conftest.py: ZeRO-3, ZeRO-2 and
the 2-stage pipeline, 8 steps, saved at steps 4 and 8), which test_train.py resumes and
compares against: one DeepSpeed run per engine and layout for the whole session.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint_reader import CheckpointError, Zero3Reader, load_file, open_checkpoint
from pipeline.export import export, main, model_config_from_profile, read_run_profile
from pipeline.model import Transformer
from pipeline.to_gguf import write_gguf
from runs import REPO, STEPS, bench_module, run_deepspeed, train_losses, zero3_args

PIPELINE = REPO / "ds_configs" / "tiny_cpu_pipeline.json"  # 2 stages, ZeRO stage 1


def licence_texts() -> list[str]:
    out = []
    for f in sorted(glob.glob(os.path.join(sys.prefix, "lib/python3*/site-packages/*.dist-info/LICENSE*"))):
        try:
            out.append(Path(f).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            pass
    return out


@pytest.fixture(scope="module")
def manifest(prepared_data) -> Path:
    return prepared_data


def train(out: Path, manifest: Path, profile: Path, *overrides: str) -> Path:
    run_deepspeed(["pipeline.train", "--profile", str(profile), "--out", str(out), "--set", f"data.manifest={manifest}",
                   "--set", "train.steps=3", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=0",
                   *overrides])
    assert (out / "checkpoints" / "latest").exists()
    return out


def test_fused_projections_train_like_the_unfused_model_and_export(zero3_run, manifest, tmp_path, capsys):
    """A real 2-process ZeRO-3 run with wqkv and w13: zero.Init draws the same initial weights,
    training follows the unfused run of the same seed (the suite's reference run, to its first
    checkpoint), and the export splits the fused rows into a LlamaForCausalLM that passes --verify."""
    run = tmp_path / "run"
    run_deepspeed(zero3_args(manifest, run, "--set", "model.fused_projections=true", "--set", "train.steps=4"))
    assert json.loads((run / "profile.json").read_text())["model"]["fused_projections"] is True
    fused, plain = train_losses(run), train_losses(zero3_run)
    assert sorted(fused) == [1, 2, 3, 4]
    for step in fused:
        # Same weights, data and function; only the weight-gradient GEMMs may round differently
        # (one larger GEMM blocks the sum over tokens differently; seen: equal losses, gradient
        # norms 1e-10 apart). 1e-6 relative is a few fp32 ulps at a loss of 8.
        assert fused[step] == pytest.approx(plain[step], rel=1e-6), step
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["--checkpoint", str(zero3_run), "--out", str(tmp_path / "hf_plain"), "--tag", "global_step4"]) == 0
    a, b = hf_tensors_of(tmp_path / "hf"), hf_tensors_of(tmp_path / "hf_plain")
    assert a.keys() == b.keys() and "model.layers.1.self_attn.v_proj.weight" in a
    for name in a:
        # Seen after 4 steps (lr up to 3e-3): mean differences below 1e-8, the largest 1e-5 (a single
        # embedding entry: Adam moves a weight by about lr whatever its gradient's size, so where a
        # gradient is near 0 its rounding shows). A weight drawn differently or a row block put in
        # the wrong place differs everywhere by about the init std, 0.02.
        diff = (a[name] - b[name]).abs()
        assert diff.mean() < 1e-7 and diff.max() < 1e-4, (name, diff.mean(), diff.max())


def hf_tensors_of(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(params=["zero3", "zero2", "pipeline"])
def run(request) -> Path:
    return request.getfixturevalue({"pipeline": "pipe_run"}.get(request.param, f"{request.param}_run"))


def real_tokens(manifest: Path, n: int = 2, length: int = 48) -> torch.Tensor:
    from pipeline.data import Manifest, open_split

    samples = open_split(Manifest.load(manifest), "train", length, 0)
    return torch.from_numpy(samples.batch(range(n))[0])


def read_checkpoint(tag_dir: Path) -> dict[str, torch.Tensor]:
    profile = read_run_profile(tag_dir)
    reader = open_checkpoint(tag_dir, profile["topology"]["engine"], model_config_from_profile(profile),
                             profile["deepspeed"]["zero_optimization"]["stage"])
    return dict(reader.tensors())


def our_model(run: Path) -> Transformer:
    """Our model with the checkpoint's weights, read independently of the exporter's writer."""
    tag_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    model = Transformer(model_config_from_profile(read_run_profile(tag_dir)))
    model.load_state_dict(read_checkpoint(tag_dir))
    return model.eval()


@pytest.mark.parametrize("stage", [3, 2])
def test_zero_readers_match_deepspeed_zero_to_fp32(stage, zero3_run, zero2_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = (zero3_run if stage == 3 else zero2_run) / "checkpoints" / f"global_step{STEPS}"
    ours = read_checkpoint(tag_dir)
    ref = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=f"global_step{STEPS}")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    if stage == 2:
        # ZeRO-2 also saves the module's own weights whole (rank 0): in fp32 training they are the
        # master weights the reader merged from the ranks' partitions.
        module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        for k in ours:
            assert torch.equal(ours[k], module[k]), k


def test_bf16_runs_optimizer_files_are_found(zero3_run, zero2_run, tmp_path):
    """bf16 runs name their optimizer files bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt
    (DeepSpeedEngine._get_zero_ckpt_prefix); their content is laid out as in fp32 runs. A bf16
    run on the CPU costs minutes, so a fp32 run's files are renamed as DeepSpeed names them."""
    for run in (zero3_run, zero2_run):
        copy = copy_run(run, tmp_path / run.parent.name)
        for f in z3(copy).glob("zero_pp_rank_*_optim_states.pt"):
            f.rename(f.with_name("bf16_" + f.name))
        got, want = read_checkpoint(z3(copy)), read_checkpoint(z3(run))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        export(copy, tmp_path / f"hf-{run.parent.name}")


def test_benchmark_checkpoint_has_deepspeeds_layout(zero3_run, tmp_path):
    """bench/export_memory.py's synthetic ZeRO-3 files: same structure as a real run's, and
    DeepSpeed's own zero_to_fp32 and our reader both recover exactly the weights written."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    bench = bench_module("export_memory")
    real = zero3_run / "checkpoints" / f"global_step{STEPS}"
    profile = read_run_profile(real)
    cfg = model_config_from_profile(profile)
    full = bench.write_zero3_checkpoint(tmp_path, cfg, world=2, step=STEPS, profile=profile)

    trainer_keys = {"ds_config", "step", "consumed_samples", "run_id"}  # the config and the trainer's client state

    def structure(x, depth=0):
        if isinstance(x, dict) and depth < 4:
            return {k: structure(v, depth + 1) for k, v in x.items() if not (depth == 0 and k in trainer_keys)}
        if isinstance(x, (list, tuple)) and depth < 4:
            return [structure(v, depth + 1) for v in x]
        return type(x).__name__ if not isinstance(x, torch.Size) else tuple(x)

    for name in ("zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        a = torch.load(real / name, weights_only=False)
        b = torch.load(tmp_path / f"global_step{STEPS}" / name, weights_only=False)
        assert structure(a) == structure(b), name
    ref = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag=f"global_step{STEPS}")
    ours = dict(Zero3Reader(tmp_path / f"global_step{STEPS}", cfg).tensors())
    for k in full:
        assert torch.equal(ref[k], full[k]) and torch.equal(ours[k], full[k]), k


def test_export_loads_matches_and_generates(run, manifest, tmp_path):
    import sentencepiece as spm
    import transformers

    out = export(run, tmp_path / "hf", max_shard_size="200KB", check=True)
    gguf = write_gguf(out, tmp_path / "model.gguf")
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for f in ("config.json", "generation_config.json", "model.safetensors.index.json", "README.md", "tokenizer.model",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert f in names

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = real_tokens(manifest)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, our_model(run)(tokens), atol=1e-5, rtol=0)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in licence_texts()[:8]:
        sample = text[:3000]
        assert tok(sample)["input_ids"] == [1] + sp.encode(sample)
    texts = [t[:1500] for t in licence_texts()[:4]]
    assert_llama_cpp_agrees(gguf, out, texts, [[1] + sp.encode(t) for t in texts])  # llama.cpp runs it
    generated = hf.generate(**tok("Permission is hereby granted", return_tensors="pt"), max_new_tokens=8,
                            do_sample=False, pad_token_id=tok.eos_token_id)
    assert generated.shape[1] > len(tok("Permission is hereby granted")["input_ids"])

    card = (out / "README.md").read_text()
    tokens_seen = STEPS * json.loads((run / "profile.json").read_text())["train"]["global_batch_tokens"]
    for fact in (f"| steps | {STEPS} |", f"| tokens seen in this run | {tokens_seen:,} |", "shards/manifest.json", "largest logit"):
        assert fact in card
    assert re.search(r"\| final training loss \| \d+\.\d{4} \|", card)


def tf4_python() -> str:
    """The interpreter of the transformers 4.x environment (`make tf4-env`, built here when missing)."""
    path = os.environ.get("TF4_PYTHON") or str(REPO / ".venv-tf4" / "bin" / "python")
    if not Path(path).exists():
        subprocess.run(["make", "-s", "tf4-env", "PYTHON=python3"], cwd=REPO, check=True, capture_output=True)
    return path


LLAMA_CPP = """
import json, sys
import numpy as np
from llama_cpp import Llama
# f32 KV cache (llama.cpp keeps f16 by default), one thread: the logits of an f32 GGUF are then ours
llm = Llama(model_path=sys.argv[1], n_ctx=1024, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
texts, ids = json.loads(sys.stdin.read())
tokenized = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in texts]
llm.eval(ids)
np.save(sys.argv[2], np.asarray(llm.scores[:len(ids)], dtype=np.float32))
print(json.dumps(tokenized))
"""


def llama_cpp(gguf: Path, texts: list[str], ids: list[int]) -> tuple[list[list[int]], torch.Tensor]:
    """llama.cpp's ids for `texts` (BOS added, special tokens' names as text) and its logits for
    `ids`, from the GGUF file (`make llamacpp-env`, built here when missing)."""
    python = os.environ.get("LLAMACPP_PYTHON") or str(REPO / ".venv-llamacpp" / "bin" / "python")
    if not Path(python).exists():
        subprocess.run(["make", "-s", "llamacpp-env"], cwd=REPO, check=True, capture_output=True)
    logits = gguf.with_suffix(".logits.npy")
    proc = subprocess.run([python, "-c", LLAMA_CPP, str(gguf), str(logits)], input=json.dumps([texts, ids]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np

    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.from_numpy(np.load(logits))


TF4_IDS = """
import json, sys
import sentencepiece as spm
import transformers
from transformers import AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
tok = AutoTokenizer.from_pretrained(sys.argv[1])
sp = spm.SentencePieceProcessor(model_file=sys.argv[1] + "/tokenizer.model")
texts = json.loads(sys.stdin.read())
print(json.dumps([tok(t)["input_ids"] == [sp.bos_id()] + sp.encode(t) for t in texts]))
"""


def test_export_bf16_with_verify_loads_anywhere(zero3_run, tmp_path, capsys):
    """bf16 weights pass --verify; the directory is readable by other users (umask 022); the
    tokenizer loads in transformers 4.x with SentencePiece's ids (5.x: test_export_loads_matches_and_generates);
    the card names no local path; generation is greedy unless asked."""
    old = os.umask(0o022)
    try:
        assert main(["--checkpoint", str(zero3_run), "--out", str(tmp_path / "hf"), "--dtype", "bf16", "--verify"]) == 0
    finally:
        os.umask(old)
    assert "verified: largest logit difference" in capsys.readouterr().out
    out = tmp_path / "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["max_position_embeddings"] == json.loads((zero3_run / "profile.json").read_text())["data"]["seq_len"]
    assert json.loads((out / "generation_config.json").read_text())["do_sample"] is False
    from pipeline import generate

    texts = []
    for seed in ("1", "2"):  # greedy unless --sample: the seed changes nothing
        assert generate.main([str(out), "--max-new-tokens", "6", "--seed", seed]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(str(out / index["weight_map"]["lm_head.weight"]), "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert out.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in out.iterdir())
    card = (out / "README.md").read_text()
    assert "/tmp" not in card and str(REPO) not in card and "Pretrained from scratch" in card

    texts = [t[:2000] for t in licence_texts()[:4]] + ["café 123  \t tabs ✓ <s> x"]
    proc = subprocess.run([tf4_python(), "-c", TF4_IDS, str(out)], input=json.dumps(texts), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True] * len(texts)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_verify_fails_on_a_wrong_weight_mapping(zero3_run, tmp_path, monkeypatch, capsys, dtype):
    """gate and up swapped in the export: --verify must fail at any dtype, leaving nothing."""
    import pipeline.hf as hf

    monkeypatch.setitem(hf._LAYER_MAP, "feed_forward.w1.weight", "mlp.up_proj.weight")
    monkeypatch.setitem(hf._LAYER_MAP, "feed_forward.w3.weight", "mlp.gate_proj.weight")
    assert main(["--checkpoint", str(zero3_run), "--out", str(tmp_path / "bad"), "--dtype", dtype, "--verify"]) == 3
    assert "verification failed" in capsys.readouterr().err
    assert_nothing_left(tmp_path / "bad")


def test_export_of_an_earlier_tag_and_a_moved_tokenizer(zero3_run, tmp_path, capsys):
    out = export(zero3_run, tmp_path / "step4", tag="global_step4")
    assert "| steps | 4 |" in (out / "README.md").read_text()
    # The checkpoint on another machine: the data-prep directory it names is gone.
    run = copy_run(zero3_run, tmp_path / "run")
    for tag in ("global_step4", f"global_step{STEPS}"):
        prof = z3(run, tag) / "profile.json"
        p = json.loads(prof.read_text())
        p["data"]["manifest"] = str(tmp_path / "gone" / "shards" / "manifest.json")
        prof.write_text(json.dumps(p))
    expect_error(capsys, run, tmp_path / "hf", "manifest not found (run `python -m data_prep run` first); pass --tokenizer DIR")
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    shutil.copy(out / "tokenizer.model", tokenizer)
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--tokenizer", str(tokenizer)]) == 0
    assert "data manifest not available" in (tmp_path / "hf" / "README.md").read_text()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "hf" / f).read_bytes() == (out / f).read_bytes(), f
    # An --out that cannot be made (a file in its path, as a read-only mount refuses mkdir): one line.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    expect_error(capsys, run, blocker / "hf", f"{blocker}", "--tokenizer", str(tokenizer))


# --- bad input: a clear error and no output directory -------------------------------------

def assert_nothing_left(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst


def expect_error(capsys, ckpt: Path, out: Path, message: str, *args: str):
    assert main(["--checkpoint", str(ckpt), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1, err  # one line
    assert_nothing_left(out)


def z3(run: Path, tag: str = f"global_step{STEPS}") -> Path:
    return run / "checkpoints" / tag


def test_bad_zero3_checkpoints(zero3_run, tmp_path, capsys):
    run = copy_run(zero3_run, tmp_path / "run")
    out = tmp_path / "out" / "hf"
    expect_error(capsys, run, out, "no checkpoint tagged 'global_step9'", "--tag", "global_step9")

    optim1 = z3(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    saved = optim1.read_bytes()
    optim1.unlink()
    expect_error(capsys, run, out, "optimizer file(s) of rank(s) [1] missing")
    optim1.write_bytes(saved[: len(saved) // 2])  # truncated by a crash or a full disk
    expect_error(capsys, run, out, "cannot be read (")
    optim1.write_bytes(saved)

    for kind in ("model", "optim"):
        shutil.copy(z3(run) / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt", z3(run) / f"zero_pp_rank_2_mp_rank_00_{kind}_states.pt")
    expect_error(capsys, run, out, "extra model-state file(s) of rank(s) [2]")
    for kind in ("model", "optim"):
        (z3(run) / f"zero_pp_rank_2_mp_rank_00_{kind}_states.pt").unlink()

    model1 = z3(run) / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    saved = model1.read_bytes()
    shutil.copy(z3(run, "global_step4") / model1.name, model1)  # a file from another step
    expect_error(capsys, run, out, "global_steps differs")
    model1.write_bytes(saved)

    meta = z3(run) / "meta.json"  # the trainer's own record of the tag
    assert meta.is_file(), f"the trainer wrote no {meta.name} beside its ZeRO-3 checkpoint"
    saved = meta.read_text()
    meta.write_text(json.dumps({**json.loads(saved), "data_parallel_size": 4}))
    expect_error(capsys, run, out, "data_parallel_size 4 but the ZeRO-3 files were saved by 2 ranks")
    meta.write_text(json.dumps({**json.loads(saved), "step": 2}))
    expect_error(capsys, run, out, f"step 2 but the DeepSpeed files were saved at step {STEPS}")
    meta.write_text(saved)

    for f in sorted(z3(run).glob("*_model_states.pt")):  # a parameter our model does not have
        state = torch.load(f, weights_only=False)
        state["param_shapes"][1]["layers.0.attention.wq.bias"] = state["param_shapes"][1].pop("norm.weight")
        torch.save(state, f)
    expect_error(capsys, run, out, "unknown parameter name(s) ['layers.0.attention.wq.bias']")

    (run / "checkpoints" / "latest").unlink()
    expect_error(capsys, run, out, "no 'latest' file")


def test_bad_zero2_checkpoints(zero2_run, tmp_path, capsys):
    run = copy_run(zero2_run, tmp_path / "run")
    out = tmp_path / "out" / "hf"
    optim1 = z3(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    saved = optim1.read_bytes()
    optim1.unlink()
    expect_error(capsys, run, out, "optimizer file(s) of rank(s) [1] missing")
    state = torch.load(z3(run, "global_step4") / optim1.name, weights_only=False)
    state["optimizer_state_dict"]["single_partition_of_fp32_groups"][0] = torch.zeros(5)
    torch.save(state, optim1)
    expect_error(capsys, run, out, "optimizer group 0 holds")
    optim1.write_bytes(saved)

    model = z3(run) / "mp_rank_00_model_states.pt"
    saved = model.read_bytes()
    model.unlink()
    expect_error(capsys, run, out, "no ZeRO-1/2 model-state file (mp_rank_00_model_states.pt)")
    shutil.copy(z3(run, "global_step4") / model.name, model)  # a file from another step
    expect_error(capsys, run, out, f"saved at step 4 but lies in global_step{STEPS}")
    model.write_bytes(saved)
    meta = z3(run) / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "data_parallel_size": 4}))
    expect_error(capsys, run, out, "data_parallel_size 4 but the ZeRO-1/2 files were saved by 2 ranks")


def test_unrestricted_pickle_is_refused(zero3_run, tmp_path, capsys):
    run = copy_run(zero3_run, tmp_path / "run")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    f = z3(run) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)
    state["lr_scheduler"] = Payload()
    torch.save(state, f)
    with pytest.raises(CheckpointError, match="refused to load a pickled object outside the allow-list"):
        load_file(f)
    expect_error(capsys, run, tmp_path / "hf", "refused to load a pickled object outside the allow-list")
    assert not (tmp_path / "pwned").exists()


def test_bad_pipeline_checkpoints(pipe_run, tmp_path, capsys):
    run = copy_run(pipe_run, tmp_path / "run")
    out = tmp_path / "hf"
    tag = z3(run)
    n = model_config_from_profile(read_run_profile(tag)).n_layers
    last = tag / f"layer_{n + 1:02d}-model_states.pt"
    saved = last.read_bytes()
    last.unlink()
    expect_error(capsys, run, out, f"layer_{n + 1:02d}-model_states.pt'] missing")
    last.write_bytes(saved)

    shutil.copy(last, tag / f"layer_{n + 2:02d}-model_states.pt")
    expect_error(capsys, run, out, f"extra layer file(s) ['layer_{n + 2:02d}-model_states.pt']")
    (tag / f"layer_{n + 2:02d}-model_states.pt").unlink()

    first = tag / "layer_01-model_states.pt"
    state = torch.load(first, weights_only=True)
    state["attention.wq.bias"] = torch.zeros(1)
    torch.save(state, first)
    expect_error(capsys, run, out, "unknown parameter name(s) ['layers.0.attention.wq.bias']")


def test_pipeline_layer_files_are_named_as_deepspeed_names_them(pipe_run):
    tag = z3(pipe_run)
    n = model_config_from_profile(read_run_profile(tag)).n_layers
    have = sorted(p.name for p in tag.glob("layer_*"))
    assert have == [f"layer_{i:02d}-model_states.pt" for i in range(n + 2)]
    assert json.loads((tag / "profile.json").read_text())["topology"]["engine"] == "pipeline"



# --- continued pretraining: Hugging Face → import_hf → trainer --init-from → export ---------

def tiny_llama3(tok, **extra):
    """A Llama-3-like config (theta 5e5, eps 1e-6, context 2048, llama3 rope scaling) of
    ds_configs/tiny_cpu.json's shape, for the vocabulary of `tok` (a manifest's tokenizer)."""
    import transformers

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024}
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=2048,
                                    rms_norm_eps=1e-6, rope_theta=500000.0, rope_scaling=rope, **extra)


@pytest.mark.parametrize("engine", ["zero3", "zero2", "pipeline"])
def test_hf_import_train_export_round_trip_is_bit_identical(engine, manifest, tmp_path):
    """A step at lr 1e-30 changes no fp32 weight (the update is far below one ulp), so the
    exported tensors must equal the published ones bit for bit, through the real trainer. At
    ZeRO-2 only rank 0 reads the weights and the other rank's half of the exported master weights
    comes from what DeepSpeed's initialize broadcast to it. The base is Llama-3-like (theta 5e5,
    eps 1e-6, context 2048, llama3 rope scaling; tied embeddings at ZeRO-2 and pipeline): the run
    carries those settings (the profile leaves them to its preset) and the export writes them
    back, ties the embeddings again (still equal) and names the base model and its licence. The
    run's first loss is the published model's loss on the run's first batch, as transformers
    computes it: the engine trains the imported weights, in the run's data order."""
    import transformers
    from safetensors.torch import load_file

    from pipeline.data import Manifest, open_split
    from pipeline.import_hf import import_hf

    profile = PIPELINE if engine == "pipeline" else REPO / "ds_configs" / "tiny_cpu.json"
    stage = ["--set", "topology.engine=zero", "--set", "deepspeed.zero_optimization.stage=2"] if engine == "zero2" else []
    tok = Manifest.load(manifest).tokenizer
    hf_cfg = tiny_llama3(tok, tie_word_embeddings=engine != "zero3")
    torch.manual_seed(1)
    base = transformers.LlamaForCausalLM(hf_cfg)
    base.save_pretrained(tmp_path / "published")
    for f in tok.directory.iterdir():  # the data was tokenized with the base model's tokenizer
        shutil.copy(f, tmp_path / "published" / f.name)
    import_hf(tmp_path / "published", tmp_path / "init", base_model="org/base-3", license="llama3.2")
    run = train(tmp_path / "run", manifest, profile, *stage, "--set", "train.steps=1", "--set", "train.lr=1e-30",
                "--set", "model.max_seq_len=null", "--init-from", str(tmp_path / "init"))
    saved = json.loads((run / "checkpoints" / "global_step1" / "profile.json").read_text())
    assert saved["model"]["rope_theta"] == 500000.0 and saved["base_model"]["base_model"] == "org/base-3"
    data, batch = saved["data"], saved["train"]["global_batch_size"]
    x, y = open_split(Manifest.load(manifest), "train", data["seq_len"], data["seed"]).batch(range(batch))
    with torch.no_grad():
        logits = base(torch.from_numpy(x.astype("int64"))).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y.astype("int64")).flatten())
    assert train_losses(run)[1] == pytest.approx(want.item(), abs=2e-4)
    out = export(run, tmp_path / "exported")
    published = load_file(tmp_path / "published" / "model.safetensors")
    exported = {}
    for f in sorted(out.glob("model-*.safetensors")):
        exported.update(load_file(f))
    assert published.keys() == exported.keys()
    for k in published:
        assert torch.equal(published[k], exported[k]), k
    config = json.loads((out / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (500000.0, 1e-6, 2048)
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["tie_word_embeddings"] is (engine != "zero3")
    card = (out / "README.md").read_text()
    assert "| base model | org/base-3 |" in card and "license: llama3.2" in card and "from scratch" not in card


def test_run_without_checkpoints_is_named_as_such(tmp_path):
    """A run that saved nothing yet: no talk of tags, and `.staging` is no checkpoint."""
    (tmp_path / "run" / "checkpoints" / ".staging" / "global_step2").mkdir(parents=True)
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "pipeline.export", "--checkpoint", str(tmp_path / "run"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no checkpoints here" in proc.stderr, proc.stderr
    assert ".staging" not in proc.stderr and "--tag" not in proc.stderr, proc.stderr
    assert_nothing_left(out)


# --- byte-level BPE: a Llama-3-style base with data tokenized by its own tokenizer.json ------

TF4_BPE_IDS = """
import json, sys
import transformers
from tokenizers import Tokenizer
from transformers import AutoTokenizer
assert transformers.__version__.startswith("4."), transformers.__version__
tok = AutoTokenizer.from_pretrained(sys.argv[1])
raw = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
raw.encode_special_tokens = True
texts = json.loads(sys.stdin.read())
print(json.dumps([tok(t)["input_ids"] == raw.encode(t).ids and tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t
                  for t in texts]))
"""


@pytest.mark.slow
def test_llama3_style_base_with_bpe_data_needs_no_remap_and_exports_for_transformers_4_and_5(tmp_path, capsys):
    """Data prep trains a byte-level BPE (Llama 3's layout) on real text; a tiny Llama-3-style
    model published with that tokenizer.json is imported, trained 3 steps on the data with
    --init-from and no --remap-vocab (the tokenizer check passes: the same file), exported with
    --verify (transformers' logits equal ours; AutoTokenizer's ids equal `tokenizers`'), and
    the exported tokenizer gives the data's ids and decodes them back in transformers 5 and 4.
    Failed first: data prep had no BPE, and export read every tokenizer as SentencePiece."""
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from data_prep.bpe import export_hf
    from pipeline.data import Manifest
    from pipeline.import_hf import import_hf
    from runs import cpu_env

    config = json.loads((REPO / "data_prep/configs/demo.json").read_text())
    config["sources"][0]["max_bytes"] = 3_000_000
    config["tokenizer"] = {"type": "bpe", "vocab_size": 1000, "sample_bytes": 1_500_000}
    config["shards"]["validation_fraction"] = 0.1
    (tmp_path / "prep.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(tmp_path / "prep.json"), "--out",
                    str(tmp_path / "data")], cwd=REPO, env=cpu_env(), check=True, capture_output=True, timeout=600)
    manifest = tmp_path / "data" / "shards" / "manifest.json"
    tok = Manifest.load(manifest).tokenizer
    hf_cfg = tiny_llama3(tok, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "published")
    export_hf(tok.model_path, tmp_path / "published", "<|begin_of_text|>", "<|end_of_text|>")  # as a hub directory has it
    import_hf(tmp_path / "published", tmp_path / "init", base_model="org/tiny-llama3", license="llama3.2")
    run = train(tmp_path / "run", manifest, REPO / "ds_configs" / "tiny_cpu.json", "--set", "model.max_seq_len=null",
                "--init-from", str(tmp_path / "init"))
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert main(["--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--verify", "--gguf",
                 str(tmp_path / "model.gguf")]) == 0
    assert "tokenizer matches tokenizers" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert (out / "tokenizer.json").read_bytes() == tok.model_path.read_bytes()
    assert not (out / "tokenizer.model").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["vocab_size"]) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    # The data's ids: the exported tokenizer gives them, and decodes them back, in both transformers.
    texts = [t[:2000] for t in licence_texts()[:4]] + ["café 123  \t tabs ✓ 漢字 🙂", "a <|end_of_text|> inside"]
    raw = Tokenizer.from_file(str(tok.model_path))
    raw.encode_special_tokens = True
    hf = AutoTokenizer.from_pretrained(out)
    for t in texts:
        ids = hf(t)["input_ids"]
        assert ids == raw.encode(t).ids and ids[0] == tok.bos_id and hf.decode(ids, skip_special_tokens=True) == t
    proc = subprocess.run([tf4_python(), "-c", TF4_BPE_IDS, str(out)], input=json.dumps(texts), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [True] * len(texts)
    # llama.cpp runs the GGUF export: the same ids, and transformers' logits (llama.cpp's own
    # converter refuses this tokenizer: its pre-tokenizer hash is of no published model).
    assert_llama_cpp_agrees(tmp_path / "model.gguf", out, texts, [raw.encode(t).ids for t in texts])


def assert_llama_cpp_agrees(gguf: Path, hf_dir: Path, texts: list[str], want_ids: list[list[int]]) -> None:
    """llama.cpp tokenizes `texts` as `want_ids` and gives the logits of transformers' fp32 model
    of `hf_dir` for the first text (fails on q/k rows left in the Hugging Face rotary order)."""
    import transformers

    ids = want_ids[0][:512]
    got_ids, logits = llama_cpp(gguf, texts, ids)
    assert got_ids == want_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (logits - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
