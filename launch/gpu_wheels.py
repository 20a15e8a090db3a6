"""Build the wheel directory that `make gpu-check WHEELS=DIR` installs from, on a machine with a
package registry, for a GPU machine without one (Python 3.12, manylinux x86_64).

    python launch/gpu_wheels.py --out gpu-wheels [--have target-packages.txt]

deepspeed has no wheel on PyPI: it is built here from its source release (`pip wheel --no-deps`;
its CUDA ops are compiled on the GPU machine when first used). Everything else of requirements.txt
comes as binary wheels for the target, with their dependencies, except:
  * torch: the GPU machine's own CUDA build is used, never replaced;
  * what the check never imports (SKIPPED);
  * with --have FILE (`python3 -m pip freeze > FILE` run on the GPU machine): what the target
    already has, kept at its version, unless a wheel here needs a version it lacks.
Keep the directory small: some GPU machines take files in only up to about 60 MB at a time.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
# ray: the multi-node data-prep executor; datasets: the `datasets` reader; rensa: a benchmark's
# peer; pytest: the CPU tests. The GPU check uses none of them, and ray alone is ~70 MB.
SKIPPED = {"torch", "ray", "datasets", "rensa", "pytest"}
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
            for a in ("--platform", p)]]
# Markers of the target, to tell which of a wheel's requirements apply there.
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
LIMIT_MB = 60  # what some GPU machines take in at a time


def pins() -> dict[str, str]:
    """requirements.txt as {name: "name==version"}, minus SKIPPED."""
    out = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name = canonicalize_name(line.split("==")[0])
            if name not in SKIPPED:
                out[name] = line.strip()
    return out


def read_have(path: Path | None) -> dict[str, str | None]:
    """`pip freeze` output (or bare names) as {name: version or None}."""
    if path is None:
        return {}
    have = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:==\s*(\S+))?", line.strip())
        if m and not line.startswith("#"):
            have[canonicalize_name(m[1])] = m[2]
    return have


def requires(wheel: Path) -> list[Requirement]:
    """The requirements of `wheel` that apply on the target."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET_MARKERS)]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(out: Path, have: dict[str, str | None]) -> None:
    wanted = pins()
    out.mkdir(parents=True, exist_ok=True)
    pip("wheel", "--no-deps", "--quiet", "-w", str(out), wanted.pop("deepspeed"))
    deepspeed = next(out.glob("deepspeed-*.whl"))
    extra = [str(r) for r in requires(deepspeed) if canonicalize_name(r.name) not in SKIPPED | set(wanted)]
    asked = [spec for name, spec in wanted.items() if name not in have] + extra
    pip("download", "--quiet", "-d", str(out), *TARGET, *asked)
    prune(out, have)


def prune(out: Path, have: dict[str, str | None]) -> None:
    """Drop the wheels of packages the target has, where every wheel kept is content with its version."""
    wheels = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in out.glob("*.whl")}
    needs: dict[str, list[Requirement]] = {}
    for w in wheels.values():
        for r in requires(w):
            needs.setdefault(canonicalize_name(r.name), []).append(r)
    for name, wheel in wheels.items():
        if name not in have or name == "deepspeed":
            continue
        version = have[name]
        if version is None or all(r.specifier.contains(version, prereleases=True) for r in needs.get(name, [])):
            wheel.unlink()
            print(f"kept on the target: {name} {version or '(version not given)'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python launch/gpu_wheels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the wheel directory (created)")
    p.add_argument("--have", type=Path, help="`pip freeze` of the GPU machine: leave out what it already has")
    args = p.parse_args(argv)
    if args.have and not args.have.is_file():
        p.error(f"--have: no such file (got {args.have})")
    build(args.out, read_have(args.have))
    size = sum(w.stat().st_size for w in args.out.glob("*.whl")) / 1e6
    print(f"{args.out}: {len(list(args.out.glob('*.whl')))} wheels, {size:.1f} MB"
          + (f" (over {LIMIT_MB} MB: pass --have)" if size > LIMIT_MB else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
