"""Energy meters behind one begin/end window interface (the shape of Zeus's monitor).

* `NvmlMeter`: the GPU's total-energy counter (millijoules since driver load), via nvidia-ml-py.
* `RaplMeter`: Linux powercap RAPL package counters (microjoules), where readable.
* `EstimateMeter`: wall time x a configured nominal wattage. Always available; its figures are
  estimates and are labelled `meter="estimate"` everywhere.

`pick_meter()` returns the best one that works here ("auto" never raises for missing hardware);
an explicit choice that cannot be read raises `MeterUnavailableError` with the fix.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass

from ..config import DEFAULT_NOMINAL_WATTS, METERS
from ..errors import MeterUnavailableError


@dataclass
class Window:
    start_s: float
    start_j: float


@dataclass
class Reading:
    elapsed_s: float
    energy_j: float  # joules over the window (estimated when meter == "estimate")
    meter: str

    @property
    def measured(self) -> bool:
        return self.meter != "estimate"


class Meter:
    name = "none"
    # shortest window whose reading means something (a counter that updates every few ms
    # reads 0 or one whole step over a shorter one); calibration windows are at least this long
    min_window_s = 0.0

    def _joules(self) -> float:
        raise NotImplementedError

    def begin(self) -> Window:
        return Window(time.perf_counter(), self._joules())

    def end(self, w: Window) -> Reading:
        now_j = self._joules()
        elapsed = time.perf_counter() - w.start_s
        return Reading(elapsed, max(0.0, now_j - w.start_j), self.name)

    def describe(self) -> str:
        return self.name


class EstimateMeter(Meter):
    name = "estimate"

    def __init__(self, watts: float | None = None):
        """watts: the nominal power of every estimate (None: DEFAULT_NOMINAL_WATTS)."""
        self.watts = float(watts or DEFAULT_NOMINAL_WATTS)

    def _joules(self) -> float:
        return 0.0

    def end(self, w: Window) -> Reading:
        elapsed = time.perf_counter() - w.start_s
        return Reading(elapsed, elapsed * self.watts, self.name)

    def describe(self) -> str:
        return f"estimate (wall time x nominal {self.watts:g} W)"


class NvmlMeter(Meter):
    name = "nvml"

    def __init__(self, index: int = 0):
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._h = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h)  # raises where unsupported
        self.index = index
        self.update_s = self._update_period()
        self.min_window_s = min(0.5, max(0.05, 10 * self.update_s))

    def _update_period(self, probe_s: float = 0.3) -> float:
        """Median time between changes of the energy counter, polled for `probe_s` (the driver
        refreshes it every few ms to ~100 ms depending on the GPU; idle power still moves it)."""
        changes, last = [], self._joules()
        t_end = time.perf_counter() + probe_s
        while time.perf_counter() < t_end:
            v = self._joules()
            if v != last:
                changes.append(time.perf_counter())
                last = v
        gaps = sorted(b - a for a, b in zip(changes, changes[1:], strict=False))
        return gaps[len(gaps) // 2] if gaps else probe_s

    def _joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._h) / 1000.0

    def describe(self) -> str:
        return (
            f"nvml (GPU {self.index} total-energy counter, updates every "
            f"~{self.update_s * 1e3:.0f} ms)"
        )


class RaplMeter(Meter):
    name = "rapl"

    def __init__(self, root: str = "/sys/class/powercap"):
        self.files = []
        for zone in sorted(glob.glob(os.path.join(root, "intel-rapl:[0-9]*"))):
            if zone.count(":") != 1:
                continue  # package zones only; sub-zones are inside them
            f = os.path.join(zone, "energy_uj")
            mx = os.path.join(zone, "max_energy_range_uj")
            with open(f) as fh:  # raises PermissionError where unreadable
                fh.read()
            wrap = float(open(mx).read()) if os.path.exists(mx) else 2**32
            self.files.append((f, wrap))
        if not self.files:
            raise OSError("no RAPL package zones under " + root)
        self._last = [self._read(f) for f, _ in self.files]
        self._acc = 0.0

    @staticmethod
    def _read(path: str) -> float:
        with open(path) as fh:
            return float(fh.read())

    def _joules(self) -> float:
        for i, (f, wrap) in enumerate(self.files):
            v = self._read(f)
            d = v - self._last[i]
            if d < 0:
                d += wrap  # the counter wrapped
            self._acc += d
            self._last[i] = v
        return self._acc / 1e6

    def describe(self) -> str:
        return f"rapl ({len(self.files)} package zone(s))"


_FIX = {
    "nvml": "NVML's energy counter needs an NVIDIA GPU (Volta or newer), its driver and the "
    "`nvidia-ml-py` package",
    "rapl": "RAPL needs Linux powercap counters that this user can read: run as root, or "
    "`sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj`",
}


def pick_meter(
    device_type: str = "cpu", prefer: str | None = None, watts: float | None = None
) -> Meter:
    """The meter to use. `prefer` (None: "auto"; callers pass `RuntimeConfig.meter`, which is
    `$HEST_METER`) is one of METERS; `watts` is the estimate meter's nominal power.

    "auto" picks the best meter that works here (NVML on CUDA, RAPL on CPU) and falls back to
    the estimate meter without raising. An explicit "nvml" or "rapl" that cannot be read raises
    MeterUnavailableError naming the fix; it is never silently replaced by an estimate. An
    unknown name raises MeterUnavailableError too."""
    prefer = (prefer or "auto").strip().lower()
    if prefer not in METERS:
        raise MeterUnavailableError(
            f"meter {prefer!r} is not one of {', '.join(METERS)}: set HEST_METER (or --meter) to "
            "one of them; 'auto' picks the best that works here",
            param="meter",
        )
    if prefer == "estimate":
        return EstimateMeter(watts)
    if prefer != "auto":
        try:
            return NvmlMeter() if prefer == "nvml" else RaplMeter()
        except Exception as err:  # missing library, hardware or permission
            raise MeterUnavailableError(
                f"meter {prefer!r} was asked for but cannot be read here "
                f"({type(err).__name__}: {err}). {_FIX[prefer]}; or set HEST_METER=auto to use "
                "the best meter available (the estimate meter where none is)",
                param="meter",
            ) from err
    for make in (NvmlMeter,) if device_type == "cuda" else (RaplMeter,):
        try:
            return make()
        except Exception:  # auto: missing hardware or permissions fall back to the estimate
            continue
    return EstimateMeter(watts)
