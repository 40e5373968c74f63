"""End to end: ``fairseq-train --task language_modeling --arch clustered_transformer_lm`` and
``fairseq-eval-lm`` on a tiny generated character corpus, through the real command lines.

The sequences (64 tokens) are longer than twice the window (8), so training and evaluation
both read cluster summaries; the model must beat the uniform distribution after a few
updates and ``fairseq-eval-lm`` must load the checkpoint (``--user-dir`` on both).
"""

import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fairseq_command(name):
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed beside {sys.executable}")
        path = Path(found)
    return str(path)


def run(args, cwd, gpu=False):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def write_character_corpus(directory: Path) -> int:
    """Space-separated characters of random word sequences (fairseq-preprocess tokens);
    returns the number of distinct characters."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven cats sat on warm mats".split()
    symbols = set()
    for split, lines in (("train", 150), ("valid", 15), ("test", 15)):
        with open(directory / f"{split}.txt", "w") as handle:
            for _ in range(lines):
                text = "_".join(rng.choice(words) for _ in range(14))
                symbols.update(text)
                handle.write(" ".join(text) + "\n")
    return len(symbols)


def preprocessed_corpus(directory: Path) -> int:
    """The character corpus in ``directory``, binarised into ``directory/bin``; returns the
    number of distinct characters."""
    num_symbols = write_character_corpus(directory)
    run([fairseq_command("fairseq-preprocess"), "--only-source", "--trainpref", "train.txt",
         "--validpref", "valid.txt", "--testpref", "test.txt", "--destdir", "bin", "--workers", "1"], directory)
    return num_symbols


def test_train_and_eval_lm(tmp_path):
    num_symbols = preprocessed_corpus(tmp_path)
    user_dir = str(REPO / "fairseq_clustered")
    train_log = run([
        fairseq_command("fairseq-train"), "bin", "--user-dir", user_dir, "--task", "language_modeling",
        "--arch", "clustered_transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
        "--decoder-input-dim", "32", "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2", "--tokens-per-sample", "64",
        "--sample-break-mode", "none", "--clustered-window", "8", "--clustered-num-clusters", "4",
        "--clustered-bits", "16", "--clustered-iterations", "3", "--max-tokens", "512", "--max-update", "8",
        "--optimizer", "adam", "--lr", "3e-3", "--save-dir", "checkpoints", "--no-epoch-checkpoints",
        "--no-last-checkpoints", "--log-format", "simple", "--log-interval", "1", "--cpu", "--seed", "3",
        "--num-workers", "0",
    ], tmp_path)
    assert "layer 0 causal_clustered, layer 1 causal_clustered (window=8, C=4" in train_log
    assert (tmp_path / "checkpoints" / "checkpoint_best.pt").exists()

    eval_log = run([
        fairseq_command("fairseq-eval-lm"), "bin", "--user-dir", user_dir,
        "--path", "checkpoints/checkpoint_best.pt", "--tokens-per-sample", "64", "--max-tokens", "512",
        "--gen-subset", "test", "--cpu", "--num-workers", "0",
    ], tmp_path)
    match = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", eval_log)
    assert match, eval_log[-2000:]
    bits_per_symbol = float(match.group(1))
    # Uniform over the characters seen is log2(num_symbols) bits; a few updates must beat it.
    assert math.isfinite(bits_per_symbol) and bits_per_symbol < math.log2(num_symbols)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 language-model training)")
def test_train_and_eval_lm_on_the_gpu(tmp_path):
    """--fp16 on the GPU: head dim 16 and window 16 take the one-kernel Triton path;
    nothing may fall back to the reference, the loss must fall, eval-lm must run there."""
    from test_fairseq_cli import assert_trained_on_the_kernels

    num_symbols = preprocessed_corpus(tmp_path)
    user_dir = str(REPO / "fairseq_clustered")
    train_log = run([
        fairseq_command("fairseq-train"), "bin", "--user-dir", user_dir, "--task", "language_modeling",
        "--arch", "clustered_transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
        "--decoder-input-dim", "32", "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64",
        "--decoder-attention-heads", "2", "--tokens-per-sample", "128", "--sample-break-mode", "none",
        "--clustered-window", "16", "--clustered-num-clusters", "4", "--clustered-iterations", "3",
        "--max-tokens", "1024", "--max-update", "12", "--optimizer", "adam", "--lr", "3e-3", "--fp16",
        "--save-dir", "checkpoints", "--no-epoch-checkpoints", "--no-last-checkpoints", "--log-format", "simple",
        "--log-interval", "1", "--seed", "3", "--num-workers", "0",
    ], tmp_path, gpu=True)
    assert "layer 0 causal_clustered, layer 1 causal_clustered (window=16, C=4" in train_log
    assert_trained_on_the_kernels(train_log, 12)

    eval_log = run([
        fairseq_command("fairseq-eval-lm"), "bin", "--user-dir", user_dir, "--fp16",
        "--path", "checkpoints/checkpoint_best.pt", "--tokens-per-sample", "128", "--max-tokens", "1024",
        "--gen-subset", "test", "--num-workers", "0",
    ], tmp_path, gpu=True)
    match = re.search(r"Loss \(base 2\): ([0-9.]+)", eval_log)
    assert match and float(match.group(1)) < math.log2(num_symbols), eval_log[-2000:]
