"""The run record of a command and its error boundary: logging (console and OUT/log.txt), the run
folder with config.json (flags and environment), summary.txt, and one-line errors for the user."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data.io import InputError, write_json, write_text
from model.evaluation import log_report_line

log = logging.getLogger("scbert")


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


def exit_now(code: int = 0) -> None:
    """End a stage script whose work is done and whose outputs are closed, without the interpreter's
    teardown of torch, pandas and scipy (0.3-0.5 s on a 2-core CPU: 1.7 -> 1.4 s of what a 32-cell
    predict.py run pays beyond the model). The exit handlers (logging's flush and close among them)
    still run, and the standard streams are flushed. Only for ``if __name__ == "__main__"``: a caller
    of ``main()`` in the same process goes on."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream (predict.py ... | head)
            stream.flush()
    os._exit(code)


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


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The error boundary of a command: bad input (:class:`InputError`) or an unusable checkpoint
    (``CheckpointError``) ends it with a one-line message and exit status 2, not a traceback."""
    from model.checkpoint import CheckpointError

    try:
        yield
    except (InputError, CheckpointError) as e:
        fail(str(e))


def write_summary(folder: Path, lines: Sequence[str], results: tuple[str, ...] = (), echo: Sequence[str] | None = None) -> None:
    """``folder/summary.txt`` holds ``lines``; they (or only ``echo``) are logged too, except those
    starting with one of ``results``, which go to stdout (the result of the command, for scripts).
    A line starting ``WARNING: `` is logged as a warning (``--quiet`` still shows it)."""
    write_text(folder / "summary.txt", "\n".join(lines) + "\n")
    for line in lines if echo is None else echo:
        if results and line.startswith(results):
            print(line)
        else:
            log_report_line(line)


def earlier_states(out: Path, overwrite: bool) -> list[Path]:
    """The training states an earlier, unfinished run left in ``out/checkpoints``: refused (a new run
    would silently start again from epoch 1 beside them) unless ``overwrite``, when they are removed
    (else they would mix with the new run's states). Returns those removed."""
    states = sorted((out / "checkpoints").rglob("state-*.pt")) if (out / "checkpoints").is_dir() else []
    if not states:
        return []
    if not overwrite:
        from model.cli.boundary import training_interrupted

        where = training_interrupted(out).removeprefix("interrupted ").split(";")[0]
        fail(f"{out} holds the training states of an earlier run that did not finish (it stopped {where}): continue it with "
             f"--resume {out}, or pass --overwrite to start again from epoch 1")
    for state in states:
        state.unlink()
    return states


def start_training_run(args: argparse.Namespace) -> tuple[Path, Any]:
    """Join the torchrun job if there is one; rank 0 creates the run folder and logs, the other
    ranks only report warnings and errors. Resuming into the run's own folder needs no --overwrite.
    Returns the run folder and this process's device."""
    from model import distributed

    with user_errors():
        try:
            info, device = distributed.init_distributed(args.device)
        except ValueError as e:
            raise InputError(str(e)) from None
    out = Path(args.out)
    resuming_here = bool(args.resume) and Path(args.resume).resolve() in (out.resolve(), (out / "checkpoints").resolve())
    if info.is_main:
        setup_logging(args.quiet, level=getattr(args, "log_level", None))
        earlier = [] if args.resume else earlier_states(out, args.overwrite)
        start_run(out, args, () if resuming_here else ("model.pt",))
        if earlier:
            log.info("--overwrite: removed %d training states of an earlier run from %s; starting from epoch 1", len(earlier), out / "checkpoints")
    else:
        setup_logging(quiet=True)
    from model.cli.args import resolve_precision_flag

    resolve_precision_flag(args, device)
    distributed.barrier()
    if info.enabled:
        log.info("torchrun job: %d processes, backend %s, this one on %s; %d cells per step", info.world_size, info.backend,
                 device, args.batch_size * info.world_size * args.grad_acc)
    return out, device
