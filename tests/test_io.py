"""pipeline.io: atomic files and folders (a crash while writing keeps the previous output and
leaves no temporary behind), stale temporaries, permissions, and a stage unwinding on SIGTERM."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.io import atomic_path, remove_stale_temps, write_text
from tests.helpers import ROOT, files_under, leftovers


def test_remove_stale_temps_only_touches_this_files_temporaries(tmp_path):
    target = tmp_path / "train.pt"
    write_text(target, "good")
    stale = tmp_path / ".train.pt.abc123.tmp.pt"
    stale.write_text("half")
    other = tmp_path / ".model.pt.xyz.tmp.pt"
    other.write_text("not ours")
    assert remove_stale_temps(target) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.xyz.tmp.pt", "train.pt"]
    assert target.read_text() == "good"


def test_atomic_path_temp_name_keeps_suffix_and_matches_the_cleanup_pattern(tmp_path):
    with atomic_path(tmp_path / "x.png") as tmp:
        assert tmp.name.startswith(".x.png.") and tmp.suffix == ".png"
        assert list(tmp_path.glob(".x.png.*.tmp*")) == [tmp]


def test_sigterm_unwinds_a_stage_like_ctrl_c(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from pipeline.cli import run
        def main():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                print("cleanup ran")
        run(main)
    """))
    r = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "cleanup ran" in r.stdout and "interrupted" in r.stderr
    assert r.returncode != -signal.SIGTERM and os.name == "posix"


def test_outputs_get_umask_permissions_not_mkstemp_0600(tmp_path):
    from pipeline.io import atomic_dir
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "m.json", "{}")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_atomic_path_crash_mid_write_keeps_previous_file(tmp_path):
    from pipeline.io import atomic_path, write_json
    target = tmp_path / "reports" / "metrics.json"
    write_json(target, {"mIoU": 1.0})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b'{"mIoU": 2.0, "par')           # half a file, then the writer dies
            raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert leftovers(target.parent, {"metrics.json"}) == []


def test_write_json_failing_at_fsync_keeps_previous_file(tmp_path, monkeypatch):
    import pipeline.io as io
    target = tmp_path / "metrics.json"
    io.write_json(target, {"v": 1})
    before = target.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        io.write_json(target, {"v": 2, "pad": "x" * 100_000})
    assert target.read_bytes() == before
    assert leftovers(tmp_path, {"metrics.json"}) == []

def test_atomic_dir_crash_keeps_previous_folder(tmp_path):
    from pipeline.io import atomic_dir
    target = tmp_path / "data" / "split"
    with atomic_dir(target) as tmp:
        (tmp / "split.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "split.json").write_text("new")
            (tmp / "index.json").write_text("{")
            raise KeyboardInterrupt
    assert files_under(target) == ["split.json"] and (target / "split.json").read_text() == "old"
    assert leftovers(target.parent, {"split"}) == []


def test_atomic_dir_failed_swap_restores_previous_folder(tmp_path, monkeypatch):
    """The swap is two renames (old aside, new in); if the second fails the old folder must be
    back at its name, not left hidden as ``.<name>.old``."""
    import pipeline.io as io
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "classes.json").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == target:
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        with io.atomic_dir(target) as tmp:
            (tmp / "classes.json").write_text("new")
    assert (target / "classes.json").read_text() == "old"
    assert leftovers(tmp_path, {"dataset"}) == []
