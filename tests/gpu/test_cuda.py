"""The CUDA paths and the NVML meter, on a real GPU. Skipped where torch sees none (CI, the
2-core dev machine); run on a GPU machine with `python -m pytest tests/gpu -v`.

What CPU runs cannot check: every path of `LeanModel` in float16 on CUDA against the CPU fp32
reference, cuBLAS int8 at the row counts that need padding, calibration on CUDA with the GPU's
energy counter, and an Engine whose requests carry measured joules and still keep the budget.
"""

from __future__ import annotations

import os

import pytest
import torch

from hest_core import Engine, GenerationRequest
from hest_core.dtypes import dtype_name, resolve_dtype
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import TINY, build_lean, load_hf_model
from hest_core.exec.model import LeanModel
from hest_core.exec.quant import Int8Linear
from hest_core.exec.routing import const_decider
from hest_core.paths import FP16, INT8, SKIP

# HEST_GPU_TEST_DEVICE=cpu dry-runs this file on a machine without a GPU (bf16 then)
CUDA = torch.device(os.environ.get("HEST_GPU_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"
)
HALF = resolve_dtype("auto", CUDA)
CPU = torch.device("cpu")
# float16 on CUDA against fp32 on CPU, as a share of max |logit|: the same path on both sides,
# so this is 16-bit rounding only (int8 quantises the same weights and rows on both)
REL_BOUND = {FP16: 0.02, INT8: 0.03, SKIP: 0.02}


def run(lean: LeanModel, ids: torch.Tensor, path: int, split: int) -> torch.Tensor:
    """Logits for every position: prefill `split` tokens, then decode the rest one by one."""
    dev, n = lean.device, ids.shape[0]
    ids = ids.to(dev)
    cache = lean.new_cache(1, n + 1)
    dec = const_decider(path)
    pos = torch.arange(split, device=dev)
    out = [lean.forward(ids[:split], pos, [SeqSlot(0, split, 0, 0)], cache, dec, False, pos)]
    for t in range(split, n):
        out.append(
            lean.forward(
                ids[t : t + 1],
                torch.tensor([t], device=dev),
                [SeqSlot(0, 1, 0, t)],
                cache,
                dec,
                True,
            )
        )
    return torch.cat(out).float().cpu()


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return load_hf_model(request.param)


@pytest.mark.parametrize("path", [FP16, INT8, SKIP], ids=["fp16", "int8", "skip"])
def test_each_path_on_cuda_matches_cpu_fp32(tiny, path):
    ids = torch.randint(0, 1000, (24,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = run(build_lean(tiny, torch.float32, CPU, 64), ids, path, split=16)
        got = run(build_lean(tiny, HALF, CUDA, 64), ids, path, split=16)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel < REL_BOUND[path], f"path {path}: max rel diff {rel:.4f}"


@pytest.mark.parametrize("m", [1, 4, 16, 17, 40])
def test_cuda_int8_matches_dequantised_weights(m):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(m, 64, generator=g)
    lin = Int8Linear.from_weight(w.to(CUDA), None, HALF)
    got = lin(x.to(CUDA, HALF)).float().cpu()
    ref = x @ lin.dequantized().cpu().t()
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.02


@pytest.fixture(scope="module")
def cuda_engine(tmp_path_factory) -> Engine:
    """The tiny model on CUDA with the best meter here, calibrated now into a fresh cache."""
    old = os.environ.get("HEST_CACHE_DIR")
    os.environ["HEST_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield Engine.from_pretrained("tiny:llama", adapter=None, device=str(CUDA), progress=False)
    finally:
        if old is None:
            os.environ.pop("HEST_CACHE_DIR", None)
        else:
            os.environ["HEST_CACHE_DIR"] = old


def test_cuda_engine_calibrates_with_the_gpu_meter(cuda_engine):
    info = cuda_engine.info()
    assert info["device"].startswith(CUDA.type) and info["dtype"] == dtype_name(HALF)
    assert info["meter"] in ("nvml", "estimate")
    if info["meter"] == "nvml":
        assert info["calibration"]["method"].startswith("nvml")
    table = cuda_engine.energy.table
    for phase in (table.prefill, table.decode):
        f, i, s = phase.unit[0]
        assert f > 0 and i > 0 and s > 0


@pytest.mark.parametrize("ratio", [0.4, 0.6, 1.0])
def test_cuda_engine_keeps_the_budget_and_measures(cuda_engine, ratio):
    text = "The council met on Monday to discuss the new bridge. " * 12
    res = cuda_engine.generate(
        [GenerationRequest(text, energy_budget_ratio=ratio, max_new_tokens=24)]
    )[0]
    st = res.stats
    assert st.modelled_j <= st.budget_j * (1 + 1e-9)
    assert st.completion_tokens >= 1
    assert st.meter == cuda_engine.info()["meter"]
    if st.meter == "nvml":
        assert st.measured_j is not None and st.measured_j > 0
    else:
        assert st.measured_j is None


def test_cuda_batch_matches_each_request_alone(cuda_engine):
    texts = [
        "Short note about rain in the valley.",
        "A much longer report about the harbour, its ships, their crews and cargo. " * 6,
    ]
    reqs = [GenerationRequest(t, energy_budget_ratio=1.0, max_new_tokens=12) for t in texts]
    together = [r.text for r in cuda_engine.generate(reqs)]
    alone = [cuda_engine.generate([r])[0].text for r in reqs]
    assert together == alone


def test_cuda_lean_turns_off_cudnn_attention(tiny):
    """cuDNN attention builds a graph per new context length (~47 ms each on an H100, i.e. at
    every decode step of a fresh process); the runtime uses flash / memory-efficient instead."""
    build_lean(tiny, HALF, CUDA, 64)
    if CUDA.type == "cuda":
        assert not torch.backends.cuda.cudnn_sdp_enabled()
