"""Batched, differentiable statevector simulator in torch, built from `FragmentSpec.ops()`.

States are (B, 2**n) complex tensors in qiskit's little-endian order (qubit 0 is the least
significant bit of a basis index). Every step maps states to states as rows.

What makes it fast (see bench/bench_simulator.py): few, large torch operations per step.
- The encoder is a layer of single-qubit rotations on |0...0>, so the encoded state is a
  product state: per wire a (B, 2) vector, combined by Kronecker products. If the ansatz
  starts with single-qubit gates (every block type but rzz_ry / rzx_rxx does), those are
  applied to the per-wire vectors too, before the product: the state stays a product state.
- The op list is compiled once into steps:
    local  a run of single-qubit gates, fused per wire into one 2x2 matrix (all wires and
           layers at once); applied as one dense (2**n, 2**n) matmul up to 5 qubits, else
           as kron(high wires) @ S @ kron(low wires)^T on the state reshaped to
           (B, 2**h, 2**l);
    perm   a run of fixed gates (cx, cz) is a signed permutation of basis states: one
           index operation;
    diag   a run of rzz gates is diagonal: one phase vector;
    gates2q other parameterized two-qubit gates (rxx, rzx, cu3): up to 5 qubits every
           gate's full (d, d) matrix from one batched real matmul of its features with
           constant embedded coefficients, multiplied into one (`_Gates2q.embedded`);
           else one einsum each.
- The ansatz does not depend on the data. When it pays off (by an estimated operation
  count, `FragmentSim.use_unitary`), its unitary is built once per call by running the
  steps on the identity, and applied to the whole batch with one matmul.
- Rotation matrices are linear in (cos t/2, sin t/2): c * I + s * (-i P); the phase
  gate P(t) is linear in (1, cos t, sin t), and U3(th, ph, la) = P(ph) RY(th) P(la)
  exactly. So every gate, and a product of gates, is multilinear in such small feature
  vectors: C0 + sum_k coef[k] f[k], f the Kronecker product of the factors' features,
  coef and C0 constant (`_gate_terms`, `_product_terms`). A fused run's matrices, a
  run of two-qubit gates, and the encoded per-wire vectors of the whole batch are each
  one *real* matmul with a constant, instead of chains of tiny complex ops (whose
  autograd overhead, not their arithmetic, dominated: u3cu3 fragments built U3/CU3
  matrices gate by gate until this; see docs/performance-batched-training.md).

- The data-dependent part (encoder, psi @ U, readout) is one `torch.autograd.Function`
  with a hand-written backward (`_EncodeUnitaryReadout`; on the per-state path `_Encode`
  and `_Readout` around the autograd steps): no graph of small ops to record and replay.
  Only the small, data-independent part (weights -> T and U) goes through autograd, with
  fused per-wire features and Kronecker products as one gather + one product each.
- Everything elementwise in that batch part (the encoder, the readout and their
  gradients) runs in C (`kernels.c`, loaded by `qumos.kernels`: compiled with the system's
  `cc` at first use and cached): four calls that loop over the samples instead of ~45
  small torch ops, whose per-op overhead, not arithmetic, dominated. The three complex
  matmuls (psi @ R; grad R and grad psi) stay in torch, on (B, d) states. Without a C
  compiler (or with QUMOS_SIM_KERNEL=torch, or on a GPU) the same maths runs as torch ops
  on (d, B) states, the batch the last, contiguous axis so each op runs over long rows.

Cost of one forward+backward step, and the flop floor it is compared with, are printed
by the benchmark; `flops_per_sample` counts the arithmetic of this method.

Many models at once (`qumos.stacked`): every step above also takes a leading model axis,
x (M, B, n_inputs) with weights w (M, P): per-model matrices, T and unitaries are built by
the same operations on (M, ...) tensors, and the batch part runs over all M * B rows in
one call (the C encoder walks M segments of rows, each with its model's T).
"""

from __future__ import annotations

import functools
import json
import math

import torch
from qumos import kernels
from qumos.spec import TWO_QUBIT_GATES, FragmentSpec, Op

__all__ = ["FragmentSim", "flops_per_sample", "fragment_sim", "gate_matrix", "init_params"]


def gate_matrix(gate: str, angles: list[torch.Tensor], cdtype: torch.dtype) -> torch.Tensor:
    """The gate's matrix, (..., 2, 2) or (..., 4, 4); angles may be batched (...).

    Two-qubit matrices are in the basis |w0 w1> of the op's wires (w0 more significant).
    """
    if gate in ("rx", "ry", "rz"):
        t = angles[0]
        cs = torch.stack([torch.cos(t / 2), torch.sin(t / 2)], dim=-1).to(cdtype)  # (..., 2)
        return (cs @ _ROT_BASIS[gate].to(cdtype)).reshape(*t.shape, 2, 2)
    if gate in ("u3", "cu3"):
        th, ph, la = angles
        c = torch.cos(th / 2).to(cdtype)
        s = torch.sin(th / 2).to(cdtype)
        eph = torch.polar(torch.ones_like(ph), ph).to(cdtype)
        ela = torch.polar(torch.ones_like(la), la).to(cdtype)
        u = torch.stack([c, -ela * s, eph * s, eph * ela * c], dim=-1).reshape(*th.shape, 2, 2)
        if gate == "u3":
            return u
        # controlled U3 = |0><0| (x) I + |1><1| (x) U3, control = the op's first wire
        m = torch.zeros(*th.shape, 4, 4, dtype=cdtype)
        m[..., 0, 0] = 1
        m[..., 1, 1] = 1
        m[..., 2:, 2:] = u
        return m
    if gate in ("rzz", "rxx", "rzx"):  # exp(-i t/2 P) = cos(t/2) I - i sin(t/2) P
        t = angles[0]
        cs = torch.stack([torch.cos(t / 2), torch.sin(t / 2)], dim=-1).to(cdtype)
        pauli = {"rzz": _ZZ, "rxx": _XX, "rzx": _ZX}[gate]
        basis = torch.stack([torch.eye(4, dtype=torch.complex128), -1j * pauli]).to(cdtype)
        return (cs @ basis.reshape(2, 16)).reshape(*t.shape, 4, 4)
    if gate == "cx":
        return _CX.to(cdtype)
    if gate == "cz":
        return torch.diag(torch.tensor([1, 1, 1, -1], dtype=cdtype))
    raise ValueError(f"unknown gate {gate!r}")


_I = torch.eye(2, dtype=torch.complex128)
_X = torch.tensor([[0, 1], [1, 0]], dtype=torch.complex128)
_Y = torch.tensor([[0, -1j], [1j, 0]], dtype=torch.complex128)
_Z = torch.tensor([[1, 0], [0, -1]], dtype=torch.complex128)
_ZZ = torch.kron(_Z, _Z)
_XX = torch.kron(_X, _X)
_ZX = torch.kron(_Z, _X)  # Z on the op's first wire, X on its second
_CX = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.complex128)
# R_P(t) = cos(t/2) I + sin(t/2) (-i P): rows are the flattened coefficients of (c, s), (2, 4).
_ROT_BASIS = {
    g: torch.stack([_I.flatten(), (-1j * p).flatten()])
    for g, p in (("rx", _X), ("ry", _Y), ("rz", _Z))
}


