"""What `validate`, `plan` and `run` share: the job fitted to its input files and its model.

The input files are resolved and their format sniffed once, their columns read once, the model's
tokenizer and config loaded once (no weights): every spec, input and model-folder error a user
can cause surfaces here, in a second, before a batch runs or a weight loads.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bulkinfer import faults, process
from bulkinfer.engines.base import GREEDY_BELOW, LoadOptions
from bulkinfer.errors import InputError, RowFailedError, SpecError, counted
from bulkinfer.io.chunks import ColumnNames
from bulkinfer.io.files import DATASETS_ONLY_SUFFIXES, DataFile, resolve_input_files
from bulkinfer.io.openai_batch import EMBEDDINGS_URL, RESPONSE_FIELDS
from bulkinfer.io.readers import peek_columns, read_chunks
from bulkinfer.job.loading import planned_engine
from bulkinfer.model_files import (
    ModelFiles,
    load_config,
    load_tokenizer,
    local_model_folder,
    resolve_model_files,
)
from bulkinfer.observe.progress import log
from bulkinfer.overlap import Background, in_background, timed
from bulkinfer.prepare import (
    PreparedRows,
    RenderOptions,
    prepare_rows,
    prepared_location,
    render_options,
)
from bulkinfer.prepare.reuse import keep_for_resume, reuse
from bulkinfer.spec import JobSpec
from bulkinfer.tasks.base import InputKind, Task, make_task


@dataclass(frozen=True)
class JobSetup:
    """The job fitted to its input files and model: known in a moment from the files' first
    columns and the model's tokenizer and config; no row read, no weight loaded."""

    spec: JobSpec
    files: list[DataFile]
    model: ModelFiles
    columns: ColumnNames
    tokenizer: object
    config: object
    kind: InputKind
    task: Task
    options: RenderOptions

    @property
    def openai_responses(self) -> bool:
        """Whether the job writes OUT/responses.jsonl (OpenAI batch input, or asked for)."""
        return writes_responses(self.spec, self.kind.per_request)


def writes_responses(spec: JobSpec, per_request: bool) -> bool:
    """Whether a job writes OUT/responses.jsonl: asked for, or by default for a requests file."""
    fmt = spec.output.format
    return fmt == "openai" or (fmt == "auto" and per_request)


@dataclass
class Inputs:
    """The tokenized input: per-row lengths in memory, token ids in spill files."""

    setup: JobSetup
    prepared: PreparedRows

    @property
    def task(self) -> Task:
        return self.setup.task


def set_up(
    spec: JobSpec, files: list[DataFile] | None = None, hash_model: bool = False
) -> JobSetup:
    """The task fitted to the model and the input's columns; spec, input-column and
    model-folder errors surface here. `hash_model` (a run, which fingerprints the model's
    contents): hash the model's files on a thread meanwhile."""
    if files is None:
        passed_over: list[str] = []
        files = resolve_input_files(
            spec.input.path, spec.input.format, spec.output.path, spec.input.split, passed_over
        )
        say_passed_over(passed_over, spec.input.format)
    per_request = is_openai_batch(spec, files)
    columns = column_names(spec, files, per_request)
    model = resolve_model_files(spec.model)
    if hash_model:  # a run
        from bulkinfer.engines.to_device import start_device  # imports torch, before the thread

        start_device(spec.model.device)
        model.hash_in_background()
        # a GGUF model is converted first, then its tokenizer and config read from the folder
        # (from the GGUF file each takes seconds, and the conversion reads both again)
        folder = local_model_folder(model)
        read_weights_ahead(spec, folder)
    tokenizer = load_tokenizer(model)
    config = load_config(model)
    kind = InputKind(per_request=per_request, choices=columns.choices is not None)
    task = make_task(spec, model, tokenizer, config, kind)
    if task.engine == "causal":  # (validate and plan load no weights: said here for them too)
        from bulkinfer.engines.select import refuse_not_decoder

        refuse_not_decoder(spec.model.path, config, generates=task.streams)
    options = render_options(
        spec.task,
        tokenizer,
        task.max_context,
        columns.completion is not None,
        has_choices=columns.choices is not None,
    )
    if per_request:  # a completions request's prompt is raw text, a chat request's a chat
        options = dataclasses.replace(options, use_chat_for_text=False, chat_never=False)
        if spec.task.chat_template != "auto":
            log(
                f"task.chat_template: {spec.task.chat_template} is not used for an OpenAI batch "
                "file: each request says itself (a chat request's messages go through the "
                "template, a completions request's prompt is raw text)",
                level="warning",
            )
    check_output_columns(spec, task, per_request)
    ignored = spec.task.ignored_keys()
    if ignored:
        log(
            f"task: {', '.join('task.' + k for k in ignored)} "
            f"{'has' if len(ignored) == 1 else 'have'} no effect on a score job "
            f"(it generates nothing): {'it is' if len(ignored) == 1 else 'they are'} ignored, "
            "and a changed value does not stop a resume",
            level="warning",
        )
    if spec.task.system_prompt is not None and not options.use_chat_for_text:
        log(
            f"task.system_prompt: {_system_prompt_unused(spec, tokenizer, per_request)}",
            level="warning",
        )
    generate = spec.task  # a requests file's own n and temperature: log_request_caveats
    greedy = generate.type == "generate" and generate.temperature < GREEDY_BELOW
    if greedy and generate.n > 1 and not per_request:
        log(
            f"task.n: {generate.n} samples at temperature 0 are greedy, so all equal; "
            "set task.temperature above 0 for different ones",
            level="warning",
        )
    return JobSetup(spec, files, model, columns, tokenizer, config, kind, task, options)


