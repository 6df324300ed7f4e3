"""The benchmark still runs end to end on the CPU with a tiny model (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, child_env


def test_bench_runs_on_the_cpu_with_a_tiny_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    paths = {(r["work"], r["path"].split(",")[0]) for r in rows}
    assert ("score", "bulkinfer") in paths and ("generate", "bulkinfer") in paths
    assert all("error" not in r for r in rows)
    ours = next(r for r in rows if r["work"] == "score" and r["path"].startswith("bulkinfer"))
    assert ours["max_rel_diff_vs_plain"] < 1e-4