def _kron_all(mats: torch.Tensor) -> torch.Tensor:
    """kron(m[k-1], ..., m[0]) of (..., k, 2, 2): a (..., 2**k, 2**k) matrix; m[0] acts on
    the least significant bit."""
    ms = mats.unbind(-3)
    out = ms[0]
    lead = out.shape[:-2]
    for m in ms[
        1:
    ]:  # kron(m, out)[i*p + k, j*q + l] = m[i, j] * out[k, l]; fewer ops than torch.kron
        p, q = out.shape[-2:]
        out = (m[..., :, None, :, None] * out[..., None, :, None, :]).reshape(*lead, 2 * p, 2 * q)
    return out


def _prod0(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """t.prod(dim) as a chain of multiplications: for the few factors here, autograd's
    backward of a product chain is much cheaper than prod's (which guards against zeros)."""
    parts = t.unbind(dim)
    out = parts[0]
    for p in parts[1:]:
        out = out * p
    return out


def _take(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """flat[..., index]: (..., *index.shape). By index_select on the flattened index, whose
    forward and backward (index_add) cost about half of advanced indexing's (measured at
    72 models)."""
    out = flat.index_select(-1, index.reshape(-1))
    return out.reshape(*flat.shape[:-1], *index.shape)


def _diag_phases(w: torch.Tensor, step) -> torch.Tensor:
    """A diag step's (..., d) complex phases exp(-i/2 sum_k w[idx_k] zz_k): its rzz gates
    on every basis state."""
    idx, zz = step
    phase = (w[..., idx] @ zz) * -0.5
    return torch.polar(torch.ones_like(phase), phase)


def _gather_kron(mats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., d, d) entries prod_w mats.flat[index[w, i, j]] of per-wire (..., n, 2, 2)
    matrices: kron(mats) for `kron_index`, or that matrix with rows/columns permuted
    (folded perms). Leading axes: one matrix per model."""
    return _prod0(_take(mats.reshape(*mats.shape[:-3], -1), index), dim=-3)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; for two (M, p, q) stacks one bmm: matmul would record broadcasting views
    (expand, reshape) around it, three more autograd nodes per product."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return a @ b


def _chain(mats: torch.Tensor) -> torch.Tensor:
    """mats[L-1] @ ... @ mats[0] over the leading axis of (L, ..., 2, 2) (or a list)."""
    if isinstance(mats, torch.Tensor):
        mats = mats.unbind(0)
    out = mats[0]
    for m in mats[1:]:
        out = _mm(m, out)
    return out


# Up to this many qubits a local step is one dense (d, d) matmul: for d <= 32 torch's
# per-op overhead outweighs the 2x fewer flops of the split form (measured, 1 thread).
DENSE_LOCAL_QUBITS = 5


# ---- gates as linear maps of trigonometric features --------------------------------------
# Every parameterized gate is C0 + sum_k coef[k] f[k]: f the Kronecker product of small
# per-angle feature vectors ("factors"), coef and C0 constant. Two kinds of factor, read
# from one table per weight (`FragmentSim._angles`, columns TABLE_COLUMNS):
#   half   (cos t/2, sin t/2): a rotation R_P(t) = cos(t/2) I + sin(t/2) (-i P);
#   phase  (1, cos t, sin t):  the phase gate P(t) = diag(1, e^{it}) = E00 + cos t E11
#                              + sin t (i E11).
# U3(th, ph, la) = P(ph) RY(th) P(la) exactly (no global phase dropped), so a u3 is three
# factors, 3 * 2 * 3 = 18 features, and CU3 = |0><0| (x) I + |1><1| (x) U3 the same with
# a constant. A fused run of gates is multilinear in the Kronecker product of all its
# factors: one gather + one product give every feature, one real matmul every matrix --
# a handful of autograd nodes per step instead of a dozen small complex ops per gate.
TABLE_COLUMNS = {"half": (0, 1), "phase": (2, 3, 4)}
_E00 = torch.tensor([[1, 0], [0, 0]], dtype=torch.complex128)
_E11 = torch.tensor([[0, 0], [0, 1]], dtype=torch.complex128)
_PHASE_BASIS = torch.stack([_E00, _E11, 1j * _E11])
# gate -> (factors as (kind, angle slot, basis (size, D, D)), in the order they act)
_FACTORS = {
    **{g: [("half", 0, _ROT_BASIS[g].reshape(2, 2, 2))] for g in ("rx", "ry", "rz")},
    "u3": [
        ("phase", 2, _PHASE_BASIS),
        ("half", 0, _ROT_BASIS["ry"].reshape(2, 2, 2)),
        ("phase", 1, _PHASE_BASIS),
    ],
    **{
        g: [("half", 0, torch.stack([torch.eye(4, dtype=torch.complex128), -1j * p]))]
        for g, p in (("rzz", _ZZ), ("rxx", _XX), ("rzx", _ZX))
    },
}
_FACTORS["cu3"] = _FACTORS["u3"]  # controlled: see _gate_terms


@functools.cache
def _gate_terms(gate: str) -> tuple[list[tuple[str, int]], torch.Tensor, torch.Tensor | None]:
    """(factors [(kind, angle slot)], coef (K, D, D), C0 (D, D) or None) with
    gate = C0 + sum_k coef[k] f[k], f the Kronecker product of the factors' feature
    vectors, factor 0 the least significant digit of k."""
    factors = _FACTORS[gate]
    coef = _product_terms([basis for _, _, basis in factors])
    const = None
    if gate == "cu3":  # control = the op's first wire, the more significant bit
        coef = torch.stack([torch.kron(_E11, m) for m in coef])
        const = torch.kron(_E00, torch.eye(2, dtype=torch.complex128))
    return [(kind, slot) for kind, slot, _ in factors], coef, const


def _product_terms(bases: list[torch.Tensor]) -> torch.Tensor:
    """(prod sizes, D, D): entry k = B_{L-1}[k_{L-1}] @ ... @ B_0[k_0], k in mixed radix
    (digit 0 least significant): the coefficients of a product of factors linear in
    their feature vectors."""
    out = torch.eye(bases[0].shape[-1], dtype=torch.complex128)[None]
    for basis in bases:  # new digit more significant: index = digit * len(out) + old
        out = (basis[:, None] @ out[None]).reshape(-1, *out.shape[1:])
    return out


def _feature_index(factors: list[tuple[str, torch.Tensor]], width: int) -> torch.Tensor:
    """(F, *shape, K): position in the flattened angle table (..., P+1, width) of factor
    f's value for feature k, where each factor is (kind, weight index (*shape), -1 = no
    gate: the padding angle 0 in the table's last row, i.e. the identity)."""
    sizes = [len(TABLE_COLUMNS[kind]) for kind, _ in factors]
    k = torch.arange(math.prod(sizes))
    out, radix = [], 1
    for (kind, widx), size in zip(factors, sizes):
        digit = (k // radix) % size  # (K,)
        radix *= size
        col = torch.tensor(TABLE_COLUMNS[kind])[digit]  # (K,)
        base = torch.where(widx >= 0, widx * width, -width)[..., None]  # (*shape, 1)
        out.append(base + col)
    return torch.stack(out)


def _features(tab: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """prod over factors of the table entries at `index` (F, *shape, K): (..., *shape, K)
    real, the leading axes of tab (..., P+1, width) one per model. One gather, one
    product chain."""
    return _prod0(_take(tab.reshape(*tab.shape[:-2], -1), index), dim=-index.dim())


def _as_real_columns(coef: torch.Tensor, cdtype: torch.dtype, cache: dict) -> torch.Tensor:
    """(K, D, D) complex -> (K, D * D * 2) real of cdtype's precision, kept in `cache`:
    f @ it is the matrices' (re, im) entries."""
    if cdtype not in cache:
        dtype = torch.float32 if cdtype == torch.complex64 else torch.float64
        cache[cdtype] = torch.view_as_real(coef).reshape(coef.shape[0], -1).to(dtype)
    return cache[cdtype]


def _uses_phase(gates) -> bool:
    return any(kind == "phase" for g in gates for kind, _ in _gate_terms(g)[0])


class _Local:
    """A run of single-qubit parameterized gates, fused per wire. Layer l applies one gate
    type to every wire that has an l-th gate in the run; `idx[l, wire, k]` is the weight
    index of the k-th angle (-1 = no gate there: angle 0, the identity). A wire's fused
    matrix is sum_k coef[k] f[k] (see _gate_terms), coef shared by all wires."""

    def __init__(self, ops: list[Op], n: int, width: int):
        by_wire: list[list[Op]] = [[] for _ in range(n)]
        for op in ops:
            by_wire[op.wires[0]].append(op)
        depth = max(len(v) for v in by_wire)
        self.types: list[str] = []
        idx = torch.full((depth, n, 3), -1, dtype=torch.long)
        for layer in range(depth):
            kinds = {v[layer].gate for v in by_wire if len(v) > layer}
            assert len(kinds) == 1, "a fused layer must use one gate type"  # our blocks do
            self.types.append(kinds.pop())
            for wire, v in enumerate(by_wire):
                if len(v) > layer:
                    idx[layer, wire, : len(v[layer].index)] = torch.tensor(v[layer].index)
        self.idx = idx
        factors, bases = [], []
        for layer, gate in enumerate(self.types):
            for (kind, slot), (_, _, basis) in zip(_gate_terms(gate)[0], _FACTORS[gate]):
                factors.append((kind, idx[layer, :, slot]))
                bases.append(basis)
        # the product's feature count grows as 2**L (rotations) or 18**L (u3); runs here
        # are at most three layers (blocks put an entangling layer between their runs)
        assert len(factors) <= 9, "local run too long to fuse into one feature product"
        self.feature_index = _feature_index(factors, width)  # (F, n, K)
        self.coef = _product_terms(bases)  # (K, 2, 2) complex128
        self._columns: dict = {}  # cdtype -> _as_real_columns(coef)

    def features(self, tab: torch.Tensor) -> torch.Tensor:
        """f (..., n, K) real: per wire the products of the run's factors' features. tab
        (..., P+1, width) the angle table (`FragmentSim._angles`)."""
        return _features(tab, self.feature_index)

    def matrices(self, tab: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
        """Per wire the fused 2x2 matrix, (..., n, 2, 2) complex: one real matmul
        (..., n, K) @ (K, 8 = 2x2 entries x (re, im))."""
        g = self.features(tab) @ _as_real_columns(self.coef, cdtype, self._columns)  # (.., n, 8)
        return torch.view_as_complex(g.reshape(*g.shape[:-1], 2, 2, 2))


class _Gates2q:
    """A run of one type of parameterized two-qubit gate (rxx, rzx, cu3; rzz runs are
    `diag` steps): gate j on wires[j] with weight indices idx[j]. Its matrices
    (..., m, 4, 4) are C0 + f @ coef, f (..., m, K) its features."""

    def __init__(self, gate: str, wires: list[tuple[int, int]], idx: torch.Tensor, width: int):
        self.gate, self.wires, self.idx = gate, wires, idx
        factors, self.coef, self.const = _gate_terms(gate)
        self.feature_index = _feature_index(
            [(kind, idx[:, slot]) for kind, slot in factors], width
        )  # (F, m, K)
        self._columns: dict = {}  # cdtype -> _as_real_columns(coef)
        self._embedded: dict = {}  # (cdtype, n) -> embedded coefficients (`embedded`)

    def embedded(self, tab: torch.Tensor, cdtype: torch.dtype, n: int) -> torch.Tensor:
        """The run as one (..., d, d) matrix E = E_1 @ ... @ E_m, states @ E applying the
        gates in order (row convention), E_k gate k embedded on its wires among n qubits:
        E_k[i, j] = g_k[p(j), p(i)] if the other bits of i and j agree, else 0 (p = the
        two bits of the gate's wires).

        Each E_k is linear in gate k's features (and 1, for the constant): all m of them
        come from one batched real matmul (m, rows, K + 1) @ (m, K + 1, 2 d**2) with
        constant embedded coefficients -- no gather, mask or scatter of (d, d) entries,
        whose memory traffic cost more than this matmul's arithmetic (measured)."""
        key = (cdtype, n)
        if key not in self._embedded:
            d = 2**n
            i = torch.arange(d)
            terms = torch.cat(
                [self.coef, (torch.zeros(4, 4) if self.const is None else self.const)[None]]
            ).to(torch.complex128)  # (K + 1, 4, 4)
            cols = []
            for a, b in self.wires:
                p = 2 * ((i >> a) & 1) + ((i >> b) & 1)  # the gate's basis index of i
                rest = ~((1 << a) | (1 << b))
                mask = ((i[:, None] ^ i[None, :]) & rest) == 0
                emb = terms[:, p[None, :], p[:, None]] * mask  # (K + 1, d, d)
                cols.append(torch.view_as_real(emb).reshape(emb.shape[0], -1))
            dtype = torch.float32 if cdtype == torch.complex64 else torch.float64
            self._embedded[key] = torch.stack(cols).to(dtype)  # (m, K + 1, 2 d**2)
        cols = self._embedded[key]
        m, d = len(self.wires), 2**n
        f = _features(tab, self.feature_index)  # (..., m, K)
        lead = f.shape[:-2]
        f = torch.cat([f, f.new_ones(*f.shape[:-1], 1)], dim=-1)  # the constant's feature
        f = f.reshape(-1, m, f.shape[-1]).transpose(0, 1)  # (m, rows, K + 1)
        e = torch.view_as_complex(torch.bmm(f, cols).reshape(m, -1, d, d, 2))
        return _chain(e.reshape(m, *lead, d, d).unbind(0)[::-1])  # E_1 @ ... @ E_m

    def matrices(self, tab: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
        g = _features(tab, self.feature_index) @ _as_real_columns(self.coef, cdtype, self._columns)
        g = torch.view_as_complex(g.reshape(*g.shape[:-1], 4, 4, 2))  # (..., m, 4, 4)
        return g if self.const is None else g + self.const.to(cdtype)


def _encoder_columns(gates: list[str]) -> torch.Tensor:
    """C (2, 2**L): column k is B_{L-1} ... B_0 |0> with B_l = I (bit l of k 0, the
    cos(t_l/2) term of R_l) or -i P_l (the sin term), so for the rotations R_l(t_l) on
    |0>: v = sum_k C[:, k] f[k] = C @ f, f the Kronecker product of the (cos, sin)(t_l/2)
    pairs (the same terms as a fused run's, `_product_terms`)."""
    return _product_terms([_FACTORS[g][0][2] for g in gates])[:, :, 0].T


class FragmentSim:
    """Simulates one fragment. `forward(x, w)`: x (B, n_inputs) angles, w (n_params,)
    weights -> (B, n_qubits) Pauli-Z expectation values. Differentiable in x and w.

    Many models at once (`qumos.stacked`): x (M, B, n_inputs) and w (M, n_params), model m's
    rows x[m] with its weights w[m] -> (M, B, n_qubits); per-model matrices and unitaries
    are built in one batched operation, and the batch part runs over all M * B rows in one
    call. x (M, B, n_inputs) with w (n_params,): the same weights for every model (a
    shared, e.g. frozen stolen, fragment: its unitary is built once)."""

    def __init__(self, spec: FragmentSpec, dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.n = n = spec.n_qubits
        self.d = 2**n
        self.dtype = dtype
        self.cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.lo = n // 2  # local layers: wires 0..lo-1 are the "low" block, the rest "high"
        # Encoder: input i on wire i % n, layer i // n; missing inputs are angle 0.
        enc = spec.encoder_ops()
        self.n_enc_layers = (len(enc) + n - 1) // n
        enc_gates = [enc[layer * n].gate for layer in range(self.n_enc_layers)]
        self.enc_c = _encoder_columns(enc_gates)  # (2, 2**L) complex128
        # Ansatz: compile the op list into steps (kind, payload).
        self.steps: list[tuple[str, object]] = []
        ops = spec.ansatz_ops()
        # the angle table's columns: (cos, sin) of w/2, and (1, cos, sin) of w if a gate
        # needs the phase factor (u3, cu3); see TABLE_COLUMNS
        self.table_width = 5 if _uses_phase({op.gate for op in ops if op.source == "param"}) else 2
        i = 0
        while i < len(ops):
            j = i
            if ops[i].gate in TWO_QUBIT_GATES and ops[i].source == "none":
                while j < len(ops) and ops[j].gate in TWO_QUBIT_GATES and ops[j].source == "none":
                    j += 1
                self.steps.append(("perm", self._signed_permutation(ops[i:j])))
            elif ops[i].gate in TWO_QUBIT_GATES:
                while j < len(ops) and ops[j].gate == ops[i].gate:
                    j += 1
                idx = torch.tensor([op.index for op in ops[i:j]], dtype=torch.long)  # (m, k)
                if ops[i].gate == "rzz":  # diagonal: phases exp(-i t/2 z_a z_b)
                    zz = torch.stack(
                        [self._z(a) * self._z(b) for a, b in (op.wires for op in ops[i:j])]
                    )  # (m, d)
                    self.steps.append(("diag", (idx[:, 0], zz.to(dtype))))
                else:
                    wires = [op.wires for op in ops[i:j]]
                    gates = _Gates2q(ops[i].gate, wires, idx, self.table_width)
                    self.steps.append(("gates2q", gates))
            else:
                while j < len(ops) and ops[j].gate not in TWO_QUBIT_GATES:
                    j += 1
                self.steps.append(("local", _Local(ops[i:j], n, self.table_width)))
            i = j
        # A leading local step acts on the encoder's product state, wire by wire.
        self.first_local = (
            self.steps.pop(0)[1] if self.steps and self.steps[0][0] == "local" else None
        )
        # The encoder's per-wire T = G @ C (see encode); with G = sum_k coef[k] f_g[k] it is
        # one real matmul f_g (n, K) @ D (K, 2**L * 4), D[k] = coef[k] @ C laid out as T's
        # (re, im) columns.
        self.first_enc = None
        if self.first_local is not None:
            d_k = self.first_local.coef @ self.enc_c  # (K, 2, 2**L)
            self.first_enc = (
                torch.view_as_real(d_k.transpose(1, 2)).reshape(d_k.shape[0], -1).to(dtype)
            )
        # z_signs[idx, q] = +1 if bit q of idx is 0 else -1, (d, n); each row twice, for
        # the real and imaginary part of amplitude idx: (2d, n).
        z = torch.stack([self._z(q) for q in range(n)], dim=1)
        self.z_signs = z.repeat_interleave(2, dim=0).to(dtype)
        self.z_t = z.T.contiguous().to(dtype)  # (n, d)
        # kron_index[w, i, j] = position of mats[w, bit_w(i), bit_w(j)] in mats (n, 2, 2)
        # flattened, for the dense Kronecker product of per-wire 2x2 matrices (_apply_local)
        bit = (torch.arange(self.d)[None, :] >> torch.arange(n)[:, None]) & 1  # (n, d)
        self.kron_index = (
            4 * torch.arange(n)[:, None, None] + 2 * bit[:, :, None] + bit[:, None, :]
        )  # (n, d, d)
        self.state_cost = sum(self._step_cost(k, p) for k, p in self.steps)
        # For building R = U^T (the unitary path): up to DENSE_LOCAL_QUBITS a local step's
        # matrix is gathered from the per-wire 2x2s, and the signed permutations next to
        # it fold into that gather's index (and a sign): one gather + product per local
        # step instead of index operations on R and their backward.
        self.r_steps = self._fold_permutations() if self.n <= DENSE_LOCAL_QUBITS else self.steps
        # complex multiply-adds per row of R to build it (use_unitary)
        costs = [self._step_cost("local" if k == "dense" else k, p) for k, p in self.r_steps]
        if (
            self.n <= DENSE_LOCAL_QUBITS
            and self.r_steps
            and self.r_steps[0][0] in ("dense", "gates2q")
        ):
            costs = costs[1:]  # the first dense / two-qubit-run matrix is R itself
        self.build_cost = sum(costs)
        # With the C kernels, up to DENSE_LOCAL_QUBITS: R built gate by gate on the d basis
        # states (`_UnitaryC`), one call forward and one backward, no dense products.
        self.program = self._unitary_program() if self.n <= DENSE_LOCAL_QUBITS else None

    # ---- compilation helpers -------------------------------------------------------
    def _z(self, q: int) -> torch.Tensor:
        """(d,) eigenvalue of Z_q on each basis state: +1 if bit q is 0, else -1."""
        return 1.0 - 2.0 * ((torch.arange(self.d) >> q) & 1).double()

    def _signed_permutation(self, ops: list[Op]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fixed gates as (perm, sign): state_out[:, k] = sign[k] * state_in[:, perm[k]]."""
        m = torch.eye(self.d, dtype=torch.complex128)  # row j -> the gates applied to |j>
        for op in ops:
            m = self._apply_2q(m, gate_matrix(op.gate, [], torch.complex128), *op.wires)
        perm = m.abs().argmax(dim=0)  # (d,): the one nonzero row of each column
        sign = m[perm, torch.arange(self.d)]
        rebuilt = torch.zeros_like(m)
        rebuilt[perm, torch.arange(self.d)] = sign
        assert torch.equal(rebuilt, m), "cx/cz runs are signed permutations"
        sign_or_none = None if torch.all(sign == 1) else sign.to(self.cdtype)
        return perm, sign_or_none

    def _fold_permutations(self) -> list[tuple[str, object]]:
        """self.steps with every perm step merged into the local step after it (else the
        one before it) as ("dense", (local, index (n, d, d), sign (d, d) or None)), where
        the dense step's matrix M (row convention: states @ M) is gathered as
        M[i, j] = sign[i, j] * prod_w mats[w].flat[index[w, i, j]]."""
        kinds = [k for k, _ in self.steps]
        before: dict[int, tuple] = {}  # local step position -> perm applied before it
        after: dict[int, tuple] = {}
        keep: list[int] = []
        for i, (kind, payload) in enumerate(self.steps):
            if kind == "perm" and i + 1 < len(kinds) and kinds[i + 1] == "local":
                before[i + 1] = payload
            elif kind == "perm" and i > 0 and kinds[i - 1] == "local":
                after[i - 1] = payload
            else:
                keep.append(i)
        ident = (torch.arange(self.d), None)
        out = []
        for i in keep:
            kind, payload = self.steps[i]
            if kind != "local":
                out.append((kind, payload))
                continue
            (perm_a, sign_a), (perm_b, sign_b) = before.get(i, ident), after.get(i, ident)
            # s[:, perm_a] * sign_a @ K^T, then [:, perm_b] * sign_b: with inv_a the
            # inverse of perm_a, M[i, j] = sign_a[inv_a[i]] sign_b[j] K[perm_b[j], inv_a[i]]
            inv_a = torch.argsort(perm_a)
            index = self.kron_index[:, perm_b[None, :], inv_a[:, None]]  # (n, d, d)
            sign = None
            if sign_a is not None or sign_b is not None:
                sa = sign_a[inv_a] if sign_a is not None else torch.ones(self.d, dtype=self.cdtype)
                sb = sign_b if sign_b is not None else torch.ones(self.d, dtype=self.cdtype)
                sign = sa[:, None] * sb[None, :]
            out.append(("dense", (payload, index, sign)))
        return out

    def _unitary_program(self) -> kernels.UnitaryProgram | None:
        """The steps as a program of the C kernel `qk_unitary_fwd` (kernels.c): per local
        step one 2x2 per wire, per two-qubit run one 4x4 per gate, per diag step d phases
        (their entries from `_gate_entries`, in this order), perm steps as constant
        tables; None without parameterized steps."""
        ops: list[tuple[int, int, int, int]] = []
        perms: list[tuple[torch.Tensor, torch.Tensor]] = []
        off = 0
        for kind, payload in self.steps:
            if kind == "local":
                ops += [(0, wire, 0, off + 4 * wire) for wire in range(self.n)]
                off += 4 * self.n
            elif kind == "gates2q":
                kind = 4 if payload.gate == "cu3" else 1  # cu3: only its |1><1| block
                ops += [(kind, a, b, off + 16 * j) for j, (a, b) in enumerate(payload.wires)]
                off += 16 * len(payload.wires)
            elif kind == "diag":
                ops.append((2, 0, 0, off))
                off += self.d
            else:
                perm, sign = payload
                ops.append((3, 0, len(perms), 0))
                assert sign is None or bool((sign.imag == 0).all()), "cx/cz signs are real"
                perms.append((perm, torch.ones(self.d) if sign is None else sign.real.double()))
        return kernels.UnitaryProgram(self.n, ops, perms, off) if off else None

    def _gate_entries(self, w: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """The program's gate entries, (..., G) complex: every step's small matrices (or
        phases) through autograd, concatenated."""
        parts = []
        lead = tab.shape[:-2]
        for kind, payload in self.steps:
            if kind in ("local", "gates2q"):
                parts.append(payload.matrices(tab, self.cdtype).reshape(*lead, -1))
            elif kind == "diag":
                parts.append(_diag_phases(w, payload))
        return torch.cat(parts, dim=-1)

    def _unitary_kernel(self, t: torch.Tensor) -> kernels.Kernels | None:
        return None if self.program is None else _c_kernels(t)

    def unitary(self, w: torch.Tensor, wz: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """R = U^T (d, d) of the steps after the leading local one (psi_out = psi_in @ R);
        differentiable in w (autograd). w (M, P): (M, d, d), one per model. With the C
        kernels up to DENSE_LOCAL_QUBITS gate by gate (`_UnitaryC`); else through
        `r_steps`, in one batched torch operation per step."""
        kern = self._unitary_kernel(tab)
        if kern is not None:
            return _UnitaryC.apply(self._gate_entries(w, tab), self, kern)
        r = None
        for kind, payload in self.r_steps:
            if kind == "dense":
                local, index, sign = payload
                m = _gather_kron(local.matrices(tab, self.cdtype), index)
                if sign is not None:
                    m = m * sign
                r = m if r is None else _mm(r, m)
            elif kind == "gates2q" and self.n <= DENSE_LOCAL_QUBITS:
                m = payload.embedded(tab, self.cdtype, self.n)
                r = m if r is None else _mm(r, m)
            else:
                if r is None:
                    r = torch.eye(self.d, dtype=self.cdtype)
                    if w.dim() > 1:
                        r = r.expand(*w.shape[:-1], self.d, self.d)
                r = self.apply_steps(r, w, {"angles": (wz, tab)}, [(kind, payload)])
        return r

    def _step_cost(self, kind: str, payload) -> int:
        """Complex multiply-adds per state of one step (the cost model of use_unitary)."""
        d = self.d
        if kind == "local":
            if self.n <= DENSE_LOCAL_QUBITS:
                return d * d
            return d * (2 ** (self.n - self.lo) + 2**self.lo)
        if kind == "gates2q":  # dense up to DENSE_LOCAL_QUBITS (_Gates2q.embedded), else 4 d each
            return d * d if self.n <= DENSE_LOCAL_QUBITS else 4 * d * len(payload.wires)
        return d  # perm, diag

    def use_unitary(self, batch: int) -> bool:
        """Build the ansatz unitary (d rows through `r_steps`, then one (B, d) @ (d, d)
        matmul) only when that is cheaper than running the steps on the B states. Up to
        DENSE_LOCAL_QUBITS the first dense (or two-qubit run) matrix is R itself, and
        signed permutations are folded away: building R then costs a product per further
        step. (Counting every step made 4-qubit fragments at the attacker's ~22 images
        run the state path, 0-35% slower per training step than this one, measured.)"""
        if self.program is not None and self.dtype in _C_DTYPES and kernels.get() is not None:
            return True  # R in one C call: cheaper than the steps on any batch
        return self.d * self.build_cost + batch * self.d**2 < batch * self.state_cost

    # ---- state preparation ---------------------------------------------------------
    def _encoder_default_t(self) -> torch.Tensor:
        """T = C per wire as (re, im) columns, (n, 2**L, 4): no leading local step."""
        t = self.enc_c.to(self.cdtype).expand(self.n, 2, -1)  # (n, 2, 2**L)
        return torch.view_as_real(t.transpose(1, 2)).reshape(self.n, -1, 4)

    def encode(self, x: torch.Tensor, t_ri: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_inputs) angles -> (B, d) product state; `t_ri` (n, 2**L, 4): T = G @ C
        per wire as (re, im) columns (`_encoder_t`), G the ansatz's leading local step;
        None: no leading local step. Differentiable in x and t_ri (`_Encode`).

        Per wire the encoded vector is multilinear in the (cos, sin) of its L half-angles
        (see `_encoder_columns`): v = G @ C @ f with f (2**L,) their Kronecker product, C
        constant and G the wire's matrix of the leading local step. So all B * n vectors
        come from one real batched matmul, f (n, B, 2**L) @ T (n, 2**L, 4).
        """
        if t_ri is None:
            t_ri = self._encoder_default_t()
        return _Encode.apply(x, t_ri, self)

    # ---- steps on states (rows) ------------------------------------------------------
    def _apply_2q(self, s: torch.Tensor, m: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Apply a 4x4 gate m (basis |a b>, a more significant) on wires a, b of (B, d)
        states; or per model: m (M, 4, 4) on (M, B, d)."""
        hi, lo = max(a, b), min(a, b)
        # t axes: z batch, x above hi, r = bit hi, y between, s = bit lo, u below lo
        eq = "pqrs,zxrysu->zxpyqu" if a == hi else "pqsr,zxrysu->zxqypu"
        if m.dim() == 2 and s.dim() == 2:  # one model
            t = s.reshape(s.shape[0], 2 ** (self.n - 1 - hi), 2, 2 ** (hi - lo - 1), 2, 2**lo)
            return torch.einsum(eq, m.reshape(2, 2, 2, 2), t).reshape(s.shape)
        # a leading model axis (on m, s or both: broadcast)
        t = s.reshape(*s.shape[:-1], 2 ** (self.n - 1 - hi), 2, 2 ** (hi - lo - 1), 2, 2**lo)
        g = m.reshape(*m.shape[:-2], 2, 2, 2, 2)  # [a_out, b_out, a_in, b_in]
        eq = "..." + eq.replace(",", ",...").replace("->", "->...")
        return torch.einsum(eq, g, t).reshape(s.shape)

    def _apply_local(self, s: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
        """Per-wire 2x2 matrices (..., n, 2, 2) on (..., B, d): kron(high) @ S @
        kron(low)^T, or one dense (d, d) matmul up to DENSE_LOCAL_QUBITS (fewer, larger ops
        win there)."""
        if self.n <= DENSE_LOCAL_QUBITS:
            # kron(mats)[i, j] = prod_w mats[w, bit_w(i), bit_w(j)]: one gather, one product
            kron = _gather_kron(mats, self.kron_index)  # (..., d, d)
            return s @ kron.transpose(-1, -2)
        k_lo = _kron_all(mats[..., : self.lo, :, :])  # (..., 2**lo, 2**lo)
        k_hi = _kron_all(mats[..., self.lo :, :, :])  # (..., 2**hi, 2**hi)
        t = s.reshape(*s.shape[:-1], -1, 2**self.lo)  # (..., B, 2**hi, 2**lo)
        if mats.dim() > 3:  # per model: broadcast over the batch axis
            k_lo, k_hi = k_lo.unsqueeze(-3), k_hi.unsqueeze(-3)
        t = torch.matmul(k_hi, t @ k_lo.transpose(-1, -2))
        return t.reshape(s.shape)

    def apply_steps(
        self,
        state: torch.Tensor,
        w: torch.Tensor,
        cache: dict | None = None,
        steps: list | None = None,
    ) -> torch.Tensor:
        """Apply the ansatz steps (all but a leading local step; or `steps`) to states
        (B, d); or per model: w (M, P), states (M, B, d)."""
        wz, tab = self._angles(w) if cache is None else cache["angles"]
        for kind, step in self.steps if steps is None else steps:
            if kind == "local":
                state = self._apply_local(state, step.matrices(tab, self.cdtype))
            elif kind == "perm":
                perm, sign = step
                state = state[..., perm] if sign is None else state[..., perm] * sign
            elif kind == "diag":
                phases = _diag_phases(w, step)  # (..., d)
                if phases.dim() > 1:
                    phases = phases.unsqueeze(-2)  # per model: over its batch
                state = state * phases
            else:
                if self.n <= DENSE_LOCAL_QUBITS:
                    state = _mm(state, step.embedded(tab, self.cdtype, self.n))
                    continue
                mats = step.matrices(tab, self.cdtype)  # (..., m, 4, 4)
                for m, (w0, w1) in zip(mats.unbind(-3), step.wires):  # one autograd node
                    state = self._apply_2q(state, m, w0, w1)
        return state

    def _angles(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w padded with a 0 (index -1 = no gate), and its table of trigonometric features
        (TABLE_COLUMNS): (..., P+1) and (..., P+1, width) real, width 2 (cos, sin of w/2)
        or 5 (and 1, cos w, sin w)."""
        pad = w.new_zeros(1) if w.dim() == 1 else w.new_zeros(*w.shape[:-1], 1)
        wz = torch.cat([w, pad], dim=-1)  # (..., P+1)
        half = wz / 2
        cols = [torch.cos(half), torch.sin(half)]
        if self.table_width == 5:
            cols += [torch.ones_like(wz), torch.cos(wz), torch.sin(wz)]
        return wz, torch.stack(cols, dim=-1)

    def _encoder_t(self, wz: torch.Tensor, tab: torch.Tensor) -> torch.Tensor | None:
        """T = G @ C of `encode`, (..., n, 2**L, 4) real, or None without a leading local
        step."""
        if self.first_local is None:
            return None
        t = self.first_local.features(tab) @ self.first_enc  # (..., n, 2**L * 4)
        return t.reshape(*wz.shape[:-1], self.n, -1, 4)

    def unitary_rows(self, w: torch.Tensor) -> torch.Tensor:
        """R = U^T, (d, d), for the steps after the leading local one: row j is U|j>, so
        psi_out = psi_in @ R."""
        wz, tab = self._angles(w)
        return self.unitary(w, wz, tab)

    def statevector(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(B, d) final states."""
        wz, tab = self._angles(w)
        psi = self.encode(x, self._encoder_t(wz, tab))
        if not self.steps:
            return psi
        cache = {"angles": (wz, tab)}
        if self.use_unitary(x.shape[0]):
            return psi @ self.unitary(w, wz, tab)
        return self.apply_steps(psi, w, cache)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        w = w.to(self.dtype)
        if w.dim() == 2 and (x.dim() != 3 or x.shape[0] != w.shape[0]):
            raise ValueError(
                f"per-model weights {tuple(w.shape)} need inputs (M, B, n_inputs) "
                f"with M = {w.shape[0]}; got {tuple(x.shape)}"
            )
        wz, tab = self._angles(w)
        t_ri = self._encoder_t(wz, tab)
        if t_ri is None:
            t_ri = self._encoder_default_t()
        if not self.steps or self.use_unitary(x.shape[-2]):
            # data-independent part (t_ri, R) through autograd; the batch part in one
            # hand-differentiated function
            r = self.unitary(w, wz, tab) if self.steps else None
            return _EncodeUnitaryReadout.apply(x, t_ri, r, self)
        psi = _Encode.apply(x, t_ri, self)
        return _Readout.apply(self.apply_steps(psi, w, {"angles": (wz, tab)}), self)

    __call__ = forward


# ---- the batch part, differentiated by hand ---------------------------------------------
# Autograd records every small op and replays it backward; at 4 qubits that bookkeeping,
# not the arithmetic, was most of a step's time. The functions below run the data-dependent
# part (encoder, psi @ R, readout) without a graph and compute its gradients directly.
# Complex gradients follow torch's convention: for a real loss, grad z = dL/dRe z + i dL/dIm z,
# so for y = a * b: grad a = grad y * conj(b), and for Y = X @ M: grad X = grad Y @ M^H,
# grad M = X^H @ grad Y.

# Two implementations of the elementwise parts: the C kernels (`qumos.kernels`, used when
# they are available for the dtype and device; states (B, d)) and the torch functions below
# (the reference and the fallback; states (d, B): the batch is the last, contiguous axis,
# so every elementwise op runs over long rows of B values and every sum over a small axis
# adds a few such rows).


def _encode_fwd(sim: FragmentSim, x: torch.Tensor, t_ri: torch.Tensor):
    """Encoder forward without autograd: x (B, n_inputs) -> psi (d, B) complex, and what
    backward needs."""
    b, n, layers = x.shape[0], sim.n, sim.n_enc_layers
    xt = x.T  # (n_inputs, B)
    pad = layers * n - x.shape[1]
    if pad:  # missing inputs: angle 0, the identity
        xt = torch.cat([xt, xt.new_zeros(pad, b)])
    half = xt.reshape(layers, n, 1, b) * 0.5  # input i = layer i // n, wire i % n
    c, s = torch.cos(half), torch.sin(half)  # (L, n, 1, B) each
    cs = torch.cat([c, s], dim=2)  # (L, n, 2, B)
    fs = [cs[0]]  # fs[l]: Kronecker product of layers 0..l, (n, 2**(l+1), B); bit l = layer l
    for layer in range(1, layers):
        fs.append((cs[layer][:, :, None] * fs[-1][:, None]).reshape(n, -1, b))
    v_ri = torch.bmm(t_ri.transpose(1, 2), fs[-1])  # (n, 4 = (amp 0, amp 1) x (re, im), B)
    v = torch.complex(v_ri[:, 0::2], v_ri[:, 1::2])  # (n, 2, B)
    psis = [v[0]]  # psis[k]: wires 0..k, (2**(k+1), B); wire k the most significant
    for k in range(1, n):
        psis.append((v[k][:, None] * psis[-1][None]).reshape(-1, b))
    return psis[-1], (c, s, cs, fs, v, psis, pad)


def _encode_bwd(
    sim: FragmentSim, saved, t_ri: torch.Tensor, g_psi: torch.Tensor, need_x: bool, need_t: bool
):
    """Gradients w.r.t. x (B, n_inputs) and t_ri (n, 2**L, 4) from grad psi (d, B)."""
    c, s, cs, fs, v, psis, pad = saved
    n, b = sim.n, g_psi.shape[-1]
    g_v = []  # per wire (2, B), from the last wire down
    for k in range(n - 1, 0, -1):
        g = g_psi.reshape(2, -1, b)  # (2 = bit k, 2**k, B)
        g_v.append((g * psis[k - 1].conj()[None]).sum(1))
        g_psi = (g * v[k].conj()[:, None]).sum(0)  # (2**k, B)
    g_v.append(g_psi)
    g_v = torch.stack(g_v[::-1])  # (n, 2, B) complex
    g_vri = torch.stack([g_v.real, g_v.imag], dim=2).reshape(n, 4, b)  # as v_ri
    g_t = torch.bmm(fs[-1], g_vri.transpose(1, 2)) if need_t else None  # (n, 2**L, 4)
    g_x = None
    if need_x:
        g_f = torch.bmm(t_ri, g_vri)  # (n, 2**L, B)
        g_cs = []  # per layer (n, 2, B), from the last layer down
        for layer in range(len(fs) - 1, 0, -1):
            g = g_f.reshape(n, 2, -1, b)  # (n, 2 = bit of this layer, 2**layer, B)
            g_cs.append((g * fs[layer - 1][:, None]).sum(2))
            g_f = (g * cs[layer][:, :, None]).sum(1)
        g_cs.append(g_f)
        g_cs = torch.stack(g_cs[::-1])  # (L, n, 2, B)
        g_half = g_cs[:, :, 1:] * c - g_cs[:, :, :1] * s  # d cos = -sin, d sin = cos
        g_x = (g_half * 0.5).reshape(-1, b)  # (L * n, B)
        if pad:
            g_x = g_x[: g_x.shape[0] - pad]
        g_x = g_x.T
    return g_x, g_t


def _readout_fwd(sim: FragmentSim, psi: torch.Tensor):
    """<Z_q> = sum_idx |psi_idx|**2 z_q(idx); psi (d, B) -> (B, n)."""
    p = psi.real.square() + psi.imag.square()  # (d, B)
    return (sim.z_t @ p).T, psi


def _readout_bwd(sim: FragmentSim, psi: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """grad psi (d, B) complex from grad out (B, n)."""
    return (sim.z_t.T @ g_out.T) * (2 * psi)  # (d, B)


_C_DTYPES = (torch.float32, torch.float64)  # the real dtypes the C kernels take


def _c_kernels(t: torch.Tensor) -> kernels.Kernels | None:
    """The C kernels (`qumos.kernels`) if they are available and handle t's dtype and
    device, else None: the torch functions above."""
    k = kernels.get()
    return k if k is not None and k.supports(t) else None


def _per_model(x: torch.Tensor, *per: torch.Tensor | None):
    """(x[m], p[m] or the shared p, ...) per model of x (M, B, k); x itself if 2-D. A
    tensor in `per` is per model if it has one more axis than its single-model form,
    i.e. if p.dim() == its `single` dim + 1: here t_ri (3 axes) and r (2 axes)."""
    if x.dim() == 2:
        yield (x, *per)
        return
    single = (3, 2)
    for m in range(x.shape[0]):
        yield (x[m], *(p if p is None or p.dim() == nd else p[m] for p, nd in zip(per, single)))


def _join(parts: list, shared: bool, batched: bool) -> torch.Tensor | None:
    """Per-model gradients -> (M, ...) (or one, summed, for a tensor shared by all)."""
    if parts[0] is None:
        return None
    if not batched:
        return parts[0]
    return torch.stack(parts).sum(0) if shared else torch.stack(parts)


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """(..., k) as 2-D rows (..., k) -> (R, k); a no-op (no call) for 2-D tensors."""
    return t if t.dim() == 2 else t.reshape(-1, k)


def _unrows(t: torch.Tensor, like: torch.Tensor, k: int) -> torch.Tensor:
    """Rows (R, k) back to like's leading axes, (..., k)."""
    return t if like.dim() == 2 else t.reshape(*like.shape[:-1], k)


class _Encode(torch.autograd.Function):
    """psi = encode(x, t_ri), (B, d) complex; per model x (M, B, n_inputs) with t_ri
    (M, n, 2**L, 4) (or one (n, 2**L, 4) for all) -> (M, B, d)."""

    @staticmethod
    def forward(ctx, x, t_ri, sim):
        ctx.sim, ctx.kern = sim, _c_kernels(x)
        ctx.save_for_backward(x, t_ri)
        if ctx.kern is not None:  # rows model-major: model m's rows use t_ri[m]
            return _unrows(ctx.kern.encode_fwd(_rows(x, x.shape[-1]), t_ri), x, sim.d)
        ctx.saved, psis = [], []
        for xm, tm in _per_model(x, t_ri):
            psi, saved = _encode_fwd(sim, xm, tm)
            ctx.saved.append(saved)
            psis.append(psi.T.contiguous())
        return psis[0] if x.dim() == 2 else torch.stack(psis)

    @staticmethod
    def backward(ctx, g_psi):
        x, t_ri = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[:2]
        if ctx.kern is not None:
            g_x, g_t = ctx.kern.encode_bwd(
                _rows(x, x.shape[-1]), t_ri, _rows(g_psi, ctx.sim.d), need_x, need_t
            )
            return None if g_x is None else _unrows(g_x, x, x.shape[-1]), g_t, None
        g_xs, g_ts = [], []
        g_ps = [g_psi] if x.dim() == 2 else g_psi.unbind(0)
        for (_xm, tm), saved, gp in zip(_per_model(x, t_ri), ctx.saved, g_ps):
            g_x, g_t = _encode_bwd(ctx.sim, saved, tm, gp.T.contiguous(), need_x, need_t)
            g_xs.append(g_x)
            g_ts.append(g_t)
        batched = x.dim() == 3
        return (_join(g_xs, False, batched), _join(g_ts, t_ri.dim() == 3, batched), None)


class _Readout(torch.autograd.Function):
    """(..., B, d) states -> (..., B, n) <Z_q>."""

    @staticmethod
    def forward(ctx, psi, sim):
        ctx.sim, ctx.kern = sim, _c_kernels(psi)
        flat = _rows(psi, sim.d)
        if ctx.kern is not None:
            ctx.save_for_backward(flat)
            out = ctx.kern.readout_fwd(flat, sim.n)
        else:
            out, psi_t = _readout_fwd(sim, flat.T)
            ctx.save_for_backward(psi_t)
        return _unrows(out, psi, sim.n)

    @staticmethod
    def backward(ctx, g_out):
        (psi,) = ctx.saved_tensors
        g_flat = _rows(g_out, ctx.sim.n)
        if ctx.kern is not None:
            g = ctx.kern.readout_bwd(psi, g_flat)
        else:
            g = _readout_bwd(ctx.sim, psi, g_flat).T
        return _unrows(g, g_out, ctx.sim.d), None


def _eur_fwd_torch(sim: FragmentSim, x, t_ri, r):
    """The torch path of _EncodeUnitaryReadout for one model: out (B, n) and what
    backward needs."""
    psi, saved = _encode_fwd(sim, x, t_ri)  # (d, B)
    phi = psi if r is None else r.T @ psi  # (d, B)
    out, _ = _readout_fwd(sim, phi)
    return out, (saved, psi, phi)


def _eur_bwd_torch(sim: FragmentSim, state, t_ri, r, g_out, need_x, need_t, need_r):
    saved, psi, phi = state
    g_phi = _readout_bwd(sim, phi, g_out)  # (d, B)
    # phi^T = psi^T @ r: grad r = conj(psi) @ g_phi^T, grad psi^T = g_phi^T @ r^H
    g_r = psi.conj() @ g_phi.T if need_r else None  # (d, d)
    g_psi = g_phi if r is None else r.conj() @ g_phi
    g_x, g_t = _encode_bwd(sim, saved, t_ri, g_psi, need_x, need_t)
    return g_x, g_t, g_r


class _EncodeUnitaryReadout(torch.autograd.Function):
    """out = readout(encode(x, t_ri) @ r), r = U^T (d, d) or None (no ansatz steps).
    Per model: x (M, B, n_inputs), t_ri (M, n, 2**L, 4), r (M, d, d) -> (M, B, n); t_ri
    and r may be single (shared by all models)."""

    @staticmethod
    def forward(ctx, x, t_ri, r, sim):
        ctx.sim, ctx.kern = sim, _c_kernels(x)
        if ctx.kern is not None:  # one pass per block of rows; rows model-major
            ctx.segments = x.shape[0] if x.dim() == 3 else 1
            out = ctx.kern.eur_fwd(_rows(x, x.shape[-1]), t_ri, r, ctx.segments)
            ctx.save_for_backward(x, t_ri, r)
            return _unrows(out, x, sim.n)
        outs, ctx.state = [], []
        for xm, tm, rm in _per_model(x, t_ri, r):
            out, state = _eur_fwd_torch(sim, xm, tm, rm)
            outs.append(out)
            ctx.state.append(state)
        ctx.save_for_backward(x, t_ri, r)
        return outs[0] if x.dim() == 2 else torch.stack(outs)

    @staticmethod
    def backward(ctx, g_out):
        need_x, need_t, need_r = ctx.needs_input_grad[:3]
        sim = ctx.sim
        if ctx.kern is not None:
            x, t_ri, r = ctx.saved_tensors
            g_x, g_t, g_r = ctx.kern.eur_bwd(
                _rows(x, x.shape[-1]), t_ri, r, ctx.segments, _rows(g_out, sim.n),
                need_x, need_t, need_r,
            )  # fmt: skip
            return None if g_x is None else _unrows(g_x, x, x.shape[-1]), g_t, g_r, None
        x, t_ri, r = ctx.saved_tensors
        need_r = need_r and r is not None
        g_os = [g_out] if x.dim() == 2 else g_out.unbind(0)
        grads = [
            _eur_bwd_torch(sim, state, tm, rm, go, need_x, need_t, need_r)
            for (_, tm, rm), state, go in zip(_per_model(x, t_ri, r), ctx.state, g_os)
        ]
        g_x, g_t, g_r = zip(*grads)
        batched = x.dim() == 3
        return (
            _join(list(g_x), False, batched),
            _join(list(g_t), t_ri.dim() == 3, batched),
            None if not need_r else _join(list(g_r), r.dim() == 2, batched),
            None,
        )


class _UnitaryC(torch.autograd.Function):
    """R (M, d, d) complex from the gate entries g (M, G) of `FragmentSim.program` (or
    (d, d) from (G,)): the C kernels run the program on the d basis states, keeping each
    op's input state for the backward (`qk_unitary_fwd` / `qk_unitary_bwd`)."""

    @staticmethod
    def forward(ctx, g, sim, kern):
        single = g.dim() == 1
        g2 = g.reshape(1, -1) if single else g
        r, tape = kern.unitary_fwd(sim.n, sim.program, g2, tape=ctx.needs_input_grad[0])
        ctx.save_for_backward(g2, tape)
        ctx.sim, ctx.kern, ctx.single = sim, kern, single
        return r[0] if single else r

    @staticmethod
    def backward(ctx, g_r):
        g2, tape = ctx.saved_tensors
        sim = ctx.sim
        g_r = g_r.reshape(1, sim.d, sim.d) if ctx.single else g_r
        g_g = ctx.kern.unitary_bwd(sim.n, sim.program, g2, tape, g_r)
        return (g_g[0] if ctx.single else g_g), None, None


def flops_per_sample(spec: FragmentSpec, batch: int) -> float:
    """Real flops per sample, forward + backward, of the method FragmentSim uses at this
    batch size: the arithmetic a perfect implementation of *our method* cannot avoid (a
    floor for it, not for every possible simulator).

    Complex multiply-add = 8 real flops, complex multiply = 6. Per sample, forward:
    encoder per wire 2**L products f and f @ T (2**L x 4 real multiply-adds), i.e.
    ~9 * 2**L per wire (cos/sin not counted); Kronecker product ~2d complex multiplies;
    the steps (`_step_cost` complex multiply-adds per state, or on the unitary path
    d * cost / B to build U, amortised over the batch, plus d**2 for psi @ U); readout
    2d squares + 2d * n for the (B, 2d) @ (2d, n) matmul. The backward pass costs about
    twice the forward (a gradient for each operand of every product).

    (The first version counted only the unitary path, left out building U, and used a
    dense d**2 per step; the state path at small batches was therefore mis-estimated.)
    """
    sim = FragmentSim(spec)
    n, d, layers = sim.n, sim.d, sim.n_enc_layers
    encoder = n * 9 * 2**layers + 6 * 2 * d
    if sim.steps and sim.use_unitary(batch):
        steps = 8 * (d * sim.state_cost / batch + d * d)
    else:
        steps = 8 * sim.state_cost
    readout = 2 * d + 2 * (2 * d) * n
    return 3.0 * (encoder + steps + readout)


def fragment_sim(spec: FragmentSpec, dtype: torch.dtype = torch.float32) -> FragmentSim:
    """The compiled FragmentSim of spec's circuit (its params play no part), shared by
    every caller with the same circuit and dtype: compiling one takes a few milliseconds,
    as long as a few training steps of a tiny model, and an evaluation builds hundreds of
    models of one architecture. The simulator holds no weights; do not modify it."""
    return _cached_sim(json.dumps(spec.architecture(), sort_keys=True), dtype)


@functools.lru_cache(maxsize=256)
def _cached_sim(architecture: str, dtype: torch.dtype) -> FragmentSim:
    return FragmentSim(FragmentSpec.model_validate_json(architecture), dtype=dtype)


def init_params(spec: FragmentSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform in [-pi, pi), as torchquantum initialises rotation angles."""
    return (torch.rand(spec.n_params, generator=generator) * 2 - 1) * math.pi
