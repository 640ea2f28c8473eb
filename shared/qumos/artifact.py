"""Artifact directory: what `qumos train` writes and everything else reads.

    ARTIFACT/
      model.json              the company's whole model (ModelSpec with all values),
                              metrics, training config, and a manifest of fragment files
      company.json            the orchestrator's part: the ModelSpec with every fragment's
                              parameters removed (chain order, glue, head, placement)
      fragments/fragment-K.json   fragment K alone, for deployment to provider K

Every file is written atomically (temp file + rename). Loading checks the schema
version, each fragment file's sha256 against the manifest, and that the fragment files
and company.json agree with model.json; a mismatch raises ArtifactError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError
from qumos.errors import ArtifactError
from qumos.files import atomic_write
from qumos.spec import SCHEMA_VERSION, FragmentSpec, ModelSpec
from qumos.wire import format_validation_error

FORMAT = "qumos-artifact"


class FragmentFile(BaseModel):
    """One fragment as deployed to a provider (the provider stores exactly this)."""

    model_config = ConfigDict(extra="forbid")

    format: str = "qumos-fragment"
    schema_version: int = SCHEMA_VERSION
    model: str
    index: int
    provider: str
    fragment: FragmentSpec

    @property
    def fragment_id(self) -> str:
        return fragment_id(self.model, self.index)


def fragment_id(model: str, index: int) -> str:
    return f"{model}.{index}"


@dataclass
class Artifact:
    path: Path
    spec: ModelSpec
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def fragment_file(self, k: int) -> FragmentFile:
        return FragmentFile(
            model=self.spec.name,
            index=k,
            provider=self.spec.placement[k],
            fragment=self.spec.fragments[k],
        )

    def company_spec(self) -> ModelSpec:
        return company_spec(self.spec)


def company_spec(spec: ModelSpec) -> ModelSpec:
    """The spec without any fragment parameters: what the orchestrator holds."""
    return spec.model_copy(
        update={"fragments": [f.model_copy(update={"params": None}) for f in spec.fragments]}
    )


def _dump(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()


def save_artifact(
    spec: ModelSpec, out: Path | str, metrics: dict | None = None, training: dict | None = None
) -> Artifact:
    out = Path(out)
    if not spec.is_trained():
        raise ArtifactError("the model has untrained parts; refusing to save it")
    art = Artifact(path=out, spec=spec, metrics=metrics or {}, training=training or {})
    manifest = []
    for k in range(spec.n_fragments):
        rel = f"fragments/fragment-{k}.json"
        data = _dump(art.fragment_file(k).model_dump(mode="json"))
        atomic_write(out / rel, data)
        manifest.append(
            {"file": rel, "provider": spec.placement[k], "sha256": hashlib.sha256(data).hexdigest()}
        )
    atomic_write(out / "company.json", _dump(company_spec(spec).model_dump(mode="json")))
    atomic_write(
        out / "model.json",
        _dump(
            {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "model": spec.model_dump(mode="json"),
                "metrics": art.metrics,
                "training": art.training,
                "fragments": manifest,
            }
        ),
    )
    return art


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


def load_artifact(path: Path | str) -> Artifact:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory (no such directory)")
    top = _read_json(path / "model.json")
    if top.get("format") != FORMAT:
        raise ArtifactError(
            f"{path / 'model.json'}: format is {top.get('format')!r}, expected {FORMAT!r}"
        )
    if top.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path / 'model.json'}: schema_version {top.get('schema_version')}; "
            f"this QuMoS reads {SCHEMA_VERSION}"
        )
    try:
        spec = ModelSpec.model_validate(top["model"])
    except (ValidationError, KeyError) as e:
        raise ArtifactError(
            f"{path / 'model.json'}: invalid model: {format_validation_error(e)}"
        ) from None
    manifest = top.get("fragments") or []
    if len(manifest) != spec.n_fragments:
        raise ArtifactError(
            f"{path / 'model.json'}: manifest lists {len(manifest)} fragments; "
            f"the model has {spec.n_fragments}"
        )
    for k, entry in enumerate(manifest):
        fpath = path / entry["file"]
        if not fpath.is_file():
            raise ArtifactError(f"{fpath}: missing")
        data = fpath.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{fpath}: sha256 does not match model.json (corrupted or edited)")
        ff = FragmentFile.model_validate_json(data)
        if ff.fragment != spec.fragments[k] or ff.index != k or ff.model != spec.name:
            raise ArtifactError(f"{fpath}: does not match fragment {k} of model.json")
    company = _read_json(path / "company.json")
    if company != company_spec(spec).model_dump(mode="json"):
        raise ArtifactError(f"{path / 'company.json'}: does not match model.json")
    return Artifact(
        path=path, spec=spec, metrics=top.get("metrics", {}), training=top.get("training", {})
    )
