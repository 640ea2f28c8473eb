import json
import math

import pytest
from qumos.errors import DesignError
from qumos.spec import (
    BLOCK_TYPES,
    Design,
    FragmentSpec,
    ModelSpec,
    build_spec,
    design_from_flags,
    validate_design,
)


def test_fragment_json_round_trip():
    f = FragmentSpec(n_qubits=4, n_inputs=16, block="u3cu3", depth=3)
    f = f.with_params([0.1 * i for i in range(f.n_params)])
    again = FragmentSpec.model_validate_json(f.model_dump_json())
    assert again == f
    assert again.ops() == f.ops()


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("n", [4, 8])
def test_param_count_matches_ops(block, n):
    f = FragmentSpec(n_qubits=n, n_inputs=16, block=block, depth=2)
    used = sorted(i for op in f.ansatz_ops() for i in op.index)
    assert used == list(range(f.n_params))
    assert f.n_params > 0


def test_encoder_is_torchquantum_4x4_ryzxy():
    f = FragmentSpec(n_qubits=4, n_inputs=16)
    enc = f.encoder_ops()
    gates = [op.gate for op in enc]
    assert gates == ["ry"] * 4 + ["rz"] * 4 + ["rx"] * 4 + ["ry"] * 4
    assert [op.wires[0] for op in enc] == [0, 1, 2, 3] * 4
    assert [op.index[0] for op in enc] == list(range(16))


def test_model_spec_round_trip_and_default_placement():
    spec = build_spec(design_from_flags(fragments="1-4"))
    assert spec.placement == ["provider-a", "provider-b"]
    again = ModelSpec.model_validate(json.loads(spec.model_dump_json()))
    assert again == spec


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(block="nope"), "fragments[0].block: is 'nope'; allowed: "),
        (dict(fragments="2-0-2"), "fragments[1].depth: is 0; allowed: 1 to 12"),
        (dict(n_qubits=11), "fragments[0].n_qubits: is 11; allowed: 2 to 10"),
        (dict(n_qubits=1), "fragments[0].n_qubits: is 1; allowed: 2 to 10"),
        # 16 features do not fit the encoder on 2 qubits: named by what the user set
        (dict(n_qubits=2), "fragments[0].n_qubits: is 2; the first fragment takes the 16 "),
        (dict(fragments="two"), "fragments: 'two' is not"),
        (dict(task=3), "task: 3 is not a task"),
        (dict(dataset="cifar"), "dataset: unknown 'cifar'"),
    ],
)
def test_invalid_designs_name_the_field(kwargs, field):
    """One style (`fragments[0].depth: ...`), no doubled prefix, only fields the user set."""
    with pytest.raises(DesignError) as e:
        design_from_flags(**kwargs)
    assert str(e.value).startswith(field), str(e.value)
    assert str(e.value).count(field.split(":")[0] + ":") == 1


def test_design_file_errors_one_style():
    from qumos.spec import validate_design

    for data, want in [
        ({"fragments": []}, "fragments: at least one fragment"),
        (
            {"fragments": [{"depth": 2}, {"entanglement": "star"}]},
            "fragments[1].entanglement: is 'star'; allowed: ",
        ),
        ({"fragments": [{"depth": 2, "colour": 1}]}, "fragments[0].colour: unknown field"),
    ]:
        with pytest.raises(DesignError) as e:
            validate_design(data)
        assert str(e.value).startswith(want), str(e.value)
        assert "fragments: fragments" not in str(e.value)


def test_nan_params_rejected():
    f = FragmentSpec(n_qubits=4, n_inputs=16, depth=1)
    with pytest.raises(ValueError, match=r"params\[3\]"):
        f.with_params([0.0] * 3 + [math.nan] + [0.0] * (f.n_params - 4)).model_validate(
            f.with_params([0.0] * 3 + [math.nan] + [0.0] * (f.n_params - 4)).model_dump()
        )


def test_wrong_param_count_rejected():
    with pytest.raises(ValueError, match="takes"):
        FragmentSpec(n_qubits=4, n_inputs=16, depth=1, params=[0.0])


def test_canonical_design_key_ignores_first_reupload():
    a = validate_design({"fragments": [{"reupload": True}, {"depth": 3}]})
    b = validate_design({"fragments": [{"reupload": False}, {"depth": 3}]})
    assert a.key() == b.key()
    c = validate_design({"fragments": [{}, {"depth": 3, "reupload": True}]})
    assert c.key() != a.key()
    assert isinstance(a, Design)


@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("entanglement", ["ring", "linear", "full"])
def test_cached_n_params_counts_the_ansatz_weights(block, entanglement):
    """n_params is cached per architecture; it is what the op list holds."""
    for n, depth in ((2, 1), (4, 3), (7, 2)):
        f = FragmentSpec(
            n_qubits=n, n_inputs=n, block=block, depth=depth, entanglement=entanglement
        )
        assert f.n_params == sum(len(op.index) for op in f.ansatz_ops()) > 0
