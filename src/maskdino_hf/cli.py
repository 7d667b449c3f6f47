"""The `maskdino-hf` command line: convert official checkpoints, predict on images, evaluate on a data set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parse_labels(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise SystemExit(f"--stuff-labels must be comma-separated class ids, got {text!r}") from error


def _convert(args: argparse.Namespace) -> int:
    from .convert_maskdino_to_hf import convert_checkpoint

    id2label = None
    if args.id2label:
        id2label = {int(k): v for k, v in json.loads(Path(args.id2label).read_text()).items()}
    convert_checkpoint(args.checkpoint, args.config, args.output_dir, _parse_labels(args.stuff_labels), id2label)
    print(f"converted {args.checkpoint} -> {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskdino-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an official checkpoint (.pth + yaml) to a model folder")
    convert.add_argument("--checkpoint", required=True, help="official .pth file")
    convert.add_argument("--config", required=True, help="official yaml (with its _BASE_ chain) or a dumped config")
    convert.add_argument("--output-dir", required=True)
    convert.add_argument("--stuff-labels", help="comma-separated stuff class ids (default: COCO panoptic rule)")
    convert.add_argument("--id2label", help="JSON file mapping class ids to names")
    convert.set_defaults(handler=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"maskdino-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
