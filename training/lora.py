"""The trainer of the `lora-r8` baseline: PEFT LoRA (r=8, alpha 16) on the seven targets, CE only.

Same data order, truncation, step count, checkpoints and log as the gated trainers (it runs in
training/loop.py). When the command ends the adapter is merged into the base weights and saved
as a local Hugging Face model (`OUT/merged/`, bf16 safetensors + tokenizer + `hest_training.json`);
evaluation loads it as a model path with the Engine's `fp16` policy and the base model's
calibration table. Needs `peft` (the `train` extra), imported when a LoRA run starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from hest_core import paths as reg
from hest_core.dtypes import resolve_dtype
from hest_core.exec.loading import load_hf_model, load_tokenizer
from hest_core.exec.weights import TARGETS, ModelSpec

from .data import Batches, Example
from .objective import Method

RANK, ALPHA = 8, 16


def lora_params(spec: ModelSpec, rank: int = RANK) -> int:
    """Trainable parameters of LoRA on the seven targets: rank (in + out) per target and layer."""
    s = spec
    dims = [
        (s.hidden, s.q_dim),
        (s.hidden, s.kv_dim),
        (s.hidden, s.kv_dim),
        (s.q_dim, s.hidden),
        (s.hidden, s.intermediate),
        (s.hidden, s.intermediate),
        (s.intermediate, s.hidden),
    ]
    return s.n_layers * sum(rank * (i + o) for i, o in dims)


class LoraTrainer:
    """PEFT LoRA on a frozen base; the loop's Trainer (training/loop.py)."""

    def __init__(self, method: Method, args: argparse.Namespace):
        from peft import LoraConfig, get_peft_model  # optional: the `train` extra

        self.method, self.args = method, args
        progress = not args.no_progress
        self.tok = load_tokenizer(args.model, progress)
        hf = load_hf_model(args.model, progress, seed=args.seed)
        self.base_name = hf.config.name_or_path
        cfg = LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none"
        )
        self.model = get_peft_model(hf, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lora_lr)
        self.dtype = resolve_dtype(args.dtype, torch.device("cpu"))
        self.batches = Batches.from_args(args, self.tok)
        self.model.train()

    def _loss(self, examples: list[Example]) -> tuple[torch.Tensor, float]:
        """Mean CE over the summary tokens of a batch: (loss to backward, its value)."""
        total = torch.zeros(())
        for ex in examples:
            ids = torch.tensor([ex.prompt + ex.summary])  # (1, T)
            labels = ids.clone()
            labels[0, : len(ex.prompt)] = -100  # CE on summary tokens only
            with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
                out = self.model(input_ids=ids, labels=labels)
            total = total + out.loss.float()
        return total / len(examples), float(total.detach()) / len(examples)

    def step(self, step: int) -> dict:
        loss, ce = self._loss(self.batches.get(step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        shares = {f"share_{p}": float(p == reg.REFERENCE) for p in reg.names()}  # all fp16
        return {"r": 1.0, "loss": ce, "ce": ce, "e_ratio": 1.0, **shares, "lambdas": {}}

    def state_dict(self) -> dict:
        lora = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        return {"lora": lora, "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["lora"], strict=False)
        self.opt.load_state_dict(state["opt"])

    def checkpoint(self, out: Path, done: int, wall_s: float) -> None:
        """Nothing beyond the checkpoint: merging (270 MB for the default model) waits for the end."""

    def finish(self, out: Path, done: int, wall_s: float) -> Path:
        merged = self.model.merge_and_unload()
        merged.config.name_or_path = f"{self.base_name}+{self.method.name}"
        dst = out / "merged"
        merged.to(torch.bfloat16).save_pretrained(dst)
        self.tok.save_pretrained(dst)
        record = {
            "method": self.method.name,
            "command": "python -m training.train " + " ".join(sys.argv[1:]),
            "steps": done,
            "seed": self.args.seed,
            "wall_s": round(wall_s, 1),
        }
        (dst / "hest_training.json").write_text(json.dumps(record, indent=1))
        return dst
