"""A YAML error in the params file names the file and the place (line, column), for a stage and
for `stages.train --help` (which lists the params in force), before any work."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

BAD = "base:\n  seed: 6\ndata:\n  dataset: [synthetic\n  split: 1\n"


def test_a_stage_names_the_params_file_and_the_line(tmp_path):
    params = tmp_path / "my params.yaml"
    params.write_text(BAD)
    r = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params), "--dataset-dir",
                        str(tmp_path / "ds"), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: params file '{params}' is not valid YAML: line 5, column 8: expected ',' "
                                "or ']', but got ':' (while parsing a flow sequence at line 4, column 12)")
    assert not (tmp_path / "out").exists()


def test_read_params_file_names_the_file(tmp_path):
    import pytest

    from pipeline.cli import read_params_file
    from pipeline.config import ConfigError
    params = tmp_path / "params.yaml"
    params.write_text("train:\n\tlr: 1\n")                      # a tab: not YAML indentation
    with pytest.raises(ConfigError, match=r"params file '.*params\.yaml' is not valid YAML: line 2, column 1: "):
        read_params_file(params)


def test_train_help_names_the_params_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(BAD)
    r = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params), "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"cannot read '{params}'" in r.stdout
