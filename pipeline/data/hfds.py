"""``hfds:PATH``: image-caption pairs in a Hugging Face data set on disk, read with pyarrow.

PATH is one of:

- a ``Dataset.save_to_disk`` folder (``state.json``, ``dataset_info.json``, arrow files): one
  data set, split by its ``split`` column if it has one, else by the hash rule;
- a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json`` and a folder per split);
- a parquet file, a pattern of them (``{a,b}``, ``*``), or a folder holding them (searched
  recursively, as the Hub lays them out: ``data/train-00000-of-00001.parquet``). Files named
  ``{split}-NNNNN-of-NNNNN`` (or ``train``/``test``/``validation``/``val``/``dev`` followed by
  ``-`` or ``.``) give their split; otherwise the files are one data set, split as above.

Arrow files are memory-mapped and parquet files read a row group at a time, both opened in the
process that reads (a DataLoader worker opens its own). The ``datasets`` library is not needed.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common import listing
from featcache.pipeline.common.listing import ARROW, HFDS_HINT, HFDS_OPTIONS, hfds_layout
from featcache.pipeline.common.names import hash_split
from featcache.pipeline.data import corpora
from featcache.pipeline.data.corpora import Sample
from featcache.pipeline.data.decode import decode_image
from featcache.pipeline.data.rows import BadImage, Split


# -- reading ----------------------------------------------------------------------------------
class _ArrowFile:
    """A save_to_disk arrow file, memory-mapped: its image column, found by row."""

    def __init__(self, path: str, column: str):
        import pyarrow as pa

        source = pa.memory_map(path)
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
        self.chunks = table.column(column).chunks
        self.starts = list(np.cumsum([0] + [len(c) for c in self.chunks[:-1]]))

    def cell(self, row: int):
        c = bisect_right(self.starts, row) - 1
        return self.chunks[c][row - int(self.starts[c])]

    def close(self) -> None:
        self.chunks = []


class _ParquetFile:
    """A parquet file, memory-mapped; the image column of its last read row group kept."""

    def __init__(self, path: str, column: str):
        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(path, memory_map=True)
        self.column = column
        md = self.file.metadata
        self.starts = list(np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups - 1)]))
        self.group, self.values = -1, None

    def cell(self, row: int):
        g = bisect_right(self.starts, row) - 1
        if g != self.group:
            self.values = self.file.read_row_group(g, columns=[self.column]).column(0).combine_chunks()
            self.group = g
        return self.values[row - int(self.starts[g])]

    def close(self) -> None:
        self.file.close()


def _open(key: str):
    kind, column, path = key.split("\0")
    return _ArrowFile(path, column) if kind == ARROW else _ParquetFile(path, column)


_HANDLES = corpora.Handles(_open, size=16)


def _bytes_and_path(cell) -> tuple[bytes | None, str | None]:
    """An image cell's bytes and (for HF's Image struct) its recorded path."""
    import pyarrow as pa

    if not cell.is_valid:
        return None, None
    if isinstance(cell, pa.StructScalar):
        data = cell["bytes"].as_py()
        path = cell["path"].as_py() if cell.type.get_field_index("path") >= 0 else None
        return data, path
    return cell.as_py(), None


def _suffix(data: bytes) -> str:
    """``.svg`` for SVG bytes, the one format decode_image picks by name; others by content."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return ".svg" if head.startswith(b"<") and b"<svg" in head else ""


