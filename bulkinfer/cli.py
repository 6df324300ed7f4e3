"""The `bulkinfer` command: parse arguments, call the library, render errors as one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import click

from bulkinfer import __version__, process
from bulkinfer.console import speaker
from bulkinfer.errors import UserError, counted, file_access_error

SET_HELP = "Override a spec field, e.g. --set task.max_new_tokens=64 (repeatable)."


class BulkinferGroup(click.Group):
    """Turns UserError into `bulkinfer: error: ...` and exit code 2, without a traceback; with
    `--log-format json` every error is a JSON `error` event instead (a bug's keeps its traceback
    as a field)."""

    def make_context(self, info_name, args, *rest, **kwargs):
        try:
            return super().make_context(info_name, args, *rest, **kwargs)
        except KeyboardInterrupt:  # a Ctrl-C while the arguments are read: click's "Aborted!"
            from bulkinfer.console import log_format_asked

            os.environ["BULKINFER_LOG_FORMAT"] = log_format_asked(list(args))  # (not yet set)
            _interrupted(None)

    def invoke(self, ctx):
        overwrite = "--overwrite" in ctx.args  # (the subcommand's arguments, before it takes them)
        try:
            from bulkinfer.observe.progress import log, log_format

            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted(ctx.invoked_subcommand, overwrite)
        except UserError as exc:
            _user_error(exc)
        except OSError as exc:  # a permission, a name too long, ...: one line, not a traceback
            failure = file_access_error(exc)
            if failure is None:
                raise
            _user_error(failure)
        except click.ClickException as exc:
            if log_format() != "json":
                raise
            log(exc.format_message(), event="error", level="error", exit_code=exc.exit_code)
            sys.exit(exc.exit_code)
        except Exception as exc:
            if log_format() != "json":
                raise
            import traceback

            log(
                f"{type(exc).__name__}: {exc}",
                event="error",
                level="critical",
                exit_code=1,
                traceback=traceback.format_exc(),
            )
            sys.exit(1)


def _modified(path) -> int | None:
    """A file's modification time in nanoseconds, None where there is none."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _shell_word(path) -> str:
    """A path as a command line takes it: quoted where it has spaces, and never read as an
    option (a name starting with a dash)."""
    import shlex

    text = str(path)
    return shlex.quote(f"./{text}" if text.startswith("-") else text)


