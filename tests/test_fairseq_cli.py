"""End to end through fairseq's real command lines (subprocesses) on tiny generated data.

One translation dataset (a copy-and-uppercase task) is preprocessed once per module
and shared; each test trains a 2-layer model for a few updates. The oracle is
fairseq itself: its CLI must accept our models, options, checkpoints and overrides,
and the logs must show which attention each encoder layer used.
"""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq", reason="fairseq is not installed")

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_clustered")
sys.path.insert(0, str(REPO / "examples" / "speech_to_text"))
import s2t_data  # noqa: E402

# Small enough for a 2-core CPU; C=4 < sentence lengths (4..12), so clustering really runs.
TINY_CLUSTERED = ["--clustered-num-clusters", "4", "--clustered-iterations", "3", "--clustered-topk", "3"]
TRAIN_COMMON = [
    "--optimizer", "adam", "--lr", "2e-3", "--max-tokens", "2000", "--no-progress-bar",
    "--log-format", "simple", "--log-interval", "5", "--seed", "3", "--num-workers", "0",
    "--user-dir", USER_DIR,
]


def fairseq(command, *args, cwd, check=True):
    """Run ``fairseq-<command>`` (or ``python -m fairseq_cli.<command>``) and return its log."""
    script = Path(sys.executable).parent / f"fairseq-{command.replace('_', '-')}"
    argv = [str(script)] if script.exists() else [sys.executable, "-m", f"fairseq_cli.{command}"]
    result = subprocess.run(argv + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    log = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"fairseq-{command} failed ({result.returncode}):\n{log[-4000:]}")
    return log if check else (result.returncode, log)


def encoder_attention(log):
    """The per-layer attention variants the model logged when it was built (last build)."""
    lines = re.findall(r"encoder self-attention: (.*)", log)
    assert lines, "the model did not log its encoder attention"
    return re.findall(r"layer \d+ (\w+)", lines[-1])


@pytest.fixture(scope="module")
def translation_data(tmp_path_factory):
    """A preprocessed copy-and-uppercase task: 'w3 w7' -> 'W3 W7'."""
    root = tmp_path_factory.mktemp("translation")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(16)]
    for split, size in [("train", 300), ("valid", 20), ("test", 20)]:
        with open(root / f"{split}.src", "w") as src, open(root / f"{split}.tgt", "w") as tgt:
            for _ in range(size):
                sentence = [rng.choice(words) for _ in range(rng.randint(4, 12))]
                src.write(" ".join(sentence) + "\n")
                tgt.write(" ".join(word.upper() for word in sentence) + "\n")
    fairseq("preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", "train",
            "--validpref", "valid", "--testpref", "test", "--destdir", "bin", "--workers", "1", cwd=root)
    return root


@pytest.fixture(scope="module")
def clustered_run(translation_data):
    """A clustered_transformer_tiny trained 20 updates (shared by several tests)."""
    log = fairseq("train", "bin", "--arch", "clustered_transformer_tiny", *TINY_CLUSTERED,
                  *TRAIN_COMMON, "--max-update", "20", "--save-dir", "ckpt_clustered",
                  cwd=translation_data)
    return translation_data, log


def generate(root, checkpoint, *extra):
    return fairseq("generate", "bin", "--user-dir", USER_DIR, "--path", checkpoint, "--beam", "3",
                   "--batch-size", "32", "--gen-subset", "test", "--max-len-a", "1.2", "--max-len-b", "4",
                   *extra, cwd=root)


def test_train_and_generate_with_beam_search_and_bleu(clustered_run):
    root, train_log = clustered_run
    assert encoder_attention(train_log) == ["clustered", "clustered"]
    assert "num_updates 20" in train_log
    log = generate(root, "ckpt_clustered/checkpoint_best.pt")
    assert encoder_attention(log) == ["clustered", "clustered"]
    assert re.search(r"Generate test with beam=3: BLEU4 = \d+\.\d+", log)


