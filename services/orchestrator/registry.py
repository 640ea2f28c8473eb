"""What the orchestrator keeps in DATA_DIR: registered models (models/<name>.json), their
canaries (canaries/<name>.json) and the secret canary key (canary.key). Writes are
atomic; a write that fails (disk full, read-only) is a 507 and serving goes on with what
is loaded. A read-only directory at start-up is reported in `problems`, not fatal."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anyio
from pydantic import ValidationError
from qumos.errors import ServiceError
from qumos.files import atomic_write
from qumos.spec import ModelSpec
from qumos.wire import CanaryRequest

from services.orchestrator.canaries import Canaries


class Registry:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.models_dir = data_dir / "models"
        self.canaries_dir = data_dir / "canaries"
        self.models: dict[str, ModelSpec] = {}
        self.canaries: dict[str, Canaries] = {}
        self.problems: list[str] = []

    def load(self, new_key: bytes) -> bytes:
        """Startup (worker thread): the registered models and their canaries; returns the
        persisted canary key (written from `new_key` the first time)."""
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.problems.append(f"{self.models_dir}: {e.strerror}")
        key = new_key
        key_path = self.data_dir / "canary.key"
        try:
            if key_path.is_file():
                key = key_path.read_bytes()
            else:
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key)
        except OSError as e:
            self.problems.append(f"{key_path}: {e.strerror}; using a key for this run only")
        for p in sorted(self.models_dir.glob("*.json")):
            try:
                spec = ModelSpec.model_validate_json(p.read_bytes())
                self.models[spec.name] = spec
            except (ValidationError, OSError) as e:
                self.problems.append(f"{p.name}: {str(e).splitlines()[0]}")
        for name in self.models:
            p = self.canaries_dir / f"{name}.json"
            if p.is_file():
                try:
                    self.canaries[name] = Canaries(
                        CanaryRequest.model_validate_json(p.read_bytes())
                    )
                except (ValidationError, OSError) as e:
                    self.problems.append(f"canaries/{p.name}: {str(e).splitlines()[0]}")
        return key

    def model(self, name: str) -> ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise ServiceError(
                404,
                "not_found",
                f"model: {name!r} is not registered; registered: {sorted(self.models)}",
                "model",
            )
        return spec

    async def put_model(self, spec: ModelSpec, new_weights: bool = True) -> None:
        """Persist and serve `spec`. New weights make old canaries wrong: they go first,
        the company registers new ones (`new_weights=False`: a policy change keeps them)."""
        name = spec.name

        def write():
            if new_weights:
                (self.canaries_dir / f"{name}.json").unlink(missing_ok=True)
            atomic_write(self.models_dir / f"{name}.json", spec.model_dump_json(indent=1).encode())

        await self._write(write)
        if new_weights:
            self.canaries.pop(name, None)
        self.models[name] = spec

    async def put_canaries(self, name: str, req: CanaryRequest) -> Canaries:
        await self._write(
            atomic_write, self.canaries_dir / f"{name}.json", req.model_dump_json().encode()
        )
        self.canaries[name] = Canaries(req)
        return self.canaries[name]

    async def _write(self, fn, *args) -> None:
        try:
            await anyio.to_thread.run_sync(fn, *args)
        except OSError as e:
            raise storage_error(self.data_dir, e) from None


def storage_error(path: Path, e: OSError) -> ServiceError:
    kind = "full" if e.errno == errno.ENOSPC else "not writable"
    return ServiceError(
        507,
        "insufficient_storage",
        f"data_dir: {path} is {kind} ({e.strerror or e}); registered models keep serving",
        "data_dir",
    )
