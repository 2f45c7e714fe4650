"""On-disk caches shared by processes: one root folder, and entries built once, under a lock, in a
temporary place that is renamed into place only when complete."""

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "SIMPO_LIGHTNING_CACHE"


def cache_root() -> Path:
    """``$SIMPO_LIGHTNING_CACHE``, else ``~/.cache/simpo-lightning``."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/simpo-lightning")).expanduser()


@contextmanager
def build_once(path: Path) -> Iterator[Path | None]:
    """Builds the cache entry ``path`` (a file or a folder) once among the processes that share its
    filesystem. Yields a temporary path to write the entry to, which is renamed to ``path`` when the
    block ends without an error; or None when ``path`` exists already, also when another process
    completed it while this one waited for the lock. A half-written entry is never at ``path``.
    (``flock`` serialises processes on one machine and on file systems that support it across machines.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            yield None
            return
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            yield temporary
            os.replace(temporary, path)
        finally:
            if temporary.is_dir():
                shutil.rmtree(temporary)
            elif temporary.exists():
                temporary.unlink()
