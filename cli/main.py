"""The ``slim`` command: offline verbs, server verbs and client verbs in one parser.

Each group lives in its own module with a ``register(subparsers)`` function; a verb's handler
returns an exit code. User mistakes (any :class:`core.errors.SlimError`, and the client and
storage errors that carry a ``code``) print one line to stderr and exit 2 — never a traceback.
Core and server messages name parameters (`` `keep=0.01` ``); the line printed names the
command's flags instead (``--keep 0.01``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

#: Modules that add verbs; a module that is missing (not built yet) is skipped.
VERB_MODULES = ("cli.offline", "cli.server", "cli.client")


#: Parameter names (as core and the API spell them) -> the flags of the `slim` command.
FLAGS = {
    "keep": "--keep",
    "min_fidelity": "--min-fidelity",
    "evaluation": "--eval",
    "calibration": "--calibration",
    "method": "--method",
    "value_bits": "--value-bits",
    "density": "--density",
    "scale": "--scale",
    "seed": "--seed",
}
_PARAM = re.compile(r"`([a-z_]+)(?:=([^`\s]+))?`")


def cli_words(detail: str) -> str:
    """A message with its named parameters (`` `keep` ``, `` `keep=0.01` ``) as flags."""

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name not in FLAGS:
            return m.group(0)
        return f"{FLAGS[name]} {value}" if value else FLAGS[name]

    return _PARAM.sub(flag, detail)


class Interrupted(KeyboardInterrupt):
    """^C while a verb follows a server job: ``hint`` says the job goes on and how to follow
    or cancel it (``slim: interrupted — <hint>``)."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slim",
        description="Slimstore: keep fine-tunes as sparse task-vector deltas of their base.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `slim log NAME | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:
        hint = getattr(exc, "hint", None)
        print(f"slim: interrupted{' — ' + hint if hint else ''}", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors carry a stable code
        code = getattr(exc, "code", None)
        detail = getattr(exc, "detail", None) or str(exc)
        if isinstance(code, str):
            print(f"slim: error [{code}]: {cli_words(detail)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
