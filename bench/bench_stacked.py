"""Training M small models one by one (`qumos.train.fit`) vs all at once
(`qumos.stacked.fit_many`), interleaved in one run on one torch thread.

    python bench/bench_stacked.py                       # the table in the docs
    python bench/bench_stacked.py --models 5 15 --repeats 1 --victim-epochs 1   # quicker

Scales (digits-4, float32 as the attacker and the victim train):
- attacker: each model its own seeded random 22-sample subset of the training split
  (what a 5% budget gives), full batch (one step per epoch), selection on that subset,
  `--attacker-epochs` epochs (default 30, the evaluator's);
- victim: the whole training split, batch 32, selection on the validation split,
  `--victim-epochs` epochs (default 2; time grows linearly with epochs).
Models differ in seed (initialisation, batch order and subset), as restarts and seeds do.

For each (scale, design, M) both paths train the same M models from the same seeds,
alternating which goes first per repeat; the table shows the median wall and process-CPU
seconds (model construction included in both), the ratio one-by-one / batched, and how
far the two paths' trained models are apart: the largest difference of a test-set class
probability (dp) and of a model's test accuracy (dacc), and how many models selected the
same epoch (float32: the paths differ by rounding; see
docs/performance-batched-training.md). The load average is printed before and after:
the machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import numpy as np
import torch
from qumos.datasets import load_task
from qumos.model import DistributedQNN, predict_proba
from qumos.spec import Design, build_spec, validate_design
from qumos.stacked import fit_many
from qumos.train import TrainConfig, fit

DESIGNS = ("u3cu3:2-2-2", "rzz_ry:4-u3cu3:2R-rxyz_cnot:5R")


def parse_design(text: str) -> Design:
    """`block:depth[R]-...` as Design.short() writes it (R: the glue into that fragment
    re-uploads the features); a part without `block:` repeats the previous block, so
    `u3cu3:2-2-2` is three u3cu3 fragments of depth 2."""
    frags, block = [], None
    for i, part in enumerate(text.split("-")):
        if ":" in part:
            block, _, depth = part.partition(":")
        elif block is None:
            raise SystemExit(f"design {text!r}: fragment {i} has no block")
        else:
            depth = part
        frags.append(
            {"block": block, "depth": int(depth.rstrip("R")), "reupload": depth.endswith("R")}
        )
    return validate_design({"dataset": "digits", "task": 4, "fragments": frags})


def jobs(scale: str, m: int, data, args):
    """Per-model (x_train, y_train, x_val, y_val, cfg) for M models."""
    out = []
    for i in range(m):
        if scale == "attacker":
            rng = np.random.default_rng(10_007 + i)
            sub = rng.choice(len(data.train.y), args.attacker_samples, replace=False)
            x, y = data.train.x[sub], data.train.y[sub]
            out.append(
                (
                    x,
                    y,
                    x,
                    y,
                    TrainConfig(
                        epochs=args.attacker_epochs, lr=0.03, batch_size=len(y), seed=1000 + i
                    ),
                )
            )
        else:
            out.append(
                (
                    data.train.x,
                    data.train.y,
                    data.val.x,
                    data.val.y,
                    TrainConfig(epochs=args.victim_epochs, lr=0.03, batch_size=32, seed=i),
                )
            )
    return out


def run_one_by_one(spec, js):
    models = [DistributedQNN(spec, seed=j[4].seed) for j in js]
    res = [fit(mod, *j) for mod, j in zip(models, js)]
    return models, res


def run_batched(spec, js):
    models = [DistributedQNN(spec, seed=j[4].seed) for j in js]
    res = fit_many(models, *[[j[k] for j in js] for k in range(5)])
    return models, res


def timed(fn, *a):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*a)
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, nargs="+", default=[5, 15, 45])
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS))
    ap.add_argument(
        "--scales", nargs="+", default=["attacker", "victim"], choices=["attacker", "victim"]
    )
    ap.add_argument("--attacker-epochs", type=int, default=30)
    ap.add_argument("--attacker-samples", type=int, default=22)
    ap.add_argument("--victim-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per path (median)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_task("digits", 4, seed=0)
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, 1 thread; digits-4 train {len(data.train.y)}, "
        f"val {len(data.val.y)}"
    )
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        "| scale | design | M | one-by-one wall s | batched wall s | ratio | "
        "one-by-one CPU s | batched CPU s | CPU ratio | max abs dp | max dacc | "
        "same best epoch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scale in args.scales:
        for text in args.designs:
            spec = build_spec(parse_design(text))
            # warm-up of both paths: the C kernels, the compiled circuits, torch's caches
            warm = jobs(scale, 2, data, args)
            run_batched(spec, copy.deepcopy(warm))
            run_one_by_one(spec, copy.deepcopy(warm[:1]))
            for m in args.models:
                js = jobs(scale, m, data, args)
                times = {"one": [], "batched": []}
                for r in range(args.repeats):
                    order = ("one", "batched") if r % 2 == 0 else ("batched", "one")
                    for path in order:
                        fn = run_one_by_one if path == "one" else run_batched
                        (models, res), wall, cpu = timed(fn, spec, copy.deepcopy(js))
                        times[path].append((wall, cpu))
                        if path == "one":
                            ref_models, ref_res = models, res
                        else:
                            got_models, got_res = models, res
                dp, dacc = 0.0, 0.0
                for ma, mb in zip(got_models, ref_models):
                    pa, pb = predict_proba(ma, data.test.x), predict_proba(mb, data.test.x)
                    dp = max(dp, float((pa - pb).abs().max()))
                    acc = [float((p.argmax(1).numpy() == data.test.y).mean()) for p in (pa, pb)]
                    dacc = max(dacc, abs(acc[0] - acc[1]))
                same = sum(a.best_epoch == b.best_epoch for a, b in zip(got_res, ref_res))
                one_w = statistics.median(t[0] for t in times["one"])
                one_c = statistics.median(t[1] for t in times["one"])
                b_w = statistics.median(t[0] for t in times["batched"])
                b_c = statistics.median(t[1] for t in times["batched"])
                print(
                    f"| {scale} | {text} | {m} | {one_w:.2f} | {b_w:.2f} | "
                    f"{one_w / b_w:.1f}x | {one_c:.2f} | {b_c:.2f} | {one_c / b_c:.1f}x | "
                    f"{dp:.1e} | {dacc:.3f} | {same}/{m} |",
                    flush=True,
                )
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"# attacker: {args.attacker_samples} samples/model, full batch, "
        f"{args.attacker_epochs} epochs; victim: batch 32, {args.victim_epochs} epochs"
    )


if __name__ == "__main__":
    main()
