"""Streaming download: checksum, resume after a cut connection, Range ignored, wrong checksum.

Everything is served by a local http.server on 127.0.0.1; any other connection fails the test.
"""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading

import pytest

from pipeline.data.download import (ChecksumError, DownloadError, download, parse_checksum,
                                    verify_checksum)

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the chunk size


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
    real = socket.socket.connect

    def guarded(self, addr):
        host = addr[0] if isinstance(addr, tuple) else addr
        if isinstance(addr, tuple) and host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"test tried to reach {addr}")
        return real(self, addr)

    monkeypatch.setattr(socket.socket, "connect", guarded)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append({"path": self.path, "range": self.headers.get("Range")})
        data = srv.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if srv.cut_after is not None:
            n, srv.cut_after = srv.cut_after, None  # cut once
            self.wfile.write(body[:n])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.files, srv.requests, srv.cut_after, srv.ignore_range = {}, [], None, False
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _md5(b: bytes) -> str:
    return "md5:" + hashlib.md5(b).hexdigest()


def test_download_with_checksum(server, tmp_path):
    server.files["/a.zip"] = PAYLOAD
    dest = download(server.url + "/a.zip", tmp_path / "a.zip", checksum=_md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.zip.part").exists()
    assert len(server.requests) == 1 and server.requests[0]["range"] is None
    # sha256 form works too, and an existing verified file is returned without network
    sha = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
    assert download(server.url + "/a.zip", dest, checksum=sha, progress=False) == dest
    assert len(server.requests) == 1


def test_resume_after_cut_connection(server, tmp_path):
    server.files["/a.zip"] = PAYLOAD
    server.cut_after = 300_000
    dest = download(server.url + "/a.zip", tmp_path / "a.zip", checksum=_md5(PAYLOAD), progress=False,
                    backoff=0.0)
    assert dest.read_bytes() == PAYLOAD
    assert len(server.requests) == 2
    assert server.requests[0]["range"] is None
    assert server.requests[1]["range"] == "bytes=300000-"


def test_resume_existing_part_file(server, tmp_path):
    server.files["/a.zip"] = PAYLOAD
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD[:1000])
    dest = download(server.url + "/a.zip", tmp_path / "a.zip", checksum=_md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] == "bytes=1000-"


def test_complete_part_file_answered_416(server, tmp_path):
    server.files["/a.zip"] = PAYLOAD
    (tmp_path / "a.zip.part").write_bytes(PAYLOAD)
    dest = download(server.url + "/a.zip", tmp_path / "a.zip", checksum=_md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.files["/a.zip"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "a.zip.part").write_bytes(b"x" * 5000)  # stale partial data
    dest = download(server.url + "/a.zip", tmp_path / "a.zip", checksum=_md5(PAYLOAD), progress=False)
    assert server.requests[0]["range"] == "bytes=5000-"
    assert dest.read_bytes() == PAYLOAD  # not appended onto the stale bytes


def test_cut_then_range_ignored(server, tmp_path):
    server.files["/a.zip"] = PAYLOAD
    server.cut_after, server.ignore_range = 123_457, True
    dest = download(server.url + "/a.zip", tmp_path / "a.zip", checksum=_md5(PAYLOAD), progress=False,
                    backoff=0.0)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[1]["range"] == "bytes=123457-"


def test_wrong_checksum(server, tmp_path):
    server.files["/a.zip"] = PAYLOAD
    wrong = "md5:" + "0" * 32
    with pytest.raises(ChecksumError) as ei:
        download(server.url + "/a.zip", tmp_path / "a.zip", checksum=wrong, progress=False)
    msg = str(ei.value)
    assert "a.zip" in msg
    assert "0" * 32 in msg
    assert hashlib.md5(PAYLOAD).hexdigest() in msg
    assert not (tmp_path / "a.zip").exists()
    assert not (tmp_path / "a.zip.part").exists()  # documented: a complete but wrong file is deleted


def test_http_error_and_retries_exhausted(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(server.url + "/missing.zip", tmp_path / "m.zip", progress=False)
    # a closed port: bounded retries, then a clear error naming the URL
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}/a.zip"
    with pytest.raises(DownloadError) as ei:
        download(url, tmp_path / "a.zip", progress=False, retries=1, backoff=0.0, timeout=2)
    assert url in str(ei.value)
    assert not (tmp_path / "a.zip").exists()


def test_parse_and_verify_checksum(tmp_path):
    assert parse_checksum("MD5:" + "A" * 32) == ("md5", "a" * 32)
    for bad in ("abc", "crc32:1234", "md5:123", "sha256:" + "g" * 64):
        with pytest.raises(ValueError):
            parse_checksum(bad)
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello")
    assert verify_checksum(p, _md5(b"hello")) == hashlib.md5(b"hello").hexdigest()
    with pytest.raises(ChecksumError, match="f.bin"):
        verify_checksum(p, _md5(b"other"))


def test_offline_name_lookup_fails_fast(monkeypatch, tmp_path):
    def offline(host, *a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    url = "http://data.example.invalid/a.zip"
    with pytest.raises(DownloadError) as ei:
        download(url, tmp_path / "a.zip", progress=False, backoff=60.0)  # no retry, so no back-off sleep
    assert url in str(ei.value) and "lookup failed" in str(ei.value)
    assert list(tmp_path.iterdir()) == []
