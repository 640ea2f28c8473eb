"""Many models at once (`qumos.stacked`) against the same models one by one.

Everything in float64: the batched path reorders float operations (batched matmuls,
per-model segments), so equality is to rounding, and the tolerances below are far
tighter than any difference a wrong model axis, a mixed-up model or a shared optimiser
state would make (those are O(0.1)); `test_comparison_detects_a_changed_model` checks
that a one-model difference does fail them.
"""

import copy

import numpy as np
import pytest
import torch
from qumos import kernels
from qumos.model import DistributedQNN
from qumos.spec import BLOCK_TYPES, build_spec, design_from_flags, validate_design
from qumos.stacked import ArchitectureMismatch, StackedQNN, fit_many
from qumos.train import TrainConfig, fit

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_spec(block="u3cu3", n=4, fragments="1-1", reupload=False, head="readout"):
    return build_spec(
        design_from_flags(
            fragments=fragments, block=block, n_qubits=n, reupload=reupload, head=head
        )
    )


def make_models(spec, m=3, frozen: int | None = None, seed0=0):
    """m models of `spec`, seeds seed0.., fragment `frozen` set to one shared value and
    frozen in all of them (the attacker's stolen fragment)."""
    models = [DistributedQNN(spec, seed=seed0 + s, dtype=F64) for s in range(m)]
    if frozen is not None:
        stolen = DistributedQNN(spec, seed=99, dtype=F64).to_spec().fragments[frozen]
        for mod in models:
            mod.set_fragment(frozen, stolen)
            mod.freeze_fragment(frozen)
    return models


def data(rng, n):
    return rng.uniform(0, np.pi, (n, 16)), rng.integers(0, 4, n)


def assert_models_close(got, want, atol):
    for a, b in zip(got, want):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


# ---- forward and gradients --------------------------------------------------------------
VARIANTS = [  # (reupload, head, frozen fragment)
    (False, "readout", None),
    (True, "linear", 1),
]


@pytest.mark.parametrize("reupload,head,frozen", VARIANTS)
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_forward_and_gradients_equal_one_by_one(block, n, reupload, head, frozen):
    spec = make_spec(block, n, "1-1", reupload, head)
    rng = np.random.default_rng(1)
    for batch in (3, 40):  # 40 >= 2**4: the unitary path at 4 qubits; 3: the state path
        models = make_models(spec, 3, frozen)
        stack = StackedQNN(models)
        x = torch.tensor(rng.uniform(0, np.pi, (3, batch, 16)))
        coef = torch.tensor(rng.normal(size=(3, batch, 4)))
        out = stack(x)
        (out * coef).sum().backward()
        for i, m in enumerate(models):
            ref = m(x[i])
            torch.testing.assert_close(out[i], ref, atol=1e-12, rtol=0)
            (ref * coef[i]).sum().backward()
        # gradients: the stacked parameter's slice i is model i's gradient
        for name, p in stack.named_parameters():
            for i, m in enumerate(models):
                want = dict(m.named_parameters())[_model_name(name)].grad
                torch.testing.assert_close(p.grad[i], want, atol=1e-11, rtol=0, msg=name)
        if frozen is not None:
            assert stack.shared[frozen] and f"w{frozen}" not in dict(stack.named_parameters())


def _model_name(stacked_name: str) -> str:
    """A StackedQNN parameter's name in DistributedQNN."""
    if stacked_name.startswith("w"):
        return f"weights.{stacked_name[1:]}"
    if stacked_name.startswith("glue"):
        k, part = stacked_name[4:].split("_")
        return f"glue.{k}.linear.{part}"
    return f"head.linear.{stacked_name.split('_')[1]}"


def test_torch_fallback_path_equals_one_by_one():
    """Without the C kernels the batch part loops over the models in torch."""
    spec = make_spec("rxyz_cnot", 4, "1-1", True, "linear")
    rng = np.random.default_rng(2)
    kernels.set_mode("torch")
    try:
        for batch in (3, 40):
            models = make_models(spec, 3)
            x = torch.tensor(rng.uniform(0, np.pi, (3, batch, 16)))
            stack = StackedQNN(models)
            out = stack(x)
            out.square().sum().backward()
            for i, m in enumerate(models):
                ref = m(x[i])
                torch.testing.assert_close(out[i], ref, atol=1e-12, rtol=0)
                ref.square().sum().backward()
                torch.testing.assert_close(stack.w0.grad[i], m.weights[0].grad, atol=1e-11, rtol=0)
    finally:
        kernels.set_mode(None)


