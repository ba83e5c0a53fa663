"""Crash-safe file writing: a reader sees the old content or the new, never half of either.

Files and folders written here get the permissions of the process's umask (as ``open`` / ``mkdir`` give),
not the private 0600 / 0700 of :mod:`tempfile`. A folder is replaced by one atomic exchange of the old and new
folders where the system has it (Linux ``renameat2(RENAME_EXCHANGE)``), else by two renames that keep the old
folder as ``.<name>.old`` until the new one is in place; :func:`recover` puts such a folder back after a crash
between the two and removes temporary files and folders a killed save left behind. :func:`read_json` reads a
JSON file, naming the file (and line) in every error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

_UMASK_LOCK = threading.Lock()
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def umask() -> int:
    """The process's current umask (read by setting and restoring it)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _temp_name(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[str]:
    """Yield the name of a fresh temporary file beside ``path`` (``.<name>.<random>.tmp``, with the permissions
    ``open`` would give it under the umask) for the body to write; on success it is flushed to disk and replaces
    ``path`` (``os.replace``); if the body raises, it is removed and ``path`` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_name(path), suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def follow_umask(path: Path) -> None:
    """Give the file ``path`` the permissions ``open`` would under the umask (safetensors writes 0600)."""
    os.chmod(path, 0o666 & ~umask())


def protected(folder: Path) -> str | None:
    """Why ``folder`` must never be deleted whatever its marker says (the current folder, one of its
    parents, the home folder or the root), or None."""
    here, target = Path.cwd().resolve(), Path(folder).resolve()
    if target == here:
        return "it is the current folder"
    if target in here.parents:
        return "it is a parent of the current folder"
    if target == Path.home().resolve():
        return "it is the home folder"
    if target == Path(target.anchor):
        return "it is the root folder"
    return None


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (symbolic links resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be created (its nearest existing folder is a file, or not writable), or None."""
    start = Path(path).absolute()
    nearest = next(p for p in (start, *start.parents) if p.exists())
    if nearest != start and not nearest.is_dir():
        return f"{nearest} is a file, not a folder"
    folder = nearest if nearest.is_dir() else nearest.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write into {folder} (permission denied)"
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path``, and the folders holding them, to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False
    where the system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


EXCHANGE = True  # use the atomic exchange where the system has it (tests turn it off to try the fallback)


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished folder ``src`` to ``dest``, replacing any folder there, such that a crash at any
    moment leaves the old or the new folder visible under ``dest``, or the old one as ``.<dest>.old`` beside
    it, which :func:`recover` puts back."""
    src, dest = Path(src), Path(dest)
    old = dest.with_name(f".{dest.name}{OLD_SUFFIX}")
    if old.exists() and not dest.exists():  # a crash between the renames of an earlier replacement
        os.rename(old, dest)
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        if EXCHANGE and _exchange(src, dest):  # src now holds the old folder
            fsync_dir(dest.parent)
            shutil.rmtree(src, ignore_errors=True)
            return
        os.rename(dest, old)
    os.rename(src, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def make_temp_dir(path: Path) -> Path:
    """A fresh temporary folder beside ``path`` (named ``.<name>.<random>.tmp``), with the permissions
    ``mkdir`` would give it under the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_name(path), suffix=TMP_SUFFIX))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it is flushed to disk and replaces ``path``
    whole (:func:`replace_dir`).

    If the body raises, the temporary folder is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = make_temp_dir(path)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")


def is_temporary(entry: Path) -> bool:
    """``entry`` is named as this module names its temporary files and folders."""
    return bool(_TEMP.match(entry.name))


def recover(folder: Path, *, temporaries: bool = True) -> list[str]:
    """Undo what a crash left in ``folder`` (not recursively): a ``.<name>.old`` folder whose ``<name>`` is
    missing is renamed back, one whose ``<name>`` exists is removed; with ``temporaries``, temporary files and
    folders of interrupted writes are removed. Only call it on a folder no other process is writing (a moela
    run folder under its lock). Returns what was done, one line per entry."""
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name.startswith(".") and name.endswith(OLD_SUFFIX) and len(name) > len(OLD_SUFFIX) + 1 \
                and entry.is_dir() and not entry.is_symlink():
            original = folder / name[1:-len(OLD_SUFFIX)]
            if not original.exists():
                os.rename(entry, original)
                done.append(f"restored {original} (a replacement was interrupted)")
            else:
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry}")
        elif temporaries and is_temporary(entry):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else \
                entry.unlink(missing_ok=True)
            done.append(f"removed {entry}")
    return done


def recover_dir(path: Path) -> None:
    """Put back the folder ``path`` if a crash left it only as ``.<name>.old`` (nothing else is touched)."""
    path = Path(path)
    old = path.with_name(f".{path.name}{OLD_SUFFIX}")
    if not path.exists() and old.is_dir():
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.rename(old, path)


# --- reading ----------------------------------------------------------------------------------------------------
def decode_text(path: Path, raw: bytes) -> str:
    """``raw`` as UTF-8 (a leading BOM dropped); ValueError naming the file, line and byte where it is not."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_json(text: str, where: str, *, add_line: bool = True) -> Any:
    """``json.loads(text)``; ValueError starting with ``where`` (the file, or the file and line; ``add_line``:
    add the line of a syntax error) when the text is not JSON, is nested too deeply, or holds an integer too long
    to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = f": line {err.lineno}" if add_line else ""
        raise ValueError(f"{where}{line}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"{where}: cannot read the JSON ({str(err).splitlines()[0]})") from None


def read_json(path: str | Path) -> Any:
    """The JSON value in the file ``path``; every error (missing, unreadable, not UTF-8, not JSON, too deep)
    names the file and, where it has one, the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a folder, not a JSON file") from None
    except OSError as err:
        raise OSError(f"{path}: cannot read the file ({err.strerror or err})") from None
    return parse_json(decode_text(path, raw), str(path))
