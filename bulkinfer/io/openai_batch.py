"""OpenAI Batch API files: request JSONL in, response JSONL out, so an existing batch file runs
unchanged on local GPUs.

A request line is `{"custom_id", "method", "url", "body"}` with `body.messages` (chat
completions), `body.prompt` (completions) or `body.input` (embeddings). Body fields bulkinfer
honours become per-row settings; a field it cannot honour makes that request a row error
(status 400 in the response), never a silently different answer.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bulkinfer.errors import InputError, not_unicode
from bulkinfer.grammars import SPECIAL_MARK
from bulkinfer.io.atomic import write_lines_atomic

# U+2028 and U+2029 escaped in the lines written: valid JSON either way, but tools that split
# text on Unicode line breaks (str.splitlines, JavaScript) would cut a line at them
LINE_SEPARATORS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029"})

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)

# Per-row settings, null where the job's own setting holds; what the generate task reads.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
REQUEST_SCHEMA = pa.schema(
    [
        ("max_new_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),
        ("n", pa.int64()),
        ("stop", pa.list_(pa.string())),
        ("logprobs", pa.bool_()),
        ("top_logprobs", pa.int64()),
        ("response_format", pa.string()),  # JSON text; engines/constraints.py
        # embeddings requests: the texts to embed, the answer's encoding, the size asked for
        ("embed_input", pa.list_(pa.string())),
        ("encoding_format", pa.string()),
        ("dimensions", pa.int64()),
    ]
)
MAX_TOP_LOGPROBS = 20  # the API's limit on alternatives per token
MAX_N = 4096  # samples per request at most, as task.n (spec/schema.py)

# Body fields that change nothing here when they hold these values (or null).
NEUTRAL = {
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "stream": (False,),
    "echo": (False,),
    "best_of": (1,),
    "logit_bias": ({},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),
}
# The roles a chat message may have (the API's; `developer` is read as `system`).
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Body fields that never change the generated text.
IGNORED = {"model", "user", "metadata", "store", "stream_options", "service_tier"}


TokenBytes = Callable[[int], bytes]  # a token id's own bytes


class RequestProblem(ValueError):
    """A request bulkinfer cannot answer as asked; its message becomes the row's error."""


def looks_like_batch_record(record: dict) -> bool:
    """A request line of an OpenAI Batch file: a custom_id with a body, url or method (a first
    request missing its body is still one, answered as a 400 row, not a prompt file's line),
    or a body with an API url (a first request missing its custom_id: refused naming it, not
    read as a prompt file's line)."""
    if not isinstance(record, dict):
        return False
    if "custom_id" not in record:  # one missing only its custom_id: a 400 row naming it
        url = record.get("url")
        return isinstance(record.get("body"), dict) and isinstance(url, str) and url in URLS
    return any(key in record for key in ("body", "url", "method"))


def parse_request(record: dict, answered: tuple[str, ...] = URLS) -> tuple[Any, dict]:
    """The prompt (messages or text) and the per-row settings of one request line, whose url
    must be one of those the job `answered`."""
    method, url, body = record.get("method", "POST"), record.get("url"), record.get("body")
    if method != "POST":
        raise RequestProblem(f"method {method!r} is not supported; batch requests are POST")
    if url not in URLS:
        raise RequestProblem(f"url {url!r} is not supported; use {', '.join(URLS)}")
    if url not in answered:
        raise RequestProblem(
            f"url {url} is not answered by this job, which answers {', '.join(answered)} "
            "(task.type embed answers embeddings; generate answers all three)"
        )
    if not isinstance(body, dict):
        raise RequestProblem("body is not an object")
    if url == EMBEDDINGS_URL:
        return _embedding_request(body)
    key = "messages" if url == CHAT_URL else "prompt"
    if key not in body:
        raise RequestProblem(f"body has no '{key}', which {url} requests need")
    prompt = _chat_messages(body[key]) if url == CHAT_URL else _completion_prompt(body[key])
    return prompt, _settings(body, url)


