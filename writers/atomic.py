"""Write-then-rename helpers: outputs appear under their final name only when complete."""
from __future__ import annotations

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


def commit(tmp: Path, final: Path, overwrite: bool = True) -> None:
    """Move the finished ``tmp`` (file or directory) to ``final``.

    A file replaces an existing file atomically (``os.replace``).  A directory replaces an existing one by
    renaming the old one aside first, then deleting it.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"output {final} already exists (pass overwrite=True to replace it)")
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
