"""``python -m model.info CKPT``: a checkpoint's card, as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from model.cli.args import add_published_args, parser

    p = parser("What a checkpoint holds: model size, genes, classes and their training cells, preprocessing, recipe and training "
               "settings, metrics, the novelty calibration, and where it came from.",
               "python -m model.info runs/finetune/model.pt\npython -m model.info panglao_pretrain.pth --genes genes.txt --json")
    p.prog = "python -m model.info"
    p.add_argument("checkpoint", help="model.pt of this package, or a published .pth with --genes (and --classes)")
    add_published_args(p)
    p.add_argument("--json", action="store_true", help="print the card as JSON (default: text)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.checkpoint.card import card_text, checkpoint_card
    from model.cli.args import published_names

    try:
        card = checkpoint_card(load_checkpoint(args.checkpoint, **published_names(args)))
    except (CheckpointError, ValueError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2, default=str) if args.json else card_text(card))
    return 0