def _embedding_request(body: dict) -> tuple[str, dict]:
    """An embeddings request: its longest input stands for it in the plan (each input is
    tokenized and embedded on its own when its batch runs)."""
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts:
        raise RequestProblem("body.input must be a string or a non-empty list of strings")
    for k, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise RequestProblem(
                f"body.input[{k}] is {_shown(text, 40)}, expected a non-empty string "
                "(token arrays are not supported)"
            )
        _unicode(text, f"body.input[{k}]")
    settings: dict[str, Any] = {"embed_input": texts, "encoding_format": "float"}
    for name, value in body.items():
        if value is None or name in IGNORED or name == "input":
            continue
        if name == "encoding_format" and value in ("float", "base64"):
            settings["encoding_format"] = value
        elif name == "dimensions":
            settings["dimensions"] = _number(name, value, int, 1)
        else:
            raise RequestProblem(f"body.{name} = {_shown(value, 60)} is not supported")
    return max(texts, key=len), settings


def _settings(body: dict, url: str) -> dict:
    settings: dict[str, Any] = {}
    for name, value in body.items():
        if (
            value is None
            or name in IGNORED
            or name == ("messages" if url == CHAT_URL else "prompt")
        ):
            continue  # (the other one, prompt in a chat request, is refused below: not answered)
        if name in ("max_tokens", "max_completion_tokens"):
            limit = _number(name, value, int, 1)
            if settings.get("max_new_tokens", limit) != limit:
                raise RequestProblem(
                    "body.max_tokens and body.max_completion_tokens differ "
                    f"({body['max_tokens']} and {body['max_completion_tokens']}); give one"
                )
            settings["max_new_tokens"] = limit
        elif name == "temperature":
            settings["temperature"] = _number(name, value, float, 0.0, 2.0)
        elif name == "top_p":
            settings["top_p"] = _number(name, value, float, 0.0, 1.0)
            if settings["top_p"] == 0.0:
                raise RequestProblem("body.top_p must be above 0")
        elif name == "seed":
            settings["seed"] = _number(name, value, int)
        elif name == "n":
            settings["n"] = _number(name, value, int, 1, MAX_N)
        elif name == "stop":
            settings["stop"] = _stops(value)
        elif name == "logprobs":
            settings["logprobs"], top = _logprobs(value, url)
            if url == COMPLETIONS_URL:  # its own count, 0 included, not the job's
                settings["top_logprobs"] = top
        elif name == "top_logprobs" and url == CHAT_URL:
            settings["top_logprobs"] = _number(name, value, int, 0, MAX_TOP_LOGPROBS)
        elif name == "response_format":
            settings["response_format"] = _response_format(value)
        elif name in NEUTRAL and value in NEUTRAL[name]:
            continue
        else:
            raise RequestProblem(f"body.{name} = {_shown(value, 60)} is not supported")
    if settings.get("top_logprobs") and not settings.get("logprobs"):
        raise RequestProblem("body.top_logprobs needs body.logprobs set to true")
    return settings


def _shown(value: Any, most: int) -> str:
    """A request's value as its error line shows it: as JSON, cut past `most` characters."""
    text = json.dumps(value)
    return text if len(text) <= most else f"{text[:most]}... ({len(text):,} characters)"


def _number(name: str, value: Any, kind: type, low=None, high=None):
    """A request's number, refused unless it is of `kind` (NaN and infinities never are; a
    whole number must fit in 64 bits) and within [low, high]."""
    ok = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool):
        ok = False
    elif ok and kind is int:
        ok = INT64_MIN <= value <= INT64_MAX and (isinstance(value, int) or value.is_integer())
    if kind is int:
        low = INT64_MIN if low is None else low
        high = INT64_MAX if high is None else high
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        # (a 64-bit integer's ends are no bounds to name)
        lo = None if low in (None, INT64_MIN) else low
        hi = None if high in (None, INT64_MAX) else high
        if lo is not None and hi is not None:
            bounds = f" from {lo:,} to {hi:,}"
        elif lo is not None or hi is not None:
            bounds = f" of at least {lo:,}" if hi is None else f" of at most {hi:,}"
        else:
            bounds = " that fits in 64 bits" if kind is int else ""
        what = "a whole number" if kind is int else "a number"
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else f"{shown[:20]}... ({len(shown):,} digits)"
        raise RequestProblem(f"body.{name} is {shown}, expected {what}{bounds}")
    return kind(value)


