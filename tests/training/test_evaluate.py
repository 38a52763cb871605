"""The evaluation harness end to end on two samples (tiny model), and its resume."""

from __future__ import annotations

import json

from training.evaluate import evaluate, main, parse_args
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
    assert set(rows) == {"lead-3", "hest@0.6", "hest@1"} | {
        f"{p}@{r}" for p in ("fp16", "int8") for r in ("0.6", "1")
    }
    assert rows["hest@0.6"]["budget_violations"] == 0
    assert rows["fp16@1"]["path_shares"]["fp16"] == 1.0
    # a fixed path under a budget below its own minimum is refused (counted, ROUGE 0)
    # (4 new tokens: the prompt's fp16 prefill alone is ~0.84 of the all-fp16 cost here)
    assert rows["fp16@0.6"]["refused"] == 2 and rows["fp16@0.6"]["rougeL"] == 0.0
    for row in ("fp16@0.6", "int8@0.6", "int8@1"):
        assert rows[row].get("budget_violations", 0) == 0
    assert rows["hest@0.6"]["controller_params"] > 0
    for suffix in (".md", ".samples.jsonl"):
        assert out.with_suffix(suffix).is_file()
    assert (tmp_path / "eval_paths.png").is_file() and (tmp_path / "eval_pareto.png").is_file()
    # the mix at r = 0.6 against r = 1, for every method with path shares at both (lead-3 has
    # no budget; fp16@0.6 refused both pairs, so it has no shares)
    assert set(res["mix_shift"]) == {"hest", "int8"}
    assert res["mix_shift"]["int8"]["0.6"]["max_layer_diff"] == 0.0
    assert res["mix_shift"]["hest"]["0.6"]["vs"] == "1"
    moved = res["mix_shift"]["hest"]["0.6"]["max_layer_diff"] > 0  # a figure only if it moved
    assert (tmp_path / "eval_mix_shift.png").is_file() == moved
    n = len(out.with_suffix(".samples.jsonl").read_text().splitlines())
    assert n == 2 * 7
    main(argv)  # resumable: nothing left to run, nothing appended
    assert len(out.with_suffix(".samples.jsonl").read_text().splitlines()) == n


def test_evaluate_shards_then_aggregate(pairs_file, tmp_path):
    base = [
        "--policies",
        "lead-3,fp16",
        "--model",
        "tiny:llama",
        "--data",
        str(pairs_file),
        "--limit",
        "3",
        "--max-new-tokens",
        "3",
        "--budget-ratios",
        "1.0",
        "--no-progress",
    ]
    whole, split = tmp_path / "whole" / "e.json", tmp_path / "split" / "e.json"
    main([*base, "--json", str(whole)])
    res = evaluate(parse_args([*base, "--json", str(split), "--shard", "0/2"]))
    assert res == {"missing": 2}  # pair b, for the fp16 and lead-3 rows
    shard0 = split.with_name("e.samples.shard-0-of-2.jsonl")
    assert {json.loads(ln)["id"] for ln in shard0.read_text().splitlines()} == {"a", "c"}
    assert not split.is_file()  # nothing aggregated while shard 1 is missing
    main([*base, "--json", str(split), "--shard", "1/2"])  # the last shard to end aggregates
    assert split.is_file()
    split.unlink()
    main([*base, "--json", str(split)])  # so does a run without --shard; it runs nothing
    assert not split.with_suffix(".samples.jsonl").read_text().strip()
    a, b = json.loads(whole.read_text()), json.loads(split.read_text())
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert (ra["row"], ra["n"], ra["rougeL"]) == (rb["row"], rb["n"], rb["rougeL"])


def test_evaluate_rejects_bad_shard(tmp_path, capsys):
    import pytest

    for bad in ("2/2", "x", "1-2"):
        with pytest.raises(SystemExit):
            main(["--json", str(tmp_path / "e.json"), "--shard", bad])
        assert "--shard wants I/N" in capsys.readouterr().err


def test_a_cut_short_last_sample_line_reruns(tmp_path, capsys):
    from training.samples import read_samples

    p = tmp_path / "e.samples.jsonl"
    good = json.dumps({"row": "fp16", "id": "a", "x": 1})
    cut = good + "\n" + good.replace('"a"', '"b"')[:20]
    p.write_text(cut)
    assert set(read_samples(p, repair=False)) == {("fp16", "a")}  # another shard's file
    assert p.read_text() == cut  # left alone: its writer may be mid-line
    assert set(read_samples(p)) == {("fp16", "a")}
    assert "cut short" in capsys.readouterr().out
    assert p.read_text() == good + "\n"  # the next append starts on its own line
    p.write_text("{oops\n" + good + "\n")
    import pytest

    with pytest.raises(SystemExit, match=":1: not a JSON line"):
        read_samples(p)


