"""The defence library (qumos.defense), pure: policy, keys, quota, monitor, batching,
and input hiding in the model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from qumos.defense.batching import Batcher
from qumos.defense.keys import KeyProblem, KeyStore, key_id
from qumos.defense.monitor import MonitorConfig, PradaState, queries_until_flagged, shapiro_w
from qumos.defense.policy import OutputPolicy, apply_policy, parse_policy
from qumos.defense.quota import Quota, QuotaBook

P = np.array([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.3, 0.2]])


def test_policies():
    np.testing.assert_array_equal(apply_policy(P, OutputPolicy()), P)
    np.testing.assert_array_equal(apply_policy(P, OutputPolicy(kind="label")), [1, 2])
    top = apply_policy(P, OutputPolicy(kind="top_k", k=2))
    np.testing.assert_array_equal(top, [[0, 0.6, 0.2, 0], [0.25, 0, 0.3, 0]])
    np.testing.assert_array_equal(
        apply_policy(P, parse_policy("probabilities:0")), [[0, 1, 0, 0], [0, 0, 0, 0]]
    )
    assert parse_policy("top_k:2:3") == OutputPolicy(kind="top_k", k=2, decimals=3)
    for bad in ("top_k", "label:2", "nope", "top_k:x", "probabilities:1:2"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    with pytest.raises(ValueError):
        OutputPolicy(kind="label", decimals=2)


def test_in_process_oracle_uses_the_same_policy(small_artifact):
    from qumos.artifact import load_artifact
    from qumos.attack.driver import InProcessOracle
    from qumos.datasets import load_task

    spec = load_artifact(small_artifact).spec
    raw = load_task("digits", 4, seed=0).test.raw[:8]
    full = InProcessOracle(spec).answer(raw)
    top = InProcessOracle(spec, "top_k", decimals=2, k=1).answer(raw)
    np.testing.assert_array_equal(
        top, apply_policy(full, OutputPolicy(kind="top_k", k=1, decimals=2))
    )
    np.testing.assert_array_equal(InProcessOracle(spec, "label").answer(raw), full.argmax(1))


def test_keys_store_hashes_and_verify(tmp_path):
    store = KeyStore(tmp_path / "keys.json")
    key, rec = store.create("alice", Quota(images_total=5))
    assert key.startswith(f"qk_{rec.id}_") and key[16:] not in (tmp_path / "keys.json").read_text()
    again = KeyStore(tmp_path / "keys.json")
    again.load()
    assert again.verify(f"Bearer {key}").name == "alice"
    for auth, status in (
        (None, 401),
        ("Basic x", 401),
        ("Bearer nope", 401),
        (f"Bearer {key[:-2]}zz", 401),
    ):
        with pytest.raises(KeyProblem) as e:
            again.verify(auth)
        assert e.value.status == status and key[16:] not in e.value.message
    again.revoke(rec.id)
    with pytest.raises(KeyProblem) as e:
        again.verify(f"Bearer {key}")
    assert e.value.status == 403 and "revoked" in e.value.message
    assert key_id(f"qk_{rec.id}") == rec.id
    with pytest.raises(ValueError):
        key_id("qk_xyz")
    with pytest.raises(ValueError):
        store.create("bad name")


def test_key_store_crash_mid_write_keeps_the_old_store(tmp_path, monkeypatch):
    import os

    store = KeyStore(tmp_path / "keys.json")
    store.create("a")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        store.create("b")
    monkeypatch.undo()
    again = KeyStore(tmp_path / "keys.json")
    again.load()
    assert [r.name for r in again.keys.values()] == ["a"]
    assert list(store.keys) == list(again.keys)  # the failed key is not kept in memory


def test_quota_window_and_total():
    book = QuotaBook("/nonexistent/quota.json")
    q = Quota(images_per_window=5, window_s=10, images_total=7)
    d = book.charge("k", q, 4, now=0)
    assert d.allowed and d.headers["RateLimit-Remaining"] == "1"
    d = book.charge("k", q, 2, now=1)
    assert not d.allowed and d.headers["Retry-After"] == "9"
    d = book.charge("k", q, 3, now=11)  # a new window, but only 3 left in total
    assert d.allowed and d.headers["RateLimit-Remaining"] == "0"
    d = book.charge("k", q, 1, now=12)
    assert not d.allowed and "total" in d.message and "Retry-After" not in d.headers
    assert not book.charge("k2", q, 6, now=0).allowed  # more than a window at once
    assert book.charge("k3", Quota(), 10**6, now=0).allowed  # no limits


def test_shapiro_w_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (6, 20, 100, 2000):
        for x in (rng.normal(size=n), rng.exponential(size=n)):
            assert shapiro_w(x) == pytest.approx(stats.shapiro(x).statistic, abs=1e-6)
    assert shapiro_w(np.ones(10)) == 1.0


def test_prada_flags_jbda_not_natural_images():
    from qumos.datasets import load_task

    d = load_task("digits", 4, seed=0)
    assert queries_until_flagged(d.train.raw, d.train.y) is None
    rng = np.random.default_rng(0)
    x, y = list(d.train.raw[:10]), list(d.train.y[:10])
    while len(x) < 400:
        x += [np.clip(v + rng.choice([-1, 1], 64), 0, 16) for v in x]
        y += y
    at = queries_until_flagged(np.asarray(x[:400]), np.asarray(y[:400]))
    assert at is not None and at < 200
    st = PradaState()
    st.observe(d.train.raw[:5], d.train.y[:5], MonitorConfig())
    assert st.w is None and st.queries == 5  # too few distances to test


def test_batcher_splits_answers_back_and_shuffles():
    seen = []

    async def run(group, rows):
        seen.append(rows.copy())
        return rows * 10

    async def main():
        b = Batcher(run, window_s=0.01, max_rows=100)
        reqs = [np.full((i + 1, 2), float(i)) for i in range(6)]
        outs = await asyncio.gather(*(b.submit("m", r) for r in reqs))
        for r, o in zip(reqs, outs):
            np.testing.assert_array_equal(o, r * 10)
        return b

    b = asyncio.run(main())
    assert b.batches == 1 and len(seen[0]) == 21
    assert not np.array_equal(seen[0][:, 0], np.sort(seen[0][:, 0]))  # not in arrival order


def test_batcher_row_cap_and_errors():
    async def boom(group, rows):
        raise RuntimeError("provider down")

    async def main():
        b = Batcher(boom, window_s=0.01, max_rows=3)
        res = await asyncio.gather(
            *(b.submit("m", np.zeros((2, 1))) for _ in range(3)), return_exceptions=True
        )
        return b, res

    b, res = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in res)
    assert b.batches >= 2  # 2 + 2 rows exceed the cap of 3


def test_input_hiding_in_the_model_chain_and_canaries():
    import torch
    from qumos.chain import encode_inputs, run_chain
    from qumos.deploy import make_canaries
    from qumos.model import DistributedQNN
    from qumos.spec import build_spec, design_of, parse_short_design
    from qumos.torchsim import FragmentSim

    d = parse_short_design("H:rxyz_cnot:1-1")
    assert d.hide_inputs and d.short().startswith("H:")
    assert parse_short_design("rxyz_cnot:1-1").key() != d.key()
    spec = DistributedQNN(build_spec(d)).to_spec()
    assert design_of(spec).hide_inputs and spec.is_trained()
    x = np.random.default_rng(0).uniform(0, np.pi, (4, 16))
    a0 = encode_inputs(spec, x)
    assert a0.shape == x.shape and not np.allclose(a0, x)
    net = DistributedQNN(spec, dtype=torch.float64)
    sims = [FragmentSim(f, dtype=torch.float64) for f in spec.fragments]
    out = run_chain(
        spec,
        x,
        lambda k, a: sims[k](torch.tensor(a), torch.tensor(spec.fragments[k].params)).numpy(),
    )
    ref = torch.softmax(net(torch.tensor(x)), 1).detach().numpy()
    np.testing.assert_allclose(out, ref, atol=1e-9)
    can = make_canaries(spec, np.full((2, 64), 8.0))
    from qumos.chain import preprocess

    np.testing.assert_allclose(
        can.fragments[0].inputs,
        encode_inputs(spec, preprocess(np.full((2, 64), 8.0), spec.preprocess)),
    )
    # without hiding, a spec dumps exactly as before the defences existed
    plain = build_spec(parse_short_design("rxyz_cnot:1-1"))
    assert "input_transform" not in plain.model_dump() and "output_policy" not in plain.model_dump()
