"""Generate a large prompt file for the memory and tokenizer benchmarks.

Prompts are English-like word sequences with a log-normal length mix (median about --words,
clipped to [3, 8 x median]), string ids and one kept column, written as JSONL and/or Parquet in
pieces of 100k rows, so even 10M rows are made with little memory.

    python scripts/make_big_input.py --rows 1000000 --words 100 --out /tmp/big/prompts.jsonl
    python scripts/make_big_input.py --rows 10000000 --words 12 --out /tmp/big/short.parquet
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PIECE_ROWS = 100_000
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "what",
    "can",
    "more",
    "about",
    "other",
    "some",
    "time",
    "could",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
    "model",
    "data",
    "question",
    "answer",
    "explain",
    "summarize",
    "translate",
    "write",
    "story",
    "city",
    "river",
    "mountain",
    "science",
    "history",
    "music",
    "language",
    "computer",
    "energy",
    "market",
    "health",
    "Émilie",
    "café",
    "naïve",
    "東京",
    "数据",
    "ünïcödé",
]


def piece_texts(rng: np.random.Generator, n: int, median_words: int) -> list[str]:
    lengths = rng.lognormal(np.log(median_words), 0.6, n).astype(np.int64)
    lengths = np.clip(lengths, 3, 8 * median_words)
    words = np.asarray(WORDS, dtype=object)
    flat = words[rng.integers(0, len(words), int(lengths.sum()))]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [" ".join(flat[s:e]) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--words", type=int, default=100, help="median words per prompt")
    parser.add_argument("--out", required=True, help=".jsonl or .parquet path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    parquet = out.suffix == ".parquet"
    writer = None
    with open(out, "w", encoding="utf-8") if not parquet else contextlib.nullcontext() as f:
        for start in range(0, args.rows, PIECE_ROWS):
            n = min(PIECE_ROWS, args.rows - start)
            texts = piece_texts(rng, n, args.words)
            ids = [f"r{start + i:09d}" for i in range(n)]
            sources = [f"src{(start + i) % 7}" for i in range(n)]
            if parquet:
                table = pa.table({"id": ids, "prompt": texts, "source": sources})
                if writer is None:
                    writer = pq.ParquetWriter(out, table.schema, compression="zstd")
                writer.write_table(table, row_group_size=PIECE_ROWS)
            else:
                f.write(
                    "".join(
                        json.dumps({"id": i, "prompt": t, "source": s}, ensure_ascii=False) + "\n"
                        for i, t, s in zip(ids, texts, sources, strict=True)
                    )
                )
    if writer is not None:
        writer.close()
    print(f"{out}: {args.rows:,} rows, {out.stat().st_size / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
