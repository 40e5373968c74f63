"""Compare fairseq training logs of world size 1 and 2 (same total batch per update).

Reads the ``train_inner`` JSON records of two ``fairseq-train --log-format json
--log-interval 1`` logs, prints the per-update losses side by side and the
throughput (median words per second over the updates after warm-up), and exits
with status 1 if a loss of the first ``--updates`` updates differs by more than
``--tolerance`` (relative). The two runs see the same batches per update; they can
differ slightly because the two-GPU run draws the training hash planes once per
rank per update, where the one-GPU run with ``--update-freq 2`` draws them twice.

Usage: python benchmarks/distributed_compare.py ws1.log ws2.log [--csv out.csv]
"""

import argparse
import json
import re
import sys


def train_records(path):
    records = []
    with open(path) as log:
        for line in log:
            match = re.search(r"\| train_inner \| (\{.*\})", line)
            if match:
                records.append(json.loads(match.group(1)))
    if not records:
        raise SystemExit(f"{path}: no train_inner records (was it run with --log-format json --log-interval 1?)")
    return records


def words_per_second(records):
    """Total target words over total time of ``records``; an update lasts 1 / ups seconds."""
    records = [r for r in records if float(r["ups"]) > 0]  # fairseq logs 0 before a first interval
    if not records:
        raise SystemExit("no updates left after the warm-up: raise --max-update or lower --warmup")
    return sum(float(r["wpb"]) for r in records) / sum(1 / float(r["ups"]) for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("single", help="log of --distributed-world-size 1 --update-freq 2")
    parser.add_argument("double", help="log of --distributed-world-size 2 --update-freq 1")
    parser.add_argument("--updates", type=int, default=10, help="updates whose losses must match")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative loss tolerance")
    parser.add_argument("--warmup", type=int, default=5, help="updates left out of the throughput")
    parser.add_argument("--csv", help="write the per-update table here")
    args = parser.parse_args()

    single, double = train_records(args.single), train_records(args.double)
    rows, worst = [], 0.0
    print(f"{'update':>6} {'loss 1 GPU':>11} {'loss 2 GPUs':>12} {'rel diff':>9}")
    for a, b in zip(single, double):
        loss_a, loss_b = float(a["loss"]), float(b["loss"])
        diff = abs(loss_a - loss_b) / max(abs(loss_a), 1e-12)
        update = int(a["num_updates"])
        if update <= args.updates:
            worst = max(worst, diff)
        rows.append((update, loss_a, loss_b, diff, float(a["wps"]), float(b["wps"])))
        print(f"{update:>6} {loss_a:>11.4f} {loss_b:>12.4f} {diff:>9.4f}")
    # Per-update wps swings with batch shapes; words over time weighs each update by its length.
    wps = [words_per_second(log[args.warmup:len(rows)]) for log in (single, double)]
    print(f"\nthroughput (target words per second after {args.warmup} updates): 1 GPU {wps[0]:.0f}, "
          f"2 GPUs {wps[1]:.0f}, scaling {wps[1] / wps[0]:.2f}x")
    if args.csv:
        with open(args.csv, "w") as out:
            out.write("update,loss_1gpu,loss_2gpu,rel_diff,wps_1gpu,wps_2gpu\n")
            out.writelines(",".join(str(v) for v in row) + "\n" for row in rows)
    ok = worst <= args.tolerance
    print(f"first {args.updates} updates: worst relative loss difference {worst:.4f} "
          f"({'within' if ok else 'OUTSIDE'} tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
