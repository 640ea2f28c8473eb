"""The C kernels of the simulator's batch part (`qumos.kernels`) against the torch path,
and their loading: cache, fallback without a compiler, QUMOS_SIM_KERNEL."""

import logging
import shutil

import numpy as np
import pytest
import torch
from qumos import kernels
from qumos.spec import BLOCK_TYPES, FragmentSpec
from qumos.torchsim import FragmentSim

needs_cc = pytest.mark.skipif(
    shutil.which(kernels.COMPILER[0]) is None, reason=f"no C compiler ({kernels.COMPILER[0]})"
)


def step(
    f: FragmentSpec,
    mode: str,
    x,
    w,
    unitary: bool,
    dtype=torch.float32,
    grad_x: bool = True,
    grad_w: bool = True,
):
    """Output and gradients of a random-weighted loss, with the kernels in `mode`."""
    kernels.set_mode(mode)
    try:
        sim = FragmentSim(f, dtype=dtype)
        sim.use_unitary = lambda batch: unitary  # force the path under test
        x = torch.tensor(x, dtype=dtype, requires_grad=grad_x)
        w = torch.tensor(w, dtype=dtype, requires_grad=grad_w)
        out = sim(x, w)
        coef = torch.linspace(-1, 2, out.numel(), dtype=dtype).reshape(out.shape)
        (out * coef).sum().backward()
    finally:
        kernels.set_mode(None)
    return out.detach(), x.grad, w.grad


