"""A differentiable twin of `hest_core.exec.model.LeanModel` for training (teacher forcing).

One sequence at a time (no padding), every (layer, token) gated by a straight-through Gumbel
sample over the three paths. Instead of running fp16/int8/skip separately for each token, each
layer computes the two kinds of linear work for every row and mixes them with the gate:
* attention projections: fp16 rows dense, int8 and skip rows fake-quantised (runtime semantics);
* MLP: fp16 dense, int8 fake-quantised, skip = nothing (R=0 passthrough, the runtime default).
With hard one-hot gates in the forward pass the result equals the runtime's mixed execution
(up to fake-quant vs. int32 arithmetic); the gate's gradient reaches the controller through the
straight-through estimator. The spectral adapter adds x V diag(s z) U^T (top `z_rank`
directions of each target) to both paths, which is W' = W + U diag(s z) V^T without forming W'.
Approximation: the int8 path fake-quantises W, not the merged W' (z stays small).
Where the opt-in `int4` path is registered when the model is built, a third kind runs too:
weights fake-quantised to Q4_1 (groups of 32, fp16 scale and minimum; dequantized, straight-
through), activations unquantised, z's change beside it: the runtime's int4 "lowrank" mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hest_core import paths as reg
from hest_core.exec.gguf_blocks import quantize_q4_1
from hest_core.exec.loading import check_layout, spec_of
from hest_core.exec.ops import apply_rope, rms_norm
from hest_core.exec.quant import fake_quant_rows, fake_quant_weight
from hest_core.exec.weights import TARGETS, ModelSpec, target_module

NEG = -1e4  # logit of a path a method may not use


@dataclass
class TrainLayer:
    ln1: torch.Tensor  # (d,)
    ln2: torch.Tensor
    wqkv: torch.Tensor  # (q + 2kv, d)
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # (d, q)
    wgu: torch.Tensor  # (2I, d)
    wdown: torch.Tensor  # (d, I)
    fq_qkv: torch.Tensor  # fake-quantised copies (per output channel), same shapes
    fq_o: torch.Tensor
    fq_gu: torch.Tensor
    fq_down: torch.Tensor
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    fq4: dict[str, torch.Tensor] | None = None  # Q4_1 fake-quantised qkv, o, gu, down (int4)


def fake_quant_q4(w: torch.Tensor) -> torch.Tensor:
    """Q4_1 quantise-dequantise (hest_core.exec.gguf_blocks.quantize_q4_1) with a straight-through
    gradient: (N, K) -> (N, K), K a multiple of 32."""
    wq = quantize_q4_1(w.detach()).dequantize().to(w.dtype)
    return w + (wq - w).detach()


class SpectralZ(nn.Module):
    """Trainable z over the top-R singular directions of each target; U, s, Vh are buffers."""

    def __init__(self, svd, n_layers: int, sizes: dict[str, int], rank: int, dtype):
        super().__init__()
        self.rank = {t: min(rank, sizes[t]) for t in TARGETS}
        self.full = dict(sizes)
        self.z = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(n_layers, self.rank[t])) for t in TARGETS}
        )
        self.f: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for t in TARGETS:
            r, rows = self.rank[t], []
            for li in range(n_layers):
                u, s, vh = svd.factors(li, t)
                rows.append((u[:, :r].to(dtype), s[:r].float(), vh[:r].to(dtype)))
            self.f[t] = rows  # (out, R), (R,), (R, in)

    def delta(self, x: torch.Tensor, li: int, target: str) -> torch.Tensor:
        """x (T, in) -> x V diag(s z) U^T (T, out)."""
        u, s, vh = self.f[target][li]
        scale = (s * self.z[target][li]).to(x.dtype)  # (R,)
        return F.linear(F.linear(x, vh) * scale, u)

    def full_z(self) -> dict[str, torch.Tensor]:
        """z padded to the full spectrum, as the artifact stores it: target -> (L, r_full)."""
        out = {}
        for t, zt in self.z.items():
            full = torch.zeros(zt.shape[0], self.full[t])
            full[:, : zt.shape[1]] = zt.detach().float()
            out[t] = full
        return out


def _cast(t, dtype: torch.dtype):
    return None if t is None else t.detach().to(dtype).contiguous()


def _train_layer(
    hf, li: int, dtype: torch.dtype, int4: bool, q4_err: dict | None, q4_abs: dict | None = None
) -> TrainLayer:
    """Layer li's frozen weights for the trainer: the 16-bit copies, their int8 fake-quantised
    twins and (int4 registered) their Q4_1 twins (`TrainModel`'s q4_err says how)."""
    layer = hf.model.layers[li]

    def get(t: str) -> torch.Tensor:
        return target_module(hf, li, t).weight.detach().float()

    def cast(t):
        return _cast(t, dtype)

    def fq(w):
        return cast(fake_quant_weight(w))

    def q4(names: tuple[str, ...], w: torch.Tensor):
        if q4_abs is not None:  # the base's blocks as they are (int4 "plain": no z on int4)
            return cast(torch.cat([q4_abs[(li, n)] for n in names]))
        if q4_err is None:
            return cast(fake_quant_q4(w))
        return cast(w + torch.cat([q4_err[(li, n)] for n in names]))

    at = layer.self_attn
    wqkv = torch.cat([get("q_proj"), get("k_proj"), get("v_proj")])
    wgu = torch.cat([get("gate_proj"), get("up_proj")])
    wo, wd = get("o_proj"), get("down_proj")
    b = [getattr(at, n).bias for n in ("q_proj", "k_proj", "v_proj")]
    bqkv = None if b[0] is None else torch.cat([x.detach().float() for x in b])
    qn = getattr(at, "q_norm", None)
    kn = getattr(at, "k_norm", None)
    return TrainLayer(
        ln1=cast(layer.input_layernorm.weight),
        ln2=cast(layer.post_attention_layernorm.weight),
        wqkv=cast(wqkv),
        bqkv=cast(bqkv),
        wo=cast(wo),
        wgu=cast(wgu),
        wdown=cast(wd),
        fq_qkv=fq(wqkv),
        fq_o=fq(wo),
        fq_gu=fq(wgu),
        fq_down=fq(wd),
        q_norm=cast(qn.weight) if qn is not None else None,
        k_norm=cast(kn.weight) if kn is not None else None,
        fq4={
            "qkv": q4(("q_proj", "k_proj", "v_proj"), wqkv),
            "o": q4(("o_proj",), wo),
            "gu": q4(("gate_proj", "up_proj"), wgu),
            "down": q4(("down_proj",), wd),
        }
        if int4
        else None,
    )


class TrainModel:
    """Frozen base weights + the forward the trainer differentiates."""

    def __init__(self, hf, dtype: torch.dtype, q4_err: dict | None = None, q4_abs=None):
        """hf: the (frozen) model; q4_err: {(layer, target): Q4_1(W) - W} of the weights *before*
        an adapter's z was merged into hf (`--base-z`), so the int4 copy is the base's 4-bit
        blocks plus z's change beside them, as the runtime's int4 path runs it (int4.py
        "lowrank"); None: the int4 copy is Q4_1 of hf's weights as they are. q4_abs:
        {(layer, target): the base's Q4_1 weights}, used as they are (int4 "plain")."""
        check_layout(hf)
        self.spec: ModelSpec = spec_of(hf)
        self.dtype = dtype

        int4 = reg.find("int4") is not None
        self.layers: list[TrainLayer] = [
            _train_layer(hf, li, dtype, int4, q4_err, q4_abs) for li in range(len(hf.model.layers))
        ]
        self.embed = _cast(hf.model.embed_tokens.weight, dtype)
        self.lm_head = _cast(hf.lm_head.weight, dtype)
        self.norm = _cast(hf.model.norm.weight, dtype)
        self.rotary = hf.model.rotary_emb

    def rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(n)[None, :]
        with torch.no_grad():
            cos, sin = self.rotary(torch.zeros(1, 1), pos)  # (1, T, hd)
        return cos[0, :, None, :].to(self.dtype), sin[0, :, None, :].to(self.dtype)  # (T,1,hd)


def st_gumbel(logits: torch.Tensor, tau: float, gen: torch.Generator | None) -> torch.Tensor:
    """Straight-through Gumbel-softmax: one-hot forward, soft gradient. (N, P) -> (N, P)."""
    u = torch.rand(logits.shape, generator=gen).clamp_(1e-9, 1 - 1e-9)
    soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


@dataclass
class ForwardOut:
    ce: torch.Tensor  # scalar, mean over summary tokens
    e_bar: torch.Tensor  # scalar, expected joules of the gated units + fixed costs
    fp16_share: torch.Tensor  # scalar, expected share of units on fp16 (the TABS FLOP term)
    counts: torch.Tensor  # (L, P) hard path counts (all tokens)


def _zdelta(zmod: SpectralZ | None, h: torch.Tensor, li: int, targets: tuple[str, ...]):
    """The spectral adapter's x V diag(s z) U^T for `targets` side by side (0.0 without z)."""
    if zmod is None:
        return 0.0
    return torch.cat([zmod.delta(h, li, t) for t in targets], dim=-1)


def _lin(lw: TrainLayer, kind: str, x: torch.Tensor, name: str, bias=None) -> torch.Tensor:
    """Product `name` (qkv, o, gu, down) of x (T, K) on weight `kind`: dense 16-bit, int8 (rows
    and weights fake-quantised), int4 (Q4_1 fake-quantised weights, rows as they are)."""
    if kind == "int8":
        w = {"qkv": lw.fq_qkv, "o": lw.fq_o, "gu": lw.fq_gu, "down": lw.fq_down}[name]
        return F.linear(fake_quant_rows(x), w, bias)
    if kind == "int4":
        return F.linear(x, lw.fq4[name], bias)
    return F.linear(x, {"qkv": lw.wqkv, "o": lw.wo, "gu": lw.wgu, "down": lw.wdown}[name], bias)


def _kinds(lw: TrainLayer, g: dict) -> tuple[str, ...]:
    """The weight kinds this layer has copies of (int4 where it was registered at build time)
    that some unmasked path runs on (the keys of `g`): a kind no allowed path uses has a gate of
    exactly 0 and a zero gradient, so it is not computed."""
    have = ("dense16", "int8", "int4") if lw.fq4 is not None else ("dense16", "int8")
    return tuple(k for k in have if k in g)


def _proj(lw: TrainLayer, g: dict, x: torch.Tensor, name: str, bias=None) -> torch.Tensor:
    """sum over weight kinds of g[kind] (T, 1) x that kind's product (`_lin`) of x (T, K)."""
    return sum(g[k] * _lin(lw, k, x, name, bias) for k in _kinds(lw, g))


def _attention(
    tm: TrainModel, li: int, zmod, x, h, g: dict, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """x + the attention block of layer li: projections on each row's `proj` kind (g: kind ->
    (T, 1) gates); attention itself at 16-bit for every row. x, h: (T, d)."""
    s, lw, (cos, sin) = tm.spec, tm.layers[li], rope
    T = x.shape[0]
    d_qkv = _zdelta(zmod, h, li, ("q_proj", "k_proj", "v_proj"))
    qkv = _proj(lw, g, h, "qkv", lw.bqkv) + d_qkv  # (T, q + 2kv)
    q = qkv[:, : s.q_dim].view(T, s.n_heads, s.head_dim)
    k = qkv[:, s.q_dim : s.q_dim + s.kv_dim].view(T, s.n_kv_heads, s.head_dim)
    v = qkv[:, s.q_dim + s.kv_dim :].view(T, s.n_kv_heads, s.head_dim)
    if lw.q_norm is not None:
        q, k = rms_norm(q, lw.q_norm, s.eps), rms_norm(k, lw.k_norm, s.eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        is_causal=True,
        enable_gqa=True,
    )  # (1, H, T, hd)
    a = a[0].transpose(0, 1).reshape(T, s.q_dim)
    return x + _proj(lw, g, a, "o") + _zdelta(zmod, a, li, ("o_proj",))


def _mlp(tm: TrainModel, li: int, zmod, x, g: dict) -> torch.Tensor:
    """x + the MLP of layer li on each row's `mlp` kind (g: kind -> (T, 1) gates): dense,
    fake-quantised int8, Q4_1 int4; nothing for skip rows (their residual passes). x: (T, d)."""
    s, lw = tm.spec, tm.layers[li]
    m = rms_norm(x, lw.ln2, s.eps)  # (T, d)
    d_gu = _zdelta(zmod, m, li, ("gate_proj", "up_proj"))
    y = 0.0
    for kind in _kinds(lw, g):
        gu = _lin(lw, kind, m, "gu") + d_gu  # (T, 2I) on this kind alone
        act = F.silu(gu[:, : s.intermediate]) * gu[:, s.intermediate :]  # (T, I)
        y = y + g[kind] * (_lin(lw, kind, act, "down") + _zdelta(zmod, act, li, ("down_proj",)))
    return x + y


def _gate(gate: torch.Tensor, on: list[int], dt: torch.dtype) -> torch.Tensor:
    """(T, P) gates -> (T, 1) their sum over the paths `on` (zeros where none), in dt."""
    return gate[:, on].sum(-1, keepdim=True).to(dt)


def forward(
    tm: TrainModel,
    ctl: nn.Module,
    zmod: SpectralZ | None,
    prompt: list[int],
    summary: list[int],
    beta: float,
    tau: float,
    mask: torch.Tensor,
    unit_cost: tuple[torch.Tensor, torch.Tensor],
    fixed_j: float,
    gen: torch.Generator | None,
) -> ForwardOut:
    """Teacher-forced pass over prompt + summary[:-1]; CE on the summary tokens.

    mask: (P,) additive logits (0 or NEG); unit_cost: (L, P) prefill and decode J per unit.
    The gates mix each kind of linear work by the registry's paths (hest_core/paths.py).
    """
    s, dt = tm.spec, tm.dtype
    ids = torch.tensor(prompt + summary[:-1])
    P, T = len(prompt), len(prompt) + len(summary) - 1
    rope = tm.rope(T)
    x = tm.embed[ids]  # (T, d)
    betas = torch.full((T,), beta)
    decode = torch.zeros(T, 1)
    decode[P:] = 1.0  # (T, 1): rows after the prompt are decode steps
    e_bar = torch.zeros(())
    fp16 = torch.zeros(())
    counts = torch.zeros(s.n_layers, mask.shape[0])
    allowed = {i for i in range(mask.shape[0]) if float(mask[i]) == 0.0}
    # weight kinds some allowed path runs on (a masked path's gate is exactly 0)
    proj_kinds = [k for k in reg.KINDS if allowed & set(reg.with_proj(k))]
    mlp_kinds = [k for k in reg.KINDS if allowed & set(reg.with_mlp(k))]
    for li, lw in enumerate(tm.layers):
        h = rms_norm(x, lw.ln1, s.eps)  # (T, d) the controller's h(l, t)
        logits = ctl(h, li, betas, decode[:, 0]) + mask  # (T, P) fp32
        probs = torch.softmax(logits, dim=-1)
        gate = st_gumbel(logits, tau, gen)  # (T, P)
        counts[li] = gate.detach().sum(0)
        cost = probs * (unit_cost[0][li] * (1 - decode) + unit_cost[1][li] * decode)
        e_bar = e_bar + cost.sum()
        fp16 = fp16 + probs[:, reg.ref()].mean()
        # (T, 1) gates per weight kind: projections (fp16 16-bit; int8 and skip int8; int4),
        # MLP (fp16 16-bit; int8; int4; skip: none)
        g_proj = {k: _gate(gate, reg.with_proj(k), dt) for k in proj_kinds}
        g_mlp = {k: _gate(gate, reg.with_mlp(k), dt) for k in mlp_kinds}
        x = _attention(tm, li, zmod, x, h, g_proj, rope)
        x = _mlp(tm, li, zmod, x, g_mlp)

    xs = rms_norm(x[P - 1 :], tm.norm, s.eps)  # (S, d) rows that predict the summary
    logits = F.linear(xs, tm.lm_head).float()  # (S, V)
    ce = F.cross_entropy(logits, torch.tensor(summary))
    return ForwardOut(ce, e_bar + fixed_j, fp16 / s.n_layers, counts)
