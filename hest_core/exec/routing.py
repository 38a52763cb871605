"""Path decisions inside a forward: a `Decider` picks a path per row of each layer, `Routing`
groups the rows of one layer by the path they took (`paths.py`: the registry's indices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import paths as reg


@dataclass
class Routing:
    """Rows of one layer grouped by path (indices of the registry, `paths.py`). `only` is set
    when every row took one path; `idx[p]` (n_p,) are the rows on path p (None: none)."""

    paths: torch.Tensor  # (N,) int64
    only: int | None
    idx: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def of(cls, paths: torch.Tensor, counts: list[int]) -> Routing:
        """paths (N,) path indices, counts (P,) rows per path."""
        n = paths.shape[0]
        for p, c in enumerate(counts):
            if c == n:
                return cls(paths=paths, only=p)
        idx = [(paths == p).nonzero().squeeze(1) if c else None for p, c in enumerate(counts)]
        return cls(paths=paths, only=None, idx=idx)

    def rows(self, on: list[int]) -> torch.Tensor | None:
        """(n,) the rows on any of the paths `on` (in path order), None where there are none."""
        parts = [self.idx[p] for p in on if self.idx[p] is not None]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# decide(layer, h) -> (paths (N,) int64, counts (P,)) ; h is the normalised attention input
Decider = Callable[[int, torch.Tensor], tuple[torch.Tensor, list[int]]]


def const_decider(path: int) -> Decider:
    """Every unit on one path (calibration, benchmarks, warm-up)."""

    def decide(li: int, h: torch.Tensor):
        n = h.shape[0]
        paths = torch.full((n,), path, dtype=torch.long, device=h.device)
        return paths, reg.one_hot(path, n)

    return decide
