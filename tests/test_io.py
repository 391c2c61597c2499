import os
import signal
import subprocess
import sys
import textwrap

from pipeline.io import atomic_path, remove_stale_temps, write_text
from tests.conftest import ROOT


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
