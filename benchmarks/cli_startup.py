"""Start-up time of the `maskdino-hf` command and of `import maskdino_hf`, against `import transformers`.

Each command runs `--runs` times in a fresh interpreter (alternating the commands, so that machine load affects all
alike); the table gives the median and minimum wall time and the ratio of the median to that of
`python -c "import transformers"` measured in the same run. The CLI target is 0.5 s for `--help`, a subcommand's
`--help` and an argument error.

    python benchmarks/cli_startup.py --runs 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 0.5


def commands() -> dict[str, tuple[list[str], bool]]:
    """name -> (argv, held to the 0.5 s target)."""
    script = shutil.which("maskdino-hf")
    cli = [script] if script else [sys.executable, "-m", "maskdino_hf.cli"]
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], False),
        "maskdino-hf --help": ([*cli, "--help"], True),
        "maskdino-hf predict --help": ([*cli, "predict", "--help"], True),
        "maskdino-hf predict --batch-size 0 (argument error)": ([*cli, "predict", "--batch-size", "0"], True),
        "python -c 'import maskdino_hf'": ([sys.executable, "-c", "import maskdino_hf"], False),
        "python -c 'import transformers'": ([sys.executable, "-c", "import transformers"], False),
    }


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, env=os.environ.copy())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per command (default 5)")
    args = parser.parse_args()
    table = commands()
    for argv, _ in table.values():  # warm the file cache once
        time_once(argv)
    times: dict[str, list[float]] = {name: [] for name in table}
    for _ in range(args.runs):
        for name, (argv, _) in table.items():
            times[name].append(time_once(argv))
    baseline = statistics.median(times["python -c 'import transformers'"])
    width = max(map(len, table))
    print(f"{'command':<{width}}  median    min   / import transformers  target {TARGET_S} s")
    for name, (_, targeted) in table.items():
        median = statistics.median(times[name])
        verdict = ("ok" if median < TARGET_S else "SLOW") if targeted else ""
        print(f"{name:<{width}}  {median:6.3f} {min(times[name]):6.3f}   {median / baseline:6.2f}               {verdict}")
    print(f"({args.runs} runs each, fresh interpreters, {sys.executable}; CLI: {table['maskdino-hf --help'][0][0]})")


if __name__ == "__main__":
    main()
