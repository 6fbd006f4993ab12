"""Files lm_ce keeps for itself: the cache folder (`LM_CE_CACHE`), the sha256 of data and model files (remembered
while a file stays the same, so that a later run does not read a large file again), and files written whole."""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_digests: dict[tuple, str] = {}  # file_sha256's answers, by the file's identity and times


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write a file or a folder into; renamed onto `path` when the block ends
    without an error, removed whatever ends it (Ctrl-C included), so a stop never leaves a half-written file in
    place or a temporary behind. The temporary is `.NAME.tmp<pid>-<thread><suffix>` (a suffix for writers that
    read the format from the name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name.lstrip('.')}.tmp{os.getpid()}-{threading.get_ident() % 10**6}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def atomic_write(path: Path | str, content: str | bytes) -> Path:
    """Write `content` (text as UTF-8) to `path` whole, then rename it into place: never a half-written file."""
    with atomic_path(path) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
    return Path(path)


def cache_root() -> Path | None:
    """lm_ce's cache folder: `LM_CE_CACHE` (absolute), else ~/.cache/lm_ce; None when LM_CE_CACHE is set empty,
    which turns the disk cache off (never the current directory)."""
    value = os.environ.get("LM_CE_CACHE")
    if value is None:
        return Path.home() / ".cache" / "lm_ce"
    return Path(value).expanduser().absolute() if value.strip() else None


SETTLED_NS = 2 * 10**9  # a file changed this recently is not remembered on disk: timestamps can be coarser
MEMOS = "sha256"  # the memo folder under the cache
KEY = ".key"  # the memo folder's secret: memos are signed with it, so that a planted or copied memo is not believed


def file_sha256(path: str, block: int = 2**24) -> str:
    """The sha256 of a file's bytes, remembered while its device, inode, size, mtime and ctime stay the same (any
    write changes the ctime): in memory, and on disk under `LM_CE_CACHE`/sha256, so that a later run or a resume
    does not read a large data or GGUF file again. A memo on disk holds the file's identity and digest signed
    with a secret of the cache (HMAC-SHA256; the secret is readable by its owner alone): a memo that someone
    wrote or copied there, or one for another file, fails the check and the file is read again. A file changed
    within SETTLED_NS of being hashed is not remembered on disk: a write in the same timestamp tick would go
    unseen."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _digests:
        return _digests[key]
    known = _recall(key)
    if known:
        _digests[key] = known
        return known
    began = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    _digests[key] = digest.hexdigest()
    if began - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS:
        _remember(key, _digests[key])
    return _digests[key]


def _memo(key: tuple) -> Path | None:
    root = cache_root()
    return None if root is None else root / MEMOS / hashlib.sha256(repr(key).encode()).hexdigest()


def _signature(secret: bytes, key: tuple, digest: str) -> str:
    return hmac.new(secret, f"{key!r}\n{digest}".encode(), hashlib.sha256).hexdigest()


def _recall(key: tuple) -> str | None:
    """The digest remembered on disk for this file identity, when its memo is one this cache signed."""
    memo = _memo(key)
    secret = _secret(create=False) if memo is not None else None
    if secret is None:
        return None
    try:
        saved = json.loads(memo.read_text(encoding="utf-8"))
        digest = saved["sha256"]
        if saved["file"] != repr(key) or not hmac.compare_digest(saved["hmac"], _signature(secret, key, digest)):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) and len(digest) == 64 else None


def _remember(key: tuple, digest: str) -> None:
    memo = _memo(key)
    with contextlib.suppress(OSError):
        secret = _secret(create=True) if memo is not None else None
        if secret is not None:
            record = {"file": repr(key), "sha256": digest, "hmac": _signature(secret, key, digest)}
            atomic_write(memo, json.dumps(record))


def _secret(create: bool) -> bytes | None:
    """The memo folder's secret: 32 random bytes in a file of mode 0600 owned by this user (created on first use
    when `create`). None when missing, or readable by others or owned by someone else (then memos are neither
    believed nor written)."""
    root = cache_root()
    if root is None:
        return None
    path = root / MEMOS / KEY
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            value = f.read(64)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077 or len(value) != 32:
        return None
    return value


def memo_files() -> list[Path]:
    """The sha256 memos on disk (for `lm-ce cache`), the secret not included."""
    root = cache_root()
    folder = root / MEMOS if root is not None else None
    if folder is None or not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name != KEY and p.is_file()]


def file_stat(path: str) -> list[int]:
    """A file's device, inode, size, mtime and ctime (ns), as file_sha256 remembers it by: the same list later means
    the content hashed then is the content now (any write moves the ctime, which no tool sets back; a rename over
    it or a retargeted symlink changes the inode)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
