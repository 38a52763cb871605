"""Every Prometheus metric of the server, in one place (names fixed by docs/contracts.md §3).

Each app gets its own `CollectorRegistry`, so tests can build several apps in one process. The
engine returns plain `RequestStats`; `Metrics.observe_result` turns one into samples.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from hest_core import RequestStats, path_names

OUTCOMES = ("ok", "energy_budget", "invalid", "rejected", "cancelled", "error")
REJECT_REASONS = ("queue_full", "shutting_down")
ENDPOINTS = ("summarize", "chat")

TOKEN_JOULE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
JOULE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2, 5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 300)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def co2e_g(stats, intensity_g_per_kwh: float | None) -> float | None:
    """Grams CO2e of a request: its measured joules (else the estimate meter's) x the grid
    intensity in g/kWh (1 kWh = 3.6e6 J). An estimate; None without an intensity."""
    if intensity_g_per_kwh is None:
        return None
    joules = stats.measured_j if stats.measured_j is not None else stats.estimated_j
    return joules / 3.6e6 * intensity_g_per_kwh


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.request_energy = Histogram(
            "hest_request_energy_joules",
            "Per-request energy in joules; source=modelled|measured|estimated, meter=nvml|rapl|estimate",
            ["source", "meter"],
            buckets=JOULE_BUCKETS,
            registry=r,
        )
        self.energy_total = Counter(
            "hest_energy_joules_total",
            "Total joules of answered and cancelled requests (modelled: sum of modelled_j)",
            ["source", "meter"],
            registry=r,
        )
        self.phase_energy = Histogram(
            "hest_request_phase_energy_joules",
            "Per-request modelled joules of one phase: prefill (the prompt and the first token) "
            "or decode (the later steps)",
            ["phase"],
            buckets=JOULE_BUCKETS,
            registry=r,
        )
        self.token_energy = Histogram(
            "hest_request_energy_per_token_joules",
            "Per-request modelled joules per generated token",
            buckets=TOKEN_JOULE_BUCKETS,
            registry=r,
        )
        self.co2e = Counter(
            "hest_co2e_grams_total",
            "Estimated grams CO2e: measured (else estimated) joules x the configured grid "
            "intensity (HEST_GRID_INTENSITY_G_PER_KWH); stays 0 without one",
            registry=r,
        )
        self.budget = Histogram(
            "hest_request_budget_joules",
            "Per-request energy budget in joules (after any brownout)",
            buckets=JOULE_BUCKETS,
            registry=r,
        )
        self.budget_ratio = Histogram(
            "hest_request_budget_ratio",
            "Per-request budget / modelled all-fp16 cost",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "hest_request_duration_seconds",
            "End-to-end latency of answered requests in seconds",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "hest_time_to_first_token_seconds",
            "Arrival to first generated token in seconds",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "hest_queue_wait_seconds",
            "Time a request waited in the queue before the runtime took it, in seconds",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "hest_prompt_tokens_total", "Prompt tokens processed", registry=r
        )
        self.completion_tokens = Counter(
            "hest_completion_tokens_total", "Tokens generated", registry=r
        )
        self.units = Counter(
            "hest_units_total", "Gated units executed, by path", ["path"], registry=r
        )
        self.layer_units = Counter(
            "hest_layer_units_total",
            "Gated units executed, by decoder layer and path",
            ["layer", "path"],
            registry=r,
        )
        self.exhaustions = Counter(
            "hest_budget_exhaustions_total",
            "Requests that ended with finish_reason=energy_budget",
            registry=r,
        )
        self.violations = Counter(
            "hest_budget_violations_total",
            "Requests whose modelled energy exceeded their budget (must stay 0)",
            registry=r,
        )
        self.requests = Counter(
            "hest_requests_total", "Requests by outcome", ["outcome"], registry=r
        )
        self.rejections = Counter(
            "hest_rejections_total",
            "Requests refused with 429 (queue_full) or 503 (shutting_down)",
            ["reason"],
            registry=r,
        )
        self.brownout_requests = Counter(
            "hest_brownout_requests_total",
            "Requests whose budget the brownout tightened",
            registry=r,
        )
        self.brownout_level = Gauge(
            "hest_brownout_level",
            "Brownout level: 0 = off .. 1 = budgets at the configured floor",
            registry=r,
        )
        self.queue_depth = Gauge("hest_queue_depth", "Requests waiting in the queue", registry=r)
        self.batch_size = Histogram(
            "hest_batch_size",
            "Requests decoded together, one observation per decode step (continuous batching)",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("hest_inflight_requests", "Requests being generated", registry=r)
        self.measured_ratio = Gauge(
            "hest_measured_to_modelled_energy_ratio",
            "Last request's measured / modelled joules (hardware meters only)",
            ["meter"],
            registry=r,
        )
        self.info = Gauge(
            "hest_info",
            "What is served (value 1)",
            ["model", "adapter", "device", "meter", "policy"],
            registry=r,
        )
        for path in path_names():  # the runtime's registry (hest_core/paths.py)
            self.units.labels(path)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in REJECT_REASONS:
            self.rejections.labels(reason)
        for endpoint in ENDPOINTS:
            self.duration.labels(endpoint)

    # ---- sinks ----------------------------------------------------------------------------------
    def set_info(self, info: dict) -> None:
        """Called once the engine is loaded: the served model, and zeroed per-layer series."""
        self.info.labels(
            model=str(info.get("model")),
            adapter=str(info.get("adapter") or "none"),
            device=str(info.get("device")),
            meter=str(info.get("meter")),
            policy=str(info.get("policy")),
        ).set(1)
        meter = str(info.get("meter"))
        for source in ("modelled", "estimated"):
            self.energy_total.labels(source, meter)
            self.request_energy.labels(source, meter)
        # the engine's paths: loading it may have registered more (an adapter trained with int4)
        paths = info.get("paths") or path_names()
        for path in paths:
            self.units.labels(path)
        for layer in range(int(info.get("n_layers") or 0)):
            for path in paths:
                self.layer_units.labels(str(layer), path)

    def observe_result(
        self,
        stats: RequestStats,
        finish_reason: str,
        queue_s: float,
        check_s: float = 0.0,
        co2e_g: float | None = None,
    ) -> None:
        """One request the engine ran (answered or cancelled). TTFT counts from arrival:
        validation (check_s) + queue + the engine's time to the first token."""
        sources = {"modelled": stats.modelled_j, "estimated": stats.estimated_j}
        if stats.measured_j is not None:
            sources["measured"] = stats.measured_j
        for source, joules in sources.items():
            self.request_energy.labels(source, stats.meter).observe(joules)
            self.energy_total.labels(source, stats.meter).inc(joules)
        self.budget.observe(stats.budget_j)
        self.phase_energy.labels("prefill").observe(stats.prefill_j)
        self.phase_energy.labels("decode").observe(stats.decode_j)
        if stats.completion_tokens:
            self.token_energy.observe(stats.modelled_j / stats.completion_tokens)
        if co2e_g is not None:
            self.co2e.inc(co2e_g)
        self.budget_ratio.observe(stats.budget_ratio)
        self.queue_wait.observe(queue_s)
        if stats.completion_tokens:
            self.ttft.observe(check_s + queue_s + stats.ttft_s)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.completion_tokens)
        for path, n in stats.paths.items():  # the engine's paths (hest_core/paths.py)
            self.units.labels(path).inc(n)
        for layer, counts in enumerate(stats.paths_per_layer):
            for path, n in counts.items():
                if n:
                    self.layer_units.labels(str(layer), path).inc(n)
        if finish_reason == "energy_budget":
            self.exhaustions.inc()
        if stats.modelled_j > stats.budget_j * (1 + 1e-9):
            self.violations.inc()
        outcome = {"energy_budget": "energy_budget", "cancelled": "cancelled"}.get(finish_reason)
        self.requests.labels(outcome or "ok").inc()

    def observe_energy_ratio(self, stats: RequestStats) -> None:
        """One finished request: with a hardware meter, its measured / modelled joules."""
        if stats.measured_j is not None and stats.modelled_j > 0:
            self.measured_ratio.labels(stats.meter).set(stats.measured_j / stats.modelled_j)

    def render(self) -> bytes:
        return generate_latest(self.registry)
