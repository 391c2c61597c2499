"""The manual against the repository: README.md, docs/*.md and reports/README.md.

Every shell command the README shows runs (its module, make target or dvc subcommand exists,
takes the options shown, and the params it sets are valid), every path it names exists,
every link resolves, every default it quotes is params.yaml's, every figure of its headline
table is the committed reports' figure, and each released SimFormer config it maps builds
params that switch on what the config's name says.
"""
from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
REPORTS_README = ROOT / "reports" / "README.md"
MANUAL = [README, *DOCS, REPORTS_README]
BIN = Path(sys.executable).parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
GROUPS = tuple(PARAMS)                                  # base, data, model, loss, train, ...

# Paths the manual may name that a clean checkout does not hold, and why.
GENERATED = {".venv": "the venv `make` creates (Makefile VENV)",
             "mlflow.db": "the MLflow store the first training creates",
             "mlartifacts": "the MLflow artifacts the first training creates",
             "data": "DVC outputs (checked against dvc.yaml)"}
EXAMPLE_INPUTS = {"my_photos", "extra.jpg", "predictions"}     # the user's images and output folder in examples
# Homes of concepts that README Layout and docs/ARCHITECTURE.md ("One home per concept") name.
HOMES = {"pipeline/grid.py": "def run_cell", "pipeline/cli.py": "def load_params", "pipeline/tracking.py": "def open_tracker",
         "pipeline/losses/build.py": "def build_criterion", "pipeline/data/dataset.py": "def test_size"}
