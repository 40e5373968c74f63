"""Write a fairseq speech-to-text dataset (``.npy`` log-mel features + TSV manifests).

fairseq's ``speech_to_text`` task reads ``.npy`` feature files directly, so no
torchaudio is needed: features are 80-dim Kaldi log-mel filterbanks computed with
``kaldi-native-fbank`` (the same Kaldi fbank that fairseq's own preparation scripts
use; dither 0, int16-scaled samples).

Layout written to ``out_dir``::

    fbank80/<id>.npy          (frames, 80) float32
    <split>.tsv               id, audio, n_frames, tgt_text, speaker
    dict.txt                  target vocabulary (words or characters), fairseq format
    config.yaml               input_feat_per_channel: 80, vocab_filename: dict.txt

Usable as a module (``write_dataset``) by recipes and tests.
"""

import csv
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np

NUM_MEL_BINS = 80


def log_mel_fbank(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """``samples`` (n,) float in [-1, 1] -> ``(frames, 80)`` float32 log-mel filterbank."""
    import kaldi_native_fbank as knf  # a pinned dependency; only data preparation needs it

    options = knf.FbankOptions()
    options.frame_opts.dither = 0.0
    options.frame_opts.samp_freq = sample_rate
    options.mel_opts.num_bins = NUM_MEL_BINS
    fbank = knf.OnlineFbank(options)
    # Kaldi expects int16-range samples.
    fbank.accept_waveform(sample_rate, (np.asarray(samples, dtype=np.float32) * 32768.0).tolist())
    fbank.input_finished()
    frames = [fbank.get_frame(i) for i in range(fbank.num_frames_ready)]
    return np.asarray(frames, dtype=np.float32)


def write_dataset(
    out_dir: Path,
    splits: Dict[str, Iterable[Tuple[str, np.ndarray, int, str]]],
    unit: str = "word",
) -> None:
    """Write ``splits`` (name -> iterable of ``(id, samples, sample_rate, text)``) to ``out_dir``.

    ``unit``: ``'word'`` (target tokens are the words of ``text``) or ``'char'``
    (characters, ``|`` for a space); the vocabulary comes from the ``train`` split.
    """
    out_dir = Path(out_dir)
    feature_dir = out_dir / "fbank80"
    feature_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    for split, utterances in splits.items():
        rows: List[Dict[str, str]] = []
        for utt_id, samples, sample_rate, text in utterances:
            features = log_mel_fbank(samples, sample_rate)
            path = feature_dir / f"{utt_id}.npy"
            np.save(path, features)
            tokens = tokenize(text, unit)
            if split == "train":
                counts.update(tokens.split())
            rows.append({"id": utt_id, "audio": str(path.resolve()), "n_frames": str(len(features)),
                         "tgt_text": tokens, "speaker": "spk0"})
        with open(out_dir / f"{split}.tsv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["id", "audio", "n_frames", "tgt_text", "speaker"],
                                    delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    with open(out_dir / "dict.txt", "w") as handle:
        for token, count in counts.most_common():
            handle.write(f"{token} {count}\n")
    (out_dir / "config.yaml").write_text(
        f"input_channels: 1\ninput_feat_per_channel: {NUM_MEL_BINS}\nvocab_filename: dict.txt\n"
    )


def tokenize(text: str, unit: str) -> str:
    """Target tokens of ``text`` as a space-separated string."""
    if unit == "word":
        return " ".join(text.split())
    if unit == "char":
        return " ".join("|" if ch == " " else ch for ch in " ".join(text.split()))
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