def _response_format(value: Any) -> str | None:
    """A request's response_format as JSON text, refused with the problem named where it is
    not one bulkinfer can keep to. {"type": "text"} is kept too: a request asking for plain
    text gets it where the job keeps its rows to a format."""
    if not isinstance(value, dict) or value.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise RequestProblem(
            f"body.response_format = {_shown(value, 60)} is not supported; "
            "use type text, json_object or json_schema"
        )
    if value["type"] == "text":
        return json.dumps({"type": "text"})
    from bulkinfer.grammars import grammar_of_json

    text = json.dumps(value)  # key order kept: a schema's properties come out in its order
    _unicode(json.dumps(value, ensure_ascii=False), "body.response_format")
    try:
        grammar_of_json(text)
    except ValueError as exc:
        raise RequestProblem(f"body.{exc}") from None
    return text


def _stops(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestProblem("body.stop must be a non-empty string or a list of them")
    for k, stop in enumerate(stops):
        _unicode(stop, "body.stop" if isinstance(value, str) else f"body.stop[{k}]")
    return stops


def _unicode(text: str, where: str) -> None:
    """Refuse text holding a lone surrogate (JSON's "\\ud800" decodes to one), which no
    tokenizer or Parquet file can take."""
    problem = not_unicode(text)
    if problem:
        raise RequestProblem(f"{where} is not valid Unicode: {problem}")


def _logprobs(value: Any, url: str) -> tuple[bool, int]:
    """Whether log-probs are wanted, and how many most likely alternatives per token. Chat:
    true/false (alternatives come from body.top_logprobs). Completions: an int, the number of
    alternatives (0: the chosen tokens alone)."""
    if url == CHAT_URL and isinstance(value, bool):
        return value, 0
    if url == COMPLETIONS_URL and isinstance(value, int) and not isinstance(value, bool):
        return True, _number("logprobs", value, int, 0, MAX_TOP_LOGPROBS)
    raise RequestProblem(f"body.logprobs is {json.dumps(value)}, not valid for {url}")


def _chat_messages(value: Any) -> list[dict]:
    """Messages as chat templates take them: text parts joined, `developer` read as `system`."""
    if not isinstance(value, list) or not value:
        raise RequestProblem("body.messages must be a non-empty list")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message:
            raise RequestProblem(f"body.messages[{k}] is not an object with a role")
        message = dict(message)
        if message["role"] not in ROLES:
            raise RequestProblem(
                f"body.messages[{k}].role is {_shown(message['role'], 40)}, "
                f"expected one of {', '.join(ROLES)}"
            )
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestProblem(
                    f"body.messages[{k}].content has non-text parts, which are not supported"
                )
            for j, part in enumerate(content):
                if not isinstance(part.get("text"), str):
                    raise RequestProblem(
                        f"body.messages[{k}].content[{j}].text is "
                        f"{_shown(part.get('text'), 40)}, expected a string"
                    )
            message["content"] = "".join(part["text"] for part in content)
        if message["role"] == "developer":
            message["role"] = "system"
        messages.append(message)
    return messages


def _completion_prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise RequestProblem(
            "body.prompt must be one string (lists of prompts and token arrays are not supported)"
        )
    return value


def request_chunk_fields(
    records: list[dict], where: list[str], answered: tuple[str, ...] | None = None
) -> tuple[list, list, list[str], pa.Table, dict[int, str]]:
    """prompts, custom_ids, urls, settings table and row problems of consecutive request lines
    (`answered`: the urls the job answers, None for all)."""
    prompts, ids, urls, settings, problems = [], [], [], [], {}
    for i, (record, location) in enumerate(zip(records, where, strict=True)):
        custom_id = record.get("custom_id")
        refuse_not_a_request(location, record)
        if not isinstance(custom_id, str) or not custom_id:
            raise InputError(f"{location}: custom_id must be a non-empty string")
        ids.append(custom_id)
        urls.append(record.get("url") if isinstance(record.get("url"), str) else None)
        try:
            prompt, row_settings = parse_request(record, answered or URLS)
        except RequestProblem as exc:
            prompt, row_settings = None, {}
            problems[i] = f"invalid request: {exc}"
        prompts.append(prompt)
        settings.append(row_settings)
    return prompts, ids, urls, pa.Table.from_pylist(settings, schema=REQUEST_SCHEMA), problems


# what a response line reads of an output row besides its id and error (response_line): kept
# input columns of these names would be taken for the task's (job/setup.py refuses them)
RESPONSE_FIELDS = frozenset(
    {
        "url",
        "text",
        "prompt_tokens",
        "output_tokens",
        "finish_reason",
        "token_logprobs",
        "tokens",
        "token_ids",
        "top_logprobs",
        "embedding",
        "encoding_format",
    }
)


def write_responses_file(
    layout, model_path: str, token_bytes_for: Callable[[], TokenBytes | None] | None = None
) -> tuple[int, int]:
    """OUT/responses.jsonl from the finished outputs, in input order, and OUT/errors.jsonl with
    the lines of the failed requests alone (the Batch API's error file); returns both counts.
    `token_bytes_for`: gives the model's token id -> bytes, asked for where the outputs hold
    log-probs (a token that is part of a character has bytes its text, U+FFFD, does not)."""
    import pyarrow.parquet as pq

    files = sorted(layout.outputs_dir.glob("*.parquet"))
    schema = pq.read_schema(files[0])
    as_lists = pa.types.is_list(schema.field("text").type) if "text" in schema.names else True
    token_bytes = None
    if token_bytes_for is not None and "token_ids" in schema.names:
        token_bytes = token_bytes_for()

    # the outputs' other columns are kept input columns: never read (a nanosecond time has no
    # Python value without pandas)
    read = [name for name in schema.names if name in RESPONSE_FIELDS | {"id", "error"}]

    def rows(failed_only: bool = False) -> Iterator[dict]:
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=read):
                if failed_only:
                    batch = batch.filter(batch.column("error").is_valid())
                yield from batch.to_pylist()

    model = model_path.removeprefix("package:").rstrip("/").rsplit("/", 1)[-1]
    created = int(time.time())
    lines = write_responses(layout.responses, rows(), model, as_lists, created, token_bytes)
    errors = write_responses(
        layout.errors, rows(failed_only=True), model, as_lists, created, token_bytes
    )
    return lines, errors


