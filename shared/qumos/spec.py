"""The model description: the single source of truth for every simulator.

A *fragment* is a small parameterized quantum circuit held by one provider. It is
fully described by `FragmentSpec`; `FragmentSpec.ops()` expands it into a flat list of
`Op`s (gate, wires, where each angle comes from). Both the qiskit builder
(`qumos.quantum`) and the torch simulator (`qumos.torchsim`) are built from that list,
so they cannot disagree about the circuit.

Conventions (written once, here):
- Qubit order is qiskit's little-endian: qubit 0 is the least significant bit of a
  basis-state index; a statevector of n qubits has shape (2**n,).
- Fragment inputs are angles in radians, shape (B, n_inputs). Outputs are the Pauli-Z
  expectation values of qubits 0..n-1, shape (B, n_qubits), each in [-1, 1].
- Two-qubit gate matrices are written in the textbook basis |w0 w1> of the op's wires
  (w0 the more significant); e.g. `cx` on wires (c, t) has control c and target t, and
  `rzx` on wires (a, b) is exp(-i theta/2 Z_a X_b), matching qiskit's `rzx(theta, a, b)`.
- Encoder `ryzxy`: input i is angle-encoded on wire i % n with gate
  [ry, rz, rx, ry][(i // n) % 4]. For 16 inputs on 4 qubits this is exactly
  torchquantum's `4x4_ryzxy` encoder (RY, RZ, RX, RY layers).

A *distributed model* (`ModelSpec`) chains fragments with company-held classical glue:

    x --preprocess--> Q_1 --glue_1--> Q_2 --glue_2--> ... Q_K --head--> class scores
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)
from qumos.defense.policy import DEFAULT_POLICY, OutputPolicy
from qumos.errors import DesignError
from qumos.wire import format_validation_error

SCHEMA_VERSION = 1

BlockType = Literal["u3cu3", "rxyz_cnot", "ry_cz", "rzz_ry", "rzx_rxx"]
BLOCK_TYPES: tuple[str, ...] = ("u3cu3", "rxyz_cnot", "ry_cz", "rzz_ry", "rzx_rxx")
Entanglement = Literal["ring", "linear", "full"]
ENTANGLEMENTS: tuple[str, ...] = ("ring", "linear", "full")
EncoderType = Literal["ryzxy"]
GlueKind = Literal["tanh", "sin"]
GLUE_KINDS: tuple[str, ...] = ("tanh", "sin")

# Names: one rule for model names everywhere (training, the orchestrator's registration),
# the providers' rule for fragment ids ("<model>.<index>", `qumos.store`): letters, digits,
# '_', '.', '-', starting with a letter or digit (so never '.', '..' or a hidden file); a
# model name is at most 100 characters so that its fragment ids fit the providers' 128.
MAX_NAME = 100
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_NAME - 1}}}")
FRAGMENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = f"1 to {MAX_NAME} letters, digits, '_', '.' or '-', starting with a letter or digit"


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid model name (None when it is)."""
    if not isinstance(name, str):
        return f"is {type(name).__name__}; allowed: a string of {NAME_RULE}"
    if NAME_RE.fullmatch(name):
        return None
    shown = name if len(name) <= 40 else name[:40] + f"... ({len(name)} characters)"
    return f"{shown!r} is not a valid name; allowed: {NAME_RULE}"


MIN_QUBITS, MAX_QUBITS = 2, 10
MAX_DEPTH = 12
ENCODER_GATES = ("ry", "rz", "rx", "ry")
# Gates and how many angles each takes.
GATE_ARITY = {
    "rx": 1,
    "ry": 1,
    "rz": 1,
    "u3": 3,
    "cx": 0,
    "cz": 0,
    "cu3": 3,
    "rzz": 1,
    "rxx": 1,
    "rzx": 1,
}
TWO_QUBIT_GATES = frozenset({"cx", "cz", "cu3", "rzz", "rxx", "rzx"})


