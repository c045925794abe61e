"""What `complete` and `eval` share on the command line: the output-directory guard and progress bars.

Issue 15: writing into a directory that holds an earlier run's outputs left old files beside new ones (an old
sample-3.mid next to a new sample-0.mid), and long jobs printed nothing for minutes.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless `overwrite`, or one that cannot be created; ValueError says why
    (one line)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty (an earlier run's output?): pass --overwrite to replace its files, "
                         "or choose another directory")
    # Now, not after the work, and without leaving anything behind: can the nearest existing ancestor hold it?
    base = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=base))
    except OSError as e:
        raise ValueError(f"cannot create the output directory {out}: {e.strerror or e}") from None


def clear_own_files(out: Path, patterns: Sequence[str]) -> list[Path]:
    """Delete the files of `out` (not below) whose names match one of `patterns`: the files this command
    writes, so none of an earlier run's is left beside the new ones; anything else stays. Returns them."""
    gone = []
    if out.is_dir():
        for p in sorted(out.iterdir()):
            if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns):
                p.unlink()
                gone.append(p)
    return gone


def progress_enabled(quiet: bool) -> bool:
    """Bars only for a person watching: not with --quiet, not when stderr is a file or a pipe."""
    return not quiet and sys.stderr.isatty()


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str) -> tqdm:
    """A tqdm bar on stderr (a disabled one, whose updates cost nothing, when not `enabled`)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)
