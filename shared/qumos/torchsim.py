"""Batched, differentiable statevector simulator in torch, built from `FragmentSpec.ops()`.

Two facts make it fast (see the benchmark in bench/bench_simulator.py):
- the encoder is a layer of single-qubit rotations on |0...0>, so the encoded state is a
  product state: per wire a (B, 2) vector, combined by Kronecker products;
- the ansatz does not depend on the data, so its unitary U (2**n, 2**n) is built once
  per forward pass from the weights (by running the ansatz on the identity) and applied
  to the whole batch with one matmul. When the batch is smaller than 2**n the ansatz is
  applied to the batch states directly instead (same ops, less work).
The op list is compiled once into steps: a run of single-qubit gates becomes one 2x2
matrix per wire (computed for all wires at once) and, up to 8 qubits, one dense layer
matrix; a run of fixed gates (cx, cz) becomes one constant matrix.

States are (B, 2**n) complex tensors in qiskit's little-endian order.
"""

from __future__ import annotations

import math

import torch

from qumos.spec import TWO_QUBIT_GATES, FragmentSpec, Op

__all__ = ["FragmentSim", "gate_matrix"]


def _c(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype)


def gate_matrix(gate: str, angles: list[torch.Tensor], cdtype: torch.dtype) -> torch.Tensor:
    """The gate's matrix, (..., 2, 2) or (..., 4, 4); angles may be batched (...)."""
    if gate in ("rx", "ry", "rz"):
        t = angles[0]
        c = _c(torch.cos(t / 2), cdtype)
        s = _c(torch.sin(t / 2), cdtype)
        j = torch.tensor(1j, dtype=cdtype)
        if gate == "rx":
            m = [c, -j * s, -j * s, c]
        elif gate == "ry":
            m = [c, -s, s, c]
        else:
            e = torch.exp(-j * _c(t / 2, cdtype))
            z = torch.zeros_like(e)
            m = [e, z, z, e.conj()]
        return torch.stack(m, dim=-1).reshape(*t.shape, 2, 2)
    if gate in ("u3", "cu3"):
        th, ph, la = angles
        c = _c(torch.cos(th / 2), cdtype)
        s = _c(torch.sin(th / 2), cdtype)
        j = torch.tensor(1j, dtype=cdtype)
        eph = torch.exp(j * _c(ph, cdtype))
        ela = torch.exp(j * _c(la, cdtype))
        u = torch.stack([c, -ela * s, eph * s, eph * ela * c], dim=-1).reshape(*th.shape, 2, 2)
        if gate == "u3":
            return u
        m = torch.zeros(*th.shape, 4, 4, dtype=cdtype)
        m[..., 0, 0] = 1
        m[..., 1, 1] = 1
        m[..., 2:, 2:] = u
        return m
    if gate in ("rzz", "rxx", "rzx"):
        t = angles[0]
        c = _c(torch.cos(t / 2), cdtype)
        s = _c(torch.sin(t / 2), cdtype)
        j = torch.tensor(1j, dtype=cdtype)
        pauli = {"rzz": _ZZ, "rxx": _XX, "rzx": _ZX}[gate].to(cdtype)
        eye = torch.eye(4, dtype=cdtype)
        return c[..., None, None] * eye - (j * s)[..., None, None] * pauli
    if gate == "cx":
        return _CX.to(cdtype)
    if gate == "cz":
        return torch.diag(torch.tensor([1, 1, 1, -1], dtype=cdtype))
    raise ValueError(f"unknown gate {gate!r}")


_X = torch.tensor([[0, 1], [1, 0]], dtype=torch.complex128)
_Z = torch.tensor([[1, 0], [0, -1]], dtype=torch.complex128)
_ZZ = torch.kron(_Z, _Z)
_XX = torch.kron(_X, _X)
_ZX = torch.kron(_Z, _X)  # Z on the op's first wire, X on its second
_CX = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.complex128)


DENSE_MAX_QUBITS = 8  # up to here, gate layers are applied as dense (2**n, 2**n) matrices


