"""The ``fisedit-compiler`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that registers its parser and sets
``run`` (a function of the parsed arguments returning an exit code); listing it in
``SUBCOMMANDS`` is all it takes to add one. A ``FiseditError`` (bad input) is printed as one
line on stderr with exit code 2, like argparse's own usage errors; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import inspect, zoo
from .app.command import add_app_command
from .bench import add_bench_command
from .checks import check_int
from .compiler import capture
from .edit_flow.commands import (add_demo_command, add_edit_command, check_writable,
                                 write_outputs)
from .errors import FiseditError


def add_dump(subparsers) -> None:
    parser = subparsers.add_parser(
        "dump", help="show a U-Net graph: ops, shapes, domains, levels, MACs",
        description="Capture a zoo U-Net or a saved pipeline's U-Net on example inputs and show "
                    "its graph as a text table, JSON (schema: fisedit_compiler.inspect."
                    "JSON_SCHEMA), Graphviz DOT, or SVG (needs Graphviz's dot).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="NAME",
                        help=f"a zoo model: {', '.join(zoo.MODEL_NAMES)}")
    source.add_argument("--pipeline", metavar="DIR",
                        help="a folder holding a diffusers pipeline saved with save_pretrained")
    parser.add_argument("--stage", choices=inspect.STAGES, default="canonical",
                        help="captured: the frontend's ATen graph; canonical: the canonical "
                             "dialect with analysis (default); sparse: how an edit under "
                             "--mask/--mask-box runs each node, its sparse MACs, cache writes")
    parser.add_argument("--mask", metavar="PNG", help="edit mask image (white = edit), at "
                        "latent size or an integer multiple; for --stage sparse")
    parser.add_argument("--mask-box", metavar="x0,y0,x1,y1", help="edit box in fractions of "
                        "the width and height; for --stage sparse")
    parser.add_argument("--format", choices=inspect.FORMATS, default="text",
                        help="output format (default: text)")
    parser.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument("--frontend", choices=capture.FRONTENDS, default="export",
                        help="capture frontend (default: export)")
    parser.add_argument("--batch", type=int, default=2,
                        help="batch size of the example inputs (default: 2, as with CFG)")
    parser.set_defaults(run=run_dump)


def run_dump(args) -> int:
    check_int("--batch", args.batch, minimum=1, maximum=inspect.MAX_DUMP_BATCH)
    if args.out is not None:
        # Before the capture, which takes seconds to minutes.
        replaceable = _check_out_file(args.out)
    text = inspect.dump(args.model, pipeline=args.pipeline, fmt=args.format, stage=args.stage,
                        frontend=args.frontend, batch=args.batch, mask=args.mask,
                        mask_box=args.mask_box)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)

    def write(path) -> None:
        Path(path).write_text(text, encoding="utf-8")

    if replaceable:
        # Through a temporary file: a failed write (a full disk) keeps an earlier dump whole.
        write_outputs("--out", out.parent, {out.name: write})
    else:
        try:
            write(out)
        except OSError as error:
            raise FiseditError(f"--out {args.out} could not be written ({error.strerror})") \
                from None
    print(f"wrote {args.out}")
    return 0


def _check_out_file(path: str) -> bool:
    """``dump --out FILE`` can be written: not a folder, in an existing, writable folder.
    Returns whether the dump may replace it through a temporary file: a new path or a regular
    file in a folder that takes new files; a link, a device (/dev/null) or a pipe is written
    through, as a file in a folder that takes no new files is written in place."""
    if not path:
        raise FiseditError("--out is empty; pass a file path such as graph.txt")
    file = Path(path)
    if file.is_dir():
        raise FiseditError(f"--out {path} is a folder; pass a file path such as "
                           f"{file / 'graph.txt'}")
    parent = file.absolute().parent
    if not parent.is_dir():
        raise FiseditError(f"--out {path}: {parent} is not an existing folder (dump creates no "
                           "folders); create it first or pass a file in an existing folder")
    if file.is_symlink() or (file.exists() and not file.is_file()):
        _check_opens(file, path)
        return False
    if not file.exists():
        check_writable("--out", path, parent)
        return True
    _check_opens(file, path)
    try:
        check_writable("--out", path, parent)
    except FiseditError:
        return False
    return True


def _check_opens(file: Path, path: str) -> None:
    """An existing file is tried by opening it to append (nothing written): os.access says
    yes to everything as root."""
    try:
        with open(file, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise FiseditError(f"--out {path} cannot be written ({error.strerror}); pass a file "
                           "you can write to") from None


SUBCOMMANDS = (add_dump, add_edit_command, add_demo_command, add_bench_command,
               add_app_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fisedit-compiler",
        description="Compile diffusers U-Nets into incremental, mask-sparse editing engines.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0), or a usage error argparse has printed (2)
        return exit_.code
    try:
        return args.run(args)
    except FiseditError as error:
        print(f"fisedit-compiler {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