class Op(BaseModel):
    """One gate: its name, wires, and where its angles come from.

    `source` is "input" (angles are fragment inputs x[index]), "param" (trained weights
    w[index]) or "none" (a fixed gate such as cx).
    """

    model_config = ConfigDict(frozen=True)

    gate: str
    wires: tuple[int, ...]
    source: Literal["input", "param", "none"]
    index: tuple[int, ...] = ()


def entangling_pairs(n_qubits: int, pattern: str) -> list[tuple[int, int]]:
    """Ordered wire pairs of an entanglement pattern."""
    if pattern == "linear" or (pattern == "ring" and n_qubits == 2):
        return [(i, i + 1) for i in range(n_qubits - 1)]
    if pattern == "ring":
        return [(i, (i + 1) % n_qubits) for i in range(n_qubits)]
    if pattern == "full":
        return [(i, j) for i in range(n_qubits) for j in range(i + 1, n_qubits)]
    raise DesignError(f"entanglement: unknown pattern {pattern!r}; allowed: {ENTANGLEMENTS}")


def _finite(values: list[float] | None, field: str) -> None:
    if values is None:
        return
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{field}[{i}] is {v}; every value must be finite")


class FragmentSpec(BaseModel):
    """One quantum fragment, as deployed to one provider."""

    model_config = ConfigDict(extra="forbid")

    n_qubits: int = Field(4, description="qubits, 2 to 10")
    n_inputs: int = Field(16, description="input angles; at most 4 * n_qubits (ryzxy encoder)")
    encoder: EncoderType = Field("ryzxy", description="angle encoder, see module docstring")
    block: BlockType = Field("rxyz_cnot", description="ansatz block type")
    depth: int = Field(2, description="number of ansatz blocks, 1 to 12")
    entanglement: Entanglement = Field("ring", description="entangling pairs of each block")
    observables: list[str] | None = Field(
        None, description="Pauli-Z per qubit: ['Z0', 'Z1', ...] (the only supported readout)"
    )
    params: list[float] | None = Field(None, description="trained weights, len == n_params")

    @field_validator("n_qubits")
    @classmethod
    def _qubits(cls, v: int) -> int:
        if not MIN_QUBITS <= v <= MAX_QUBITS:
            raise ValueError(f"n_qubits is {v}; allowed: {MIN_QUBITS} to {MAX_QUBITS}")
        return v

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: int) -> int:
        if not 1 <= v <= MAX_DEPTH:
            raise ValueError(f"depth is {v}; allowed: 1 to {MAX_DEPTH}")
        return v

    @model_validator(mode="after")
    def _check(self) -> FragmentSpec:
        if not 1 <= self.n_inputs <= 4 * self.n_qubits:
            raise ValueError(
                f"n_inputs is {self.n_inputs}; the ryzxy encoder on {self.n_qubits} qubits "
                f"takes 1 to {4 * self.n_qubits} inputs"
            )
        expected_obs = [f"Z{q}" for q in range(self.n_qubits)]
        if self.observables is None:
            self.observables = expected_obs
        elif self.observables != expected_obs:
            raise ValueError(f"observables is {self.observables}; allowed: {expected_obs}")
        if self.params is not None:
            _finite(self.params, "params")
            if len(self.params) != self.n_params:
                raise ValueError(
                    f"params has {len(self.params)} values; this fragment "
                    f"({self.block}, depth {self.depth}, {self.n_qubits} qubits, "
                    f"{self.entanglement}) takes {self.n_params}"
                )
        return self

    # ----- derived structure -------------------------------------------------------
    def encoder_ops(self) -> list[Op]:
        n = self.n_qubits
        return [
            Op(gate=ENCODER_GATES[(i // n) % 4], wires=(i % n,), source="input", index=(i,))
            for i in range(self.n_inputs)
        ]

    def ansatz_ops(self) -> list[Op]:
        n = self.n_qubits
        pairs = entangling_pairs(n, self.entanglement)
        ops: list[Op] = []
        counter = 0

        def param_op(gate: str, wires: tuple[int, ...]) -> None:
            nonlocal counter
            k = GATE_ARITY[gate]
            ops.append(
                Op(gate=gate, wires=wires, source="param", index=tuple(range(counter, counter + k)))
            )
            counter += k

        for _ in range(self.depth):
            if self.block == "u3cu3":
                for q in range(n):
                    param_op("u3", (q,))
                for a, b in pairs:
                    param_op("cu3", (a, b))
            elif self.block == "rxyz_cnot":
                for q in range(n):
                    for g in ("rx", "ry", "rz"):
                        param_op(g, (q,))
                for a, b in pairs:
                    ops.append(Op(gate="cx", wires=(a, b), source="none"))
            elif self.block == "ry_cz":
                for q in range(n):
                    param_op("ry", (q,))
                for a, b in pairs:
                    ops.append(Op(gate="cz", wires=(a, b), source="none"))
            elif self.block == "rzz_ry":
                for a, b in pairs:
                    param_op("rzz", (a, b))
                for q in range(n):
                    param_op("ry", (q,))
            elif self.block == "rzx_rxx":
                for a, b in pairs:
                    param_op("rzx", (a, b))
                for a, b in pairs:
                    param_op("rxx", (a, b))
            else:  # pragma: no cover - guarded by the Literal type
                raise DesignError(f"block: unknown {self.block!r}; allowed: {BLOCK_TYPES}")
        return ops

    def ops(self) -> list[Op]:
        """Encoder ops then ansatz ops: the whole circuit before measurement."""
        return self.encoder_ops() + self.ansatz_ops()

    @property
    def n_params(self) -> int:
        return _n_params(self.block, self.n_qubits, self.depth, self.entanglement)

    def architecture(self) -> dict:
        """The description without trained values (what defines the circuit)."""
        return self.model_dump(exclude={"params"})

    def with_params(self, params: list[float]) -> FragmentSpec:
        return self.model_copy(update={"params": [float(p) for p in params]})


@functools.lru_cache(maxsize=4096)
def _n_params(block: BlockType, n_qubits: int, depth: int, entanglement: Entanglement) -> int:
    """Weights of an ansatz (what `ansatz_ops` counts), once per architecture: building the
    op list costs ~0.4 ms, and every model an evaluation builds asks for it."""
    spec = FragmentSpec.model_construct(
        n_qubits=n_qubits, block=block, depth=depth, entanglement=entanglement
    )
    return sum(len(op.index) for op in spec.ansatz_ops())


class GlueSpec(BaseModel):
    """Classical map from fragment k's outputs to fragment k+1's input angles.

    kind "tanh": angles = pi * tanh(W h + b); kind "sin": angles = pi * sin(W h + b).
    h is fragment k's outputs, with the raw features appended when `reupload` is set.
    weight has shape (out_dim, in_dim), bias (out_dim,).
    """

    model_config = ConfigDict(extra="forbid")

    kind: GlueKind = "tanh"
    reupload: bool = False
    in_dim: int
    out_dim: int
    weight: list[list[float]] | None = None
    bias: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> GlueSpec:
        if self.weight is not None:
            if len(self.weight) != self.out_dim or any(len(r) != self.in_dim for r in self.weight):
                raise ValueError(f"weight must have shape ({self.out_dim}, {self.in_dim})")
            for r in self.weight:
                _finite(r, "weight")
        if self.bias is not None:
            if len(self.bias) != self.out_dim:
                raise ValueError(f"bias must have length {self.out_dim}")
            _finite(self.bias, "bias")
        return self


class HeadSpec(BaseModel):
    """Maps the last fragment's outputs h (n values in [-1, 1]) to class scores.

    kind "readout" (default, no parameters, as in torchquantum's MNIST models): the
    n qubits are split into n_classes contiguous groups; the logit of class c is
    `scale * sum(h[group c])` (4 classes on 4 qubits: one qubit per class; 2 classes:
    sums of qubit pairs). kind "linear": logits = W h + b, trained and company-held.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["readout", "linear"] = "readout"
    n_classes: int
    in_dim: int
    scale: float = 5.0
    weight: list[list[float]] | None = None
    bias: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> HeadSpec:
        if self.n_classes < 2:
            raise ValueError(f"n_classes is {self.n_classes}; at least 2")
        if self.kind == "readout" and self.in_dim < self.n_classes:
            raise ValueError(
                f"a readout head needs at least one qubit per class: {self.in_dim} qubits, "
                f"{self.n_classes} classes; use head kind 'linear'"
            )
        if self.weight is not None:
            if len(self.weight) != self.n_classes or any(
                len(r) != self.in_dim for r in self.weight
            ):
                raise ValueError(f"weight must have shape ({self.n_classes}, {self.in_dim})")
            for r in self.weight:
                _finite(r, "weight")
        if self.bias is not None:
            _finite(self.bias, "bias")
        return self

    def readout_groups(self) -> list[list[int]]:
        per = self.in_dim // self.n_classes
        return [list(range(c * per, (c + 1) * per)) for c in range(self.n_classes)]


class PreprocessSpec(BaseModel):
    """Images (flattened, row-major) to features in [0, pi] by average pooling.

    The image is center-cropped to crop x crop (MNIST: 28 -> 24, as in torchquantum's
    MNIST examples), average-pooled to pool_to x pool_to, then scaled by pi / max_value.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["avgpool"] = "avgpool"
    image_shape: tuple[int, int] = (8, 8)
    crop: int = 8
    pool_to: int = 4
    max_value: float = 16.0

    @model_validator(mode="after")
    def _check(self) -> PreprocessSpec:
        h, w = self.image_shape
        if not (1 <= h <= 1024 and 1 <= w <= 1024):
            raise ValueError(
                f"image_shape is {list(self.image_shape)}; allowed: two sizes from 1 to 1024"
            )
        if not 1 <= self.pool_to <= min(h, w):
            raise ValueError(
                f"pool_to is {self.pool_to}; allowed: 1 to {min(h, w)} (the image's smaller side)"
            )
        if not 1 <= self.crop <= min(h, w) or self.crop % self.pool_to:
            raise ValueError(
                f"crop is {self.crop}; allowed: a multiple of pool_to "
                f"({self.pool_to}) from {self.pool_to} to {min(h, w)} (fits the "
                f"image {h}x{w})"
            )
        if not (math.isfinite(self.max_value) and self.max_value > 0):
            raise ValueError(
                f"max_value is {self.max_value}; allowed: a finite number above 0 "
                "(the dataset's largest pixel value)"
            )
        return self

    @property
    def n_raw(self) -> int:
        return self.image_shape[0] * self.image_shape[1]

    @property
    def n_features(self) -> int:
        return self.pool_to * self.pool_to


class ModelSpec(BaseModel):
    """A distributed hybrid QNN: the company's whole model."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    name: str = "qumos-model"
    dataset: str = "digits"
    task: int = 4
    classes: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)
    fragments: list[FragmentSpec]
    glue: list[GlueSpec]
    head: HeadSpec
    placement: list[str] = Field(default_factory=list, description="provider of fragment k")
    input_transform: GlueSpec | None = Field(
        None,
        description="input hiding: a company-held map features -> fragment 0's angles "
        "(pi * tanh(W x + b), trained with the model); fragment 0's provider sees only "
        "its output. None: the features go to fragment 0 in the clear",
    )
    output_policy: OutputPolicy = Field(
        default_factory=OutputPolicy,
        description="what clients see of the probabilities "
        "(the orchestrator applies it on v1 and v2)",
    )

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler):
        """The defences' fields are written only when set: a model without them dumps
        exactly as before they existed (artifacts stay byte-identical)."""
        d = handler(self)
        if isinstance(d, dict):
            if d.get("input_transform", 0) is None:
                d.pop("input_transform")
            if self.output_policy == DEFAULT_POLICY:
                d.pop("output_policy", None)
        return d

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema_version is {v}; this QuMoS reads version {SCHEMA_VERSION}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        k = len(self.fragments)
        if k < 1:
            raise ValueError("fragments: at least one fragment")
        if len(self.glue) != k - 1:
            raise ValueError(f"glue has {len(self.glue)} entries; {k} fragments need {k - 1}")
        nf = self.preprocess.n_features
        if self.fragments[0].n_inputs != nf:
            raise ValueError(
                f"fragments[0].n_inputs is {self.fragments[0].n_inputs}; the preprocessing "
                f"yields {nf} features"
            )
        for i, g in enumerate(self.glue):
            want_in = self.fragments[i].n_qubits + (nf if g.reupload else 0)
            if g.in_dim != want_in:
                raise ValueError(f"glue[{i}].in_dim is {g.in_dim}; expected {want_in}")
            if g.out_dim != self.fragments[i + 1].n_inputs:
                raise ValueError(
                    f"glue[{i}].out_dim is {g.out_dim}; fragments[{i + 1}] takes "
                    f"{self.fragments[i + 1].n_inputs} inputs"
                )
        if self.head.in_dim != self.fragments[-1].n_qubits:
            raise ValueError(
                f"head.in_dim is {self.head.in_dim}; the last fragment has "
                f"{self.fragments[-1].n_qubits} qubits"
            )
        if self.head.n_classes != len(self.classes):
            raise ValueError(
                f"head.n_classes is {self.head.n_classes}; classes has {len(self.classes)}"
            )
        if not self.placement:
            self.placement = [provider_name(i) for i in range(k)]
        if len(self.placement) != k:
            raise ValueError(f"placement has {len(self.placement)} entries; expected {k}")
        if len(set(self.placement)) != k:
            raise ValueError("placement: each fragment must be on a different provider")
        t = self.input_transform
        if t is not None and (t.reupload or t.in_dim != nf or t.out_dim != nf):
            raise ValueError(
                f"input_transform: must map the {nf} features to {nf} angles "
                f"(in_dim {nf}, out_dim {nf}, no reupload)"
            )
        pol = self.output_policy
        if pol.kind == "top_k" and pol.k is not None and pol.k > len(self.classes):
            raise ValueError(
                f"output_policy.k is {pol.k}; the model has {len(self.classes)} classes"
            )
        return self

    @property
    def n_fragments(self) -> int:
        return len(self.fragments)

    def is_trained(self) -> bool:
        return (
            all(f.params is not None for f in self.fragments)
            and all(g.weight is not None and g.bias is not None for g in self.glue)
            and (self.head.kind == "readout" or self.head.weight is not None)
            and (
                self.input_transform is None
                or (
                    self.input_transform.weight is not None
                    and self.input_transform.bias is not None
                )
            )
        )


def provider_name(k: int) -> str:
    """Default provider of fragment k: provider-a, provider-b, ..."""
    return f"provider-{chr(ord('a') + k)}"


# ----- designs: what the user (or the search engine) chooses ---------------------------
class FragmentDesign(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_qubits: int = 4
    block: BlockType = "rxyz_cnot"
    depth: int = 2
    entanglement: Entanglement = "ring"
    reupload: bool = Field(False, description="glue into this fragment also sees raw features")


class Design(BaseModel):
    """A distributed design: everything but trained values. Loadable by `qumos train`."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "digits"
    task: Annotated[int, Field(description="2 = classes {3, 6}; 4 = classes {0, 1, 2, 3}")] = 4
    fragments: list[FragmentDesign] = Field(
        default_factory=lambda: [FragmentDesign() for _ in range(3)]
    )
    glue: GlueKind = "tanh"
    head: Literal["readout", "linear"] = "readout"
    hide_inputs: bool = Field(
        False,
        description="input hiding: a company-held transform "
        "(trained with the model) before fragment 0, so that its "
        "provider never sees the features",
    )

    @field_validator("fragments")
    @classmethod
    def _nonempty(cls, v: list[FragmentDesign]) -> list[FragmentDesign]:
        if not v:
            raise ValueError("fragments: at least one fragment")
        return v

    def canonical(self) -> str:
        """A canonical string: equal designs give equal strings (the search cache key)."""
        d = self.model_dump()
        d["fragments"][0]["reupload"] = False  # the first fragment always sees raw features
        if not d["hide_inputs"]:
            del d["hide_inputs"]  # designs without hiding keep their keys (search caches)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    def short(self) -> str:
        parts = [
            f"{f.block}:{f.depth}{'R' if f.reupload and i else ''}"
            for i, f in enumerate(self.fragments)
        ]
        return ("H:" if self.hide_inputs else "") + "-".join(parts) + f"|{self.glue}|{self.head}"


def design_from_flags(
    dataset: str = "digits",
    task: int = 4,
    fragments: str = "2-2-2",
    block: str = "rxyz_cnot",
    n_qubits: int = 4,
    entanglement: str = "ring",
    glue: str = "tanh",
    head: str = "readout",
    reupload: bool = False,
    hide_inputs: bool = False,
) -> Design:
    """`--fragments 2-2-2 --block rxyz_cnot`: one fragment per depth, all of one block."""
    try:
        depths = [int(p) for p in fragments.split("-")]
    except ValueError:
        raise DesignError(
            f"fragments: {fragments!r} is not a dash-separated list of depths such as 2-2-2"
        ) from None
    return validate_design(
        dict(
            dataset=dataset,
            task=task,
            glue=glue,
            head=head,
            hide_inputs=hide_inputs,
            fragments=[
                dict(
                    n_qubits=n_qubits,
                    block=block,
                    depth=d,
                    entanglement=entanglement,
                    reupload=reupload,
                )
                for d in depths
            ],
        )
    )


def parse_short_design(text: str, dataset: str = "digits", task: int = 4) -> Design:
    """The inverse of `Design.short()` for 4-qubit ring designs: `block:depth[R]-...`
    optionally followed by `|glue|head`, e.g. `rzz_ry:4-u3cu3:2R-rxyz_cnot:5R|tanh|readout`
    (R: the glue into that fragment re-uploads the features). A part without a block
    repeats the previous one: `u3cu3:2-2-2` is three u3cu3 fragments of depth 2. A
    leading `H:` turns input hiding on (`H:rxyz_cnot:2-2-2`)."""
    text = text.strip()
    hide = text.startswith("H:")
    body, *rest = text.removeprefix("H:").split("|")
    if len(rest) not in (0, 2):
        raise DesignError(
            f"design: {text!r}; expected block:depth-... or block:depth-...|glue|head"
        )
    glue, head = rest if rest else ("tanh", "readout")
    frags: list[dict] = []
    for i, part in enumerate(body.split("-")):
        block, sep, depth = part.partition(":")
        if not sep and frags:
            block, sep, depth = frags[-1]["block"], ":", part
        reupload = depth.endswith("R")
        depth = depth.removesuffix("R")
        if not sep or not depth.isdigit():
            raise DesignError(
                f"design: fragment {i} is {part!r}; expected block:depth such "
                "as u3cu3:2 (or u3cu3:2R to re-upload the features)"
            )
        frags.append(dict(block=block, depth=int(depth), reupload=reupload))
    return validate_design(
        dict(dataset=dataset, task=task, fragments=frags, glue=glue, head=head, hide_inputs=hide)
    )


def validate_design(data: dict) -> Design:
    """Build a Design, turning pydantic errors into a DesignError naming the field."""
    from pydantic import ValidationError

    try:
        design = Design.model_validate(data)
    except ValidationError as e:
        raise DesignError(format_validation_error(e)) from None
    build_spec(design)  # checks every fragment's ranges and the chain's shapes
    return design


# Image geometry per dataset.
DATASET_IMAGES: dict[str, PreprocessSpec] = {
    "digits": PreprocessSpec(image_shape=(8, 8), crop=8, max_value=16.0),
    "mnist-small": PreprocessSpec(image_shape=(28, 28), crop=24, max_value=255.0),
    "mnist": PreprocessSpec(image_shape=(28, 28), crop=24, max_value=255.0),
    "fashion-mnist": PreprocessSpec(image_shape=(28, 28), crop=24, max_value=255.0),
    "fashion-mnist-small": PreprocessSpec(image_shape=(28, 28), crop=24, max_value=255.0),
}
TASK_CLASSES: dict[int, list[int]] = {2: [3, 6], 4: [0, 1, 2, 3]}


def fragment_inputs(k: int, n_qubits: int, n_features: int) -> int:
    """Input angles of fragment k: the features for k = 0, else min(4 * n_qubits, 16)."""
    return n_features if k == 0 else min(4 * n_qubits, 16)


def build_spec(design: Design, name: str = "qumos-model") -> ModelSpec:
    """The untrained ModelSpec of a design (parameters None). Raises DesignError."""
    from pydantic import ValidationError

    if design.dataset not in DATASET_IMAGES:
        raise DesignError(f"dataset: unknown {design.dataset!r}; allowed: {sorted(DATASET_IMAGES)}")
    if design.task not in TASK_CLASSES:
        raise DesignError(f"task: {design.task} is not a task; allowed: {sorted(TASK_CLASSES)}")
    pre = DATASET_IMAGES[design.dataset]
    nf = pre.n_features
    first = design.fragments[0].n_qubits
    if MIN_QUBITS <= first <= MAX_QUBITS and 4 * first < nf:  # (ranges: FragmentSpec)
        raise DesignError(
            f"fragments[0].n_qubits: is {first}; the first fragment takes the "
            f"{nf} features of {design.dataset} (4 per qubit), so it needs at "
            f"least {-(-nf // 4)} qubits"
        )
    try:
        frags = []
        for k, f in enumerate(design.fragments):
            try:
                frags.append(
                    FragmentSpec(
                        n_qubits=f.n_qubits,
                        n_inputs=fragment_inputs(k, f.n_qubits, nf),
                        block=f.block,
                        depth=f.depth,
                        entanglement=f.entanglement,
                    )
                )
            except ValidationError as e:
                raise DesignError(format_validation_error(e, f"fragments[{k}]")) from None
        glue = [
            GlueSpec(
                kind=design.glue,
                reupload=design.fragments[k + 1].reupload,
                in_dim=frags[k].n_qubits + (nf if design.fragments[k + 1].reupload else 0),
                out_dim=frags[k + 1].n_inputs,
            )
            for k in range(len(frags) - 1)
        ]
        classes = TASK_CLASSES[design.task]
        head = HeadSpec(kind=design.head, n_classes=len(classes), in_dim=frags[-1].n_qubits)
        hide = GlueSpec(kind=design.glue, in_dim=nf, out_dim=nf) if design.hide_inputs else None
        return ModelSpec(
            name=name,
            dataset=design.dataset,
            task=design.task,
            classes=classes,
            preprocess=pre,
            fragments=frags,
            glue=glue,
            head=head,
            input_transform=hide,
        )
    except ValidationError as e:
        raise DesignError(format_validation_error(e)) from None


def design_of(spec: ModelSpec, glue_default: str = "tanh") -> Design:
    """Recover the Design a ModelSpec was built from."""
    return Design(
        dataset=spec.dataset,
        task=spec.task,
        fragments=[
            FragmentDesign(
                n_qubits=f.n_qubits,
                block=f.block,
                depth=f.depth,
                entanglement=f.entanglement,
                reupload=bool(k and spec.glue[k - 1].reupload),
            )
            for k, f in enumerate(spec.fragments)
        ],
        glue=spec.glue[0].kind if spec.glue else glue_default,
        head=spec.head.kind,
        hide_inputs=spec.input_transform is not None,
    )
