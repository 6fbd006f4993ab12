"""The rows a config names, through `datasets`: a Hub dataset, or local files by way of datasets' Arrow copy of
them (keyed by their content); whatever `datasets` raises while reading becomes one line naming the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from lm_ce import compat
from lm_ce.config.fields import LAYOUT_FIELDS, Config
from lm_ce.data.arrow import ArrowCopy, copy_damage, plain_values, record_copy
from lm_ce.data.identity import DataIdentity
from lm_ce.data.local import first_bad_json_line, first_bad_utf8, local_files, whole_text
from lm_ce.errors import UsageError, first_line
from lm_ce.files import file_sha256

log = logging.getLogger("lm_ce")

MEMORY = "<memory>"  # Config.dataset when the rows were given in memory (lm_ce.evaluate, PerplexityCallback)


def row_fields(cfg: Config) -> list[str]:
    """The fields of a row that the run reads: text (or a task's own fields), prompt, group, id, --join-by's keys."""
    main = task_fields(cfg) if cfg.task != "perplexity" else (cfg.text_field, cfg.prompt_field)
    return [f for f in (*main, cfg.group_field, cfg.id_field, *(cfg.join_by or [])) if f]


def task_fields(cfg: Config) -> tuple[str, ...]:
    """The fields a multiple-choice layout or the surprisal task reads."""
    if cfg.task == "surprisal":
        return (cfg.words_field or cfg.text_field,)
    return LAYOUT_FIELDS.get(cfg.layout, (cfg.context_field, cfg.choices_field, cfg.label_field))


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """datasets logs its read errors before raising them; we turn those into one line of our own. Its logger's
    level is put back on the way out (a `with` block, never held by a generator across a yield)."""
    import datasets  # noqa: F401  (its import sets that level: read it afterwards)

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_error(cfg: Config, e: Exception) -> UsageError:
    """One line for an exception from `datasets` while loading or reading: the file and line when we can tell."""
    if not cfg.data_files:
        return UsageError(f"reading dataset '{cfg.dataset}' failed ({type(e).__name__}: {first_line(e)})")
    builder, paths = local_files(cfg)
    for p in paths if builder in ("text", "json", "csv") else []:  # scanned on failure only: 14 s for 300 MB here
        bad = first_bad_utf8(p)
        if bad:
            return UsageError(bad)
    if builder == "json":
        for p in paths:
            bad = first_bad_json_line(p)
            if bad:
                return UsageError(bad)
    cause = e.__cause__ or e  # DatasetGenerationError says only that something failed; its cause says what
    return UsageError(f"cannot read {', '.join(paths)} as {builder}: {first_line(cause).rstrip('.')}; fix the file or check --dataset")


def cache_options(cfg: Config) -> dict:
    """load_dataset's arguments for --data-cache: datasets' own cache (default), a cache inside --output-dir,
    or none (off: the data is read as a stream, so no Arrow copy is written)."""
    if cfg.data_cache == "off":
        return {"streaming": True}
    if cfg.data_cache == "output":
        return {"streaming": cfg.streaming, "cache_dir": str(Path(cfg.output_dir) / "datasets_cache")}
    return {"streaming": cfg.streaming}


def cache_name(paths: list[str], read: DataIdentity | None = None) -> str:
    """The config name that keys datasets' Arrow cache of local files by their content. datasets keys it by path
    and mtime alone, so a file replaced by another with its mtime kept (cp -p, rsync -t, tar) was read from the
    old copy, while results.json recorded the new file's sha256. `read`: the content the run recorded at its
    start, which these hashes must be (the copy read is then the content recorded)."""
    digests = read.check_read(paths) if read is not None else [file_sha256(p) for p in paths]
    content = hashlib.sha256(" ".join(digests).encode()).hexdigest()
    return f"lm_ce-{content[:32]}"


def load_rows(cfg: Config, read: DataIdentity | None = None):
    """The `datasets` Dataset (or IterableDataset when streaming) the config names. `read`: the data as the run
    recorded it at its start (data/identity.py), checked against what is read here, and given the Hub commit."""
    import datasets

    if cfg.dataset == MEMORY and not cfg.data_files:
        raise UsageError(
            f"dataset '{MEMORY}': the rows of this run were given in memory to lm_ce.evaluate; to run it from a "
            "config, give --data-files FILE or --dataset NAME"
        )
    if cfg.data_files:
        builder, paths = local_files(cfg)
        if builder == "text" and cfg.mode == "llama-cpp":  # read whole: a bad byte named before decoding
            for p in paths:
                if bad := first_bad_utf8(p):
                    raise UsageError(bad)
            rows = datasets.Dataset.from_dict({"text": [whole_text(p) for p in paths]})
            if read is not None:
                read.check_unchanged("reading it whole")
            return rows
        # A byte order mark starts many files saved on Windows; json strips it, text would score it (3 bytes)
        options = {"encoding": "utf-8-sig"} if builder == "text" else {}
        cache = cache_options(cfg)
        try:
            with quiet_datasets():
                if cache.pop("streaming"):
                    if read is not None:  # read as the run goes: the runner checks the files at its end
                        read.streamed = True
                    return datasets.load_dataset(builder, data_files=paths, split="train", streaming=True, **cache,
                                                 **options)
                return arrow_copy(cfg, builder, paths, cache_dir=cache.get("cache_dir"), options=options, read=read)
        except UsageError:
            raise
        except Exception as e:  # datasets raises many kinds; turn them into one clear line
            raise read_error(cfg, e) from None
    try:
        return hub_rows(cfg, read)
    except UsageError:
        raise
    except ValueError as e:
        if "split" in str(e).lower():
            raise UsageError(f"dataset '{cfg.dataset}' has no split '{cfg.split}': {first_line(e)}") from None
        raise UsageError(f"cannot load dataset '{cfg.dataset}' ({cfg.dataset_config}): {first_line(e)}") from None
    except Exception as e:
        raise UsageError(
            f"cannot load dataset '{cfg.dataset}' ({cfg.dataset_config}, split {cfg.split}) from the Hub or the "
            f"local cache ({type(e).__name__}: {first_line(e)}). Offline? Point at local files instead: "
            "--data-files FILE.jsonl|.txt|.csv|.parquet --text-field FIELD"
        ) from None


def hub_rows(cfg: Config, read: DataIdentity | None):
    """A Hub dataset at --dataset-revision (a resumed run: at the commit it started on), its commit recorded."""
    import datasets

    cache = cache_options(cfg)
    revision = (read.resolved_revision if read is not None else None) or cfg.dataset_revision
    builder = datasets.load_dataset_builder(cfg.dataset, cfg.dataset_config, revision=revision,
                                            cache_dir=cache.get("cache_dir"))
    if read is not None:
        read.resolve(builder.hash)  # the commit datasets resolved the revision to (or found in its cache, offline)
    if cache["streaming"]:
        return builder.as_streaming_dataset(split=cfg.split)
    builder.download_and_prepare()
    return builder.as_dataset(split=cfg.split)


def arrow_copy(cfg: Config, builder: str, paths: list[str], *, cache_dir: str | None, options: dict,
               read: DataIdentity | None = None):
    """datasets' Arrow copy of local files, keyed by their content (`cache_name`): written on the first run (and its
    files written down: sizes, rows, sha256), found on later ones and checked against that record and datasets'
    own row count; a copy that fails (cut, changed, not made by lm_ce) is made again, said in one line. An
    `ArrowCopy` when the run's fields hold plain values, else the Dataset."""
    import datasets

    check_cache_folder(cache_dir)
    prepared = datasets.load_dataset_builder(builder, data_files=paths, cache_dir=cache_dir,
                                             name=cache_name(paths, read), **options)
    found = (Path(prepared.cache_dir) / "dataset_info.json").is_file()
    prepared.download_and_prepare()
    files, rows = copy_files(prepared)
    why = copy_damage(prepared.cache_dir, files, rows) if found and files else None
    if why is not None:
        log.warning("the Arrow copy of %s in %s is damaged (%s): making it again", ", ".join(paths),
                    prepared.cache_dir, why)
        try:
            prepared.download_and_prepare(download_mode="force_redownload")
        except OSError as e:  # the cache, not the data: a folder that cannot be written
            raise UsageError(f"the Arrow copy of {', '.join(paths)} in {prepared.cache_dir} is damaged ({why}) and "
                             f"cannot be made again ({e.strerror or e}); delete that folder, or use --data-cache "
                             "off") from None
        files, rows = copy_files(prepared)
    if read is not None and (not found or why is not None):  # the copy is of the content recorded, unless a file
        read.check_unchanged("making its Arrow copy")  # was written while it was made
    if files and (not found or why is not None):
        record_copy(prepared.cache_dir, files)
    features = prepared.info.features
    if features is not None and plain_values(features, row_fields(cfg)) and files:
        return ArrowCopy(files=files, column_names=list(features), num_rows=rows)
    return prepared.as_dataset(split="train")


def copy_files(prepared) -> tuple[list[str], int]:
    """(the Arrow files of the copy's train split in order, its row count as datasets recorded it); no files when
    the split is not read whole from its files."""
    split = prepared.info.splits["train"]
    parts = compat.file_instructions(prepared)
    if parts and all(p["skip"] == 0 for p in parts) and sum(p["take"] for p in parts) == split.num_examples:
        return [p["filename"] for p in parts], split.num_examples
    return [], split.num_examples


def check_cache_folder(cache_dir: str | None) -> None:
    """The folder datasets keeps its Arrow copies in (--data-cache output's, else HF_DATASETS_CACHE's), refused in
    one line naming it when it is a file or lies under one (not blamed on the data files)."""
    import datasets

    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
    which = "--data-cache output's folder" if cache_dir else "the datasets cache (HF_DATASETS_CACHE)"
    blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{which} {folder} cannot be used: {blocker} is a file; point it at a folder, or use "
                         "--data-cache off")
