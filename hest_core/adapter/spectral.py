"""The spectral adapter: W' = U diag(s * (1 + z)) V^T, merged in delta form W + U diag(s z) V^T.

The SVD of every target weight is computed once per base model and cached under
`$HEST_CACHE_DIR/svd/<fingerprint>.safetensors`. z = 0 is exact: nothing is merged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..cachedirs import cache_dir
from ..config import RuntimeConfig
from ..exec.weights import TARGETS, merge_delta, target_module

log = logging.getLogger("hest.spectral")


def spectrum_sizes(hf) -> dict[str, int]:
    """Length of z per target: min(out, in) of each weight."""
    return {t: min(target_module(hf, 0, t).weight.shape) for t in TARGETS}


class SvdCache:
    """U (out, r), S (r,), Vh (r, in) per (layer, target), fp32, computed lazily and cached."""

    def __init__(
        self,
        hf,
        fingerprint: str,
        progress: bool = True,
        keep: int | None = None,
        config: RuntimeConfig | None = None,
    ):
        """keep: store only the top `keep` singular directions (all when None); cached under the
        cache directory of `config` (None: from the environment)."""
        self.hf, self.fp, self.keep = hf, fingerprint, keep
        name = fingerprint if keep is None else f"{fingerprint}-top{keep}"
        self.path = cache_dir(config) / "svd" / f"{name}.safetensors"
        self._t: dict[str, torch.Tensor] | None = None
        self.progress = progress

    def _compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        n = len(self.hf.model.layers)
        t0 = time.perf_counter()
        if self.progress:
            print(f"[hest] computing SVD of {n * len(TARGETS)} weights (cached after)", flush=True)
        for li in range(n):
            for t in TARGETS:
                w = target_module(self.hf, li, t).weight.detach().float()
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                k = s.numel() if self.keep is None else min(self.keep, s.numel())
                out[f"{li}.{t}.U"] = u[:, :k].contiguous()
                out[f"{li}.{t}.S"] = s[:k].contiguous()
                out[f"{li}.{t}.Vh"] = vh[:k].contiguous()
        log.info("SVD took %.1f s", time.perf_counter() - t0)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._t is None:
            from safetensors.torch import load_file, save_file

            if self.path.is_file():
                self._t = load_file(str(self.path))
            else:
                self._t = self._compute()
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                save_file(self._t, str(tmp))
                tmp.replace(self.path)
        return self._t

    def factors(self, li: int, target: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.tensors()
        return t[f"{li}.{target}.U"], t[f"{li}.{target}.S"], t[f"{li}.{target}.Vh"]


def merge_into(hf, z: dict[str, torch.Tensor], svd: SvdCache) -> None:
    """Merge z into `hf`'s target weights in place (W <- W + U diag(s z) V^T, `make_weight_fn`'s
    merge), for tools and trainers that run the served weights through the HF model."""
    fn = make_weight_fn(z, svd)
    with torch.no_grad():
        for li in range(len(hf.model.layers)):
            for t in z:
                m = target_module(hf, li, t)
                m.weight.copy_(fn(li, t, m.weight.detach().float()).to(m.weight.dtype))


def z_support(z: dict[str, torch.Tensor]) -> int:
    """How many leading singular directions any z touches (trailing zeros need no factors)."""
    keep = 0
    for zt in z.values():
        cols = (zt != 0).any(0).nonzero()
        if cols.numel():
            keep = max(keep, int(cols.max()) + 1)
    return keep


def make_weight_fn(z: dict[str, torch.Tensor], svd: SvdCache):
    """weight_fn for `build_lean`: merges z[target][layer] into each weight where z != 0."""
    nonzero = {t: [bool(row.abs().max() > 0) for row in zt] for t, zt in z.items()}

    def fn(li: int, target: str, w: torch.Tensor) -> torch.Tensor:
        if target not in z or not nonzero[target][li]:
            return w
        u, s, vh = svd.factors(li, target)
        zt = z[target][li].float()
        if zt[s.numel() :].abs().sum() > 0:
            raise ValueError(
                f"z of {target} reaches past the {s.numel()} cached singular directions"
            )
        return w + merge_delta(u, s, vh, zt[: s.numel()])

    return fn
