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


def test_controller_sizes_at_the_default_shape():
    """HEST's factorised controller vs TABS's per-layer routers at d=576, L=30, k=32."""
    from hest_core.adapter.controller import CONTROLLERS, Controller

    def count(m):
        return sum(p.numel() for p in CONTROLLERS[m](576, 30, 32).parameters())

    assert count("hest") == Controller.n_params(576, 30, 32)
    assert count("hest") <= 0.1 * count("tabs")
    assert count("bhsp") < count("hest") < count("hest-unfactorised")


def test_lora_resume_equals_uninterrupted(pairs_file, tmp_path):
    """The loop is shared: LoRA stops at --stop-after and resumes like the gated trainers."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(train_argv(pairs_file, full, 2, "lora-r8", "--ckpt-every", "1"))
    main(train_argv(pairs_file, cut, 2, "lora-r8", "--ckpt-every", "1", "--stop-after", "1"))
    assert len((cut / "log.jsonl").read_text().splitlines()) == 1
    main(train_argv(pairs_file, cut, 2, "lora-r8", "--ckpt-every", "1"))
    ce = [
        [json.loads(x)["ce"] for x in (d / "log.jsonl").read_text().splitlines()]
        for d in (full, cut)
    ]
    assert ce[0] == pytest.approx(ce[1])
    a, b = (load_file(str(d / "merged" / "model.safetensors")) for d in (full, cut))
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-3), k
    meta = json.loads((cut / "merged" / "hest_training.json").read_text())
    assert meta["method"] == "lora-r8" and meta["steps"] == 2


def test_base_z_keeps_an_adapters_z_and_trains_the_controller(pairs_file, tmp_path):
    """`--base-z DIR --z-rank 0`: the artifact carries DIR's z unchanged (merged into the frozen
    base while the controller trains); with a trainable z it is refused."""
    from training import train

    first = train.train(train.parse_args(train_argv(pairs_file, tmp_path / "a", 2)))
    base = load_adapter(first)
    assert any(float(z.abs().max()) > 0 for z in base.z.values())
    argv = train_argv(pairs_file, tmp_path / "b", 2, "hest", "--base-z", str(first))
    out = load_adapter(train.train(train.parse_args([*argv, "--z-rank", "0"])))
    for t, z in base.z.items():
        assert torch.equal(out.z[t], z.float()), t
    assert out.config.training["base_z"] == str(first)
    with pytest.raises(ValueError, match="--z-rank 0"):
        train.train(
            train.parse_args(
                train_argv(pairs_file, tmp_path / "c", 2, "hest", "--base-z", str(first))
            )
        )


@pytest.fixture
def builtin_paths():
    """Whatever a test registers, the process leaves it with the built-in path set."""
    from hest_core import paths as reg

    yield
    if reg.find("int4") is not None:
        reg.unregister("int4")


def test_four_path_run_records_int4_and_serves_it(pairs_file, tmp_path, builtin_paths, int4_tables):
    """`--paths fp16,int8,int4,skip`: the controller gets int4's output, the artifact records the
    four paths, and an Engine loads it with int4 registered, asked for or not."""
    from training import train

    four = "fp16,int8,int4,skip"
    run = tmp_path / "four"
    argv = [*train_argv(pairs_file, run, 2), "--paths", four, "--calibration", str(int4_tables)]
    art = train.train(train.parse_args(argv))
    cfg = json.loads((art / "adapter_config.json").read_text())
    assert sorted(cfg["paths"]) == sorted(four.split(","))
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert "share_int4" in rec
    eng = Engine.from_pretrained(
        "tiny:llama", adapter=art, dtype="fp32", paths=four.split(","), calibration=int4_tables
    )
    assert "int4" in eng.info()["paths"]
    # an engine given no path set registers the paths the adapter was trained with
    from hest_core import paths as reg

    reg.unregister("int4")
    eng = Engine.from_pretrained("tiny:llama", adapter=art, dtype="fp32", calibration=int4_tables)
    assert "int4" in eng.info()["paths"] and reg.find("int4") is not None


def test_cost_jitter_lets_int4_cross_int8_and_keeps_skip_cheapest(tmp_path, builtin_paths):
    """`--cost-jitter`: fp16 keeps its cost, int8 and int4 move independently (either may be the
    dearer on a step), the cheapest path stays below every other by 5%."""
    import argparse

    from hest_core import paths as reg
    from training.gated import GateTrainer

    reg.enable(("fp16", "int8", "int4", "skip"))
    L, P = 3, reg.n_paths()
    unit = {"fp16": 1.0, "int8": 0.5, "int4": 0.45, "skip": 0.05}
    base = torch.tensor([[unit[n] for n in reg.names()]] * L)
    t = GateTrainer.__new__(GateTrainer)
    t.args = argparse.Namespace(cost_jitter=0.4, seed=0)
    t.costs = (base.clone(), base.clone())
    t.ctl = torch.nn.Identity()
    crossed = set()
    for step in range(60):
        for c in t._step_costs(step):
            ref, sk = reg.ref(), reg.index("skip")
            assert torch.equal(c[:, ref], base[:, ref])
            others = c[:, [p for p in range(P) if p != sk]]
            assert bool((c[:, sk] <= 0.95 * others.min(1).values + 1e-9).all())
            i8, i4 = c[0, reg.index("int8")], c[0, reg.index("int4")]
            crossed.add(bool(i4 > i8))
    assert crossed == {True, False}
    assert P == 4


def test_fix_path_trains_z_alone_on_one_path_and_pairs_with_a_controller(
    pairs_file, tmp_path, builtin_paths, int4_tables
):
    """`--fix-path int4`: every unit runs int4 (the log's shares), the loss is the CE alone, the
    controller keeps its starting weights while z moves; tools/pair_adapter.py then serves that
    z under another artifact's controller. Without a trainable z, or with a path the method may
    not use, the run is refused."""
    from tools.pair_adapter import pair
    from training import train

    four = "fp16,int8,int4,skip"
    run = tmp_path / "zonly"
    base = [*train_argv(pairs_file, run, 3), "--paths", four, "--calibration", str(int4_tables)]
    art = train.train(train.parse_args([*base, "--fix-path", "int4", "--z-lr", "1e-2"]))
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["share_int4"] == 1.0 and r["loss"] == r["ce"] for r in recs)
    got = load_adapter(art)
    assert any(float(z.abs().max()) > 0 for z in got.z.values())
    assert got.config.training["fix_path"] == "int4"
    # the controller was not trained: it equals the trainer's starting controller
    from training.methods import METHODS

    c = got.config
    start = METHODS["hest"].controller(c.hidden, c.n_layers, c.k)
    start.init_for_training(0)
    c0 = start.float().state_dict()
    for k, v in got.controller.state_dict().items():
        assert torch.equal(v, c0[k]), k

    ctl = train.train(
        train.parse_args(
            train_argv(
                pairs_file,
                tmp_path / "ctl",
                2,
                "hest",
                "--paths",
                four,
                "--calibration",
                str(int4_tables),
            )
        )
    )
    paired = load_adapter(pair(str(ctl), str(art), str(tmp_path / "paired"), read_ratio=0.5))
    for t, z in got.z.items():
        assert torch.equal(paired.z[t], z), t
    c1 = load_adapter(ctl).controller.state_dict()
    for k, v in paired.controller.state_dict().items():
        assert torch.equal(v, c1[k]), k
    assert paired.config.read_ratio == 0.5
    assert paired.config.training["z_from"]["training"]["fix_path"] == "int4"
    eng = Engine.from_pretrained(
        "tiny:llama", adapter=tmp_path / "paired", dtype="fp32", calibration=int4_tables
    )
    assert "int4" in eng.info()["paths"]

    with pytest.raises(ValueError, match="needs --z-rank"):
        train.train(train.parse_args([*base, "--fix-path", "int4", "--z-rank", "0"]))
    with pytest.raises(ValueError, match="not a path"):
        train.train(
            train.parse_args(
                [*train_argv(pairs_file, tmp_path / "t", 1, "hest-fp16only"), "--fix-path", "int8"]
            )
        )


def test_int4_z_plain_trains_int4_on_the_base_blocks_and_records_it(
    pairs_file, tmp_path, builtin_paths, int4_tables
):
    """`--int4-z plain` under `--base-z`: the twin's int4 copies are the base's Q4_1 weights
    (without z), its 16-bit copies carry z; the artifact says `int4_mode: plain`."""
    from hest_core.exec.gguf_blocks import quantize_q4_1
    from hest_core.exec.loading import load_hf_model
    from hest_core.exec.weights import target_module
    from training import gated, train

    four = "fp16,int8,int4,skip"
    first = train.train(train.parse_args(train_argv(pairs_file, tmp_path / "a", 2)))
    argv = [
        *train_argv(pairs_file, tmp_path / "b", 1, "hest", "--base-z", str(first)),
        "--z-rank",
        "0",
        "--paths",
        four,
        "--calibration",
        str(int4_tables),
        "--int4-z",
        "plain",
    ]
    args = train.parse_args(argv)
    train.enable_paths(args.paths)
    tr = gated.GateTrainer(train.METHODS["hest"], args)
    hf = load_hf_model("tiny:llama", progress=False)
    w = target_module(hf, 0, "o_proj").weight.detach().float()
    q4 = quantize_q4_1(w).dequantize().float()
    assert torch.allclose(tr.tm.layers[0].fq4["o"].float(), q4)
    assert not torch.allclose(tr.tm.layers[0].wo.float(), w)  # the 16-bit copy carries z
    out = train.train(args)
    assert json.loads((out / "adapter_config.json").read_text())["int4_mode"] == "plain"