# ---- training ----------------------------------------------------------------------------
def run_both(models, xs, ys, xv, yv, cfgs, **kw):
    ref = copy.deepcopy(models)
    got = fit_many(models, xs, ys, xv, yv, cfgs, **kw)

    def per(v, i):
        return v[i] if isinstance(v, list) else v

    want = [
        fit(r, per(xs, i), per(ys, i), per(xv, i), per(yv, i), per(cfgs, i))
        for i, r in enumerate(ref)
    ]
    return got, want, ref


def assert_results_equal(got, want):
    for a, b in zip(got, want):
        assert a.best_epoch == b.best_epoch
        assert a.val_acc == b.val_acc and a.train_acc == b.train_acc
        assert len(a.history) == len(b.history)
        for ha, hb in zip(a.history, b.history):
            assert ha["epoch"] == hb["epoch"] and ha["val_acc"] == hb["val_acc"]
            assert abs(ha["loss"] - hb["loss"]) < 1e-6


@pytest.mark.parametrize("reupload,head,frozen", VARIANTS)
@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_fit_many_equals_fit(block, n, reupload, head, frozen):
    """Per-model data (of different sizes), batch sizes, learning rates, seeds and epochs:
    the trained weights, the selected epoch and the history are fit's."""
    spec = make_spec(block, n, "1-1", reupload, head)
    rng = np.random.default_rng(3)
    models = make_models(spec, 3, frozen)
    sets = [data(rng, k) for k in (9, 14, 6)]
    xs, ys = [s[0] for s in sets], [s[1] for s in sets]
    cfgs = [
        TrainConfig(epochs=e, lr=lr, batch_size=b, seed=s)
        for e, lr, b, s in ((4, 0.05, 4, 1), (3, 0.1, 32, 2), (5, 0.02, 6, 3))
    ]
    got, want, ref = run_both(models, xs, ys, xs, ys, cfgs)
    assert_results_equal(got, want)
    assert_models_close(models, ref, atol=1e-5)
    assert all(r.model is m for r, m in zip(got, models))


def test_selection_picks_a_middle_epoch_like_fit():
    """A run whose best epoch is neither the first nor the last (and ties kept early)."""
    spec = make_spec("rxyz_cnot", 4, "1-1")
    rng = np.random.default_rng(4)
    xs, ys = data(rng, 24)
    xv, yv = data(rng, 10)  # held-out selection data: accuracy goes up and down
    models = make_models(spec, 6)
    cfgs = [TrainConfig(epochs=12, lr=0.2, batch_size=5, seed=s) for s in range(6)]
    got, want, ref = run_both(models, xs, ys, xv, yv, cfgs)
    assert_results_equal(got, want)
    assert_models_close(models, ref, atol=1e-5)
    assert any(0 < r.best_epoch < 12 for r in got)


def test_soft_targets():
    """y_train as class probabilities (distillation), as fit takes them."""
    spec = make_spec("ry_cz", 4, "1-1", head="linear")
    rng = np.random.default_rng(5)
    models = make_models(spec, 3)
    x, y = data(rng, 12)
    probs = rng.dirichlet(np.ones(4), size=12)
    cfgs = [TrainConfig(epochs=3, lr=0.05, batch_size=5, seed=s) for s in range(3)]
    got, want, ref = run_both(models, x, probs, x, y, cfgs)
    assert_results_equal(got, want)
    assert_models_close(models, ref, atol=1e-5)


def test_comparison_detects_a_changed_model():
    """The checks above can fail: one model trained with another learning rate differs
    from its one-by-one twin (and only that one)."""
    spec = make_spec("u3cu3", 4, "1-1")
    rng = np.random.default_rng(6)
    x, y = data(rng, 10)
    models = make_models(spec, 3)
    ref = copy.deepcopy(models)
    fit_many(models, x, y, x, y, [TrainConfig(epochs=3, lr=lr, seed=0) for lr in (0.05, 0.3, 0.05)])
    for r in ref:
        fit(r, x, y, x, y, TrainConfig(epochs=3, lr=0.05, seed=0))
    assert_models_close([models[0], models[2]], [ref[0], ref[2]], atol=1e-5)
    with pytest.raises(AssertionError):
        assert_models_close([models[1]], [ref[1]], atol=1e-5)


def test_specs_round_trip():
    spec = make_spec("rzx_rxx", 4, "1-1", True, "linear")
    models = make_models(spec, 2, frozen=0)
    rng = np.random.default_rng(7)
    x, y = data(rng, 8)
    fit_many(models, x, y, x, y, TrainConfig(epochs=2, seed=0))
    stack = StackedQNN(models)
    assert [s.model_dump() for s in stack.to_specs()] == [m.to_spec().model_dump() for m in models]


