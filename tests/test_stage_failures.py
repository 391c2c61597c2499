"""How a stage fails, run in-process through ``pipeline.cli.run`` (the wrapper ``python -m
stages.<name>`` uses, so exit codes and messages are the real ones without a Python start-up per
test): bad params exit 2 before any output, and unreadable or broken data exits 1 naming the
file, leaving the previous outputs in place."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import (ROOT, copy_data, files_under, make_ade_zip, merge, run_stage, runs_in_store, small_params,
                           step_batch, train_argv, write_params)

# ============================================================================ bad params


def _dvc_stage_argv() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        # matrix stages: any value for ${item.*} / ${key} (the params error must come first anyway)
        cmd = re.sub(r"\$\{item\.seed\}", "1", st["cmd"])
        argv = shlex.split(re.sub(r"\$\{[^}]+\}", "x", cmd))
        assert argv[:3] == ["python", "-m", f"stages.{name}"], argv
        out[name] = argv[3:]
    return out


STAGE_ARGV = _dvc_stage_argv()


@pytest.mark.parametrize("stage", sorted(STAGE_ARGV))
@pytest.mark.parametrize("bad", [{"train": {"iterations": "many"}}, {"loss": {"focal_alpha": -0.5}},
                                 {"model": {"num_querys": 8}}], ids=["type", "range", "typo"])
def test_stage_exits_2_before_any_output(stage, bad, tmp_path, monkeypatch, capsys):
    write_params(tmp_path / "params.yaml", merge(small_params(), bad))
    monkeypatch.chdir(tmp_path)                       # dvc.yaml's relative paths land in tmp_path
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    code = run_stage(stage, *STAGE_ARGV[stage], "--no-progress")
    err = capsys.readouterr().err
    assert code == 2
    (group, values), = bad.items()
    assert err.startswith("error: ") and f"{group}.{next(iter(values))}" in err and err.count("\n") == 1, err
    assert files_under(tmp_path) == ["params.yaml"]            # no output, no mlflow.db, no folders


def test_params_file_with_python_tag_is_refused(tmp_path, capsys, monkeypatch):
    """safe_load: a YAML tag that would construct Python objects is a params error, not code."""
    p = tmp_path / "params.yaml"
    p.write_text("base:\n  seed: !!python/object/apply:os.system ['touch pwned']\n")
    monkeypatch.chdir(tmp_path)
    code = run_stage("download", *STAGE_ARGV["download"])
    assert code == 2 and "not valid YAML" in capsys.readouterr().err
    assert files_under(tmp_path) == ["params.yaml"]


# ============================================================================ bad data


def test_unreadable_training_image_fails_naming_file_and_marks_run_failed(tmp_path, tiny_data, store, capsys):
    """A training image that became unreadable after prepare: the stage fails at the step that
    reads it, names the file, writes no model or curve, and the MLflow run is FAILED."""
    raw = small_params()
    data = copy_data(tiny_data, tmp_path / "data_copy")
    index = json.loads((data / "split/index.json").read_text())
    first = set(step_batch(data, 0, raw)) | set(step_batch(data, 1, raw))
    victim = next(i for i in step_batch(data, 2, raw) if i not in first)   # read first at step 3
    bad_img = data / "dataset" / index["train"][victim]["image"]
    bad_img.write_bytes(bad_img.read_bytes()[:40])                         # truncated JPEG header
    out = tmp_path / "out"
    code = run_stage("train", *train_argv(out, data, write_params(tmp_path / "params.yaml", raw)))
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot read image '{bad_img}'" in err, err
    assert not (out / "data/train/model.pt").exists() and not (out / "reports").exists()
    assert torch.load(out / "data/checkpoints/train.pt", weights_only=True)["step"] == 2
    (run,) = runs_in_store(store)
    assert run["status"] == "FAILED" and run["tags"]["stage"] == "train"


def test_unreadable_test_image_fails_evaluate_naming_file(tmp_path, tiny_data, capsys):
    from pipeline.config import build_params
    from pipeline.engine.train import export_model
    from pipeline.model import build_model
    p = build_params(small_params())
    data = copy_data(tiny_data, tmp_path / "d")
    split = json.loads((data / "split/split.json").read_text())
    index = json.loads((data / "split/index.json").read_text())
    export_model(build_model(p.model, split["num_classes"], None), p, split, tmp_path / "model.pt")
    bad = data / "dataset" / index["test"][1]["image"]
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = run_stage("evaluate", "--params", write_params(tmp_path / "params.yaml", small_params()),
                     "--model", tmp_path / "model.pt", "--dataset-dir", data / "dataset",
                     "--split-dir", data / "split", "--metrics", out / "metrics.json",
                     "--per-class", out / "per_class.csv", "--confusion", out / "confusion.npy", "--no-mlflow",
                     "--no-progress")
    assert code == 1 and f"cannot read image '{bad}'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("fault", ["wrong_checksum", "truncated"])
def test_download_stage_bad_archive_keeps_previous_dataset(fault, tmp_path, monkeypatch, capsys):
    """The download stage on a bad ADE20K archive: exit 1 naming the archive; the dataset
    folder of an earlier run is untouched and no extraction folder is left in raw/."""
    raw_dir = tmp_path / "data/raw"
    raw_dir.mkdir(parents=True)
    arc = make_ade_zip(raw_dir / "ADEChallengeData2016.zip")
    raw = small_params(data={"dataset": "ade20k"})
    if fault == "truncated":
        arc.write_bytes(arc.read_bytes()[:-150])
        raw["data"]["checksum"] = "md5:" + hashlib.md5(arc.read_bytes()).hexdigest()   # verified, but broken
    write_params(tmp_path / "params.yaml", raw)
    previous = tmp_path / "data/dataset"
    previous.mkdir()
    (previous / "classes.json").write_text("from an earlier run")
    monkeypatch.chdir(tmp_path)
    code = run_stage("download", *STAGE_ARGV["download"], "--no-progress")
    err = capsys.readouterr().err
    assert code == 1 and str(Path("data/raw/ADEChallengeData2016.zip")) in err, err
    assert ("checksum mismatch" if fault == "wrong_checksum" else "truncated or corrupt") in err
    assert files_under(previous) == ["classes.json"] and (previous / "classes.json").read_text() == "from an earlier run"
    assert sorted(p.name for p in raw_dir.iterdir()) == ["ADEChallengeData2016.zip"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dataset", "raw"]
