"""`python -m pgolf.config NAME [--set SECTION.KEY=VALUE ...] > params.yaml`: a preset as a full params.yaml."""

from __future__ import annotations

import argparse
import shlex
import sys

from pgolf.config.params_file import render
from pgolf.config.presets import PRESETS
from pgolf.errors import PgolfError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pgolf.config", description="Print a preset as a full params.yaml (every key, one comment each).",
        epilog="Example: python -m pgolf.config record > params.yaml;   the demo's file: python -m pgolf.config tiny "
               "--set tokenize.val_docs=2 --set tokenize.max_sentence_length=400000 > params.yaml")
    parser.add_argument("preset", choices=list(PRESETS), help="the preset to start from")
    parser.add_argument("--set", "-s", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an override, marked in the output (repeatable)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "pgolf.config", *(argv if argv is not None else sys.argv[1:])])
    try:
        sys.stdout.write(render(args.preset, args.sets, command))
    except PgolfError as exc:
        print(f"pgolf: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
