"""Obtain a real dataset's official archive, verify it, extract it and prepare it.

``acquire_dataset`` is what the ``download`` stage calls for ``ade20k`` and ``coco_stuff_10k``:

1. Look for ``<archive_dir or raw_dir>/<official archive name>``. If it is there, no network
   is used.
2. Otherwise download it into ``raw_dir`` (resuming ``<name>.part``), unless
   ``allow_network=False`` or the server is unreachable: then :class:`AcquireError` says
   which URL to fetch, which file name to save it as and which folder to put it in.
3. Verify it:
   * with a checksum (the pinned one, ``md5:7328b3…`` for ADE20K, or the ``checksum``
     override ``data.checksum``): the digest must match. A mismatch names the key to set;
   * ``data.checksum`` / ``data.url`` may be scoped per dataset
     (``ade20k=md5:<hex>, coco_stuff_10k=sha256:<hex>``, see
     :func:`pipeline.data.sources.scoped_override`): an override written for one archive then
     never applies to the other;
   * with none (COCO-Stuff-10K publishes none): if a ``<name>.sha256`` record exists beside
     the archive (or in ``raw_dir``) the archive's sha256 must match it; otherwise the
     archive is trusted on first use only after *every* member extracts with a correct CRC
     **and** the preparation succeeded (a damaged copy whose CRCs pass is never pinned), and
     then its sha256 is recorded in ``<name>.sha256`` (``sha256sum`` format; in ``raw_dir``
     when the archive folder is read-only). Later runs are checked against it. Delete the
     record to accept a different copy.
4. Extract (safely) into a temporary folder under ``raw_dir``, prepare into ``out_dir``
   (atomically), remove the temporary extraction. Preparation errors name the member inside
   the archive (``annotations/x.mat in data/raw/cocostuff-10k-v1.1.zip``), never the
   temporary folder, which is gone by the time the message is read.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.data.download import ChecksumError, DownloadError, download, file_digest, parse_checksum
from pipeline.data.extract import ExtractError, safe_extract_zip
from pipeline.data.prepare import PrepareError, find_dataset_root, prepare_dataset
from pipeline.data.sources import get_source, scoped_override
from pipeline.io import write_text


class AcquireError(RuntimeError):
    """The dataset archive is unavailable or fails verification."""


def _record_paths(archive: Path, raw_dir: Path) -> list[Path]:
    name = archive.name + ".sha256"
    paths = [archive.with_name(name)]
    if raw_dir.resolve() != archive.parent.resolve():
        paths.append(raw_dir / name)
    return paths


def _read_record(path: Path) -> str:
    text = path.read_text(encoding="utf-8").strip()
    digest = text.split()[0].lower() if text else ""
    parse_checksum("sha256:" + digest)  # validates the format
    return digest


def _write_record(archive: Path, raw_dir: Path, digest: str) -> Path:
    line = f"{digest}  {archive.name}\n"
    last_error: OSError | None = None
    for path in _record_paths(archive, raw_dir):
        try:
            write_text(path, line)
            return path
        except OSError as e:
            last_error = e
    raise AcquireError(f"cannot record the sha256 of {archive}: {last_error}")


def _in_archive(message: str, extracted: Path, archive: Path) -> str:
    """``message`` with every path under the temporary extraction ``extracted`` replaced by the
    member path inside ``archive`` (``annotations/x.mat in data/raw/x.zip``)."""
    roots = {str(extracted), str(extracted.resolve())}
    for root in sorted(roots, key=len, reverse=True):
        pattern = re.escape(root) + r"(?:/([^\s,;:()'\"]*[^\s,;:()'\".]))?"

        def repl(m: re.Match) -> str:
            member = m.group(1)
            return f"{member} in {archive}" if member else f"the archive {archive}"

        message = re.sub(pattern, repl, message)
    return message


def _is_scoped(value: str) -> bool:
    return "=" in (value or "").partition(":")[0]


def _trust_hint(dataset: str, algo: str, actual: str) -> str:
    return (f"If you trust this copy, set `data.checksum: {dataset}={algo}:{actual}` in params.yaml "
            f"(the '{dataset}=' prefix limits it to this dataset's archive).")


def _manual_help(src, url: str, folder: Path) -> str:
    return (f"Download {url} ({src.approx_size}) on a machine with internet access, save it as "
            f"'{src.archive_name}' and put it in {folder} (or set data.archive_dir to the folder that "
            f"holds it); then run the stage again. See docs/DATASETS.md.")


def acquire_dataset(dataset: str, out_dir: str | os.PathLike, raw_dir: str | os.PathLike, *, url: str = "",
                    checksum: str = "", archive_dir: str = "", workers: int = 1, progress: bool = True,
                    allow_network: bool = True) -> dict:
    """Find or download, verify, extract and prepare ``dataset`` into ``out_dir``; return a summary.

    ``url``/``checksum`` override the official ones (``data.url``/``data.checksum``);
    ``archive_dir`` is a folder that already holds the official archive (``data.archive_dir``);
    ``workers`` are the preparation processes (``data.prepare_workers``).
    """
    src = get_source(dataset)
    raw_checksum = checksum
    given = scoped_override(checksum, dataset, "data.checksum")
    url = scoped_override(url, dataset, "data.url") or src.url
    checksum = given or src.checksum
    if checksum:
        try:
            parse_checksum(checksum)
        except ValueError as e:
            raise ValueError(f"data.checksum: {e}") from None
    raw_dir = Path(raw_dir)
    folder = Path(archive_dir) if archive_dir else raw_dir
    archive = folder / src.archive_name
    downloaded = False
    t0 = time.time()

    if not archive.is_file():
        if archive_dir and (raw_dir / src.archive_name).is_file():
            archive = raw_dir / src.archive_name  # downloaded here by an earlier run
        elif not allow_network:
            raise AcquireError(f"the {dataset} archive {archive} is not there and network access is off. "
                               + _manual_help(src, url, folder))
        else:
            archive = raw_dir / src.archive_name
            try:
                download(url, archive, checksum=checksum, progress=progress)
            except ChecksumError as e:
                source = ("data.checksum in params.yaml" if given else
                          f"the pinned checksum of the official {src.archive_name}")
                raise AcquireError(f"{e} The expected digest is {source}. If you trust this file, set "
                                   f"`data.checksum: {dataset}=<algo>:<digest>` to the actual digest above.") from e
            except DownloadError as e:
                raise AcquireError(f"cannot download the {dataset} archive: {e}\n"
                                   + _manual_help(src, url, folder)) from e
            downloaded = True

    # ---- verification
    record_path: Path | None = None
    record_written = False
    if checksum:
        algo, expected = parse_checksum(checksum)
        actual = file_digest(archive, algo, progress=progress) if not downloaded else expected
        if actual != expected:
            if given:
                origin = f"the data.checksum override in params.yaml, {given!r}"
                if not _is_scoped(raw_checksum):
                    origin += (", which applies to every dataset: if it was written for another archive, "
                               "scope it as '<dataset>=...' or set it to ''")
            else:
                origin = f"the pinned checksum of the official {src.archive_name}"
            raise AcquireError(f"checksum mismatch for {archive}: expected {algo}:{expected} ({origin}), got "
                               f"{algo}:{actual}. The file is incomplete or another copy than the one expected: "
                               f"delete it and run again to download it, or put a good copy there. "
                               + _trust_hint(dataset, algo, actual))
        verification = f"{algo} {'pinned' if checksum == src.checksum else 'given'} checksum"
        sha256 = actual if algo == "sha256" else None
    else:
        sha256 = file_digest(archive, "sha256", progress=progress)
        records = [p for p in _record_paths(archive, raw_dir) if p.is_file()]
        if records:
            record_path = records[0]
            try:
                expected = _read_record(record_path)
            except ValueError as e:
                raise AcquireError(f"{record_path} is not a sha256 record ({e}); delete it") from None
            if sha256 != expected:
                raise AcquireError(f"checksum mismatch for {archive}: expected sha256:{expected} (recorded in "
                                   f"{record_path} on first use), got sha256:{sha256}. Delete the archive and run "
                                   f"again, or delete {record_path} to accept this copy (or pin a digest with "
                                   f"`data.checksum: {dataset}=sha256:<hex>` in params.yaml).")
            verification = f"sha256 recorded in {record_path.name}"
        else:
            verification = "zip CRCs (first use); sha256 recorded"

    # ---- extract, prepare, clean up
    raw_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".extract-{dataset}-", dir=raw_dir))
    try:
        try:
            extracted = safe_extract_zip(archive, work / "x", progress=progress)
        except ExtractError as e:
            raise AcquireError(f"{e}. Delete {archive} and run again to download a fresh copy, or put a good "
                               f"copy of {src.archive_name} there.") from e
        try:
            root = find_dataset_root(dataset, extracted)
            summary = prepare_dataset(dataset, root, out_dir, workers=workers, progress=progress)
        except PrepareError as e:
            msg = _in_archive(str(e), extracted, archive).rstrip()
            if not checksum and record_path is None:
                msg += ("" if msg.endswith(".") else ".") + \
                    f" Nothing was recorded in {archive.name}.sha256: this copy is not trusted."
            raise AcquireError(msg) from e
        if not checksum and record_path is None:  # every CRC passed and it prepared: pin this copy
            record_path = _write_record(archive, raw_dir, sha256)
            record_written = True
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary.update({
        "archive": str(archive),
        "url": url,
        "downloaded": downloaded,
        "checksum": checksum or (f"sha256:{sha256}" if sha256 else ""),
        "sha256": sha256,
        "verification": verification,
        "sha256_record": str(record_path) if record_path else None,
        "sha256_record_written": record_written,
        "seconds": round(time.time() - t0, 1),
    })
    return summary
