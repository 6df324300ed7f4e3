"""A real one-node Slurm cluster on loopback for tests, started by scripts/slurm_cluster.sh.

Use it from a test module (or a conftest) with::

    from slurm_fixture import slurm_cluster, wait_for_jobs  # noqa: F401  (the fixture by import)

``slurm_cluster`` (session scope) starts the cluster, installing slurm-wlm and munge with apt-get
when they are missing, sets ``SLURM_CONF`` in ``os.environ`` for the session and yields the state
folder (config, logs, spool). When the cluster cannot start the tests that use it are skipped
with the script's last error lines, or fail when ``BULKINFER_REQUIRE_SLURM=1`` (CI sets it).
A cluster this fixture started is stopped at the end of the session unless
``BULKINFER_SLURM_KEEP=1``; one that was already running is left running.

There is no accounting (no sacct): ``wait_for_jobs`` reads job states from squeue, where finished
jobs stay visible for MinJobAge (60 s in the script's slurm.conf).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"

# States after which Slurm does nothing more with a job (unless someone requeues it).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "REVOKED",
    }
)
# What wait_for_jobs reports for a task that left squeue before it was seen in a final state.
GONE = "GONE"


def state_dir() -> Path:
    return Path(os.environ.get("BULKINFER_SLURM_DIR", "/tmp/bulkinfer-slurm"))


def _script(command: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("BULKINFER_REQUIRE_SLURM") == "1":
        pytest.fail(f"BULKINFER_REQUIRE_SLURM=1 and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    try:
        was_running = _script("status", timeout=60).returncode == 0
        # The first start may install packages with apt-get: allow for a slow mirror.
        proc = _script("start", timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"slurm cluster did not start: {exc}")
    if proc.returncode != 0:
        lines = (proc.stderr + proc.stdout).strip().splitlines()[-25:]
        _unavailable(
            f"slurm cluster did not start (scripts/slurm_cluster.sh start exited "
            f"{proc.returncode}):\n" + "\n".join(lines)
        )
    conf = str(state_dir() / "slurm.conf")
    for line in proc.stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            conf = line.split("=", 1)[1].strip()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield Path(conf).parent
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not was_running and os.environ.get("BULKINFER_SLURM_KEEP") != "1":
            # A cluster left running is harmless: the next `start` reuses it.
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                _script("stop", timeout=120)


def _squeue_states(job_id: str, env: dict[str, str]) -> dict[str, str] | None:
    """Task id -> state for every task of the job squeue still knows; None if squeue failed.

    -r lists each array task on its own line, pending ones included ("12_3" not "12_[2-3]");
    -t all keeps jobs that already ended (until MinJobAge drops them), which -r alone hides.
    """
    proc = subprocess.run(
        ["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%i %T"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    if proc.returncode != 0:
        # A job purged from the controller is "Invalid job id": it is gone, not an error.
        if "invalid job id" in proc.stderr.lower():
            return {}
        return None
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def wait_for_jobs(job_id: str, timeout: float = 120.0, poll: float = 0.5) -> dict[str, str]:
    """Wait until every task of ``job_id`` has finished; return task id -> final state.

    ``job_id`` is what ``sbatch --parsable`` printed (an array job id gives one entry per task,
    keyed "ID_TASK"). A job counts as finished when all its tasks are in a final state
    (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...) or have left squeue; a task that left squeue
    before it was seen in a final state is reported as ``GONE``. A requeued job goes back to
    PENDING and is waited for again. Raises TimeoutError with the last states seen.
    """
    env = dict(os.environ)
    env.setdefault("SLURM_CONF", str(state_dir() / "slurm.conf"))
    job_id = job_id.strip().split(";")[0]  # --parsable prints "ID;CLUSTER" on multi-cluster setups
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        current = _squeue_states(job_id, env)
        if current is not None:
            seen.update(current)
            if all(state in TERMINAL_STATES for state in current.values()):
                # A task purged from squeue between two polls finished unseen: GONE.
                return {
                    task: state if state in TERMINAL_STATES else GONE
                    for task, state in sorted(seen.items(), key=lambda kv: _task_key(kv[0]))
                }
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"slurm job {job_id} not finished after {timeout:.0f}s; last states: {seen}"
                + ("" if current is not None else " (squeue is failing)")
            )
        time.sleep(poll)


def _task_key(task: str) -> tuple[int, ...]:
    """Sort "12_10" after "12_9"."""
    return tuple(int(p) if p.isdigit() else -1 for p in task.split("_"))
