"""Command-line plumbing shared by the stage scripts: argument types, run folders, logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("scbert")

TRUE = {"1", "true", "t", "yes", "y", "on"}
FALSE = {"0", "false", "f", "no", "n", "off"}


def str2bool(value: str | bool) -> bool:
    """Parse a boolean flag value; "False" means False (unlike ``type=bool``)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def fraction(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {x}")
    return x


def parser(description: str, example: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description=description,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_bool(p: argparse._ActionsContainer, *names: str, default: bool, help: str) -> None:
    """A flag that may be given alone (= true) or with a value: ``--x``, ``--x false``."""
    p.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=f"{help} (default: {default})")


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--min-genes", type=int, default=200, help="drop cells expressing fewer genes, for input not written by preprocess.py (default: 200, as published; 0 keeps all)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto = cuda when available)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="arithmetic precision (default: fp32; bf16 pays off on GPUs and on CPUs with native bf16 (AVX-512 BF16/AMX); fp16: GPU only)")
    add_speed_args(g)
    add_bool(g, "--overwrite", default=False, help="replace an existing output")
    add_log_args(g)
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def add_log_args(g: argparse._ActionsContainer) -> None:
    """--quiet and --log-level: what the console shows (the run's log.txt always gets INFO and up)."""
    add_bool(g, "--quiet", default=False, help="only warnings and errors, no progress bars (same as --log-level warning)")
    g.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="console messages of this importance and up (default: info)")


def add_speed_args(g: argparse._ActionsContainer) -> None:
    """DataLoader workers and torch.compile: shared by every stage that runs the model."""
    g.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes that read and bin cells while the model computes (default: 0 = in the main process)")
    add_bool(g, "--compile", default=False,
             help="torch.compile the encoder (needs a C/C++ compiler; the first batches are slow while it compiles; see BENCHMARKS.md)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model size (ignored when starting from a checkpoint)")
    g.add_argument("--dim", type=positive_int, default=200, help="embedding size (default: %(default)s, as published)")
    g.add_argument("--depth", type=positive_int, default=6, help="Performer layers (default: %(default)s)")
    g.add_argument("--heads", type=positive_int, default=10, help="attention heads (default: %(default)s)")
    g.add_argument("--dim-head", type=positive_int, default=64, help="size of each head (default: %(default)s)")
    g.add_argument("--bin-num", "--bin_num", type=positive_int, default=5, help="expression bins; values above are capped (default: 5 -> 7 tokens)")
    g.add_argument("--gene_num", type=int, default=None, help="published flag; checked against the vocabulary size")
    g.add_argument(
        "--gene2vec", default="train",
        help="gene embedding: 'train' (Gene2vec on the training data, default), 'none' (ablation), 'learned' "
        "(trainable), or a file: word2vec text (symbol then vector per line) or .npy with --gene2vec-genes",
    )
    g.add_argument("--gene2vec-genes", default=None, help="gene list (one per line) giving the row order of a .npy --gene2vec")
    g.add_argument("--pos_embed", type=str2bool, default=None, help="published flag: false = --gene2vec none")


def add_published_args(p: argparse._ActionsContainer) -> None:
    """--genes/--classes: names for a checkpoint of the published scBERT code, which has none."""
    p.add_argument("--genes", default=None, help="for a published scBERT .pth: its ordered gene list, one per line (var_names of panglao_10000.h5ad)")
    p.add_argument("--classes", default=None, help="for a published fine-tuned .pth: class names, one per line, in label_dict order (sorted labels)")


def published_names(args: argparse.Namespace) -> dict[str, list[str] | None]:
    """The keyword arguments of load_checkpoint for --genes/--classes."""
    from data.vocab import read_gene_list

    return {
        "genes": read_gene_list(args.genes) if args.genes else None,
        "classes": read_gene_list(args.classes) if args.classes else None,
    }


def add_training_args(p: argparse.ArgumentParser, epochs: int, epochs_help: str) -> argparse._ArgumentGroup:
    """The optimisation flags pretrain.py and finetune.py share; returns the group for more."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", "--epoch", type=positive_int, default=epochs, help=f"{epochs_help} (default: {epochs})")
    g.add_argument("--batch-size", "--batch_size", type=positive_int, default=8,
                   help="cells per step of each process (default: 8; under torchrun the step has batch-size x processes cells)")
    g.add_argument("--grad-acc", "--grad_acc", type=positive_int, default=1, help="gradient accumulation steps (default: 1; published: 60 with batch 3)")
    g.add_argument("--lr", "--learning_rate", type=float, default=1e-4, help="peak learning rate of Adam (default: 1e-4)")
    g.add_argument("--warmup-steps", type=int, default=5, help="linear warm-up optimiser steps per cosine cycle (default: 5)")
    g.add_argument("--cycle-steps", type=int, default=None, help="optimiser steps of the first cosine cycle; cycles double (default: the whole run)")
    g.add_argument("--clip-norm", type=float, default=1.0, help="gradient norm clipping (default: 1.0; 0 = off)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW); 0 = plain Adam, as published (default: 0)")
    add_bool(g, "--grad-checkpointing", default=False,
             help="recompute activations in the backward pass: training memory of one layer instead of all, ~1/3 more compute")
    r = p.add_argument_group("resumable runs")
    r.add_argument("--save-every", type=int, default=0,
                   help="also save the training state every this many optimiser steps (default: 0 = at the end of each epoch only); "
                   "states go to OUT/checkpoints")
    r.add_argument("--keep-last", type=positive_int, default=2, help="training states kept in OUT/checkpoints (default: 2)")
    r.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimiser steps, scoring the epoch in progress (default: no limit; for trial runs)")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="go on with the run in DIR (its OUT folder) from its last saved state: weights, optimiser, schedule, "
                   "random generators, epoch and position in it, early-stopping state. Give the same data and settings")
    return g


def setup_logging(quiet: bool = False, logfile: Path | None = None, level: str | None = None) -> None:
    """Console messages at ``level`` (``quiet``: warnings) and up; ``logfile`` gets INFO and up
    (DEBUG with level debug)."""
    console_level = logging.WARNING if quiet else getattr(logging, (level or "info").upper(), logging.INFO)
    file_level = min(logging.INFO, console_level)
    log.setLevel(min(console_level, file_level))
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)
    if logfile is not None:
        fh = logging.FileHandler(logfile, encoding="utf-8")
        fh.setLevel(file_level)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        **{name: v(name) for name in ("torch", "performer-pytorch", "numpy", "scanpy", "anndata", "gensim")},
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def start_run(out: str | Path, args: argparse.Namespace, protected: Sequence[str] = ("model.pt",)) -> Path:
    """Create the run folder (refusing to overwrite a finished run without --overwrite), start
    logging into it, and record the arguments and environment in config.json."""
    out = Path(out)
    level = getattr(args, "log_level", None)
    setup_logging(args.quiet, level=level)
    existing = [name for name in protected if (out / name).exists()]
    if existing and not args.overwrite:
        fail(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to {out}: {e.strerror}; choose another --out")
    setup_logging(args.quiet, out / "log.txt", level)
    write_json(out / "config.json", {"args": vars(args), "environment": environment()})
    return out


def fail(message: str) -> None:
    """Exit with a one-line error for the user (no traceback)."""
    log.error("error: %s", message)
    raise SystemExit(2)