def test_int4_row_needs_the_path_and_runs_with_it(pairs_file, tmp_path, int4_tables):
    """The fixed `int4` row: refused with the flag to pass when int4 is not registered; with
    `--paths` it runs on int4 only, under the same budgets as the other fixed paths."""
    import pytest

    from hest_core import paths as reg

    base = [
        "--policies",
        "int4",
        "--model",
        "tiny:llama",
        "--data",
        str(pairs_file),
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--budget-ratios",
        "1.0",
        "--no-progress",
        "--json",
        str(tmp_path / "e.json"),
    ]
    try:
        with pytest.raises(SystemExit, match="--paths fp16,int8,skip,int4"):
            main(base)
        out = evaluate(
            parse_args([*base, "--paths", "fp16,int8,int4,skip", "--calibration", str(int4_tables)])
        )
        (row,) = out["rows"]
        assert row["row"].startswith("int4") and row["n"] == 2
        assert row["path_shares"]["int4"] == 1.0
    finally:
        if reg.find("int4") is not None:
            reg.unregister("int4")


def test_merge_takes_missing_rows_from_an_earlier_summary(pairs_file, tmp_path):
    """tools/eval_merge.py --summaries: one method re-run, the other rows kept from the earlier
    merge whose sample files are gone; another pair count is refused."""
    import pytest

    from tools.eval_merge import main as merge

    def run(policies, out, limit=2):
        main(
            [
                "--policies", policies, "--model", "tiny:llama", "--data", str(pairs_file),
                "--limit", str(limit), "--max-new-tokens", "3", "--budget-ratios", "1.0",
                "--no-progress", "--json", str(out),
            ]
        )  # fmt: skip

    first, again = tmp_path / "first" / "e.json", tmp_path / "again" / "e.json"
    run("lead-3,fp16", first)
    merged = tmp_path / "merged.json"
    assert merge(["--paths", "fp16,int8,skip", "--out", str(merged), str(first)]) == 0
    first.with_suffix(".samples.jsonl").unlink()
    run("lead-3", again)  # re-run one row; fp16's samples are gone
    out = tmp_path / "out.json"
    merge(["--paths", "fp16,int8,skip", "--summaries", str(merged), "--out", str(out), str(again)])
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    old = {r["row"]: r for r in json.loads(merged.read_text())["rows"]}
    assert set(rows) == {"lead-3", "fp16@1"}
    assert rows["fp16@1"] == old["fp16@1"]  # from the summary
    assert rows["lead-3"]["n"] == 2 and "fp16@1" in out.with_suffix(".md").read_text()
    three = tmp_path / "three" / "e.json"
    run("lead-3", three, limit=3)
    with pytest.raises(SystemExit, match="summarises 2 pairs, this merge 3"):
        merge(
            ["--paths", "fp16,int8,skip", "--summaries", str(merged), "--out",
             str(tmp_path / "x.json"), str(three)]
        )  # fmt: skip


def test_evaluate_rejects_bad_plan_ratio(tmp_path, capsys):
    import pytest

    for bad in ("0", "1.5", "x"):
        with pytest.raises(SystemExit):
            main(["--json", str(tmp_path / "e.json"), "--plan-ratio", bad])
        assert "--plan-ratio wants a number in (0, 1] or none" in capsys.readouterr().err
    js = ["--json", str(tmp_path / "e.json")]
    assert parse_args([*js, "--plan-ratio", "none"]).plan_ratio is None
    assert parse_args([*js, "--plan-ratio", "0.3"]).plan_ratio == 0.3


def test_evaluate_plan_slope_flag(tmp_path, capsys):
    import pytest

    for bad in ("0", "-2", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            main(["--json", str(tmp_path / "e.json"), "--plan-slope", bad])
        assert "--plan-slope wants a number > 0 or none" in capsys.readouterr().err
    js = ["--json", str(tmp_path / "e.json")]
    a = parse_args([*js, "--plan-slope", "4"])
    assert a.plan_slope == 4.0 and a.plan_slope_set
    assert parse_args([*js, "--plan-slope", "none"]).plan_slope is None
    assert not getattr(parse_args(js), "plan_slope_set", False)


def test_mix_shift_compares_each_budget_with_the_largest():
    """report.mix_shift: per method, each budget's per-layer shares against the largest
    budget's: the largest single difference, the mean total-variation distance, the overall
    share differences; single-budget methods and rows without a budget are left out."""
    import pytest

    from training.report import mix_shift

    def row(name, grid):
        shares = {p: sum(g[i] for g in grid) / len(grid) for i, p in enumerate(("fp16", "int4"))}
        return {"row": name, "path_shares_per_layer": grid, "path_shares": shares}

    rows = [
        row("hest@1", [[0.2, 0.8], [0.0, 1.0]]),
        row("hest@0.2", [[0.0, 1.0], [0.1, 0.9]]),
        row("hest@0.4", [[0.2, 0.8], [0.0, 1.0]]),
        row("int4@0.2", [[0.0, 1.0], [0.0, 1.0]]),
        {"row": "lead-3"},
    ]
    out = mix_shift(rows)
    assert set(out) == {"hest"} and set(out["hest"]) == {"0.2", "0.4"}
    low = out["hest"]["0.2"]
    assert low["vs"] == "1" and low["max_layer_diff"] == pytest.approx(0.2)
    assert low["mean_tv"] == pytest.approx((0.2 + 0.1) / 2)
    assert low["share_diff"]["fp16"] == pytest.approx(-0.05)
    assert out["hest"]["0.4"]["max_layer_diff"] == 0.0