class TableReader:
    """Every image row: its file, its row in that file, and its id (for messages)."""

    def __init__(self, files: list[str], kinds: list[str], columns: list[str], file_of: np.ndarray,
                 local: np.ndarray, ids: list[str]):
        self.files, self.kinds, self.columns = files, kinds, columns
        self.file_of, self.local, self.ids = file_of, local, ids

    def where(self, row: int) -> str:
        return f"{self.files[self.file_of[row]]} row {int(self.local[row])} (id {self.ids[row]!r})"

    def source(self, row: int) -> str:
        return f"{self.files[self.file_of[row]]}:{int(self.local[row])}"

    def _cell(self, row: int):
        f = int(self.file_of[row])
        try:
            return _bytes_and_path(_HANDLES.get(f"{self.kinds[f]}\0{self.columns[f]}\0{self.files[f]}").cell(
                int(self.local[row])))
        except OSError as err:
            raise BadImage(f"cannot read the image of {self.where(row)}: {err.strerror or err}",
                           "check that the file is readable, or pass --skip-bad to record it as a missing "
                           "row") from None
        except Exception as err:  # noqa: BLE001 - pyarrow raises its own types for damaged files
            raise BadImage(f"cannot read the image of {self.where(row)}: {type(err).__name__}: {err}",
                           "fix or re-save the data set, or pass --skip-bad to record it as a missing row") from None

    def raw(self, row: int) -> bytes:
        data, _ = self._cell(row)
        if data is None:
            raise BadImage(f"{self.where(row)} has no image bytes", "re-save the data set with the images embedded")
        return data

    def load(self, row: int):
        return self.decode(row, self.raw(row))

    def decode(self, row: int, data: bytes):
        name = f"{self.source(row)}{_suffix(data)}"
        try:
            return decode_image(data, name)
        except BadImage as err:
            prefix = f"cannot decode image {name}: "
            detail = err.message[len(prefix):] if err.message.startswith(prefix) else err.message
            raise BadImage(f"cannot decode the image of {self.where(row)}: {detail}", err.hint) from None

    def stamps(self) -> np.ndarray:
        return listing.stamps_array(listing.stat_files(self.files), self.file_of)


# -- listing ----------------------------------------------------------------------------------
def _columns(path: str, schema, options: dict) -> tuple[str, str]:
    import pyarrow as pa

    names = list(schema.names)
    listed = ", ".join(names) or "none"
    image = options.get("image_column", "image")
    if image not in names:
        raise FeatcacheError(f"{path} has no column {image!r} (its columns: {listed})",
                             "name the image column: hfds:PATH:image_column=NAME")
    kind = schema.field(image).type
    binary = (pa.types.is_binary, pa.types.is_large_binary)
    if not (any(t(kind) for t in binary) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                                             and any(t(kind.field("bytes").type) for t in binary))):
        raise FeatcacheError(f"{path}: the column {image!r} holds {kind}, not images (an Image struct of bytes "
                             "and path, or binary)", "name the image column: hfds:PATH:image_column=NAME")
    text = options.get("text_column") or ("text" if "text" in names else "caption")
    if text not in names:
        asked = repr(text) if options.get("text_column") else "'text' or 'caption'"
        raise FeatcacheError(f"{path} has no column {asked} (its columns: {listed})",
                             "name the caption column: hfds:PATH:text_column=NAME")
    kind = schema.field(text).type
    strings = (pa.types.is_string, pa.types.is_large_string)
    if not (any(t(kind) for t in strings) or ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
                                             and any(t(kind.value_type) for t in strings))):
        raise FeatcacheError(f"{path}: the column {text!r} holds {kind}, not captions (strings or lists of strings)",
                             "name the caption column: hfds:PATH:text_column=NAME")
    return image, text


def _first_null(column) -> int | None:
    """The first row whose image bytes are null (or the whole cell), reading validity only."""
    import pyarrow as pa
    import pyarrow.compute as pc

    start = 0
    for chunk in (column.chunks if isinstance(column, pa.ChunkedArray) else [column]):
        nulls = chunk.is_null()
        if pa.types.is_struct(chunk.type):  # field() is the child sliced as its parent
            nulls = pc.or_(nulls, chunk.field("bytes").is_null())
        hit = np.flatnonzero(nulls.to_numpy(zero_copy_only=False))
        if hit.size:
            return start + int(hit[0])
        start += len(chunk)
    return None


def _null_image(path: str, kind: str, image: str, table=None) -> tuple[int, object] | None:
    """(row, cell) of the first image without bytes. Parquet: from the row groups' statistics,
    reading the column only of a row group that has nulls (or keeps no statistics)."""
    if kind == ARROW:
        row = _first_null(table.column(image))
        return None if row is None else (row, table.column(image)[row])
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path, memory_map=True)
    try:
        md = pf.metadata
        leaves = [j for j in range(md.num_columns) if md.schema.column(j).path in (image, f"{image}.bytes")]
        start = 0
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            stats = [rg.column(j).statistics for j in leaves]
            if leaves and all(s is not None and s.has_null_count and s.null_count == 0 for s in stats):
                start += rg.num_rows
                continue
            values = pf.read_row_group(g, columns=[image]).column(0)
            row = _first_null(values)
            if row is not None:
                return start + row, values[row]
            start += rg.num_rows
    finally:
        pf.close()
    return None


