"""Files lm_ce keeps for itself: the cache folder (`LM_CE_CACHE`), and the sha256 of data and model files,
remembered while a file stays the same so that a later run does not read a large file again."""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

_digests: dict[tuple, str] = {}  # file_sha256's answers, by the file's identity and times


SETTLED_NS = 2 * 10**9  # a file changed this recently is not remembered on disk: timestamps can be coarser


def file_sha256(path: str, block: int = 2**24) -> str:
    """The sha256 of a file's bytes, remembered while its device, inode, size, mtime and ctime stay the same (any
    write changes the ctime): in memory, and on disk under `LM_CE_CACHE`/sha256, so that a later run or a resume
    does not read a large data or GGUF file again. A file changed within SETTLED_NS of being hashed is not
    remembered on disk: a write in the same timestamp tick would go unseen."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _digests:
        return _digests[key]
    memo = cache_root() / "sha256" / hashlib.sha256(repr(key).encode()).hexdigest()
    with contextlib.suppress(OSError):
        known = memo.read_text()
        if len(known) == 64 and all(c in "0123456789abcdef" for c in known):
            _digests[key] = known
            return known
    began = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    _digests[key] = digest.hexdigest()
    if began - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS:
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            partial = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            partial.write_text(_digests[key])
            os.replace(partial, memo)
    return _digests[key]


def cache_root() -> Path:
    return Path(os.environ.get("LM_CE_CACHE", Path.home() / ".cache" / "lm_ce"))


def file_stat(path: str) -> list[int]:
    """A file's device, inode, size, mtime and ctime (ns), as file_sha256 remembers it by: the same list later means
    the content hashed then is the content now (any write moves the ctime, which no tool sets back; a rename over
    it or a retargeted symlink changes the inode)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
