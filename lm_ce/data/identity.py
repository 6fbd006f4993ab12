"""What a run's data is, taken when it is read: local files by the sha256 of their content (and the file's identity
and times when hashed, so that a write while the run reads it is seen), a Hub dataset by the commit it is read at.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lm_ce.config.fields import Config
from lm_ce.data.local import local_files
from lm_ce.errors import UsageError
from lm_ce.files import file_sha256, file_stat


@dataclass
class FileRead:
    """One local data file as the run read it."""

    path: str
    bytes: int
    sha256: str
    stat: list[int]  # files.file_stat when its content was last checked (taken before hashing: a later write shows)


@dataclass
class DataIdentity:
    """The data of a run: `files` (local files), `hub` (a Hub dataset; the commit is filled in when it is read) or
    `memory` (rows given to lm_ce.evaluate)."""

    source: str
    name: str | None = None  # the Hub dataset
    files: list[FileRead] = field(default_factory=list)
    revision: str | None = None  # --dataset-revision as given
    resolved_revision: str | None = None  # the Hub commit read
    streamed: bool = False  # read as the run goes (set by reading.load_rows: --streaming, --data-cache off)

    @classmethod
    def taken(cls, cfg: Config, in_memory: bool = False, saved: dict | None = None) -> DataIdentity:
        """The data `cfg` names, now: local files hashed (remembered by files.file_sha256 while a file is unchanged,
        so a resume does not read them again). `saved`: the identity a resumed run recorded, whose Hub commit this
        run reads again."""
        if in_memory:
            return cls("memory")
        if not cfg.data_files:
            commit = (saved or {}).get("resolved_revision")
            return cls("hub", cfg.dataset, revision=cfg.dataset_revision, resolved_revision=commit)
        _, paths = local_files(cfg)
        files = []
        for p in paths:
            key = file_stat(p)
            files.append(FileRead(p, key[2], file_sha256(p), key))
        return cls("files", files=files)

    def record(self) -> dict:
        """As results.json's `data` and the saved state record it (plain JSON)."""
        if self.source == "files":
            files = [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in self.files]
            return {"source": "files", "files": files}
        if self.source == "hub":
            return {"source": "hub", "revision": self.revision, "resolved_revision": self.resolved_revision}
        return {"source": self.source}

    def check_read(self, paths: list[str]) -> list[str]:
        """The files' sha256 as they are read now (what keys datasets' Arrow copy), refused unless they are the
        content recorded at the start; each file's stat is taken again, as of this read, for check_unchanged."""
        digests = []
        for f, path in zip(self.files, paths):
            stat, digest = file_stat(path), file_sha256(path)
            if digest != f.sha256:
                raise UsageError(f"data file {f.path} changed since the run started (sha256 {f.sha256[:12]} then, "
                                 f"{digest[:12]} now): its figures would not be of the recorded content; rerun once "
                                 "the file stays unchanged")
            f.stat = stat
            digests.append(digest)
        return digests

    def check_unchanged(self, reading: str) -> None:
        """Refuse when a file was written, replaced or retargeted since its content was last checked (at the start,
        or by check_read): what was read (`reading`) may then mix two contents."""
        for f in self.files:
            try:
                now = file_stat(f.path)
            except OSError:
                now = None
            if now != f.stat:
                after = file_sha256(f.path)[:12] if now is not None else "gone"
                raise UsageError(f"data file {f.path} changed while the run read it ({reading}; sha256 "
                                 f"{f.sha256[:12]} at the start, {after} now): the figures would mix both; rerun "
                                 "once the file stays unchanged (--overwrite)")

    def resolve(self, commit: str | None) -> None:
        """The Hub commit the dataset is read at: recorded; a resumed run must read the commit it started on."""
        commit_id = self.revision and len(self.revision) == 40 and all(c in "0123456789abcdef" for c in self.revision)
        asked = self.revision if commit_id else None  # a commit asked by its id
        if asked and commit != asked:
            raise UsageError(f"--dataset-revision {asked[:12]}: dataset '{self.name}' was found at commit "
                             f"{str(commit)[:12]} instead (offline, datasets reads its latest cached copy); run where "
                             "that commit can be read, or drop --dataset-revision")
        if self.resolved_revision is not None and commit != self.resolved_revision:
            raise UsageError(f"dataset '{self.name}' resolves to commit {str(commit)[:12]}, but the run started on "
                             f"{self.resolved_revision[:12]}: it cannot be read at that commit (offline? "
                             "datasets then reads its latest cached copy); resume where that commit can be read, or "
                             "start over with --overwrite")
        self.resolved_revision = commit
