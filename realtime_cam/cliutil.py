"""The parser, argument types and the help formatter shared by every command."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

DEVICES_FOR_BENCH = ("cpu", "cuda")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a mistake on the command line is one line on stderr (and exit code 2), like
    every other user error, instead of the whole usage block; the line says where the usage is."""

    commands: dict[str, argparse.ArgumentParser]  # the top-level parser's subcommands (set by build_parser)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except empty ones (None, False), and keeps descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def finite_float(text: str) -> float:
    return _number(text, float)


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def smooth_weight(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def _at_least(text: str, kind: type, minimum: float, words: str) -> float:
    value = _number(text, kind)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _at_least(text, int, 1, "at least 1")


def _from_1_to(text: str, maximum: int) -> int:
    value = positive_int(text)
    if value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
    return value


MAX_BATCH = 64
MAX_INPUT_SIDE = 8192


def batch_count(text: str) -> int:
    """Frames per inference call: 1 to MAX_BATCH (a batch of 4K frames in flight is 100 MB per 4 frames)."""
    return _from_1_to(text, MAX_BATCH)


def input_side(text: str) -> int:
    """A model input height or width: 1 to MAX_INPUT_SIDE pixels."""
    return _from_1_to(text, MAX_INPUT_SIDE)


def non_negative_int(text: str) -> int:
    return _at_least(text, int, 0, "0 or more")


def non_negative_float(text: str) -> float:
    return _at_least(text, float, 0, "0 or more")


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def device_list(text: str) -> tuple[str, ...]:
    """Comma-separated devices: cpu and/or cuda."""
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    bad = [d for d in devices if d not in DEVICES_FOR_BENCH]
    if not devices or bad:
        raise argparse.ArgumentTypeError(f"devices are cpu and/or cuda, comma-separated; got {text!r}")
    return devices


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """--debug on a subcommand too (SUPPRESS: a subcommand must not reset the top-level flag to False)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
