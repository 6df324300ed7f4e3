"""`embed`: one float32 vector per row, pooled from the model's last hidden states."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bulkinfer.configs import text_config
from bulkinfer.errors import SpecError
from bulkinfer.model_files import local_model_folder, sentence_transformer_recipe
from bulkinfer.prepare import PreparedRows
from bulkinfer.tasks.base import BatchResult
from bulkinfer.tasks.single_pass import TOKEN_FIELDS, single_pass_limit, token_columns

POOLINGS = ("mean", "cls", "last")


class EmbedTask:
    name = "embed"

    def __init__(self, pooling: str, normalize: bool, dim: int, max_context: int | None):
        self.pooling = pooling
        self.normalize = normalize
        self.dim = dim
        self.max_context = max_context
        self.schema = pa.schema([("embedding", pa.list_(pa.float32(), dim)), *TOKEN_FIELDS])

    @classmethod
    def for_model(cls, job, model, tokenizer, config) -> EmbedTask:
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
        return cls(pooling, normalize, _hidden_size(config), limit)

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
