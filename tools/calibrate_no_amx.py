"""A calibration table of this CPU with its AMX tiles off: a second device profile (issue 14's
"second table") measured on the machine at hand when it has the packaged table's CPU.

AMX is what sets this Intel Xeon's costs apart from an AVX-512 CPU without it (an AMD EPYC, an
older Xeon): oneDNN runs 16-bit prefill GEMMs on the tiles (fp16 prefill cheaper than int8's
W8A8 here; 2.9x dearer on a Xeon without AMX, docs/results.md) and the fused decode layer uses
them from 5 rows. This tool caps oneDNN at AVX-512 with VNNI and BF16 (`ONEDNN_MAX_CPU_ISA`,
oneDNN's documented CPU dispatcher control; read at its first use, so set before torch loads)
and turns the fused layer's tiles off (`Native.set_amx`), then runs the ordinary calibration
(`python -m hest_core.energy.calibrate`, every argument passed on) and records what was off in
the table (`kernels.cpu`'s ISA record says AMX unused by both; `kernels.isa_note` says how). Measure on a quiet machine, as any calibration.

    HEST_PATHS=fp16,int8,int4,skip python tools/calibrate_no_amx.py --rows 1 \\
        --out docs/results/calibration-xeon-noamx-2t-native-int4-s10.json
"""

from __future__ import annotations

import json
import os
import sys

ISA = "AVX512_CORE_BF16"  # AVX-512 F/BW/VL/DQ + VNNI + BF16, no AMX (oneDNN's ISA names)


def main(argv: list[str]) -> None:
    os.environ["ONEDNN_MAX_CPU_ISA"] = ISA  # before torch's oneDNN dispatches its first kernel
    from hest_core.energy import calibrate
    from hest_core.exec import native

    nat = native.get()
    if nat is not None and nat.set_amx(False):
        raise SystemExit("could not turn the fused layer's AMX tiles off")
    calibrate.main(argv)
    if "--out" in argv:  # say in the table what was off
        out = argv[argv.index("--out") + 1]
        t = json.loads(open(out).read())
        t["kernels"]["isa_note"] = (
            f"AMX off: ONEDNN_MAX_CPU_ISA={ISA}, the fused decode layer's AMX tiles disabled "
            "(tools/calibrate_no_amx.py)"
        )
        with open(out, "w") as f:
            json.dump(t, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