def write_responses(
    path: Path,
    outputs: Iterable[dict],
    model: str,
    as_lists: bool,
    created: int | None = None,
    token_bytes: TokenBytes | None = None,
) -> int:
    """Write one response line per output row, keyed by custom_id; returns the line count.
    `as_lists`: the sample columns hold one list entry per sample (n > 1 or per-request)."""
    created = int(time.time()) if created is None else created
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for row in outputs:
            count += 1
            line = response_line(row if as_lists else _one_sample(row), model, created, token_bytes)
            yield json.dumps(line, ensure_ascii=False).translate(LINE_SEPARATORS) + "\n"

    write_lines_atomic(path, lines())
    return count


def response_line(
    row: dict, model: str, created: int, token_bytes: TokenBytes | None = None
) -> dict:
    """The Batch API output record of one finished (or failed) request."""
    custom_id = str(row["id"])
    digest = hashlib.blake2b(custom_id.encode(), digest_size=12).hexdigest()
    line = {"id": f"batch_req_{digest}", "custom_id": custom_id}
    if row.get("error") is not None:
        status = 500 if row["error"].startswith("model failed") else 400
        kind = "server_error" if status == 500 else "invalid_request_error"
        error = {"message": row["error"], "type": kind, "param": None, "code": None}
        line["response"] = {
            "status_code": status,
            "request_id": f"req_{digest}",
            "body": {"error": error},
        }
        line["error"] = {"code": kind, "message": row["error"]}
        return line
    if row.get("url") == EMBEDDINGS_URL:
        body = _embeddings_body(row, model)
        line["response"] = {"status_code": 200, "request_id": f"req_{digest}", "body": body}
        line["error"] = None
        return line
    chat = row.get("url", CHAT_URL) != COMPLETIONS_URL
    choices = [_choice(row, k, chat, token_bytes) for k in range(len(row["text"]))]
    completion_tokens = sum(row["output_tokens"])
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{digest}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": completion_tokens,
            "total_tokens": row["prompt_tokens"] + completion_tokens,
        },
    }
    line["response"] = {"status_code": 200, "request_id": f"req_{digest}", "body": body}
    line["error"] = None
    return line


