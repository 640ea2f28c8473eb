"""How often the orchestrator's integrity canaries catch a lying provider.

Three real provider apps and the orchestrator in process (httpx ASGITransport); provider-b
sits behind a tampering proxy (tests/service/tamper.py) that adds `delta` to the outputs of
a random `fraction` of the rows it answers. For each (canaries per call, delta, fraction)
the bench sends N predict requests of B images and reports the share refused with 502
"integrity check failed" and the share answered 200 but wrong (an undetected lie).

    python bench/bench_tamper.py                       # ~1-2 min on a busy 2-core box
    python bench/bench_tamper.py --requests 40 --json-out results/reliability/tamper.json

Theory for a lie above tolerance: a call is caught with p = 1 - (1 - fraction)^k.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support: the in-process services and the liar


def small_artifact(path: Path):
    from qumos.artifact import load_artifact, save_artifact
    from qumos.datasets import load_task
    from qumos.spec import design_from_flags
    from qumos.train import TrainConfig, train_design

    if (path / "model.json").is_file():
        return load_artifact(path)
    design = design_from_flags(dataset="digits", task=4, fragments="2-2-2")
    spec, _, acc = train_design(
        design, load_task("digits", 4, seed=0), TrainConfig(epochs=4, seed=0), name="digits4"
    )
    save_artifact(spec, path, metrics={"test_acc": acc})
    return load_artifact(path)


async def run(args) -> list[dict]:
    from qumos.datasets import load_task
    from qumos.deploy import make_canaries

    from tests.support.services import company_stack, deploy_inprocess
    from tests.support.tamper import TamperingTransport

    tmp = Path(tempfile.mkdtemp(prefix="bench-tamper-"))
    art = small_artifact(Path(args.artifact) if args.artifact else tmp / "model")
    data = load_task("digits", 4, seed=0)
    box = {}

    def liar(app):
        box["t"] = TamperingTransport(app, 0.0, 0.0, seed=args.seed)
        return box["t"]

    rows = []
    async with company_stack(tmp, art, {"provider-b": liar}) as (c, admin, prov):
        await deploy_inprocess(c, admin, prov, art)
        canaries = make_canaries(art.spec, data.train.raw[: args.pool])
        r = await c.put(
            "/v1/models/digits4/canaries",
            content=canaries.model_dump_json(),
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert r.status_code == 200, r.text
        settings = c._transport.app.state.orchestrator.settings
        rng = np.random.default_rng(args.seed)
        batches = [
            data.test.raw[rng.choice(len(data.test.raw), args.batch, replace=False)]
            for _ in range(args.requests)
        ]
        honest = []
        for b in batches:
            r = await c.post("/v1/models/digits4/predict", json={"instances": b.tolist()})
            assert r.status_code == 200, r.text
            honest.append(np.array(r.json()["probabilities"]))
        for k in args.canaries:
            settings.canaries_per_call = k
            for delta in args.deltas:
                for frac in args.fractions:
                    box["t"].delta, box["t"].fraction = delta, frac
                    caught = wrong = ok = 0
                    for b, want in zip(batches, honest):
                        r = await c.post(
                            "/v1/models/digits4/predict", json={"instances": b.tolist()}
                        )
                        if (
                            r.status_code == 502
                            and r.json()["error"]["type"] == "integrity_check_failed"
                        ):
                            caught += 1
                        elif r.status_code == 200:
                            same = np.allclose(r.json()["probabilities"], want, atol=1e-6)
                            ok += same
                            wrong += not same
                        else:
                            raise AssertionError(r.text)
                    n = len(batches)
                    theory = 1 - (1 - frac) ** k if delta > 1e-6 else 0.0  # exact tolerance
                    rows.append(
                        {
                            "canaries_per_call": k,
                            "delta": delta,
                            "fraction": frac,
                            "requests": n,
                            "detected": caught / n,
                            "wrong_served": wrong / n,
                            "theory": theory,
                        }
                    )
                    print(
                        f"k={k:3d} delta={delta:<6g} fraction={frac:<5g} detected "
                        f"{caught / n:5.2f} (theory {theory:4.2f})  "
                        f"answers altered {wrong / n:5.2f}",
                        flush=True,
                    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="predict calls per cell")
    ap.add_argument("--batch", type=int, default=16, help="images per call")
    ap.add_argument("--pool", type=int, default=64, help="canaries registered per fragment")
    ap.add_argument("--canaries", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--deltas", type=float, nargs="+", default=[1e-7, 1e-3, 0.05])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.1, 0.5, 1.0])
    ap.add_argument("--artifact", default=None, help="artifact dir (default: train a tiny one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    rows = asyncio.run(run(args))
    print(
        "\n| canaries/call | delta | tampered rows | detected | theory 1-(1-f)^k | "
        "answers altered |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['canaries_per_call']} | {r['delta']:g} | {r['fraction']:g} | "
            f"{r['detected']:.2f} | {r['theory']:.2f} | {r['wrong_served']:.2f} |"
        )
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
