"""Recreate the TinyStories samples in data/tinystories/ from ../shared/data (seeded, reproducible).

    python scripts/make_lm_samples.py ../shared/data

Reads ``lm/tinystories/{train,valid}.txt.gz`` (stories joined by ``\\n<|endoftext|>\\n``) and
writes plain UTF-8 files in the same layout (every story followed by a ``<|endoftext|>`` line):

- ``train.txt``: whole stories drawn at random (seed 20240901) from train, about 1.2 MB;
- ``valid.txt`` / ``test.txt``: disjoint sets of whole stories, about 60 KB each, drawn at
  random (same seed) from the held-out valid file.

Stories stay in their drawn (shuffled) order, so any prefix of a file mixes all three sources.
"""

from __future__ import annotations

import gzip
import random
import sys
from pathlib import Path

SEP = "\n<|endoftext|>\n"
SEED = 20240901


def read_stories(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [s for s in f.read().split(SEP) if s.strip()]


def take(stories: list[str], budget: int) -> tuple[list[str], list[str]]:
    """Leading stories until their encoded size (with separators) reaches ``budget`` bytes; the rest."""
    size = 0
    for i, s in enumerate(stories):
        if size >= budget:
            return stories[:i], stories[i:]
        size += len((s + SEP).encode("utf-8"))
    return stories, []


def write(path: Path, stories: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(s + SEP for s in stories), encoding="utf-8")
    print(f"{path}: {len(stories)} stories, {path.stat().st_size:,} bytes")


def main(shared: Path) -> None:
    src = shared / "lm" / "tinystories"
    out = Path(__file__).resolve().parents[1] / "data" / "tinystories"
    rng = random.Random(SEED)
    train = read_stories(src / "train.txt.gz")
    rng.shuffle(train)
    write(out / "train.txt", take(train, 1_200_000)[0])
    held_out = read_stories(src / "valid.txt.gz")
    rng.shuffle(held_out)
    valid, rest = take(held_out, 60_000)
    write(out / "valid.txt", valid)
    write(out / "test.txt", take(rest, 60_000)[0])


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
