"""Safe zip extraction: hostile members rejected, CRC / truncation errors, nothing left behind."""
from __future__ import annotations

import stat
import zipfile

import pytest

from pipeline.data.extract import ExtractError, check_members, safe_extract_zip, verify_zip


def _zip(path, members):
    """members: list of (name or ZipInfo, bytes)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_extracts_tree(tmp_path):
    arc = _zip(tmp_path / "ok.zip", [("top/a.txt", b"a" * 1000), ("top/sub/b.bin", bytes(range(256))),
                                     ("top/empty/", b"")])
    out = safe_extract_zip(arc, tmp_path / "out", progress=False)
    assert (out / "top/a.txt").read_bytes() == b"a" * 1000
    assert (out / "top/sub/b.bin").read_bytes() == bytes(range(256))
    assert (out / "top/empty").is_dir()
    assert _leftovers(tmp_path) == ["ok.zip", "out"]
    verify_zip(arc)


def _symlink_info(name):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("member,why", [
    ("../evil.txt", "'..'"),
    ("top/../../evil.txt", "'..'"),
    ("/etc/evil.txt", "absolute"),
    ("C:/evil.txt", "absolute"),
    ("..\\evil.txt", "'..'"),
    (None, "symbolic link"),
])
def test_hostile_members_rejected(tmp_path, member, why):
    name = member if member is not None else _symlink_info("top/link")
    data = b"/etc/passwd" if member is None else b"pwned"
    arc = _zip(tmp_path / "bad.zip", [("top/fine.txt", b"fine"), (name, data)])
    with pytest.raises(ExtractError) as ei:
        safe_extract_zip(arc, tmp_path / "out", progress=False)
    msg = str(ei.value)
    assert "bad.zip" in msg and why in msg
    assert _leftovers(tmp_path) == ["bad.zip"]  # no target, no temporary folder, nothing outside
    assert not (tmp_path.parent / "evil.txt").exists()


def test_truncated_zip(tmp_path):
    good = _zip(tmp_path / "good.zip", [(f"top/f{i}.bin", bytes([i]) * 5000) for i in range(5)])
    data = good.read_bytes()
    trunc = tmp_path / "trunc.zip"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExtractError) as ei:
        safe_extract_zip(trunc, tmp_path / "out", progress=False)
    assert "trunc.zip" in str(ei.value)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == ["good.zip", "trunc.zip"]


def test_corrupt_member_crc(tmp_path):
    payload = b"0123456789" * 1000
    arc = tmp_path / "crc.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("top/first.txt", b"first")
        zf.writestr("top/data.txt", payload)
    raw = bytearray(arc.read_bytes())
    i = raw.index(payload)
    raw[i + 500] ^= 0xFF  # flip one stored byte: only the CRC can tell
    arc.write_bytes(bytes(raw))
    with pytest.raises(ExtractError) as ei:
        safe_extract_zip(arc, tmp_path / "out", progress=False)
    assert "crc.zip" in str(ei.value) and "corrupt" in str(ei.value)
    assert _leftovers(tmp_path) == ["crc.zip"]  # the good first member was not left behind
    with pytest.raises(ExtractError, match="crc.zip"):
        verify_zip(arc)


def test_not_a_zip_and_missing(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"<html>not found</html>")
    with pytest.raises(ExtractError, match="junk.zip"):
        check_members(junk)
    with pytest.raises(ExtractError, match="nope.zip"):
        safe_extract_zip(tmp_path / "nope.zip", tmp_path / "out", progress=False)


def test_existing_target_replaced_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    bad = _zip(tmp_path / "bad.zip", [("../x", b"x")])
    with pytest.raises(ExtractError):
        safe_extract_zip(bad, out, progress=False)
    assert (out / "old.txt").read_text() == "old"
    good = _zip(tmp_path / "good.zip", [("new.txt", b"new")])
    safe_extract_zip(good, out, progress=False)
    assert _leftovers(out) == ["new.txt"]
