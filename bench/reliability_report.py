"""Aggregate the reliability figures written by the tests and benches into the table of
results/reliability/README.md.

    QUMOS_RELIABILITY_DIR=results/reliability python -m pytest \
        tests/service/test_schemathesis.py tests/integration/test_reliability.py -q
    python bench/bench_load.py --json-out results/reliability/load.json
    python bench/bench_tamper.py --json-out results/reliability/tamper.json
    python bench/reliability_report.py results/reliability
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "results/reliability")

    def load(name):
        p = d / name
        return json.loads(p.read_text()) if p.is_file() else None

    rows = []
    st = load("schemathesis.json")
    if st:
        rows.append(
            (
                ("schemathesis (provider + orchestrator, all checks but positive_data_acceptance)"),
                st["requests"],
                st["requests"],
                0,
                sum(v for s in st["by_service"].values() for k, v in s.items() if int(k) >= 400),
                st["status_5xx"],
                0,
            )
        )
    it = load("integration.json")
    if it:
        rows.append(
            (
                "live faults + credentials (tests/integration/test_reliability.py)",
                it.get("requests", 0),
                0,
                it.get("faults_injected", 0),
                it.get("errors_seen", 0),
                0,
                it.get("wrong_answers", 0),
            )
        )
    ld = load("load.json")
    if ld:
        for name in ("steady", "overload"):
            r = ld.get(name)
            if r:
                rows.append(
                    (
                        f"bench_load {name} ({r['clients']} clients, {r['seconds']} s)",
                        r["requests"],
                        0,
                        0,
                        r["errors"] + r["pushed_back"],
                        r["errors"],
                        r["wrong_answers"],
                    )
                )
    tp = load("tamper.json")
    if tp:
        n = sum(r["requests"] for r in tp)
        lies = sum(round(r["requests"] * r["wrong_served"]) for r in tp if r["delta"] > 1e-6)
        rows.append(
            (
                "bench_tamper (lying provider-b)",
                n,
                0,
                n,
                sum(round(r["requests"] * r["detected"]) for r in tp),
                0,
                f"{lies} (undetected lies, see table below)",
            )
        )
    print(
        "| source | requests | malformed inputs | faults injected | non-2xx seen | "
        "5xx other than 502/503/504 by design | wrong or lost results |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
