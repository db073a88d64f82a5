"""The outer boundary of every stage script: whatever ends a run ends it with one line for the user,
recorded in the run's log.txt when there is one. Ctrl-C: "interrupted; nothing written" (exit 130),
or for training where it can go on from ("continue with --resume OUT"); running out of memory: what
to lower; bad input found before the model stack is imported: the usual ``error:`` line. An
unexpected error keeps its traceback, and log.txt gets it too. Standard library only, so that it
guards the seconds of importing torch as well."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from data.errors import InputError

log = logging.getLogger("scbert")

INTERRUPTED = 130  # the exit status of a program ended by Ctrl-C (128 + SIGINT)
NOTHING_WRITTEN = "interrupted; nothing written"
_STATE = re.compile(r"state-(\d+)-(\d+)\.pt$")


def say(message: str) -> None:
    """One line for the user: through the run's log (console and log.txt) once a stage has set it
    up, else on stderr."""
    if log.handlers:
        log.error(message)
        for handler in log.handlers:
            handler.flush()
    else:
        print(message, file=sys.stderr, flush=True)


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text))


def training_interrupted(out: str | Path) -> str:
    """What a training run stopped by Ctrl-C can do next, from the training states in OUT/checkpoints."""
    states = [p for p in Path(out, "checkpoints").rglob("state-*.pt") if _STATE.search(p.name)]
    if not states:
        return "interrupted before the first training state was saved (end of epoch 1, or --save-every); nothing to resume: run the command again"
    newest = max(states, key=lambda p: p.stat().st_mtime)
    epoch, cells = (int(x) for x in _STATE.search(newest.name).groups())  # type: ignore[union-attr]
    fold = f" of {newest.parent.name}" if newest.parent.name != "checkpoints" else ""
    where = f"after epoch {epoch}{fold}" if cells == 0 else f"in epoch {epoch + 1}{fold} (saved {cells:,} cells into it)"
    return f"interrupted {where}; continue with --resume {out}"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_not_swallowed() -> Iterator[None]:
    """A Ctrl-C that lands in a finaliser or a weakref callback (the garbage collector runs them
    between any two bytecodes) is printed by Python as "Exception ignored ... Traceback" and dropped,
    and the run goes on. Here such an interrupt is raised again a moment later, in ordinary code."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    default_hook, old_alarm = sys.unraisablehook, signal.getsignal(signal.SIGALRM)

    def hook(unraisable: object) -> None:
        if isinstance(getattr(unraisable, "exc_value", None), KeyboardInterrupt):
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # SIGALRM: raised again outside the callback
            return
        default_hook(unraisable)

    sys.unraisablehook = hook
    signal.signal(signal.SIGALRM, _raise_interrupt)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        sys.unraisablehook = default_hook


@contextlib.contextmanager
def stage(interrupted: Callable[[], str] | str = NOTHING_WRITTEN) -> Iterator[None]:
    """The boundary of a stage script's ``main`` (see the module docstring); ``interrupted``: the
    line for Ctrl-C, or a function that makes it when it is needed."""
    for handler in list(log.handlers):  # a command run before in this process: its log.txt is not this run's
        log.removeHandler(handler)
        handler.close()
    try:
        with _interrupts_not_swallowed():
            yield
    except KeyboardInterrupt:
        say("error: " + (interrupted() if callable(interrupted) else interrupted))
        raise SystemExit(INTERRUPTED) from None
    except InputError as e:  # found by the checks before the run's own error boundary (data.paths)
        say(f"error: {e}")
        raise SystemExit(2) from None
    except Exception as e:
        if _out_of_memory(e):
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            say(f"error: out of memory ({first}): lower --batch-size, or for training use --grad-checkpointing; close other "
                f"programs or use a machine with more memory. Nothing was written")
            raise SystemExit(2) from None
        if log.handlers:
            for handler in log.handlers:
                if isinstance(handler, logging.FileHandler):  # the traceback goes to log.txt; the console gets Python's own
                    handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: unexpected %s", (type(e).__name__,),
                                                  sys.exc_info()))
        raise
