"""training/plots.py: the ROUGE-L against joules figure draws one curve per method (issue 14)."""

from training.plots import plot_pareto


def test_pareto_draws_one_curve_per_method(tmp_path):
    png = tmp_path / "pareto.png"
    pts = [
        {"name": f"{m}@{r}", "joules": j * r, "rouge_l": 19.0 + r}
        for m, j in (("hest", 15.0), ("int4", 28.0), ("fp16", 45.0))
        for r in (0.2, 0.6, 1.0)
    ] + [{"name": "tabs", "joules": 50.0, "rouge_l": 17.0}]
    drawn = plot_pareto(pts, png)
    assert drawn == {"hest": 3, "int4": 3, "fp16": 3, "tabs": 1}
    assert png.stat().st_size > 1000


def test_pareto_without_points_writes_nothing(tmp_path):
    png = tmp_path / "pareto.png"
    assert plot_pareto([], png) == {}
    assert not png.exists()
