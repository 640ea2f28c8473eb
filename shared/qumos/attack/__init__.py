"""The attacker: what an adversary of the documented threat model rebuilds of a model.

One package, one driver (`run_attack`), a module per strategy family:

    config      profiles (`breach`, `breach+queries`, `queries`, `coalition`) and budgets
    holdings    the attacker's own data, a breached provider's files and log rows
    training    converged training: full batch, restarts over learning rates, selection
                on the attacker's own labelled images only
    references  no-theft references (S): scratch QNN, logistic regression, MLP, k-NN,
                distillation on the victim's answers
    whitebox    substitute, finetune, head_only with the stolen fragment(s)
    logbased    self-training on the inputs found in the first provider's log
    insider     a breached insider's own queries matched to its log rows
    live        the same against running services (queries over HTTP, rows from the
                real access.jsonl)
    driver      run_attack / evaluate_in_process: the figures of the CLI, the attacker
                service, the demo and the security engine
    report      typed results, mean ± std over seeds, tables and the JSON summary

The threat model, the metrics and which path computes what are in docs/threat-model.md
and docs/attacker.md.
"""

from qumos.attack.config import PROFILES, AttackConfig
from qumos.attack.driver import (
    InProcessOracle,
    Oracle,
    Victim,
    evaluate_in_process,
    in_process_holdings,
    run_attack,
)
from qumos.attack.holdings import AttackerData, Holdings, attacker_data, breach
from qumos.attack.report import AttackReport, leak_value, report_table, summary_json
from qumos.attack.strategies import ALL as STRATEGIES
from qumos.attack.strategies import references_of, strategies_of, thefts_of

__all__ = [
    "PROFILES",
    "STRATEGIES",
    "AttackConfig",
    "AttackReport",
    "AttackerData",
    "Holdings",
    "InProcessOracle",
    "Oracle",
    "Victim",
    "attacker_data",
    "breach",
    "evaluate_in_process",
    "in_process_holdings",
    "leak_value",
    "references_of",
    "report_table",
    "run_attack",
    "strategies_of",
    "summary_json",
    "thefts_of",
]
