"""The registry of methods (training/methods.py): every reader agrees with it, every trainable
method trains on the tiny model and its artifact evaluates, training/ has no import cycles."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hest_core import load_adapter
from hest_core.adapter.controller import CONTROLLERS
from tests.training.conftest import train_argv
from training import evaluate, train
from training.methods import METHODS, markdown_table, trainable
from training.objective import Evaluation, Method

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ROOT / "training"
HEAVY = ("peft", "matplotlib", "datasets", "rouge_score", "nltk")


def test_readers_follow_the_registry():
    assert set(trainable()) == {
        "hest",
        "hest-fp16only",
        "hest-no-dual",
        "hest-unfactorised",
        "bhsp",
        "tabs",
        "lora-r8",
    }
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--method", "fp16"])  # evaluated only
    for name in trainable():
        assert train.parse_args(["--out", "x", "--method", name]).method == name
    args = evaluate.parse_args(["--json", "x.json", "--policies", ",".join(METHODS)])
    assert {policy for _, policy, _ in evaluate.row_names(args)} == set(METHODS)
    for name, m in METHODS.items():
        if m.controller is not None:  # the Engine loads the artifact with the same class
            assert CONTROLLERS[m.controller_key] is m.controller, name


def test_docs_hold_the_registry_table():
    docs = (ROOT / "docs" / "training.md").read_text()
    assert markdown_table() in docs, "paste `python -m training.methods` into docs/training.md"


def test_a_method_is_checked_where_it_is_declared():
    with pytest.raises(ValueError, match="paths"):
        Method("x", "x", ("fp32",), Evaluation("policy"))
    with pytest.raises(ValueError, match="controller"):
        Method("x", "x", ("fp16",), Evaluation("adapter"))
    with pytest.raises(ValueError, match="rows"):
        Evaluation("adapter", rows="every")


@pytest.mark.parametrize("name", trainable())
def test_every_method_trains_and_its_artifact_evaluates(pairs_file, tmp_path, name):
    m = METHODS[name]
    run = tmp_path / "run"
    artifact = train.train(train.parse_args(train_argv(pairs_file, run, 2, name)))
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    assert (run / "ckpt.pt").is_file() and (run / "curves.png").is_file()
    if m.evaluation.engine == "adapter":
        assert load_adapter(artifact).config.method == name
    out = tmp_path / "eval.json"
    argv = ["--policies", name, "--model", "tiny:llama", "--data", str(pairs_file), "--limit", "1"]
    argv += ["--json", str(out), "--adapters", f"{name}={artifact}", "--max-new-tokens", "3"]
    # at r = 1 the guard never demotes, so the paths are the controller's own choices
    evaluate.main([*argv, "--budget-ratios", "1.0", "--primary-ratio", "1.0", "--no-progress"])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["policy"] == name and rows[0]["n"] == 1
    shares = rows[0]["path_shares"]
    assert all(shares[p] == 0 for p in shares if p not in m.paths), shares
    if m.evaluation.guard == "hard":
        assert rows[0]["budget_violations"] == 0


def _imports(path: Path) -> set[str]:
    """training.* modules a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            base = f"training.{node.module}" if node.module else "training"
            out |= {base} if node.module else {f"training.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("training"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("training.")}
    return out


def test_no_import_cycles_in_training():
    graph = {f"training.{p.stem}": _imports(p) for p in TRAINING.glob("*.py")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, mod]))
        if state.get(mod) == 2 or mod not in graph:
            return
        state[mod] = 1
        for dep in sorted(graph[mod]):
            visit(dep, [*path, mod])
        state[mod] = 2

    for mod in graph:
        visit(mod, [])


def test_training_imports_no_optional_package_until_used():
    mods = [f"training.{p.stem}" for p in sorted(TRAINING.glob("*.py")) if p.stem != "__init__"]
    code = f"import sys\nfor m in {mods!r}: __import__(m)\n"
    code += f"print([m for m in {HEAVY!r} if m in sys.modules])"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
