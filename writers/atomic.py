"""Write-then-rename helpers: outputs appear under their final name only when complete, and durably.

:func:`commit` flushes the finished output to disk before the rename and the folder entry after it, so a
crash or power loss at any moment leaves either the complete new output or none — never a renamed file
whose blocks were still in the page cache.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path


def partial_path(final: Path) -> Path:
    """A unique hidden sibling of ``final`` (same directory, so the final rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:10]}")


def remove_path(path: Path | None) -> None:
    """Remove a file or directory tree if it exists (errors ignored: used on failure paths)."""
    if path is None:
        return
    p = Path(path)
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:
        pass


def check_target(final: Path, overwrite: bool) -> None:
    """Fail early when ``final`` exists and must not be replaced, or its folder is missing."""
    final = Path(final)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"output folder {final.parent} does not exist")
    if final.exists() and not overwrite:
        raise FileExistsError(f"output {final} already exists (pass overwrite=True to replace it)")


def fsync_path(path: Path) -> None:
    """fsync(2) a file or a folder (a folder's fsync makes the entries created or renamed in it durable;
    file systems that cannot fsync a folder, EINVAL, are skipped)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not Path(path).is_dir():
            raise
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the file system holding ``path``: one syncfs(2) rather than one fsync per
    file of a Zarr store with thousands of chunk files (``os.sync()`` where syncfs is unavailable)."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs failed for {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def flush_to_disk(path: Path) -> None:
    """Make the finished output at ``path`` durable: a file is fsynced; a folder tree is flushed with its
    file system (:func:`sync_filesystem`)."""
    path = Path(path)
    if path.is_dir():
        sync_filesystem(path)
    else:
        fsync_path(path)


def commit(tmp: Path, final: Path, overwrite: bool = True) -> None:
    """Flush the finished ``tmp`` (file or directory) to disk and move it to ``final``.

    A file replaces an existing file atomically (``os.replace``).  A directory replaces an existing one by
    renaming the old one aside first, then deleting it.  The folder holding ``final`` is fsynced after the
    rename.  A failed flush (e.g. an I/O error) raises and leaves ``final`` untouched.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"output {final} already exists (pass overwrite=True to replace it)")
    flush_to_disk(tmp)
    if tmp.is_dir():
        if final.exists():
            aside = partial_path(final)
            os.rename(final, aside)
            os.rename(tmp, final)
            remove_path(aside)
        else:
            os.rename(tmp, final)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)
