"""The rehearsal of the GPU check, on the CPU: the bundle that carries what the GPU machine lacks
builds, fits, installs there, satisfies what the check imports, and the check's dry run reads it
and plans within its budget. Each judgement comes from outside launch/gpu_bundle.py: pip decides
whether a wheel installs on the target, `packaging` whether requirements are met, and the
installer runs for real on an interpreter that lacks exactly what the bundle brings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from runs import REPO, cpu_env

# What pip on the GPU machine accepts: CPython 3.12 on glibc 2.39 (Ubuntu 24.04's Python 3.12.3)
# takes manylinux wheels for glibc 2.17 through 2.39 (pip's --platform does not widen by itself).
TARGET_312 = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:",
              *[a for minor in range(17, 40) for a in ("--platform", f"manylinux_2_{minor}_x86_64")],
              "--platform", "manylinux2014_x86_64"]
MARKERS_312 = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
# What the GPU check never imports: data prep, the tests, the data benchmarks' peers, the machine's torch.
NOT_IMPORTED = {"torch", "datasets", "ftfy", "zstandard", "selectolax", "py3langid", "spacy", "regex", "numba",
                "rensa", "ray", "matplotlib", "pytest", "pytest-xdist", "gguf"}


def image() -> dict[str, str | None]:
    out = {}
    for line in (REPO / "launch/gpu_image.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def build(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/gpu_bundle.py", "--out", str(out), *args], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """`make gpu-bundle`'s command, from scratch: wheels from the registry, data prepared here."""
    out = tmp_path_factory.mktemp("bundle") / "gpu-bundle"
    r = build(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "MiB (limit 40 MiB)" in r.stdout
    return out


def wheels(bundle: Path) -> dict[str, Path]:
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in (bundle / "wheels").glob("*.whl")}


def test_the_bundle_is_under_40_mib_and_lists_what_it_holds(bundle):
    on_disk = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert on_disk <= 40 * 2**20, on_disk / 2**20
    doc = json.loads((bundle / "bundle.json").read_text())
    assert sorted(w["file"] for w in doc["wheels"]) == sorted(w.name for w in wheels(bundle).values())
    assert abs(doc["bytes"] - on_disk) < 4096
    assert all(oct(f.stat().st_mode)[-3:] in ("644", "755") for f in bundle.rglob("*"))
    assert not list(bundle.parent.glob(".gpu-bundle.tmp*"))  # built under a temporary name, renamed
    # Nothing the check never imports travels; what the image has travels only where its version
    # is unknown and a bundled wheel constrains it.
    names = set(wheels(bundle))
    assert {"deepspeed", "pydantic"} <= names and not names & {canonicalize_name(n) for n in NOT_IMPORTED}
    have = image()
    for w in doc["wheels"]:
        name = canonicalize_name(w["name"])
        assert name not in have or (have[name] is None and "may not satisfy" in w["why"]), w


def test_every_wheel_installs_on_cpython_312_manylinux_x86_64(bundle, tmp_path):
    """pip, asked to install each wheel for the target with no index, accepts all of them; the
    same question about a wheel built for CPython 3.11 is refused (the check can fail)."""
    specs = [f"{parse_wheel_filename(w.name)[0]}=={parse_wheel_filename(w.name)[1]}" for w in wheels(bundle).values()]
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--quiet",
           "--disable-pip-version-check", "--target", str(tmp_path / "t"), *TARGET_312]
    r = subprocess.run([*pip, "--find-links", str(bundle / "wheels"), *specs], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    cp311 = tmp_path / "cp311"
    cp311.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(cp311),
                    "--only-binary=:all:", "--python-version", "3.11", "pydantic-core==2.50.4"], check=True)
    r = subprocess.run([*pip, "--find-links", str(cp311), "pydantic-core==2.50.4"], capture_output=True, text=True)
    assert r.returncode != 0 and "pydantic-core" in r.stderr.lower().replace("_", "-")


