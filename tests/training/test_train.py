"""End-to-end training runs on the tiny model: resume, artifacts, every method."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hest_core import Engine, load_adapter
from tests.training.conftest import train_argv
from training.train import main


def _tensors(run):
    return load_file(str(run / "adapter" / "adapter.safetensors"))


def test_log_and_curves(trained):
    rows = [json.loads(x) for x in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("loss", "ce", "e_ratio", "lambdas", "share_fp16", "share_int8", "share_skip"):
        assert key in rows[-1]
    assert (trained / "curves.png").stat().st_size > 1000
    a = _tensors(trained)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if k.startswith("hest_z."))


def test_resume_equals_uninterrupted(pairs_file, trained, tmp_path):
    main(train_argv(pairs_file, tmp_path, 4, "hest", "--stop-after", "2"))
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
    main(train_argv(pairs_file, tmp_path, 4))  # the same command again: resumes at step 2
    a, b = _tensors(trained), _tensors(tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    log_a = (trained / "log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["ce"] for x in log_a] == pytest.approx(
        [json.loads(x)["ce"] for x in log_b]
    )


def test_artifact_round_trips_and_serves(trained):
    ad = load_adapter(trained / "adapter")
    assert ad.config.method == "hest" and ad.config.training["steps"] == 4
    saved = _tensors(trained)
    again = {
        f"hest_controller.{n.removeprefix('hest_')}": p for n, p in ad.controller.named_parameters()
    }
    for k, v in again.items():
        assert torch.equal(saved[k], v.detach())
    eng = Engine.from_pretrained("tiny:llama", adapter=trained / "adapter", progress=False)
    res = eng.summarize(
        ["A short article about a cat on a mat."], energy_budget_ratio=0.8, max_new_tokens=4
    )[0]
    assert res.stats.modelled_j <= res.stats.budget_j
    assert sum(res.stats.paths.values()) > 0


@pytest.mark.parametrize(
    "method", ["hest-fp16only", "hest-no-dual", "hest-unfactorised", "bhsp", "tabs"]
)
def test_every_method_trains_and_loads(pairs_file, tmp_path, method):
    main(train_argv(pairs_file, tmp_path, 1, method))
    ad = load_adapter(tmp_path / "adapter")
    assert ad.config.method == method
    eng = Engine.from_pretrained(
        "tiny:llama", adapter=tmp_path / "adapter", progress=False, guard="off"
    )
    res = eng.summarize(["Some news text here."], energy_budget_ratio=0.6, max_new_tokens=3)[0]
    if method in ("hest-fp16only", "bhsp", "tabs"):
        assert res.stats.paths["int8"] == 0  # {fp16, skip} methods never pick int8


def test_controller_sizes_at_the_default_shape():
    """HEST's factorised controller vs TABS's per-layer routers at d=576, L=30, k=32."""
    from hest_core.controller import CONTROLLERS, Controller

    def count(m):
        return sum(p.numel() for p in CONTROLLERS[m](576, 30, 32).parameters())

    assert count("hest") == Controller.n_params(576, 30, 32)
    assert count("hest") <= 0.1 * count("tabs")
    assert count("bhsp") < count("hest") < count("hest-unfactorised")


def test_lora_trains_merges_and_serves(pairs_file, tmp_path, tiny_engine):
    main(train_argv(pairs_file, tmp_path, 2, "lora-r8"))
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file()
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "log.jsonl").is_file()
    cal = tiny_engine.info()["calibration"]["source"]
    eng = Engine.from_pretrained(
        str(merged), adapter=None, policy="fp16", calibration=cal, progress=False
    )
    res = eng.summarize(["A cat."], energy_budget_ratio=1.0, max_new_tokens=3)[0]
    assert res.stats.paths["fp16"] > 0
