"""The qiskit side: fragment -> parameterized circuit, and execution on Aer.

This is the only module of the library that imports qiskit.

`build_circuit(spec)` turns `FragmentSpec.ops()` into a `QuantumCircuit` whose inputs are
the `ParameterVector` "x" (n_inputs) and whose weights are the `ParameterVector` "w"
(n_params), plus one `SparsePauliOp` Z_q per qubit (little-endian, qubit 0 first).

`AerRunner` executes a batch on its own `AerSimulator`: the circuit is transpiled once,
and each batch binds all its parameter sets in one primitive call.
- exact (default): `EstimatorV2` with precision 0, i.e. exact expectation values
  (statevector; density matrix when a noise model is set);
- shots: `SamplerV2` with `shots` and `seed`; Z expectations from the measured bits.
A device profile (`DeviceProfile`) adds a noise model, and for a fake IBM backend its
basis gates and coupling map (the circuit is then transpiled for that device).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from qiskit import QuantumCircuit, transpile
from qiskit.circuit import ParameterVector
from qiskit.quantum_info import SparsePauliOp, Statevector
from qumos.spec import FragmentSpec

__all__ = [
    "build_circuit",
    "observables",
    "statevector_expectations",
    "AerRunner",
    "DeviceProfile",
    "FAKE_BACKENDS",
]


def build_circuit(spec: FragmentSpec) -> tuple[QuantumCircuit, ParameterVector, ParameterVector]:
    """(circuit, inputs x, weights w) of a fragment, without measurements."""
    n = spec.n_qubits
    x = ParameterVector("x", spec.n_inputs)
    w = ParameterVector("w", spec.n_params)
    qc = QuantumCircuit(n, name="fragment")
    for op in spec.ops():
        src = x if op.source == "input" else w
        a = [src[i] for i in op.index]
        g, q = op.gate, op.wires
        if g == "rx":
            qc.rx(a[0], q[0])
        elif g == "ry":
            qc.ry(a[0], q[0])
        elif g == "rz":
            qc.rz(a[0], q[0])
        elif g == "u3":
            qc.u(a[0], a[1], a[2], q[0])
        elif g == "cu3":
            qc.cu(a[0], a[1], a[2], 0.0, q[0], q[1])
        elif g == "cx":
            qc.cx(q[0], q[1])
        elif g == "cz":
            qc.cz(q[0], q[1])
        elif g == "rzz":
            qc.rzz(a[0], q[0], q[1])
        elif g == "rxx":
            qc.rxx(a[0], q[0], q[1])
        elif g == "rzx":
            qc.rzx(a[0], q[0], q[1])
        else:  # pragma: no cover - ops() only emits the gates above
            raise ValueError(f"unknown gate {g!r}")
    return qc, x, w


def observables(spec: FragmentSpec) -> list[SparsePauliOp]:
    """Z_q for q = 0..n-1 (qiskit little-endian)."""
    n = spec.n_qubits
    return [SparsePauliOp.from_sparse_list([("Z", [q], 1.0)], num_qubits=n) for q in range(n)]


def _column_order(qc: QuantumCircuit, x: ParameterVector, w: ParameterVector) -> np.ndarray:
    """For each circuit parameter (in qc.parameters order), its column in [x | w]."""
    xi = {p: i for i, p in enumerate(x)}
    wi = {p: len(x) + i for i, p in enumerate(w)}
    return np.array([xi[p] if p in xi else wi[p] for p in qc.parameters], dtype=int)


def statevector_expectations(spec: FragmentSpec, inputs: np.ndarray) -> np.ndarray:
    """Reference: `qiskit.quantum_info.Statevector` expectations, (B, n). Slow; for tests."""
    qc, x, w = build_circuit(spec)
    obs = observables(spec)
    out = np.empty((len(inputs), spec.n_qubits))
    for b, row in enumerate(np.asarray(inputs, dtype=float)):
        bind = dict(zip(x, row)) | dict(zip(w, spec.params or []))
        sv = Statevector(qc.assign_parameters(bind))
        out[b] = [sv.expectation_value(o).real for o in obs]
    return out


# ----- device profiles ----------------------------------------------------------------
FAKE_BACKENDS = ("FakeManilaV2", "FakeQuitoV2", "FakeLimaV2", "FakeBelemV2", "FakeNairobiV2")


@dataclass(frozen=True)
class DeviceProfile:
    """How a provider's simulated device differs from an ideal one.

    fake_backend: name of a fake IBM backend from qiskit-ibm-runtime (its calibration
    snapshot: noise, basis gates, coupling map). Otherwise depolarizing error rates
    for 1- and 2-qubit gates and a symmetric readout error.
    """

    fake_backend: str | None = None
    depolarizing_1q: float = 0.0
    depolarizing_2q: float = 0.0
    readout_error: float = 0.0

    @property
    def is_ideal(self) -> bool:
        return self.fake_backend is None and not (
            self.depolarizing_1q or self.depolarizing_2q or self.readout_error
        )

    def describe(self) -> dict:
        return {
            "fake_backend": self.fake_backend,
            "depolarizing_1q": self.depolarizing_1q,
            "depolarizing_2q": self.depolarizing_2q,
            "readout_error": self.readout_error,
        }


def _fake_backend(name: str):
    if name not in FAKE_BACKENDS:
        raise ValueError(f"fake_backend: unknown {name!r}; allowed: {FAKE_BACKENDS}")
    from qiskit_ibm_runtime import fake_provider

    return getattr(fake_provider, name)()


def _noise_model(profile: DeviceProfile):
    from qiskit_aer.noise import NoiseModel, ReadoutError, depolarizing_error

    if profile.fake_backend:
        return NoiseModel.from_backend(_fake_backend(profile.fake_backend))
    nm = NoiseModel()
    if profile.depolarizing_1q:
        nm.add_all_qubit_quantum_error(
            depolarizing_error(profile.depolarizing_1q, 1), ["rx", "ry", "rz", "u", "sx", "x"]
        )
    if profile.depolarizing_2q:
        nm.add_all_qubit_quantum_error(
            depolarizing_error(profile.depolarizing_2q, 2),
            ["cx", "cz", "cu", "rzz", "rxx", "rzx", "ecr"],
        )
    if profile.readout_error:
        p = profile.readout_error
        nm.add_all_qubit_readout_error(ReadoutError([[1 - p, p], [p, 1 - p]]))
    return nm


class AerRunner:
    """Runs one fragment on its own AerSimulator. Transpiles once; one call per batch.

    `run(inputs)` with inputs (B, n_inputs) returns (B, n_qubits) Z expectations.
    """

    def __init__(
        self, spec: FragmentSpec, profile: DeviceProfile | None = None, seed_transpiler: int = 0
    ):
        from qiskit_aer import AerSimulator

        if spec.params is None:
            raise ValueError("fragment has no trained params; cannot execute")
        self.spec = spec
        self.profile = profile or DeviceProfile()
        qc, x, w = build_circuit(spec)
        self.weights = np.asarray(spec.params, dtype=float)
        self.n_inputs = spec.n_inputs
        obs = observables(spec)
        self._noise = None if self.profile.is_ideal else _noise_model(self.profile)
        if self.profile.fake_backend:
            backend = _fake_backend(self.profile.fake_backend)
            if backend.num_qubits < spec.n_qubits:
                raise ValueError(
                    f"device {self.profile.fake_backend} has {backend.num_qubits} "
                    f"qubits; the fragment needs {spec.n_qubits}"
                )
            self.sim = AerSimulator.from_backend(backend)
            tqc = transpile(
                qc, backend=backend, optimization_level=1, seed_transpiler=seed_transpiler
            )
            obs = [o.apply_layout(tqc.layout) for o in obs]
        else:
            self.sim = AerSimulator(**self._backend_options())
            tqc = transpile(
                qc, backend=self.sim, optimization_level=1, seed_transpiler=seed_transpiler
            )
        self.circuit = tqc
        self.observables = obs
        self.order = _column_order(tqc, x, w)
        self.n_physical = tqc.num_qubits
        # The measured circuit for shots mode: measure the physical qubits that hold
        # logical qubits 0..n-1.
        self._phys = self._physical_qubits(tqc, spec.n_qubits)
        self._measured = None

    @staticmethod
    def _physical_qubits(tqc: QuantumCircuit, n: int) -> list[int]:
        if tqc.layout is None:
            return list(range(n))
        final = tqc.layout.final_index_layout()
        return [final[q] for q in range(n)]

    def _values(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.asarray(inputs, dtype=float)
        if inputs.ndim != 2 or inputs.shape[1] != self.n_inputs:
            raise ValueError(
                f"inputs must have shape (batch, {self.n_inputs}); got {tuple(inputs.shape)}"
            )
        full = np.concatenate(
            [inputs, np.broadcast_to(self.weights, (len(inputs), len(self.weights)))], 1
        )
        return full[:, self.order]  # (B, n_circuit_params)

    def run(
        self, inputs: np.ndarray, shots: int | None = None, seed: int | None = None
    ) -> np.ndarray:
        values = self._values(inputs)
        if shots is None:
            return self._run_exact(values)
        return self._run_shots(values, shots, seed)

    def _run_exact(self, values: np.ndarray) -> np.ndarray:
        from qiskit_aer.primitives import EstimatorV2

        est = EstimatorV2(options={"backend_options": self._backend_options()})
        obs = [self.observables]  # shape (1, n)
        pub = (self.circuit, obs, values[:, None, :])  # values (B, 1, P) -> evs (B, n)
        res = est.run([pub], precision=0.0).result()[0]
        return np.asarray(res.data.evs, dtype=float).reshape(len(values), -1)

    def _backend_options(self) -> dict:
        if self._noise is None:
            return {}
        return {"noise_model": self._noise, "method": "density_matrix"}

    def _run_shots(self, values: np.ndarray, shots: int, seed: int | None) -> np.ndarray:
        from qiskit_aer.primitives import SamplerV2

        if self._measured is None:
            m = self.circuit.copy()
            from qiskit.circuit import ClassicalRegister

            creg = ClassicalRegister(self.spec.n_qubits, "z")
            m.add_register(creg)
            for i, p in enumerate(self._phys):
                m.measure(p, creg[i])
            self._measured = m
        opts = self._backend_options()
        sampler = SamplerV2(
            default_shots=shots, seed=seed, options={"backend_options": opts} if opts else None
        )
        res = sampler.run([(self._measured, values)]).result()[0]
        bits = res.data.z.to_bool_array(order="little")  # (B, shots, n): bit q = qubit q
        if bits.ndim == 2:
            bits = bits[None]
        return 1.0 - 2.0 * bits.mean(axis=1)
