"""Pair one adapter's controller with another adapter's spectral z (issue 14).

`python -m training.train --fix-path int4` trains a quality z alone (every unit on one path,
loss = CE); this tool writes an artifact that serves it with an already trained controller, so
the pair can be evaluated before (or instead of) retraining the controller on the merged
weights with `--base-z`. Everything but z comes from the controller's artifact (its read_ratio
included unless `--read-ratio` says otherwise); `training.z_from` records where z came from.

    python tools/pair_adapter.py --controller hest_core/adapter/adapters/smollm2-135m-instruct \
        --z runs/s12/z/adapter --out runs/s12/paired

Raises AdapterMismatchError (via the loader) for a directory that is not an adapter, and
SystemExit when the two adapters were trained for different base models.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hest_core import paths as reg  # noqa: E402
from hest_core.adapter.artifact import load_adapter  # noqa: E402
from hest_core.exec.int4 import MODES  # noqa: E402


def pair(
    controller: str, z: str, out: str, read_ratio: float | None = None, int4_mode: str | None = None
) -> Path:
    """Write `controller`'s artifact with `z`'s spectral z to `out`; returns `out`."""
    reg.enable(("fp16", "int8", "int4", "skip"))  # this project's controllers know int4
    a, b = load_adapter(controller), load_adapter(z)
    if a.config.base_model_fingerprint != b.config.base_model_fingerprint:
        raise SystemExit(
            f"the adapters were trained for different base models "
            f"({a.config.base_model_fingerprint} vs {b.config.base_model_fingerprint})"
        )
    a.z = {t: v.clone() for t, v in b.z.items()}
    training = dict(a.config.training or {})
    training["z_from"] = {"path": str(z), "training": b.config.training}
    a.config.training = training
    if read_ratio is not None:
        a.config.read_ratio = read_ratio
    if int4_mode is not None:
        a.config.int4_mode = int4_mode
    return a.save(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--controller", required=True, help="adapter whose controller is kept")
    ap.add_argument("--z", required=True, help="adapter whose spectral z is taken")
    ap.add_argument("--out", required=True)
    ap.add_argument("--read-ratio", type=float, default=None)
    ap.add_argument("--int4-mode", choices=MODES, default=None)
    a = ap.parse_args(argv)
    d = pair(a.controller, a.z, a.out, a.read_ratio, a.int4_mode)
    cfg = json.loads((d / "adapter_config.json").read_text())
    print(f"wrote {d} (read_ratio {cfg.get('read_ratio')})")


if __name__ == "__main__":
    main()