def read_weights_ahead(spec: JobSpec, folder: Path | None) -> None:
    """The weights on their way to the GPU while the tokenizer and config load
    (engines/read_ahead.py), in the command's own process: a library caller's refused run
    would hold them in device memory."""
    from bulkinfer.engines import read_ahead

    model = spec.model
    causal = spec.task.type in ("generate", "score")
    if (
        process.OWN
        and folder is not None
        and read_ahead.wanted(folder, model.engine, model.attn_implementation, causal, model.device)
    ):
        read_ahead.start(folder, model.device, fp8=model.quantization == "fp8")


def _system_prompt_unused(spec: JobSpec, tokenizer, per_request: bool) -> str:
    """Why plain-text prompts do not get the job's system prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return "the model's tokenizer has no chat template, whose system turn it is; it is not used"
    if per_request:
        return "completions requests' prompts are raw text and do not get it (chat requests do)"
    return (
        f"a {spec.task.type} job renders plain-text prompts without the chat template "
        "(task.chat_template: auto), so only prompts given as messages get it; set "
        "chat_template: always to give it to every row"
    )


def tokenize(setup: JobSetup, spill: Path | None = None, keep_tokens: bool = False) -> Inputs:
    """Read and tokenize the whole input. Only lengths stay in memory; with `keep_tokens`
    token ids, ids and kept columns go to files in `spill` (a temporary folder when None)."""
    chunks = read_chunks(setup.files, setup.columns, setup.spec.input.max_line_bytes)
    # rows of a choices job are scored whole (each row's choices share its own prompt)
    shares = setup.task.engine == "causal" and setup.columns.choices is None
    prefix = setup.spec.batching.min_shared_prefix if shares else 0
    every = setup.spec.progress.log_every_seconds
    names = [str(f.path) for f in setup.files]
    source = ", ".join(names[:3]) + (
        f" and {len(names) - 3:,} more files" if len(names) > 3 else ""
    )
    prepared = prepare_rows(
        chunks, setup.tokenizer, setup.options, spill, keep_tokens, prefix, every, source
    )
    say_truncated(setup, prepared)
    return Inputs(setup, prepared)


def say_truncated(setup: JobSetup, prepared: PreparedRows) -> None:
    if prepared.truncated:
        log(
            f"{counted(len(prepared.truncated), 'row')} longer than "
            f"{setup.task.max_context:,} tokens {'is' if len(prepared.truncated) == 1 else 'are'} "
            "truncated (task.truncate; counted per row in truncated_tokens)"
        )


def tokenize_for_run(setup: JobSetup, spill: Path, key: str, resumed: bool) -> Inputs:
    """The input tokenized into the job's folder (`spill`), and kept there for a resume under
    `key` (prepare/reuse.py); a resume reads what an earlier run of the job kept, if it can."""
    prepared = reuse(spill, key) if resumed else None
    if prepared is None:
        inputs = tokenize(setup, spill, keep_tokens=True)
        keep_for_resume(inputs.prepared, key)
        return inputs
    tokens = int(prepared.lengths.sum(dtype=np.int64))
    log(
        f"the input as an earlier run of this job tokenized it: {prepared.num_rows:,} rows "
        f"({tokens:,} tokens), not read again",
        event="tokenize",
        reused=True,
        rows_read=prepared.num_rows,
        tokens_read=tokens,
    )
    say_truncated(setup, prepared)
    return Inputs(setup, prepared)


# a load still going this long after the input is ready is said to be going
LOAD_QUIET_SECONDS = 5.0


def tokenize_while_loading(
    setup: JobSetup, loading: Background, spill: Path, key: str, resumed: bool
):
    """Tokenize the input on this thread (tokenize_for_run's) while `loading` (start_loading's)
    loads the weights on another (safetensors and the Rust tokenizer both release the GIL);
    returns the inputs, the engine and the seconds each took. An input error stops the job
    before any batch runs (see in_background for what becomes of the loading); a loading error
    is raised as the loader raised it."""
    start = time.monotonic()
    inputs = tokenize_for_run(setup, spill, key, resumed)
    prepare_seconds = time.monotonic() - start
    if setup.spec.on_error == "fail":
        check_no_failed_rows(inputs.prepared)
    if not loading.wait(LOAD_QUIET_SECONDS):  # a long load (a 70B model) says what it waits on
        size = setup.model.weight_bytes() / 1e9
        log(
            f"the input is ready ({len(inputs.prepared.lengths):,} rows); waiting for the "
            f"weights ({size:,.1f} GB on disk) to load",
            event="load",
        )
    engine, load_seconds = loading.result()
    log_request_caveats(inputs.prepared, setup.spec.task)
    return inputs, engine, {"load_seconds": load_seconds, "prepare_seconds": prepare_seconds}


def check_no_failed_rows(prepared: PreparedRows) -> None:
    """With `on_error: fail`, a row that cannot even be tokenized stops the job."""
    if prepared.row_errors:
        row, message = min(prepared.row_errors.items())
        raise RowFailedError(
            f"{prepared_location(prepared, row)}: {message} "
            f"({counted(len(prepared.row_errors), 'such row')}; on_error: record keeps them as "
            "row errors)"
        )


def say_passed_over(paths: list[str], fmt: str) -> None:
    """Files in an input folder that are not read: said, so no rows go missing unseen."""
    if not paths:
        return
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3:,} more" if len(paths) > 3 else "")
    kinds = {"parquet": "Parquet", "jsonl": "JSONL", "hf": "Parquet, JSONL and CSV"}
    kinds = kinds.get(fmt, "Parquet and JSONL")
    line = f"input.path: {counted(len(paths), 'file')} in the input folder not read: {shown}"
    line += f" (with input.format: {fmt}, only {kinds} files are read"
    if fmt == "auto" and any(p.lower().endswith(DATASETS_ONLY_SUFFIXES) for p in paths):
        line += "; CSV and TSV files are read with input.format: hf"
    log(line + ")", level="warning")


def is_openai_batch(spec: JobSpec, files: list[DataFile]) -> bool:
    """Whether the input is OpenAI Batch API request files (all of it, or none)."""
    kinds = {f.kind == "openai" for f in files}
    if len(kinds) > 1:
        raise InputError("the input mixes OpenAI batch request files with other files")
    if True in kinds and spec.task.type not in ("generate", "embed"):
        raise SpecError(
            f"task.type: OpenAI batch requests are answered by generate (chat, completions "
            f"and embeddings requests) or embed (embeddings requests), not {spec.task.type}"
        )
    if spec.output.format == "openai" and spec.task.type != "generate" and True not in kinds:
        raise SpecError(
            "output.format: openai responses come from task.type generate or an OpenAI batch input"
        )
    return True in kinds


def column_names(spec: JobSpec, files: list[DataFile], per_request: bool = False) -> ColumnNames:
    """The columns to read, from the first file with a row; with no id_column, an input column
    named 'id' is the id if present (and a later row or file that has one where the first has
    none is refused), and with the default prompt_column, a file with `messages` but no
    `prompt` uses `messages`. An OpenAI batch file's requests are keyed by custom_id."""
    if per_request:
        keep = tuple(spec.input.keep_columns)
        urls = (EMBEDDINGS_URL,) if spec.task.type == "embed" else None
        return ColumnNames("body", None, "custom_id", keep, request_urls=urls)
    present: list[str] = []
    for file in files:
        present = peek_columns(file, spec.input.max_line_bytes)
        if present:
            break
    id_column = spec.input.id_column
    absent_id = None
    if id_column is None and "id" in present:
        id_column = "id"
    elif id_column is None:
        absent_id = "id"
    prompt = spec.input.prompt_column
    if prompt == "prompt" and "prompt" not in present and "messages" in present:
        prompt = "messages"
    return ColumnNames(
        prompt=prompt,
        completion=spec.input.completion_column,
        id=id_column,
        keep=tuple(spec.input.keep_columns),
        choices=spec.input.choices_column,
        absent_id=absent_id,
    )