def test_checkpoints_load_with_torch_default_weights_only(clustered_run):
    import fairseq_clustered  # noqa: F401  (registers the safe globals)

    root, _ = clustered_run
    state = torch.load(root / "ckpt_clustered" / "checkpoint_last.pt")  # weights_only=True default
    assert "encoder.layers.0.self_attn.q_proj.weight" in state["model"]


def test_resume_from_checkpoint_last(clustered_run):
    root, _ = clustered_run
    import shutil

    shutil.copytree(root / "ckpt_clustered", root / "ckpt_resume")
    log = fairseq("train", "bin", "--arch", "clustered_transformer_tiny", *TINY_CLUSTERED,
                  *TRAIN_COMMON, "--max-update", "25", "--save-dir", "ckpt_resume", cwd=root)
    assert re.search(r"Loaded checkpoint \S*ckpt_resume/checkpoint_last.pt \(epoch \d+ @ 20 updates\)", log)
    assert "num_updates 25" in log


def test_model_overrides_both_ways(clustered_run):
    root, _ = clustered_run
    # a clustered checkpoint evaluated with exact attention ...
    log = generate(root, "ckpt_clustered/checkpoint_last.pt", "--model-overrides",
                   "{'clustered_attention': 'full'}")
    assert encoder_attention(log) == ["full", "full"] and "BLEU4" in log
    # ... and a plain fairseq transformer checkpoint evaluated with (improved) clustered attention:
    # the parameters are fairseq's own, so it loads strictly into our model.
    fairseq("train", "bin", "--arch", "transformer_tiny", *TRAIN_COMMON, "--max-update", "5",
            "--save-dir", "ckpt_fairseq", cwd=root)
    overrides = ("{'_name': 'clustered_transformer_tiny', 'arch': 'clustered_transformer_tiny', "
                 "'clustered_attention': 'improved', 'clustered_num_clusters': 3, 'clustered_layers': '1'}")
    log = generate(root, "ckpt_fairseq/checkpoint_last.pt", "--model-overrides", overrides)
    assert encoder_attention(log) == ["full", "improved"] and "BLEU4" in log


def test_leak_guard_refuses_clustered_decoder_attention(translation_data):
    code, log = fairseq("train", "bin", "--arch", "clustered_transformer_tiny", *TRAIN_COMMON,
                        "--max-update", "1", "--save-dir", "ckpt_leak", "--clustered-decoder-attention",
                        "clustered", cwd=translation_data, check=False)
    assert code != 0
    assert "--clustered-decoder-attention=clustered: clustered attention at a decoder site" in log
    assert "would leak future target tokens" in log


def test_hydra_train_from_yaml(translation_data):
    log = fairseq("hydra_train", "--config-dir", REPO / "examples" / "translation" / "config",
                  "--config-name", "clustered_transformer_tiny", f"task.data={translation_data / 'bin'}",
                  f"common.user_dir={USER_DIR}", "common.seed=5", "optimization.max_update=4",
                  f"checkpoint.save_dir={translation_data / 'ckpt_hydra'}", cwd=translation_data)
    assert encoder_attention(log) == ["improved", "improved"]
    assert "seed=5)" in log  # the hash planes follow common.seed through ${common.seed}
    assert "num_updates 4" in log
    log = generate(translation_data, "ckpt_hydra/checkpoint_last.pt")
    assert encoder_attention(log) == ["improved", "improved"] and "BLEU4" in log


def test_masked_lm_training_step(translation_data):
    root = translation_data
    fairseq("preprocess", "--only-source", "--trainpref", "train.src", "--validpref", "valid.src",
            "--destdir", "bin_mlm", "--workers", "1", cwd=root)
    log = fairseq("train", "bin_mlm", "--task", "masked_lm", "--criterion", "masked_lm",
                  "--arch", "clustered_roberta_tiny", "--clustered-attention", "improved", *TINY_CLUSTERED,
                  "--tokens-per-sample", "32", "--sample-break-mode", "none", *TRAIN_COMMON,
                  "--required-batch-size-multiple", "1",  # the tiny valid set has 6 blocks
                  "--max-update", "3", "--save-dir", "ckpt_mlm", cwd=root)
    assert encoder_attention(log) == ["improved", "improved"]
    assert "num_updates 3" in log
    import fairseq_clustered  # noqa: F401

    torch.load(root / "ckpt_mlm" / "checkpoint_last.pt")


