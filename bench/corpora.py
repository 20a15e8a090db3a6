"""Real text corpora of three kinds, built reproducibly from Debian packages (bench only).

    python bench/corpora.py --corpus prose docs markup [--mb 14] [--cache runs/corpora]

Each corpus is a jsonl file of {"id", "text"} documents with MB megabytes of text (UTF-8),
cached as CACHE/NAME-MBMB.jsonl
with NAME-MBMB.sources.json beside it (the package versions it was read from). Packages come
from the machine's Debian archive (`apt-get download`, then `dpkg -x` into CACHE/debian);
run `apt-get update` first on a fresh machine. None of this text was written for a test:

- prose: English prose. The King James Bible (bible-kjv-text, decoded by bible-kjv's own
  program), one document per chapter; Jane Austen's six novels (r-cran-janeaustenr, read from
  R's serialized lazy-load database), one per chapter; the fortune cookies of `fortunes` and
  the Jargon File (jargon-text), in documents of consecutive entries (~4,000 characters).
- docs: technical documentation and man pages: the Linux man pages (manpages, manpages-dev)
  and Perl's documentation and module pages (perl-doc), each page rendered to text by groff
  as `man` shows it (`-k`: the UTF-8 sources decoded as UTF-8, as `man` does), one document per page.
- markup: markup- and code-heavy text: Python 3.11's documentation as HTML and as its
  reStructuredText sources (python3.11-doc), and the man pages' roff sources, one document
  per file.

Documents of the sources of a corpus are interleaved by size, so that any size has about equal
shares of them.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "prose": ["bible-kjv-text", "bible-kjv", "r-cran-janeaustenr", "fortunes", "jargon-text"],
    "docs": ["manpages", "manpages-dev", "perl-doc"],
    "markup": ["python3.11-doc", "manpages", "manpages-dev", "perl-doc"],
}
CORPORA = ("demo",) + tuple(PACKAGES)


def unpack(packages: list[str], cache: Path) -> dict[str, tuple[str, Path]]:
    """package -> (version, directory it was unpacked into)."""
    debs, out = cache / "debian" / "debs", {}
    debs.mkdir(parents=True, exist_ok=True)
    for name in packages:
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            r = subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True, text=True)
            found = sorted(debs.glob(f"{name}_*.deb"))
            if not found:
                raise SystemExit(f"apt-get download {name} failed (run apt-get update first?): {r.stderr.strip()[-300:]}")
        deb = found[-1]
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True).stdout.strip()
        root = cache / "debian" / "x" / deb.stem
        if not root.exists():
            tmp = root.with_name(root.name + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(root)
        out[name] = (version, root)
    return out


def paragraph_groups(text: str, chars: int = 4000) -> list[str]:
    """Consecutive blank-line-separated paragraphs, joined into pieces of >= chars characters."""
    out, cur, n = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if para.strip():
            cur.append(para)
            n += len(para)
        if n >= chars:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def _r_strings(blob: bytes) -> list[str]:
    """A character vector from R's XDR serialization (format 2 or 3), the one type read here."""
    assert blob[:2] == b"X\n", "not an XDR R serialization"
    version, = struct.unpack(">i", blob[2:6])
    p = 14
    if version == 3:  # native encoding name follows the header
        n, = struct.unpack(">i", blob[p : p + 4])
        p += 4 + n
    flags, length = struct.unpack(">ii", blob[p : p + 8])
    assert flags & 0xFF == 16, "not a character vector"
    p += 8
    out = []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[p : p + 8])
        p += 8
        out.append("" if n == -1 else blob[p : p + n].decode("utf-8", "replace"))
        p += max(n, 0)
    return out


def _austen(root: Path):
    """Chapters of the novels in janeaustenr's lazy-load database: Rdata.rdx (gzip) maps each
    object to (offset, length) in Rdata.rdb, where it is 4 length bytes + zlib data."""
    data = next(root.rglob("janeaustenr/data"))
    index = gzip.decompress((data / "Rdata.rdx").read_bytes())
    rdb = (data / "Rdata.rdb").read_bytes()
    names = re.findall(rb"\x00\x04\x00\x09\x00\x00\x00.([a-z]+)", index.split(b"names", 1)[1])
    spans = [struct.unpack(">ii", index[m.end() : m.end() + 8]) for m in re.finditer(rb"\x00\x00\x00\x0d\x00\x00\x00\x02", index)]
    for name, (off, n) in zip([x.decode() for x in names], spans):
        lines = _r_strings(zlib.decompress(rdb[off + 4 : off + n]))
        for k, chapter in enumerate(re.split(r"\n(?=(?:CHAPTER|Chapter) )", "\n".join(lines))):
            yield f"austen/{name}#{k}", chapter


