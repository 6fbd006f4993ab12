"""lm_ce.data on local files: each format, fields, --join-by, --limit, and the checks of bad files."""
from __future__ import annotations

import csv
import json

import pytest

from lm_ce.config.fields import Config
from lm_ce.data.arrow import arrow_rows
from lm_ce.data.documents import Document, iter_documents
from lm_ce.data.local import first_bad_json_line, first_bad_utf8, local_files
from lm_ce.data.reading import load_rows
from lm_ce.errors import UsageError

from .conftest import make_jsonl

ROWS = [
    {"text": "First row, café.", "id": "a", "topic": "x"},
    {"text": "Second row 🙂", "id": "b", "topic": "y"},
    {"text": "Third row.", "id": "c", "topic": "x"},
]


def documents(path, **fields) -> list[Document]:
    return list(iter_documents(Config(data_files=[str(path)], **fields)))


def write_csv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_parquet(path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_format_gives_the_rows_in_order(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        write_csv(path, ROWS)
    elif suffix == ".parquet":
        write_parquet(path, ROWS)
    else:
        make_jsonl(path, ROWS)
    docs = documents(path, id_field="id", group_field="topic")
    expected = [Document(index=i, text=r["text"], id=r["id"], group=r["topic"]) for i, r in enumerate(ROWS)]
    assert docs == expected


def test_text_file_is_one_document_per_line(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("one line\nsecond line\n\nafter a blank\n", encoding="utf-8")
    assert [d.text for d in documents(path)] == ["one line", "second line", "", "after a blank"]
    assert [d.index for d in documents(path)] == [0, 1, 2, 3]


def test_streaming_gives_the_same_documents(tmp_path):
    path = make_jsonl(tmp_path / "data.jsonl", ROWS)
    assert documents(path, streaming=True, id_field="id") == documents(path, id_field="id")


def test_rows_without_text_are_yielded_as_none(tmp_path):
    rows = [{"text": "ok"}, {"text": None}, {"text": 5}, {"other": "no text key"}, {"text": ["a"]}, {"text": ""}]
    path = make_jsonl(tmp_path / "data.jsonl", rows)
    assert [(d.index, d.text) for d in documents(path)] == [(0, "ok"), (1, None), (2, None), (3, None), (4, None), (5, "")]


def test_id_group_and_prompt_fields(tmp_path):
    rows = [
        {"body": "text one", "q": "Question? ", "n": 17, "g": 3},
        {"body": "text two", "q": 42, "n": None, "g": None},
    ]
    path = make_jsonl(tmp_path / "data.jsonl", rows)
    docs = documents(path, text_field="body", prompt_field="q", id_field="n", group_field="g")
    assert docs[0] == Document(index=0, text="text one", id="17", prompt="Question? ", group="3")  # ids, groups as strings
    assert docs[1] == Document(index=1, text="text two", id=None, prompt=None, group=None)  # a prompt must be a string
    assert [d.prompt for d in documents(path, text_field="body")] == [None, None]  # no prompt unless asked


def test_limit_counts_documents(tmp_path):
    path = make_jsonl(tmp_path / "data.jsonl", ROWS)
    assert [d.text for d in documents(path, limit=2)] == [ROWS[0]["text"], ROWS[1]["text"]]
    assert len(documents(path, limit=10)) == 3


def test_join_by_joins_consecutive_rows(tmp_path):
    rows = [
        {"book": "A", "part": 1, "text": "one", "id": "first-a"},
        {"book": "A", "part": 1, "text": "two", "id": "second-a"},
        {"book": "B", "part": 1, "text": None, "id": None},
        {"book": "B", "part": 1, "text": "three", "id": None},
        {"book": "B", "part": 2, "text": "four", "id": None},
        {"book": "A", "part": 1, "text": "five", "id": None},  # not consecutive with the first A rows
        {"book": "C", "part": 1, "text": None, "id": None},
    ]
    path = make_jsonl(tmp_path / "data.jsonl", rows)
    docs = documents(path, join_by=["book", "part"], id_field="id")
    assert [(d.index, d.text, d.id) for d in docs] == [
        (0, "one two", "first-a"),  # the first row's id
        (1, "three", "B 1"),  # rows without text are left out; no id field value: the key names it
        (2, "four", "B 2"),
        (3, "five", "A 1"),
        (4, None, "C 1"),  # no row with text: counted as not text
    ]
    assert [d.text for d in documents(path, join_by=["book"], limit=2)] == ["one two", "three four"]


def test_missing_field_is_refused_with_the_fields_there_are(tmp_path):
    path = make_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(UsageError, match="has no field 'body'; its fields are: text, id, topic"):
        documents(path, text_field="body")
    with pytest.raises(UsageError, match="has no field 'chapter'"):
        documents(path, join_by=["chapter"])


def test_local_files_builder_by_extension(tmp_path):
    a = make_jsonl(tmp_path / "a.jsonl", ROWS)
    b = make_jsonl(tmp_path / "b.JSON", ROWS)
    assert local_files(Config(data_files=[a, b])) == ("json", [a, b])
    c = write_csv(tmp_path / "c.csv", ROWS)
    with pytest.raises(UsageError, match="cannot tell the format"):
        local_files(Config(data_files=[a, c]))
    odd = tmp_path / "rows.log"
    odd.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="cannot tell the format"):
        local_files(Config(data_files=[str(odd)]))
    assert local_files(Config(data_files=[str(odd)], dataset="json")) == ("json", [str(odd)])  # --dataset names it
    assert [d.text for d in documents(odd, dataset="json")] == [ROWS[0]["text"]]


def test_local_files_refuses_what_is_not_a_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for path, message in [(tmp_path, "is a directory"), (tmp_path / "missing.jsonl", "does not exist"),
                          (empty, "is empty")]:
        with pytest.raises(UsageError, match=message):
            local_files(Config(data_files=[str(path)]))


def test_first_bad_utf8_line_and_column(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ab\ncdefgh\xffi\n")  # the bad byte is the 7th of line 2
    for block in (1, 4, 1024):  # the line's start and the bad byte in different blocks, and in one
        assert first_bad_utf8(str(path), block).startswith(f"{path}:2: not valid UTF-8 (byte 0xff, byte 7 of the line)")
    first = tmp_path / "first.txt"
    first.write_bytes(b"\x80abc")
    assert first_bad_utf8(str(first)).startswith(f"{first}:1: not valid UTF-8 (byte 0x80, byte 1 of the line)")
    assert "iconv" in first_bad_utf8(str(first))  # says how to re-encode
    good = tmp_path / "good.txt"
    good.write_text("naïve 🙂\n交叉熵\n", encoding="utf-8")
    assert first_bad_utf8(str(good), 1) is None


def test_latin1_file_is_refused_when_read(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 ok\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin\.txt:1: not valid UTF-8 \(byte 0xe9, byte 4 of the line\)"):
        documents(path)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("ok.jsonl", '{"text": "a"}\n\n{"text": "b"}\n', None),
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n', ":3: not valid JSON ("),
        ("array.jsonl", '{"text": "a"}\n[1, 2]\n', ":2: a JSON array, not an object"),
        ("first.jsonl", '"just a string"\n', ":1: a JSON string, not an object"),
        ("bool.jsonl", '{"text": "a"}\ntrue\n', ":2: a JSON boolean, not an object"),
        ("null.jsonl", '{"text": "a"}\nnull\n', ":2: a JSON null, not an object"),
        ("number.jsonl", '{"text": "a"}\n3.5\n', ":2: a JSON number, not an object"),
        ("blank.jsonl", "\n  \n\n", ": no rows, only blank lines"),
        ("whole.json", '{\n  "text": "one document"\n}\n', None),  # a .json file may hold one multi-line value
        ("list.json", '[{"text": "a"}, {"text": "b"}]\n', None),
        ("broken.json", '{\n  "text": "a",\n  oops\n}\n', ":3: not valid JSON ("),
        ("second.json", '{"text": "a"}\n[1]\n', ":2: a JSON array, not an object"),
    ],
)
def test_first_bad_json_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    found = first_bad_json_line(str(path))
    if expected is None:
        assert found is None
    else:
        assert found.startswith(f"{path}{expected}"), found


def test_bad_json_line_is_named_when_reading(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"data\.jsonl:2: not valid JSON"):
        documents(path)


@pytest.mark.parametrize("suffix", ["jsonl", "txt"])
def test_a_file_swapped_with_its_mtime_kept_is_read_anew(tmp_path, suffix):
    """datasets keys its Arrow cache by path and mtime: a file replaced by cp -p, rsync -t or tar (mtime kept) was
    read from the old copy. The cache is keyed by content, so the current rows are read."""
    import os

    import datasets

    path = tmp_path / f"d.{suffix}"

    def write(n: int) -> None:
        lines = [json.dumps({"text": f"row {i}"}) if suffix == "jsonl" else f"row {i}" for i in range(n)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def plain() -> int:  # datasets alone, keyed by path and mtime
        builder = "json" if suffix == "jsonl" else "text"
        return len(datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=str(tmp_path / "c")))

    write(40)
    before = os.stat(path)
    assert plain() == 40 and len(documents(path)) == 40
    write(41)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -r: the old time on the new content
    assert plain() == 40  # the old rows: why the cache is keyed by content
    assert [d.text for d in documents(path)] == [f"row {i}" for i in range(41)]
    assert len(documents(path)) == 41  # the cache of the new content, read again


@pytest.mark.parametrize("how", ["dataset", "streaming", "list", "join_by", "limit"])
def test_documents_from_a_start_are_the_tail(tmp_path, how):
    """A resumed run reads its documents from its first unfinished one: the same documents, indices included, as
    the whole run's from there, however the rows come (a Dataset's selection, a stream's skip, a list's slice)."""
    rows = [{"text": f"row {i}", "id": str(i), "book": i // 3} for i in range(20)]
    path = make_jsonl(tmp_path / "data.jsonl", rows)
    fields = {"join_by": ["book"]} if how == "join_by" else {"limit": 15} if how == "limit" else {}
    cfg = Config(data_files=[path], id_field="id", streaming=how == "streaming", **fields)
    given = rows if how == "list" else None
    whole = list(iter_documents(cfg, given))
    for start in (0, 1, 5, len(whole) - 1, len(whole), len(whole) + 3):
        assert list(iter_documents(cfg, given, start=start)) == whole[start:], start


def test_arrow_rows_from_a_start_across_batches_and_files(tmp_path):
    """datasets' Arrow files read a record batch at a time: the rows from any start, in order, only the fields asked."""
    import pyarrow as pa

    rows = [{"text": f"row {i}", "id": str(i), "n": i} for i in range(30)]
    schema = pa.schema([("text", pa.string()), ("id", pa.string()), ("n", pa.int64())])
    files = []
    for k in range(3):  # 3 files of 10 rows, in batches of 3, 3, 3, 1
        path = str(tmp_path / f"part{k}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for b in range(0, 10, 3):
                writer.write_batch(pa.RecordBatch.from_pylist(rows[10 * k + b : 10 * k + min(b + 3, 10)], schema))
        files.append(path)
    expected = [{"text": r["text"], "id": r["id"]} for r in rows]
    for start in (0, 1, 2, 3, 9, 10, 11, 25, 29, 30, 35):
        assert list(arrow_rows(files, start, ["text", "id", "text"])) == expected[start:], start


def test_local_files_are_read_from_their_arrow_copy_without_a_dataset(tmp_path, monkeypatch):
    """The documents of local files are those of datasets' own rows, read from its Arrow copy without opening it
    as a Dataset (which reads the whole copy at every start) or through its memory map (whose pages would stay
    resident as the run goes)."""
    import datasets

    rows = [{"text": f"row {i} é", "id": str(i), "topic": "xy"[i % 2], "n": i} for i in range(50)] + [{"text": None, "id": "z"}]
    path = make_jsonl(tmp_path / "data.jsonl", rows)
    cfg = Config(data_files=[path], id_field="id", group_field="topic")
    as_datasets_reads = list(iter_documents(cfg, list(datasets.load_dataset("json", data_files=[path], split="train",
                                                                             cache_dir=str(tmp_path / "c")))))
    load_rows(cfg)  # the Arrow copy, written
    monkeypatch.setattr(datasets.Dataset, "__init__", lambda *a, **k: pytest.fail("opened as a Dataset"))
    assert list(iter_documents(cfg)) == as_datasets_reads
    assert list(iter_documents(cfg, start=7)) == as_datasets_reads[7:]
    assert as_datasets_reads[-1].text is None and as_datasets_reads[3].group == "y"
    assert len(load_rows(cfg)) == 51


def test_a_field_of_lists_is_read_through_the_dataset(tmp_path):
    """A field the run reads that holds no plain value (here a list, which lm_ce counts as no text) goes through
    the Dataset, as datasets gives it."""
    rows = [{"text": ["a", "b"], "id": "0"}, {"text": ["c"], "id": "1"}]
    cfg = Config(data_files=[make_jsonl(tmp_path / "data.jsonl", rows)], id_field="id")
    assert type(load_rows(cfg)).__name__ == "Dataset"
    assert [(d.id, d.text) for d in iter_documents(cfg)] == [("0", None), ("1", None)]


def test_a_file_hash_is_remembered_on_disk_until_the_file_changes(tmp_path, monkeypatch):
    """A large data file is hashed once, not at every start or resume: the digest is kept under LM_CE_CACHE by
    the file's inode, size and times, and a rewrite (a new ctime) is hashed anew; a file changed just now is
    not remembered on disk, since a second write in the same timestamp tick would look the same."""
    import hashlib
    import time

    from lm_ce import files as model

    monkeypatch.setenv("LM_CE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "data.txt"
    path.write_text("one\n")
    model.file_sha256(str(path))
    assert not (tmp_path / "cache" / "sha256").exists()  # just written: not remembered on disk
    monkeypatch.setattr(model, "SETTLED_NS", -10**12)
    monkeypatch.setattr(model, "_digests", {})
    assert model.file_sha256(str(path)) == hashlib.sha256(b"one\n").hexdigest()
    [memo] = [p for p in (tmp_path / "cache" / "sha256").iterdir() if p.name != model.KEY]
    assert memo.is_file()
    monkeypatch.setattr(model, "_digests", {})
    monkeypatch.setattr(model, "open", lambda *a, **k: pytest.fail("the file was read again"), raising=False)
    assert model.file_sha256(str(path)) == hashlib.sha256(b"one\n").hexdigest()  # what a later process finds
    monkeypatch.delattr(model, "open")
    time.sleep(0.05)  # past the file system's timestamp tick
    path.write_text("two\n")  # same size, new content: the ctime moves
    assert model.file_sha256(str(path)) == hashlib.sha256(b"two\n").hexdigest()