def tone_utterances(rng, count, prefix, words, sample_rate=16000):
    """Synthetic speech: each word is a 0.12 s tone of its own pitch."""
    for index in range(count):
        sentence = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        pieces = []
        for word in sentence:
            t = np.arange(int(0.12 * sample_rate)) / sample_rate
            pieces.append(0.3 * np.sin(2 * np.pi * (300 + 150 * words.index(word)) * t))
        yield f"{prefix}{index}", np.concatenate(pieces), sample_rate, " ".join(sentence)


# A smaller clustered_s2t_transformer_s for the speech tests.
S2T_TINY = ["--arch", "clustered_s2t_transformer_s", "--encoder-layers", "2", "--decoder-layers", "1",
            "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128", "--encoder-attention-heads", "4",
            "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128", "--decoder-attention-heads", "4",
            "--conv-channels", "64", "--clustered-num-clusters", "4", "--clustered-iterations", "3"]
S2T_TASK = ["--config-yaml", "config.yaml", "--task", "speech_to_text", "--train-subset", "train",
            "--valid-subset", "valid", "--criterion", "label_smoothed_cross_entropy"]


def write_tone_dataset(directory, seed, splits):
    """Tone utterances of six words, ``splits`` [(name, size)], as s2t_data's .npy filterbanks."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    s2t_data.write_dataset(directory, {split: list(tone_utterances(rng, size, split, words))
                                       for split, size in splits})


def test_speech_to_text_on_npy_filterbanks_with_wer(tmp_path):
    write_tone_dataset(tmp_path, 0, [("train", 60), ("valid", 8), ("test", 8)])
    log = fairseq("train", tmp_path, *S2T_TASK, *S2T_TINY, "--optimizer", "adam", "--lr", "2e-3",
                  "--max-tokens", "20000", "--max-update", "6", "--save-dir", tmp_path / "ckpt",
                  "--no-progress-bar", "--seed", "3", "--num-workers", "0", "--user-dir", USER_DIR, cwd=tmp_path)
    assert encoder_attention(log) == ["clustered", "clustered"]
    assert "num_updates 6" in log
    log = fairseq("generate", tmp_path, "--config-yaml", "config.yaml", "--task", "speech_to_text",
                  "--gen-subset", "test", "--path", tmp_path / "ckpt" / "checkpoint_last.pt", "--beam", "2",
                  "--max-tokens", "20000", "--scoring", "wer", "--user-dir", USER_DIR, cwd=tmp_path)
    assert re.search(r"Generate test with beam=2: WER: \d+\.\d+", log)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16/bf16 training steps)")
FALLBACK = "runs the reference implementation on the GPU"  # cuda_kernels.warn_fallback's message
CAPTURE_FAILED = "cannot be captured in a CUDA graph"  # graph_cache's warning


def train_losses(log):
    """The training losses fairseq logged, in order (``--log-interval 1``: one per update).

    fairseq-train's logger writes ``| train_inner | epoch 001: ... loss=5.083, ...``;
    fairseq-hydra-train's (hydra's job logging) ``[train_inner][INFO] - epoch 001: ... loss=5.083, ...``.
    """
    losses = [float(x) for x in re.findall(r"(?:\| train_inner \||\[train_inner\]).*? loss=(\d+\.\d+)", log)]
    assert losses and all(np.isfinite(losses)), log[-2000:]
    return losses


def assert_trained_on_the_kernels(log, updates):
    """The run used the extension's kernels (nothing fell back to the reference, and the
    extension is built here) and its loss fell over ``updates`` updates."""
    from fairseq_clustered.ops import cuda_backend

    assert cuda_backend.load(), f"the CUDA kernels did not load: {cuda_backend.status()}"
    assert FALLBACK not in log, log[-3000:]
    assert CAPTURE_FAILED not in log, log[-3000:]
    assert f"num_updates {updates}" in log
    losses = train_losses(log)
    assert losses[-1] < losses[0], f"the loss did not fall: {losses}"


def test_train_losses_reads_both_log_formats():
    cli = ("2026-11-24 08:59:30 | INFO | train_inner | epoch 001:      1 / 2 loss=5.083, nll_loss=5.07, wps=0\n"
           "2026-11-24 08:59:30 | INFO | train | epoch 001 | loss 5.085 | num_updates 2\n"
           "2026-11-24 08:59:31 | INFO | train_inner | epoch 002:      1 / 2 loss=4.5, nll_loss=4.49, wps=7.1\n")
    hydra = ("[2026-11-24 08:59:30,430][train_inner][INFO] - epoch 001:      1 / 2 loss=5.083, nll_loss=5.07\n"
             "[2026-11-24 08:59:30,570][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 5.011\n"
             "[2026-11-24 08:59:30,707][train_inner][INFO] - epoch 002:      1 / 2 loss=5.01, nll_loss=4.991\n")
    assert train_losses(cli) == [5.083, 4.5]
    assert train_losses(hydra) == [5.083, 5.01]
    with pytest.raises(AssertionError):
        train_losses("[2026-11-24 08:59:30,570][valid][INFO] - epoch 001 | loss 5.011\n")


@needs_cuda
def test_gpu_training_step_fp16(translation_data):
    log = fairseq("train", "bin", "--arch", "clustered_transformer_tiny", *TINY_CLUSTERED, *TRAIN_COMMON,
                  "--fp16", "--max-update", "12", "--log-interval", "1", "--save-dir", "ckpt_gpu_fp16",
                  cwd=translation_data)
    assert encoder_attention(log) == ["clustered", "clustered"]
    assert_trained_on_the_kernels(log, 12)


@needs_cuda
def test_gpu_training_step_bf16(translation_data):
    # fairseq 0.12's command-line --bf16 means "on a TPU" (it sets --tpu); on a GPU, bf16
    # training goes through the hydra config, where common.bf16 does not imply common.tpu.
    # The recipe's improved variant on padded batches, with attention dropout: its Triton path.
    log = fairseq("hydra_train", "--config-dir", REPO / "examples" / "translation" / "config",
                  "--config-name", "clustered_transformer_tiny", f"task.data={translation_data / 'bin'}",
                  f"common.user_dir={USER_DIR}", "common.bf16=true", "optimization.max_update=12",
                  "+model.attention_dropout=0.1",
                  "common.log_interval=1", f"checkpoint.save_dir={translation_data / 'ckpt_gpu_bf16'}",
                  cwd=translation_data)
    assert encoder_attention(log) == ["improved", "improved"]
    assert_trained_on_the_kernels(log, 12)


@needs_cuda
def test_gpu_speech_to_text_training_fp16(tmp_path):
    """``clustered_s2t_transformer_s`` (a smaller copy) with --fp16 on the GPU kernels."""
    write_tone_dataset(tmp_path, 1, [("train", 60), ("valid", 8)])
    log = fairseq("train", tmp_path, *S2T_TASK, *S2T_TINY, "--optimizer", "adam", "--lr", "2e-3", "--fp16", "--max-tokens", "20000", "--max-update", "12",
                  "--log-format", "simple", "--log-interval", "1", "--disable-validation", "--no-save",
                  "--seed", "3", "--num-workers", "0", "--user-dir", USER_DIR, cwd=tmp_path)
    assert encoder_attention(log) == ["clustered", "clustered"]
    assert_trained_on_the_kernels(log, 12)
