"""Write-then-rename helpers: a file or directory under its final name is always complete."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from glob import escape as glob_escape
from contextlib import contextmanager
from pathlib import Path


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def commit_dir(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory to its final name (a task's completion marker)."""
    if final.exists():  # a previous attempt finished after all: identical content
        shutil.rmtree(tmp)
        return
    os.rename(tmp, final)


@contextmanager
def staged_dir(final: Path):
    """Yield a temporary directory beside `final`; rename it to `final` when the block completes,
    remove it when the block raises. `final` must not exist."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The name says which process owns it, so the next run can remove what a killed one left.
    owner = f"{socket.gethostname()}-{os.getpid()}"
    _remove_abandoned(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{owner}-", dir=final.parent))
    # mkdtemp makes the directory 0700; renamed into place that would lock out every other user
    # (a shared cluster, a serving container). Give it the mode mkdir would: 0777 less the umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned(final: Path) -> None:
    """Remove the staged directories of `final` that a killed process of this host left behind (a
    process of another host may still be writing its own; those are left alone)."""
    prefix = f".{final.name}.tmp-{socket.gethostname()}-"
    for p in final.parent.glob(f"{glob_escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_tmp(directory: Path) -> None:
    """Remove temporaries that a killed run left behind."""
    if not directory.exists():
        return
    for p in directory.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NpyAppender:
    """A `.npy` file written in pieces: rows are appended as they come and the header's shape is
    fixed up at close, so a writer holds one piece at a time, never the whole array.

    numpy pads every header so that the first axis can grow in place (up to 21 digits), hence
    the file is byte-identical to `np.save` of all the rows at once. The file is created by the
    first non-empty append (or by close(create=True)) and reopened for each append: a task
    with a file per partition does not hold hundreds of descriptors open. Until close() the
    header says 0 rows; a reader only trusts files that a completion marker covers.
    """

    def __init__(self, path: Path, dtype, row_shape: tuple = ()):
        import numpy as np

        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self._created = False

    def _header(self, f) -> None:
        from numpy.lib import format as npy

        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(self.dtype), "fortran_order": False,
                                       "shape": (self.rows, *self.row_shape)})

    def append(self, arr) -> None:
        if len(arr) == 0:
            return
        assert arr.dtype == self.dtype and arr.shape[1:] == self.row_shape, (arr.dtype, arr.shape)
        with open(self.path, "ab" if self._created else "wb") as f:
            if not self._created:
                self._header(f)
                self._created = True
            f.write(arr.tobytes())  # C order, as np.save writes it
        self.rows += len(arr)

    def close(self, create: bool = False) -> None:
        if not self._created and not create:
            return
        with open(self.path, "r+b" if self._created else "wb") as f:
            self._header(f)
        self._created = True
