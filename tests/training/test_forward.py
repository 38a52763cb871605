"""The training forward: agrees with the runtime per path, and gradients reach controller and z."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hest_core.adapter.controller import Controller
from hest_core.adapter.spectral import SvdCache, spectrum_sizes
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import build_lean, fingerprint, load_hf_model
from training.forward import NEG, SpectralZ, TrainModel, forward

PROMPT = [1, 17, 99, 512, 7, 3000, 42, 8, 8, 15]
SUMMARY = [77, 78, 79, 2]


@pytest.fixture(scope="module")
def hf():
    return load_hf_model("tiny:llama", progress=False)


@pytest.fixture(scope="module")
def tm(hf):
    return TrainModel(hf, torch.float32)


def _costs(L):
    return torch.tensor([[3.0, 2.0, 1.0]] * L), torch.tensor([[30.0, 20.0, 10.0]] * L)


def _runtime_ce(hf, path: int) -> float:
    lean = build_lean(hf, torch.float32, torch.device("cpu"), 2048)
    ids = torch.tensor(PROMPT + SUMMARY[:-1])
    T, P = ids.shape[0], len(PROMPT)

    def decide(li, h):
        n = h.shape[0]
        return torch.full((n,), path), [n if p == path else 0 for p in range(3)]

    with torch.no_grad():
        logits = lean.forward(
            ids,
            torch.arange(T),
            [SeqSlot(0, T, 0, 0)],
            lean.new_cache(1, T),
            decide,
            False,
            torch.arange(P - 1, T),
        )
    return float(F.cross_entropy(logits, torch.tensor(SUMMARY)))


@pytest.mark.parametrize("path", [0, 1, 2])
def test_each_path_matches_the_runtime(hf, tm, path):
    ctl = Controller(tm.spec.hidden, tm.spec.n_layers)
    mask = torch.full((3,), NEG)
    mask[path] = 0.0
    with torch.no_grad():
        fo = forward(
            tm,
            ctl,
            None,
            PROMPT,
            SUMMARY,
            0.0,
            1.0,
            mask,
            _costs(tm.spec.n_layers),
            0.0,
            torch.Generator().manual_seed(0),
        )
    assert float(fo.ce) == pytest.approx(_runtime_ce(hf, path), rel=2e-3)
    assert fo.counts[:, path].sum() == fo.counts.sum()


def test_gradients_reach_controller_and_z(hf, tm):
    ctl = Controller(tm.spec.hidden, tm.spec.n_layers)
    ctl.init_for_training(0)
    z = SpectralZ(
        SvdCache(hf, fingerprint(hf), progress=False),
        tm.spec.n_layers,
        spectrum_sizes(hf),
        8,
        torch.float32,
    )
    L = tm.spec.n_layers
    fo = forward(
        tm,
        ctl,
        z,
        PROMPT,
        SUMMARY,
        -0.5,
        1.0,
        torch.zeros(3),
        _costs(L),
        5.0,
        torch.Generator().manual_seed(0),
    )
    (fo.ce + 0.01 * fo.e_bar).backward()
    for name, p in ctl.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t, p in z.z.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, t
    # expected energy: fixed part plus, per unit, a probability-weighted cost within [skip, fp16]
    n_pre, n_dec = len(PROMPT) * L, (len(SUMMARY) - 1) * L
    assert 5.0 + n_pre * 1 + n_dec * 10 <= float(fo.e_bar.detach()) <= 5.0 + n_pre * 3 + n_dec * 30


def test_z_changes_the_weights_like_the_merge(hf, tm):
    svd = SvdCache(hf, fingerprint(hf), progress=False)
    z = SpectralZ(svd, tm.spec.n_layers, spectrum_sizes(hf), 4, torch.float32)
    with torch.no_grad():
        z.z["q_proj"][1].fill_(0.1)
    x = torch.randn(3, tm.spec.hidden)
    u, s, vh = svd.factors(1, "q_proj")
    zz = z.full_z()["q_proj"][1]
    w_delta = (u * (s * zz)[None, :]) @ vh  # the runtime's merge_delta
    assert torch.allclose(z.delta(x, 1, "q_proj"), x @ w_delta.t(), atol=1e-5)
