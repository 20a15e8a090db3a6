"""Build the GPU bundle: everything the GPU check needs that the GPU machine lacks, in one folder
carried beside the repository (`make gpu-bundle`, on a machine with a package registry).

    python launch/gpu_bundle.py --out gpu-bundle [--image launch/gpu_image.txt] [--manifest M]

    gpu-bundle/
      wheels/       a wheel for each package the check imports that the image lacks, and for their
                    dependencies that it lacks, for CPython 3.12 manylinux x86_64; deepspeed is
                    built here from its source release (PyPI has no wheel of it)
      data/         one prepared data set, shared by every step: shards/manifest.json, its Arrow
                    token shards and tokenizer/ (a slice of the built-in demo corpus, or --manifest)
      bundle.json   what is inside: every wheel (name, version, bytes, sha256, why it is there),
                    the data's tokens, the image list it was built against

The GPU machine installs it with `pip install --no-index` (launch/gpu_check.sh), never replacing
its own torch, and prepares no data. The image's packages are `launch/gpu_image.txt`, the one
list of what that machine has. Left out: torch (the machine's CUDA build) and every package only
data prep, the tests or the data benchmarks import (NOT_FOR_THE_CHECK); their imports in the code
the check runs stay lazy. The folder is built under a temporary name and renamed when complete;
a bundle over LIMIT_MIB is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMAGE = REPO / "launch" / "gpu_image.txt"
# What travels to the GPU machine is at most 64 MiB, the repository included (~1.5 MiB): the
# bundle gets 40, leaving room for the repository to grow and for a second data set.
LIMIT_MIB = 40
# requirements.txt packages the check never imports, and why (everything else it imports).
NOT_FOR_THE_CHECK = {
    "torch": "the GPU machine's own CUDA build is used, never replaced",
    "datasets": "data prep's `datasets` reader", "ftfy": "data prep", "zstandard": "data prep",
    "selectolax": "data prep", "py3langid": "data prep", "spacy": "the reference of data prep's word splitter, for its tests (~50 MB)",
    "regex": "data prep", "numba": "data prep", "rensa": "a data benchmark's peer", "ray": "data prep on many nodes",
    "matplotlib": "data prep's plots", "pytest": "the CPU tests", "pytest-xdist": "the CPU tests",
    "gguf": "the GGUF export for llama.cpp (pipeline/to_gguf.py)",
}
# The GPU machine: CPython 3.12.3 (Ubuntu 24.04's, glibc 2.39), x86_64. --python-version builds
# for another CPython (the rehearsal installs a bundle for the interpreter at hand).
PYTHON_VERSION = "3.12"
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + ["manylinux2014_x86_64"]


def markers(python: str) -> dict[str, str]:
    """The environment markers of a CPython `python` (X.Y) on Linux x86_64: which of a wheel's
    requirements apply there."""
    return {"python_version": python, "python_full_version": "3.12.3" if python == "3.12" else f"{python}.0",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "extra": ""}
# A slice of the demo corpus: every step's data (samples repeat by epoch), a tenth held out so
# that step a's evaluation has its batches; ~5 MB of shards.
DATA_BYTES, TOKENIZER_SAMPLE_BYTES, VALIDATION_FRACTION = 10_000_000, 4_000_000, 0.1


class BundleError(Exception):
    pass


def read_image(path: Path = IMAGE) -> dict[str, str | None]:
    """The image list (`name==version` or `name` lines) as {canonical name: version or None}."""
    have: dict[str, str | None] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise BundleError(f"{path}:{n}: expected `name` or `name==version` (got {line!r})")
        have[canonicalize_name(name)] = version.strip() or None
    return have


def check_requirements() -> dict[str, str]:
    """requirements.txt's pins of the packages the check imports, as {canonical name: "name==version"}."""
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name = canonicalize_name(line.split("==")[0])
            if name not in NOT_FOR_THE_CHECK:
                out[name] = line.strip()
    return out


