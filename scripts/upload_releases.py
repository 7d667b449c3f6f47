"""Maintainers: convert the released Mask DINO checkpoints and push them, with their model cards, to a Hub organisation.

    python scripts/upload_releases.py --organization my-org --work-dir /data/maskdino [--only NAME ...] [--dry-run]

Each release is downloaded into the cache (resumable; `--cache-dir`), converted with its preset into
`WORK_DIR/NAME` (every key and shape verified), and pushed to `ORGANIZATION/PREFIX+NAME` in one commit. `--dry-run`
converts and writes the cards without pushing. The SHA-256 of every official file is printed so that it
can be recorded in `maskdino_hf.releases` (`Release.sha256`, `Release.size`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maskdino_hf.releases import RELEASES, convert_release, download_release, file_sha256, write_model_card


def hub_id(organization: str, name: str, prefix: str = "") -> str:
    return f"{organization}/{prefix}{name}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organization", required=True, help="Hub user or organisation that receives the models")
    parser.add_argument("--prefix", default="", help="prefix of every repository name")
    parser.add_argument("--work-dir", required=True, type=Path, help="where the converted folders are written")
    parser.add_argument("--cache-dir", help="download cache (default: $MASKDINO_HF_CACHE or ~/.cache/maskdino_hf)")
    parser.add_argument("--only", nargs="+", choices=sorted(RELEASES), help="releases to process (default: all 8)")
    parser.add_argument("--dry-run", action="store_true", help="convert and write the cards, push nothing")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in args.only or RELEASES:
        repo_id = hub_id(args.organization, name, args.prefix)
        checkpoint = download_release(name, args.cache_dir)
        print(f"{name}: {checkpoint.name} size={checkpoint.stat().st_size} sha256={file_sha256(checkpoint)}")
        output = convert_release(name, args.work_dir / name, checkpoint=checkpoint,
                                 push_to_hub=None if args.dry_run else repo_id)
        if args.dry_run:
            write_model_card(output, release=name, model_id=repo_id)  # the card's usage names the Hub id
        print(f"{name}: {'converted into ' + str(output) if args.dry_run else 'pushed to ' + repo_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
