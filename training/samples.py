"""The evaluation's per-sample files: `X.samples.jsonl` (or one per shard,
`X.samples.shard-I-of-N.jsonl`), appended as samples end, read back on a rerun so done
(row, pair) samples are skipped."""

from __future__ import annotations

import json
from pathlib import Path


def read_samples(path: Path, repair: bool = True) -> dict[tuple[str, str], dict]:
    """(row, pair id) -> sample. A run killed mid-write can leave its last line cut short: that
    one sample is dropped (and rerun), with a warning, and with `repair` cut from the file (only
    for the file this process appends to: another shard may be writing its own last line right
    now); a bad line anywhere else is an error."""
    lines = path.read_text().splitlines()
    out = {}
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            r = json.loads(ln)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                if repair:
                    print(f"[evaluate] {path}: last line cut short; that sample reruns", flush=True)
                    with path.open("w") as f:  # drop it, so appends start on a fresh line
                        f.write("".join(x + "\n" for x in lines[:i]))
                break
            raise SystemExit(f"{path}:{i + 1}: not a JSON line; fix or remove it") from None
        out[(r["row"], r["id"])] = r
    return out


def other_samples(js: Path, own: Path | None = None) -> dict[tuple[str, str], dict]:
    """Every samples file of the evaluation whose --json is `js` (unsharded and shards) but
    `own` (None: all of them), read as is: (row, pair id) -> sample."""
    out: dict[tuple[str, str], dict] = {}
    for path in sorted(js.parent.glob(js.stem + ".samples*.jsonl")):
        if path != own:
            out.update(read_samples(path, repair=False))
    return out


def samples_file(js: Path, shard: tuple[int, int] | None) -> Path:
    """The samples file this process appends to (one per shard)."""
    if shard is None:
        return js.with_suffix(".samples.jsonl")
    i, n = shard
    return js.with_name(f"{js.stem}.samples.shard-{i}-of-{n}.jsonl")
