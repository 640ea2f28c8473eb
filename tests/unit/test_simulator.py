"""The torch simulator against qiskit's Statevector, and the Aer chain against torch."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from qumos import kernels
from qumos.chain import run_chain
from qumos.model import DistributedQNN, predict_proba
from qumos.quantum import AerRunner, build_circuit, statevector_expectations
from qumos.spec import BLOCK_TYPES, ENTANGLEMENTS, FragmentSpec, build_spec, design_from_flags
from qumos.torchsim import FragmentSim


def random_fragment(rng, n, block, entanglement, depth):
    f = FragmentSpec(
        n_qubits=n,
        n_inputs=int(rng.integers(1, 4 * n + 1)),
        block=block,
        depth=depth,
        entanglement=entanglement,
    )
    return f.with_params(rng.uniform(-np.pi, np.pi, f.n_params).tolist())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from([2, 3, 4, 5, 8]),
    block=st.sampled_from(BLOCK_TYPES),
    ent=st.sampled_from(ENTANGLEMENTS),
    depth=st.integers(1, 3),
    batch=st.sampled_from([1, 3, 40]),
)
def test_torch_matches_statevector(seed, n, block, ent, depth, batch):
    rng = np.random.default_rng(seed)
    f = random_fragment(rng, n, block, ent, depth)
    x = rng.uniform(-np.pi, np.pi, (batch, f.n_inputs))
    # both code paths: batch < 2**n applies gates to the states, else builds the unitary
    out = FragmentSim(f)(torch.tensor(x), torch.tensor(f.params)).numpy()
    ref = statevector_expectations(f, x[:3])
    np.testing.assert_allclose(out[:3], ref, atol=1e-5)


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("n", [4, 8])
def test_each_block_type_matches_statevector(block, n):
    rng = np.random.default_rng(7)
    f = random_fragment(rng, n, block, "ring", 2)
    x = rng.uniform(0, np.pi, (300, f.n_inputs))  # >= 2**8: unitary path for 8 qubits too
    out = FragmentSim(f)(torch.tensor(x), torch.tensor(f.params)).numpy()
    np.testing.assert_allclose(out[:4], statevector_expectations(f, x[:4]), atol=1e-5)
    assert np.all(np.abs(out) <= 1 + 1e-6)


def test_circuit_parameters_are_inputs_and_weights():
    f = FragmentSpec(n_qubits=4, n_inputs=16, block="u3cu3", depth=1)
    qc, x, w = build_circuit(f)
    assert len(x) == 16 and len(w) == f.n_params
    assert qc.num_parameters == 16 + f.n_params


def test_gradients_flow_to_weights_and_inputs():
    rng = np.random.default_rng(0)
    f = random_fragment(rng, 4, "rzx_rxx", "ring", 2)
    w = torch.tensor(f.params, requires_grad=True)
    x = torch.tensor(rng.uniform(0, 3, (5, f.n_inputs)), requires_grad=True)
    FragmentSim(f, dtype=torch.float64)(x, w).sum().backward()
    assert w.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("reupload,head", [(False, "readout"), (True, "linear")])
def test_aer_chain_equals_torch_model(reupload, head):
    spec = build_spec(design_from_flags(fragments="1-2-1", head=head, reupload=reupload))
    model = DistributedQNN(spec, seed=3, dtype=torch.float64)
    spec = model.to_spec()  # random but concrete values everywhere
    rng = np.random.default_rng(1)
    feats = rng.uniform(0, np.pi, (20, 16))
    runners = [AerRunner(f) for f in spec.fragments]
    aer = run_chain(spec, feats, lambda k, a: runners[k].run(a))
    torch_p = torch.softmax(model(torch.tensor(feats)), 1).detach().numpy()
    np.testing.assert_allclose(aer, torch_p, atol=1e-4)
    # logits agree as well: compare log-probabilities (class scores up to a constant)
    np.testing.assert_allclose(np.log(aer), np.log(torch_p), atol=1e-4)
    assert predict_proba(DistributedQNN(spec), feats).shape == (20, 4)


def test_aer_shots_close_to_exact():
    rng = np.random.default_rng(2)
    f = random_fragment(rng, 4, "rxyz_cnot", "ring", 2)
    x = rng.uniform(0, np.pi, (8, f.n_inputs))
    runner = AerRunner(f)
    exact = runner.run(x)
    shots = runner.run(x, shots=8192, seed=5)
    # standard error <= 1/sqrt(8192) ~ 0.011; allow 5 sigma
    assert np.abs(shots - exact).max() < 0.06
    assert not np.allclose(shots, exact, atol=1e-9)  # really sampled
    np.testing.assert_array_equal(shots, runner.run(x, shots=8192, seed=5))  # seeded


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("unitary", [True, False])
def test_gradients_match_finite_differences(block, n, unitary):
    """torch.autograd.gradcheck (float64) of the hand-written backward of the batch part
    (encoder, psi @ U, readout) and the autograd part (weights -> U), on both paths."""
    rng = np.random.default_rng(n)
    f = FragmentSpec(n_qubits=n, n_inputs=3 * n - 1, block=block, depth=2, entanglement="ring")
    sim = FragmentSim(f, dtype=torch.float64)
    sim.use_unitary = lambda batch: unitary  # force the path under test
    x = torch.tensor(rng.uniform(-np.pi, np.pi, (3, f.n_inputs)), requires_grad=True)
    w = torch.tensor(rng.uniform(-np.pi, np.pi, f.n_params), requires_grad=True)
    assert torch.autograd.gradcheck(sim.forward, (x, w), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("entanglement", ["ring", "linear", "full"])
@pytest.mark.parametrize("n", [3, 4])
def test_folded_unitary_matches_steps_on_identity(block, entanglement, n):
    """`FragmentSim.unitary` equals running the compiled steps on the identity: on the
    torch path (signed permutations folded into the local steps' gathers) and with the C
    kernels (gate by gate, `qk_unitary_fwd`)."""
    rng = np.random.default_rng(7)
    f = FragmentSpec(n_qubits=n, n_inputs=2 * n, block=block, depth=3, entanglement=entanglement)
    sim = FragmentSim(f, dtype=torch.float64)
    w = torch.tensor(rng.uniform(-np.pi, np.pi, f.n_params))
    assert sim.steps  # depth 3: every block has steps after the leading local one
    # (rzx_rxx has no single-qubit layer, so nothing folds; the others all do)
    assert any(k == "dense" for k, _ in sim.r_steps) == (block != "rzx_rxx")
    wz, cs = sim._angles(w)
    plain = sim.apply_steps(torch.eye(sim.d, dtype=sim.cdtype), w)
    for mode in ("torch", "auto"):
        kernels.set_mode(mode)
        try:
            built = sim.unitary(w, wz, cs)
        finally:
            kernels.set_mode(None)
        torch.testing.assert_close(built, plain, atol=1e-12, rtol=0)


@pytest.mark.parametrize("gate", ["rx", "ry", "rz", "u3", "cu3", "rzz", "rxx", "rzx"])
def test_gate_features_equal_the_gate_matrix_exactly(gate):
    """Every gate as C0 + sum_k coef[k] f[k] (the feature form the simulator builds its
    matrices from) equals `gate_matrix` entry by entry, global phase included (u3 is
    P(ph) RY(th) P(la), not RZ RY RZ up to a phase), at random angles of a batch."""
    from qumos.torchsim import TABLE_COLUMNS, _gate_terms, gate_matrix

    rng = np.random.default_rng(3)
    factors, coef, const = _gate_terms(gate)
    n_angles = 1 + max(slot for _, slot in factors)
    angles = torch.tensor(rng.uniform(-2 * np.pi, 2 * np.pi, (5, n_angles)))
    table = {
        "half": lambda t: torch.stack([torch.cos(t / 2), torch.sin(t / 2)], -1),
        "phase": lambda t: torch.stack([torch.ones_like(t), torch.cos(t), torch.sin(t)], -1),
    }
    f = torch.ones(5, 1, dtype=torch.float64)
    for kind, slot in factors:  # factor 0 the least significant digit of k
        v = table[kind](angles[:, slot])
        assert v.shape[-1] == len(TABLE_COLUMNS[kind])
        f = (v[:, :, None] * f[:, None, :]).reshape(5, -1)
    built = torch.einsum("bk,kij->bij", f.to(torch.complex128), coef)
    if const is not None:
        built = built + const
    expected = gate_matrix(gate, list(angles.T), torch.complex128)
    torch.testing.assert_close(built, expected, atol=1e-12, rtol=0)
