"""What the scripts show a person on the console: the --help layout and progress of long loops."""

import argparse
import difflib
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from common.core.errors import PipelineError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring keeps its layout (its example commands stay one per line), and every option shows
    its default, except where a default would mislead:

    - a required option has none: it says "(required)";
    - an option whose default is None (e.g. --fold-file, --max-images) has its meaning in its help text, where
      "(default: None)" would add nothing;
    - a flag (--resume, --no-amp) is off unless given: "(default: True)" after --no-amp read as "AMP off"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.required and action.option_strings:  # (a positional is required by its form)
            return f"{help_text} (required)".strip()
        if action.default is None or action.nargs == 0:
            return help_text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad option or value is a PipelineError (run_main prints `error: ...`, exit
    status 2, instead of a usage dump), and an unknown option names the closest valid one ("did you mean")."""

    def __init__(self, **kwargs):
        super().__init__(**{"formatter_class": HelpFormatter, **kwargs})

    def option_names(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]

    def error(self, message: str):
        raise PipelineError(f"{message} (see python {self.prog} --help)")

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_arguments_message(unknown, self.option_names()))
        return namespace


def unknown_arguments_message(unknown: list[str], valid_options: list[str]) -> str:
    """'unknown option --imagesize; did you mean --image-size?' for the first unknown option, else what argparse
    would say."""
    for word in unknown:
        name = word.split("=", 1)[0]
        if name.startswith("--"):
            close = difflib.get_close_matches(name, valid_options, n=1, cutoff=0.75)  # 0.6 offered nonsense
            return f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else "")
    return f"unrecognized arguments: {' '.join(unknown)}"


def progress(iterable: Iterable, *, total: int | None = None, desc: str, disable: bool = False):
    """tqdm's bar on a terminal; where stderr is a file or a pipe (a log, a batch job), a plain line now and then
    instead: a bar redrawn with carriage returns becomes one line of many kilobytes there.

    Either way the result is iterated like `iterable` and has tqdm's `set_postfix(**values)`. The bar is
    removed when the loop ends (the caller prints its own summary line)."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False)
    return PlainProgress(iterable, total=total, desc=desc)


class PlainProgress:
    """Progress as whole lines on stderr, "desc: 12/48 (25 %) loss=0.6931": at each quarter of the way, and at
    least every `interval` seconds in between (a long epoch), so a loop prints 4 lines plus one per interval."""

    QUARTERS = 4

    def __init__(self, iterable: Iterable, *, total: int | None, desc: str, interval: float = 60.0):
        self.iterable, self.desc, self.interval = iterable, desc, interval
        self.total = total if total is not None else _length_or_none(iterable)
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def __iter__(self) -> Iterator:
        done, quarters_shown = 0, 0
        last_line = time.monotonic()
        for item in self.iterable:
            yield item
            done += 1
            # The quarter reached after `done` items (None when the length is unknown).
            quarter = done * self.QUARTERS // self.total if self.total else None
            if (quarter is not None and quarter > quarters_shown) or time.monotonic() - last_line >= self.interval:
                quarters_shown = quarter if quarter is not None else quarters_shown
                self._print(done)
                last_line = time.monotonic()

    def _print(self, done: int) -> None:
        count = f"{done}/{self.total} ({100 * done // self.total} %)" if self.total else f"{done}"
        print(f"{self.desc}: {count}{' ' + self.postfix if self.postfix else ''}", file=sys.stderr, flush=True)


def _length_or_none(iterable: Iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None
