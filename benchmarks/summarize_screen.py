"""Mean ± std over seeds of screening rows (``quality --variants ... --jsonl FILE``), per
method and imbalance ratio, as the markdown table of README.md and benchmarks/results/:

python benchmarks/summarize_screen.py benchmarks/results/objectives_fashion.jsonl [FILE ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jdcl_ray.bench.screen import summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", type=Path, nargs="+")
    args = parser.parse_args()
    for path in args.jsonl:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        print(f"\n{path}\n")
        print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
