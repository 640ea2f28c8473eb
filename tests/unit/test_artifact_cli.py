import json
import subprocess
import sys

import numpy as np
import pytest
from qumos.artifact import load_artifact
from qumos.errors import ArtifactError


def qumos(*args, check=True):
    r = subprocess.run(
        [sys.executable, "-m", "qumos.cli", *args], capture_output=True, text=True, timeout=600
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_artifact_round_trip(small_artifact):
    art = load_artifact(small_artifact)
    assert art.spec.n_fragments == 3
    files = sorted(p.name for p in (small_artifact / "fragments").iterdir())
    assert files == ["fragment-0.json", "fragment-1.json", "fragment-2.json"]
    company = json.loads((small_artifact / "company.json").read_text())
    assert all(f["params"] is None for f in company["fragments"])  # no quantum weights


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_corrupted_fragment_refused(small_artifact, tmp_path):
    art = _copy(small_artifact, tmp_path)
    p = art / "fragments/fragment-1.json"
    p.write_text(p.read_text().replace("0.", "0.9", 1))
    with pytest.raises(ArtifactError, match="fragment-1.json: sha256"):
        load_artifact(art)


def test_mismatched_company_refused(small_artifact, tmp_path):
    art = _copy(small_artifact, tmp_path)
    c = json.loads((art / "company.json").read_text())
    c["glue"][0]["bias"][0] += 1
    (art / "company.json").write_text(json.dumps(c))
    with pytest.raises(ArtifactError, match="company.json"):
        load_artifact(art)


def test_missing_and_bad_json(small_artifact, tmp_path):
    art = _copy(small_artifact, tmp_path)
    (art / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(art)
    with pytest.raises(ArtifactError, match="no such directory"):
        load_artifact(tmp_path / "nowhere")


def test_cli_train_and_evaluate_agree(tmp_path):
    out = tmp_path / "a"
    r = qumos("train", "--fragments", "1-1", "--epochs", "2", "--out", str(out), "--json")
    res = json.loads(r.stdout)
    assert set(res) >= {"val_acc", "test_acc", "artifact", "seconds"}
    ev_t = json.loads(qumos("evaluate", str(out), "--json").stdout)
    ev_a = json.loads(qumos("evaluate", str(out), "--backend", "aer", "--json").stdout)
    assert abs(ev_t["test_acc"] - res["test_acc"]) < 1e-9
    assert abs(ev_a["test_acc"] - ev_t["test_acc"]) < 1e-9


def test_cli_design_file(tmp_path):
    design = tmp_path / "d.yaml"
    design.write_text(
        "dataset: digits\ntask: 2\nfragments:\n  - {depth: 1}\n  - {depth: 1, "
        "block: ry_cz, reupload: true}\nhead: linear\n"
    )
    r = qumos("train", str(design), "--epochs", "1", "--out", str(tmp_path / "b"), "--json")
    assert json.loads(r.stdout)["design"] == "rxyz_cnot:1-ry_cz:1R|tanh|linear"


def test_cli_bad_input_is_clear(tmp_path):
    r = qumos("train", "--block", "nope", "--out", str(tmp_path / "c"), check=False)
    assert r.returncode == 2 and "block" in r.stderr and "Traceback" not in r.stderr
    r = qumos("evaluate", str(tmp_path / "none"), check=False)
    assert r.returncode == 2 and "no such directory" in r.stderr


def test_training_learns(small_artifact):
    art = load_artifact(small_artifact)
    assert art.metrics["test_acc"] > 0.5  # 4 classes: chance is 0.25
    assert np.isfinite(art.metrics["val_acc"])


@pytest.mark.parametrize(
    "instances, where",
    [
        ([[0.1, float("nan")]], "instances[0][1]: is nan"),
        ([[0.1, 0.2], [float("inf"), 0.0]], "instances[1][0]: is inf"),
        ([[0.1, 0.2], [0.3]], "instances: not a (batch, features) array"),
        ([0.1, 0.2], "instances: shape (2,)"),
    ],
)
def test_client_predict_refuses_bad_instances_before_sending(instances, where):
    from qumos.client import predict

    class NoNetwork:
        def post(self, *a, **k):
            raise AssertionError("nothing may be sent")

    with pytest.raises(ValueError) as e:
        predict(NoNetwork(), "http://127.0.0.1:9", "m", instances)
    assert where in str(e.value)
