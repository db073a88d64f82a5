"""Build the compact bundled gene table ``data/gene_table.tsv.gz``.

The input is the NCBI Gene human gene list exported from Bioconductor
``org.Hs.eg.db`` (a ``#`` comment line, then a TSV with the columns
``entrez_id, symbol, gene_type, chromosome, ensembl_ids, aliases, name``).
Only the columns needed for symbol revision are kept:
``symbol, gene_type, ensembl_ids, aliases`` (list fields pipe-separated).

The output is deterministic (fixed gzip mtime, rows in input order), so
re-running the script on the same input gives a byte-identical file.

Usage::

    python -m scripts.build_gene_table [INPUT] [--output OUTPUT]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_INPUT = REPO_ROOT / ".." / "shared" / "data" / "human_genes_ncbi.tsv.gz"
DEFAULT_OUTPUT = REPO_ROOT / "data" / "gene_table.tsv.gz"

INPUT_COLUMNS = (
    "entrez_id",
    "symbol",
    "gene_type",
    "chromosome",
    "ensembl_ids",
    "aliases",
    "name",
)
OUTPUT_COLUMNS = ("symbol", "gene_type", "ensembl_ids", "aliases")


def _clean_list(field: str) -> str:
    """Normalise a pipe-separated field: strip items, drop empties and repeats."""
    seen: dict[str, None] = {}
    for item in field.split("|"):
        item = item.strip()
        if item:
            seen.setdefault(item, None)
    return "|".join(seen)


def _strip_versions(field: str) -> str:
    """Remove ``.N`` version suffixes from pipe-separated Ensembl ids."""
    return _clean_list("|".join(item.split(".", 1)[0] for item in field.split("|")))


def read_source(path: Path) -> tuple[str, list[tuple[str, str, str, str]]]:
    """Read the NCBI source file; return its comment line and the output rows."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        comment = handle.readline().rstrip("\r\n")
        if not comment.startswith("#"):
            raise ValueError(f"{path}: expected a '#' comment first line")
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = tuple(next(reader))
        if header != INPUT_COLUMNS:
            raise ValueError(f"{path}: unexpected columns {header}")
        rows: list[tuple[str, str, str, str]] = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(INPUT_COLUMNS):
                raise ValueError(f"{path}: malformed line {reader.line_num}")
            record = dict(zip(INPUT_COLUMNS, fields))
            symbol = record["symbol"].strip()
            if not symbol:
                continue
            rows.append(
                (
                    symbol,
                    record["gene_type"].strip(),
                    _strip_versions(record["ensembl_ids"]),
                    _clean_list(record["aliases"]),
                )
            )
    return comment, rows


def render_table(comment: str, rows: list[tuple[str, str, str, str]]) -> bytes:
    """Render the output table (header comment, column line, rows) as gzip bytes."""
    source = comment.lstrip("#").strip()
    text = io.StringIO()
    text.write(
        "# scBERT gene table: symbol, gene_type, Ensembl ids and aliases/previous symbols "
        f"(pipe-separated), derived from: {source}\n"
    )
    text.write("\t".join(OUTPUT_COLUMNS) + "\n")
    for row in rows:
        text.write("\t".join(row) + "\n")
    buffer = io.BytesIO()
    with gzip.GzipFile(
        filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0
    ) as gz:
        gz.write(text.getvalue().encode("utf-8"))
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "input",
        nargs="?",
        type=Path,
        default=DEFAULT_INPUT,
        help="NCBI human gene TSV (gzip)",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="output table path"
    )
    args = parser.parse_args(argv)

    comment, rows = read_source(args.input)
    payload = render_table(comment, rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(payload)
    print(f"wrote {len(rows)} genes to {args.output} ({len(payload)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
