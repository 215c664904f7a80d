"""A folder written as one transaction: built beside its place, then swapped in whole.

A reader sees the old folder or the new one, never a mix; a write that fails or is killed leaves the old one whole.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .fileio import (current_umask, is_stale, is_temporary, process_start_time, remove_stale_temporaries,
                     temporary_prefix)

RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step
AT_FDCWD = -100


def staging_patterns(name: str) -> tuple[str, str]:
    """The names of a transaction's temporaries beside folder `name`: the new folder being built, and (where the
    system cannot swap two folders in one step) the old folder set aside for the moment of the swap."""
    return f".{name}.*.tmp", f".{name}-aside.*.tmp"


def exchange(first: Path, second: Path) -> bool:
    """Swap two folders in one step (Linux renameat2); False where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rename = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = rename(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    return result == 0


def restore_set_aside(directory: Path) -> None:
    """A writer killed between the two renames of the fallback swap left the old folder aside and none in its
    place: put it back, so nothing the user had is lost."""
    if directory.exists() or directory.is_symlink():
        return
    asides = sorted(directory.parent.glob(staging_patterns(directory.name)[1]), key=lambda p: p.stat().st_mtime)
    if asides:
        os.rename(asides[-1], directory)


def carry_over(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Entries of the old folder that `keep` names and the new one lacks, hard-linked into the new one (the same
    files, so the user's own files beside a save survive the swap unchanged); copied where links fail."""
    started = process_start_time()
    for entry in old.iterdir():
        leftover = is_temporary(entry.name) and is_stale(entry, started)  # a killed writer's, never the user's
        if leftover or not keep(entry.name) or (new / entry.name).exists():
            continue
        link_tree(entry, new / entry.name)


def link_tree(source: Path, target: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), target)  # the link itself, never what it points to
    elif source.is_dir():
        target.mkdir()
        for entry in source.iterdir():
            link_tree(entry, target / entry.name)
        shutil.copystat(source, target)
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


@contextmanager
def folder_transaction(directory: str | os.PathLike, keep: Optional[Callable[[str], bool]] = None) -> Iterator[Path]:
    """Yield an empty folder beside `directory` to write into; when the block ends without an error it takes
    `directory`'s place in one step. `keep(name)` says which entries of an existing folder are the user's own and
    are carried into the new one (every other entry belonged to the previous write and goes with it)."""
    directory = Path(directory)
    if directory.is_symlink() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a link to something that is not a folder; name a folder to write")
    directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file; name a folder to write the save into")
    directory.parent.mkdir(parents=True, exist_ok=True)
    restore_set_aside(directory)
    remove_stale_temporaries(directory.parent, staging_patterns(directory.name))
    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(directory.name), suffix=".tmp", dir=directory.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared save from its group
        if directory.is_dir():
            carry_over(directory, staging, keep or (lambda name: False))
            swap_in(staging, directory)
        else:
            os.rename(staging, directory)
    finally:
        discard(staging)  # the unfinished new folder, or after the swap the old one


def discard(folder: Path) -> None:
    """Remove a transaction's leftover folder, making read-only subfolders writable first; what still resists
    stays as a temporary that the next write beside it removes, rather than failing a write that succeeded."""
    def writable_then_retry(function: Callable, path: str, _: object) -> None:
        try:
            os.chmod(os.path.dirname(path), 0o700)
            function(path)
        except OSError:
            pass

    if folder.exists():
        shutil.rmtree(folder, onerror=writable_then_retry)


def swap_in(staging: Path, directory: Path) -> None:
    """Put the finished `staging` folder in `directory`'s place; the old folder ends up at `staging`."""
    if exchange(staging, directory):
        return
    aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(f"{directory.name}-aside"), suffix=".tmp",
                                  dir=directory.parent))
    os.rmdir(aside)
    os.rename(directory, aside)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(aside, directory)
        raise
    os.rename(aside, staging)