# ---- chunking ----------------------------------------------------------------------------
def test_chunking_equals_one_chunk():
    """max_rows below M * B (whole models per chunk) and below B (rows split too): the
    same outputs, gradients and trained models as one call."""
    spec = make_spec("u3cu3", 4, "1-1", True, "linear")
    rng = np.random.default_rng(8)
    x = torch.tensor(rng.uniform(0, np.pi, (4, 7, 16)))
    results = []
    for max_rows in (None, 15, 5):  # one call; 2 models per call; 5-row pieces of 1 model
        models = make_models(spec, 4, frozen=0)
        stack = StackedQNN(models, max_rows=max_rows)
        out = stack(x)
        out.square().sum().backward()
        results.append((out.detach(), stack.flat_grad.clone()))
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-13, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-12, rtol=0)
    trained = []
    for max_rows in (None, 5):
        models = make_models(spec, 4)
        xs, ys = data(np.random.default_rng(9), 11)
        res = fit_many(
            models, xs, ys, xs, ys, TrainConfig(epochs=3, batch_size=8, seed=1), max_rows=max_rows
        )
        trained.append((models, [r.best_epoch for r in res]))
    assert trained[0][1] == trained[1][1]
    # not bit-equal: u3cu3's last phases do not change <Z>, so their gradients are rounding
    # noise (~1e-17), which Adam divides by eps (1e-8) into steps of ~1e-10 either way
    assert_models_close(trained[1][0], trained[0][0], atol=1e-7)


def test_default_max_rows_scales_with_the_state_size():
    from qumos.stacked import MAX_AMPLITUDES

    for n in (4, 8):
        stack = StackedQNN(make_models(make_spec("ry_cz", n, "1-1"), 2))
        assert stack.max_rows == MAX_AMPLITUDES // 2**n


# ---- bad input ----------------------------------------------------------------------------
def test_architecture_mismatch_is_an_error():
    a = make_spec("u3cu3", 4, "1-1")
    cases = {
        "fragments[1].depth": make_spec("u3cu3", 4, "1-2"),
        "fragments[0].block": make_spec("ry_cz", 4, "1-1"),
        "glue[0].reupload": make_spec("u3cu3", 4, "1-1", reupload=True),
        "head.kind": make_spec("u3cu3", 4, "1-1", head="linear"),
        "fragments: 2 vs 3": make_spec("u3cu3", 4, "1-1-1"),
    }
    for where, b in cases.items():
        with pytest.raises(
            ArchitectureMismatch, match=where.replace("[", r"\[").replace("]", r"\]")
        ):
            StackedQNN([DistributedQNN(a), DistributedQNN(b)])
    frozen = DistributedQNN(a)
    frozen.freeze_fragment(0)
    with pytest.raises(ArchitectureMismatch, match=r"trainable.weights.0: True vs False"):
        StackedQNN([DistributedQNN(a), frozen])
    with pytest.raises(ArchitectureMismatch, match="dtype"):
        StackedQNN([DistributedQNN(a), DistributedQNN(a, dtype=F64)])
    with pytest.raises(ArchitectureMismatch, match="only DistributedQNN"):
        StackedQNN([torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="3 entries for 2 models"):
        fit_many(
            [DistributedQNN(a), DistributedQNN(a)],
            [np.zeros((2, 16))] * 3,
            [np.zeros(2, int)] * 3,
            np.zeros((2, 16)),
            np.zeros(2, int),
            TrainConfig(),
        )


def test_design_syntax_specs_stack():
    """Designs with mixed blocks and re-uploading (the bench's) stack and match."""
    d = validate_design(
        {
            "fragments": [
                {"block": "rzz_ry", "depth": 1},
                {"block": "u3cu3", "depth": 1, "reupload": True},
                {"block": "rxyz_cnot", "depth": 1, "reupload": True},
            ]
        }
    )
    spec = build_spec(d)
    models = make_models(spec, 2)
    x = torch.tensor(np.random.default_rng(10).uniform(0, np.pi, (2, 5, 16)))
    out = StackedQNN(models)(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x[i]), atol=1e-12, rtol=0)


def test_compiled_circuits_are_shared_not_their_weights():
    """DistributedQNN takes its compiled FragmentSims from a cache keyed by the circuit
    (params play no part); the weights stay per model."""
    spec = make_spec("u3cu3", 4, "1-1")
    a, b = DistributedQNN(spec, seed=0), DistributedQNN(spec, seed=1)
    assert a.sims[0] is b.sims[0] and a.sims[1] is b.sims[1]
    assert not torch.equal(a.weights[0], b.weights[0])
    assert DistributedQNN(make_spec("u3cu3", 4, "1-2")).sims[1] is not a.sims[1]
    assert DistributedQNN(spec, dtype=F64).sims[0] is not a.sims[0]


