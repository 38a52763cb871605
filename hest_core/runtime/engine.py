"""The public runtime: `Engine.from_pretrained(...)`, `engine.generate([...])`."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
import time
from pathlib import Path

import torch

from .. import paths as reg
from ..adapter.artifact import DEFAULT_ADAPTER_DIR, HestAdapter, load_adapter
from ..adapter.controller import Controller
from ..adapter.spectral import SvdCache, make_weight_fn, z_support
from ..config import RuntimeConfig
from ..dtypes import dtype_name, resolve_device, resolve_dtype
from ..energy.meters import pick_meter
from ..energy.model import EnergyModel
from ..errors import HestError
from ..exec import native
from ..exec.compiled import enable_compile
from ..exec.kvcache import SeqSlot
from ..exec.loading import DEFAULT_MODEL, build_lean, fingerprint, load_hf_model, load_tokenizer
from ..exec.routing import const_decider
from .admission import admit
from .decoding import TokenTexts
from .guard import MODES
from .prompt import stop_token_ids
from .request import (  # the request types live in request.py; re-exported here
    GenerationRequest,
    GenerationResult,
    PreparedRequest,
    RequestStats,  # noqa: F401  (re-exported)
)
from .scheduler import (
    DECODE_STEPS_PER_CHUNK,
    DEFAULT_MAX_ROWS,
    DEFAULT_PREFILL_TOKENS,
    Scheduler,
)

log = logging.getLogger("hest.engine")


def policies() -> tuple[str, ...]:
    """The policies: `hest` (controller + guard) and one fixed policy per registered path (every
    unit on it; `skip` is for benchmarks only)."""
    return ("hest", *reg.names())


# the one owner of each request default (the server's settings default to these)
DEFAULT_BUDGET_RATIO = 0.6
DEFAULT_MAX_NEW_TOKENS = 128
# the most positions an engine serves (the model's own limit if lower): rope tables and a long
# prompt's prefill stay bounded; SmolLM2-135M reads 8,192
MAX_CONTEXT = 32768


class Engine:
    def __init__(
        self,
        *,
        tokenizer,
        lean,
        controller,
        energy,
        meter,
        policy,
        guard_mode,
        info,
        config=None,
        read_ratio=None,
        plan_ratio=None,
        plan_from=None,
        plan_slope=None,
    ):
        self.tokenizer, self.lean, self.controller = tokenizer, lean, controller
        self.energy: EnergyModel = energy
        # where this device's costs break the quality order (int8 dearer than fp16 on a GPU at
        # batch 1, say), the path the controller picks is replaced by the better one that costs
        # no more; per phase: (per-layer tuples, the same as an (L, P) index tensor)
        subs = energy.substitutions()
        self.path_sub = {
            ph: (rows, torch.tensor(rows, dtype=torch.long, device=lean.device))
            for ph, rows in energy.sub.items()
            if ph in subs
        }
        self.meter = meter
        self.config: RuntimeConfig = config or RuntimeConfig()
        self.policy, self.guard_mode = policy, guard_mode
        # the one path of a fixed policy whose budget stops it (guard "stop"); None otherwise
        self.stop_path = reg.index(policy) if guard_mode == "stop" else None
        self.device = lean.device
        self._info = info
        if policy == "hest" and subs:
            self._info["path_substitutions"] = subs
        # whole documents by default: the prompt may use the context minus the requested output
        self.max_article_tokens: int | None = None
        # HEST's read plan: at most this share of a request's all-fp16 cost is planned for
        # reading (the adapter's `read_ratio`, reading.policy_read_budget_q); None: the budget's
        self.read_ratio: float | None = read_ratio if policy == "hest" else None
        # HEST's budget plan (the adapter's `plan_ratio` and `plan_from`, reading.plan_budget_q):
        # a budget of at least plan_from x a request's all-fp16 cost is planned as plan_ratio x
        # it; the guard keeps the real budget. None: the real budget
        self.plan_ratio: float | None = plan_ratio if policy == "hest" else None
        self.plan_from: float | None = plan_from if policy == "hest" else None
        # below the plan's start the plan falls as (r / start) ** plan_slope x start (None: r)
        self.plan_slope: float | None = plan_slope if policy == "hest" else None
        self.context_tokens = lean.rope_cos.shape[0]  # positions this engine serves
        self.default_max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        self.max_new_tokens_limit = 512
        self.max_input_chars = 200_000
        self.default_budget_ratio = DEFAULT_BUDGET_RATIO
        self._lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()  # check() may run while generate() runs elsewhere
        self.token_texts = TokenTexts(tokenizer)  # token id -> text and bytes (logprobs)
        self.eos_ids = stop_token_ids(tokenizer)  # training ends targets on one of them (prompt.py)
        # tokens that end a sentence on their own (clean endings steer towards them, endings.py)
        ends = (tokenizer.convert_tokens_to_ids(t) for t in (".", "!", "?"))
        self.sentence_end_ids = [
            t for t in ends if isinstance(t, int) and t != tokenizer.unk_token_id
        ]

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        adapter: str | Path | HestAdapter | None = "default",
        *,
        device: str = "cpu",
        dtype: str = "auto",
        policy: str = "hest",
        guard: str = "hard",
        calibration: str | Path | None = None,
        meter: str | None = None,
        threads: int | None = None,
        compile: bool | None = None,
        progress: bool = True,
        config: RuntimeConfig | None = None,
        paths: tuple[str, ...] | list[str] | None = None,
    ) -> Engine:
        """Load a model (and adapter) into an engine. `config`: the runtime configuration (None:
        `RuntimeConfig.from_env()`); `threads`, `compile`, `meter`, `calibration` and `paths`
        (e.g. ("fp16", "int8", "int4", "skip"): opt in to int4, registered for the process)
        given here win over it. Raises HestError (bad policy/guard), ConfigError (bad paths),
        MeterUnavailableError, ModelLoadError, AdapterMismatchError, CalibrationError (a table
        without a column per path: recalibrate)."""
        cfg = cls._config_of(config, paths, adapter, model)
        reg.enable(cfg.paths)
        cls._check_policy(policy, guard)
        if threads or cfg.threads:
            torch.set_num_threads(threads or cfg.threads)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        # before the slow load: a bad explicit meter fails fast
        m = pick_meter(dev.type, meter or cfg.meter, cfg.nominal_watts)
        t0 = time.perf_counter()
        tok = load_tokenizer(model, progress, cfg)
        hf = load_hf_model(model, progress, config=cfg)
        fp = fingerprint(hf)
        ad = cls._resolve_adapter(adapter, model)
        compile = cfg.compile if compile is None else compile
        lean, int4_info = cls._build(hf, fp, model, ad, dev, dt, cfg, progress, compile)
        ctl = ad.controller if ad is not None else Controller(lean.spec.hidden, lean.spec.n_layers)
        ctl = ctl.to(dev).eval()
        table = cls._table(lean, fp, calibration, m, progress, cfg)
        del hf
        info = cls._info_of(lean, fp, adapter, ad, dev, dt, policy, guard, m, table, ctl)
        own = ad is not None and policy == "hest"
        read_ratio = ad.config.read_ratio if own else None
        plan_ratio = ad.config.plan_ratio if own else None
        plan_from = ad.config.plan_from if own else None
        plan_slope = ad.config.plan_slope if own else None
        info.update(
            compiled_decode=bool(compile),
            int4=int4_info,
            read_ratio=read_ratio,
            plan_ratio=plan_ratio,
            plan_from=plan_from,
        )
        info["load_s"] = round(time.perf_counter() - t0, 2)
        return cls(
            tokenizer=tok,
            lean=lean,
            controller=ctl,
            energy=cls._energy_of(table, ctl, controlled=reg.find(policy) is None),
            meter=m,
            policy=policy,
            # a fixed policy keeps a budget only by stopping (guard "stop"), or ignores it
            guard_mode=guard if policy == "hest" or guard in ("stop", "off") else "off",
            info=info,
            config=cfg,
            read_ratio=read_ratio,
            plan_ratio=plan_ratio,
            plan_from=plan_from,
            plan_slope=plan_slope,
        )

    @classmethod
    def _config_of(cls, config, paths, adapter, model) -> RuntimeConfig:
        """The configuration to run under: `config` (None: from the environment) with `paths`
        and the adapter's own paths (which it may choose) in its path set."""
        cfg = config or RuntimeConfig.from_env()
        if paths is not None:
            cfg = dataclasses.replace(cfg, paths=tuple(paths))  # validated (ConfigError)
        # an adapter's paths are registered even where the path set (HEST_PATHS, `paths`) leaves
        # them out: its controller chooses them (docs/runtime.md, "The int4 path")
        if extra := [p for p in cls._adapter_paths(adapter, model) if p not in cfg.paths]:
            log.info(
                "the adapter was trained with %s: registering it beside the paths asked for (%s)",
                ", ".join(extra),
                ",".join(cfg.paths),
            )
            cfg = dataclasses.replace(cfg, paths=(*cfg.paths, *extra))
        return cfg

    @staticmethod
    def _table(lean, fp, calibration, m, progress, cfg):
        """The calibration table the engine runs under (`calibrate.resolve`), its kernel choices
        applied to the model."""
        from ..energy import (
            calibrate as calib,  # lazy: `python -m hest_core.energy.calibrate` runs it as __main__
        )
        from ..energy.calib_lowrank import rescale_table

        table = calib.resolve(lean, fp, calibration, m, progress, cfg)
        calib.apply_kernel_choices(lean, table)
        # the adapter's low-rank term beside the int4 blocks costs what the table's model's did not
        return rescale_table(table, lean, m)

    @staticmethod
    def _energy_of(table, ctl, controlled: bool = False) -> EnergyModel:
        """The energy model of `table` (charging the controller's work where `controlled`: a
        controller policy), its unit costs handed to a controller that reads this device's
        relative costs."""
        em = EnergyModel(table, controlled=controlled)
        if hasattr(ctl, "set_costs"):
            ctl.set_costs(torch.tensor(em.unit["prefill"]), torch.tensor(em.unit["decode"]))
        return em

    @staticmethod
    def _info_of(lean, fp, adapter, ad, dev, dt, policy, guard, m, table, ctl) -> dict:
        """`Engine.info()`: what was loaded, on what, with which table and paths."""
        return {
            "model": lean.spec.name,
            "model_fingerprint": fp,
            "adapter": str(adapter) if ad is not None else None,
            "adapter_method": ad.config.method if ad is not None else None,
            "device": str(dev),
            "dtype": dtype_name(dt),
            "policy": policy,
            "guard": guard,
            "meter": m.name,
            "meter_description": m.describe(),
            "calibration": {k: getattr(table, k) for k in ("device", "method", "date", "source")},
            "native_kernels": native.status() if dev.type == "cpu" else "off (not a CPU device)",
            "controller_params": sum(p.numel() for p in ctl.parameters())
            if policy == "hest"
            else 0,
            "n_layers": lean.spec.n_layers,
            "paths": list(reg.names()),
            "max_context_tokens": lean.rope_cos.shape[0],
        }

    @staticmethod
    def _check_policy(policy: str, guard: str) -> None:
        """Raises HestError for an unknown policy or guard mode, or guard "stop" under "hest"."""
        if policy not in policies():
            raise HestError(f"policy={policy!r} is not one of {policies()}", param="policy")
        if guard not in MODES:
            raise HestError(f"guard={guard!r} is not one of {MODES}", param="guard")
        if guard == "stop" and policy == "hest":
            raise HestError(
                'guard="stop" is for a fixed policy (fp16, int8, skip): it never demotes, so under '
                'policy "hest" it could not keep the budget; use "hard" or "paced"',
                param="guard",
            )

    @staticmethod
    def _build(hf, fp: str, model: str, ad, dev, dt, cfg, progress: bool, compile: bool):
        """The LeanModel of `hf` with the adapter's z merged (and its shortcut), the int4 copies
        when int4 is registered, compiled decode when asked: (lean, int4 info or None). Raises
        AdapterMismatchError for an adapter made for another base model."""
        weight_fn, svd = None, None
        if ad is not None:
            from ..exec.loading import spec_of

            ad.check_compatible(spec_of(hf), fp)
            if any(float(z.abs().max()) > 0 for z in ad.z.values()):
                svd = SvdCache(hf, fp, progress, keep=z_support(ad.z), config=cfg)
                weight_fn = make_weight_fn(ad.z, svd)
        lean = build_lean(hf, dt, dev, max_positions=MAX_CONTEXT, weight_fn=weight_fn)
        lean.fused.enabled = cfg.fused
        int4_info = None
        if reg.find("int4") is not None:
            from ..exec.int4 import DEFAULT_MODE, attach_for_model

            mode = (ad.config.int4_mode if ad is not None else None) or DEFAULT_MODE
            int4_info = attach_for_model(lean, hf, model, None if ad is None else ad.z, svd, mode)
        if compile:
            enable_compile(lean)  # graphs are built on first use: call warmup()
        if ad is not None and ad.shortcut is not None:
            a, b = ad.shortcut
            for li, lw in enumerate(lean.layers):
                lw.shortcut = (a[li].to(dev, dt), b[li].to(dev, dt))
        return lean, int4_info

    @staticmethod
    def _adapter_paths(adapter, model: str) -> list[str]:
        """The paths an adapter artifact's controller was trained with (its config's `paths`;
        absent: the built-in three), read before the registry is set, so an adapter trained
        with an opt-in path (int4) registers it. [] for no adapter or one not found (loading
        reports those)."""
        if adapter is None or isinstance(adapter, HestAdapter):
            return list(adapter.config.paths) if adapter is not None else []
        d = DEFAULT_ADAPTER_DIR if str(adapter) == "default" else Path(adapter)
        if str(adapter) == "default" and model != DEFAULT_MODEL:
            return []
        try:
            cfg = json.loads((d / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return []
        got = cfg.get("paths", [])
        return [p for p in got if isinstance(p, str) and p in reg.OPTIONAL]

    @staticmethod
    def _resolve_adapter(adapter, model: str) -> HestAdapter | None:
        if adapter is None or isinstance(adapter, HestAdapter):
            return adapter
        if str(adapter) == "default":
            if model != DEFAULT_MODEL:
                return None  # the shipped adapter is for the default model only
            if not (DEFAULT_ADAPTER_DIR / "adapter_config.json").is_file():
                log.warning(
                    "no trained default adapter at %s; serving without one", DEFAULT_ADAPTER_DIR
                )
                return None
            return load_adapter(DEFAULT_ADAPTER_DIR)
        return load_adapter(adapter)

    # the HEST plan settings a caller may change on a built engine (training.evaluate's flags)
    PLAN_FIELDS = ("read_ratio", "plan_ratio", "plan_from", "plan_slope")

    def info(self) -> dict:
        """What this engine serves (model, adapter, paths, calibration, limits); the plan
        settings (`PLAN_FIELDS`) as they are now, not as loaded."""
        return dict(self._info) | {name: getattr(self, name) for name in self.PLAN_FIELDS}

    # ---- validation -------------------------------------------------------------------------------
    def check(self, r: GenerationRequest) -> PreparedRequest:
        """Validate and tokenise a request (admission.py): InvalidInputError for bad input,
        BudgetTooLowError below its minimum."""
        return admit(self, r)

    # ---- generation -------------------------------------------------------------------------------
    def generate(
        self, requests: list[GenerationRequest | PreparedRequest], on_token=None
    ) -> list[GenerationResult]:
        if not requests:
            return []
        prepared = [r if isinstance(r, PreparedRequest) else self.check(r) for r in requests]
        with self._lock:
            return self._run(prepared, on_token)

    def summarize(
        self,
        texts: list[str],
        energy_budget_ratio: float | None = None,
        energy_budget_j: float | None = None,
        max_new_tokens: int | None = None,
    ) -> list[GenerationResult]:
        reqs = [
            GenerationRequest(t, energy_budget_j, energy_budget_ratio, max_new_tokens)
            for t in texts
        ]
        return self.generate(reqs)

    def warmup(self) -> None:
        """One short generation; with compiled decode, also builds the int8 and skip graphs (at
        batch 1 and 2, so the batch dimension is compiled dynamic) before the first request."""
        self.generate(
            [GenerationRequest("Warm-up article. " * 20, energy_budget_ratio=1.0, max_new_tokens=4)]
        )
        if self.lean.compiled is None:
            return

        zeros = torch.zeros
        for batch in (1, 2):
            cache = self.lean.new_cache(batch, 8)
            slots = [SeqSlot(row0=i, n=1, cache_row=i, pos0=0) for i in range(batch)]
            ids = zeros(batch, dtype=torch.long, device=self.device)
            for path in reg.with_proj("int8"):  # the paths whose pieces are compiled
                with torch.inference_mode():
                    self.lean.forward(ids, ids, slots, cache, const_decider(path), decode=True)

    def _run(self, prepared: list[PreparedRequest], on_token) -> list[GenerationResult]:
        """One static batch: every request admitted at once into a scheduler with a row each,
        stepped until all have ended. A request whose own input fails (a budget below its
        minimum after a brownout, an error in its own per-token step) gets a result with `error`
        set and finish_reason "error"; the others are served. A failure of a batched forward
        itself raises (the whole call fails)."""
        sched = Scheduler(self, max_rows=len(prepared), reraise=True)
        tickets = [
            sched.submit(p, None if on_token is None else functools.partial(on_token, k))
            for k, p in enumerate(prepared)
        ]
        sched.run_until_idle()
        return [t.result for t in tickets]  # type: ignore[misc]

    def scheduler(
        self,
        max_rows: int = DEFAULT_MAX_ROWS,
        static: bool = False,
        prefill_tokens: int | None = DEFAULT_PREFILL_TOKENS,
        decode_steps_per_chunk: int = DECODE_STEPS_PER_CHUNK,
    ) -> Scheduler:
        """A continuous-batching scheduler on this engine (hest_core/runtime/scheduler.py): requests
        `submit`ted to it join the running batch between decode steps, at most `max_rows`
        prefilling or decoding at once (`static`: only when nothing runs, the static-batching
        baseline); prompts longer than 1,024 tokens in `prefill_tokens`-token chunks that join a
        round holding at most that many tokens (None: 1,024-token chunks, every round), their
        chunks `decode_steps_per_chunk` steps apart while others decode. Run it with `serve_forever` in one thread; it takes this engine's
        lock per step, so `generate` calls from other threads interleave between steps.
        Raises ValueError for max_rows < 1, prefill_tokens < 1 or decode_steps_per_chunk < 0."""
        return Scheduler(
            self,
            max_rows=max_rows,
            static=static,
            prefill_tokens=prefill_tokens,
            decode_steps_per_chunk=decode_steps_per_chunk,
        )

    def _nominal_watts(self) -> float:
        """The watts behind `estimated_j`: the estimate meter's, else the configured nominal."""
        return float(getattr(self.meter, "watts", None) or self.config.nominal_watts)
