"""bulkinfer's cache folder (converted GGUF weights, compiled kernels, Python bytecode), and
Python bytecode kept there when the environment says not to write it beside the sources.

Container images often set PYTHONDONTWRITEBYTECODE=1 (or ship read-only site-packages): then
every process compiles torch and transformers from source again, 10 s and more of start-up on
each job and on each Slurm array task. bulkinfer keeps that bytecode in its own cache folder
instead (`sys.pycache_prefix`), so only the first job on a box pays; the sources and the
environment's folders are left as they are. BULKINFER_PYCACHE=0 turns this off.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """BULKINFER_CACHE, else bulkinfer/ in XDG_CACHE_HOME, else in ~/.cache. An empty or
    relative XDG_CACHE_HOME counts as unset (as the XDG spec says), and a user without a home
    folder (no HOME, no passwd entry: ~ stays ~) gets a private one in the temporary folder,
    never the current one."""
    if os.environ.get("BULKINFER_CACHE"):
        return Path(os.environ["BULKINFER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "bulkinfer"
    home = os.path.expanduser("~")
    if home == "~" or not os.path.isabs(home):
        return _private_temporary_cache()
    return Path(home) / ".cache" / "bulkinfer"


@functools.cache  # one folder for the whole process, a fresh one included
def _private_temporary_cache() -> Path:
    """A cache folder in the shared temporary folder, made by and for this user only: its
    compiled code and bytecode are loaded and run, so a folder of that name that another
    user made (or may write) is not used; a fresh one for this process is."""
    import tempfile

    path = Path(tempfile.gettempdir()) / f"bulkinfer-cache-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
        if info.st_uid == os.getuid() and not info.st_mode & 0o022 and path.is_dir():
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="bulkinfer-cache-"))


def keep_bytecode() -> None:
    """Write imported modules' bytecode under the cache folder when Python was told not to
    write it beside the sources; a prefix the user set wins."""
    if not sys.dont_write_bytecode or sys.pycache_prefix:
        return
    if os.environ.get("BULKINFER_PYCACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    sys.pycache_prefix = str(cache_root() / "pycache")
    sys.dont_write_bytecode = False