def _kjv(pk):
    program = pk["bible-kjv"][1] / "usr" / "bin" / "bible"
    data = pk["bible-kjv-text"][1] / "usr" / "lib"
    text = subprocess.run([str(program), "-p", str(data), "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    for k, chapter in enumerate(re.split(r"\n(?=\S[^\n]* \d+\n)", text.strip())):
        yield f"kjv#{k}", chapter


def _fortunes(root: Path):
    for f in sorted((root / "usr" / "share" / "games" / "fortunes").iterdir()):
        if f.suffix in (".dat", ".u8") or f.is_symlink() or not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace").replace("\n%\n", "\n\n")
        for k, piece in enumerate(paragraph_groups(text)):
            yield f"fortunes/{f.name}#{k}", piece


def _jargon(root: Path):
    text = gzip.decompress(next(root.rglob("jargon.txt.gz")).read_bytes()).decode("utf-8", "replace")
    for k, piece in enumerate(paragraph_groups(text)):
        yield f"jargon#{k}", piece


def _man_pages(roots: list[Path]) -> list[Path]:
    pages = []
    for root in roots:
        for p in sorted((root / "usr" / "share" / "man").rglob("*.gz")):
            if p.is_file() and not p.is_symlink():
                pages.append(p)
    return pages


def _rendered(pages: list[Path], rel: Path):
    def render(p: Path) -> str:
        src = gzip.decompress(p.read_bytes())
        if src.lstrip().startswith(b".so "):  # an alias of another page
            return ""
        r = subprocess.run(["groff", "-k", "-t", "-e", "-man", "-Tutf8", "-P-cbou"], input=src, capture_output=True)
        return r.stdout.decode("utf-8", "replace")

    with ThreadPoolExecutor(2) as pool:
        for p, text in zip(pages, pool.map(render, pages)):
            if text.strip():
                yield f"man/{p.relative_to(rel)}", text


def _roff(pages: list[Path], rel: Path):
    for p in pages:
        text = gzip.decompress(p.read_bytes()).decode("utf-8", "replace")
        if not text.lstrip().startswith(".so "):
            yield f"roff/{p.relative_to(rel)}", text


def _python_doc(root: Path, suffix: str):
    base = next(root.rglob("python3.11/html"))
    for p in sorted(base.rglob(f"*{suffix}")):
        yield f"pydoc/{p.relative_to(base)}", p.read_text(encoding="utf-8", errors="replace")


def _sources(name: str, pk: dict) -> list:
    if name == "prose":
        return [_kjv(pk), _austen(pk["r-cran-janeaustenr"][1]), _fortunes(pk["fortunes"][1]), _jargon(pk["jargon-text"][1])]
    roots = [pk[n][1] for n in ("manpages", "manpages-dev", "perl-doc")]
    rel = roots[0].parent
    if name == "docs":
        return [_rendered(_man_pages([r]), rel) for r in roots]
    doc = pk["python3.11-doc"][1]
    return [_python_doc(doc, ".html"), _python_doc(doc, ".rst.txt")] + [_roff(_man_pages([r]), rel) for r in roots]


def _balanced(sources: list):
    """(id, text) of the documents of several sources, each next one from the source with the
    fewest bytes so far, so that any prefix has about equal shares of every source."""
    sizes = {k: 0 for k in range(len(sources))}
    while sizes:
        k = min(sizes, key=sizes.get)
        doc = next(sources[k], None)
        if doc is None:
            del sizes[k]
            continue
        sizes[k] += len(doc[1])
        yield doc


def build(name: str, mb: float, cache: Path) -> Path:
    """CACHE/NAME-MBMB.jsonl, built once; returns its path."""
    out = cache / f"{name}-{mb:g}MB.jsonl"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if name == "demo":
        sys.path.insert(0, str(ROOT / "bench"))
        from prep_throughput import build_corpus

        build_corpus(cache / "demo-build", mb, 1)
        (cache / "demo-build" / "part-000.jsonl").rename(tmp)
        sources = {"site-packages": "the demo corpus: docs, licences and docstrings of the installed packages"}
    else:
        pk = unpack(PACKAGES[name], cache)
        sources = {k: v for k, (v, _) in pk.items()}
        size = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for doc_id, text in _balanced(_sources(name, pk)):
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
                size += len(text.encode("utf-8", "surrogatepass"))
                if size >= mb * 1e6:
                    break
        if size < mb * 1e6:
            print(f"{name}: only {size / 1e6:.1f} MB available (asked for {mb:g})", file=sys.stderr)
    tmp.rename(out)
    out.with_suffix(".sources.json").write_text(json.dumps(sources, indent=1) + "\n")
    return out


def read(path: Path) -> list[tuple[str, str]]:
    return [(d["id"], d["text"]) for d in map(json.loads, open(path, encoding="utf-8"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", choices=CORPORA, default=list(PACKAGES))
    ap.add_argument("--mb", type=float, default=14, help="size of each corpus in MB of text, UTF-8 (default 14: >= 10 MB after cleaning)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "corpora", help="where corpora are built and kept")
    args = ap.parse_args()
    for name in args.corpus:
        path = build(name, args.mb, args.cache)
        docs = read(path)
        mb = sum(len(t.encode("utf-8", "surrogatepass")) for _, t in docs) / 1e6
        print(f"{name}: {path}: {mb:.1f} MB of text, {len(docs)} documents, "
              f"from {json.loads(path.with_suffix('.sources.json').read_text())}")


if __name__ == "__main__":
    main()
