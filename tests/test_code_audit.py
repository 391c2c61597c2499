"""Rules the source code must follow, checked on the source itself (ast): every output is
written through pipeline.io's atomic helpers (a crash never leaves a half-written file), YAML is
only safe-loaded and every torch.load is weights_only. Each scanner is first shown to catch a
violation."""
from __future__ import annotations

import ast
import textwrap

from tests.helpers import ROOT

# ============================================================================ writes go through pipeline.io

# call -> where its destination is: ("arg", i) or ("receiver",)
_DEST = {
    "torch.save": ("arg", 1), "np.save": ("arg", 0), "numpy.save": ("arg", 0), "np.savez": ("arg", 0),
    "np.savez_compressed": ("arg", 0), "cv2.imwrite": ("arg", 0), "shutil.copy": ("arg", 1),
    "shutil.copy2": ("arg", 1), "shutil.copyfile": ("arg", 1), "shutil.copytree": ("arg", 1),
}
_DEST_ATTR = {"savefig": ("arg", 0), "to_csv": ("arg", 0), "to_json": ("arg", 0), "to_parquet": ("arg", 0),
              "to_pickle": ("arg", 0), "write_text": ("receiver",), "write_bytes": ("receiver",)}
_ATOMIC = {"atomic_path", "atomic_dir"}

