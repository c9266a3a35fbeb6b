"""Recreate the data samples shipped in data/ from ../shared/data (seeded, reproducible).

    python scripts/make_samples.py ../shared/data
"""

from __future__ import annotations

import random
import sys
from pathlib import Path


def sample_tsv(src: Path, dst: Path, n: int | None, seed: int = 13) -> None:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = lines[0], lines[1:]
    if n is not None and n < len(rows):
        rng = random.Random(seed)
        rows = [rows[i] for i in sorted(rng.sample(range(len(rows)), n))]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(header + "".join(rows), encoding="utf-8")


def main(shared: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "data"
    sample_tsv(shared / "glue/sst2/train.tsv", root / "sst2/train.tsv", 10_000)
    sample_tsv(shared / "glue/sst2/dev.tsv", root / "sst2/dev.tsv", None)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
