"""Spanish-English verse pairs from two public-domain Bibles packaged by Debian.

Reads the SWORD "zText" modules of ``sword-text-sparv`` (Reina-Valera 1909, Spanish)
and ``sword-text-kjv`` (King James, English), unpacked with ``dpkg -x`` into
``--sword-root`` (the directory holding ``modules/texts/ztext/``). Both modules use
the KJV versification, so entry ``i`` of one is the same verse as entry ``i`` of the
other; entries that are empty in either (book and chapter headings) are skipped.

A zText module stores, per testament (``ot``/``nt``):

* ``.bzs``: one 12-byte record per compressed block: offset, compressed size and
  uncompressed size in ``.bzz`` (little-endian uint32s);
* ``.bzv``: one 10-byte record per verse: block number (uint32), offset in the
  uncompressed block (uint32) and length (uint16);
* ``.bzz``: the zlib-compressed blocks (``CompressType=ZIP``), OSIS XML markup.

Output (``--out-dir``): ``{train,valid,test}.{es,en}``, one verse per line, lower-cased
and tokenized (words and punctuation separated by spaces). ``valid`` and ``test`` are
fixed random samples of verses (seed 0), the rest is ``train``.
"""

import argparse
import html
import random
import re
import struct
import zlib
from pathlib import Path
from typing import List

MODULES = {"es": "spaRV1909eb", "en": "engKJV2006eb"}


def read_ztext(module_dir: Path, testament: str) -> List[str]:
    """Every verse entry (raw OSIS markup, '' where empty) of one testament."""
    blocks_index = (module_dir / f"{testament}.bzs").read_bytes()
    verse_index = (module_dir / f"{testament}.bzv").read_bytes()
    data = (module_dir / f"{testament}.bzz").read_bytes()
    blocks = [struct.unpack_from("<III", blocks_index, 12 * i) for i in range(len(blocks_index) // 12)]
    cache = {}
    verses = []
    for i in range(len(verse_index) // 10):
        block, offset, size = struct.unpack_from("<IIH", verse_index, 10 * i)
        if size == 0:
            verses.append("")
            continue
        if block not in cache:
            start, compressed, _ = blocks[block]
            cache[block] = zlib.decompress(data[start:start + compressed])
        verses.append(cache[block][offset:offset + size].decode("utf-8", errors="replace"))
    return verses


_DROPPED_ELEMENTS = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1>", re.S)  # footnotes, headings
_TAG = re.compile(r"<[^>]+>")
_TOKEN = re.compile(r"\w+|[^\w\s]", re.U)


def plain_text(markup: str) -> str:
    """OSIS verse markup -> lower-cased tokens separated by single spaces."""
    text = html.unescape(_TAG.sub(" ", _DROPPED_ELEMENTS.sub(" ", markup)))
    return " ".join(_TOKEN.findall(text.lower()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sword-root", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--valid-size", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--max-words", type=int, default=80, help="drop longer verses (either side)")
    args = parser.parse_args()

    texts = {}
    for lang, module in MODULES.items():
        module_dir = args.sword_root / "modules" / "texts" / "ztext" / module
        texts[lang] = read_ztext(module_dir, "ot") + read_ztext(module_dir, "nt")
    if len(texts["es"]) != len(texts["en"]):
        raise SystemExit(f"versification mismatch: {len(texts['es'])} vs {len(texts['en'])} entries")
    pairs = []
    for es, en in zip(texts["es"], texts["en"]):
        es, en = plain_text(es), plain_text(en)
        if es and en and len(es.split()) <= args.max_words and len(en.split()) <= args.max_words:
            pairs.append((es, en))
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    held_out = args.valid_size + args.test_size
    splits = {"valid": order[:args.valid_size], "test": order[args.valid_size:held_out],
              "train": sorted(order[held_out:])}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, indices in splits.items():
        for side, lang in enumerate(("es", "en")):
            with open(args.out_dir / f"{split}.{lang}", "w") as handle:
                handle.writelines(pairs[i][side] + "\n" for i in indices)
    print(f"{len(pairs)} verse pairs: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))


if __name__ == "__main__":
    main()
