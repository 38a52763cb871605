"""Baseline `lora-r8`: PEFT LoRA (r=8) on the same seven targets, trained on CE only.

Same data order, truncation and step count as the HEST trainer. At the end the adapter is merged
into the base weights and saved as a local Hugging Face model (`OUT/merged/`, bf16 safetensors
+ tokenizer); evaluation loads it as a model path with the Engine's `fp16` policy and the base
model's calibration table. Resumable like the HEST trainer (`OUT/ckpt.pt`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from hest_core.loading import load_hf_model, load_tokenizer
from hest_core.model import TARGETS

from .data import load_pairs


def _batch_loss(model, examples, dtype) -> tuple[torch.Tensor, float]:
    total = torch.zeros(())
    for ex in examples:
        ids = torch.tensor([ex.prompt + ex.summary])  # (1, T)
        labels = ids.clone()
        labels[0, : len(ex.prompt)] = -100  # CE on summary tokens only
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=ids, labels=labels)
        total = total + out.loss.float()
    return total / len(examples), float(total.detach()) / len(examples)


def train_lora(args) -> Path:
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from .train import Batches, save_checkpoint, truncate_log

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    tok = load_tokenizer(args.model, progress)
    hf = load_hf_model(args.model, progress, seed=args.seed)
    name = hf.config.name_or_path
    cfg = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), bias="none"
    )
    model = get_peft_model(hf, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lora_lr)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batches = Batches(load_pairs(args.data, args.limit), tok, args)
    ckpt, log = out / "ckpt.pt", out / "log.jsonl"
    start, wall0 = 0, 0.0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["lora"], strict=False)
        opt.load_state_dict(st["opt"])
        start, wall0 = st["step"], st.get("wall_s", 0.0)
        print(f"[train] resuming lora-r8 from step {start}", flush=True)
    truncate_log(log, start)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        disable=not progress,
        desc="lora-r8",
        dynamic_ncols=True,
    )
    for step in bar:
        loss, ce = _batch_loss(model, batches.get(step), dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = {
            "step": step,
            "r": 1.0,
            "loss": ce,
            "ce": ce,
            "e_ratio": 1.0,
            "share_fp16": 1.0,
            "share_int8": 0.0,
            "share_skip": 0.0,
            "lambdas": {},
        }
        with log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(ce=f"{ce:.3f}")
        done = step + 1
        if done % args.ckpt_every == 0 or done == args.steps:
            lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
            wall = wall0 + time.perf_counter() - t0
            save_checkpoint(
                ckpt, {"step": done, "lora": lora, "opt": opt.state_dict(), "wall_s": wall}
            )
    bar.close()
    from .plots import plot_curves

    plot_curves(log, out / "curves.png")
    merged = model.merge_and_unload()
    merged.config.name_or_path = f"{name}+lora-r8"
    dst = out / "merged"
    merged.to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    (dst / "hest_training.json").write_text(
        json.dumps(
            {
                "method": "lora-r8",
                "command": "python -m training.train " + " ".join(sys.argv[1:]),
                "steps": args.steps,
                "seed": args.seed,
                "wall_s": round(wall0 + time.perf_counter() - t0, 1),
            },
            indent=1,
        )
    )
    return dst
