"""`embed`: one float32 vector per row, pooled from the model's last hidden states; and the
answers to OpenAI `/v1/embeddings` requests, in an embed job or beside generation requests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bulkinfer.configs import text_config
from bulkinfer.errors import SpecError
from bulkinfer.model_files import local_model_folder, sentence_transformer_recipe
from bulkinfer.prepare import PreparedRows
from bulkinfer.prepare.render import appended_special_tokens, truncated_ids
from bulkinfer.tasks.base import BatchResult
from bulkinfer.tasks.single_pass import TOKEN_FIELDS, single_pass_limit, token_columns

POOLINGS = ("mean", "cls", "last")
EMBED_PIECE = 64  # inputs per engine call when answering embeddings requests
# an embeddings request's answer, one entry per input
REQUEST_FIELDS = [
    ("embedding", pa.list_(pa.list_(pa.float32()))),
    ("encoding_format", pa.string()),
]


@dataclass(frozen=True)
class EmbeddingRequests:
    """How a job answers OpenAI embeddings requests: each input tokenized on its own, pooled
    and (as the API's vectors are) normalised as the model's files say, checked against the
    model's size and input limit."""

    pooling: str
    normalize: bool
    dim: int | None  # the model's hidden size, where its config gives one
    limit: int | None
    truncate: bool = False

    @classmethod
    def for_model(cls, model, config, limit: int | None) -> EmbeddingRequests:
        """A causal LM's embeddings: its sentence-transformers recipe where it has one, else
        the last token's final hidden state, normalised (as decoder embedding models do)."""
        recipe = sentence_transformer_recipe(local_model_folder(model, convert=False))
        dim = getattr(text_config(config), "hidden_size", None)
        if recipe.pooling in POOLINGS:
            return cls(recipe.pooling, recipe.normalize, dim, limit)
        return cls("last", True, dim, limit)

    def answer(self, engine, tokenizer, requests: list[dict]) -> tuple[dict, dict[int, str]]:
        """Columns (REQUEST_FIELDS plus token counts) of `requests` (request settings, one per
        row) and the rows that cannot be answered, by position."""
        errors: dict[int, str] = {}
        sequences: dict[int, list[list[int]]] = {}
        cut: dict[int, int] = {}
        for k, request in enumerate(requests):
            try:
                sequences[k], cut[k] = self._tokens(tokenizer, request)
            except ValueError as exc:
                errors[k] = f"invalid request: {exc}"
        flat = [(k, ids) for k, rows in sequences.items() for ids in rows]
        vectors = self._embed(engine, [np.asarray(ids, dtype=np.int64) for _, ids in flat])
        per_row: dict[int, list] = {k: [] for k in sequences}
        for (k, _), vector in zip(flat, vectors, strict=True):
            per_row[k].append(vector.tolist())
        columns = {
            "embedding": [per_row.get(k) for k in range(len(requests))],
            "encoding_format": [
                r.get("encoding_format") if k in sequences else None for k, r in enumerate(requests)
            ],
            "prompt_tokens": [
                sum(len(ids) for ids in sequences[k]) if k in sequences else None
                for k in range(len(requests))
            ],
            "truncated_tokens": [cut.get(k) for k in range(len(requests))],
        }
        return columns, errors

    def _tokens(self, tokenizer, request: dict) -> tuple[list[list[int]], int]:
        """Each input's token ids (cut to the limit with task.truncate) and the tokens cut."""
        if request.get("embed_input") is None:
            raise ValueError(
                "this job embeds (task.type embed): only /v1/embeddings requests run in it; "
                "run chat and completions requests with task.type generate"
            )
        if request.get("dimensions") is not None and request["dimensions"] != self.dim:
            raise ValueError(
                f"body.dimensions is {request['dimensions']}, but the model's embeddings have "
                f"{self.dim} values and bulkinfer does not shorten them"
            )
        texts = request["embed_input"]
        encoded = tokenizer(texts, add_special_tokens=True, return_attention_mask=False)
        rows, cut = [], 0
        for k, ids in enumerate(encoded["input_ids"]):
            if self.limit is not None and len(ids) > self.limit:
                if not self.truncate:
                    raise ValueError(
                        f"body.input[{k}] has {len(ids):,} tokens, more than the model's input "
                        f"limit of {self.limit:,}"
                    )
                cut += len(ids) - self.limit
                ids = truncated_ids(ids, self.limit, appended_special_tokens(tokenizer))
            if not ids:
                raise ValueError(f"body.input[{k}] has no tokens after tokenization")
            rows.append(ids)
        return rows, cut

    def _embed(self, engine, sequences: list[np.ndarray]) -> np.ndarray:
        """Vectors in the given order, the engine called on pieces of similar lengths."""
        order = np.argsort([len(s) for s in sequences], kind="stable")
        out: list = [None] * len(sequences)
        for i in range(0, len(order), EMBED_PIECE):
            piece = order[i : i + EMBED_PIECE]
            vectors = engine.embed([sequences[j] for j in piece], self.pooling, self.normalize)
            for j, vector in zip(piece, vectors, strict=True):
                out[j] = vector
        return out


class EmbedTask:
    """One vector a row; with an OpenAI batch input (`requests`), one vector per input of each
    `/v1/embeddings` request, other requests refused."""

    name = "embed"

    def __init__(
        self,
        pooling: str,
        normalize: bool,
        dim: int,
        max_context: int | None,
        requests: EmbeddingRequests | None = None,
        tokenizer=None,
    ):
        self.pooling = pooling
        self.normalize = normalize
        self.dim = dim
        self.max_context = max_context
        self.requests = requests
        self.tokenizer = tokenizer
        vector = ("embedding", pa.list_(pa.float32(), dim))
        self.schema = pa.schema(
            [*REQUEST_FIELDS, *TOKEN_FIELDS] if requests else [vector, *TOKEN_FIELDS]
        )

    @classmethod
    def for_model(cls, job, model, tokenizer, config, per_request: bool = False) -> EmbedTask:
        """Pooling and normalisation as the spec says, or (auto) as the model's own
        sentence-transformers files say; never a guess."""
        recipe = sentence_transformer_recipe(local_model_folder(model, convert=False))
        pooling = job.task.pooling
        if pooling == "auto":
            pooling = _recipe_pooling(recipe, job.model.path)
        normalize = job.task.normalize
        if normalize == "auto":
            normalize = recipe.normalize
        limit = single_pass_limit(job, tokenizer, config, recipe)
        dim = _hidden_size(config)
        if not per_request:
            return cls(pooling, normalize, dim, limit)
        requests = EmbeddingRequests(pooling, normalize, dim, limit, job.task.truncate)
        return cls(pooling, normalize, dim, limit, requests, tokenizer)

    def new_tokens_per_row(self) -> int:
        return 0

    def row_costs(self, prepared: PreparedRows) -> np.ndarray:
        return prepared.lengths.astype(np.int64)

    def row_steps(self, prepared: PreparedRows) -> None:
        return None

    engine = "embed"
    streams = False

    def load_engine(self, options, tokenizer, limits):
        from bulkinfer.engines.select import load_encoder

        return load_encoder(options, tokenizer, "embed", limits)

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        if self.requests is not None:
            requests = prepared.request_params.take(pa.array(rows)).to_pylist()
            columns, errors = self.requests.answer(engine, self.tokenizer, requests)
            return BatchResult(columns, errors=errors)
        sequences = [prepared.tokens(int(r)) for r in rows]
        vectors = engine.embed(sequences, self.pooling, self.normalize).astype(np.float32)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)
        return BatchResult({"embedding": embedding, **token_columns(prepared, rows)})


def _recipe_pooling(recipe, model_path: str) -> str:
    if recipe.pooling is None:
        raise SpecError(
            f"task.pooling: {model_path} has no sentence-transformers pooling config "
            "(modules.json, 1_Pooling/config.json); set task.pooling to mean, cls or last"
        )
    if recipe.pooling not in POOLINGS:
        raise SpecError(
            f"task.pooling: the model's pooling config asks for '{recipe.pooling}', which "
            "bulkinfer does not offer; set task.pooling to mean, cls or last"
        )
    if recipe.other_modules:
        raise SpecError(
            f"task.pooling: the model's sentence-transformers pipeline also has "
            f"{', '.join(recipe.other_modules)} modules, which bulkinfer does not apply; set "
            "task.pooling (and task.normalize) to get the pooled transformer output"
        )
    return recipe.pooling


def _hidden_size(config) -> int:
    size = getattr(text_config(config), "hidden_size", None)
    if not isinstance(size, int):
        raise SpecError("task.type: embed needs a model whose config has a hidden_size")
    return size
