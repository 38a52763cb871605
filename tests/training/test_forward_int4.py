"""The trainer's twin on the opt-in int4 path (issue 13) against the runtime's int4 forward:
Q4_1 fake-quantised weights, unquantised activations, the adapter's z beside them ("lowrank")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hest_core import paths as reg
from hest_core.adapter.controller import Controller
from hest_core.adapter.spectral import SvdCache, spectrum_sizes
from hest_core.exec.int4 import attach
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model
from hest_core.exec.routing import const_decider
from training.forward import NEG, SpectralZ, TrainModel, forward

PROMPT = [1, 17, 99, 512, 7, 3000, 42, 8, 8, 15]
SUMMARY = [77, 78, 79, 2]


@pytest.fixture(scope="module")
def int4():
    with reg.registered("int4", **reg.OPTIONAL["int4"]) as p:
        yield p


@pytest.fixture(scope="module")
def hf():
    return load_hf_model("tiny:llama", progress=False)


def _runtime_ce(hf, path: int, z=None, svd=None) -> float:
    """CE of SUMMARY on the runtime (fp32: the int4 copies run their dequantized weights)."""
    lean = build_lean(hf, torch.float32, torch.device("cpu"), 2048)
    attach(lean, hf, None, z, svd, mode="lowrank")
    ids = torch.tensor(PROMPT + SUMMARY[:-1])
    T, P = ids.shape[0], len(PROMPT)
    with torch.no_grad():
        logits = lean.forward(
            ids,
            torch.arange(T),
            [SeqSlot(0, T, 0, 0)],
            lean.new_cache(1, T),
            const_decider(path),
            False,
            torch.arange(P - 1, T),
        )
    return float(F.cross_entropy(logits, torch.tensor(SUMMARY)))


@pytest.mark.parametrize("with_z", [False, True])
def test_twin_on_int4_matches_the_runtime(int4, hf, with_z):
    """Same CE within 0.2% (the built-in paths' tolerance, test_forward.py): the twin and the
    runtime multiply by the same Q4_1 values; only fp32 summation order differs."""
    tm = TrainModel(hf, torch.float32)
    zmod = None
    svd = SvdCache(hf, fingerprint(hf), progress=False)
    if with_z:
        zmod = SpectralZ(svd, tm.spec.n_layers, spectrum_sizes(hf), 4, torch.float32)
        with torch.no_grad():
            for p in zmod.z.values():
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    ctl = Controller(tm.spec.hidden, tm.spec.n_layers)
    mask = torch.full((reg.n_paths(),), NEG)
    mask[int4.index] = 0.0
    L = tm.spec.n_layers
    costs = torch.tensor([[3.0, 2.0, 1.0, 1.5]] * L), torch.tensor([[30.0, 20.0, 10.0, 15.0]] * L)
    with torch.no_grad():
        fo = forward(tm, ctl, zmod, PROMPT, SUMMARY, 0.0, 1.0, mask, costs, 0.0, None)
    z = zmod.full_z() if zmod is not None else None
    rt = _runtime_ce(hf, int4.index, z, svd)
    assert float(fo.ce) == pytest.approx(rt, rel=2e-3)
    assert fo.counts[:, int4.index].sum() == fo.counts.sum()
    # and int4 is not fp16 (the random tiny model's CE is near log V, so the gap is small):
    # the twin is closer to the runtime's int4 than to its own fp16
    mask16 = torch.full((reg.n_paths(),), NEG)
    mask16[reg.FP16] = 0.0
    with torch.no_grad():
        f16 = forward(tm, ctl, zmod, PROMPT, SUMMARY, 0.0, 1.0, mask16, costs, 0.0, None)
    assert abs(float(fo.ce) - rt) < abs(float(f16.ce) - rt)


def test_twin_with_a_merged_base_z_runs_int4_as_the_runtime(int4):
    """`--base-z`: z is merged into the frozen base before the twin is built; the twin's int4
    copy must still be the base's Q4_1 blocks + z's change (the runtime's "lowrank"), not Q4_1
    of the merged weights (measured 0.24 CE worse on the default model, docs/runtime.md)."""
    from hest_core.adapter.spectral import merge_into
    from training.gated import q4_errors

    base = load_hf_model("tiny:llama", progress=False)
    svd = SvdCache(base, fingerprint(base), progress=False)
    g = torch.Generator().manual_seed(5)
    sizes = spectrum_sizes(base)
    L = base.config.num_hidden_layers
    z = {}
    for t, n in sizes.items():  # (L, n): the top 4 directions of every layer
        z[t] = torch.zeros(L, n)
        z[t][:, :4] = torch.randn(L, 4, generator=g) * 0.3
    rt = _runtime_ce(base, int4.index, z, svd)
    merged = load_hf_model("tiny:llama", progress=False)
    err = q4_errors(merged)
    merge_into(merged, z, svd)
    ctl = Controller(merged.config.hidden_size, merged.config.num_hidden_layers)
    mask = torch.full((reg.n_paths(),), NEG)
    mask[int4.index] = 0.0
    costs = torch.tensor([[3.0, 2.0, 1.0, 1.5]] * L), torch.tensor([[30.0, 20.0, 10.0, 15.0]] * L)

    def ce(tm):
        with torch.no_grad():
            return float(
                forward(tm, ctl, None, PROMPT, SUMMARY, 0.0, 1.0, mask, costs, 0.0, None).ce
            )

    right = ce(TrainModel(merged, torch.float32, err))
    requantised = ce(TrainModel(merged, torch.float32))
    assert right == pytest.approx(rt, rel=2e-3)
    assert abs(right - rt) < abs(requantised - rt)