def requires(wheel: Path, python: str = PYTHON_VERSION) -> list[Requirement]:
    """The requirements of `wheel` that apply on the GPU machine."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    env = markers(python)
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise BundleError(f"pip {args[0]} failed:\n{proc.stderr.strip()[-2000:]}")


def build_wheels(out: Path, image: dict[str, str | None], python: str) -> dict[str, str]:
    """Fill `out` with wheels for CPython `python`; returns {file name: why it is there}."""
    wanted = {name: pin for name, pin in check_requirements().items() if name not in image}
    out.mkdir(parents=True)
    asked = []
    if "deepspeed" in wanted:
        pip("wheel", "--no-deps", "-w", str(out), wanted.pop("deepspeed"))
        asked += [str(r) for r in requires(next(out.glob("deepspeed-*.whl")), python)
                  if canonicalize_name(r.name) not in image and canonicalize_name(r.name) not in wanted]
    asked += wanted.values()
    if asked:
        target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi",
                  "cp" + python.replace(".", ""), *[a for p in PLATFORMS for a in ("--platform", p)]]
        pip("download", "-d", str(out), *target, *asked)
    return prune(out, image, set(check_requirements()), python)


def prune(out: Path, image: dict[str, str | None], for_the_check: set[str], python: str) -> dict[str, str]:
    """Drop the wheels of packages the image has, where every kept wheel is content with the
    image's version. An image package whose version is not known and that a kept wheel
    constrains is shipped: a failed install costs a whole GPU run. Returns {file: why}."""
    wheels = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in out.glob("*.whl")}
    needs: dict[str, list[tuple[str, Requirement]]] = {}
    for name, w in wheels.items():
        for r in requires(w, python):
            needs.setdefault(canonicalize_name(r.name), []).append((name, r))
    why = {}
    for name, wheel in sorted(wheels.items()):
        reqs = needs.get(name, [])
        wanted_by = [f"{by} needs {r}" for by, r in reqs]
        if name in image:
            version = image[name]
            constrained = [f"{by} needs {r}" for by, r in reqs if str(r.specifier)]
            if version is not None and all(r.specifier.contains(version, prereleases=True) for _, r in reqs):
                wheel.unlink()
                continue
            if version is None and not constrained:
                wheel.unlink()
                continue
            why[wheel.name] = (f"the image's {name} ({version or 'version not known'}) may not satisfy: "
                               + "; ".join(constrained or wanted_by))
        else:
            why[wheel.name] = "the check imports it; the image lacks it" if name in for_the_check else \
                "; ".join(wanted_by) + "; the image lacks it"
    return why


def prepared_data(work: Path) -> Path:
    """Data prep of a slice of the built-in demo corpus; returns its manifest."""
    config = json.loads((REPO / "data_prep/configs/demo.json").read_text())
    config["sources"][0]["max_bytes"] = DATA_BYTES
    config["tokenizer"]["sample_bytes"] = TOKENIZER_SAMPLE_BYTES
    config["shards"]["validation_fraction"] = VALIDATION_FRACTION
    (work / "prep.json").write_text(json.dumps(config, indent=2))
    cmd = [sys.executable, "-m", "data_prep", "run", "--config", str(work / "prep.json"), "--out", str(work / "prep")]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    if proc.returncode:
        raise BundleError(f"data prep failed ({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}")
    return work / "prep" / "shards" / "manifest.json"


def copy_data(manifest: Path, out: Path) -> dict:
    """The manifest, the shards it lists and its tokenizer's directory, under out/shards and
    out/tokenizer (the manifest's paths are relative to it, so they stay valid)."""
    from pipeline.data import Manifest

    m = Manifest.load(manifest)
    shards = out / "shards"
    shards.mkdir(parents=True)
    for s in m.shards:
        rel = s.path.relative_to(manifest.parent)
        (shards / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s.path, shards / rel)
    raw = dict(m.raw)
    raw["tokenizer"] = dict(raw["tokenizer"], model=f"../tokenizer/{m.tokenizer.model_path.name}")
    shutil.copytree(m.tokenizer.directory, out / "tokenizer")
    (shards / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n")
    Manifest.load(shards / "manifest.json")  # every path it names resolves inside the bundle
    splits = {split: sum(s.tokens for s in m.split_shards(split)) for split in ("train", "validation")}
    return {"manifest": "data/shards/manifest.json", "tokens": splits, "vocab_size": m.tokenizer.vocab_size}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(out: Path, image_path: Path, manifest: Path | None, python: str = PYTHON_VERSION) -> dict:
    image = read_image(image_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        print("wheels: the packages the check imports that the image lacks ...", flush=True)
        why = build_wheels(tmp / "wheels", image, python)
        with tempfile.TemporaryDirectory() as work:
            if manifest is None:
                print(f"data: preparing {DATA_BYTES / 1e6:.0f} MB of the demo corpus ...", flush=True)
            data = copy_data(manifest or prepared_data(Path(work)), tmp / "data")
        wheels = [{"file": w.name, "name": parse_wheel_filename(w.name)[0], "version": str(parse_wheel_filename(w.name)[1]),
                   "bytes": w.stat().st_size, "sha256": sha256(w), "why": why[w.name]}
                  for w in sorted((tmp / "wheels").glob("*.whl"))]
        doc = {"format": "gpu-bundle", "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "image": {"list": str(image_path.relative_to(REPO)) if image_path.is_relative_to(REPO) else str(image_path),
                         "sha256": sha256(image_path)},
               "target": {"python": python, "platforms": PLATFORMS}, "wheels": wheels, "data": data}
        doc["bytes"] = folder_bytes(tmp) + len(json.dumps(doc, indent=2)) + 40
        if doc["bytes"] > LIMIT_MIB * 2**20:
            largest = sorted(((f.stat().st_size, f) for f in tmp.rglob("*") if f.is_file()), reverse=True)[:3]
            raise BundleError(f"{out}: {doc['bytes'] / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB limit; largest: "
                              + ", ".join(f"{f.relative_to(tmp)} ({b / 2**20:.1f} MiB)" for b, f in largest))
        (tmp / "bundle.json").write_text(json.dumps(doc, indent=2) + "\n")
        for f in tmp.rglob("*"):  # readable by the other users of a shared machine
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python launch/gpu_bundle.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-bundle"), help="the bundle folder (default gpu-bundle)")
    p.add_argument("--image", type=Path, default=IMAGE, help="the GPU machine's packages (default launch/gpu_image.txt)")
    p.add_argument("--manifest", type=Path, help="bundle this prepared data instead of preparing a slice of the "
                   "demo corpus")
    p.add_argument("--python-version", default=PYTHON_VERSION, metavar="X.Y",
                   help=f"the GPU machine's CPython (default {PYTHON_VERSION})")
    args = p.parse_args(argv)
    for name in ("image", "manifest"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            p.error(f"--{name}: no such file (got {path})")
    try:
        doc = build(args.out, args.image.resolve(), args.manifest.resolve() if args.manifest else None,
                    args.python_version)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in doc["wheels"]:
        print(f"  {w['file']:70s} {w['bytes'] / 2**20:5.1f} MiB  {w['why']}")
    tokens = doc["data"]["tokens"]
    print(f"  data: {tokens['train']:,} train and {tokens['validation']:,} validation tokens, vocabulary "
          f"{doc['data']['vocab_size']}")
    print(f"{args.out}: {len(doc['wheels'])} wheels and one data set, {doc['bytes'] / 2**20:.1f} MiB "
          f"(limit {LIMIT_MIB} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
