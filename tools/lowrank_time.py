"""Decode time per token on int4 with and without an adapter's low-rank term, and what the energy
model charges for each (modelled J per decode token): the check of the measured rescale
(`hest_core.energy.calib_lowrank`; docs/runtime.md, "The int4 path with a trained z").

    python tools/lowrank_time.py OUT.json [NAME=ADAPTER_DIR ...]

Default adapters: runs/s12/hz1e-2 (z over 16 directions) and runs/s12/hzr64 (64), made as
docs/training.md says ("A quality z"); "base" (no adapter) is always measured. Policy int4, guard
off, 64 new tokens from the first training article read whole, 2 threads, the packaged
four-column table; the median of 5 runs per adapter, the adapters interleaved. Run it quiet."""

import json
import statistics
import sys

import torch

from hest_core import Engine, GenerationRequest

torch.set_num_threads(2)
ART = open("../shared/data/cnndm/train.jsonl").readline()
ART = json.loads(ART)["article"]
T = "hest_core/energy/calibration/491473d3fa8f25ad-intel-r-xeon-r-processor-bf16-2t-amx-native-int4.json"
out = {}
engines = {}
pairs = [a.split("=", 1) for a in sys.argv[2:]] or [
    ("z16", "runs/s12/hz1e-2"),
    ("z64", "runs/s12/hzr64"),
]
for name, ad in [("base", None), *pairs]:
    engines[name] = Engine.from_pretrained(
        "default",
        adapter=ad,
        policy="int4",
        guard="off",
        calibration=T,
        progress=False,
        paths=["fp16", "int8", "int4", "skip"],
    )
req = GenerationRequest(
    ART, max_new_tokens=64, energy_budget_ratio=1.0, clean_end=False, read="whole"
)
res = {n: [] for n in engines}
for _rep in range(5):
    for n, e in engines.items():  # interleaved: load drifts alike over all
        r = e.generate([req])[0]
        st = r.stats
        res[n].append(
            (
                st.decode_s / max(1, st.completion_tokens - 1),
                st.completion_tokens,
                st.modelled_j,
                st.decode_j,
                st.prefill_j,
            )
        )
for n, v in res.items():
    ms = statistics.median(x[0] for x in v) * 1000
    toks = v[0][1]
    dj = v[0][3] / max(1, toks - 1)
    out[n] = {
        "decode_ms_per_token": round(ms, 3),
        "tokens": toks,
        "modelled_decode_j_per_token": round(dj, 5),
        "info_int4": engines[n].info().get("int4"),
        "rescaled": engines[n].energy.table.kernels.get("int4_lowrank_rescaled"),
    }
for n in out:
    out[n]["time_ratio_vs_base"] = round(
        out[n]["decode_ms_per_token"] / out["base"]["decode_ms_per_token"], 3
    )
    out[n]["modelled_ratio_vs_base"] = round(
        out[n]["modelled_decode_j_per_token"] / out["base"]["modelled_decode_j_per_token"], 3
    )
print(json.dumps(out, indent=1))
path = sys.argv[1] if len(sys.argv) > 1 else "runs/lowrank_time.json"
json.dump(out, open(path, "w"), indent=1)
