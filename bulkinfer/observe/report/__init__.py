"""`bulkinfer report OUT`: OUT/report.html, one self-contained page, and OUT/report/*.png.

facts.py reads what the folder holds, charts.py turns it into figures (PNG with matplotlib,
inline SVG without), page.py writes the HTML.
"""

from __future__ import annotations

import base64
from pathlib import Path

from bulkinfer.io.atomic import write_bytes_atomic
from bulkinfer.io.layout import OutputLayout
from bulkinfer.observe.report.charts import charts, draw_png
from bulkinfer.observe.report.facts import JobFacts, read_job
from bulkinfer.observe.report.page import render_page
from bulkinfer.observe.report.svg import draw_svg

CAPTIONS = {
    "lengths": "Rows by prompt length in tokens{template}, in buckets a quarter octave wide, on "
    "a log scale.",
    "throughput": "Prompt and generated tokens per second of the whole job (all shards "
    "together), each batch's tokens spread over the time it ran. Gaps are time the job was "
    "not running.",
    "padding": "Each dot is one batch: the share of its padded prompt tokens that is padding. "
    "Batches run longest first; the dashed lines are the whole job, sorted and in file order.",
    "shards": "Share of each shard's rows done, coloured by state: done green, running blue, "
    "stopped orange, pending grey, failed red.",
}
TEMPLATE_NOTES = {
    "all": " (after the chat template)",
    "some": " (after the chat template, for the prompts it rendered)",
}


def caption(name: str, facts: JobFacts) -> str:
    """The chart's caption; prompt lengths say "after the chat template" only where the job's
    prompts went through it."""
    return CAPTIONS[name].format(template=TEMPLATE_NOTES.get(facts.chat_template, ""))


def write_report(root: Path) -> Path:
    """Write OUT/report.html and the PNG plots beside it; returns the page's path."""
    facts = read_job(root)
    layout = OutputLayout(root)
    folder = layout.report_dir
    figures: dict[str, tuple[str, str]] = {}
    note = ""
    drawn = set()
    for chart in charts(facts):
        png = draw_png(chart)
        if png is None:
            figures[chart.name] = (draw_svg(chart), caption(chart.name, facts))
            note = "Figures drawn without matplotlib (pip install 'bulkinfer[report]' for PNGs)."
            continue
        folder.mkdir(exist_ok=True)
        write_bytes_atomic(folder / f"{chart.name}.png", png)
        drawn.add(f"{chart.name}.png")
        data = base64.b64encode(png).decode("ascii")
        markup = f'<img alt="{chart.title}" src="data:image/png;base64,{data}">'
        figures[chart.name] = (markup, caption(chart.name, facts))
    for stale in folder.glob("*.png") if folder.is_dir() else []:
        if stale.name not in drawn:
            stale.unlink()
    page = layout.report_page
    write_bytes_atomic(page, render_page(facts, figures, note).encode("utf-8"))
    return page