def _user_error(exc: UserError) -> None:
    """One line (a JSON event with --log-format json), exit with the error's code."""
    from bulkinfer.observe.progress import log, log_format

    if log_format() == "json":
        log(str(exc), event="error", level="error", exit_code=exc.exit_code)
    else:
        click.echo(f"{speaker()}: error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _interrupted(command: str | None, overwrite: bool = False) -> None:
    """Ctrl-C: one line (a JSON event with --log-format json), exit 130. A second SIGINT (a
    terminal's to the process group, and a launcher's forwarded to its workers) no longer
    cuts this short into a traceback and a death by the signal."""
    if process.OWN:  # the command's own process, which ends here
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    message = "interrupted"
    if command in ("run", "merge"):  # the commands that commit work
        from bulkinfer.console import resume_advice

        message += f"; committed work is kept: {resume_advice(overwrite and command == 'run')}"
    try:
        from bulkinfer.observe.progress import log, log_format
    except Exception:  # noqa: BLE001 (the Ctrl-C cut numpy's import short: it cannot run again)
        from bulkinfer.console import say_interrupted

        say_interrupted(message)
    if log_format() == "json":
        log(message, event="signal", level="error", signal="SIGINT", exit_code=130)
    else:
        click.echo(f"{speaker()}: {message}", err=True)
    sys.exit(130)


def _set_log_format(ctx, param, value: str | None) -> None:
    """The option sets BULKINFER_LOG_FORMAT, so worker processes and Slurm tasks inherit it."""
    import os

    from bulkinfer.observe.progress import (
        LOG_FORMAT_ENV,
        LOG_FORMATS,
        log_format,
        route_library_output_to_json,
    )

    if value is not None:
        os.environ[LOG_FORMAT_ENV] = value
    env = os.environ.get(LOG_FORMAT_ENV)
    if env is not None and env.strip().lower() not in LOG_FORMATS:
        os.environ.pop(LOG_FORMAT_ENV)
        raise click.UsageError(f"{LOG_FORMAT_ENV}={env!r}: expected plain or json", ctx)
    if log_format() == "json":
        route_library_output_to_json()


log_format_option = click.option(
    "--log-format",
    type=click.Choice(["plain", "json"]),
    default=None,
    expose_value=False,
    is_eager=True,
    callback=_set_log_format,
    help="plain (default) or json: one JSON object per line on stderr, for log collectors "
    "(or set BULKINFER_LOG_FORMAT).",
)


@click.group(cls=BulkinferGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bulkinfer")
@log_format_option
def main() -> None:
    """Offline bulk inference over millions of prompts, resumable, with Parquet out.

    \b
    Example:
      bulkinfer init job.yaml              # a commented job spec to start from
      bulkinfer validate job.yaml          # spec, model config and input columns; no weights
      bulkinfer plan jobs/sample.yaml      # rows, lengths, batches; no weights loaded
      bulkinfer run jobs/sample.yaml       # run or resume; outputs in the job's output folder
      bulkinfer report out/sample          # out/sample/report.html: what happened, at a glance
    """


# Installed, these are imported by transformers when it loads (for the ROC curve of assisted
# generation and the matching in object-detection losses), and never used by bulkinfer: ~1.6 s
# of an H200 box's import time (docs/perf.md). In its own process bulkinfer marks them absent.
UNUSED_IMPORTS = ("sklearn", "scipy")


def skip_unused_imports(spec) -> None:
    """Mark UNUSED_IMPORTS absent for this process (None in sys.modules: Python's own way to
    refuse an import), where the process is the command's (the console script, `python -m
    bulkinfer`; not `main` called from someone's program), nothing has imported them yet, and
    no code from the model folder will run (model.trust_remote_code). pyarrow is told pandas
    is absent too, unless the input is read through `datasets` (input.format hf), which hands
    it pandas objects."""
    if not process.OWN or spec.model.trust_remote_code:
        return
    for name in UNUSED_IMPORTS:
        sys.modules.setdefault(name, None)
    if spec.input.format != "hf":
        pyarrow_without_pandas()


class _RefusePandas:
    """An import finder that answers pandas with an ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is not used here")
        return None


def pyarrow_without_pandas() -> None:
    """pyarrow imports pandas, where installed, the first time it builds an array from Python
    values, to ask whether they are pandas objects (0.3-0.5 s of an H200 box's start-up, on
    the thread that reads the input, beside the weights' loading); bulkinfer never hands it
    any. Its Python side asks once: that probe fails here. Its C++ side asks again at every
    conversion until pandas imports: pandas is marked absent in sys.modules for that (pyarrow's
    Python side would take the None there for the module, hence the probe first). A pandas
    already imported is left alone, and so is all of it where this pyarrow asks otherwise."""
    import pyarrow
    import pyarrow.lib

    shim = getattr(pyarrow.lib, "_pandas_api", None)
    if "pandas" in sys.modules or shim is None:
        return
    finder = _RefusePandas()
    sys.meta_path.insert(0, finder)
    try:
        have = shim.have_pandas  # the probe, answered absent
    finally:
        sys.meta_path.remove(finder)
    if have:
        return
    sys.modules["pandas"] = None
    try:
        pyarrow.Table.from_pylist([{"a": 0}])  # the conversions that asked still work
    except Exception:  # noqa: BLE001 (a pyarrow that asks again: let it import pandas)
        del sys.modules["pandas"]


def entry() -> None:
    """The console script and `python -m bulkinfer`: `main`, then, once torch is loaded, an
    exit that skips the interpreter's teardown. Every file a command writes is closed and its
    threads joined before it returns; what the teardown would add is freeing torch's modules,
    the CUDA context and the compiler's worker processes one by one: a second on a CPU, a few
    on a GPU box, after the outputs are already on disk. Not inside a notebook's kernel
    (`%run -m bulkinfer`): its process is the notebook's, and gets the SystemExit."""
    process.claim()
    try:
        main()
    except SystemExit as exc:
        code_exit = exc.code is None or isinstance(exc.code, int)
        if process.OWN and "torch" in sys.modules and code_exit:
            import logging
            import os

            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:  # a closed stdout (`>&-`) has none
                    with contextlib.suppress(OSError, ValueError):
                        stream.flush()
            os._exit(exc.code or 0)
        raise


def _load(job: str, overrides: tuple[str, ...], output: str | None):
    from bulkinfer.spec import load_spec

    return load_spec(job, list(overrides), output=output)


@main.command()
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--output", "-o", default=None, help="Output folder (overrides output.path).")
@click.option("--overwrite", is_flag=True, help="Discard an existing job in the output folder.")
@click.option(
    "--shard", default=None, metavar="I/N", help="Run shard I of N (default: from Slurm)."
)
@click.option("--gpus", default=None, metavar="N|all", help="One worker per GPU, then one merge.")
@log_format_option
def run(job, overrides, output, overwrite, shard, gpus) -> None:
    """Run a job, or resume it where it stopped.

    \b
    Examples:
      bulkinfer run jobs/sample.yaml --set task.max_new_tokens=32 --output out/try
      bulkinfer run jobs/sample.yaml --gpus all        # 8 GPUs: 8 shards, one merge
      bulkinfer run jobs/sample.yaml --shard 3/64      # what Slurm array task 3 of 64 runs
      bulkinfer run jobs/sample.yaml --log-format json # JSON lines on stderr for collectors
    """
    from bulkinfer.job.runner import run_job
    from bulkinfer.sharding import (
        parse_shard,
        refuse_row_column,
        shard_from_env,
        slurm_tasks_unused,
    )

    spec = _load(job, overrides, output)
    skip_unused_imports(spec)
    if gpus is not None and shard:
        raise UserError("--gpus splits the job into shards itself: give it or --shard, not both")
    if gpus is not None:
        refuse_row_column(spec.input.keep_columns)
        from pathlib import Path

        from bulkinfer.executors.local import run_workers, worker_count
        from bulkinfer.io.layout import OutputLayout
        from bulkinfer.io.lock import folder_lock
        from bulkinfer.state.folder import (
            clear_shards,
            refuse_foreign,
            refuse_other_counts,
            refuse_unsharded,
        )

        count, devices = worker_count(gpus)
        args = [job, *(f"--set={o}" for o in overrides), "--output", spec.output.path]
        args += ["--overwrite"] if overwrite else []
        root = OutputLayout(Path(spec.output.path))
        refuse_foreign(root, overwrite=overwrite)
        with folder_lock(root):  # the launcher holds the job folder; each worker its shard's
            refuse_unsharded(root, overwrite, holding_lock=True)
            refuse_other_counts(root, count, overwrite, flag="--gpus")
            if overwrite:
                clear_shards(root)
            merged_before = _modified(root.summary)
            code = run_workers(args, count, devices)
        if code == 0 and _modified(root.summary) != merged_before:  # not a finished job's again
            from bulkinfer.job.finish import say_merged

            say_merged(root)
        sys.exit(code)
    chosen = parse_shard(shard) if shard else shard_from_env()
    unused = 0 if shard else slurm_tasks_unused()
    if unused:
        from bulkinfer.observe.progress import log

        log(
            f"this Slurm job has {unused} tasks but bulkinfer was not started by "
            "srun: it runs as one task (`srun bulkinfer run ...` gives each task a shard)"
        )
    sys.exit(run_job(spec, overwrite=overwrite, shard=chosen))


@main.command()
@click.argument("output", type=click.Path(file_okay=False))
def status(output: str) -> None:
    """Per shard: state, rows done, tokens/s; and the job's ETA. Reads files only.

    \b
    Example:
      bulkinfer status out/my-job
    """
    from pathlib import Path

    from bulkinfer.errors import UserError
    from bulkinfer.executors.slurm import task_states
    from bulkinfer.io.layout import OutputLayout
    from bulkinfer.state.folder import record_lost
    from bulkinfer.state.records import SlurmSubmission
    from bulkinfer.state.status import format_status, job_states

    root = OutputLayout(Path(output))
    if not root.root.is_dir():
        raise UserError(f"{root.root}: no such output folder")
    submitted = root.slurm_script.is_file()  # `bulkinfer slurm`: its tasks pending
    # a run before it records its job, or one that failed, was stopped or was refused then
    starting = root.lock.is_file() or root.failed.is_file()
    # a job's folder without its record: an --overwrite stopped midway, or job.json removed
    unrecorded = root.overwriting.is_file() or record_lost(root)
    if not (root.job_file.is_file() or root.shard_folders() or submitted or starting or unrecorded):
        raise UserError(f"{root.root}: not a bulkinfer job folder (no job.json or shards/)")
    states = job_states(root)
    queue = None
    if submitted and any(s.state not in ("running", "done") for s in states):  # ask Slurm
        jobs = SlurmSubmission.read_all(root.slurm_jobs)
        recorded = [j.job_id for j in jobs if j.tasks == len(states)]
        queue = task_states(root.slurm_script, len(states), recorded)
    click.echo(format_status(root, states, queue))


@main.command(short_help="Assemble the shards' outputs into OUT/outputs.")
@click.argument("output", type=click.Path(file_okay=False))
def merge(output: str) -> None:
    """Assemble the shards' outputs into OUT/outputs (refuses while a shard is unfinished).

    \b
    Example:
      bulkinfer merge out/my-job
    """
    from pathlib import Path

    from bulkinfer.io.layout import OutputLayout
    from bulkinfer.job.exits import writes_reported
    from bulkinfer.job.finish import token_bytes_of_job
    from bulkinfer.state.merge import merge_shards

    root = OutputLayout(Path(output))
    with writes_reported(root):
        summary = merge_shards(root, token_bytes_of_job)
    if summary is None:
        click.echo(f"{output}/outputs: the shards are merged already; nothing to do")
        return
    click.echo(
        f"merged {counted(summary.details['shards'], 'shard')}: "
        f"{counted(summary.rows_out, 'row')} in {output}/outputs"
    )


@main.command(short_help="Submit the job as a Slurm array, one shard per task.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option(
    "--array",
    "array",
    type=click.IntRange(min=1),
    required=True,
    help="Number of array tasks (shards).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--output", "-o", default=None, help="Output folder (overrides output.path).")
@click.option(
    "--gpus-per-task", type=click.IntRange(min=0), default=0, help="GPUs per task (0: none)."
)
@click.option("--partition", default=None, help="Slurm partition to submit to.")
@click.option("--time", "time", default=None, help="Slurm time limit, e.g. 04:00:00.")
@click.option("--account", default=None, help="Slurm account to charge.")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None, help="CPUs per task.")
@click.option("--mem", default=None, help="Memory per task, e.g. 64G.")
@click.option(
    "--grace",
    "grace_seconds",
    type=click.IntRange(min=1),
    default=120,
    help="Seconds of warning before the time limit.",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Run at most N array tasks at once (Slurm's %N array throttle).",
)
@click.option("--dry-run", is_flag=True, help="Print the sbatch script instead of submitting it.")
def slurm(job, array, overrides, output, dry_run, **settings) -> None:
    """Submit the job as a Slurm array: one shard per task, requeued on preemption.

    \b
    Example:
      bulkinfer slurm jobs/sample.yaml --array 64 --gpus-per-task 1 --time 04:00:00 --dry-run
    """
    from pathlib import Path

    from bulkinfer.executors.slurm import (
        SlurmOptions,
        refuse_while_queued,
        sbatch_script,
        submit,
    )
    from bulkinfer.io.atomic import write_bytes_atomic
    from bulkinfer.io.layout import OutputLayout
    from bulkinfer.sharding import Shard, checked, refuse_row_column
    from bulkinfer.state.folder import refuse_for_array
    from bulkinfer.state.records import SlurmSubmission

    spec = _load(job, overrides, output)
    root = Path(spec.output.path)
    checked(Shard(0, array), "--array")  # what every task's --shard I/N would refuse
    refuse_row_column(spec.input.keep_columns)
    options = SlurmOptions(array=array, **settings)
    script = sbatch_script(Path(job).resolve(), root, [f"--set={o}" for o in overrides], options)
    layout = OutputLayout(root)
    refuse_for_array(layout, array)
    if dry_run:
        click.echo(script)
        return
    refuse_while_queued(layout.slurm_script)
    made = [p for p in (root, layout.slurm_logs) if not p.exists()]
    layout.slurm_logs.mkdir(parents=True, exist_ok=True)
    path = layout.slurm_script
    existed = path.exists()
    write_bytes_atomic(path, script.encode())
    try:
        job_id = submit(path)
    except BaseException:  # nothing was submitted: leave no folder a later run would refuse
        if not existed:
            path.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    SlurmSubmission.add(layout.slurm_jobs, job_id, array)
    click.echo(
        f"submitted array job {job_id} ({counted(array, 'task')}); "
        f"follow it with: bulkinfer status {_shell_word(root)}"
    )


@main.command(short_help="Print rows, lengths, batches and padding; no weights loaded.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(job: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Read and tokenize the input, print rows, lengths, batches and padding; no weights loaded.

    \b
    Example:
      bulkinfer plan jobs/sample.yaml --set batching.max_tokens=4096
    """
    from bulkinfer.job.planning import plan_job

    spec = _load(job, overrides, None)
    skip_unused_imports(spec)
    report = plan_job(spec)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_plan(report))


@main.command(short_help="Write a commented job spec to start from.")
@click.argument("path", default="job.yaml", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing file.")
def init(path: str, force: bool) -> None:
    """Write a commented job spec to start from: every key with its default (PATH: job.yaml).

    \b
    Example:
      bulkinfer init jobs/my-job.yaml     # then fill in model.path, input.path, output.path
    """
    from pathlib import Path

    from bulkinfer.errors import UserError
    from bulkinfer.io.atomic import write_bytes_atomic
    from bulkinfer.spec.template import job_template

    target = Path(path)
    if (target.exists() or target.is_symlink()) and not force:  # a dangling link too
        raise UserError(f"{target} already exists; pass --force to replace it")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such folder")
    write_bytes_atomic(target, job_template(target.name).encode())
    click.echo(
        f"wrote {target}; fill in the three FILL IN paths, then: bulkinfer validate {_shell_word(target)}"
    )


@main.command(short_help="Check spec, model, input and output folder; no weights loaded.")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--output", "-o", default=None, help="Output folder (overrides output.path).")
def validate(job: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Check the spec, the model's tokenizer and config, the input files and their columns, and
    the output folder, without loading weights: exit 0 and a summary, or one line. The first
    rows are rendered and tokenized (their length checked); the rest are counted.

    \b
    Example:
      bulkinfer validate jobs/sample.yaml --set input.keep_columns=[source]
    """
    from bulkinfer.job.validate import check_job, format_check

    spec = _load(job, overrides, output)
    skip_unused_imports(spec)
    click.echo(format_check(job, check_job(spec)))


@main.command(short_help="Write OUT/report.html: what happened, at a glance.")
@click.argument("output", type=click.Path(file_okay=False))
def report(output: str) -> None:
    """Write OUT/report.html (one self-contained file) and its plots in OUT/report/: summary,
    rows by status and errors, token lengths, throughput over time, padding, shard progress.
    Works on a finished, running or sharded job folder.

    \b
    Example:
      bulkinfer report out/sample && xdg-open out/sample/report.html
    """
    from pathlib import Path

    from bulkinfer.io.layout import OutputLayout
    from bulkinfer.job.exits import writes_reported
    from bulkinfer.observe.report import write_report

    with writes_reported(OutputLayout(Path(output))):
        page = write_report(Path(output))
    click.echo(f"wrote {page}")


def render_new_tokens(new_tokens: int, samples: int) -> str:
    """The plan's new tokens, a sample's where a row generates several."""
    if not new_tokens:
        return ""
    if samples > 1:
        return f", {new_tokens:,} new tokens per sample, up to {samples} samples per row"
    return f", {counted(new_tokens, 'new token')} per row"


def render_plan(report: dict) -> str:
    planned = "sorted and packed" if report.get("sorted", True) else "as planned (sort: none)"
    lines = [
        f"rows             {report['rows']:,} ({report['row_errors']:,} with errors, not run)",
        f"input tokens     {report['input_tokens']:,} "
        f"(min {report['lengths']['min']}, median {report['lengths']['median']:.0f}, "
        f"max {report['lengths']['max']})",
        f"token budget     {report['max_tokens']:,} per batch, at most {report['max_batch_size']} rows"
        + render_new_tokens(report["new_tokens_per_row"], report.get("samples_per_row", 1)),
        f"batches          {report['batches_sorted']:,} {planned} "
        f"({report['batches_file_order']:,} in file order)",
        f"padding          {report['padding_sorted']:.1%} {planned}, "
        f"{report['padding_file_order']:.1%} in file order",
        "",
        "prompt tokens    rows",
    ]
    peak = max((c for _, _, c in report["histogram"]), default=0)
    for low, high, count in report["histogram"]:
        bar = "#" * (round(40 * count / peak) if peak else 0)
        span = f"{low:>6}-{high:<7}" if high != low else f"{low:>6} {'':<7}"
        lines.append(f"{span}  {count:>7,}  {bar}")
    if report["example_errors"]:
        shown = len(report["example_errors"])
        lines += ["", f"rows with errors (the first {shown} of {report['row_errors']:,}):"]
    for where, message in report["example_errors"]:
        lines.append(f"  {where}: {message}")
    lines += render_prefixes(report.get("shared_prefixes"))
    if report.get("engine"):
        lines += ["", render_engine(report["engine"])]
    return "\n".join(lines)


def render_engine(limits: dict) -> str:
    """The plan's engine line: which engine runs the job on which device, and with what."""
    kind = limits["kind"]
    decodes = limits.get("task", "generate") == "generate"  # score keeps no KV cache
    parts = []
    if limits.get("slots") and decodes:
        parts.append(f"{limits['slots']:,} rows decoded together")
    if limits.get("kv_tokens") and decodes:
        parts.append(f"KV pool of {limits['kv_tokens']:,} tokens")
    if limits.get("quantization") == "fp8":
        parts.append("fp8 weights")
    if limits.get("kv_cache_dtype") == "fp8":
        parts.append("fp8 KV cache" if decodes else "fp8 KV cache unused (score keeps none)")
    line = f"engine           {kind} on {limits['device_name']}"
    if parts:
        line += ": " + ", ".join(parts)
    if kind == "reference" and limits.get("why_not_fast"):
        line += f" (not the fast engine: {limits['why_not_fast']})"
    return line


def render_prefixes(prefixes: dict | None) -> list[str]:
    """The plan's shared-prefix lines (none when no row is long enough to share one)."""
    if not prefixes:
        return []
    if not prefixes["groups"]:
        return [
            "",
            f"shared prefixes  none (no rows share their first {prefixes['min_tokens']} tokens)",
        ]
    saved = f"{prefixes['saved_tokens']:,} prompt tokens ({prefixes['saved_share']:.0%})"
    if prefixes.get("engine", "fast") == "fast":
        saving = f"the fast engine computes each prefix once: saves up to {saved}"
    elif not prefixes.get("fast_possible", True):
        saving = (
            f"the reference engine runs this model and computes rows whole (the fast engine, "
            f"which would save up to {saved}, cannot run it)"
        )
    else:  # the reference engine computes every row whole
        saving = (
            f"the reference engine runs this job and computes rows whole (the fast engine, "
            f"model.engine: fast, would save up to {saved})"
        )
    lines = [
        "",
        f"shared prefixes  {counted(prefixes['groups'], 'group')}, "
        f"{counted(prefixes['rows'], 'row')}; {saving}",
        "prefix tokens    rows",
    ]
    for group in prefixes["largest"]:
        lines.append(f"{group['prefix_tokens']:>13,}  {group['rows']:>7,}")
    return lines


if __name__ == "__main__":
    entry()
