"""How many rows of a finished job kept to the job's response_format: rows by finish_reason, and
of those that ended with `stop`, how many parse as JSON and validate against the schema (every
one should); prints one JSON object.

    python scripts/check_structured.py OUT_FOLDER JOB.yaml
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import yaml


def check(outputs: Path, schema: dict | None) -> dict:
    table = pq.read_table(outputs / "outputs")
    rows = table.select(["text", "finish_reason", "error"]).to_pylist()
    reasons = Counter(r["finish_reason"] or "error" for r in rows)
    stopped = [r["text"] for r in rows if r["finish_reason"] == "stop"]
    valid = sum(_valid(text, schema) for text in stopped)
    return {
        "rows": len(rows),
        "finish_reasons": dict(reasons),
        "stop_rows_valid": valid,
        "stop_rows": len(stopped),
        "share_of_stop_rows_valid": valid / len(stopped) if stopped else None,
        "share_of_all_rows_valid": valid / len(rows) if rows else None,
    }


def _valid(text: str, schema: dict | None) -> bool:
    try:
        value = json.loads(text)
        if schema is not None:
            jsonschema.validate(value, schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path, help="the job's output folder")
    parser.add_argument("job", type=Path, help="the job spec with task.response_format")
    args = parser.parse_args()
    fmt = yaml.safe_load(args.job.read_text())["task"]["response_format"]
    schema = fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema")
    print(json.dumps(check(args.outputs, schema), indent=1))


if __name__ == "__main__":
    main()
