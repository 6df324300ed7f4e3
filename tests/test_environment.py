"""The machine's set-up, not the job's data: files the process may not read, a closed or
ASCII-only stdout, cache variables left empty. A run either works or says in one line what to
fix; never a traceback after the outputs are written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import (
    child_env,
    cli_subprocess,
    read_outputs,
    sample_prompts,
    write_job,
    write_jsonl,
)


def _as_a_user() -> list[str]:
    """A command prefix under which file permissions hold (root ignores them), or a skip."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be taken away")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_an_input_file_the_process_may_not_read_is_one_line(tmp_path, tiny_model):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    inputs.chmod(0)
    run = subprocess.run(
        [*_as_a_user(), sys.executable, "-m", "bulkinfer", "run", str(job)],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert run.returncode == 74, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"{inputs}: Permission denied" in run.stderr, run.stderr


def test_a_closed_or_ascii_only_stdout_does_not_fail_a_finished_run(tmp_path, tiny_model):
    """The end-of-run summary printed to a closed stdout (`>&-`) or one that cannot encode the
    output folder's name (PYTHONIOENCODING=ascii) failed the run after its outputs were
    written: exit 1, a traceback, and a failed.json that `status` then showed."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    closed = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m bulkinfer --log-format plain run "{job}" >&-'],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    assert closed.returncode == 0, closed.stderr
    out = tmp_path / "sortie é 日本"
    ascii_only = subprocess.run(
        [
            sys.executable,
            "-m",
            "bulkinfer",
            "--log-format",
            "plain",
            "run",
            str(job),
            "-o",
            str(out),
        ],
        capture_output=True,
        env={**child_env(), "PYTHONIOENCODING": "ascii"},
    )
    assert ascii_only.returncode == 0, ascii_only.stderr.decode(errors="replace")
    assert b"sortie \\xe9 \\u65e5\\u672c" in ascii_only.stdout
    assert not (out / "failed.json").exists()
    assert read_outputs(out).equals(read_outputs(tmp_path / "out"))


def test_an_empty_cache_variable_or_no_home_never_caches_in_the_current_folder(monkeypatch):
    """XDG_CACHE_HOME="" made the cache `bulkinfer/` in the current folder (75 MB of bytecode
    among the user's files), and a user without a home folder got a literal `./~/.cache`."""
    from bulkinfer.cache import cache_root

    monkeypatch.delenv("BULKINFER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_root().is_absolute()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cache_root().is_absolute()
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # no HOME, no passwd entry
    assert cache_root().is_absolute()


def test_a_temporary_cache_folder_someone_else_may_write_is_not_used(tmp_path, monkeypatch):
    """Without a home folder the cache is in the shared temporary folder under a fixed name;
    its compiled code and bytecode run, so a folder of that name others may write is passed
    over for a private one."""
    import tempfile

    from bulkinfer.cache import cache_root

    monkeypatch.delenv("BULKINFER_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"bulkinfer-cache-{os.getuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)  # (the umask would have taken the others' write bit)
    from bulkinfer import cache

    cache._private_temporary_cache.cache_clear()
    chosen = cache_root()
    assert chosen != planted and chosen.is_dir() and chosen.stat().st_mode & 0o077 == 0
    assert cache_root() == chosen  # the same folder for the whole process
    cache._private_temporary_cache.cache_clear()
    planted.chmod(0o700)
    assert cache_root() == planted
    cache._private_temporary_cache.cache_clear()


def test_an_output_path_linking_to_nothing_is_named_as_such(tmp_path, tiny_model):
    """A symbolic link to a folder that does not exist: `run` said it could not write it
    ("File exists", exit 74) and `validate` called it a new folder."""
    from conftest import cli

    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, link)
    for command in ("validate", "run"):
        result = cli(command, str(job))
        assert result.exit_code == 2, result.output
        assert "is a symbolic link to" in result.output, result.output


def test_a_log_reader_that_goes_away_does_not_stop_the_job(tmp_path, tiny_model):
    """`bulkinfer run job.yaml 2>&1 | head -1`: the first log line after head had gone failed
    the run (BrokenPipeError in failed.json, no outputs); the job goes on unheard now."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(4))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    command = f'"{sys.executable}" -m bulkinfer --log-format plain run "{job}" 2>&1 | head -1'
    piped = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=child_env())
    assert piped.stdout.startswith("[bulkinfer]"), piped.stdout
    assert not (tmp_path / "out" / "failed.json").exists()
    assert read_outputs(tmp_path / "out").num_rows == 4


def test_a_library_caller_keeps_its_stderr_when_the_reader_goes_away(monkeypatch):
    """In a program calling bulkinfer (a notebook, a service), a closed log pipe silences
    bulkinfer's lines only: the program's own file descriptor 2 stays as it was."""
    from bulkinfer import process
    from bulkinfer.observe import progress

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            return 2

    before = os.readlink("/proc/self/fd/2")
    monkeypatch.setattr(process, "OWN", False)
    monkeypatch.setattr(sys, "stderr", Closed())
    progress.log("one")
    progress.log("two")
    assert os.readlink("/proc/self/fd/2") == before


def test_a_cache_folder_that_cannot_be_written_is_said_once(tmp_path, tiny_model):
    """Said once per run, not once per model file (six lines for a tiny model)."""
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    (tmp_path / "cache").write_text("a file, not a folder")
    proc = cli_subprocess("run", str(job), env={"BULKINFER_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("cannot keep file hashes") == 1, proc.stderr


def test_a_bad_block_size_setting_is_a_spec_error(tmp_path, tiny_model):
    inputs = write_jsonl(tmp_path / "in.jsonl", sample_prompts(2))
    job = write_job(tmp_path / "job.yaml", tiny_model, inputs, tmp_path / "out")
    proc = cli_subprocess("validate", str(job), env={"BULKINFER_CHUNK_ROWS": "abc"})
    assert proc.returncode == 2 and "BULKINFER_CHUNK_ROWS='abc'" in proc.stderr, proc.stderr