def check_output_columns(spec: JobSpec, task, per_request: bool = False) -> None:
    """A kept input column must not shadow an output column of the task, nor, where the job
    writes OpenAI responses, a field they are made of (a request's own `url` aside)."""
    taken = {"id", "error", *task.schema.names}
    responses = writes_responses(spec, per_request)
    read = RESPONSE_FIELDS - ({"url"} if per_request else set())
    for name in spec.input.keep_columns:
        if name in taken:
            raise SpecError(
                f"input.keep_columns: '{name}' clashes with the {task.name} task's output column "
                "of the same name; rename it in the input or drop it from keep_columns"
            )
        if responses and name in read:
            raise SpecError(
                f"input.keep_columns: '{name}' is a field of the OpenAI responses this job "
                "writes; rename it in the input or drop it from keep_columns"
            )
        alike = next((t for t in sorted(taken) if t.lower() == name.lower()), None)
        if alike is not None:  # allowed, but a reader that ignores case sees one name twice
            log(
                f"input.keep_columns: '{name}' differs from the output column '{alike}' only "
                "in case; readers that ignore case (Spark, DuckDB) take them for one column",
                level="warning",
            )


def log_request_caveats(prepared: PreparedRows, task) -> None:
    """Requests asking for more tokens than the plan reserves get task.max_new_tokens, and
    requests for several samples that run greedy (a request without `temperature` takes the
    job's, 0 by default, not the API's 1) get that many equal ones: say so."""
    params = prepared.request_params
    if params is None:
        return
    asked = params.column("max_new_tokens").fill_null(0).to_numpy()
    capped = int(np.sum(asked > task.max_new_tokens))
    if capped:
        log(
            f"{_requests(capped)} for more than task.max_new_tokens={task.max_new_tokens} "
            "tokens and stop there (finish_reason length); raise task.max_new_tokens to honour "
            "them"
        )
    samples = params.column("n").fill_null(task.n).to_numpy()
    temperature = params.column("temperature").fill_null(task.temperature).to_numpy()
    greedy = int(np.sum((samples > 1) & (temperature < GREEDY_BELOW)))
    if greedy:
        log(
            f"{_requests(greedy)} for n > 1 samples at temperature 0 (greedy: their samples "
            f"are equal); a request without `temperature` takes task.temperature="
            f"{task.temperature:g}, not the OpenAI API's default of 1",
            level="warning",
        )


def _requests(count: int) -> str:
    return "1 request asks" if count == 1 else f"{count:,} requests ask"


@contextmanager
def start_loading(
    setup: JobSetup, engine: str | None = None
) -> Iterator[tuple[Background, LoadOptions]]:
    """The job's engine loading on a thread while the body runs (in_background: leaving the
    body waits for it, or lets go of it as that says), and its load options; `engine`: the one
    `model.engine: auto` resolves to (a resume's, job/resume.py engine_as_ran)."""
    from bulkinfer.engines.compiling import hash_triton_key  # imports torch: not at --help

    # converts a GGUF once
    options, limits = planned_engine(setup.model, setup.config, setup.task, engine=engine)
    hash_triton_key(limits.kind, limits.device_type)

    def load():
        faults.slow_load()
        return setup.task.load_engine(options, setup.tokenizer, limits)

    with in_background(timed, load, name="bulkinfer-load") as loading:
        yield loading, options
