"""Tests for gene-symbol revision (``data/genes.py``)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import anndata
import pytest

from data.genes import (
    DEFAULT_TABLE_PATH,
    GeneTable,
    RevisionReport,
    load_gene_table,
    revise_symbols,
)

PBMC_PATH = Path(__file__).resolve().parent.parent / "data" / "pbmc3k_labeled.h5ad"


def _check_counts(
    report: RevisionReport, names: list[str], out: list[str | None]
) -> None:
    """Assert that the report's counts are consistent with the output."""
    assert report.n_input == len(names) == len(out)
    assert report.n_kept == sum(name is not None for name in out)
    assert report.n_kept + report.n_unmatched + report.n_duplicate == report.n_input
    assert report.n_matched + report.n_revised + report.n_ensembl == report.n_kept
    assert len(report.unmatched) == report.n_unmatched
    assert len(report.duplicates) == report.n_duplicate
    kept = [name for name in out if name is not None]
    assert len(kept) == len(set(kept))


@pytest.fixture(scope="module")
def table() -> GeneTable:
    return load_gene_table()


def test_bundled_table_contents(table: GeneTable) -> None:
    assert DEFAULT_TABLE_PATH.exists()
    assert DEFAULT_TABLE_PATH.stat().st_size < 2_000_000
    assert load_gene_table() is table  # cached
    assert len(table.symbols) > 60_000
    assert {"TP53", "CD3E", "SEPTIN1", "MARCHF1", "MS4A1"} <= table.symbols
    assert table.alias_to_symbols["P53"] == ("TP53",)
    assert table.alias_to_symbols["SEPT1"] == ("SEPTIN1",)
    assert table.alias_to_symbols["CD16"] == ("FCGR3A", "FCGR3B")
    assert table.ensembl_to_symbol["ENSG00000141510"] == "TP53"
    assert table.gene_types["TP53"] == "protein-coding"
    assert "Artistic-2.0" in table.source
    # DAO is a current symbol and also an alias of AOC1: never an alias key.
    assert "DAO" in table.symbols
    assert not table.symbols & table.alias_to_symbols.keys()


def test_current_symbol_kept(table: GeneTable) -> None:
    names = ["TP53", "CD3E", "DAO"]
    out, report = revise_symbols(names, table=table)
    assert out == names
    assert report.n_matched == 3 and report.n_kept == 3
    assert report.revised == {}
    _check_counts(report, names, out)


def test_alias_and_previous_symbol_revised(table: GeneTable) -> None:
    names = ["SEPT1", "MARCH1", "P53", "CD3epsilon"]
    out, report = revise_symbols(names, table=table)
    assert out == ["SEPTIN1", "MARCHF1", "TP53", "CD3E"]
    assert report.n_revised == 4
    assert report.revised == {
        "SEPT1": "SEPTIN1",
        "MARCH1": "MARCHF1",
        "P53": "TP53",
        "CD3epsilon": "CD3E",
    }
    _check_counts(report, names, out)


def test_matching_is_case_sensitive_and_unknown_dropped(table: GeneTable) -> None:
    names = ["tp53", "Trp53", "NOT_A_GENE", "", "CD3"]
    out, report = revise_symbols(names, table=table)
    assert out == [None] * len(names)
    assert report.n_unmatched == len(names)
    assert report.unmatched == names
    _check_counts(report, names, out)


def test_ambiguous_alias_resolved_by_vocab(table: GeneTable) -> None:
    out, report = revise_symbols(["CD16"], table=table)
    assert out == [None]
    assert report.n_unmatched == 1

    out, report = revise_symbols(["CD16"], vocab={"FCGR3A", "TP53"}, table=table)
    assert out == ["FCGR3A"]
    assert report.revised == {"CD16": "FCGR3A"}

    # Both candidates in the vocabulary: still ambiguous.
    out, report = revise_symbols(["CD16"], vocab=["FCGR3A", "FCGR3B"], table=table)
    assert out == [None]


def test_name_in_vocab_never_renamed(table: GeneTable) -> None:
    names = ["SEPT1", "P53", "MY_CUSTOM_GENE"]
    vocab = ["SEPT1", "P53", "MY_CUSTOM_GENE", "SEPTIN1", "TP53"]
    out, report = revise_symbols(names, vocab=vocab, table=table)
    assert out == names
    assert report.n_matched == 3 and report.n_revised == 0
    assert report.used_vocab
    assert "vocabulary" in report.summary()


