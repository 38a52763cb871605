"""The evaluation harness end to end on two samples (tiny model), and its resume."""

from __future__ import annotations

import json

from training.evaluate import main
from training.metrics import lead3, percentile, rouge, split_sentences


def test_metrics_helpers():
    assert split_sentences('He said "no." Then he left.\nNext.') == [
        'He said "no."',
        "Then he left.",
        "Next.",
    ]
    assert lead3("A a. B b. C c. D d.") == "A a.\nB b.\nC c."
    assert rouge("the cat sat", "the cat sat")["rougeLsum"] == 100.0
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4


def test_evaluate_end_to_end(pairs_file, trained, tmp_path):
    out = tmp_path / "eval.json"
    argv = [
        "--policies",
        "lead-3,fp16,int8,hest",
        "--model",
        "tiny:llama",
        "--data",
        str(pairs_file),
        "--limit",
        "2",
        "--json",
        str(out),
        "--budget-ratios",
        "0.6,1.0",
        "--adapters",
        f"hest={trained / 'adapter'}",
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]
    main(argv)
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    assert set(rows) == {"lead-3", "fp16", "int8", "hest@0.6", "hest@1"}
    assert rows["hest@0.6"]["budget_violations"] == 0
    assert rows["fp16"]["path_shares"]["fp16"] == 1.0
    assert rows["hest@0.6"]["controller_params"] > 0
    for suffix in (".md", ".samples.jsonl"):
        assert out.with_suffix(suffix).is_file()
    assert (tmp_path / "eval_paths.png").is_file() and (tmp_path / "eval_pareto.png").is_file()
    n = len(out.with_suffix(".samples.jsonl").read_text().splitlines())
    assert n == 2 * 5
    main(argv)  # resumable: nothing left to run, nothing appended
    assert len(out.with_suffix(".samples.jsonl").read_text().splitlines()) == n