def assert_close(a, b, rtol):
    """Equal to rtol, relative to the tensors' scale (float32 rounding differs)."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@needs_cc
@pytest.mark.parametrize("unitary", [True, False])
@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("n,n_inputs", [(4, 16), (4, 10), (8, 32), (8, 13)])
def test_c_path_equals_torch_path(n, n_inputs, block, unitary):
    rng = np.random.default_rng(n * 100 + n_inputs)
    f = FragmentSpec(n_qubits=n, n_inputs=n_inputs, block=block, depth=2, entanglement="ring")
    w = rng.uniform(-np.pi, np.pi, f.n_params)
    for batch in (1, 7, 64):
        x = rng.uniform(-np.pi, np.pi, (batch, n_inputs))
        c = step(f, "c", x, w, unitary)
        ref = step(f, "torch", x, w, unitary)
        for got, want in zip(c, ref):
            assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
            assert_close(got, want, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("unitary", [True, False])
@pytest.mark.parametrize("block", ["u3cu3", "rzx_rxx"])
@pytest.mark.parametrize("n,n_inputs", [(3, 7), (2, 1)])  # 3 encoder layers, and 1
def test_c_path_float64(n, n_inputs, block, unitary):
    """The float64 kernels agree with torch to float64 rounding."""
    rng = np.random.default_rng(3)
    f = FragmentSpec(n_qubits=n, n_inputs=n_inputs, block=block, depth=2, entanglement="full")
    w, x = rng.uniform(-np.pi, np.pi, f.n_params), rng.uniform(-9, 9, (19, n_inputs))
    c = step(f, "c", x, w, unitary, dtype=torch.float64)
    ref = step(f, "torch", x, w, unitary, dtype=torch.float64)
    for got, want in zip(c, ref):
        assert_close(got, want, rtol=1e-12)


@needs_cc
@pytest.mark.parametrize("grad_x,grad_w", [(True, False), (False, True)])
def test_c_path_one_gradient(grad_x, grad_w):
    """Only the gradient asked for (the kernel's need_x / need_t flags)."""
    rng = np.random.default_rng(5)
    f = FragmentSpec(n_qubits=4, n_inputs=12, block="rxyz_cnot", depth=2, entanglement="ring")
    w, x = rng.uniform(-np.pi, np.pi, f.n_params), rng.uniform(-np.pi, np.pi, (33, 12))
    c = step(f, "c", x, w, True, grad_x=grad_x, grad_w=grad_w)
    ref = step(f, "torch", x, w, True, grad_x=grad_x, grad_w=grad_w)
    assert (c[1] is None) == (not grad_x) and (c[2] is None) == (not grad_w)
    for got, want in zip(c, ref):
        if want is not None:
            assert_close(got, want, rtol=1e-5)


@needs_cc
def test_large_angles_and_batch_tails():
    """Angles beyond the fast sin/cos's range, and batches that are not a multiple of the
    kernels' block of samples."""
    rng = np.random.default_rng(6)
    f = FragmentSpec(n_qubits=2, n_inputs=5, block="ry_cz", depth=1, entanglement="linear")
    w = rng.uniform(-np.pi, np.pi, f.n_params)
    for batch in (15, 16, 17, 33):
        x = rng.uniform(-np.pi, np.pi, (batch, 5))
        x[0, 0], x[-1, 2] = 4e4, -1e5
        c = step(f, "c", x, w, True)
        ref = step(f, "torch", x, w, True)
        for got, want in zip(c, ref):
            assert_close(got, want, rtol=1e-5)


@needs_cc
def test_lazy_conjugate_view_is_applied():
    """torch's conj() is a view sharing memory with the plain tensor; the kernels must see
    the numbers the view stands for, not the raw memory."""
    kernels.set_mode("c")
    try:
        k = kernels.get()
        phi = torch.randn(5, 16, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
        g = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
        assert phi.conj().is_conj()
        torch.testing.assert_close(k.readout_bwd(phi.conj(), g), k.readout_bwd(phi, g).conj())
    finally:
        kernels.set_mode(None)


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """The next get() loads again (compiles into an empty cache, tmp_path); the loaded
    library and the mode are restored afterwards."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_mode", None)
    monkeypatch.setenv("QUMOS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QUMOS_SIM_KERNEL", raising=False)
    return tmp_path


def forward_backward():
    f = FragmentSpec(n_qubits=3, n_inputs=5, block="rzz_ry", depth=1, entanglement="ring")
    x = torch.rand(4, 5, requires_grad=True)
    w = torch.rand(f.n_params, requires_grad=True)
    FragmentSim(f)(x, w).sum().backward()
    assert x.grad is not None and w.grad is not None


def test_missing_compiler_falls_back_to_torch(fresh_load, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "COMPILER", ["qumos-no-such-compiler"])
    with caplog.at_level(logging.WARNING, logger="qumos.kernels"):
        assert kernels.get() is None
        forward_backward()  # the torch path
        assert kernels.get() is None
    warnings = [r for r in caplog.records if r.name == "qumos.kernels"]
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()  # one, once
    kernels.set_mode("c")  # where a missing compiler is an error
    with pytest.raises(RuntimeError, match="QUMOS_SIM_KERNEL=c"):
        kernels.get()


@needs_cc
def test_compile_error_falls_back(fresh_load, monkeypatch, tmp_path):
    bad = tmp_path / "kernels.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(kernels, "SOURCE", bad)
    assert kernels.get() is None
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setenv("QUMOS_SIM_KERNEL", "c")
    kernels.set_mode(None)
    with pytest.raises(RuntimeError, match="failed"):
        kernels.get()


def test_forced_torch_path_does_not_compile(fresh_load, monkeypatch):
    monkeypatch.setenv("QUMOS_SIM_KERNEL", "torch")
    monkeypatch.setattr(kernels, "COMPILER", ["qumos-no-such-compiler"])
    assert kernels.get() is None
    forward_backward()
    assert kernels._lib is None  # never tried to load
    monkeypatch.setenv("QUMOS_SIM_KERNEL", "fast")
    kernels.set_mode(None)
    with pytest.raises(ValueError, match="QUMOS_SIM_KERNEL"):
        kernels.get()


@needs_cc
def test_compiled_library_is_cached(fresh_load):
    assert kernels.get() is not None
    (lib,) = fresh_load.glob("qumos_kernels_*.so")
    assert not list(fresh_load.glob("*.tmp"))
    mtime = lib.stat().st_mtime_ns
    assert kernels._compile() == lib and lib.stat().st_mtime_ns == mtime  # not recompiled


@needs_cc
@pytest.mark.parametrize("unitary", [True, False])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("block", ["rxyz_cnot", "rzz_ry"])
def test_per_model_segments(unitary, shared, block):
    """Many models at once (x (M, B, k), per-model w (M, P) or one shared w): the C
    kernels' per-model T and R segments against the torch path, including a batch that is
    not a multiple of the kernels' block of samples; rzz_ry has no leading local step, so
    its encoder T is shared while R is per model."""
    rng = np.random.default_rng(11)
    f = FragmentSpec(n_qubits=4, n_inputs=13, block=block, depth=2, entanglement="ring")
    x = torch.tensor(rng.uniform(-np.pi, np.pi, (3, 19, 13)))
    w = torch.tensor(rng.uniform(-np.pi, np.pi, (f.n_params,) if shared else (3, f.n_params)))
    got = {}
    for mode in ("c", "torch"):
        kernels.set_mode(mode)
        try:
            sim = FragmentSim(f, dtype=torch.float64)
            sim.use_unitary = lambda batch: unitary
            xm, wm = x.clone().requires_grad_(), w.clone().requires_grad_()
            out = sim(xm, wm)
            (
                out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)
            ).sum().backward()
            got[mode] = (out.detach(), xm.grad, wm.grad)
        finally:
            kernels.set_mode(None)
    for a, b in zip(got["c"], got["torch"]):
        assert_close(a, b, rtol=1e-12)


def _unitary_and_grad(f: FragmentSpec, w: torch.Tensor, mode: str, dtype=torch.float64):
    """R = U^T and the gradient of a fixed complex projection of it, kernels in `mode`."""
    kernels.set_mode(mode)
    try:
        sim = FragmentSim(f, dtype=dtype)
        wm = w.clone().to(dtype).requires_grad_()
        wz, tab = sim._angles(wm)
        r = sim.unitary(wm, wz, tab)
        coef = torch.linspace(-1, 2, r.numel(), dtype=dtype).reshape(r.shape)
        (r.real * coef + r.imag * coef.flip(-1)).sum().backward()
    finally:
        kernels.set_mode(None)
    return sim, r.detach(), wm.grad


@needs_cc
@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("entanglement", ["ring", "linear", "full"])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("shared", [False, True])
def test_unitary_program_equals_torch_path(block, entanglement, n, shared):
    """R built gate by gate by the C kernels (`qk_unitary_fwd`, every op kind: one- and
    two-qubit, controlled, diagonal, signed permutation) and its backward, against the
    torch path's dense products: per model (M, P) and one shared (P,) set of weights,
    2 to 5 qubits (part of a block of rows to 2 blocks), float64."""
    rng = np.random.default_rng(n)
    f = FragmentSpec(n_qubits=n, n_inputs=n, block=block, depth=3, entanglement=entanglement)
    w = torch.tensor(rng.uniform(-np.pi, np.pi, (f.n_params,) if shared else (3, f.n_params)))
    sim, r_c, g_c = _unitary_and_grad(f, w, "c")
    assert sim.program is not None  # depth 3: parameterized steps in every block type
    _, r_t, g_t = _unitary_and_grad(f, w, "torch")
    assert r_c.shape == r_t.shape == (*w.shape[:-1], 2**n, 2**n)
    torch.testing.assert_close(r_c, r_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_c, g_t, atol=1e-11, rtol=0)


@needs_cc
def test_unitary_program_float32_and_cu3_block():
    """float32 (the training dtype) within float32 rounding of the float64 result; the
    controlled kind is what cu3 compiles to."""
    rng = np.random.default_rng(3)
    f = FragmentSpec(n_qubits=4, n_inputs=4, block="u3cu3", depth=2, entanglement="ring")
    w = torch.tensor(rng.uniform(-np.pi, np.pi, (5, f.n_params)))
    sim, r32, g32 = _unitary_and_grad(f, w, "c", torch.float32)
    assert 4 in sim.program.ops[:, 0].tolist()
    _, r64, g64 = _unitary_and_grad(f, w, "c")
    torch.testing.assert_close(r32.to(r64.dtype), r64, atol=1e-5, rtol=0)
    torch.testing.assert_close(g32.double(), g64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "op,problem",
    [
        ((0, 4, 0, 0), "wire past n"),
        ((1, 0, 0, 0), "two-qubit gate on one wire"),
        ((0, 0, 0, 30), "entries past the end"),
        ((2, 0, 0, 30), "phases past the end"),
        ((3, 0, 1, 0), "unknown permutation table"),
        ((7, 0, 0, 0), "unknown kind"),
    ],
)
def test_unitary_program_rejects_bad_ops(op, problem):
    """The C code trusts its program, so a bad one fails when it is built, naming the op."""
    with pytest.raises(ValueError, match=r"unitary program op \("):
        kernels.UnitaryProgram(2, [op], [(torch.arange(4), torch.ones(4))], 32)


def test_unitary_program_rejects_bad_permutations():
    with pytest.raises(ValueError, match="permutation"):
        kernels.UnitaryProgram(2, [(3, 0, 0, 0)], [(torch.tensor([0, 0, 1, 2]), torch.ones(4))], 0)
    with pytest.raises(ValueError, match="at least one op"):
        kernels.UnitaryProgram(2, [], [], 0)


@needs_cc
def test_native_build_first_portable_apart_and_as_fallback(fresh_load, monkeypatch):
    """The library for this CPU (NATIVE flags, keyed by the CPU's identity) is built
    first; QUMOS_KERNEL_NATIVE=0 builds and caches the portable one apart; a compiler that
    refuses the native flags gets the portable build."""
    native = kernels._compile()
    monkeypatch.setenv("QUMOS_KERNEL_NATIVE", "0")
    portable = kernels._compile()
    assert native != portable and native.exists() and portable.exists()
    assert kernels._cpu_id()  # the native key has something of the CPU in it
    monkeypatch.delenv("QUMOS_KERNEL_NATIVE")
    monkeypatch.setattr(kernels, "NATIVE", ["-mno-such-option-for-qumos"])
    assert kernels._compile() == portable  # the refused native build falls back
    assert not list(fresh_load.glob("*.tmp"))


@needs_cc
def test_fused_pass_refuses_inconsistent_segments():
    """The fused encoder-unitary-readout pass checks its segments before touching memory:
    rows not divisible into the segments, or per-segment T / R of another count."""
    k = kernels.get()
    assert k is not None
    x = torch.zeros(10, 4)
    t = torch.zeros(4, 2, 4)
    with pytest.raises(ValueError, match="kernel arguments"):
        k.eur_fwd(x, t, None, 3)  # 10 rows are not 3 segments
    with pytest.raises(ValueError, match="t_ri"):
        k.eur_fwd(x, torch.zeros(5, 4, 2, 4), None, 2)  # T for 5 segments, 2 asked
    with pytest.raises(ValueError, match="kernel argument"):
        k.eur_fwd(x, t, torch.zeros(3, 16, 16, dtype=torch.complex64), 2)  # R for 3
    out = k.eur_fwd(x, t, torch.eye(16, dtype=torch.complex64).expand(2, 16, 16), 2)
    assert out.shape == (10, 4)