def _read_table(path: str, kind: str, options: dict):
    """(the table of the columns listing needs, the image and text column names)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == ARROW:
            source = pa.memory_map(path)
            try:
                table = pa.ipc.open_stream(source).read_all()  # zero-copy over the map
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
            image, text = _columns(path, table.schema, options)
            return table, image, text
        pf = pq.ParquetFile(path, memory_map=True)
        try:
            image, text = _columns(path, pf.schema_arrow, options)
            wanted = [c for c in (text, "id", "key", "split") if c in pf.schema_arrow.names]
            return pf.read(columns=wanted), image, text
        finally:
            pf.close()
    except FeatcacheError:
        raise
    except OSError as err:
        raise FeatcacheError(f"cannot read {path}: {err.strerror or err}", HFDS_HINT) from None
    except Exception as err:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends for damaged files
        raise FeatcacheError(f"{path} cannot be read as {kind} ({type(err).__name__}: {err})",
                             "re-save the data set (save_to_disk or to_parquet)") from None


def _captions(value, where: str, text: str) -> tuple[list[str | None], list[str | None]]:
    items = value if isinstance(value, list) else [value]
    if not items:
        return [None], [f"{where}: the caption list in column {text!r} is empty"]
    captions, problems = [], []
    for n, item in enumerate(items):
        ok = isinstance(item, str) and bool(item.strip())
        captions.append(item if ok else None)
        label = f"caption {n} in column {text!r}" if isinstance(value, list) else f"caption in column {text!r}"
        problems.append(None if ok else f"{where}: the {label} is missing, null or empty")
    return captions, problems


def load_hfds(target: str, options: dict) -> dict[str, Split]:
    listing.check_options("hfds", options, HFDS_OPTIONS)
    salt = options.get("salt", "")
    files, _ = hfds_layout(target)
    named = files[0][0] is not None
    samples: list[Sample] = []
    paths, kinds, columns, file_of, local, ids = [], [], [], [], [], []
    counters: dict[str | None, int] = {}
    seen_splits: dict[str, str] = {}
    for f, (source_split, path, kind) in enumerate(files):
        split = None
        if named:
            split = corpora.split_name(source_split, path)
            other = seen_splits.setdefault(split, source_split)
            if other != source_split:
                raise FeatcacheError(f"{target}: the splits {other!r} and {source_split!r} both read as {split!r}",
                                     "rename one of them")
        table, image, text = _read_table(path, kind, options)
        null = _null_image(path, kind, image, table)
        if null is not None:
            row, cell = null
            _, recorded = _bytes_and_path(cell)
            stored = f" (only its path {recorded!r} is stored)" if recorded else ""
            raise FeatcacheError(f"{path} row {row}: the image in column {image!r} has no bytes{stored}",
                                 "embed the images: Dataset.save_to_disk stores their bytes; before to_parquet, "
                                 "cast the column from file bytes, or drop the row")
        names = table.schema.names
        id_col = "id" if "id" in names else "key" if "key" in names else None
        id_values = table.column(id_col).to_pylist() if id_col else None
        split_values = table.column("split").to_pylist() if not named and "split" in names else None
        caption_values = table.column(text).to_pylist()
        paths.append(path)
        kinds.append(kind)
        columns.append(image)
        for r, value in enumerate(caption_values):
            where = f"{path} row {r}"
            if id_values is not None:
                if id_values[r] is None:
                    raise FeatcacheError(f"{where}: the {id_col!r} column is null", "give every row an id")
                row_id = str(id_values[r])
            else:
                n = counters[split] = counters.get(split, -1) + 1
                row_id = f"{split}/{n}" if named else str(n)
            if named:
                row_split = split
            elif split_values is not None and split_values[r] not in (None, ""):
                row_split = corpora.split_name(split_values[r], f"{where} (column 'split')")
            else:
                row_split = hash_split(row_id, salt)
            captions, problems = _captions(value, f"{where} (id {row_id!r})", text)
            samples.append(Sample(row_id, row_split, captions, problems, f"{where} (id {row_id!r})", len(ids)))
            file_of.append(f)
            local.append(r)
            ids.append(row_id)
        del table
    reader = TableReader(paths, kinds, columns, np.array(file_of, dtype=np.int64), np.array(local, dtype=np.int64),
                         ids)
    return corpora.pair_splits(listing.readable_stem(target, "hfds"), samples, reader,
                               unique="split" if named else "all",
                               duplicate_hint="ids (the 'id' or 'key' column) must be unique")
