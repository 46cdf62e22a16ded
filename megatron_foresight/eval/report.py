"""`foresight report RUN [RUN...] --out DIR`: the pictures a researcher would otherwise draw in
a notebook, from one or several runs (`report_data` says what a RUN is):

    reliability.png   <value> calibration per stage / run (bins, ECE and Brier in the legend)
    value.png         <value> by episode outcome, and its ROC curve with the AUROC
    fidelity.png      rollout fidelity per environment
    curves_<stage>.png  learning curves, every run on the same axes, validation marked
    index.html        all of it with the metrics table and sampled episodes (static: the
                      images are files beside it, nothing is fetched)
    metrics.md        the metrics table as Markdown, for pasting

`foresight pipeline` writes it into `<run-dir>/report/`, `foresight eval --out F` into
`F`'s directory as `<F>.report/`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from megatron_foresight.eval.report_data import Part, load_parts
from megatron_foresight.eval.report_figures import (
    curve_figure, fidelity_figure, reliability_figure, value_figure, value_pairs,
)
from megatron_foresight.eval.report_html import index_html, metrics_table
from megatron_foresight.pipeline import REPORT_METRICS, STAGES

DPI = 80
"""Small PNGs: a report is looked at on a screen, and the README commits two of them."""


@dataclass
class Report:
    out: Path
    parts: list[Part]
    figures: dict[str, Figure]
    """By file stem (`reliability`, `curves_fc_rl`, ...), in the order the page shows them."""

    @property
    def index(self) -> Path:
        return self.out / "index.html"


def build_figures(parts: list[Part]) -> dict[str, Figure]:
    """Every figure the parts have data for."""
    figures: dict[str, Figure] = {}
    if any(value_pairs(p)[0] for p in parts):
        figures["reliability"] = reliability_figure(parts)
        figures["value"] = value_figure(parts)
        figures["fidelity"] = fidelity_figure(parts)
    stages = [s for s in STAGES if any(p.stage == s for p in parts)]
    stages += sorted({p.stage or "run" for p in parts} - set(stages))
    for stage in stages:
        curves = curve_figure(stage, [p for p in parts if (p.stage or "run") == stage])
        if curves is not None:
            figures[f"curves_{stage}"] = curves
    return figures


def write_report(runs: list[str | Path], out: str | Path) -> Report:
    """Read the runs, draw every figure, and write the PNGs, index.html and metrics.md to
    `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = load_parts(list(runs))
    figures = build_figures(parts)
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=DPI)
    table = metrics_table(parts, REPORT_METRICS)
    (out / "metrics.md").write_text(table.markdown(), encoding="utf-8")
    (out / "index.html").write_text(index_html(parts, list(figures), table), encoding="utf-8")
    return Report(out, parts, figures)