def _embeddings_body(row: dict, model: str) -> dict:
    """The Embeddings API's answer: one vector per input, as floats or as base64 of their
    little-endian float32 bytes (what the API's base64 encoding holds)."""
    as_base64 = row.get("encoding_format") == "base64"
    data = []
    for k, vector in enumerate(row["embedding"]):
        value = vector
        if as_base64:
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": k, "embedding": value})
    usage = {"prompt_tokens": row["prompt_tokens"], "total_tokens": row["prompt_tokens"]}
    return {"object": "list", "data": data, "model": model, "usage": usage}


def _choice(row: dict, k: int, chat: bool, token_bytes: TokenBytes | None) -> dict:
    text = row["text"][k]
    logprobs = None
    token_logprobs = row.get("token_logprobs")
    if token_logprobs and token_logprobs[k] is not None:
        tokens = row["tokens"][k]
        values = [_logprob(v) for v in token_logprobs[k]]
        top = row["top_logprobs"][k] if row.get("top_logprobs") else None
        if chat:
            ids = row["token_ids"][k] if row.get("token_ids") else [None] * len(tokens)
            content = [
                {
                    **_token_logprob(t, v, token_bytes, token_id),
                    "top_logprobs": _alternatives(top, i, token_bytes),
                }
                for i, (t, v, token_id) in enumerate(zip(tokens, values, ids, strict=True))
            ]
            logprobs = {"content": content}
        else:
            ids = row["token_ids"][k] if row.get("token_ids") else [None] * len(tokens)
            own = [_own_text(t, token_bytes, i) for t, i in zip(tokens, ids, strict=True)]
            tokens = [_completion_token(text, raw) for text, raw in own]
            # a special token is not in the text (decoded without them)
            in_text = [
                b"" if _special(token_bytes, i) else raw
                for (_, raw), i in zip(own, ids, strict=True)
            ]
            offsets = _text_offsets(in_text)
            # one {token: logprob} map per position: the most likely first (of alternatives of
            # equal text, the likelier is kept), then the sampled token where they leave it out,
            # as OpenAI gives "up to logprobs+1" entries (so `logprobs: 0` gives it alone)
            by_text = []
            for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
                merged: dict[str, float] = {}
                for a in top[i] if top is not None else ():
                    shown = _completion_token(
                        *_own_text(a["token"], token_bytes, a.get("token_id"))
                    )
                    merged.setdefault(shown, _logprob(a["logprob"]))
                merged.setdefault(token, value)
                by_text.append(merged)
            logprobs = {
                "tokens": tokens,
                "token_logprobs": values,
                "top_logprobs": by_text,
                "text_offset": offsets,
            }
    choice = {"index": k, "logprobs": logprobs, "finish_reason": row["finish_reason"][k]}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return choice


def _token_logprob(
    token: str, logprob: float, token_bytes: TokenBytes | None = None, token_id: int | None = None
) -> dict:
    """A token's chat log-prob entry (its text and bytes as `_own_text` gives them)."""
    token, raw = _own_text(token, token_bytes, token_id)
    return {"token": token, "logprob": _logprob(logprob), "bytes": list(raw)}


