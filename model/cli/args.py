"""The command line's argument types and the flag groups the stage scripts share, and turning
parsed flags into the library's typed settings."""

from __future__ import annotations

import argparse
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("scbert")
T = TypeVar("T")

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


def positive_int(value: str, least: int = 1) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"expected a number >= {least}, got {n}")
    return n


def nonnegative_int(value: str) -> int:
    return positive_int(value, least=0)


def _float_within(value: str, ok: Callable[[float], bool], unparsed: str, outside: str) -> float:
    """``value`` as a float for which ``ok`` holds; ``unparsed`` / ``outside``: what was expected, in words."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {unparsed}, got {value!r}") from None
    if not ok(x):
        raise argparse.ArgumentTypeError(f"expected {outside}, got {x}")
    return x


def positive_float(value: str) -> float:
    return _float_within(value, lambda x: x > 0, "a number above 0", "a number above 0")


def nonnegative_float(value: str) -> float:
    return _float_within(value, lambda x: x >= 0, "a number of 0 or more", "a number of 0 or more")


def fraction(value: str) -> float:
    return _float_within(value, lambda x: 0.0 <= x < 1.0, "a number between 0 and 1", "a number in [0, 1)")


def number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number, got {value!r}") from None


def or_auto(kind: Callable[[str], T]) -> Callable[[str], T | str]:
    """The argument type: ``auto``, else what ``kind`` parses."""
    def parse(value: str) -> T | str:
        return "auto" if value.strip().lower() == "auto" else kind(value)

    parse.__name__ = f"{kind.__name__}_or_auto"
    return parse


fraction_or_auto = or_auto(fraction)  # auto or a number in [0, 1)
threshold_value = or_auto(number)  # auto or a number


def parser(description: str, example: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description=description,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_bool(p: argparse._ActionsContainer, *names: str, default: bool, help: str) -> None:
    """A flag that may be given alone (= true) or with a value: ``--x``, ``--x false``."""
    p.add_argument(*names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=f"{help} (default: {default})")


def add_min_genes(g: argparse._ActionsContainer, what: str = "") -> None:
    g.add_argument("--min-genes", type=int, default=200,
                   help=f"drop cells expressing fewer genes{what} (default: 200, as published; 0 keeps all)")


def add_library_size(g: argparse._ActionsContainer) -> None:
    g.add_argument("--library-size", choices=["auto", "all", "vocab"], default="auto",
                   help="where each cell's total (library size) is taken before normalising to 10,000: 'all' its input genes (ours), "
                   "'vocab' the vocabulary genes after aligning, with --min-genes counted among them (the published preprocessing). "
                   "(default: auto = as the pretrained model or the input file says; vocab for a 16,906-gene, published, vocabulary; else all)")


def add_input_args(g: argparse._ActionsContainer, layer_flags: tuple[str, ...] = ("--layer", "--data-layer")) -> None:
    """--layer, --use-raw, --gene-symbols: which matrix of an AnnData holds the cells, and their gene names
    (attn_analysis.py, whose --layer is the attention layer, spells it --data-layer only)."""
    g.add_argument(*layer_flags, dest="data_layer", default=None, metavar="NAME",
                   help="read the expression from layers[NAME] (e.g. counts) instead of X (default: X; when X holds scaled or negative "
                   "values and exactly one layer or .raw is usable, that one is used, with a message)")
    add_bool(g, "--use-raw", default=False, help="read the expression and genes from .raw (e.g. counts or log values kept before scaling)")
    g.add_argument("--gene-symbols", default=None, metavar="COLUMN",
                   help="take the gene names from this var column (scanpy's gene_symbols): symbols when var_names are Ensembl ids, or "
                   "Ensembl ids (mapped to current symbols) when the symbols are outdated (default: var_names)")
    g.add_argument("--log-base", choices=["auto", "2", "e", "10"], default="auto",
                   help="the base of log-normalised input whose per-cell totals cannot be checked (genes removed after normalising): "
                   "e for scanpy's log1p, 2 for log2(1 + x). auto = as the file records it (scanpy's uns['log1p']['base']: "
                   "absent or None = e), else log2; raw counts and checkable log values are recognised whatever it says (default: auto)")


def cell_source(args: argparse.Namespace) -> Any:
    """The :class:`data.io.CellSource` of --layer, --use-raw, --gene-symbols, --log-base."""
    from data.io import CellSource
    from data.values import parse_log_base

    return CellSource(layer=getattr(args, "data_layer", None), use_raw=bool(getattr(args, "use_raw", False)),
                      gene_symbols=getattr(args, "gene_symbols", None), log_base=parse_log_base(getattr(args, "log_base", None)))


def add_device(g: argparse._ActionsContainer, default: str = "auto") -> None:
    g.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N or auto (default: {default}; auto = cuda when available)")


PRECISION_NOTES = {
    "predict": "auto = bf16 where its products are known to be faster: GPUs with bf16, CPUs with AMX, AMD CPUs with AVX512-BF16 "
               "(Zen 4); fp32 elsewhere. Cells near a decision are scored again in float32 (--fp32-recheck), so labels match fp32",
    "training": "training keeps fp32 unless asked: bf16 training is faster (BENCHMARKS.md) but its accuracy against fp32 training "
                "is not measured; auto = bf16 where its products are known to be faster (GPUs, AMX, Zen 4)",
    "attention": "auto = bf16 where its products are known to be faster (GPUs, AMX, Zen 4); attention scores in bf16 are not "
                 "compared with fp32 ones, so fp32 stays the default",
}


def add_precision(g: argparse._ActionsContainer, default: str = "fp32", stage: str = "training") -> None:
    why = PRECISION_NOTES[stage]
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=default,
                   help=f"arithmetic precision (default: {default}; {why}; fp16: GPU only)")


def add_memory_limit(g: argparse._ActionsContainer) -> None:
    g.add_argument("--memory-limit", type=positive_float, default=None, metavar="GB",
                   help="refuse, before the first step, a --batch-size whose estimated memory is above this many GB (default: the "
                   "memory free when the run starts: on a CPU MemAvailable or the cgroup limit, on a GPU its free memory)")


positive_int_or_auto = or_auto(positive_int)  # auto or a whole number >= 1


def add_batch_size(g: argparse._ActionsContainer, default: int | str, help: str = "cells per forward pass") -> None:
    kind = positive_int_or_auto if default == "auto" else positive_int
    g.add_argument("--batch-size", "--batch_size", type=kind, default=default, help=f"{help} (default: {default})")


def add_common(p: argparse.ArgumentParser) -> None:
    """The run flags of the training stages."""
    add_input_args(p.add_argument_group("input matrix"))
    g = p.add_argument_group("run")
    add_min_genes(g, ", for input not written by preprocess.py")
    add_library_size(g)
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    add_device(g)
    add_precision(g)
    add_memory_limit(g)
    add_speed_args(g)
    add_bool(g, "--overwrite", default=False, help="replace an existing output (for training: also start again beside the "
             "training states of an unfinished run, which are removed)")
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


SIZES = {"small": {"dim": 32, "depth": 2, "heads": 4, "dim_head": 8}, "published": {"dim": 200, "depth": 6, "heads": 10, "dim_head": 64}}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model size (ignored when starting from a checkpoint)")
    g.add_argument("--size", choices=["auto", *SIZES], default="auto",
                   help="small = the demo's model (dim 32, depth 2, 4 heads of 8: minutes per epoch on a laptop CPU); published = "
                   "scBERT's (dim 200, depth 6, 10 heads of 64: hours per epoch on a CPU). --dim, --depth, --heads, --dim-head change "
                   "single values (default: auto = small on a CPU, published on a GPU)")
    g.add_argument("--dim", type=positive_int, default=None, help="embedding size (default: of --size)")
    g.add_argument("--depth", type=positive_int, default=None, help="Performer layers (default: of --size)")
    g.add_argument("--heads", type=positive_int, default=None, help="attention heads (default: of --size)")
    g.add_argument("--dim-head", type=positive_int, default=None, help="size of each head (default: of --size)")
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
    from data.vocab import read_name_list

    return {
        "genes": read_name_list(args.genes, "genes") if args.genes else None,
        "classes": read_name_list(args.classes, "classes") if args.classes else None,
    }


def recipe_help(stage: str, key: str, what: str) -> str:
    """Help text of a setting that ``--recipe`` chooses: both values, as defaults."""
    from model.train.recipes import RECIPES

    ours, published = RECIPES["ours"][stage][key], RECIPES["published"][stage][key]
    return f"{what} (default: {ours}; with --recipe published: {published})"


def add_recipe(p: argparse._ActionsContainer, stage: str) -> None:
    p.add_argument("--recipe", choices=["ours", "published"], default="ours",
                   help="the defaults of the settings where our training differs from the published scBERT code: 'ours' (default) or "
                   "'published' (batch 3 x 60 accumulation, per-epoch schedule, clipping, "
                   + ("ceil mask count, accuracy over bins 1..5" if stage == "pretrain" else "random head start, patience + 1")
                   + "; see README). A flag given explicitly wins over the recipe")


def add_training_args(p: argparse.ArgumentParser, stage: str, epochs_help: str) -> argparse._ArgumentGroup:
    """The optimisation flags pretrain.py and finetune.py share; returns the group for more. Flags
    that ``--recipe`` sets default to None here and are filled in by :func:`apply_recipe`."""
    g = p.add_argument_group("training")
    add_recipe(g, stage)
    g.add_argument("--epochs", "--epoch", type=positive_int, default=None, help=recipe_help(stage, "epochs", epochs_help))
    g.add_argument("--batch-size", "--batch_size", type=positive_int, default=None,
                   help=recipe_help(stage, "batch_size", "cells per step of each process (under torchrun the step has batch-size x processes cells)"))
    g.add_argument("--grad-acc", "--grad_acc", type=positive_int, default=None, help=recipe_help(stage, "grad_acc", "gradient accumulation steps"))
    g.add_argument("--lr", "--learning_rate", type=float, default=None, help=recipe_help(stage, "lr", "peak learning rate of Adam"))
    g.add_argument("--schedule", choices=["ours", "published"], default=None,
                   help=recipe_help(stage, "schedule", "learning-rate schedule: 'ours' = linear warm-up from peak/(warm-up + 1) then cosine "
                                    "restarts, per optimiser step (--warmup-steps, --cycle-steps); 'published' = per epoch, warm-up from 1e-6 "
                                    "over 5 epochs, cycles of 15/25/45... epochs, peaks x 0.9"))
    g.add_argument("--warmup-steps", type=int, default=5, help="schedule ours: linear warm-up optimiser steps per cosine cycle (default: 5)")
    g.add_argument("--cycle-steps", type=int, default=None, help="schedule ours: optimiser steps of the first cosine cycle; cycles double (default: the whole run)")
    g.add_argument("--clip-norm", type=float, default=None, help=recipe_help(stage, "clip_norm", "gradient norm clipping (0 = off)"))
    g.add_argument("--weight-decay", type=float, default=None, help=recipe_help(stage, "weight_decay", "decoupled weight decay (AdamW); 0 = plain Adam, as published"))
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




# --------------------------------------------------------------------------------------------
# Parsed flags -> the library's typed settings
# --------------------------------------------------------------------------------------------


def resolve_precision_flag(args: argparse.Namespace, device: Any) -> str:
    """--precision with ``auto`` resolved for ``device`` (in ``args``, so every setting built from
    them gets it), logged with the reason; returns it."""
    from model.runtime import resolve_precision

    if getattr(args, "precision", None) == "auto":
        args.precision, why = resolve_precision("auto", device)
        log.info("precision %s (--precision auto: %s)", args.precision, why)
    return args.precision


def execution_options(args: argparse.Namespace) -> Any:
    """:class:`model.nn.config.ExecutionOptions` of --precision, --compile, --grad-checkpointing."""
    from model.nn.config import ExecutionOptions

    return ExecutionOptions(precision=args.precision, compile=bool(getattr(args, "compile", False)),
                            grad_checkpointing=bool(getattr(args, "grad_checkpointing", False)))


def model_size(args: argparse.Namespace, device: Any = None, say: bool = False) -> Any:
    """The :class:`model.nn.config.ModelSize` of --size (auto: small on a CPU, published on a GPU) and
    of --dim, --depth, --heads, --dim-head given explicitly; ``say``: log which size runs."""
    from model.nn.config import ModelSize

    name = getattr(args, "size", "auto")
    if name == "auto":
        name = "published" if getattr(device, "type", "cpu") == "cuda" else "small"
    base = SIZES[name]
    given = {k: getattr(args, k) for k in base if getattr(args, k, None) is not None}
    size = ModelSize(**{**base, **given}, bin_num=args.bin_num)
    if say:
        why = "--size auto on a GPU" if getattr(args, "size", "auto") == "auto" and name == "published" else (
            "--size auto on a CPU (--size published for scBERT's size: about 300x the work per cell)"
            if getattr(args, "size", "auto") == "auto" else "--size " + name)
        changed = f"; changed by flags: {', '.join(f'{k} {v}' for k, v in given.items())}" if given else ""
        log.info("model size %s: dim %d, depth %d, %d heads of %d (%s%s)", name, size.dim, size.depth, size.heads, size.dim_head, why, changed)
    return size


def training_checks(args: argparse.Namespace, config: Any, device: Any, kept: str, n_train: int, n_val: int) -> None:
    """Before the first step of a training stage: refuse a --batch-size the memory cannot hold (the
    estimate, what is free, the largest batch that fits), and say roughly how long an epoch takes.
    ``kept``: the layers the backward pass goes through (see :func:`model.memory.kept_layers_of`)."""
    from model.estimate import epoch_estimate
    from model.memory import check_batch_memory, kept_layers_of

    layers = kept_layers_of(config.depth, kept, bool(getattr(args, "grad_checkpointing", False)))
    hint = " (with --grad-acc {acc} for the same {cells} cells a step)" + ("" if args.grad_checkpointing else ", or --grad-checkpointing")
    need = check_batch_memory(config, args.batch_size, device, layers, getattr(args, "memory_limit", None), hint=hint)
    log.info("memory: %s", need.describe(args.batch_size))
    log.info(epoch_estimate(config, n_train, n_val, args.precision, device, layers, frozen_encoder=kept == "head"))


def gene2vec_spec(args: argparse.Namespace) -> str:
    """--gene2vec, with the published --pos_embed false meaning none."""
    return "none" if args.pos_embed is False else args.gene2vec


def train_config(args: argparse.Namespace, progress: bool, **fields: Any) -> Any:
    """The :class:`model.train.config.TrainConfig` of the training flags; training states go to
    OUT/checkpoints and --resume reads them from the run it names."""
    from model.train.config import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, grad_acc=args.grad_acc, lr=args.lr, clip_norm=args.clip_norm,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, cycle_steps=args.cycle_steps, schedule=args.schedule, seed=args.seed,
        num_workers=args.num_workers, progress=progress, checkpoint_dir=str(Path(args.out) / "checkpoints"), save_every=args.save_every,
        keep_last=args.keep_last, resume_from=resume_source(args), max_steps=args.max_steps, **fields,
    )


def resume_source(args: argparse.Namespace) -> str | None:
    """Where --resume finds training states: a state file, or DIR/checkpoints (or DIR) of a run."""
    from data.io import InputError

    if not getattr(args, "resume", None):
        return None
    p = Path(args.resume)
    if p.is_file():
        return str(p)
    if not p.is_dir() and p.resolve() != Path(args.out).resolve():
        raise InputError(f"--resume {p}: no such run folder; give the --out folder of the run to go on with")
    return str(p / "checkpoints" if (p / "checkpoints").is_dir() else p)


def check_gene_num(args: argparse.Namespace, n_genes: int) -> None:
    """The published --gene_num flag, checked against the vocabulary."""
    from data.io import InputError

    if args.gene_num is not None and args.gene_num not in (n_genes, n_genes + 1):
        raise InputError(f"--gene_num {args.gene_num} does not match the vocabulary of {n_genes} genes; drop the flag or fix the data")


def preprocessing_record(args: argparse.Namespace, library_size: str) -> dict[str, Any]:
    """The checkpoint's ``preprocessing`` of a training run: how its cells were normalised."""
    from data.preprocess import DEFAULT_PREPROCESSING

    return {**DEFAULT_PREPROCESSING, "min_genes": args.min_genes, "library_size": library_size}


