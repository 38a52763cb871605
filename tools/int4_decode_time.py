"""Decode time of the int4 path's two ways of serving the adapter's z (issue 13), on the PyTorch
loop, against fp16 and int8 on the same loop (the fused layer is off while int4 is registered).

    python tools/int4_decode_time.py [--steps 24 --ctx 550 --rounds 2]

The default model with the default adapter; `int4.attach` rebuilt for "lowrank" and "merged" in
turn; per round the median ms per decode step (batch 1). Timings are only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hest_core import Engine
from hest_core import paths as reg
from hest_core.adapter.artifact import DEFAULT_ADAPTER_DIR, load_adapter
from hest_core.adapter.spectral import SvdCache, z_support
from hest_core.exec.gguf_blocks import read_gguf_q4
from hest_core.exec.int4 import MODES, attach
from hest_core.exec.kvcache import SeqSlot
from hest_core.exec.loading import fingerprint, load_hf_model
from hest_core.exec.routing import const_decider

FOUR = ("fp16", "int8", "int4", "skip")


def step_ms(lean, path: int, ctx: int, steps: int) -> float:
    """Median ms of `steps` decode steps on `path` after a ctx-token fp16 prefill."""
    cache = lean.new_cache(1, ctx + steps + 1)
    ids = torch.randint(0, lean.spec.vocab, (ctx,))
    ts = []
    with torch.inference_mode():
        pre = const_decider(reg.FP16)
        lean.forward(ids, torch.arange(ctx), [SeqSlot(0, ctx, 0, 0)], cache, pre, False)
        dec = const_decider(path)
        for i in range(steps):
            t0 = time.perf_counter()
            pos = torch.tensor([ctx + i])
            lean.forward(torch.tensor([5]), pos, [SeqSlot(0, 1, 0, ctx + i)], cache, dec, True)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=550)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calibration", default=None, help="a table with an int4 column")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    e = Engine.from_pretrained(
        "default", policy="int4", calibration=a.calibration, progress=False, paths=FOUR
    )
    hf = load_hf_model("default", False)
    z = load_adapter(DEFAULT_ADAPTER_DIR).z
    svd = SvdCache(hf, fingerprint(hf), False, keep=z_support(z))
    gguf = read_gguf_q4()
    res: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for mode in MODES:
            attach(e.lean, hf, gguf, z, svd, mode=mode)
            res.setdefault(f"int4 {mode}", []).append(
                step_ms(e.lean, reg.index("int4"), a.ctx, a.steps)
            )
        for name in ("fp16", "int8"):
            res.setdefault(name, []).append(step_ms(e.lean, reg.index(name), a.ctx, a.steps))
    for k, v in res.items():
        print(f"{k}: {', '.join(f'{x:.1f}' for x in v)} ms/step (per round)", flush=True)


if __name__ == "__main__":
    main()