# The one params key the manual misspells on purpose: the example of the typo message.
TYPO_EXAMPLE = "loss.pp_wieght"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def _prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _links(text: str) -> list[str]:
    """Markdown link and image targets, outside code."""
    return re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]+`", "", _prose(text)))


def _spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return re.findall(r"`([^`\n]+)`", _prose(text))


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no section '{title}'"
    return m.group(1)


def _shell_lines(text: str) -> list[str]:
    """The command lines of the bash blocks (comments and blank lines dropped)."""
    out = []
    for lang, body in _fenced(text):
        if lang == "bash":
            for line in body.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line)
    return out


def _split(line: str) -> tuple[list[str], list[str]]:
    """A command line as argv, with each `$(...)` replaced by a placeholder; and the inner commands."""
    inner = re.findall(r"\$\(([^)]*)\)", line)
    for i, cmd in enumerate(inner):
        line = line.replace(f"$({cmd})", f"__SUBST{i}__", 1)
    return shlex.split(line, comments=True), inner


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "DVC_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return env


@functools.lru_cache(maxsize=None)
def _help(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@functools.lru_cache(maxsize=None)
def _preset_flags(cmd: str) -> tuple[str, ...]:
    """Run a `python -m tools.preset FILE` substitution the way the shell would."""
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "tools.preset"], f"unexpected command substitution $({cmd})"
    r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"$({cmd}) failed: {r.stderr}"
    return tuple(r.stdout.split())


def _set(mapping: dict, key: str, value) -> None:
    *groups, last = key.split(".")
    for g in groups:
        assert isinstance(mapping.get(g), dict), f"-S {key}: '{g}' is not a params group"
        mapping = mapping[g]
    assert last in mapping, f"-S {key}: no such params key in params.yaml"
    mapping[last] = value


def _params_after(flags: list[str]) -> dict:
    """params.yaml with the `-S key=value` flags applied in order (the last one for a key wins, as in DVC)."""
    import copy
    p = copy.deepcopy(PARAMS)
    it = iter(flags)
    for flag in it:
        if flag in ("-S", "--set-param"):
            key, _, value = next(it).partition("=")
            _set(p, key, yaml.safe_load(value))
    return p


def _validate(p: dict):
    """What tools.preset checks before a run: the params and every grid cell's params."""
    from pipeline.ablation import check_variants
    from pipeline.config import build_ablation, build_params
    params = build_params(p)
    check_variants(p, build_ablation(p.get("ablation")))
    return params


def _check_command(line: str, where: str) -> None:
    argv, inner = _split(line)
    assert argv, f"{where}: empty command {line!r}"
    if argv[0] == "make":
        if shutil.which("make") is None:
            pytest.skip("make is not installed")
        target = argv[1]
        r = subprocess.run(["make", "-n", target], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{where}: `make {target}`: {r.stderr}"
        assert re.search(rf"^{re.escape(target)}:", _text(ROOT / "Makefile"), re.M), f"no Makefile rule '{target}'"
    elif argv[0] == "source":
        assert argv[1:] == [".venv/bin/activate"], f"{where}: {line!r}"
        assert re.search(r"^VENV \?= \.venv$", _text(ROOT / "Makefile"), re.M), "make no longer creates .venv"
    elif argv[:2] == ["python", "-m"]:
        module = argv[2]
        r = _help(sys.executable, "-m", module, "--help")
        assert r.returncode == 0, f"{where}: `python -m {module} --help` failed: {r.stderr[-2000:]}"
        for opt in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
            assert opt in r.stdout, f"{where}: `python -m {module}` has no option {opt} ({line!r})"
        if module == "tools.preset":
            _preset_flags(shlex.join(argv))
    elif argv[0] == "dvc":
        from dvc.cli import parse_args
        words = []
        for a in argv[1:]:
            if a.startswith("-") or "__SUBST" in a:
                break
            words.append(a)
        sub = words[:2] if words[:1] in (["exp"], ["metrics"], ["queue"], ["plots"], ["params"]) else words[:1]
        r = _help(str(BIN / "dvc"), *sub, "--help")
        assert r.returncode == 0, f"{where}: `dvc {' '.join(sub)} --help` failed: {r.stderr}"
        args = []
        for a in argv[1:]:
            m = re.fullmatch(r"__SUBST(\d+)__", a)
            args += list(_preset_flags(inner[int(m.group(1))])) if m else [a]
        try:
            parse_args(args)
        except SystemExit as e:                           # argparse rejected the options
            pytest.fail(f"{where}: dvc does not accept {line!r} (exit {e.code})")
        if sub == ["exp", "run"]:
            try:
                _validate(_params_after(args))
            except Exception as e:                        # ConfigError, or an unknown key from _set
                pytest.fail(f"{where}: {line!r} sets invalid params: {e}")
    else:
        pytest.fail(f"{where}: {line!r}: this test does not know how to check a '{argv[0]}' command")


# ============================================================================ the README's shape


def test_readme_is_short_and_leads_with_the_result():
    text = _text(README)
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual's details belong in docs/"
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections[:2] == ["Quick start", "Result"], sections
    for title in ("Vary a run", "Compare runs in MLflow", "Coming from SimFormer / MaskFormer", "Predict", "Layout",
                  "Tests"):
        assert title in sections, title
    # one time figure for the whole pipeline per CPU type measured, in the Quick start
    quick = _section(text, "Quick start")
    figures = re.findall(r"\*\*(\d+ min \d+ s)\*\* on an? (Intel Xeon|AMD EPYC)", " ".join(quick.split()))
    assert len(re.findall(r"\d+ min \d+ s", quick)) == 2 and {cpu for _, cpu in figures} == {"Intel Xeon", "AMD EPYC"}, quick
    # every section after the Quick start points to the page with its details
    for title in sections[1:]:
        assert re.search(r"\]\((docs/|reports/README\.md)", _section(text, title)), f"README section '{title}' links nowhere"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(_text(README))}
    orphans = [_rel(d) for d in DOCS if d.resolve() not in linked]
    assert not orphans, f"docs pages no README section links to: {orphans}"
    assert REPORTS_README.resolve() in linked


def test_pointers_into_the_manual_resolve():
    """Code, params.yaml and the reports point readers at the manual: `README, *Section*` names a README
    section, and every `docs/<PAGE>.md` they name exists."""
    sources = [ROOT / "params.yaml", ROOT / "dvc.yaml", *ROOT.glob("reports/**/*.md")]
    for folder in ("pipeline", "stages", "tools"):
        sources += sorted((ROOT / folder).rglob("*.py"))
    sections = set(re.findall(r"^## (.+)$", _text(README), re.M))
    seen = 0
    for src in sources:
        text = _text(src)
        for title in re.findall(r"README, \*([^*]+)\*", text):
            seen += 1
            assert title in sections, f"{_rel(src)} points to README section '{title}', which does not exist"
        for page in re.findall(r"\bdocs/[A-Z_]+\.md", text):
            seen += 1
            assert (ROOT / page).is_file(), f"{_rel(src)} points to {page}, which does not exist"
    assert seen >= 4


def test_section_references_in_the_manual_resolve():
    """`docs/PAGE.md`, *Section* (or [page](link), *Section*) names a heading of that page."""
    seen = 0
    for page in MANUAL:
        text = _text(page)
        refs = re.findall(r"`((?:docs/[A-Z_]+|reports/README|README)\.md)`\)?, \*([^*]+)\*", text)
        refs += re.findall(r"\]\(((?:docs/[A-Z_]+|reports/README|README)\.md)\), \*([^*]+)\*", text)
        for target, title in refs:
            seen += 1
            base = README.parent if page == README else ROOT
            headings = re.findall(r"^#+ (.+)$", _text(base / target), re.M)
            title = " ".join(title.split())
            assert any(h.startswith(title) for h in headings), f"{_rel(page)}: {target} has no section '{title}'"
    assert seen >= 8


def test_links_in_the_manual_resolve():
    seen = 0
    for page in MANUAL:
        for target in _links(_text(page)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            seen += 1
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{_rel(page)} links to {target}, which does not exist"
    assert seen >= len(DOCS)


# ============================================================================ commands


def _readme_commands() -> list[str]:
    return _shell_lines(_text(README))


def test_readme_shows_the_two_commands_and_dvc_repro():
    commands = _readme_commands()
    for cmd in ("make repro", "make test", "dvc repro"):
        assert any(c.startswith(cmd) for c in commands), cmd


@pytest.mark.parametrize("line", _readme_commands(), ids=lambda line: line.split("#")[0].strip()[:40])
def test_readme_commands_are_runnable(line):
    _check_command(line, "README.md")


def _docs_commands() -> list[tuple[str, str]]:
    """The docs' `python -m`, `dvc` and `make` command lines (other tools, placeholders left out)."""
    out = []
    for page in DOCS:
        for line in _shell_lines(_text(page)):
            if re.match(r"(python -m|dvc|make) ", line) and "..." not in line.split("#")[0]:
                out.append((_rel(page), line))
    return out


@pytest.mark.parametrize("where, line", _docs_commands(),
                         ids=[f"{w}:{line.split('#')[0].strip()[:40]}" for w, line in _docs_commands()])
def test_docs_commands_are_runnable(where, line):
    _check_command(line, where)


def test_modules_the_manual_names_exist():
    names = set()
    for page in MANUAL:
        names |= set(re.findall(r"python -m ((?:stages|tools)\.\w+)", _text(page)))
    assert {"tools.predict", "tools.compare", "tools.preset", "tools.benchmark", "stages.train"} <= names
    for name in names:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), f"the manual names `python -m {name}`"


def test_mlflow_ui_binds_localhost_only():
    """Moved from tests/test_reliability.py: every `mlflow ui|server` command the manual shows and the
    Makefile's ui target bind to 127.0.0.1; nothing in them binds every interface."""
    texts = {_rel(p): _text(p) for p in MANUAL}
    ui_lines = [ln for t in texts.values() for ln in t.splitlines() if re.search(r"\bmlflow (ui|server) --", ln)]
    assert ui_lines and all("--host 127.0.0.1" in ln for ln in ui_lines), ui_lines
    makefile = _text(ROOT / "Makefile")
    m = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert m, "Makefile has no ui target"
    assert re.search(r"mlflow ui .*--host 127\.0\.0\.1\b", m.group(1)), m.group(1)
    for name, text in {**texts, "Makefile": makefile}.items():
        assert "0.0.0.0" not in text and "--host ::" not in text, name


# ============================================================================ paths


def _path_tokens(text: str) -> set[str]:
    """Words of code spans and bash blocks that name a file or folder (placeholders, URIs and
    absolute paths left out)."""
    words = []
    for span in _spans(text):
        words += span.split()
    for line in _shell_lines(text):
        words += _split(line)[0]
    for lang, body in _fenced(text):
        if lang == "text":                              # layout trees: the first word of each line
            words += [ln.split()[0] for ln in body.splitlines() if ln.strip() and not ln.startswith(" ")]
    out = set()
    for w in words:
        w = w.strip("'\",;()")
        if (not w or w.startswith(("-", "/", "$", "http")) or any(c in w for c in "<>*:=$[]{}")
                or w.endswith(".") or ".." in w):
            continue
        if "/" in w or re.fullmatch(r"[\w.-]+\.(yaml|yml|lock|ini|txt|db|md|toml|cfg)", w):
            out.add(w.rstrip("/"))
    return out


def _dvc_paths() -> set[str]:
    stages = yaml.safe_load(_text(ROOT / "dvc.yaml"))["stages"]
    paths = set()
    for s in stages.values():
        for o in s.get("outs", []) + s.get("metrics", []) + s.get("plots", []):
            paths.add(next(iter(o)) if isinstance(o, dict) else o)
        paths |= {w for w in s["cmd"].split() if w.startswith("data/")}
    return paths


def _check_path(path: str, where: str, dvc_paths: set[str]) -> None:
    head = path.split("/")[0]
    if (ROOT / path).exists() or head in EXAMPLE_INPUTS:
        return
    assert head in GENERATED, f"{where} names `{path}`, which is not in the repository"
    if head == "data":
        assert any(path == p or path.startswith(p + "/") for p in dvc_paths), \
            f"{where} names `{path}`, which no stage of dvc.yaml writes"
    elif head == ".venv":
        assert re.search(r"^VENV \?= \.venv$", _text(ROOT / "Makefile"), re.M)
    else:
        assert f"/{head}" in _text(ROOT / ".gitignore"), f"{head} is generated but not git-ignored"


def test_every_path_the_readme_names_exists():
    dvc_paths = _dvc_paths()
    paths = _path_tokens(_text(README))
    assert {"reports/metrics.json", "reports/baselines.json", "reports/evidence/ablation.md", "presets",
            "presets/paper-ade20k.yaml", "pipeline", "tests/conftest.py", "data/train/model.pt"} <= paths, sorted(paths)
    for path in sorted(paths):
        _check_path(path, "README.md", dvc_paths)


def test_every_repository_path_the_docs_name_exists():
    dvc_paths = _dvc_paths()
    roots = ("pipeline/", "stages/", "tools/", "tests/", "presets/", "reports/", "docs/", "data/")
    checked = 0
    for page in DOCS:
        for path in sorted(_path_tokens(_text(page))):
            if path.startswith(roots):
                _check_path(path, _rel(page), dvc_paths)
                checked += 1
    assert checked >= 50


def test_the_reports_readme_lists_files_that_exist():
    rows = [ln for ln in _text(REPORTS_README).splitlines() if ln.startswith("| `")]
    assert len(rows) >= 10
    for row in rows:
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            assert (ROOT / "reports" / name).exists(), f"reports/README.md lists `{name}`"


def test_the_homes_the_docs_name_hold_their_code():
    """README Layout and docs/ARCHITECTURE.md name where each concept lives; each file exists and
    holds the function they name it for."""
    for doc in (README, ROOT / "docs" / "ARCHITECTURE.md"):
        text = _text(doc)
        for path in HOMES:
            assert f"`{path}`" in text or path in text, f"{_rel(doc)} does not name {path}"
    assert "One home per concept" in _text(ROOT / "docs" / "ARCHITECTURE.md")
    for path, definition in HOMES.items():
        assert definition in _text(ROOT / path), f"{path} has no `{definition}`"


def test_method_table_names_functions_that_exist():
    """docs/METHOD.md maps each equation to `file: function`; each function or class is defined there."""
    rows = re.findall(r"^\|[^|\n]+\|([^|\n]*`[\w/]+\.py: \w+`[^|\n]*)\|$", _text(ROOT / "docs" / "METHOD.md"), re.M)
    assert len(rows) >= 10
    for cell in rows:
        spans = re.findall(r"`([^`]+)`", cell)
        path, first = spans[0].split(": ")
        tree = ast.parse(_text(ROOT / path))
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for name in [first, *spans[1:]]:
            assert name in defined, f"docs/METHOD.md: {path} defines no {name}"


# ============================================================================ params


def _flat() -> dict:
    from pipeline.config import flatten
    return flatten(PARAMS)


def test_params_keys_the_manual_names_exist():
    flat = _flat()
    keys = set()
    for page in MANUAL:
        for span in _spans(_text(page)):
            keys |= set(re.findall(rf"(?<![\w./-])((?:{'|'.join(GROUPS)})\.[a-z_]+(?:\.[a-z_]+)*)(?![\w*/])", span))
        for line in _shell_lines(_text(page)):
            keys |= set(re.findall(r"-S '?([\w.]+)=", line))
    keys = {k for k in keys if not re.search(r"\.(py|json|yaml|md|csv|png|pt|html)$", k)}
    assert TYPO_EXAMPLE in keys and TYPO_EXAMPLE not in flat
    keys.discard(TYPO_EXAMPLE)
    assert len(keys) >= 60
    unknown = sorted(k for k in keys if k not in flat and not any(f.startswith(k + ".") for f in flat))
    assert not unknown, f"params keys the manual names that params.yaml does not have: {unknown}"


def test_readme_quotes_params_yaml_values():
    """Moved from tests/test_config.py. Every value the docs give as a default is params.yaml's: the rows
    of their `| key | default |` tables (docs/PAPER_DEFAULTS.md, docs/MULTI_GPU.md) and the copy of the
    ablation grid in docs/ABLATION.md."""
    flat = _flat()
    rows = []
    for page in DOCS:
        table = False
        for line in _text(page).splitlines():
            if line.startswith("| key | default |"):
                table = True
            elif not line.startswith("|"):
                table = False
            elif table and not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
    assert len(rows) >= 30
    for key, default, *_ in rows:
        key = key.strip("`")
        assert key in flat, key
        assert yaml.safe_load(default) == flat[key], f"docs say {key} = {default}, params.yaml {flat[key]!r}"
    (grid,) = re.findall(r"```yaml\n(ablation:.*?)```", _text(ROOT / "docs" / "ABLATION.md"), flags=re.S)
    assert yaml.safe_load(grid)["ablation"] == PARAMS["ablation"]


def test_readme_quick_start_activates_the_venv_before_dvc():
    """Moved from tests/test_newcomer.py."""
    quick = _section(_text(README), "Quick start")
    assert "dvc exp run" in quick
    assert quick.index("source .venv/bin/activate") < quick.index("dvc exp run")


def test_readme_predict_section_and_picture():
    """Moved from tests/test_newcomer.py; the full manual is docs/PREDICT.md."""
    section = _section(_text(README), "Predict")
    assert "python -m tools.predict" in section and "models:/" in section and "runs:/" in section
    assert "docs/PREDICT.md" in section
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", section)
    assert pictures, "the Predict section shows no picture"
    for pic in pictures:
        path = ROOT / pic
        assert path.is_file() and path.suffix == ".png" and path.stat().st_size < 200_000
    full = _text(ROOT / "docs" / "PREDICT.md")
    for needle in ("--min-score", "--batch-size", "summary.csv", "runs:/", "models:/"):
        assert needle in full, needle


def test_docs_pictures_are_small_pngs():
    """The docs' screenshots (docs/MLFLOW_UI.md shows the MLflow UI) exist, are PNG files and stay small."""
    shown = {}
    for page in DOCS:
        for pic in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", _prose(_text(page))):
            shown[(page.parent / pic).resolve()] = _rel(page)
    assert {"mlflow_runs.png", "mlflow_model.png", "mlflow_run.png"} <= {p.name for p in shown}, sorted(shown)
    for path, where in shown.items():
        assert path.is_file(), f"{where} shows {path}, which does not exist"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{where} shows {path.name}, which is not a PNG"
        assert path.stat().st_size < 400_000, f"{where} shows {path.name}: {path.stat().st_size} bytes"


# ============================================================================ figures


def _fmt(x: float) -> str:
    return f"{x:.1f}".replace("-", "−")


def _row(text: str, label: str) -> list[str]:
    line = next((ln for ln in text.splitlines() if ln.startswith(f"| {label} |")), None)
    assert line, f"no table row '{label}'"
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def _paired(report: str, difference: str, metric: str) -> dict:
    n, mean, ci, p, verdict = _row(report, f"{difference} | {metric}")[1:]
    lo, hi = (float(v) for v in ci.strip("[]").split(","))
    return {"mean": float(mean), "lo": lo, "hi": hi, "p": float(p), "verdict": verdict}


def test_readme_result_table_is_the_committed_reports():
    result = _section(_text(README), "Result")
    prose = " ".join(result.split())
    keys = ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc")
    metrics = json.loads(_text(ROOT / "reports" / "metrics.json"))
    assert _row(result, "main model (seed 6, AMD EPYC)")[:5] == [_fmt(metrics[k]) for k in keys]
    base = json.loads(_text(ROOT / "reports" / "baselines.json"))
    assert _row(result, "trivial: nearest mean colour")[:5] == [_fmt(base["nearest_colour"][k]) for k in keys]
    assert _row(result, "trivial: majority class")[:5] == [_fmt(base["majority"][k]) for k in keys]
    grid = json.loads(_text(ROOT / "reports" / "evidence" / "ablation.json"))["full"]
    seeds = _row(result, "same config, 5 seeds (mean ± std)")
    assert seeds[:4] == [f"{_fmt(grid[k]['mean'])} ± {_fmt(grid[k]['std'])}" for k in keys[:4]]
    assert {grid[k]["n"] for k in keys[:4]} == {5}
    evidence_md = _text(ROOT / "reports" / "evidence" / "ablation.md")
    assert seeds[4] == _row(evidence_md, "grid: full (mean of 5 seeds)")[4]       # pixel accuracy
    # the 95% Student-t interval of the 5-seed mIoU
    from scipy import stats
    m = grid["mIoU"]
    half = stats.t.ppf(0.975, m["n"] - 1) * m["std"] / math.sqrt(m["n"])
    interval = f"[{_fmt(m['mean'] - half)}, {_fmt(m['mean'] + half)}]"
    assert f"mIoU is {interval}" in prose, interval
    assert interval in _text(ROOT / "reports" / "evidence" / "README.md")


def _report_headline(report: Path) -> tuple[tuple[str, str], tuple[str, str]]:
    """(novel mIoU mean, interval), (mIoU mean, interval) of a report's headline line."""
    answer = _section(_text(report), "Answer")
    head = next(ln for ln in answer.splitlines() if ln.startswith("- **Headline: full SimFormer over 3 seeds**"))
    novel = re.search(r"novel mIoU \*\*([\d.]+)\*\* (\[[\d.]+, [\d.]+\])", head).groups()
    miou = re.search(r", mIoU \*\*([\d.]+)\*\* (\[[\d.]+, [\d.]+\])", head).groups()
    return novel, miou


def test_readme_headline_is_the_default_reports_first_line():
    """The README's headline interval is the one the default run's report opens with."""
    result = " ".join(_section(_text(README), "Result").split())
    novel, miou = _report_headline(ROOT / "reports" / "report.md")
    assert f"novel mIoU **{novel[0]} {novel[1]}**, mIoU **{miou[0]} {miou[1]}**" in result, (novel, miou)


def test_readme_one_thread_headline_is_that_runs_report():
    """The README's one-thread figures are reports/threads1's headline and main model, and that
    run differs from the committed params by the thread count only."""
    result = " ".join(_section(_text(README), "Result").split())
    folder = ROOT / "reports" / "threads1"
    novel, miou = _report_headline(folder / "report.md")
    main = json.loads((folder / "metrics.json").read_text())
    assert (f"(`reports/threads1/`): novel mIoU {novel[0]} {novel[1]}, mIoU {miou[0]} {miou[1]}, main model "
            f"novel {main['mIoU_novel']:.1f}.") in result, (novel, miou)
    run = _section(_text(folder / "report.md"), "Run")
    assert "- params changed from the committed params.yaml: `train.threads` 1 (committed 0)" in run
    readme = _text(folder / "README.md")
    assert f"| {novel[0]} {novel[1]} | {miou[0]} {miou[1]} | {main['mIoU_novel']:.1f}, {main['mIoU']:.1f} |" in readme


def test_readme_ablation_verdict_is_the_evidence_report():
    result = " ".join(_section(_text(README), "Result").split())
    report = _text(ROOT / "reports" / "evidence" / "ablation.md")
    comp = _paired(report, "+complementary − baseline", "novel mIoU")
    sim = _paired(report, "full − +complementary", "novel mIoU")
    assert f"+complementary − baseline +{_fmt(comp['mean'])} [{_fmt(comp['lo'])}, {_fmt(comp['hi'])}]" in result
    assert f"full − (+complementary) +{_fmt(sim['mean'])} [{_fmt(sim['lo'])}, {_fmt(sim['hi'])}], " \
           f"p = {sim['p']:.2f}" in result
    # the words follow the report's verdict column
    assert comp["verdict"] == "a > b" and "complementary loss helps by a resolved margin" in result
    assert sim["verdict"].startswith("not resolved") and "similarity transfer shows no resolved gain" in result


@pytest.mark.parametrize("folder, pairs", [("verdict", 12), ("verdict2", 24)])
def test_readme_similarity_verdict_is_the_verdict_report(folder, pairs):
    """The README's answer to "does similarity transfer help?" quotes each evidence run's verdict
    table (reports/<folder>/report.md): both comparisons' means, intervals and verdicts, the
    number of pairs and the interval's level."""
    result = " ".join(_section(_text(README), "Result").split())
    report = _text(ROOT / "reports" / folder / "report.md")
    assert f"`reports/{folder}/`, {pairs} pairs" in result
    for label in ("full − pp0", "full_oracle_teacher − pp0"):
        n, mean, ci, verdict = _row(report, label)[1:]
        lo, hi = (float(v) for v in ci.split("(")[0].strip().strip("[]").split(","))
        sign = "+" if float(mean) > 0 else ""
        assert n == str(pairs) and "(97.5%)" in ci, (folder, label, n, ci)
        quoted = f"**{sign}{_fmt(float(mean))} [{_fmt(lo)}, {_fmt(hi)}]** ({verdict.strip('`').replace('_', ' ')})"
        assert quoted in result, (folder, label, quoted)
    assert "97.5% t intervals" in result


def test_readme_time_and_disk_figures_have_a_source():
    text = " ".join(_text(README).split())
    history = " ".join(_text(REPORTS_README).split())
    figures = re.findall(r"\d+ min \d+ s|\d+-\d+ minutes", text)
    assert len(figures) >= 3
    for figure in figures:
        assert figure in history, f"README quotes {figure!r}; reports/README.md does not"
    tests = " ".join(_section(_text(README), "Tests").split())
    needed = re.search(r"^NEEDED_GIB = (\d+)", _text(ROOT / "tests" / "conftest.py"), re.M).group(1)
    assert f"about {needed} GiB" in tests
    assert "TMPDIR" in tests and "3.5 GB" in tests and "3.5 GB" in history


# ============================================================================ Coming from SimFormer


def _released_configs() -> list[tuple[str, str, str]]:
    """(where, released configs, command line) for every mapping the README table and
    docs/COMING_FROM_SIMFORMER.md give, with the split N of the README's table set to 1 and 4."""
    out = []
    rows = re.findall(r"^\| `(s\w+)`[^|]*\| (.+) \|$", _section(_text(README), "Coming from SimFormer / MaskFormer"),
                      re.M)
    assert [name for name, _ in rows] == ["sN_seg", "sN_seg_crosim", "sN_seg_pseudo_label"], rows
    commands = {}
    for name, cell in rows:
        (span,) = re.findall(r"`([^`]+)`", cell)
        commands[name] = span if span.startswith("dvc ") else commands["sN_seg_crosim"] + " " + span
    for n in (1, 4):
        for name, cmd in commands.items():
            out.append(("README.md", name.replace("sN", f"s{n}"), cmd.replace("=N", f"={n}")))
    page = ROOT / "docs" / "COMING_FROM_SIMFORMER.md"
    for line in _shell_lines(_text(page)):
        m = re.search(r"#\s*(s\d+_seg.*)$", line)
        assert m, f"docs/COMING_FROM_SIMFORMER.md: a command without its released config: {line!r}"
        out.append((_rel(page), m.group(1), line))
    return out


@pytest.mark.parametrize("where, configs, line", _released_configs(),
                         ids=[f"{w}:{c.split(',')[0]}" for w, c, _ in _released_configs()])
def test_released_config_mapping_switches_on_what_the_name_says(where, configs, line):
    """The command given for a released config (`s2_seg_crosim`, or `s2_seg_crosim, then
    s2_seg_pseudo_label and ...`) builds valid params that switch on what the first name says."""
    argv, inner = _split(line)
    (subst,) = inner
    name = re.match(r"s\d+_seg\w*", configs).group(0)
    flags = [*_preset_flags(subst), *argv[argv.index("__SUBST0__") + 1:]]
    preset = yaml.safe_load(_text(ROOT / shlex.split(subst)[-1]))
    p = _validate(_params_after(flags))
    n = int(re.match(r"s(\d+)_", name).group(1))
    ade = preset["data"]["dataset"] == "ade20k"
    assert (p.data.dataset, p.data.split) == (preset["data"]["dataset"], n), where
    assert p.model.backbone == "resnet50" and p.model.pretrained == "imagenet"
    assert p.loss.comp_weight == (0.2 if ade else 0.15)       # CompSupNovel of the released sN_seg
    assert not p.loss.oracle
    if name.endswith("_seg"):                                 # no cross-image similarity, single images
        assert (p.loss.sim_weight, p.loss.pp_weight, p.train.pair_sampling) == (0.0, 0.0, False), where
    else:                                                     # _crosim: SimLoss 1, DistLoss 0.5 / 0.1 on pairs
        assert (p.loss.sim_weight, p.loss.pp_weight, p.train.pair_sampling) == (1.0, 0.5 if ade else 0.1, True)
        assert p.loss.pp_form == "cce"
    assert p.pseudo.enabled is ("pseudo_label" in configs), where


# ============================================================================ dvc exp show


def test_readme_exp_show_line_fits_a_terminal(tmp_path: Path):
    """Moved from tests/test_pipeline_e2e.py. The README's (and docs/VARYING.md's) `dvc exp show` line,
    run in a DVC project with this repository's dvc.yaml, params.yaml and committed metrics, keeps the
    columns it promises and fits 120 columns. The git branch is as long as an experiment row's name
    (`├── 1a2b3c4 [peaty-zest]`), so the first column is as wide as it gets after a few `dvc exp run`."""
    if shutil.which("git") is None:
        pytest.skip("git is required for dvc")
    lines = [ln for page in (README, ROOT / "docs" / "VARYING.md") for ln in _shell_lines(_text(page))
             if ln.startswith("dvc exp show --drop")]
    assert len(lines) == 2 and lines[0] == lines[1], lines
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / "reports").mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvc/config"):
        shutil.copy(ROOT / name, project / name)
    metrics = [m for s in yaml.safe_load(_text(ROOT / "dvc.yaml"))["stages"].values() for m in s.get("metrics", [])]
    for m in metrics:
        name = next(iter(m)) if isinstance(m, dict) else m
        shutil.copy(ROOT / name, project / name)
    env = {**_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "COLUMNS": "120"}
    for cmd in (["git", "init", "-q", "-b", "x" * len("├── 1a2b3c4 [peaty-zest]")], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=project, env=env, check=True)
    r = subprocess.run([str(BIN / "dvc"), *shlex.split(lines[0])[1:], "--no-pager"], cwd=project, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    header = next(ln for ln in out if "Experiment" in ln)
    assert "…" not in r.stdout and max(map(len, out)) <= 120, r.stdout
    for col in ("mIoU_novel", "loss.pp_weight", "baseline.mIoU_novel.mean", "full.mIoU_novel.mean"):
        assert col in header, r.stdout
    novel = json.loads(_text(ROOT / "reports" / "metrics.json"))["mIoU_novel"]
    assert sum(ln.count(f"{novel:.5g}") for ln in out) == 2     # reports/metrics.json's novel mIoU, both rows
