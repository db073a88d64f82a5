"""Marker / gene-set parsers, cell-type matching, hypergeometric tests and BH adjustment."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import false_discovery_control, hypergeom

from data import genesets as gs
from data.io import InputError


def write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GMT = "SET_A\thttp://x\tG1\tG2\tG3\n\nSET_B\tdesc\tG3\tG4\t\nSET_A\tagain\tG2\tG5\n"


@pytest.mark.parametrize("name", ["sets.gmt", "sets.gmt.gz"])
def test_read_gmt(tmp_path: Path, name: str) -> None:
    sets = gs.read_gmt(write(tmp_path / name, GMT))
    assert sets == {"SET_A": ["G1", "G2", "G3", "G5"], "SET_B": ["G3", "G4"]}, "duplicated names are merged; empty fields dropped"


def test_read_gmt_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="line 2 is not GMT"):
        gs.read_gmt(write(tmp_path / "bad.gmt", "SET_A\td\tG1\nG1 G2 G3\n"))
    with pytest.raises(InputError, match="no gene sets"):
        gs.read_gmt(write(tmp_path / "empty.gmt", "\n"))
    with pytest.raises(InputError, match="does not exist"):
        gs.read_gmt(tmp_path / "missing.gmt")


PANGLAO = (
    "species\tofficial gene symbol\tcell type\tcanonical marker\n"
    "Mm Hs\tMS4A1\tB cells\t1\n"
    "Hs\tCD79A\tB cells\t0\n"
    "Mm\tCd19\tB cells\t1\n"
    "None\tXYZ\tB cells\t1\n"
    "Mm Hs\tNKG7\tNK cells\t1\n"
)


def test_read_panglao(tmp_path: Path) -> None:
    path = write(tmp_path / "markers.tsv.gz", PANGLAO)
    assert gs.read_panglao(path) == {"B cells": {"MS4A1", "CD79A"}, "NK cells": {"NKG7"}}
    assert gs.read_panglao(path, species="Mm") == {"B cells": {"MS4A1", "Cd19"}, "NK cells": {"NKG7"}}
    assert gs.read_panglao(path, species=None)["B cells"] == {"MS4A1", "CD79A", "Cd19", "XYZ"}
    assert gs.read_panglao(path, canonical_only=True) == {"B cells": {"MS4A1"}, "NK cells": {"NKG7"}}
    generic = write(tmp_path / "generic.csv", "cell_type,gene\nT,CD3E\nT,CD3D\n")
    assert gs.read_markers(generic) == {"T": {"CD3E", "CD3D"}}
    with pytest.raises(InputError, match="needs a cell-type column"):
        gs.read_panglao(write(tmp_path / "x.tsv", "a\tb\n1\t2\n"))
    with pytest.raises(InputError, match="no marker for species 'Dr'"):
        gs.read_panglao(path, species="Dr")


MARKER_JSON = {
    "title": "test",
    "cell_types": [
        {"name": "T cell", "markers": [{"genes": ["CD3D+", "CD3E+"], "weight": 1.0}],
         "subtypes": {"title": "t", "cell_types": [{"name": "CD8 T", "markers": [{"genes": ["CD8A+", "CD4-"], "weight": 1.0}]}]}},
        {"name": "NK cell", "markers": [{"genes": ["GNLY+", "CD3D-"], "weight": 0.5}, {"genes": ["NKG7+"], "weight": 0.5}]},
    ],
}


def test_read_marker_json(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(MARKER_JSON))
    assert gs.read_marker_json(path) == {"T cell": {"CD3D", "CD3E"}, "CD8 T": {"CD8A"}, "NK cell": {"GNLY", "NKG7"}}
    assert gs.read_marker_json(path, negative=True) == {"CD8 T": {"CD4"}, "NK cell": {"CD3D"}}
    assert gs.read_markers(path) == gs.read_marker_json(path)
    with pytest.raises(InputError, match="'cell_types' list"):
        gs.read_marker_json(write(tmp_path / "bad.json", '{"types": []}'))
    with pytest.raises(InputError, match="not valid JSON"):
        gs.read_marker_json(write(tmp_path / "broken.json", "{"))


def test_read_markers_dispatch(tmp_path: Path) -> None:
    assert gs.read_markers(write(tmp_path / "m.gmt", GMT)) == {"SET_A": {"G1", "G2", "G3", "G5"}, "SET_B": {"G3", "G4"}}
    with pytest.raises(InputError, match="cannot tell the format"):
        gs.read_markers(write(tmp_path / "m.xlsx", ""))


def test_bundled_files_and_aliases() -> None:
    pang = gs.read_markers(gs.DEFAULT_MARKERS)
    assert len(pang) > 150 and {"MS4A1", "CD79A"} <= pang["B cells"] and "PPBP" in pang["Platelets"]
    immune = gs.read_markers(gs.IMMUNE_MARKERS)
    assert {"MS4A1", "CD79A"} <= immune["B cell"] and "GNLY" in immune["Natural killer cell"]
    hallmark = gs.read_gmt(gs.DEFAULT_GMT)
    assert len(hallmark) == 50 and all(k.startswith("HALLMARK_") for k in hallmark)
    aliases = gs.read_celltype_map(gs.DEFAULT_CELLTYPE_MAP)
    known = {n.lower() for n in [*pang, *immune]}
    typos = [n for names in aliases.values() for n in names if n.lower() not in known]
    assert not typos, f"alias names found in no bundled marker file: {typos}"
    for label in ("B", "NK", "CD14+ Mono", "Platelet"):
        assert gs.match_celltypes([label], pang, aliases)[label], label


def test_align_gene_sets() -> None:
    vocab = ["MS4A1", "C2orf88", "SEPTIN1", "CD79A"]
    out = gs.align_gene_sets({"a": ["MS4A1", "C2ORF88", "SEPT1", "NOTAGENE"], "b": ["cd79a"]}, vocab)
    assert out == {"a": {"MS4A1", "C2orf88", "SEPTIN1"}, "b": {"CD79A"}}


def test_match_celltypes(tmp_path: Path) -> None:
    types = ["B cells", "NK cells", "Platelets", "Alpha cells", "Monocytes", "T cells"]
    mapping = {"CD14+ Mono": ["monocytes", "CD14+ Monocyte"], "Naive CD4 T": []}
    got = gs.match_celltypes(["B", "NK", "Platelet", "alpha", "CD14+ Mono", "Naive CD4 T", "Unknown"], types, mapping)
    assert got == {"B": ["B cells"], "NK": ["NK cells"], "Platelet": ["Platelets"], "alpha": ["Alpha cells"],
                   "CD14+ Mono": ["Monocytes"], "Naive CD4 T": [], "Unknown": []}
    path = write(tmp_path / "map.json", '{"_comment": "x", "B": "B cells", "NK": ["NK cells", "x"]}')
    assert gs.read_celltype_map(path) == {"B": ["B cells"], "NK": ["NK cells", "x"]}
    with pytest.raises(InputError, match="must be a name or a list"):
        gs.read_celltype_map(write(tmp_path / "bad.json", '{"B": 3}'))


def test_hypergeom_overlap_against_scipy() -> None:
    population = [f"G{i}" for i in range(100)]
    gene_set = [f"G{i}" for i in range(0, 40, 2)] + ["OUTSIDE1", "OUTSIDE2"]  # 20 genes in the population
    selected = [f"G{i}" for i in range(10)]  # hits: G0 G2 G4 G6 G8
    o = gs.hypergeom_overlap(selected, gene_set, population)
    assert (o.population, o.set_size, o.drawn, o.overlap) == (100, 20, 10, 5)
    assert o.genes == ["G0", "G2", "G4", "G6", "G8"]
    expected_p = sum(hypergeom.pmf(x, 100, 20, 10) for x in range(5, 11))
    assert o.pvalue == pytest.approx(expected_p, rel=1e-10)
    assert o.expected == pytest.approx(2.0) and o.fold_enrichment == pytest.approx(2.5)
    none = gs.hypergeom_overlap(selected, ["G50"], population)
    assert none.overlap == 0 and none.pvalue == pytest.approx(1.0)
    empty = gs.hypergeom_overlap(selected, ["OUTSIDE1"], population)
    assert empty.set_size == 0 and empty.pvalue == 1.0 and np.isnan(empty.fold_enrichment)
    with pytest.raises(ValueError, match="not in the population"):
        gs.hypergeom_overlap(["X"], gene_set, population)


def test_bh_adjust() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.005, 0.9, 0.04])
    np.testing.assert_allclose(gs.bh_adjust(p), false_discovery_control(p, method="bh"), rtol=1e-12)
    # by hand: sorted 0.005 0.01 0.03 0.04 0.04 0.2 0.9 times 7/rank, then running minimum from the top
    np.testing.assert_allclose(gs.bh_adjust([0.01, 0.02, 0.5]), [0.03, 0.03, 0.5])
    with_nan = gs.bh_adjust([0.01, np.nan, 0.02])
    assert np.isnan(with_nan[1]) and with_nan[0] == pytest.approx(0.02) and with_nan[2] == pytest.approx(0.02)
    assert gs.bh_adjust([]).shape == (0,)


def test_enrich() -> None:
    population = [f"G{i}" for i in range(200)]
    sets = {
        "HIT": [f"G{i}" for i in range(10)],  # all 10 selected genes
        "HALF": [f"G{i}" for i in range(5)] + [f"G{i}" for i in range(100, 105)],
        "MISS": [f"G{i}" for i in range(150, 160)],
        "SMALL": ["G0", "G1"],
        "HUGE": population,
    }
    df = gs.enrich([f"G{i}" for i in range(10)], sets, population, min_size=5, max_size=100)
    assert list(df["gene_set"]) == ["HIT", "HALF", "MISS"], "sorted by p; SMALL and HUGE not tested"
    assert list(df["overlap"]) == [10, 5, 0] and list(df["set_size"]) == [10, 10, 10]
    np.testing.assert_allclose(df["pvalue"], [hypergeom.sf(x - 1, 200, 10, 10) for x in (10, 5, 0)], rtol=1e-10)
    np.testing.assert_allclose(df["fdr"], false_discovery_control(df["pvalue"].to_numpy()), rtol=1e-12)
    assert df.loc[1, "overlap_genes"] == "G0;G1;G2;G3;G4"


def test_marker_overlap() -> None:
    population = [f"G{i}" for i in range(50)]
    markers = {"B cells": {"G0", "G1", "G2"}, "B cells memory": {"G3"}, "NK cells": {"G40"}}
    top = {"B": ["G0", "G3", "G10"], "NK": ["G1", "G2", "G5"], "Alien": ["G7"]}
    df = gs.marker_overlap(top, markers, population, {"B": ["B cells", "B cells memory"]}).set_index("cell_type")
    assert df.loc["B", "marker_types"] == "B cells;B cells memory" and df.loc["B", "n_markers"] == 4
    assert df.loc["B", "overlap"] == 2 and df.loc["B", "overlap_genes"] == "G0;G3"
    assert df.loc["B", "pvalue"] == pytest.approx(hypergeom.sf(1, 50, 4, 3))
    assert df.loc["NK", "overlap"] == 0 and df.loc["NK", "pvalue"] == pytest.approx(1.0)
    assert df.loc["Alien", "marker_types"] == "" and np.isnan(df.loc["Alien", "pvalue"])
    tested = df["pvalue"].notna()
    np.testing.assert_allclose(df.loc[tested, "fdr"], false_discovery_control(df.loc[tested, "pvalue"].to_numpy()))