def _fit_acc_loss(model, x, y, cfg):
    """fit's loop with the attacker's selection rule (the one main's fit adds as
    TrainConfig.select == "acc_loss"): best validation accuracy, ties broken by the lower
    validation cross-entropy, then by the earlier epoch. Validation data = training data."""
    from qumos.model import accuracy
    from torch import nn

    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

    def key():
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(model(xt), yt))
        return (accuracy(model, x, y), -loss)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (key(), 0, copy.deepcopy(model.state_dict()))
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        k = key()
        if k > best[0]:
            best = (k, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return best


def test_acc_loss_selection():
    """`select = "acc_loss"` on a config (main's TrainConfig gains the field): ties in
    accuracy go to the lower validation loss, per model."""
    from dataclasses import dataclass

    @dataclass
    class Cfg(TrainConfig):
        select: str = "acc_loss"

    spec = make_spec("ry_cz", 4, "1-1", head="linear")
    rng = np.random.default_rng(12)
    x, y = data(rng, 8)  # few samples: accuracy saturates, the loss decides
    models = make_models(spec, 3)
    ref = copy.deepcopy(models)
    cfgs = [Cfg(epochs=10, lr=0.1, batch_size=8, seed=s) for s in range(3)]
    got = fit_many(models, x, y, x, y, cfgs)
    for g, r, c in zip(got, ref, cfgs):
        (acc, _), epoch, _ = _fit_acc_loss(r, x, y, c)
        assert (g.best_epoch, g.val_acc) == (epoch, acc)
    assert_models_close(models, ref, atol=1e-5)
    # the loss decided somewhere: a selected epoch later than the first one reaching its
    # accuracy (with select "acc" fit keeps that first one)
    assert any(
        r.best_epoch
        > min([h["epoch"] for h in r.history if h["val_acc"] == r.val_acc] + [r.best_epoch])
        for r in got
    )


@pytest.mark.parametrize("frozen", [None, 0])
@pytest.mark.parametrize("block", BLOCK_TYPES)
def test_attacker_scale_full_batch_self_selection(block, frozen, monkeypatch):
    """The attacker's case: each model its own small set, full batch, selection on that
    set. fit_many then takes the selection figures from the next epoch's training forward
    (not a second pass): still fit's results."""
    import qumos.stacked as st

    calls = []
    orig = st._Eval.__call__
    monkeypatch.setattr(
        st._Eval, "__call__", lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    )
    spec = make_spec(block, 4, "1-1", True, "linear")
    rng = np.random.default_rng(13)
    sets = [data(rng, k) for k in (7, 11, 9, 11)]
    xs, ys = [s[0] for s in sets], [s[1] for s in sets]
    models = make_models(spec, 4, frozen)
    cfgs = [TrainConfig(epochs=6, lr=0.1, batch_size=16, seed=s) for s in range(4)]
    got, want, ref = run_both(models, xs, ys, xs, ys, cfgs)
    assert_results_equal(got, want)
    assert_models_close(models, ref, atol=1e-5)
    assert len(calls) == 2  # the last epoch's selection and the training accuracy


def test_input_hiding_transform_stacks_like_one_by_one():
    """A model with the company's input-hiding transform (features -> fragment 0's angles)
    stacks: outputs equal one by one, and fit_many trains the transform as fit does."""
    spec = build_spec(design_from_flags(fragments="1-1", block="ry_cz", hide_inputs=True))
    assert spec.input_transform is not None
    rng = np.random.default_rng(5)
    models = make_models(spec, 3)
    x = torch.as_tensor(rng.uniform(0, np.pi, (3, 7, 16)))
    out = StackedQNN(models)(x)
    for m, model in enumerate(models):
        torch.testing.assert_close(out[m], model(x[m]), atol=1e-10, rtol=0)
    sets = [data(rng, k) for k in (9, 12, 6)]
    xs, ys = [s[0] for s in sets], [s[1] for s in sets]
    cfgs = [TrainConfig(epochs=3, lr=0.05, batch_size=4, seed=s) for s in range(3)]
    got, want, ref = run_both(models, xs, ys, xs, ys, cfgs)
    assert_results_equal(got, want)
    assert_models_close(models, ref, atol=1e-5)
    assert StackedQNN(models).to_specs()[0].input_transform.weight is not None