def test_vocab_current_symbol_outside_vocab_kept(table: GeneTable) -> None:
    names = ["TP53", "SEPT1", "CD16", "NOT_A_GENE"]
    out, report = revise_symbols(names, vocab={"CD3E", "FCGR3B"}, table=table)
    assert out == ["TP53", "SEPTIN1", "FCGR3B", None]
    assert report.n_matched == 1 and report.n_revised == 2 and report.n_unmatched == 1
    _check_counts(report, names, out)


def test_ensembl_ids(table: GeneTable) -> None:
    names = [
        "ENSG00000141510",
        "ENSG00000198851.12",
        "ENSG99999999999",
        "ENSG00000141510.x",
    ]
    out, report = revise_symbols(names, table=table)
    assert out == ["TP53", "CD3E", None, None]
    assert report.n_ensembl == 2 and report.n_unmatched == 2
    assert report.revised == {"ENSG00000141510": "TP53", "ENSG00000198851.12": "CD3E"}
    _check_counts(report, names, out)


def test_duplicates_prefer_exact_name(table: GeneTable) -> None:
    # The revised SEPT1 collides with the exact SEPTIN1 that comes later.
    names = ["SEPT1", "TP53", "SEPTIN1", "P53", "TP53"]
    out, report = revise_symbols(names, table=table)
    assert out == [None, "TP53", "SEPTIN1", None, None]
    assert report.n_duplicate == 3
    assert report.duplicates == ["SEPT1", "P53", "TP53"]
    assert report.merged_into == {0: 2, 3: 1, 4: 1}  # each duplicate fills the kept column of its gene
    assert report.n_matched == 2 and report.n_revised == 0
    _check_counts(report, names, out)


def test_duplicates_first_revised_wins(table: GeneTable) -> None:
    names = ["ENSG00000141510", "P53", "TRP53"]
    out, report = revise_symbols(names, table=table)
    assert out == ["TP53", None, None]
    assert report.n_ensembl == 1 and report.n_duplicate == 2
    _check_counts(report, names, out)


def test_report_summary_and_dict(table: GeneTable) -> None:
    names = ["TP53", "SEPT1", "ENSG00000198851", "nope", "SEPTIN1"] + [
        f"NOTGENE_{i}" for i in range(80)
    ]
    out, report = revise_symbols(names, table=table)
    _check_counts(report, names, out)
    assert report.summary() == (
        "85 input genes: 2 matched current NCBI symbols, 0 revised from aliases/previous symbols, "
        "1 Ensembl ids mapped, 81 unmatched genes dropped, 1 duplicated genes merged into their gene's column; 3 kept."
    )
    data = report.to_dict()
    json.dumps(data)
    assert data["n_unmatched"] == 81
    assert len(data["unmatched"]) == 50
    assert data["summary"] == report.summary()


def test_custom_table(tmp_path: Path) -> None:
    path = tmp_path / "table.tsv.gz"
    text = (
        "# test table\n"
        "symbol\tgene_type\tensembl_ids\taliases\n"
        "AAA\tprotein-coding\tENSG001|ENSG003\tOLD1|BBB|AMB\n"
        "BBB\tncRNA\tENSG002|ENSG003\tAMB\n"
    )
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)
    custom = load_gene_table(path)
    assert custom.symbols == frozenset({"AAA", "BBB"})
    assert custom.alias_to_symbols == {"OLD1": ("AAA",), "AMB": ("AAA", "BBB")}
    assert custom.ensembl_to_symbol == {"ENSG001": "AAA", "ENSG002": "BBB"}
    out, _ = revise_symbols(["OLD1", "BBB", "AMB", "ENSG003"], table=custom)
    assert out == ["AAA", "BBB", None, None]


def test_pbmc3k_var_names(table: GeneTable, capsys: pytest.CaptureFixture[str]) -> None:
    adata = anndata.read_h5ad(PBMC_PATH, backed="r")
    try:
        names = list(adata.var_names)
    finally:
        adata.file.close()
    assert len(names) == 32_738
    out, report = revise_symbols(names, table=table)
    _check_counts(report, names, out)
    assert report.n_matched > len(names) / 2
    assert report.n_revised > 0
    assert capsys.readouterr().out == ""
