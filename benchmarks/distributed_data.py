"""Synthetic long-input translation data for the distributed-training check.

Each source is 600..1000 tokens over a 1000-word vocabulary, long enough that the
encoder's clustered attention (C = 100) really clusters; the target is every tenth
source token, upper-cased (60..100 tokens), so the decoder must read the encoder.

Usage: python benchmarks/distributed_data.py OUT_DIR [--train 4000]
Writes OUT_DIR/{train,valid}.{src,tgt}.
"""

import argparse
import random
from pathlib import Path


def write_split(out_dir: Path, split: str, size: int, rng: random.Random) -> None:
    with open(out_dir / f"{split}.src", "w") as src, open(out_dir / f"{split}.tgt", "w") as tgt:
        for _ in range(size):
            sentence = [f"w{rng.randrange(1000)}" for _ in range(rng.randint(600, 1000))]
            src.write(" ".join(sentence) + "\n")
            tgt.write(" ".join(word.upper() for word in sentence[::10]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=4000, help="training pairs (default 4000)")
    parser.add_argument("--valid", type=int, default=100, help="validation pairs (default 100)")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    write_split(args.out_dir, "train", args.train, rng)
    write_split(args.out_dir, "valid", args.valid, rng)


if __name__ == "__main__":
    main()
