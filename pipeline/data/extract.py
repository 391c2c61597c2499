"""Safe zip extraction.

Every member name is checked *before* anything is written: absolute paths, drive letters,
``..`` components, symlinks and other special files (from the Unix mode in the zip's
external attributes) are rejected. Members are then streamed into a temporary folder beside
the target, with the CRC of each member checked by :mod:`zipfile` as it is read, and the
folder is renamed into place only when every member extracted cleanly. On any failure
(hostile member, CRC error, truncated archive, full disk) no part of the tree is left.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.io import atomic_dir


class ExtractError(RuntimeError):
    """The archive is unsafe, truncated or corrupt."""


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a member would be unsafe to extract, or None when it is fine."""
    name = info.filename
    if "\x00" in name:
        return "contains a NUL byte"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":"):
        return "is an absolute path"
    parts = [p for p in PurePosixPath(norm).parts if p not in ("", ".")]
    if not parts:
        return "has an empty name"
    if ".." in parts:
        return "contains a '..' component"
    mode = (info.external_attr >> 16) & 0xFFFF
    if mode and info.create_system == 3:  # Unix attributes present
        kind = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            return "is a symbolic link"
        if kind and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return f"is a special file (mode {oct(mode)})"
    return None


def _target(root: Path, info: zipfile.ZipInfo) -> Path:
    parts = [p for p in PurePosixPath(info.filename.replace("\\", "/")).parts if p not in ("", ".")]
    return root.joinpath(*parts)


def check_members(archive: str | os.PathLike) -> list[zipfile.ZipInfo]:
    """Open ``archive`` and validate every member name; return the member list."""
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
    except FileNotFoundError:
        raise ExtractError(f"archive {archive} does not exist") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
        raise ExtractError(f"archive {archive} is not a readable zip file (truncated or corrupt "
                           f"download?): {e}") from e
    bad = [(i.filename, why) for i in infos if (why := _member_problem(i))]
    if bad:
        shown = "; ".join(f"{n!r} {why}" for n, why in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ExtractError(f"archive {archive} has unsafe members, nothing was extracted: {shown}{more}")
    return infos


def safe_extract_zip(archive: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = True) -> Path:
    """Extract ``archive`` into the folder ``dest`` (created or replaced atomically).

    Raises :class:`ExtractError` naming the archive for unsafe members, a truncated or corrupt
    archive (bad CRC, bad compressed data) or too little free disk space.
    """
    archive, dest = Path(archive), Path(dest)
    infos = check_members(archive)
    total = sum(i.file_size for i in infos)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if total > free:
        raise ExtractError(f"archive {archive} needs {total / 2**30:.2f} GiB to extract but only "
                           f"{free / 2**30:.2f} GiB are free in {dest.parent}")
    try:
        with atomic_dir(dest) as tmp, zipfile.ZipFile(archive) as zf, \
                tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"extract {archive.name}",
                     disable=not progress) as bar:
            tmp_resolved = tmp.resolve()
            for info in infos:
                target = _target(tmp, info)
                # Belt and braces: the resolved target must stay inside the temporary root.
                if not str(target.resolve()).startswith(str(tmp_resolved) + os.sep):
                    raise ExtractError(f"archive {archive}: member {info.filename!r} would land outside "
                                       f"the target folder")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    while True:
                        chunk = src.read(1 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
                        bar.update(len(chunk))
    except ExtractError:
        raise
    except FileExistsError as e:
        raise ExtractError(f"archive {archive} lists a member twice: {e.filename}") from e
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as e:
        raise ExtractError(f"archive {archive} is truncated or corrupt (re-download it): {e}") from e
    except OSError as e:
        raise ExtractError(f"extracting archive {archive} into {dest} failed: {e}") from e
    return dest


def verify_zip(archive: str | os.PathLike, *, progress: bool = False) -> None:
    """Read every member and check its CRC without writing anything (raises :class:`ExtractError`)."""
    archive = Path(archive)
    infos = check_members(archive)
    try:
        with zipfile.ZipFile(archive) as zf, tqdm(total=sum(i.file_size for i in infos), unit="B",
                                                   unit_scale=True, unit_divisor=1024, desc=f"check {archive.name}",
                                                   disable=not progress) as bar:
            for info in infos:
                if info.is_dir():
                    continue
                with zf.open(info) as src:
                    while chunk := src.read(1 << 20):
                        bar.update(len(chunk))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError, OSError) as e:
        raise ExtractError(f"archive {archive} is truncated or corrupt (re-download it): {e}") from e
