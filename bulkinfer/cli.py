"""The `bulkinfer` command: parse arguments, call the library, render errors as one line."""

from __future__ import annotations

import json
import sys

import click

from bulkinfer import __version__
from bulkinfer.errors import UserError

SET_HELP = "Override a spec field, e.g. --set task.max_new_tokens=64 (repeatable)."


class BulkinferGroup(click.Group):
    """Turns UserError into `bulkinfer: error: ...` and exit code 2, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"bulkinfer: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("bulkinfer: interrupted; committed work is kept, rerun to resume", err=True)
            sys.exit(130)


@click.group(cls=BulkinferGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bulkinfer")
def main() -> None:
    """Offline bulk inference over millions of prompts, resumable, with Parquet out.

    \b
    Example:
      bulkinfer plan jobs/sample.yaml      # rows, lengths, batches; no weights loaded
      bulkinfer run jobs/sample.yaml       # run or resume; outputs in the job's output folder
    """


def _load(job: str, overrides: tuple[str, ...], output: str | None):
    from bulkinfer.spec import load_spec

    return load_spec(job, list(overrides), output=output)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--output", "-o", default=None, help="Output folder (overrides output.path).")
@click.option("--overwrite", is_flag=True, help="Discard an existing job in the output folder.")
def run(job: str, overrides: tuple[str, ...], output: str | None, overwrite: bool) -> None:
    """Run a job, or resume it where it stopped.

    \b
    Example:
      bulkinfer run jobs/sample.yaml --set task.max_new_tokens=32 --output out/try
    """
    from bulkinfer.runner import run_job

    spec = _load(job, overrides, output)
    sys.exit(run_job(spec, overwrite=overwrite))


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(job: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Read and tokenize the input, print rows, lengths, batches and padding; no weights loaded.

    \b
    Example:
      bulkinfer plan jobs/sample.yaml --set batching.max_tokens=4096
    """
    from bulkinfer.engines.memory import planning_budget
    from bulkinfer.runner import plan_report, read_inputs

    spec = _load(job, overrides, None)
    inputs = read_inputs(spec)
    max_tokens = planning_budget(spec, inputs.config)
    report = plan_report(spec, inputs, max_tokens)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_plan(report))


def render_plan(report: dict) -> str:
    lines = [
        f"rows             {report['rows']:,} ({report['row_errors']:,} with errors, not run)",
        f"input tokens     {report['input_tokens']:,} "
        f"(min {report['lengths']['min']}, median {report['lengths']['median']:.0f}, "
        f"max {report['lengths']['max']})",
        f"token budget     {report['max_tokens']:,} per batch, at most {report['max_batch_size']} rows"
        + (
            f", {report['new_tokens_per_row']} new tokens per row"
            if report["new_tokens_per_row"]
            else ""
        ),
        f"batches          {report['batches_sorted']:,} sorted and packed "
        f"({report['batches_file_order']:,} in file order)",
        f"padding          {report['padding_sorted']:.1%} sorted and packed, "
        f"{report['padding_file_order']:.1%} in file order",
        "",
        "prompt tokens    rows",
    ]
    peak = max((c for _, _, c in report["histogram"]), default=0)
    for low, high, count in report["histogram"]:
        bar = "#" * (round(40 * count / peak) if peak else 0)
        lines.append(f"{low:>6}-{high:<7}  {count:>7,}  {bar}")
    for row, message in report["example_errors"]:
        lines.append(f"row {row}: {message}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
