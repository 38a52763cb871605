"""Energy: what a unit of work costs on this device, and how that is measured.

Owns the meters (`meters.py`: NVML, RAPL, an estimate), the energy model (`model.py`:
`EnergyModel`, `CalibrationTable`, costs in integer picojoules) and the calibration that fills
its table here (`calibrate.py`, with `calib_measure.py`, `calib_rows.py` and `calib_check.py`),
with the tables packaged for known devices (`calibration/*.json`).

The calibration command lives here, beside what it measures and the tables it writes:
`python -m hest_core.energy.calibrate` (the engine calls the same module's `resolve` at load).

May import: the foundation modules, `exec` (calibration times the model's kernels) and
`adapter` (and the controller's C form). Nothing of requests (tests/test_import_graph.py).
"""
