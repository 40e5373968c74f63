#!/usr/bin/env bash
# Lloyd's kernel on several branches against the working tree, in one GPU call: each branch is
# built from its own copy of the tree beside the working tree's build, then each runs the Lloyd
# tests, benchmarks/lloyd_phases.py --split-update (its own copy of the script: the stamps follow
# its kernel) and the clustered forward's profile at 2k, so that every number compares builds on
# one machine.
#
#   bash benchmarks/gpu_compare_branches.sh prepare BRANCH...   # here: the branches' trees into .branches/
#   bash benchmarks/gpu_compare_branches.sh measure             # on the GPU machine (OUT: where logs go)
#
# `prepare` leaves out examples/, docs/ and the plots in benchmarks/results/ (7 of its 8.5 MB; the
# text and CSV stay: a test reads a sweep there), so that the trees stay small:
# .branches/ is ignored by git, so carry it to the GPU machine (the device tool's `carry`, beside
# the extension if that travels too). `measure` builds the working tree too unless its extension is
# already there (carried), and skips a tree whose build failed. PHASES_ARGS / PROFILE_LENGTH change
# what is timed.
set -uo pipefail
cd "$(dirname "$0")/.."
TREES=.branches

if [ "${1:-}" = prepare ]; then
  shift
  [ $# -gt 0 ] || { echo "usage: $0 prepare BRANCH..." >&2; exit 2; }
  rm -rf "$TREES"
  for branch in "$@"; do
    git rev-parse --verify --quiet "$branch^{commit}" >/dev/null || { echo "no branch $branch" >&2; exit 2; }
    dir="$TREES/${branch//\//_}"
    mkdir -p "$dir"
    git archive "$branch" | tar -x -C "$dir"
    rm -rf "$dir/examples" "$dir/docs"
    rm -f "$dir"/benchmarks/results/*.png
    echo "$branch -> $dir ($(git rev-parse --short "$branch"))"
  done
  du -sh "$TREES"
  exit 0
fi
[ "${1:-}" = measure ] || { echo "usage: $0 prepare BRANCH... | measure" >&2; exit 2; }

OUT=${OUT:-/tmp/fcl_compare_branches}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
ROOT=$PWD
trees=(.)
for dir in "$TREES"/*/; do [ -d "$dir" ] && trees+=("${dir%/}"); done
name() { [ "$1" = . ] && echo working-tree || basename "$1"; }
jobs=$(( 16 / ${#trees[@]} ))
jobs=$(( jobs < 2 ? 2 : jobs ))

echo "== builds (${#trees[@]} trees, MAX_JOBS=$jobs each)"
for tree in "${trees[@]}"; do
  n=$(name "$tree")
  mkdir -p "$OUT/$n"
  if [ "$tree" = . ] && ls fairseq_clustered/_C*.so >/dev/null 2>&1; then
    echo "$n: extension carried" >"$OUT/$n/build_stage.log"
    continue
  fi
  ( cd "$tree" && MAX_JOBS=$jobs STAGES=build OUT="$OUT/$n/build" bash benchmarks/gpu_check.sh >"$OUT/$n/build_stage.log" 2>&1
    echo "build rc=$?" >>"$OUT/$n/build_stage.log" ) &
done
wait
built=()
for tree in "${trees[@]}"; do
  n=$(name "$tree")
  if grep -q "build rc=[1-9]" "$OUT/$n/build_stage.log"; then
    echo "$n: build FAILED"; tail -15 "$OUT/$n/build_stage.log"
  else
    echo "$n: $(grep -h -E "built in|carried" "$OUT/$n/build_stage.log" | head -1)"; built+=("$tree")
  fi
done

echo "== Lloyd tests"
for tree in "${built[@]}"; do
  n=$(name "$tree")
  ( cd "$tree" && PYTHONPATH=$PWD timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
      -k "(lloyd or cluster_queries or cluster_order) and not sweep_cpu" >"$OUT/$n/lloyd_tests.log" 2>&1 ) &
done
wait
for tree in "${built[@]}"; do echo "$(name "$tree"): $(tail -1 "$OUT/$(name "$tree")/lloyd_tests.log")"; done

# The stamped copies build at once (about 75 s each, CPU), then run one at a time (GPU timing).
echo "== lloyd_phases.py --split-update ${PHASES_ARGS:=--rows 4x8 --lengths 1024,2048,4096 --cluster-blocks 1,3}"
for tree in "${built[@]}"; do
  n=$(name "$tree")
  ( cd "$tree" && PYTHONPATH=$PWD timeout 400 $PY benchmarks/lloyd_phases.py --split-update --build-only \
      --build-dir "/tmp/fcl_phases_build/$n" >"$OUT/$n/phases_build.log" 2>&1 ) &
done
wait
for tree in "${built[@]}"; do
  n=$(name "$tree")
  echo "-- $n"
  ( cd "$tree" && PYTHONPATH=$PWD timeout 300 $PY benchmarks/lloyd_phases.py --split-update --build-dir "/tmp/fcl_phases_build/$n" \
      $PHASES_ARGS 2>&1 | tee "$OUT/$n/phases.log" | grep -v "^building" | tail -8 )
done

echo "== the clustered forward's profile at ${PROFILE_LENGTH:=2048}"
for tree in "${built[@]}"; do
  n=$(name "$tree")
  echo "-- $n"
  ( cd "$tree" && PYTHONPATH=$PWD timeout 120 $PY benchmarks/bench_attention.py --graph --methods sdpa,clustered \
      --lengths "$PROFILE_LENGTH" --repeats 30 --profile-forward "$PROFILE_LENGTH" --out "$OUT/$n/profile" 2>&1 \
      | tee "$OUT/$n/profile.log" | grep -E "profile|lloyd|^ +$PROFILE_LENGTH " )
done
cd "$ROOT"
