"""Streaming HTTP(S) download with resume, checksum verification and an atomic final rename.

``download(url, dest, checksum=...)`` writes into ``<dest>.part`` and renames it onto ``dest``
only after the whole body arrived and the checksum (when given) matched, so ``dest`` either
does not exist or is complete and verified.

``.part`` handling:

* an existing ``<dest>.part`` is resumed with ``Range: bytes=<size>-``; a server answering
  206 appends, a server that ignores Range (200) restarts the file cleanly from byte 0,
  and 416 (range not satisfiable) means the part is already complete (size equals the
  server's length) or is stale (then it is discarded and the download restarts);
* a cut connection (short body, reset, timeout) is retried up to ``retries`` times, each
  time resuming from what is on disk;
* on a checksum mismatch the ``.part`` is **deleted** (a complete but wrong file cannot be
  resumed into a right one) and :class:`ChecksumError` names the file, the expected and
  the actual digest; no final file is created;
* any other failure leaves the ``.part`` in place so that the next call resumes it;
* a failed host-name lookup (offline machine) fails at once, without retries; HTTP 4xx
  (other than 408/429/416) fails at once; 5xx, refused/reset connections and timeouts are
  retried with exponential back-off (``backoff`` * 1, 2, 4, ... seconds, at most 30).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

ALGORITHMS = {"md5": 32, "sha1": 40, "sha256": 64}
USER_AGENT = "simformer-repro/1.0 (+urllib)"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The archive could not be fetched (network, HTTP status, short body)."""


class ChecksumError(DownloadError):
    """A file's digest differs from the expected one."""


class _Retryable(Exception):
    """Internal: a transient failure worth resuming from what is on disk."""


def parse_checksum(spec: str) -> tuple[str, str]:
    """``'md5:<hex>'`` / ``'sha1:<hex>'`` / ``'sha256:<hex>'`` -> ``(algo, lower-case hex)``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"checksum {spec!r}: expected 'md5:<hex>' or 'sha256:<hex>'")
    algo, _, hexd = spec.partition(":")
    algo, hexd = algo.strip().lower(), hexd.strip().lower()
    if algo not in ALGORITHMS:
        raise ValueError(f"checksum {spec!r}: unsupported algorithm {algo!r}; use one of "
                         + ", ".join(ALGORITHMS))
    if len(hexd) != ALGORITHMS[algo] or not re.fullmatch(r"[0-9a-f]+", hexd):
        raise ValueError(f"checksum {spec!r}: expected {ALGORITHMS[algo]} hexadecimal digits for {algo}")
    return algo, hexd


def file_digest(path: str | os.PathLike, algo: str = "sha256", *, progress: bool = False) -> str:
    """Hex digest of a file, read in chunks (with an optional tqdm bar)."""
    path = Path(path)
    h = hashlib.new(algo)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"{algo} {path.name}", disable=not progress, leave=False) as bar:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike, spec: str, *, progress: bool = False) -> str:
    """Check ``path`` against ``spec``; return the actual hex digest or raise :class:`ChecksumError`."""
    algo, expected = parse_checksum(spec)
    actual = file_digest(path, algo, progress=progress)
    if actual != expected:
        raise ChecksumError(f"checksum mismatch for {Path(path)}: expected {algo}:{expected}, "
                            f"got {algo}:{actual}")
    return actual


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``'bytes 10-99/100'`` -> (10, 99, 100); ``'bytes */100'`` -> (None, None, 100)."""
    if not value:
        return None, None, None
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value)
    if not m:
        return None, None, None
    start = int(m.group(1)) if m.group(1) else None
    end = int(m.group(2)) if m.group(2) else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, end, total


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool, desc: str) -> None:
    """One request: resume or restart ``part``; return when the body is complete.

    Raises :class:`_Retryable` for transient failures and :class:`DownloadError` for final ones.
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            _, _, total = _content_range(e.headers.get("Content-Range"))
            e.close()
            if total is not None and total == offset:
                return  # the part already holds the whole file
            part.unlink()  # stale / larger than the remote file: start over
            raise _Retryable(f"HTTP 416 for a {offset}-byte partial file; restarting from scratch")
        e.close()
        if e.code >= 500 or e.code in (408, 429):
            raise _Retryable(f"HTTP {e.code} {e.reason}")
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, socket.gaierror):  # name resolution failed: offline, retrying won't help
            raise DownloadError(f"cannot reach {url}: host name lookup failed ({reason}); no network?") from e
        raise _Retryable(f"cannot reach {url}: {reason}") from e

    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and status == 206:
            start, _, total = _content_range(resp.headers.get("Content-Range"))
            if start is not None and start != offset:
                raise _Retryable(f"server resumed at byte {start}, expected {offset}")
            mode = "ab"
        else:
            # 200 (Range ignored or no partial file): restart cleanly from byte 0.
            offset, mode = 0, "wb"
        expected_total = offset + length if length is not None else None
        received = 0
        with open(part, mode) as f, tqdm(total=expected_total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=desc, disable=not progress) as bar:
            try:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (socket.timeout, ConnectionError, http.client.HTTPException, OSError) as e:
                        raise _Retryable(f"connection lost after {offset + received} bytes: {e!r}") from e
                    if not chunk:
                        break
                    f.write(chunk)  # a disk error here is final, not retried
                    received += len(chunk)
                    bar.update(len(chunk))
            finally:
                f.flush()
                os.fsync(f.fileno())
        if length is not None and received < length:
            # http.client returns b"" on a closed socket instead of raising: check it ourselves.
            raise _Retryable(f"connection closed after {offset + received} of {expected_total} bytes")


def download(url: str, dest: str | os.PathLike, *, checksum: str = "", timeout: float = 60.0,
             retries: int = 5, backoff: float = 1.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``<dest>.part``), verify ``checksum``, rename atomically.

    ``checksum``: ``'md5:<hex>'`` / ``'sha256:<hex>'`` or empty (no verification here).
    ``timeout``: seconds for connecting and for each socket read. ``retries``: how many times
    a cut or failed connection is retried (resuming) before :class:`DownloadError`.
    If ``dest`` already exists it is verified (when a checksum is given) and returned.
    """
    dest = Path(dest)
    if checksum:
        parse_checksum(checksum)  # fail on a malformed spec before any network traffic
    if dest.exists():
        if checksum:
            verify_checksum(dest, checksum, progress=progress)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_once(url, part, timeout=timeout, progress=progress, desc=dest.name)
            break
        except _Retryable as e:
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"download of {url} failed after {retries} retries: {e}. "
                                    f"{have} bytes are kept in {part}; run again to resume.") from e
            time.sleep(backoff * min(2 ** (attempt - 1), 30))
    if checksum:
        algo, expected = parse_checksum(checksum)
        actual = file_digest(part, algo, progress=progress)
        if actual != expected:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"checksum mismatch for {dest.name} downloaded from {url}: expected "
                                f"{algo}:{expected}, got {algo}:{actual}. The downloaded data ({part}) "
                                f"was deleted and no {dest} was written.")
    os.replace(part, dest)
    return dest
