"""The results tables of a collection: one row per frame, one row per file.

Parquet when pyarrow imports, else CSV (lists joined with ``;``, an empty cell for a missing value). Every
table is written under a temporary name and renamed when complete (partial.PartialFile).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import SinkError
from ..partial import PartialFile

# Column -> type ("int", "float", "str", "bool", or a list of one of them); None is allowed in every column.
FRAME_COLUMNS: dict[str, str] = {
    "file": "str", "frame": "int", "time_s": "float",
    "topk_ids": "list[int]", "topk_labels": "list[str]", "topk_probs": "list[float]",
    "class_id": "int", "label": "str", "probability": "float", "method": "str",
    "box_x0": "float", "box_y0": "float", "box_x1": "float", "box_y1": "float",
    "peak_x": "int", "peak_y": "int",
}
FILE_COLUMNS: dict[str, str] = {
    "file": "str", "output": "str", "kind": "str", "status": "str", "reason": "str", "frames": "int",
    "dominant_class": "int", "dominant_label": "str", "mean_flicker": "float", "seconds": "float",
    "node": "str", "pid": "int",
}
LIST_SEPARATOR = ";"


def table_format() -> str:
    """"parquet" when pyarrow imports, else "csv"."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return "csv"
    return "parquet"


def _arrow_schema(columns: dict[str, str]):
    import pyarrow as pa

    scalar = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_()}
    fields = []
    for name, kind in columns.items():
        typ = pa.list_(scalar[kind[5:-1]]) if kind.startswith("list[") else scalar[kind]
        fields.append(pa.field(name, typ))
    return pa.schema(fields)


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return LIST_SEPARATOR.join(str(v) for v in value)
    return str(value)


def write_table(rows: Sequence[dict], path: str | os.PathLike, columns: dict[str, str], fmt: str) -> Path:
    """Write rows (dicts keyed by ``columns``) as one table; complete or not at all."""
    out = Path(path)
    try:
        with PartialFile(out) as tmp:
            if fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                schema = _arrow_schema(columns)
                table = pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows], schema=schema)
                pq.write_table(table, tmp)
            else:
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    writer = csv.writer(f)
                    writer.writerow(columns)
                    writer.writerows([_csv_cell(row.get(k)) for k in columns] for row in rows)
    except OSError as exc:
        raise SinkError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def combine_tables(parts: Iterable[Path], path: str | os.PathLike, columns: dict[str, str], fmt: str) -> int:
    """Concatenate per-file tables (in the order given) into one; returns its number of rows."""
    out = Path(path)
    rows = 0
    try:
        with PartialFile(out) as tmp:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                schema = _arrow_schema(columns)
                with pq.ParquetWriter(tmp, schema) as writer:
                    for part in parts:
                        table = pq.read_table(part, schema=schema)
                        rows += table.num_rows
                        writer.write_table(table)
            else:
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    f.write(",".join(columns) + "\r\n")
                    for part in parts:
                        with open(part, newline="", encoding="utf-8") as src:
                            reader = csv.reader(src)
                            next(reader, None)
                            body = list(reader)
                        csv.writer(f).writerows(body)
                        rows += len(body)
    except OSError as exc:
        raise SinkError(f"cannot write {out}: {exc.strerror or exc}") from None
    return rows


def read_table(path: str | os.PathLike) -> list[dict]:
    """A table written here, as row dicts (CSV cells come back as strings): for tests and small tables."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    with open(p, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
