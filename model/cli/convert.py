"""``python -m model.convert``: a checkpoint of the published scBERT code into this package's self-describing format.

    python -m model.convert PUBLISHED.pth --genes GENES.txt [--classes CLASSES.txt] --out OURS.pt [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path


class ConvertError(ValueError):
    """A problem with the command's arguments or files; the message says what to do."""

EXAMPLE = """
# a published pretrained model (panglao_pretrain.pth) and the genes of panglao_10000.h5ad, in order:
python -c "import anndata; print(*anndata.read_h5ad('panglao_10000.h5ad', backed='r').var_names, sep='\\n')" > genes.txt
python -m model.convert panglao_pretrain.pth --genes genes.txt --out pretrained.pt

# a published fine-tuned classifier: also its class names, one per line, in label_dict order
python -m model.convert finetune_best.pth --genes genes.txt --classes classes.txt --out classifier.pt
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.convert",
        description=(
            "Convert a checkpoint saved by the published scBERT code (a dict with model_state_dict) into this "
            "package's checkpoint, which also records the configuration, gene list, class names and "
            "preprocessing. The model size is read from the tensor shapes; gene and class names are not in "
            "published files and must be given."
        ),
        epilog="examples:\n" + textwrap.indent(EXAMPLE.strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="PUBLISHED.pth", help="checkpoint written by the published scBERT code")
    p.add_argument(
        "--genes", required=True, metavar="GENES.txt",
        help="the model's genes, one per line, in training order (for the published models: the var_names of "
        "panglao_10000.h5ad)",
    )
    p.add_argument(
        "--classes", default=None, metavar="CLASSES.txt",
        help="fine-tuned checkpoints only: class names, one per line, in the published label_dict order "
        "(the sorted unique labels of the fine-tuning data)",
    )
    p.add_argument("--out", required=True, metavar="OURS.pt", help="where to write the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def convert(args: argparse.Namespace) -> str:
    """Do the conversion; returns the one-line summary."""
    # Imported here so that --help answers without loading torch and scanpy.
    from data.vocab import read_name_list
    from model.checkpoint import save_checkpoint
    from model.checkpoint.published import published_to_checkpoint, read_published

    src, out = Path(args.checkpoint), Path(args.out)
    if out.is_dir():
        raise ConvertError(f"--out {out} is a folder: give a file name, e.g. {out / 'model.pt'}")
    if out.exists():
        if src.exists() and out.resolve() == src.resolve():
            raise ConvertError("--out is the published checkpoint itself: write the converted one to another file")
        if not args.overwrite:
            raise ConvertError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    genes = read_name_list(args.genes, "genes")
    classes = None if args.classes is None else read_name_list(args.classes, "classes")
    ckpt = published_to_checkpoint(read_published(src), genes=genes, classes=classes, source=str(src))
    model = ckpt.build_model()
    save_checkpoint(out, model, ckpt.genes, ckpt.classes, preprocessing=ckpt.preprocessing, training=ckpt.training, metrics=ckpt.metrics)
    c = ckpt.config
    head = f"classifier with {c.n_classes} classes" if c.head == "classifier" else "pretrained (masked expression)"
    summary = (
        f"wrote {out}: {head}; {c.n_genes} genes ({ckpt.genes[0]} ... {ckpt.genes[-1]}), bin_num {c.bin_num}, "
        f"dim {c.dim}, depth {c.depth}, heads {c.heads}, dim_head {c.dim_head}, nb_features {c.n_features}, "
        f"gene embedding {c.gene_embedding}"
    )
    if ckpt.classes:
        summary += "; classes " + ", ".join(ckpt.classes)
    return summary


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line message on stderr for any error)."""
    args = build_parser().parse_args(argv)
    try:
        summary = convert(args)
    except ValueError as e:  # CheckpointError, InputError, ConvertError, or e.g. a gene list that is not UTF-8 text
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.strerror or e}: {e.filename or args.out}")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
