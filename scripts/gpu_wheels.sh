#!/usr/bin/env bash
# Download (here, with internet) the cp312 wheels that fairseq needs on the GPU machine
# (Python 3.12, torch 2.11 + torchaudio present, no package registry) into .whl/
# (git-ignored). There, `source benchmarks/gpu_fairseq_env.sh` installs them into
# /tmp/site and puts it on PYTHONPATH.
#
# What the GPU image lacks of fairseq's requirements (its numpy, regex, sacrebleu,
# tqdm, scikit-learn, packaging, pyyaml, torchaudio are there): fairseq-fixed itself
# (a prebuilt cp312 wheel, compiled against numpy 2 headers, so the image's numpy 2
# works), hydra-core, omegaconf, antlr4-python3-runtime (sdist only on PyPI: built into
# a pure-Python wheel here), bitarray, cffi + pycparser, editdistance (WER scoring),
# kaldi-native-fbank (filterbanks of the speech tests' data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.whl
mkdir -p "$OUT"
pin() { grep -E "^$1==" requirements.txt; }
PLATFORMS=(--python-version 3.12 --implementation cp --only-binary=:all:
           --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download -q --disable-pip-version-check --no-deps "${PLATFORMS[@]}" -d "$OUT" \
    "$(pin fairseq-fixed)" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin editdistance)" "$(pin kaldi-native-fbank)" \
    bitarray==3.12.3 cffi==2.1.1 pycparser==3.12
# antlr4-python3-runtime 4.9.3 (pinned by omegaconf 2.3 / hydra 1.3) exists only as an sdist.
ls "$OUT"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 \
    || "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$OUT" antlr4-python3-runtime==4.9.3
ls -1 "$OUT"
du -sh "$OUT"
