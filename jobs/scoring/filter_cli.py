"""``python -m jobs.scoring.filter_cli --generations FILE.jsonl ... --output filtered.json [--strategy ...]``

Re-filter generations without regenerating: this project's shards or the seed's own
``generations.jsonl``. Every key of the config's ``filter`` section is an option of the same name
(``--top-k 3``, ``--zone-bounds '[0.2, 0.6, 0.9]'``, ``--dedupe``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.scoring.config import FilterConfig
from jobs.scoring.filtering import filter_generations
from jobs.sections import add_options, check_writable, section_from_options
from state import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.scoring.filter_cli", description=__doc__.splitlines()[2])
    parser.add_argument("--generations", nargs="+", required=True, type=Path, help="generations.jsonl shard(s)")
    parser.add_argument("--output", required=True, type=Path, help="filtered.json to write")
    parser.add_argument("--seed", type=int, default=42, help="seeds the sample of mastered problems")
    parser.add_argument("--num-samples", type=int, default=16, help="K, for the histogram's range")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the CPUs this job has)")
    add_options(parser, FilterConfig)
    args = parser.parse_args(argv)
    try:
        config = section_from_options(FilterConfig, args)
        check_writable(args.output, "--output")
        for path in args.generations:
            if not path.is_file():
                raise InputError(f"{path}: file not found")
        filter_generations(args.generations, args.output, config, args.seed, args.num_samples, workers=args.workers)
    except (InputError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return InputError.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