class _Run1q:
    """A run of single-qubit parameterized gates, fused: per layer l one gate type on
    every wire, parameter indices idx[l, wire, k]; unused slots are identities."""

    def __init__(self, ops: list[Op], n: int):
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

    def matrices(self, w: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor:
        """Per wire the fused 2x2 matrix, (n, 2, 2)."""
        wz = torch.cat([w, w.new_zeros(1)])  # index -1 -> angle 0 -> identity
        m = None
        for layer, gate in enumerate(self.types):
            k = GATE_ARITY_1Q[gate]
            g = gate_matrix(gate, [wz[self.idx[layer, :, a]] for a in range(k)], cdtype)
            m = g if m is None else g @ m
        return m


GATE_ARITY_1Q = {"rx": 1, "ry": 1, "rz": 1, "u3": 3}


def _kron_all(mats: torch.Tensor) -> torch.Tensor:
    """kron(m[n-1], ..., m[0]) of (n, 2, 2): the layer's (2**n, 2**n) matrix."""
    out = mats[0]
    for k in range(1, mats.shape[0]):
        out = torch.kron(mats[k], out)
    return out


class FragmentSim:
    """Simulates one fragment. `forward(x, w)`: x (B, n_inputs) angles, w (n_params,)
    weights -> (B, n_qubits) Pauli-Z expectation values. Differentiable in x and w."""

    def __init__(self, spec: FragmentSpec, dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.n = n = spec.n_qubits
        self.dtype = dtype
        self.cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        self.dense = n <= DENSE_MAX_QUBITS
        # Encoder: input i on wire i % n, layer i // n; pad to 4 layers with angle 0.
        enc = spec.encoder_ops()
        self.enc_layers = [enc[layer * n].gate for layer in range((len(enc) + n - 1) // n)]
        # Ansatz: compile the op list into steps of three kinds.
        self.steps: list[tuple[str, object]] = []
        ops = spec.ansatz_ops()
        i = 0
        while i < len(ops):
            j = i
            if ops[i].gate in TWO_QUBIT_GATES and ops[i].source == "none":
                while j < len(ops) and ops[j].gate in TWO_QUBIT_GATES and ops[j].source == "none":
                    j += 1
                self.steps.append(("fixed", self._fixed_matrix(ops[i:j])))
            elif ops[i].gate in TWO_QUBIT_GATES:
                while j < len(ops) and ops[j].gate == ops[i].gate:
                    j += 1
                wires = [op.wires for op in ops[i:j]]
                idx = torch.tensor([op.index for op in ops[i:j]], dtype=torch.long)
                self.steps.append(("param2q", (ops[i].gate, wires, idx)))
            else:
                while j < len(ops) and ops[j].gate not in TWO_QUBIT_GATES:
                    j += 1
                self.steps.append(("run1q", _Run1q(ops[i:j], n)))
            i = j
        # z_signs[idx, q] = +1 if bit q of idx is 0 else -1.
        idx = torch.arange(2**n)
        self.z_signs = (1 - 2 * ((idx[:, None] >> torch.arange(n)[None, :]) & 1)).to(dtype)

    def _fixed_matrix(self, ops: list[Op]):
        """Fixed gates: one constant matrix R with state_out = state_in @ R (dense), or the
        gate list for large n."""
        if not self.dense:
            return [(gate_matrix(op.gate, [], self.cdtype), op.wires) for op in ops]
        state = torch.eye(2**self.n, dtype=torch.complex128)
        for op in ops:
            state = self._apply_2q(state, gate_matrix(op.gate, [], torch.complex128), *op.wires)
        return state.to(self.cdtype)

    # ---- state preparation ---------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_inputs) angles -> (B, 2**n) product state."""
        b, n = x.shape[0], self.n
        pad = len(self.enc_layers) * n - x.shape[1]
        if pad:
            x = torch.cat([x, x.new_zeros(b, pad)], dim=1)
        half = x.reshape(b, -1, n) / 2  # (B, layers, n)
        c, s = torch.cos(half).to(self.cdtype), torch.sin(half).to(self.cdtype)
        j = torch.tensor(1j, dtype=self.cdtype)
        v0 = torch.ones(b, n, dtype=self.cdtype)
        v1 = torch.zeros(b, n, dtype=self.cdtype)
        for layer, gate in enumerate(self.enc_layers):
            cl, sl = c[:, layer], s[:, layer]
            if gate == "ry":
                v0, v1 = cl * v0 - sl * v1, sl * v0 + cl * v1
            elif gate == "rx":
                v0, v1 = cl * v0 - j * sl * v1, cl * v1 - j * sl * v0
            else:  # rz
                v0, v1 = (cl - j * sl) * v0, (cl + j * sl) * v1
        v = torch.stack([v0, v1], dim=-1)  # (B, n, 2)
        psi = v[:, 0]
        for w in range(1, n):  # wire w is more significant than wires < w
            psi = (v[:, w, :, None] * psi[:, None, :]).reshape(b, -1)
        return psi

    # ---- gate application (states are rows) -------------------------------------------
    def _apply_1q(self, state: torch.Tensor, m: torch.Tensor, w: int) -> torch.Tensor:
        b = state.shape[0]
        s = state.reshape(b, 2 ** (self.n - 1 - w), 2, 2**w)
        return torch.einsum("ij,bajc->baic", m, s).reshape(b, -1)

    def _apply_2q(self, state: torch.Tensor, m: torch.Tensor, w0: int, w1: int) -> torch.Tensor:
        b = state.shape[0]
        t = state.reshape((b,) + (2,) * self.n)
        a0, a1 = 1 + (self.n - 1 - w0), 1 + (self.n - 1 - w1)
        t = torch.movedim(t, (a0, a1), (-2, -1))
        shp = t.shape
        t = (t.reshape(-1, 4) @ m.T).reshape(shp)
        t = torch.movedim(t, (-2, -1), (a0, a1))
        return t.reshape(b, -1)

    def apply_ansatz(self, state: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Apply the ansatz to a batch of states (B, 2**n)."""
        for kind, step in self.steps:
            if kind == "run1q":
                mats = step.matrices(w, self.cdtype)  # (n, 2, 2)
                if self.dense:
                    state = state @ _kron_all(mats).T
                else:
                    for wire in range(self.n):
                        state = self._apply_1q(state, mats[wire], wire)
            elif kind == "fixed":
                if self.dense:
                    state = state @ step
                else:
                    for m, wires in step:
                        state = self._apply_2q(state, m, *wires)
            else:
                gate, wires, idx = step
                mats = gate_matrix(gate, [w[idx[:, a]] for a in range(idx.shape[1])],
                                   self.cdtype)  # (m, 4, 4)
                for m, (w0, w1) in zip(mats, wires):
                    state = self._apply_2q(state, m, w0, w1)
        return state

    def unitary_rows(self, w: torch.Tensor) -> torch.Tensor:
        """R = U^T, (2**n, 2**n): row j is the state U|j>, so psi_out = psi_in @ R."""
        return self.apply_ansatz(torch.eye(2**self.n, dtype=self.cdtype), w)

    def statevector(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        psi = self.encode(x)
        if x.shape[0] >= 2**self.n:
            return psi @ self.unitary_rows(w)
        return self.apply_ansatz(psi, w)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        w = w.to(self.dtype)
        psi = self.statevector(x, w)
        probs = psi.real**2 + psi.imag**2  # (B, 2**n)
        return probs @ self.z_signs  # (B, n)

    __call__ = forward


def flops_per_sample(spec: FragmentSpec) -> float:
    """Floor estimate: real flops per sample, forward + backward, of the fused method.

    Encode (product state) ~ 6 * 2**n, apply U (complex matmul) 8 * 4**n, probabilities
    and readout ~ 2**n * (3 + 2n); the backward pass costs about twice the forward.
    The per-batch cost of building U is excluded (amortised over the batch).
    """
    d = 2**spec.n_qubits
    fwd = 6 * d + 8 * d * d + d * (3 + 2 * spec.n_qubits)
    return 3.0 * fwd


def init_params(spec: FragmentSpec, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform in [-pi, pi), as torchquantum initialises rotation angles."""
    return (torch.rand(spec.n_params, generator=generator) * 2 - 1) * math.pi