def test_the_bundle_and_the_image_satisfy_what_the_check_imports(bundle):
    have, bundled = image(), {n: str(parse_wheel_filename(w.name)[1]) for n, w in wheels(bundle).items()}
    available = {**have, **bundled}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in NOT_IMPORTED:
            continue
        assert name in available, f"{req}: neither in the bundle nor on the GPU machine"
        if name in bundled:
            assert req.specifier.contains(bundled[name]), (req, bundled[name])
    # Every bundled wheel's own requirements, on the target, are met by the bundle or the image.
    for name, wheel in wheels(bundle).items():
        with zipfile.ZipFile(wheel) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for text in (line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")):
            r = Requirement(text)
            if r.marker is not None and not r.marker.evaluate(MARKERS_312):
                continue
            dep = canonicalize_name(r.name)
            assert dep in available, f"{wheel.name} needs {r}: neither in the bundle nor on the GPU machine"
            if available[dep] is not None:
                assert r.specifier.contains(available[dep], prereleases=True), (wheel.name, str(r), available[dep])


def test_the_dry_run_reads_the_bundled_data_and_fits_480_s_on_an_h100(bundle, tmp_path):
    r = subprocess.run([sys.executable, "launch/gpu_check.py", "--dry-run", "--bundle", str(bundle), "--out",
                        str(tmp_path)], cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["data"] == str((bundle / "data/shards/manifest.json").resolve())
    assert report["environment"]["bundle"]["data_tokens"]["train"] > 500_000
    plan = report["plan"]
    assert plan["gpu"] == "h100-80gb" and plan["budget_s"] == 480 and plan["planned_s"] <= 480
    steps = {s["step"]: s["status"] for s in report["steps"]}
    assert steps == {"c": "pass", "a": "pass", "b": "pass", "e": "pass", "d": "skipped"}, report["steps"]


def machine_without(site: Path, root: Path, missing: set[str]) -> Path:
    """An interpreter that sees this one's packages less `missing` (and less what only they
    need): a venv whose site-packages links every entry of `site` but theirs. It stands for the
    GPU image, which has torch and the rest but not what the bundle brings."""
    drop = set()
    for dist in metadata.distributions(path=[str(site)]):
        if canonicalize_name(dist.metadata["Name"]) in missing:
            drop |= {Path(f.parts[0]).name for f in dist.files or [] if f.parts}
            drop.add(Path(dist._path).name)  # its .dist-info
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    purelib = Path(subprocess.check_output([root / "bin/python", "-c",
                                            "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    for entry in site.iterdir():
        if entry.name not in drop and entry.name != "__pycache__":
            (purelib / entry.name).symlink_to(entry)
    return root / "bin" / "python"


def test_the_installer_brings_the_bundle_to_a_machine_without_it(bundle, tmp_path):
    """launch/gpu_check.sh on an interpreter that lacks the bundled packages and every package the
    check does not import: it installs the bundle with pip --no-index, leaves the machine's own
    packages as they were, and the check's dry run and every module its commands start import."""
    local = tmp_path / "bundle-here"  # the same bundle, for the CPython of this machine
    r = build(local, "--manifest", str(bundle / "data/shards/manifest.json"), "--python-version",
              f"{sys.version_info.major}.{sys.version_info.minor}")
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()))
    bundled = set(wheels(local))
    have = image()
    # What the image lacks of ours: the bundle's packages and the requirements the check never imports
    # (spaCy, ftfy, datasets, ...). Everything else stays at this machine's versions.
    ours = {canonicalize_name(line.split("==")[0]) for line in (REPO / "requirements.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    not_on_the_machine = {n for n in bundled | ours if n not in have}
    assert {"deepspeed", "pydantic", "spacy", "ftfy", "datasets"} <= not_on_the_machine
    python = machine_without(site, tmp_path / "machine", not_on_the_machine)
    machine_before = sorted(os.listdir(python.parent.parent / "lib"))
    probe = subprocess.run([python, "-c", "import torch, deepspeed"], capture_output=True, text=True)
    assert "No module named 'deepspeed'" in probe.stderr  # the stand-in lacks what the bundle brings
    venv = tmp_path / "venv-gpu"
    env = cpu_env(PYTHON=str(python), GPU_VENV=str(venv))
    r = subprocess.run(["bash", "launch/gpu_check.sh", "--bundle", str(local), "--dry-run", "--steps", "b,c",
                        "--out", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"installed {len(bundled)} wheels from {local}" in r.stdout
    report = json.loads((tmp_path / "work/report.json").read_text())
    assert {s["step"]: s["status"] for s in report["steps"]} == {"c": "pass", "b": "pass"}
    assert report["environment"]["packages"]["deepspeed"]["used"] == "0.19.8"
    assert report["environment"]["packages"]["spacy"]["used"] is None
    assert sorted(os.listdir(python.parent.parent / "lib")) == machine_before
    # Every module the steps' commands start imports without what the machine lacks.
    gpu_python = venv / "bin" / "python"
    code = ("import deepspeed.launcher.runner, pipeline.train, pipeline.export, pipeline.generate, "
            "pipeline.engines.zero, pipeline.engines.pipe, data_prep.tokenizer, transformers, safetensors; "
            "import importlib.util as u; print(u.find_spec('spacy'), u.find_spec('ftfy'))")
    r = subprocess.run([gpu_python, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "None None", r.stderr[-3000:]
    for script in ("bench/train_throughput.py", "bench/bare_deepspeed_loop.py", "bench/plain_torch_loop.py"):
        r = subprocess.run([gpu_python, script, "--help"], cwd=REPO, env=cpu_env(), capture_output=True, text=True)
        assert r.returncode == 0, (script, r.stderr[-2000:])
    # A second run finds the bundle installed and starts at once.
    r = subprocess.run(["bash", "launch/gpu_check.sh", "--bundle", str(local), "--dry-run", "--steps", "c",
                        "--out", str(tmp_path / "work2")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "installed" not in r.stdout, r.stderr[-3000:]


def test_a_bundle_over_the_limit_is_refused_naming_its_largest_files(tmp_path, bundle, monkeypatch):
    from launch import gpu_bundle

    monkeypatch.setattr(gpu_bundle, "LIMIT_MIB", 1)
    with pytest.raises(gpu_bundle.BundleError, match=r"over the 1 MiB limit; largest: .*(deepspeed|pydantic_core)"):
        gpu_bundle.build(tmp_path / "b", gpu_bundle.IMAGE, bundle / "data/shards/manifest.json")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp*"))