def _own_text(
    token: str, token_bytes: TokenBytes | None, token_id: int | None
) -> tuple[str, bytes]:
    """A token's text and bytes as it adds them to the generated text. Decoded alone, a token
    that is part of a character is U+FFFD, and a SentencePiece-style decoder strips the
    leading space of `▁Paris`: where the tokenizer's own bytes are at hand they are used (the
    text too, where they are whole UTF-8), so the tokens join back into the text."""
    if token_bytes is None or token_id is None:
        return token, token.encode()
    raw = token_bytes(token_id)
    if not raw or raw.startswith(SPECIAL_MARK):
        return token, token.encode()
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return token, raw


def _special(token_bytes: TokenBytes | None, token_id: int | None) -> bool:
    """Whether a token is one the text leaves out (token_bytes marks them)."""
    if token_bytes is None or token_id is None:
        return False
    return token_bytes(token_id).startswith(SPECIAL_MARK)


def _completion_token(text: str, raw: bytes) -> str:
    """A completions token as the legacy API writes it: its text, or `bytes:\\xNN...` for a
    token that is part of a character (its bytes are not whole UTF-8)."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


def _text_offsets(pieces: list[bytes]) -> list[int]:
    """Where each token starts in the generated text, in characters of the pieces' bytes
    decoded as the text is (a run of bytes that completes no character is one U+FFFD); a token
    that starts inside a character starts where that character does."""
    text_bytes = b"".join(pieces)
    char_at = _char_index_of_bytes(text_bytes)
    offsets, start = [], 0
    for raw in pieces:
        offsets.append(char_at[start])
        start += len(raw)
    return offsets


def _char_index_of_bytes(data: bytes) -> list[int]:
    """For each byte of `data` (and one past its end), the index of the character it belongs to
    when `data` is decoded as UTF-8 with errors replaced: a whole character, or the longest
    start of one that the next byte breaks (Python's and Rust's rule for U+FFFD)."""
    index, j, chars = [], 0, 0
    while j < len(data):
        size = next((n for n in range(1, 5) if _decodes(data[j : j + n])), 0)
        if not size:  # the longest prefix of a character that is held, not refused
            decoder = codecs.getincrementaldecoder("utf-8")()
            size = 1
            for n in range(1, min(4, len(data) - j + 1)):
                try:
                    if decoder.decode(data[j + n - 1 : j + n]):
                        break
                except UnicodeDecodeError:
                    break
                size = n
        index += [chars] * size
        j += size
        chars += 1
    return [*index, chars]


def _decodes(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


LOWEST_LOGPROB = -9999.0  # what JSON gets for a log-prob of -inf (a token the model rules out)


def _logprob(value: float) -> float:
    """A log-prob as JSON can hold it: json.dumps writes -inf as `-Infinity`, which is not
    JSON and which strict readers refuse."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else LOWEST_LOGPROB


def _alternatives(top: list | None, i: int, token_bytes: TokenBytes | None) -> list[dict]:
    """The chat shape of position i's most likely alternatives ([] where none were asked)."""
    if top is None:
        return []
    return [
        _token_logprob(a["token"], a["logprob"], token_bytes, a.get("token_id")) for a in top[i]
    ]


SAMPLE_COLUMNS = (
    "text",
    "output_tokens",
    "finish_reason",
    "token_ids",
    "tokens",
    "token_logprobs",
    "top_logprobs",
)


def _one_sample(row: dict) -> dict:
    """A row of single-sample columns, as lists of one sample."""
    return {**row, **{k: [row[k]] for k in SAMPLE_COLUMNS if k in row}}


def refuse_not_a_request(location: str, record: dict) -> None:
    """A line with none of a request's keys, in a file read as OpenAI Batch requests (a file of
    prompts given input.format openai): said with what the line holds."""
    if not REQUEST_KEYS & set(record):
        raise InputError(
            f"{location}: not an OpenAI Batch request (no custom_id; the line has: "
            f"{', '.join(map(str, record)) or 'no keys'}); input.format openai reads lines of "
            "custom_id, method, url and body"
        )


REQUEST_KEYS = frozenset({"custom_id", "method", "url", "body"})
