"""The user-facing errors: each one becomes a single line on stderr and exit code 2.

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix: a bad job spec, bad input, a wrong output folder."""

    exit_code = 2


class SpecError(UserError):
    """The job spec (YAML or --set overrides) is invalid."""


class InputError(UserError):
    """The input files cannot be read as the spec describes them."""


class OutputFolderError(UserError):
    """The output folder belongs to another job, or is not ours to write."""


class ModelError(UserError):
    """The model folder or file cannot be loaded as asked."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix when a close match exists, else ''."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


class RowFailedError(UserError):
    """A row could not run and the job says `on_error: fail`."""


class WriteError(UserError):
    """The output folder cannot be written (disk full, permissions): fix it and rerun to resume."""

    exit_code = 74  # EX_IOERR: a scheduler may retry once the disk has room


class FileAccessError(UserError):
    """A file or folder the machine will not let bulkinfer use (permissions, a name too long
    for the file system, a read-only or full disk), wherever it was met: fix it and rerun."""

    exit_code = 74


# what a file's system says of a path, not a bug of ours; and what to do about it
FILE_ERRNOS = {
    errno.EACCES: "check its permissions and those of the folders above it",
    errno.EPERM: "check its permissions and those of the folders above it",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.ELOOP: "a symbolic link points back at itself",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
}


def file_access_error(exc: OSError) -> FileAccessError | None:
    """The one line for an OSError on a named path that the machine's set-up caused, or None
    (then it is a bug, and keeps its traceback)."""
    hint = FILE_ERRNOS.get(exc.errno)
    if hint is None or exc.filename is None:
        return None
    return FileAccessError(f"{exc.filename}: {exc.strerror or exc} ({hint}); fix that and rerun")


def counted(n: int, noun: str) -> str:
    """ "1 batch", "3 batches": a count and its noun (plural by -s, or -es after s/x/ch/sh)."""
    if n == 1:
        return f"1 {noun}"
    return f"{n:,} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none): loaders and
    kernels raise many-line messages, and a user-facing error is one line. Past `limit`
    characters it ends at the last whole word, with "..."."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if limit is not None and len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line


def model_error(what: str, exc: BaseException) -> ModelError:
    """One line from a loader's (often multi-line) exception, with the fix where we know it."""
    first = first_line(exc)
    if "trust_remote_code" in str(exc):
        first = "the model folder contains custom code; set model.trust_remote_code: true only if you trust it"
    if "attn_implementation" in first:  # transformers' refusal of the setting, not of the model
        return ModelError(f"model.attn_implementation: {first}")
    return ModelError(f"model.path: {what}: {first}")


class StopRequested(BaseException):
    """SIGTERM or SIGUSR1 outside the batch loop (job/exits.py), raised where the main thread
    is: a BaseException, as KeyboardInterrupt is, so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def not_unicode(text: str) -> str | None:
    """What makes `text` no valid Unicode, or None: a lone surrogate (JSON's "\\ud800" decodes
    to one), which no tokenizer or Parquet file can take."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate {ascii(text[exc.start])} as character {exc.start + 1:,}"
    return None
