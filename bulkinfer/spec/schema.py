"""The job spec's typed, frozen objects; each checks its own values, naming the key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from bulkinfer.errors import SpecError, not_unicode

Auto = Literal["auto"]


@dataclass(frozen=True)
class ModelSpec:
    """Which weights to load and where to run them."""

    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    max_context: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attn_implementation: str | None = None
    # auto: the fast engine (packed scoring, continuous-batching decode) on a CUDA GPU where the
    # model supports it, the reference engine otherwise; fast or reference to force one.
    engine: Literal["auto", "fast", "reference"] = "auto"
    # fp8: the decoder layers' linear weights in float8_e4m3 with per-channel scales, matrix
    # products in fp8 (engines/fp8.py); on the fast engine only
    quantization: Literal["none", "fp8"] = "none"
    # fp8: the fast engine's KV cache in float8_e4m3 with a scale per token and head (~1.9x
    # the tokens in the same memory; decode reads half the bytes)
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"

    def validate(self, key: str) -> None:
        if not self.path:
            raise SpecError(f"{key}.path: give a model folder, a .gguf file or package:NAME/FILE")
        index = self.device.removeprefix("cuda:")
        ok_device = self.device in ("auto", "cpu", "cuda", "mps") or (
            self.device.startswith("cuda:") and index.isascii() and index.isdigit()
        )
        if not ok_device:
            raise SpecError(
                f"{key}.device: '{self.device}' is not one of auto, cpu, cuda, cuda:N, mps"
            )
        _at_least(self.max_context, 2, f"{key}.max_context")
        for name, value in (
            ("quantization", self.quantization),
            ("kv_cache_dtype", self.kv_cache_dtype),
        ):
            if value == "fp8" and self.engine == "reference":
                raise SpecError(
                    f"{key}.{name}: fp8 runs on the fast engine; {key}.engine is reference"
                )


MAX_TOP_LOGPROBS = 20  # alternatives per generated token at most (the OpenAI API's limit)
MAX_N = 4096  # samples per prompt at most (each a sequence of its own in the engine)
MAX_LINE_BYTES = 2**40  # the longest JSONL line input.max_line_bytes may allow

# Task keys that only mean something for some task types; a key set away from its default on
# another type is a mistake worth a one-line error (`pooling` on a generate job, `temperature` on
# an embed job). Keys of other features apply to every type.
GENERATE_KEYS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "logprobs",
    "top_logprobs",
    "response_format",
)
TASK_ONLY_KEYS = {
    "classify": ("all_labels", "multi_label", "threshold", "truncate"),
    "embed": ("pooling", "normalize", "truncate"),
}


@dataclass(frozen=True)
class TaskSpec:
    """What to compute per row."""

    type: Literal["generate", "score", "classify", "embed"] = "generate"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False
    # generate: also each token's most likely alternatives (0-20) in `top_logprobs`
    top_logprobs: int = 0
    # generate: the output kept to a JSON schema, any JSON object, a regular expression or a
    # list of strings ({type: json_schema, schema: {...}} | {type: json_object} |
    # {type: regex, pattern: ...} | {type: choice, choices: [...]}); engines/constraints.py
    response_format: dict | None = None
    chat_template: Literal["auto", "always", "never"] = "auto"
    system_prompt: str | None = None
    # classify: every label's probability in `probabilities`; multi-label (sigmoid) models,
    # detected from the model config unless set, list the labels at or above `threshold`.
    all_labels: bool = False
    multi_label: Auto | bool = "auto"
    threshold: float = 0.5
    # embed: auto takes pooling and normalisation from the model's sentence-transformers files.
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    normalize: Auto | bool = "auto"
    # classify, embed: rows longer than the model takes are cut (and counted in
    # `truncated_tokens`) instead of getting a row error.
    truncate: bool = False

    def validate(self, key: str) -> None:
        _at_least(self.max_new_tokens, 1, f"{key}.max_new_tokens")
        _at_least(self.temperature, 0.0, f"{key}.temperature")
        _at_least(self.top_k, 0, f"{key}.top_k")
        _at_least(self.n, 1, f"{key}.n")
        _at_most(self.n, MAX_N, f"{key}.n")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise SpecError(
                f"{key}.top_logprobs: {self.top_logprobs} must be from 0 to {MAX_TOP_LOGPROBS}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise SpecError(f"{key}.top_p: {self.top_p} must be in (0, 1]")
        if any(s == "" for s in self.stop):
            raise SpecError(f"{key}.stop: stop strings must not be empty")
        # text no output can hold: a stop string never met, a system prompt failing every row
        named = [(f"{key}.stop[{i}]", s) for i, s in enumerate(self.stop)]
        for name, text in [*named, (f"{key}.system_prompt", self.system_prompt or "")]:
            problem = not_unicode(text)
            if problem:
                raise SpecError(f"{name}: not valid Unicode: {problem}")
        if not 0.0 < self.threshold < 1.0:
            raise SpecError(
                f"{key}.threshold: {self.threshold} must be between 0 and 1, both excluded"
            )
        if self.response_format is not None:
            from bulkinfer.grammars import grammar_for

            try:
                grammar_for(self.response_format)
            except ValueError as exc:
                problem = str(exc)  # "response_format.type ...", "response_format: ..."
                if not problem.startswith("response_format"):
                    problem = f"response_format: {problem}"
                raise SpecError(f"{key}.{problem}") from None
        self._check_keys_fit_type(key)

    def ignored_keys(self) -> list[str]:
        """Generate's keys a score job sets away from their defaults: tolerated (score has
        always taken them, so a job file can switch type), but without effect."""
        if self.type != "score":
            return []
        defaults = TaskSpec()
        return [k for k in GENERATE_KEYS if getattr(self, k) != getattr(defaults, k)]

    def _check_keys_fit_type(self, key: str) -> None:
        """A key of another task type, set away from its default, is refused with its name."""
        allowed = set(TASK_ONLY_KEYS.get(self.type, ()))
        if self.type in ("generate", "score"):
            allowed.update(GENERATE_KEYS)  # score has always tolerated generate's keys
        for f in dataclasses.fields(self):
            owners = [t for t, names in TASK_ONLY_KEYS.items() if f.name in names]
            if f.name in GENERATE_KEYS:
                owners.append("generate")
            if not owners or f.name in allowed:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if getattr(self, f.name) != default:
                raise SpecError(
                    f"{key}.{f.name}: applies to {' and '.join(owners)} tasks, "
                    f"not to {self.type}; remove it"
                )


@dataclass(frozen=True)
class InputSpec:
    """Where the prompts are and which columns mean what."""

    path: list[str]
    format: Literal["auto", "jsonl", "parquet", "hf", "openai"] = "auto"
    prompt_column: str = "prompt"
    completion_column: str | None = None
    choices_column: str | None = None
    id_column: str | None = None
    keep_columns: list[str] = field(default_factory=list)
    split: str | None = None  # a saved DatasetDict's split
    # A JSONL line longer than this is a row error (an error with an id column), never parsed.
    max_line_bytes: int = 8 * 2**20

    def validate(self, key: str) -> None:
        if not self.path:
            raise SpecError(f"{key}.path: give at least one file, folder or glob")
        if any(not p.strip() for p in self.path):  # "" would read the spec's folder, all of it
            raise SpecError(f"{key}.path: a path is empty (an unset variable?)")
        reserved = {"id", "error"}
        for name in self.keep_columns:
            if name in reserved:
                raise SpecError(
                    f"{key}.keep_columns: '{name}' clashes with an output column of the same name"
                )
        _at_least(self.max_line_bytes, 64, f"{key}.max_line_bytes")
        _at_most(self.max_line_bytes, MAX_LINE_BYTES, f"{key}.max_line_bytes")
        if len(set(self.keep_columns)) != len(self.keep_columns):
            raise SpecError(f"{key}.keep_columns: a column is listed twice")
        if self.choices_column and self.completion_column:
            raise SpecError(
                f"{key}: give completion_column or choices_column, not both "
                "(a single completion is a list of one choice)"
            )


@dataclass(frozen=True)
class OutputSpec:
    path: str
    # auto: Parquet, plus OUT/responses.jsonl when the input is an OpenAI batch file;
    # openai: responses.jsonl always (generate only); parquet: Parquet only.
    format: Literal["auto", "parquet", "openai"] = "auto"

    def validate(self, key: str) -> None:
        if not self.path:
            raise SpecError(f"{key}.path: give an output folder")


@dataclass(frozen=True)
class BatchingSpec:
    """Token budget per batch: rows x padded length (plus new tokens for generate)."""

    max_tokens: int | Auto = "auto"
    # auto: what the engine keeps busy (resolved in job/budget.py)
    max_batch_size: int | Auto = "auto"
    sort: Literal["length", "none"] = "length"
    # A batch at least a quarter full stops taking rows that would push its padding past this.
    max_padding: float = 0.1
    # generate, score: rows whose first this many tokens are identical share a prefix (found by
    # the plan, reported by `bulkinfer plan`); 0 looks for none
    min_shared_prefix: int = 256

    def validate(self, key: str) -> None:
        _at_least(self.min_shared_prefix, 0, f"{key}.min_shared_prefix")
        if not 0.0 <= self.max_padding <= 1.0:
            raise SpecError(f"{key}.max_padding: {self.max_padding} must be between 0 and 1")
        if self.max_tokens != "auto":
            _at_least(self.max_tokens, 16, f"{key}.max_tokens")
        if self.max_batch_size != "auto":
            _at_least(self.max_batch_size, 1, f"{key}.max_batch_size")


@dataclass(frozen=True)
class CheckpointSpec:
    every_rows: int = 2000
    # a part is committed at least this often while rows finish, even when a batch holds
    # fewer rows than every_rows or is still running
    every_seconds: float = 180.0

    def validate(self, key: str) -> None:
        _at_least(self.every_rows, 1, f"{key}.every_rows")
        _at_least(self.every_seconds, 1, f"{key}.every_seconds")


@dataclass(frozen=True)
class ProgressSpec:
    log_every_seconds: float = 30.0

    def validate(self, key: str) -> None:
        _at_least(self.log_every_seconds, 0.1, f"{key}.log_every_seconds")


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    task: TaskSpec = field(default_factory=TaskSpec)
    batching: BatchingSpec = field(default_factory=BatchingSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    progress: ProgressSpec = field(default_factory=ProgressSpec)
    # record: a row that cannot run gets an `error` value and the job goes on; fail: it stops
    # the job (before the model loads, for problems found while reading).
    on_error: Literal["record", "fail"] = "record"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PACKAGE_PREFIX = "package:"


def _at_least(value: float | None, low: float, key: str) -> None:
    if value is not None and value < low:
        raise SpecError(f"{key}: {value:,} is too small (the least allowed is {low:,})")


def _at_most(value: float | None, high: float, key: str) -> None:
    if value is not None and value > high:
        raise SpecError(f"{key}: {value:,} is too large (the most allowed is {high:,})")