# (file, enclosing function, call) -> why a write outside an atomic_* block is fine there.
# Every entry must still match a write (a stale entry fails the test).
WRITE_ALLOWLIST = {
    ("pipeline/data/prepare.py", "_convert_one", "cv2.imwrite"):
        "writes into the atomic_dir temporary folder that prepare_dataset passes in (worker process)",
    ("pipeline/data/prepare.py", "_convert_one", "shutil.copyfile"):
        "copies into the atomic_dir temporary folder that prepare_dataset passes in (worker process)",
    ("pipeline/data/download.py", "_fetch_once", "open"):
        "the resumable '<archive>.part' file; download() renames it onto the archive after the checksum",
    ("pipeline/tracking.py", "_init_lock", "open"): "an flock lock file, not an output",
    ("pipeline/tracking.py", "__call__", "shutil.copyfile"):
        "CheckpointLogger: the checkpoint under its artifact name in a temporary folder, uploaded to MLflow and "
        "removed (where a hard link is impossible); not an output",
    ("pipeline/jobs.py", "__enter__", "open"): "an flock lock file marking a running training, not an output",
    ("pipeline/engine/benchmark.py", "measure_training", ".write_text"):
        "resets the kernel's peak-RSS counter (/proc/self/clear_refs), not an output",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


def _write_target(call: ast.Call):
    """(call name, destination expression) when ``call`` writes a file, else None."""
    func, name = call.func, _dotted(call.func)
    where = _DEST.get(name)
    if where is None and isinstance(func, ast.Attribute) and func.attr in _DEST_ATTR:
        where, name = _DEST_ATTR[func.attr], "." + func.attr
    if name in ("open", "io.open") or (isinstance(func, ast.Attribute) and func.attr == "open"):
        builtin = name in ("open", "io.open")
        mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
        pos = 1 if builtin else 0
        if mode is None and len(call.args) > pos:
            mode = call.args[pos]
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
            if not set(mode.value) & set("wax+"):
                return None
        elif mode is None or not builtin:           # default "r"; zf.open(info) & co. read
            return None
        where, name = (("arg", 0) if builtin else ("receiver",)), "open"
    if where is None:
        return None
    if where[0] == "receiver":
        return name, func.value
    if len(call.args) <= where[1]:
        return None if name.startswith(".to_") else (name, None)   # df.to_csv() returns a string
    return name, call.args[where[1]]


def scan_writes(source: str, filename: str = "<src>") -> list[dict]:
    """Every file write in ``source``, with whether its destination is the temporary path of an
    enclosing ``with atomic_path(...)/atomic_dir(...) as tmp`` (or a name derived from it)."""
    tree = ast.parse(source, filename)
    found: list[dict] = []

    def derive(body: list[ast.stmt], tainted: set[str]) -> set[str]:
        tainted = set(tainted)
        while True:
            grown = set(tainted)
            for stmt in body:
                for n in ast.walk(stmt):
                    if isinstance(n, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and _names(n.value) & grown:
                        targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                        for t in targets:
                            grown |= _names(t)
                    elif isinstance(n, (ast.For, ast.comprehension)) and _names(n.iter) & grown:
                        grown |= _names(n.target)
                    elif isinstance(n, ast.withitem) and _names(n.context_expr) & grown:
                        grown |= _names(n.optional_vars)       # with open(tmp, "wb") as f
            if grown == tainted:
                return tainted
            tainted = grown

    def visit(node: ast.AST, func: str, tainted: frozenset[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name if func == "<module>" else f"{func}.{node.name}"
        if isinstance(node, (ast.With, ast.AsyncWith)):
            new = {_dotted(i.optional_vars) for i in node.items
                   if isinstance(i.context_expr, ast.Call) and _dotted(i.context_expr.func).split(".")[-1] in _ATOMIC
                   and isinstance(i.optional_vars, ast.Name)}
            if new:
                inner = frozenset(derive(node.body, tainted | new))
                for i in node.items:
                    visit(i, func, tainted)
                for stmt in node.body:
                    visit(stmt, func, inner)
                return
        if isinstance(node, ast.Call):
            hit = _write_target(node)
            if hit is not None:
                name, dest = hit
                found.append({"file": filename, "line": node.lineno, "func": func.split(".")[0], "call": name,
                              "atomic": bool(dest is not None and _names(dest) & tainted)})
        for child in ast.iter_child_nodes(node):
            visit(child, func, tainted)

    visit(tree, "<module>", frozenset())
    return found


def test_write_scanner_catches_bare_writes():
    src = textwrap.dedent('''
        def bad(p, model, img, df, fig):
            with open(p, "w") as f:
                f.write("x")
            Path(p).write_text("x")
            torch.save(model, p)
            cv2.imwrite(str(p), img)
            df.to_csv(p)
            with atomic_path(p) as tmp:
                torch.save(model, p)          # inside the block, but to the final path
            with open(p, mode="ab") as f:
                pass

        def good(p, d, model, img, df, fig):
            with atomic_path(p) as tmp:
                torch.save(model, tmp)
                with open(tmp, "wb") as f:
                    f.write(b"")
            with atomic_dir(d) as tmp:
                sub = tmp / "images" / "train"
                for x in [sub]:
                    cv2.imwrite(str(x / "a.png"), img)
                def nested(name):
                    cv2.imwrite(str(sub / name), img)
            with atomic_path(p, suffix=".png") as tmp:
                fig.savefig(tmp, format="png")
            text = df.to_csv()
            with open(p) as f, open(p, "rb") as g, zf.open(info) as h:
                pass
    ''')
    hits = scan_writes(src)
    bad = [(h["func"], h["call"]) for h in hits if not h["atomic"]]
    assert bad == [("bad", "open"), ("bad", ".write_text"), ("bad", "torch.save"), ("bad", "cv2.imwrite"),
                   ("bad", ".to_csv"), ("bad", "torch.save"), ("bad", "open")]
    assert sum(h["atomic"] for h in hits) == 5 and all(h["func"] == "good" for h in hits if h["atomic"])


def test_stages_and_pipeline_write_outputs_atomically():
    files = sorted((ROOT / "stages").glob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py"))
    files = [f for f in files if f != ROOT / "pipeline" / "io.py"]
    hits = []
    for f in files:
        hits += scan_writes(f.read_text(), str(f.relative_to(ROOT)))
    assert sum(h["atomic"] for h in hits) >= 8          # the scanner sees the real write sites
    used = set()
    offenders = []
    for h in hits:
        if h["atomic"]:
            continue
        key = (h["file"], h["func"], h["call"])
        if key in WRITE_ALLOWLIST:
            used.add(key)
        else:
            offenders.append(f"{h['file']}:{h['line']} {h['call']} in {h['func']}()")
    assert not offenders, ("writes outside pipeline.io helpers / atomic_path / atomic_dir (a crash leaves a "
                           "half-written output):\n" + "\n".join(offenders))
    assert set(WRITE_ALLOWLIST) == used, f"stale allow-list entries: {set(WRITE_ALLOWLIST) - used}"


# ============================================================================ unsafe loading

CODE_DIRS = ("pipeline", "stages", "tests")


def _py_files(dirs=CODE_DIRS):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def _calls(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


UNSAFE_YAML = {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
               "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader"}


def unsafe_yaml_uses(source: str) -> list[str]:
    tree = ast.parse(source)
    hits = [_dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _dotted(n) in UNSAFE_YAML]
    hits += [f"from yaml import {a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             and n.module == "yaml" for a in n.names if f"yaml.{a.name}" in UNSAFE_YAML]
    return hits


def torch_load_without_weights_only(source: str) -> list[int]:
    bad = []
    for c in _calls(ast.parse(source)):
        if _dotted(c.func) == "torch.load":
            kw = {k.arg: k.value for k in c.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(c.lineno)
    return bad


def test_security_scanners_can_fail():
    assert unsafe_yaml_uses("import yaml\nyaml.load(s, Loader=yaml.Loader)\n") == ["yaml.load", "yaml.Loader"]
    assert unsafe_yaml_uses("from yaml import unsafe_load\n") == ["from yaml import unsafe_load"]
    assert unsafe_yaml_uses("yaml.safe_load(s)\n") == []
    assert torch_load_without_weights_only("torch.load(p)\ntorch.load(p, weights_only=False)\n"
                                           "torch.load(p, map_location='cpu', weights_only=True)\n") == [1, 2]


def test_yaml_is_only_safe_loaded():
    offenders = {str(f.relative_to(ROOT)): u for f in _py_files() if (u := unsafe_yaml_uses(f.read_text()))}
    assert not offenders, offenders
    assert "yaml.safe_load(" in (ROOT / "pipeline/cli.py").read_text()


def test_every_torch_load_is_weights_only():
    seen, offenders = 0, {}
    for f in _py_files():
        src = f.read_text()
        seen += src.count("torch.load(")
        if bad := torch_load_without_weights_only(src):
            offenders[str(f.relative_to(ROOT))] = bad
    assert not offenders, f"torch.load without weights_only=True (pickled code would run): {offenders}"
    assert seen >= 2
    for f in _py_files(("pipeline", "stages")):                 # no other unpickling of files either
        src = f.read_text()
        assert "pickle.load" not in src and "allow_pickle=True" not in src, f