def apply_recipe(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """Fill the recipe's settings into the flags not given explicitly (those left at None)."""
    from model.train.recipes import recipe_settings

    # an explicit --epochs is a budget the user chose: the recipe's step floor does not extend it
    if stage == "finetune" and getattr(args, "epochs", None) is not None and getattr(args, "min_steps", None) is None:
        args.min_steps = 0
    # the layers trained: one flag given explicitly sets the other off (the recipe's choice is one of three)
    if stage == "finetune" and getattr(args, "train_all", None) and getattr(args, "head_only", None) is None:
        args.head_only = False
    if stage == "finetune" and getattr(args, "head_only", None) and getattr(args, "train_all", None) is None:
        args.train_all = False
    # a recipe's head-only training needs a pretrained encoder: from scratch, every layer is trained
    if stage == "finetune" and getattr(args, "head_only", None) is None and not getattr(args, "pretrained", None):
        args.head_only = False
    chosen_ensemble = getattr(args, "ensemble", None) is not None
    for key, value in recipe_settings(args.recipe, stage).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    # the recipe's ensemble of heads shares one frozen encoder: a run that trains encoder layers has one head
    if stage == "finetune" and not chosen_ensemble and not getattr(args, "head_only", True):
        args.ensemble = 1
    return args


def novelty_settings(args: argparse.Namespace) -> Any:
    """:class:`model.novelty.rule.NoveltySettings` of --novelty, --threshold, --reject-rate (and the
    published --novel_type false: never Unassigned)."""
    from model.novelty.rule import NoveltySettings

    threshold = None if getattr(args, "novel_type", True) is False else args.threshold
    return NoveltySettings(args.novelty, threshold, args.reject_rate)


def inference_options(args: argparse.Namespace, device: Any, batch_size: int) -> Any:
    """:class:`model.inference.InferenceOptions` of --num-workers, --quiet, --precision and the speed
    flags, --fp32-recheck, for ``device`` and ``batch_size`` (--batch-size once resolved)."""
    from model.inference import InferenceOptions

    return InferenceOptions(batch_size, device, getattr(args, "num_workers", 0), progress=not args.quiet,
                            execution=execution_options(args), fp32_recheck=getattr(args, "fp32_recheck", "auto"))
