"""scBERT: cell type annotation with a Performer pretrained on single-cell RNA-seq."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="scbert-pytorch",
    version="0.1.0",
    description="scBERT cell type annotation: pretraining, fine-tuning, prediction (Performer, gene2vec)",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "data"]),
    package_data={"data": ["gene_table.tsv.gz", "README.md", "genesets/*", "label_maps/*"]},
    py_modules=["preprocess", "pretrain", "finetune", "predict", "attn_analysis"],
    install_requires=requirements,
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "ruff>=0.4"], "bench": ["celltypist>=1.7.1"]},
    entry_points={
        "console_scripts": [
            "scbert-preprocess=preprocess:main",
            "scbert-pretrain=pretrain:main",
            "scbert-finetune=finetune:main",
            "scbert-predict=predict:main",
            "scbert-attention=attn_analysis:main",
            "scbert-info=model.cli.info:main",
        ]
    },
)
