"""Adapter artifacts: `adapter.safetensors` (tensors prefixed `hest_`) + `adapter_config.json`.

The config carries a format version and the base model's fingerprint; loading onto another base
model raises AdapterMismatchError.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import paths as reg
from ..errors import AdapterMismatchError, HestError
from ..exec.weights import TARGETS, ModelSpec
from .controller import NEG_LOGIT, Controller, build_controller

ADAPTER_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
# the adapter shipped for the default model (`Engine.from_pretrained(adapter="default")`)
DEFAULT_ADAPTER_DIR = Path(__file__).parent / "adapters" / "smollm2-135m-instruct"


@dataclass
class HestConfig:
    base_model: str
    base_model_fingerprint: str
    n_layers: int
    hidden: int
    k: int = 32
    shortcut_rank: int = 0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    method: str = "hest"  # hest | hest-fp16only | hest-no-dual | hest-unfactorised | bhsp | tabs
    controller: str = ""  # controller class name in CONTROLLERS ("": the method's name)
    created: str = ""
    training: dict = field(default_factory=dict)
    version: int = ADAPTER_VERSION
    # the paths its controller's outputs stand for, in order; written only when they are not the
    # built-in three (paths.py), so 3-path artifacts keep their format
    paths: list[str] = field(default_factory=lambda: list(reg.BUILTIN_NAMES))
    # the adapter's read plan (runtime/reading.py, `policy_read_budget_q`): HEST reads the longest
    # head of an article whose read plan fits in `read_ratio` x the request's all-fp16 cost, even
    # where its budget could pay for more; None: read what the budget pays for. Tuned on the
    # validation split (docs/training.md, "The read ratio"), never on test pairs
    read_ratio: float | None = None
    # the controller's budget plan (runtime/reading.py, `plan_budget_q`): a request whose budget
    # is at least `plan_from` (None: `plan_ratio`) x its all-fp16 cost is planned as if its
    # budget were `plan_ratio` x that cost, so above that point more budget buys the same
    # computation (the point where more energy buys nothing, issue 14); the guard and clean
    # endings keep the real budget. None: the real budget. Tuned on the validation split
    # (docs/training.md, "The budget plan")
    plan_ratio: float | None = None
    plan_from: float | None = None
    # below the plan's start, where the budget binds, the plan falls as (r / start) ** plan_slope
    # x start (None or 1: the real budget), so the controller's price rises faster than the
    # budget falls and it buys cheaper paths for more tokens (docs/training.md, "The budget
    # plan"); a finite number > 0
    plan_slope: float | None = None
    # how the int4 path serves z (exec/int4.py MODES): None -> int4.DEFAULT_MODE ("lowrank");
    # "plain": the base blocks without z, as the adapter was trained (`--int4-z plain`)
    int4_mode: str | None = None

    def __post_init__(self):
        for name in ("read_ratio", "plan_ratio", "plan_from"):
            r = getattr(self, name)
            if r is not None and (
                isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1
            ):
                raise HestError(
                    f"HestConfig.{name} must be None or in (0, 1], got {r!r}", param=name
                )
        r = self.plan_slope
        if r is not None and (
            isinstance(r, bool)
            or not isinstance(r, (int, float))
            or not (math.isfinite(r) and r > 0)
        ):
            raise HestError(
                f"HestConfig.plan_slope must be None or a finite number > 0, got {r!r}",
                param="plan_slope",
            )
        if self.int4_mode is not None:
            from ..exec.int4 import MODES  # lazy: only adapters that name a mode need it

            if self.int4_mode not in MODES:
                raise HestError(
                    f"HestConfig.int4_mode must be None or one of {MODES}, got {self.int4_mode!r}",
                    param="int4_mode",
                )
        if self.k <= 0:
            raise HestError(f"HestConfig.k must be > 0, got {self.k}", param="k")
        if self.shortcut_rank < 0:
            raise HestError(
                f"HestConfig.shortcut_rank must be >= 0, got {self.shortcut_rank}",
                param="shortcut_rank",
            )
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise HestError(f"HestConfig.targets has unknown {bad}; use {TARGETS}", param="targets")


@dataclass
class HestAdapter:
    config: HestConfig
    controller: torch.nn.Module
    z: dict[str, torch.Tensor]  # target -> (L, r_target) fp32
    shortcut: tuple[torch.Tensor, torch.Tensor] | None = None  # (L, R, d), (L, d, R)

    @classmethod
    def untrained(cls, spec: ModelSpec, fingerprint: str, sizes: dict[str, int], k: int = 32):
        cfg = HestConfig(
            base_model=spec.name,
            base_model_fingerprint=fingerprint,
            n_layers=spec.n_layers,
            hidden=spec.hidden,
            k=k,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        z = {t: torch.zeros(spec.n_layers, sizes[t]) for t in cfg.targets}
        return cls(cfg, Controller(spec.hidden, spec.n_layers, k), z)

    def check_compatible(self, spec: ModelSpec, fingerprint: str) -> None:
        c = self.config
        if c.base_model_fingerprint != fingerprint:
            raise AdapterMismatchError(
                f"adapter was trained for base model {c.base_model!r} (fingerprint "
                f"{c.base_model_fingerprint}) but the loaded model {spec.name!r} has fingerprint "
                f"{fingerprint}; load the matching base model or retrain the adapter",
                param="adapter",
            )
        if (c.n_layers, c.hidden) != (spec.n_layers, spec.hidden):
            raise AdapterMismatchError(
                f"adapter shape (layers={c.n_layers}, hidden={c.hidden}) does not match the model "
                f"(layers={spec.n_layers}, hidden={spec.hidden})",
                param="adapter",
            )

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: p.detach().float().contiguous() for n, p in self.controller.named_parameters()
        }
        tensors = {f"hest_controller.{n.removeprefix('hest_')}": t for n, t in tensors.items()}
        for t, zt in self.z.items():
            tensors[f"hest_z.{t}"] = zt.detach().float().contiguous()
        if self.shortcut is not None:
            tensors["hest_shortcut.a"] = self.shortcut[0].float().contiguous()
            tensors["hest_shortcut.b"] = self.shortcut[1].float().contiguous()
        save_file(tensors, str(d / WEIGHTS_FILE))
        cfg = asdict(self.config)
        cfg["paths"] = list(reg.names())  # what the controller was built with
        if tuple(cfg["paths"]) == reg.BUILTIN_NAMES:
            del cfg["paths"]
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
        return d


def load_adapter(path: str | Path) -> HestAdapter:
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise AdapterMismatchError(
            f"{d} is not a HEST adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}",
            param="adapter",
        )
    raw = json.loads((d / CONFIG_FILE).read_text())
    if raw.get("version") != ADAPTER_VERSION:
        raise AdapterMismatchError(
            f"{d}: adapter format version {raw.get('version')} is not {ADAPTER_VERSION}",
            param="adapter",
        )
    cfg = HestConfig(**raw)
    t = load_file(str(d / WEIGHTS_FILE))
    ctl = build_controller(cfg.controller or cfg.method, cfg.hidden, cfg.n_layers, cfg.k)
    state = {
        f"hest_{n.removeprefix('hest_controller.')}": v
        for n, v in t.items()
        if n.startswith("hest_controller.")
    }
    try:
        ctl.load_state_dict(_fit_paths(ctl, state, cfg.paths, d))
    except RuntimeError as err:
        raise AdapterMismatchError(f"{d}: controller tensors do not fit: {err}") from err
    z = {n.removeprefix("hest_z."): v for n, v in t.items() if n.startswith("hest_z.")}
    sc = None
    if "hest_shortcut.a" in t:
        sc = (t["hest_shortcut.a"], t["hest_shortcut.b"])
    cfg.paths = list(reg.names())
    return HestAdapter(cfg, ctl, z, sc)


def _fit_paths(ctl: torch.nn.Module, state: dict, saved: list[str], d: Path) -> dict:
    """The artifact's controller tensors laid out for the registry's paths: a tensor whose path
    dimension holds `saved` (e.g. the 3 built-ins) gets one slot per registered path, the
    artifact's values at their paths' indices, NEG_LOGIT in a0 (a path the artifact never
    learned is never chosen) and 0 elsewhere. Raises AdapterMismatchError for a saved path the
    registry does not have."""
    now = reg.names()
    if tuple(saved) == now:
        return state
    if unknown := [n for n in saved if reg.find(n) is None]:
        raise AdapterMismatchError(
            f"{d}: adapter controller uses paths {unknown} that are not registered ({now})",
            param="adapter",
        )
    own, out = ctl.state_dict(), {}
    idx = torch.tensor([reg.index(n) for n in saved])
    for n, v in state.items():
        want = own.get(n)
        out[n] = v
        if want is None or want.dim() != v.dim() or want.shape == v.shape:
            continue
        dims = [i for i, (a, b) in enumerate(zip(v.shape, want.shape, strict=True)) if a != b]
        if len(dims) != 1 or v.shape[dims[0]] != len(saved) or want.shape[dims[0]] != len(now):
            continue  # not a path dimension: load_state_dict reports it
        fill = NEG_LOGIT if n.endswith("a0") else 0.0
        out[n] = torch.full(want.shape, fill, dtype=v.dtype).index_copy_(dims[0], idx, v)
    return out
