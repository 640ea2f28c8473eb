"""The defences of the public API (issue 16), measured. Every row of docs/defenses.md.

    python bench/bench_defenses.py monitor   [--seeds 0,1,2]      PRADA: false positives
                                                                  over benign keys, queries
                                                                  until each attacker is flagged
    python bench/bench_defenses.py clone     [--seeds 0] [--queries 20,100,400]
                                                                  strongest `queries` and
                                                                  `breach+queries` attackers vs
                                                                  each defence and combined
    python bench/bench_defenses.py logbased  [--seeds 0,1]        log self-training with and
                                                                  without input hiding
    python bench/bench_defenses.py batching  [--seconds 20]       live: 32 batch-1 clients,
                                                                  batching off vs on; p50 at 1
    python bench/bench_defenses.py insider   [--queries 20]       live: the insider's row
                                                                  attribution, batching off/on
    python bench/bench_defenses.py cost                           live: honest users' accuracy
                                                                  and p50 with the defences

Victim: the security engine's design on digits-4 (`--design`, 10 epochs, seed s); the
in-process attacks use `qumos.attack` at the converged default budget (75 steps x 24
restarts; `--attack-epochs/--attack-restarts` for a quicker, weaker run, recorded in the
JSON). One torch thread. Results: one JSON
per section in results/defenses/ (with the load average), and a markdown table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT))
OUT = ROOT / "results" / "defenses"
DESIGN = "rzz_ry:4-u3cu3:2R-rxyz_cnot:5R"
ATTACK: dict = {}  # set by main: the attacker's training budget


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _save(name: str, rec: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rec = {"section": name, "load_end": _load(), **rec}
    from qumos.files import atomic_write  # a resumed section never finds half a file

    atomic_write(OUT / f"{name}.json", (json.dumps(rec, indent=1, default=float) + "\n").encode())


def _victim(design: str, seed: int, epochs: int = 10):
    from qumos.datasets import load_task
    from qumos.spec import parse_short_design
    from qumos.train import TrainConfig, train_design

    data = load_task("digits", 4, seed=seed)
    spec, _, acc = train_design(
        parse_short_design(design), data, TrainConfig(epochs=epochs, seed=seed), name="victim"
    )
    return spec, data, acc


def _ms(v) -> list:
    v = [x for x in v if x is not None and x == x]
    return [float(np.mean(v)), float(np.std(v))] if v else [None, None]


# ----- synthetic query streams --------------------------------------------------------------
def jbda(data, n: int, seeds: int, lam: float, rng) -> np.ndarray:
    """Jacobian-style synthetic queries (Papernot et al.; random signs in place of the
    substitute's gradient): `seeds` natural images, then each round every image so far
    stepped by +-lam on every pixel."""
    x = list(data.train.raw[:seeds])
    while len(x) < n:
        x += [np.clip(v + lam * rng.choice([-1, 1], v.shape), 0, 16) for v in x]
    return np.asarray(x[:n])


def augmented(data, n: int, seeds: int, rng) -> np.ndarray:
    """Augmented queries: one of `seeds` natural images, shifted by up to a pixel, plus
    Gaussian pixel noise (sigma 1 of 16)."""
    idx = rng.integers(seeds, size=n)
    img = data.train.raw[idx].reshape(-1, 8, 8)
    img = np.stack([np.roll(im, rng.integers(-1, 2), axis=rng.integers(0, 2)) for im in img])
    return np.clip(img.reshape(n, 64) + rng.normal(0, 1, (n, 64)), 0, 16)


def noise(n: int, rng) -> np.ndarray:
    return rng.uniform(0, 16, (n, 64))


def _classes(spec, raw) -> np.ndarray:
    from qumos.chain import preprocess
    from qumos.model import DistributedQNN, predict_proba

    return predict_proba(DistributedQNN(spec), preprocess(raw, spec.preprocess)).argmax(1).numpy()


# ----- monitor -------------------------------------------------------------------------------
def section_monitor(args) -> dict:
    from qumos.attack.holdings import attacker_data
    from qumos.defense.monitor import MonitorConfig, queries_until_flagged

    cfg = MonitorConfig()
    rows, benign = [], []
    for s in args.seed_list:
        spec, data, _ = _victim(args.design, s)
        rng = np.random.default_rng(s)
        allraw = np.concatenate([data.test.raw, data.train.raw])
        # benign keys: the test split then the train split (576 images each), natural
        # order (2 keys) and random order (2 keys): 2,304 queries per seed
        for k, order in enumerate(["natural", "natural-test-only", "random", "random"]):
            if order == "natural":
                raw = allraw
            elif order == "natural-test-only":
                raw = data.test.raw
            else:
                raw = allraw[rng.permutation(len(allraw))]
            at = queries_until_flagged(raw, _classes(spec, raw), cfg)
            benign.append(
                {"seed": s, "key": k, "order": order, "queries": len(raw), "flagged_at": at}
            )
        own = attacker_data(data, 0.05, s)
        streams = {
            "natural (the queries attacker's own images)": data.train.raw[own.queries(data, 400)],
            "JBDA 10 seeds, step 1": jbda(data, 400, 10, 1.0, rng),
            "JBDA 10 seeds, step 0.5": jbda(data, 400, 10, 0.5, rng),
            "JBDA 40 seeds, step 1": jbda(data, 400, 40, 1.0, rng),
            "augmented 10 seeds (shift + noise)": augmented(data, 400, 10, rng),
            "augmented 40 seeds (shift + noise)": augmented(data, 400, 40, rng),
            "uniform noise": noise(400, rng),
        }
        for name, raw in streams.items():
            rows.append(
                {
                    "seed": s,
                    "attacker": name,
                    "flagged_at": queries_until_flagged(raw, _classes(spec, raw), cfg),
                }
            )
    fp = sum(b["flagged_at"] is not None for b in benign)
    return {
        "config": cfg.model_dump(),
        "seeds": args.seed_list,
        "benign": benign,
        "benign_queries": sum(b["queries"] for b in benign),
        "benign_flagged": fp,
        "attackers": rows,
    }


def render_monitor(r: dict) -> str:
    lines = [
        f"PRADA delta {r['config']['delta']}, min {r['config']['min_queries']} distances; "
        f"seeds {r['seeds']}",
        f"benign: {len(r['benign'])} keys, {r['benign_queries']} queries, "
        f"{r['benign_flagged']} flagged "
        + str([(b["order"], b["flagged_at"]) for b in r["benign"] if b["flagged_at"]]),
        "",
        "| attacker (400 queries) | flagged at (per seed) |",
        "|---|---|",
    ]
    by: dict = {}
    for a in r["attackers"]:
        by.setdefault(a["attacker"], []).append(a["flagged_at"])
    for k, v in by.items():
        lines.append(f"| {k} | {', '.join('never' if x is None else str(x) for x in v)} |")
    return "\n".join(lines)


# ----- clone accuracy against each defence ---------------------------------------------------
DEFENCES = {  # name -> (output policy, input hiding, quota images per key, monitor block,
    #                 row defences: dedup + batching, as measured live by `insider`)
    "none": ("probabilities", False, None, False, False),
    "rounding (1 decimal)": ("probabilities:1", False, None, False, False),
    "top_k (k=1)": ("top_k:1", False, None, False, False),
    "label": ("label", False, None, False, False),
    "quota (100 images per key)": ("probabilities", False, 100, False, False),
    "monitor (block)": ("probabilities", False, None, True, False),
    "input hiding": ("probabilities", True, None, False, False),
    "dedup + batching (insider rows)": ("probabilities", False, None, False, True),
    "combined (label + hiding + quota 100 + monitor block + dedup + batching)": (
        "label",
        True,
        100,
        True,
        True,
    ),
}


class _RowDefended:
    """The in-process oracle with the orchestrator's row defences as measured live
    (`insider` section: with dedup + batching the insider attributes 0-1 of 20 rows at the
    later providers, and none at provider-a with input hiding): no attributed rows there."""

    def __init__(self, inner, hidden: bool):
        self.inner, self.hidden = inner, hidden

    def answer(self, raw):
        return self.inner.answer(raw)

    def rows(self, j, raw, features):
        r = self.inner.rows(j, raw, features)
        if j > 0 or self.hidden:
            r.found[:] = False
        return r


def section_clone(args) -> dict:
    from qumos.attack import AttackConfig, Victim, run_attack
    from qumos.attack.driver import in_process_holdings
    from qumos.attack.holdings import attacker_data
    from qumos.defense.monitor import queries_until_flagged
    from qumos.defense.policy import parse_policy

    path = OUT / "clone.json"
    prev = json.loads(path.read_text()) if path.is_file() else {"runs": [], "attack": ATTACK}
    if prev.get("attack") != ATTACK:  # resume only runs of the same attacker budget
        sys.exit(
            f"{path}: holds runs at attacker budget {prev.get('attack')}, this run is at "
            f"{ATTACK}; move the file away (or pass the same --attack-epochs/"
            "--attack-restarts) to resume"
        )
    done = {(r["defence"], r["profile"], r["N"], r["seed"]) for r in prev["runs"]}
    runs = prev["runs"]
    names = [d for d in DEFENCES if not args.defences or d.split(" ")[0] in args.defences]
    if args.profiles == ["queries"]:  # the row defences act on the insider only
        names = [d for d in names if not d.startswith("dedup")]
    victims = {}
    for s in args.seed_list:
        for name in names:
            policy, hide, quota, block, rowdef = DEFENCES[name]
            key = (hide, s)
            if key not in victims:
                victims[key] = _victim(("H:" if hide else "") + args.design, s)
            spec, data, acc = victims[key]
            for n in args.query_list:
                for profile in args.profiles:
                    if (name, profile, n, s) in done:
                        continue
                    own = attacker_data(data, 0.05, s)
                    q = data.train.raw[own.queries(data, n)]
                    flagged = queries_until_flagged(q, _classes(spec, q)) if block else None
                    n_eff = min([n] + [x for x in (quota, flagged) if x])
                    cfg = AttackConfig(profile=profile, queries=n_eff, **ATTACK)
                    victim = Victim.in_process(spec, data, True, "probabilities")
                    victim.oracle.output_policy = parse_policy(policy)
                    if rowdef:
                        victim.oracle = _RowDefended(victim.oracle, hide)
                    t0 = time.perf_counter()
                    rep = run_attack(
                        cfg,
                        data,
                        victim,
                        [],
                        [s],
                        holdings_for_seed=lambda x, sp=spec, d=data, c=cfg: in_process_holdings(
                            sp, d, c, x
                        ),
                    ).to_dict()
                    refs = rep["references"]
                    dist = max(
                        (k for k in refs if k.startswith("distill")),
                        key=lambda k: refs[k]["acc"][0],
                    )
                    base = max(
                        (k for k in refs if not k.startswith("distill")),
                        key=lambda k: refs[k]["acc"][0],
                    )
                    rec = {
                        "defence": name,
                        "profile": profile,
                        "N": n,
                        "N_eff": n_eff,
                        "flagged_at": flagged,
                        "seed": s,
                        "victim_acc": rep["victim_acc"][0],
                        "labelled_only": refs[base]["acc"][0],
                        "labelled_ref": base,
                        "distill": refs[dist]["acc"][0],
                        "distill_fidelity": refs[dist]["fidelity"][0],
                        "distill_ref": dist,
                        "seconds": time.perf_counter() - t0,
                        "load": _load()[0],
                    }
                    # the strongest clone: distillation, or (breach+queries) the best theft
                    rec["A"], rec["fidelity"], rec["theft"] = (
                        rec["distill"],
                        rec["distill_fidelity"],
                        dist,
                    )
                    if rep["providers"]:
                        best = max(rep["providers"], key=lambda p: p["A"][0])
                        ins = [
                            p["by_strategy"].get("insider", {}).get("acc", [None])[0]
                            for p in rep["providers"]
                        ]
                        rec["insider"] = max([x for x in ins if x is not None], default=None)
                        rec["breach_best"] = best["A"][0]
                        if best["A"][0] > rec["A"]:
                            rec["A"], rec["fidelity"] = best["A"][0], best["fidelity"][0]
                            rec["theft"] = f"{best['best_strategy']} @ {best['provider']}"
                    runs.append(rec)
                    _save("clone", {"design": args.design, "attack": ATTACK, "runs": runs})
                    print(
                        f"{name} | {profile} N={n} (eff {n_eff}) seed {s}: victim "
                        f"{rec['victim_acc']:.3f} clone {rec['A']:.3f} ({rec['theft']}) fid "
                        f"{rec['fidelity']:.3f}; labelled only {rec['labelled_only']:.3f} "
                        f"({rec['seconds']:.0f} s)",
                        flush=True,
                    )
    return {"design": args.design, "attack": ATTACK, "runs": runs}


def _fid(rep: dict):
    """Fidelity of the queries profile's best reference (the distilled clone)."""
    best = rep["references"].get(rep["S_reference"])
    return best["fidelity"][0] if best else None


def render_clone(r: dict) -> str:
    lines = [
        "| defence | attacker | N (effective) | victim | clone accuracy | fidelity | "
        "best clone (per seed) | insider | labelled images only | flagged at |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for x in r["runs"]:
        groups.setdefault((x["defence"], x["profile"], x["N"]), []).append(x)
    for (d, p, n), xs in groups.items():

        def f(k, xs=xs):
            return _ms([x[k] for x in xs])

        def fmt(v):
            return "-" if v[0] is None else f"{v[0]:.3f} ± {v[1]:.3f}"

        eff = sorted({x["N_eff"] for x in xs})
        fl = [x["flagged_at"] for x in xs]
        ins = f("insider") if "insider" in xs[0] else [None, None]
        lines.append(
            f"| {d} | {p} | {n} ({'/'.join(map(str, eff))}) | {fmt(f('victim_acc'))} | "
            f"{fmt(f('A'))} | {fmt(f('fidelity'))} | "
            f"{', '.join(x['theft'] for x in xs)} | {fmt(ins)} | "
            f"{fmt(f('labelled_only'))} | "
            f"{', '.join('-' if v is None else str(v) for v in fl)} |"
        )
    return "\n".join(lines)


# ----- log-based theft with and without input hiding ----------------------------------------
def section_logbased(args) -> dict:
    from qumos.attack import AttackConfig, Victim, run_attack
    from qumos.attack.holdings import attacker_data, holdings_in_process

    runs = []
    for s in args.seed_list:
        for hide in (False, True):
            spec, data, acc = _victim(("H:" if hide else "") + args.design, s)
            cfg = AttackConfig(profile="breach", traffic=200, **ATTACK)
            own = attacker_data(data, cfg.fraction, s)
            traffic = data.train.x[own.traffic(cfg.traffic)]
            h0 = holdings_in_process(spec, 0, traffic)  # the first provider, breached
            victim = Victim.in_process(spec, data, True)
            rep = run_attack(cfg, data, victim, [h0], [s]).to_dict()
            by = rep["providers"][0]["by_strategy"]
            st = by.get("selftrain") or {}
            runs.append(
                {
                    "seed": s,
                    "hiding": hide,
                    "victim_acc": rep["victim_acc"][0],
                    "S": rep["S"][0],
                    "A": rep["providers"][0]["A"][0],
                    "best": rep["providers"][0]["best_strategy"],
                    "selftrain": (st.get("acc") or [None])[0],
                    "selftrain_note": st.get("note"),
                    "strategies": {k: v["acc"][0] for k, v in by.items()},
                    "log_row_is_feature": bool(
                        np.allclose(h0.access_log[0]["inputs"][0], traffic[0])
                    ),
                }
            )
            print(runs[-1], flush=True)
    return {"design": args.design, "attack": ATTACK, "runs": runs}


def render_logbased(r: dict) -> str:
    lines = [
        "| input hiding | victim | S | breach of provider-a: A (best theft) | selftrain | "
        "log rows are the features | seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        st = "-" if x["selftrain"] is None else f"{x['selftrain']:.3f}"
        lines.append(
            f"| {'on' if x['hiding'] else 'off'} | {x['victim_acc']:.3f} | "
            f"{x['S']:.3f} | {x['A']:.3f} ({x['best']}) | {st} | "
            f"{x['log_row_is_feature']} | {x['seed']} |"
        )
    return "\n".join(lines)


# ----- live stacks ---------------------------------------------------------------------------
def _artifact(path: Path, design: str):
    from qumos.artifact import load_artifact, save_artifact

    if not (path / "model.json").is_file():
        spec, data, acc = _victim(design, 0)
        save_artifact(
            spec.model_copy(update={"name": "victim"}),
            path,
            metrics={"test_acc": acc},
            training={"seed": 0, "design": design},
        )
    return load_artifact(path)


def _stack(tmp: Path, env: dict):
    from qumos.localstack import stack_on_free_ports

    return stack_on_free_ports(tmp, with_attacker=False, orchestrator_env=env)


def _closed_loop(
    url: str, model: str, key: str, raw: np.ndarray, clients: int, seconds: float, max_requests: int
) -> dict:
    """`clients` threads each sending batch-1 predicts back to back, for `seconds` (or
    `max_requests` in all): requests/s and latency percentiles."""
    from qumos.client import make_client, predict

    lat, errors, stop = [], [0], threading.Event()
    lock = threading.Lock()

    def loop(i: int) -> None:
        with make_client(timeout=60) as c:
            j = i
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    predict(c, url, model, raw[j % len(raw)][None], api_key=key)
                except Exception:
                    with lock:
                        errors[0] += 1
                with lock:
                    lat.append(time.perf_counter() - t0)
                    if len(lat) >= max_requests:
                        stop.set()
                j += clients

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors[0],
        "seconds": wall,
        "rps": len(lat) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def _batch_metrics(url: str) -> dict:
    """The orchestrator's batching histograms (sums, counts, the 2 ms buckets)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    want = {
        "qumos_orch_batch_wait_seconds_sum": "wait_sum",
        "qumos_orch_batch_wait_seconds_count": "wait_count",
        'qumos_orch_batch_wait_seconds_bucket{le="0.002"}': "wait_le_2ms",
        'qumos_orch_batch_wait_seconds_bucket{le="0.0025"}': "wait_le_2_5ms",
        "qumos_orch_batch_requests_sum": "req_sum",
        "qumos_orch_batch_requests_count": "req_count",
    }
    out = {v: 0.0 for v in want.values()}
    for line in text.splitlines():
        name, _, val = line.rpartition(" ")
        if name in want:
            out[want[name]] = float(val)
    return out


def section_batching(args) -> dict:
    import tempfile

    from qumos.datasets import load_task

    art = _artifact(OUT / "artifact", args.design)
    raw = load_task("digits", 4, seed=0).test.raw
    out = {"design": args.design, "window_ms": args.window_ms, "max_rows": 256, "rounds": []}
    envs = {
        "off": {"QUMOS_ORCH_MONITOR": "off"},
        "on": {"QUMOS_ORCH_MONITOR": "off", "QUMOS_ORCH_BATCH_WINDOW_MS": str(args.window_ms)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        stacks = {k: _stack(Path(tmp) / k, e) for k, e in envs.items()}
        try:
            for s in stacks.values():
                s.start()
                s.deploy(art)
            for r in range(args.rounds):  # interleaved: off, on, off, on, ...
                for k, s in stacks.items():
                    for clients in (1, 32):
                        m0 = _batch_metrics(s.orchestrator_url)
                        res = _closed_loop(
                            s.orchestrator_url,
                            "victim",
                            s.client_key,
                            raw,
                            clients,
                            args.seconds,
                            4000,
                        )
                        m1 = _batch_metrics(s.orchestrator_url)
                        d = {k2: m1[k2] - m0[k2] for k2 in m0}
                        if d.get("wait_count"):
                            res["batch_wait_mean_ms"] = 1000 * d["wait_sum"] / d["wait_count"]
                            res["requests_per_batch"] = d["req_sum"] / d["req_count"]
                            res["batch_wait_le_2ms"] = d["wait_le_2ms"] / d["wait_count"]
                            res["batch_wait_le_2_5ms"] = d["wait_le_2_5ms"] / d["wait_count"]
                        out["rounds"].append({"round": r, "batching": k, **res, "load": _load()[0]})
                        print(out["rounds"][-1], flush=True)
        finally:
            for s in stacks.values():
                s.stop()
    return out


def _j(xs: list, k: str, digits: int) -> str:
    return ", ".join(f"{x[k]:.{digits}f}" for x in xs)


def render_batching(r: dict) -> str:
    lines = [
        f"window {r['window_ms']} ms, row cap {r['max_rows']}; rounds interleaved",
        "",
        "| batching | clients | requests/s (per round) | p50 ms | p99 ms | errors | "
        "batch wait mean ms | requests per batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by: dict = {}
    for x in r["rounds"]:
        by.setdefault((x["batching"], x["clients"]), []).append(x)
    for (b, c), xs in sorted(by.items(), key=lambda t: (t[0][1], t[0][0])):
        lines.append(
            f"| {b} | {c} | {_j(xs, 'rps', 0)} | "
            f"{_j(xs, 'p50_ms', 1)} | "
            f"{_j(xs, 'p99_ms', 1)} | "
            f"{sum(x['errors'] for x in xs)} | "
            f"{_j(xs, 'batch_wait_mean_ms', 2) if 'batch_wait_mean_ms' in xs[0] else '-'} | "
            f"{_j(xs, 'requests_per_batch', 1) if 'requests_per_batch' in xs[0] else '-'} |"
        )
    return "\n".join(lines)


def section_insider(args) -> dict:
    import tempfile

    from qumos.attack.holdings import attacker_data, fragment_rows
    from qumos.attack.live import HttpOracle
    from qumos.chain import preprocess
    from qumos.datasets import load_task

    art = _artifact(OUT / "artifact", args.design)
    data = load_task("digits", 4, seed=0)
    own = attacker_data(data, 0.05, 0)
    q = data.train.raw[own.queries(data, args.query_list[0])]
    qx = preprocess(q, art.spec.preprocess)
    truth = fragment_rows(art.spec, qx)
    out = {
        "design": args.design,
        "queries": args.query_list[0],
        "window_ms": args.window_ms,
        "background_clients": 4,
        "runs": [],
    }
    hidden = _artifact(OUT / "artifact-hidden", "H:" + args.design)
    win = {"QUMOS_ORCH_BATCH_WINDOW_MS": str(args.window_ms)}
    modes = [
        ("off", {"QUMOS_ORCH_DEDUP_ROWS": "0"}, art, 2),
        ("batching", {"QUMOS_ORCH_DEDUP_ROWS": "0", **win}, art, 2),
        ("dedup", {}, art, 2),
        ("dedup", {}, art, 1),
        ("batching + dedup", win, art, 2),
        ("batching + dedup", win, art, 1),
        ("batching + dedup + hiding", win, hidden, 1),
    ]
    for mode, env, model, repeat in modes:
        truth_m = truth if model is art else fragment_rows(model.spec, qx)
        with tempfile.TemporaryDirectory() as tmp:
            s = _stack(Path(tmp), {"QUMOS_ORCH_MONITOR": "off", **env})
            with s:
                s.deploy(model)
                stop = threading.Event()
                bg = threading.Thread(target=_background, args=(s, data.test.raw, stop))
                bg.start()
                time.sleep(1.0)
                oracle = HttpOracle(
                    s.orchestrator_url,
                    "victim",
                    {j: s.data_dir(p) for j, p in enumerate(art.spec.placement)},
                    api_key=s.create_key("insider"),
                    repeat=repeat,
                    hidden_inputs=model is not art,
                )
                oracle.answer(q)
                stop.set()
                bg.join()
                time.sleep(0.5)
                for j in range(art.spec.n_fragments):
                    rows = oracle.rows(j, q, qx)
                    right = [
                        bool(np.allclose(rows.inputs[i], truth_m[j][0][i], atol=1e-6))
                        for i in np.flatnonzero(rows.found)
                    ]
                    out["runs"].append(
                        {
                            "batching": mode,
                            "repeat": repeat,
                            "fragment": j,
                            "attributed": int(rows.found.sum()),
                            "correct": int(sum(right)),
                            "queries": len(q),
                        }
                    )
                    print(out["runs"][-1], flush=True)
    return out


def _background(stack, raw, stop: threading.Event) -> None:
    """4 honest clients sending batch-1 requests until `stop`."""
    from qumos.client import make_client, predict

    def loop(i):
        with make_client(timeout=60) as c:
            j = i
            while not stop.is_set():
                predict(
                    c,
                    stack.orchestrator_url,
                    "victim",
                    raw[j % len(raw)][None],
                    api_key=stack.client_key,
                )
                j += 4

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def render_insider(r: dict) -> str:
    lines = [
        f"{r['queries']} insider queries (each in its own request, repeated as shown) while 4 honest "
        f"clients send batch-1 requests; window {r['window_ms']} ms",
        "",
        "| orchestrator | insider repeats each query | fragment | attributed | correct |",
        "|---|---|---|---|---|",
    ]
    for x in r["runs"]:
        lines.append(
            f"| {x['batching']} | {x.get('repeat', 2)}x | {x['fragment']} | "
            f"{x['attributed']} / {x['queries']} "
            f"| {x['correct']} / {x['queries']} |"
        )
    return "\n".join(lines)


def section_cost(args) -> dict:
    """Honest users: accuracy of the labels they get under each policy (unchanged by
    construction: labels are the argmax of the unrounded probabilities) and batch-1 p50
    latency at 1 client: anonymous without defences vs a key with quota and monitor."""
    import tempfile

    from qumos.datasets import load_task

    art = _artifact(OUT / "artifact", args.design)
    test = load_task("digits", 4, seed=0).test
    envs = {
        "no defence (anonymous, monitor off)": {
            "QUMOS_ORCH_ALLOW_ANONYMOUS": "1",
            "QUMOS_ORCH_MONITOR": "off",
        },
        "key + quota + monitor (log)": {},
        f"key + quota + monitor + batching {args.window_ms} ms": {
            "QUMOS_ORCH_BATCH_WINDOW_MS": str(args.window_ms)
        },
    }
    out = {"design": args.design, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        stacks = {k: _stack(Path(tmp) / str(i), e) for i, (k, e) in enumerate(envs.items())}
        try:
            for s in stacks.values():
                s.start()
                s.deploy(art)
            keys = {
                k: (
                    None
                    if "anonymous" in k
                    else s.create_key("honest", images_per_window=100000, window_s=60)
                )
                for k, s in stacks.items()
            }
            for r in range(args.rounds):
                for k, s in stacks.items():
                    res = _closed_loop(
                        s.orchestrator_url, "victim", keys[k], test.raw, 1, args.seconds, 300
                    )
                    out["rows"].append({"round": r, "config": k, **res, "load": _load()[0]})
                    print(out["rows"][-1], flush=True)
            s = stacks["key + quota + monitor (log)"]
            from qumos.client import make_client, predict

            accs = {}
            for pol in ("probabilities", "top_k:1", "probabilities:1", "label"):
                from qumos.defense.policy import parse_policy

                with make_client(timeout=60) as c:
                    c.put(
                        f"{s.orchestrator_url}/v1/models/victim/policy",
                        json=parse_policy(pol).model_dump(),
                        headers={"Authorization": f"Bearer {s.admin_token}"},
                    ).raise_for_status()
                    res = predict(
                        c,
                        s.orchestrator_url,
                        "victim",
                        test.raw,
                        api_key=keys["key + quota + monitor (log)"],
                    )
                accs[pol] = float((np.asarray(res.labels) == test.y).mean())
            out["accuracy"] = accs
        finally:
            for s in stacks.values():
                s.stop()
    return out


def render_cost(r: dict) -> str:
    lines = ["| configuration | p50 ms (per round) | p99 ms |", "|---|---|---|"]
    by: dict = {}
    for x in r["rows"]:
        by.setdefault(x["config"], []).append(x)
    for k, xs in by.items():
        lines.append(f"| {k} | {_j(xs, 'p50_ms', 1)} | {_j(xs, 'p99_ms', 1)} |")
    lines += [
        "",
        "honest accuracy of the labels under each policy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in r.get("accuracy", {}).items()),
    ]
    return "\n".join(lines)


SECTIONS = {
    "monitor": (section_monitor, render_monitor),
    "clone": (section_clone, render_clone),
    "logbased": (section_logbased, render_logbased),
    "batching": (section_batching, render_batching),
    "insider": (section_insider, render_insider),
    "cost": (section_cost, render_cost),
}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("section", choices=list(SECTIONS) + ["render"])
    ap.add_argument("--design", default=DESIGN)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--queries", default="20,100,400")
    ap.add_argument("--profiles", default="queries,breach+queries")
    ap.add_argument("--defences", default="", help="first words of DEFENCES to run")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window-ms", type=float, default=2.0)
    from qumos.attack.config import AttackConfig

    ap.add_argument("--attack-epochs", type=int, default=AttackConfig().epochs)
    ap.add_argument("--attack-restarts", type=int, default=AttackConfig().restarts)
    args = ap.parse_args()
    ATTACK.update(epochs=args.attack_epochs, restarts=args.attack_restarts)
    torch.set_num_threads(1)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    args.query_list = [int(s) for s in args.queries.split(",") if s]
    args.profiles = [p for p in args.profiles.split(",") if p]
    args.defences = [d for d in args.defences.split(",") if d]
    if args.section == "render":
        for name, (_, render) in SECTIONS.items():
            p = OUT / f"{name}.json"
            if p.is_file():
                print(f"## {name}\n\n{render(json.loads(p.read_text()))}\n")
        return
    fn, render = SECTIONS[args.section]
    load0 = _load()
    print(f"load average at start: {load0}", flush=True)
    t0 = time.perf_counter()
    rec = fn(args)
    rec.update(
        {
            "command": "python bench/bench_defenses.py " + " ".join(sys.argv[1:]),
            "load_start": load0,
            "seconds": time.perf_counter() - t0,
        }
    )
    _save(args.section, rec)
    print(render(rec))


if __name__ == "__main__":
    main()
