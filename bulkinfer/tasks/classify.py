"""`classify`: a sequence-classification model's verdict per row, labels named by its id2label.

Single-label models give softmax probabilities; multi-label models (problem_type
multi_label_classification, or task.multi_label) give an independent sigmoid per label and list
every label at or above task.threshold; regression heads give their raw value.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from bulkinfer.errors import ModelError
from bulkinfer.prepare import PreparedRows
from bulkinfer.tasks.base import BatchResult
from bulkinfer.tasks.single_pass import TOKEN_FIELDS, single_pass_limit, token_columns


class ClassifyTask:
    name = "classify"

    def __init__(
        self,
        labels: list[str],
        mode: str,
        all_labels: bool,
        threshold: float,
        max_context: int | None,
    ):
        """mode: single (softmax), multi (sigmoid) or regression (raw outputs)."""
        self.labels = labels
        self.mode = mode
        self.all_labels = all_labels or mode == "multi"
        self.threshold = threshold
        self.max_context = max_context
        self.schema = pa.schema([*self._result_fields(), *TOKEN_FIELDS])

    @classmethod
    def for_model(cls, job, tokenizer, config) -> ClassifyTask:
        task = job.task
        problem = getattr(config, "problem_type", None)
        if task.multi_label != "auto":
            mode = "multi" if task.multi_label else "single"
        else:
            mode = {"multi_label_classification": "multi", "regression": "regression"}.get(
                problem, "single"
            )
        limit = single_pass_limit(job, tokenizer, config)
        return cls(label_names(config), mode, task.all_labels, task.threshold, limit)

    def _result_fields(self) -> list[tuple[str, pa.DataType]]:
        per_label = pa.struct([(name, pa.float32()) for name in self.labels])
        if self.mode == "regression":
            if len(self.labels) == 1:
                return [("value", pa.float32())]
            return [("values", per_label)]
        fields = [("label", pa.string()), ("probability", pa.float32())]
        if self.mode == "multi":
            fields.append(("labels", pa.list_(pa.string())))
        if self.all_labels:
            fields.append(("probabilities", per_label))
        return fields

    def new_tokens_per_row(self) -> int:
        return 0

    def row_costs(self, prepared: PreparedRows) -> np.ndarray:
        return prepared.lengths.astype(np.int64)

    def row_steps(self, prepared: PreparedRows) -> None:
        return None

    engine = "classify"
    streams = False

    def load_engine(self, options, tokenizer, limits):
        """The classifier, refused when its head's size disagrees with id2label."""
        from bulkinfer.engines.select import load_encoder

        engine = load_encoder(options, tokenizer, "classify", limits)
        outputs = engine.model.config.num_labels
        if outputs != len(self.labels):
            raise ModelError(
                f"model.path: the classification head has {outputs} outputs but id2label "
                f"names {len(self.labels)} labels"
            )
        return engine

    def run(self, engine, prepared: PreparedRows, rows: np.ndarray) -> BatchResult:
        sequences = [prepared.tokens(int(r)) for r in rows]
        logits = engine.classify(sequences).astype(np.float64)
        columns = self._columns(logits)
        return BatchResult({**columns, **token_columns(prepared, rows)})

    def _columns(self, logits: np.ndarray) -> dict[str, list]:
        if self.mode == "regression":
            if len(self.labels) == 1:
                return {"value": logits[:, 0].astype(np.float32).tolist()}
            return {"values": self._per_label(logits)}
        if self.mode == "multi":
            probs = 1.0 / (1.0 + np.exp(-logits))
        else:
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = shifted / shifted.sum(axis=1, keepdims=True)
        top = probs.argmax(axis=1)
        columns = {
            "label": [self.labels[k] for k in top],
            "probability": probs[np.arange(len(top)), top].astype(np.float32).tolist(),
        }
        if self.mode == "multi":
            passed = probs >= self.threshold
            columns["labels"] = [
                [n for n, p in zip(self.labels, row, strict=True) if p] for row in passed
            ]
        if self.all_labels:
            columns["probabilities"] = self._per_label(probs)
        return columns

    def _per_label(self, values: np.ndarray) -> list[dict[str, float]]:
        as32 = values.astype(np.float32).tolist()
        return [dict(zip(self.labels, row, strict=True)) for row in as32]


def label_names(config) -> list[str]:
    """Label names in head order, from id2label; the names become column fields, so they must
    be distinct."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    count = getattr(config, "num_labels", None) or len(id2label)
    names = [id2label.get(i, f"LABEL_{i}") for i in range(count)]
    seen = set()
    for name in names:
        if name in seen:
            raise ModelError(f"model.path: the config's id2label names '{name}' twice")
        seen.add(name)
    return names
