"""The lm_head from the model's Q8_0 blocks (kernels/head.c, exec/q8head.py): bit for bit the
16-bit head's native kernel, on random blocks and through decode steps (logits and greedy tokens
the same with and without it), and on the real default model (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hest_core import Engine, GenerationRequest
from hest_core import paths as reg
from hest_core.exec import native, q8head
from hest_core.exec.loading import build_lean, load_hf_model
from hest_core.exec.q8head import Q8Head, quantize_q8_0
from hest_core.exec.routing import const_decider
from tests.hest_core.decode_steps import decode, prompts_for

NAT = native.get()
needs_native = pytest.mark.skipif(NAT is None, reason=f"native kernels {native.status()}")
# (M, N, K): one decode row (the head's), N not a multiple of the 4-row block, K = 1..48 blocks
SHAPES = [(1, 49153, 64), (1, 960, 576), (1, 37, 32), (2, 37, 96), (4, 5, 1536), (16, 33, 576)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


@needs_native
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_head_q8_equals_the_bf16_kernel_bit_for_bit(m, n, k, threads):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    head = quantize_q8_0(torch.randn(n, k, generator=g) * 0.05)
    w16 = head.dequantized().bfloat16()  # the 16-bit copy: the blocks, rounded
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for scale in (1e-3, 1.0, 1e3):
            x = (torch.randn(m, k, generator=g) * scale).bfloat16()
            y = NAT.head_q8(x, head.codes, head.scales)
            assert y.shape == (m, n) and y.dtype == torch.bfloat16
            assert torch.equal(_bits(y), _bits(NAT.gemv16(x, w16, None)))
    finally:
        torch.set_num_threads(before)


@needs_native
def test_head_q8_refuses_bad_arguments_without_writing():
    lib = NAT._lib
    codes = torch.zeros(8, 64, dtype=torch.int8)
    scales = torch.zeros(8, 2, dtype=torch.float16)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    y = torch.full((1, 8), 7.0, dtype=torch.bfloat16)
    cp, sp, xp, yp = codes.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr()
    assert lib.hest_head_q8(None, sp, xp, yp, 1, 8, 64, 1) == -1
    assert lib.hest_head_q8(cp, sp, xp, None, 1, 8, 64, 1) == -1
    assert lib.hest_head_q8(cp, sp, xp, yp, 0, 8, 64, 1) == -2
    assert lib.hest_head_q8(cp, sp, xp, yp, 17, 8, 64, 1) == -2
    assert lib.hest_head_q8(cp, sp, xp, yp, 1, 0, 64, 1) == -3
    assert lib.hest_head_q8(cp, sp, xp, yp, 1, 8, 48, 1) == -3  # K not whole blocks
    assert lib.hest_head_q8(cp, sp, xp, yp, 1, 8, 64, 0) == -7
    assert torch.equal(y, torch.full((1, 8), 7.0, dtype=torch.bfloat16))
    with pytest.raises(native.NativeArgumentError, match="scales"):
        NAT.head_q8(x, codes, scales.float())


def test_from_raw_reads_gguf_q8_0_bytes():
    head = quantize_q8_0(torch.randn(6, 96))
    raw = np.zeros((6, 3, 34), dtype=np.uint8)
    raw[..., :2] = head.scales.numpy().view(np.uint8).reshape(6, 3, 2)
    raw[..., 2:] = head.codes.numpy().view(np.uint8).reshape(6, 3, 32)
    got = q8head.from_raw(raw.reshape(6, -1))
    assert torch.equal(got.codes, head.codes) and torch.equal(got.scales, head.scales)
    assert got.nbytes == 6 * 96 + 6 * 3 * 2


@pytest.fixture(scope="module")
def lean_q8():
    """The tiny llama with its tied head replaced by Q8_0 blocks dequantized (as the default
    model ships it), and those blocks."""
    hf = load_hf_model("tiny:llama", progress=False)
    head = quantize_q8_0(hf.model.embed_tokens.weight.detach().float())
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(head.dequantized())
    lean = build_lean(hf, torch.bfloat16, torch.device("cpu"), 128)
    return lean, head


def test_attach_keeps_only_an_exact_head(lean_q8):
    lean, head = lean_q8
    other = Q8Head(head.codes.clone(), head.scales.clone())
    other.codes[0, 0] += 1
    assert not q8head.attach(lean, other) and lean.head_q8 is None
    assert not q8head.attach(lean, None)
    assert q8head.attach(lean, head) and lean.head_q8 is head
    assert lean.param_bytes()["lm_head_q8"] == head.nbytes


@needs_native
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("path", [reg.FP16, reg.INT8])
@pytest.mark.parametrize("fused", [True, False])
def test_decode_logits_and_tokens_unchanged_by_the_q8_head(lean_q8, rows, path, fused):
    """Decode steps with the Q8_0 head and without (the 16-bit head): the same logits bit for
    bit, so the same greedy tokens (1 row: the Q8_0 kernel runs; 3 rows: oneDNN, untouched)."""
    lean, head = lean_q8
    prompts = prompts_for(rows)
    out = {}
    for use in (True, False):
        lean.head_q8 = head if use else None
        out[use] = decode(lean, prompts, 3, const_decider(path), fused=fused)
    lean.head_q8 = head
    assert torch.equal(out[True], out[False])
    assert torch.equal(out[True].argmax(-1), out[False].argmax(-1))


@pytest.mark.slow
def test_default_model_int4_tokens_and_logits_unchanged(int4_tables):
    """The real default model on the int4 policy: the GGUF's Q8_0 head is attached, and greedy
    generation and each decode step's logits are the same with it and with the 16-bit head."""
    e = Engine.from_pretrained(
        "default",
        adapter=None,
        policy="int4",
        calibration=int4_tables,
        progress=False,
        paths=("fp16", "int8", "int4", "skip"),
    )
    assert e.info()["int4"]["lm_head"] == "Q8_0"
    lean, head = e.lean, e.lean.head_q8
    text = "The council voted on Tuesday to expand the bus network after a year of delays. " * 4
    req = GenerationRequest(text, energy_budget_ratio=1.0, max_new_tokens=12, clean_end=False)
    got = {}
    for use in (True, False):
        lean.head_q8 = head if use else None
        got[use] = e.generate([req])[0].text
        got[use, "logits"] = decode(lean, prompts_for(1), 4, const_decider(reg.index("int4")), True)
    lean.head_q8 = head
    assert got[True] == got[False]
    assert torch.equal(got[True, "logits"], got[False, "logits"])


@needs_native
@pytest.mark.parametrize("heads", [(4, 2, 16), (3, 1, 64)])
def test_attention_specialised_shapes_equal_the_generic_loop(heads):
    """layer_ops.c runs decode attention with G and head_dim as constants for common shapes
    (G = 2, hd = 16: the tiny models; G = 3, hd = 64: the default model); a build with
    -DHEST_ATT_GENERIC runs the runtime-shape loop alone. Same logits bit for bit, 1 and 3 rows
    at different positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, kvh, hd = heads
    cfg = LlamaConfig(vocab_size=512, hidden_size=h * hd, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=h, num_key_value_heads=kvh,
                      head_dim=hd, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    lean = build_lean(LlamaForCausalLM(cfg).eval(), torch.bfloat16, torch.device("cpu"), 256)
    for rows in (1, 3):
        prompts = [list(range(3, 40 + 23 * i)) for i in range(rows)]  # 37-83 positions
        fast = decode(lean, prompts, 2, const_decider(reg.FP16), fused=True)
        with native.variant(["-DHEST_ATT_GENERIC"], "gemv-att-generic") as lib:
            assert lib is not None
            generic = decode(lean, prompts, 2, const_decider(reg.FP16), fused=True)
        assert torch.equal(fast, generic), rows
