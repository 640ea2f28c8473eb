"""The attacker library: breach, strategies, metrics (tiny budgets; one slow test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qumos.artifact import load_artifact
from qumos.attack import (
    STRATEGIES,
    WHITE_BOX,
    AttackBudget,
    attack_provider,
    attacker_data,
    breach,
    evaluate_security,
    holdings_from_spec,
    leak_value,
    run_strategy,
    security_report_table,
    victim_predictor,
)
from qumos.datasets import load_task
from qumos.errors import AttackError
from qumos.spec import design_from_flags
from qumos.store import ProviderStore
from qumos.train import TrainConfig, train_design

TINY = AttackBudget(epochs=3, restarts=2)


@pytest.fixture(scope="module")
def data():
    return load_task("digits", 4, seed=0)


@pytest.fixture(scope="module")
def victim(small_artifact):
    return load_artifact(small_artifact).spec


def test_leak_formula():
    assert leak_value(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert leak_value(0.4, 0.5, 0.9) == 0.0  # worse than scratch: clipped at 0
    assert leak_value(0.95, 0.5, 0.9) == 1.0  # better than the victim: clipped at 1
    assert leak_value(0.8, 0.8, 0.8) == 1.0  # degenerate: holds the victim's accuracy
    assert leak_value(0.7, 0.8, 0.8) == 0.0


def test_budget_validation_names_the_field():
    with pytest.raises(AttackError, match=r"budget.fraction is 0; allowed: \(0, 1\]"):
        AttackBudget(fraction=0).validate()
    with pytest.raises(AttackError, match="budget.fraction is 1.5"):
        AttackBudget(fraction=1.5).validate()
    with pytest.raises(AttackError, match="budget.epochs"):
        AttackBudget(epochs=0).validate()
    with pytest.raises(AttackError, match="budget.restarts"):
        AttackBudget(restarts=0).validate()


def test_attacker_data_is_a_seeded_stratified_fraction(data):
    own = attacker_data(data, 0.05, seed=0)
    n = len(data.train.y)
    assert abs(len(own.y) - 0.05 * n) <= len(data.classes)
    assert set(own.y.tolist()) == set(range(len(data.classes)))  # every class present
    again = attacker_data(data, 0.05, seed=0)
    assert np.array_equal(own.x, again.x)
    other = attacker_data(data, 0.05, seed=1)
    assert not np.array_equal(own.x, other.x)
    assert len(own.y) + len(own.unlabelled) == n


def test_breach_reads_only_a_provider_directory(tmp_path, small_artifact):
    art = load_artifact(small_artifact)
    with pytest.raises(AttackError, match="not a provider's data directory"):
        breach(small_artifact)  # an artifact directory is not a provider's data
    with pytest.raises(AttackError, match="no such directory"):
        breach(tmp_path / "nowhere")
    empty = ProviderStore.create(tmp_path / "empty", "provider-z")
    with pytest.raises(AttackError, match="holds no fragment"):
        breach(empty.root)
    store = ProviderStore.create(tmp_path / "b", "provider-b")
    store.put(art.fragment_file(1))
    store.append_log({"fragment_id": "digits4.1", "batch": 3})
    h = breach(tmp_path / "b")
    assert h.provider == "provider-b"
    assert [f.index for f in h.fragments] == [1]
    assert h.fragments[0].fragment.params == art.spec.fragments[1].params
    assert h.access_log[0]["batch"] == 3
    # the same as the in-process holdings
    assert holdings_from_spec(art.spec, 1).fragments[0] == h.fragments[0]


def test_full_theft_of_a_centralized_model(data):
    spec, _, acc = train_design(design_from_flags(fragments="3"), data,
                                TrainConfig(epochs=4, seed=0), name="central")
    rep = evaluate_security(spec, data, TINY, seeds=[0, 1])
    assert rep.victim_acc == pytest.approx(acc)
    (p,) = rep.per_provider
    # the stolen fragment with the fixed readout *is* the victim: nothing left to train
    assert abs(p.by_strategy["substitute"]["acc_mean"] - rep.victim_acc) <= 0.01
    assert p.by_strategy["substitute"]["fidelity_mean"] == pytest.approx(1.0)
    # finetuning the stolen model on the attacker's data may even improve on it
    assert p.A[0] >= rep.victim_acc - 0.01
    assert rep.security[0] == pytest.approx(0.0)
    assert json.loads(json.dumps(rep.to_dict()))["security"][0] == pytest.approx(0.0)


def test_strategies_are_deterministic_and_restarts_pick_on_own_data(data, victim):
    h = holdings_from_spec(victim, 0)
    vp = victim_predictor(victim)
    for name in STRATEGIES:
        r = run_strategy(name, h, victim, data, TINY, seed=3, victim_predict=vp)
        assert r.strategy == name
        assert 0.0 <= r.test_acc <= 1.0 and 0.0 <= r.fidelity <= 1.0
        assert len(r.restart_accs) == TINY.restarts
        assert r.attacker_data_acc == pytest.approx(max(r.restart_accs))
        if name == "query":
            assert r.n_queries == min(TINY.queries, len(data.train.y) - r.n_labelled)
    a = run_strategy("finetune", h, victim, data, TINY, seed=5)
    b = run_strategy("finetune", h, victim, data, TINY, seed=5)
    assert a.test_acc == b.test_acc and a.restart_accs == b.restart_accs
    with pytest.raises(AttackError, match="strategies: unknown strategy 'steal'"):
        run_strategy("steal", h, victim, data, TINY, seed=0)


def test_substitute_freezes_and_finetune_trains_the_stolen_fragment(data, victim):
    from qumos.model import DistributedQNN

    h = holdings_from_spec(victim, 2)
    r0 = run_strategy("substitute", h, victim, data, AttackBudget(epochs=3, restarts=1), 0)
    assert r0.index == 2 and r0.provider == "provider-c"
    m = DistributedQNN(victim)
    m.freeze_fragment(2)
    assert not m.weights[2].requires_grad and m.weights[1].requires_grad


def test_guessed_architecture_runs(data, victim):
    h = holdings_from_spec(victim, 1)
    b = AttackBudget(epochs=2, restarts=1, know_architecture=False)
    for name in ("scratch", "substitute", "head_only"):
        r = run_strategy(name, h, None, data, b, seed=0)
        assert 0.0 <= r.test_acc <= 1.0


def test_kerckhoffs_attacker_checks_the_design(data, victim):
    h = holdings_from_spec(victim, 0)
    wrong = victim.model_copy(update={"fragments": [victim.fragments[1].model_copy(
        update={"depth": 3, "params": None})] + victim.fragments[1:]})
    with pytest.raises(AttackError, match=r"design: fragments\[0\] is rxyz_cnot:3"):
        run_strategy("substitute", h, wrong, data, TINY, seed=0)
    with pytest.raises(AttackError, match="design"):
        run_strategy("substitute", h, None, data, TINY, seed=0)


def test_attack_provider_and_table(data, victim):
    h = holdings_from_spec(victim, 0)
    res = attack_provider(h, victim, data, AttackBudget(epochs=2, restarts=1), [0],
                          victim_predict=victim_predictor(victim))
    assert set(res["by_strategy"]) == {"scratch", *WHITE_BOX}
    assert res["A"][0] == max(res["by_strategy"][s]["acc_mean"] for s in WHITE_BOX)
    assert res["leak"][0] == pytest.approx(leak_value(res["A"][0], res["S"][0],
                                                      res["victim_acc"]))
    rep = evaluate_security(victim, data, AttackBudget(epochs=1, restarts=1), [0],
                            providers=[1])
    text = security_report_table(rep)
    assert "provider-b" in text and "security" in text


@pytest.fixture(scope="module")
def design_reports(data):
    """DESIGN.md's configuration (rxyz_cnot, tanh glue, trainable linear head, victim 30
    epochs seed 0) with the attacker budget reduced for CI: fraction 0.05, 20 epochs, best
    of 2 restarts, 3 seeds. bench/bench_attack.py measures both heads with the full budget
    (results/attack_design_matters.md)."""
    budget = AttackBudget(fraction=0.05, epochs=20, restarts=2)
    reports = {}
    for frags, providers in (("1-4", [0]), ("2-2-2", None)):
        spec, _, _ = train_design(design_from_flags(fragments=frags, head="linear"), data,
                                  TrainConfig(epochs=30, seed=0))
        reports[frags] = evaluate_security(spec, data, budget, seeds=[0, 1, 2],
                                           providers=providers, workers=2)
    return reports


@pytest.mark.slow
def test_design_matters_shallow_first_fragment_leaks(design_reports):
    """A 1-4 design hands the breacher of provider 0 at least half of the model's value."""
    p0 = design_reports["1-4"].per_provider[0]
    assert p0.index == 0
    assert p0.leak[0] >= 0.5, p0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "not reproduced with our attacker: head_only on the LAST fragment of 2-2-2 (features -> "
    "pi*tanh(linear) -> stolen Q_3 -> linear head) nearly matches the victim, so 2-2-2's "
    "worst leak (0.93 full budget) is not below 1-4's leak_0 (0.68); see "
    "results/attack_design_matters.md"))
def test_design_matters_balanced_design_leaks_clearly_less(design_reports):
    leak0 = design_reports["1-4"].per_provider[0].leak[0]
    worst = design_reports["2-2-2"].worst_leak[0]
    assert worst <= leak0 - 0.15, f"2-2-2 worst {worst:.2f} vs 1-4 leak_0 {leak0:.2f}"
