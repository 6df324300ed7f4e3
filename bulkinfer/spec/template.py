"""The commented job spec `bulkinfer init` writes: every section and key with its default.

It is built from the spec's own dataclasses, so a key added to spec.py appears here with its true
default; the comments come from COMMENTS below, and the choices of a Literal key are listed.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import yaml

from bulkinfer.spec import JobSpec

# Placeholders for the keys that have no default: the places a new job must fill in.
REQUIRED = {
    "model.path": "models/my-model",
    "input.path": "data/*.parquet",
    "output.path": "out/my-job",
}

COMMENTS = {
    "model": "the weights, and where they run",
    "model.path": "FILL IN: a Hugging Face folder, .gguf file, or package:NAME/FILE",
    "model.dtype": "auto: bfloat16 on GPU, float32 on CPU",
    "model.device": "auto | cpu | cuda | cuda:N | mps",
    "model.max_context": "override the model's context length (null: from its config)",
    "model.trust_remote_code": "never run code from the model folder unless set",
    "model.allow_pickle": "refuse .bin/.pt weights (pickle can run code) unless set",
    "model.attn_implementation": "null: transformers picks (sdpa where the model has it)",
    "model.quantization": "none | fp8: linear weights in float8 (fast engine; GPU: Ada, Hopper)",
    "model.kv_cache_dtype": "auto: the model's dtype | fp8: the KV cache in float8 with scales",
    "task": "what to compute per row",
    "task.type": "what each output row holds (see the README: Tasks)",
    "task.max_new_tokens": "generate: tokens to add at most per row",
    "task.temperature": "0 = greedy (so is anything under 1e-5)",
    "task.top_p": "nucleus sampling; 1.0 = off",
    "task.top_k": "0 = off",
    "task.seed": "sampling is keyed by (seed, row): resumed runs reproduce exactly",
    "task.stop": "stop strings; the text is cut before the first one",
    "task.n": "samples per prompt; n > 1 makes the text columns lists",
    "task.logprobs": "add each generated token's id, text and log-prob",
    "task.top_logprobs": "0-20: also each token's most likely alternatives (top_logprobs)",
    "task.chat_template": "auto: messages always, plain prompts when generating",
    "task.system_prompt": "prepended as a system turn when the chat template is used",
    "task.all_labels": "classify: every label's probability in `probabilities`",
    "task.multi_label": "classify: auto (the model's problem_type) | true | false",
    "task.threshold": "classify, multi-label: labels at or above this go in `labels`",
    "task.pooling": "embed: auto (the model's sentence-transformers pooling) | mean | cls | last",
    "task.normalize": "embed: auto (a Normalize module in modules.json) | true | false",
    "task.truncate": "classify, embed: cut rows over the model's limit instead of an error",
    "input": "the prompts",
    "input.path": "FILL IN: a file, folder, glob, or a list of them",
    "input.format": "auto: by extension; hf: files through `datasets`",
    "input.split": "a saved DatasetDict's split (needed when it has several)",
    "input.prompt_column": "a string, or a list of {role, content} messages",
    "input.completion_column": "score: log-likelihood of this column given the prompt",
    "input.choices_column": "score: log-likelihood of each string in this list column",
    "input.id_column": "null: the column `id` if present, else the row position",
    "input.keep_columns": "input columns copied to the output, e.g. [source]",
    "input.max_line_bytes": "a longer JSONL line is a row error (an error with ids), not read",
    "output": "where results, stats and checkpoints go",
    "output.path": "FILL IN: relative paths start at this file's folder",
    "output.format": "auto: Parquet, plus responses.jsonl for an OpenAI batch input",
    "batching": "token-budget batches of length-sorted rows",
    "batching.max_tokens": "padded tokens per batch; auto: 16384 on CPU, else from free GPU memory",
    "batching.max_batch_size": "rows per batch at most; auto: 4x the fast engine's decode slots "
    "for generate on a GPU, 8192 for its packed scoring on a GPU, else 256",
    "batching.sort": "length: longest first, least padding | none: file order",
    "batching.max_padding": "score, classify, embed: a batch of max_tokens/4 (8k at most) "
    "tokens stops past this padding",
    "batching.min_shared_prefix": "rows sharing this many first tokens share a prefix; 0: off",
    "checkpoint": "resumability",
    "task.response_format": "generate: null (text), or {type: json_schema, schema: {...}}, "
    "{type: json_object}, {type: regex, pattern: ...}, {type: choice, choices: [...]}",
    "checkpoint.every_rows": "commit a part at least this often",
    "checkpoint.every_seconds": "and at least this often: rows finished so far, even mid-batch",
    "progress": "log lines",
    "progress.log_every_seconds": "progress lines when stderr is not a terminal (Slurm logs, JSON)",
    "on_error": "record: a failing row gets an `error`; fail: it stops the job",
}

HEADER = """\
# A bulkinfer job spec. Fill in the three FILL IN paths, then:
#   bulkinfer validate {name}     # checks the spec and the input columns, loads no weights
#   bulkinfer plan {name}         # rows, token lengths, batches and padding
#   bulkinfer run {name}          # run, or resume where it stopped
# Every key below shows its default; delete the ones you do not change. Any key can also be set
# on the command line: --set task.max_new_tokens=64
"""


def job_template(name: str = "job.yaml") -> str:
    """The text of a commented job spec for `bulkinfer init`."""
    lines = [HEADER.format(name=name)]
    lines += _section_lines(JobSpec, "", 0)
    return "\n".join(lines).rstrip() + "\n"


def _section_lines(cls: type, prefix: str, indent: int) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines: list[str] = []
    pad = "  " * indent
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            comment = COMMENTS.get(key)
            lines.append(f"{pad}{f.name}:" + (f"  # {comment}" if comment else ""))
            lines += _section_lines(hint, f"{key}.", indent + 1)
            if indent == 0:
                lines.append("")
            continue
        value = _yaml_value(_default(f, key))
        choices = _choices(hint)
        comment = COMMENTS.get(key) or (choices if " | " in choices else "")
        if " | " in choices and comment != choices and "|" not in comment:
            comment = f"{choices}; {comment}"
        entry = f"{pad}{f.name}: {value}"
        lines.append(f"{entry:<28} # {comment}" if comment else entry)
        if indent == 0:
            lines.append("")
    return lines


def _default(f: dataclasses.Field, key: str) -> Any:
    if key in REQUIRED:
        return REQUIRED[key]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"spec key {key} has no default and no placeholder in REQUIRED")


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1000)
    return text.strip().removesuffix("...").strip()


def _choices(hint: Any) -> str:
    """`a | b | c` for a Literal key (or an optional Literal), else ''."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is Literal:
            return " | ".join(str(a) for a in typing.get_args(arg))
    return ""
