# Source on the GPU machine (no package registry) to make fairseq importable there:
#   source benchmarks/gpu_fairseq_env.sh
# Installs the wheels that scripts/gpu_wheels.sh downloaded into .whl/ (carry .whl with
# the run) into /tmp/site, puts it and the checkout on PYTHONPATH and the fairseq-*
# commands on PATH. Fails (returns non-zero) if fairseq does not import afterwards.
_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$_repo"/.whl/*.whl || return 1
export PYTHONPATH="/tmp/site:$_repo${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"
python3 -c "import fairseq, fairseq_clustered.models; print('fairseq', fairseq.__version__, 'ready')" || return 1
