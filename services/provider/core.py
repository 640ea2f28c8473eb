"""The provider's state and logic: the fragments it holds (each with its Aer runner, the
circuit transpiled once), deploy, delete, and execute with its access-log line. No web
framework here; `routes.py` maps requests to these methods."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
import numpy as np
from qumos.artifact import FragmentFile
from qumos.errors import ServiceError, StoreError
from qumos.quantum import AerRunner, DeviceProfile
from qumos.store import ProviderStore
from qumos.wire import ExecuteRequest, FragmentInfo, FragmentList, dump_json

from services.provider.settings import ProviderSettings

log = logging.getLogger("qumos.provider")


@dataclass
class Loaded:
    file: FragmentFile
    runner: AerRunner


class ProviderState:
    def __init__(self, settings: ProviderSettings, token: str):
        self.settings = settings
        self.token = token
        self.store = ProviderStore.create(settings.data_dir, settings.name)
        self.profile = DeviceProfile(
            fake_backend=settings.device,
            depolarizing_1q=settings.depol_1q,
            depolarizing_2q=settings.depol_2q,
            readout_error=settings.readout_error,
        )
        self.fragments: dict[str, Loaded] = {}
        self.problems: list[str] = []
        self.ready = False
        self.limiter: anyio.CapacityLimiter | None = None  # made in the lifespan
        self.log_failures = 0
        self.last_log_error: str | None = None
        self.log_failure_counter = None  # prometheus Counter, set in create_app

    def load_all(self) -> None:
        """Reload every fragment from the data directory (runs in a worker thread)."""
        files, problems = self.store.load_all()
        for fid, ff in files.items():
            try:
                self.fragments[fid] = Loaded(ff, AerRunner(ff.fragment, self.profile))
            except ValueError as e:
                problems.append(f"{fid}: {e}")
        self.problems = problems
        for p in problems:
            log.error("fragment not loaded: %s", p)

    # ----- what it holds --------------------------------------------------------------------
    def info(self, fid: str) -> FragmentInfo:
        ld = self.get(fid)
        f = ld.file.fragment
        return FragmentInfo(
            fragment_id=fid,
            model=ld.file.model,
            index=ld.file.index,
            n_qubits=f.n_qubits,
            n_inputs=f.n_inputs,
            block=f.block,
            depth=f.depth,
            entanglement=f.entanglement,
            n_params=f.n_params,
            transpiled_depth=ld.runner.circuit.depth(),
        )

    def listing(self) -> FragmentList:
        return FragmentList(
            provider=self.settings.name, fragments=[self.info(f) for f in sorted(self.fragments)]
        )

    def get(self, fid: str) -> Loaded:
        ld = self.fragments.get(fid)
        if ld is None:
            raise ServiceError(
                404,
                "not_found",
                f"fragment_id: {fid!r} is not deployed on "
                f"{self.settings.name}; deployed: {sorted(self.fragments)}",
                "fragment_id",
            )
        return ld

    async def readiness(self) -> dict:
        """/readyz's body; 503 while the fragments are loading."""
        if not self.ready:
            raise ServiceError(
                503, "not_ready", f"{self.settings.name} is still loading its fragments"
            )
        return {
            "status": "ready",
            "provider": self.settings.name,
            "fragments": len(self.fragments),
            "problems": self.problems,
            "degraded": (
                [
                    (
                        f"access log: {self.log_failures} lines not written "
                        f"(last: {self.last_log_error})"
                    )
                ]
                if self.log_failures
                else []
            ),
        }

    # ----- deploy and delete ----------------------------------------------------------------
    async def deploy(self, fragment_id: str, ff: FragmentFile) -> FragmentInfo:
        """Check the fragment file against the path and this provider, transpile it and
        store it (atomic); 422 naming the field, 507 when it cannot be written."""
        name = self.settings.name
        if ff.fragment_id != fragment_id:
            raise ServiceError(
                422,
                "validation_error",
                f"fragment_id: the path says "
                f"{fragment_id!r} but the body is {ff.fragment_id!r} "
                "(model.index)",
                "fragment_id",
            )
        if ff.provider != name:
            raise ServiceError(
                422,
                "validation_error",
                f"provider: the fragment is placed on {ff.provider!r}; this is {name!r}",
                "provider",
            )
        if ff.fragment.params is None:
            raise ServiceError(
                422,
                "validation_error",
                "fragment.params: missing; a deployed fragment needs its trained parameters",
                "fragment.params",
            )

        def build_and_store() -> Loaded:
            runner = AerRunner(ff.fragment, self.profile)  # transpiled once, here
            self.store.put(ff)  # atomic write
            return Loaded(ff, runner)

        try:
            loaded = await anyio.to_thread.run_sync(build_and_store, limiter=self.limiter)
        except OSError as e:  # disk full, read-only data directory
            raise self.storage_error(f"fragment {fragment_id}", e) from None
        except (ValueError, StoreError) as e:
            raise ServiceError(422, "validation_error", f"fragment: {e}", "fragment") from None
        self.fragments[fragment_id] = loaded
        return self.info(fragment_id)

    async def delete(self, fragment_id: str) -> dict:
        self.get(fragment_id)
        try:
            await anyio.to_thread.run_sync(self.store.delete, fragment_id)
        except OSError as e:
            raise self.storage_error(f"removal of fragment {fragment_id}", e) from None
        self.fragments.pop(fragment_id, None)
        return {"deleted": fragment_id}

    def storage_error(self, what: str, e: OSError) -> ServiceError:
        return ServiceError(
            507,
            "insufficient_storage",
            f"data_dir: cannot write the {what} "
            f"in {self.settings.data_dir} ({e.strerror or e}); fragments "
            f"already deployed on {self.settings.name} keep serving",
            "data_dir",
        )

    # ----- execute --------------------------------------------------------------------------
    async def execute(self, fragment_id: str, req: ExecuteRequest) -> bytes:
        """The ExecuteResponse (JSON bytes) of one batch. Small exact batches on an ideal
        device run on the event loop (a few ms of Aer, cheaper than the ~0.6 ms hand-off
        to a thread); the rest in a worker thread (WORKERS at a time)."""
        ld = self.get(fragment_id)
        n, most = ld.file.fragment.n_inputs, self.settings.max_batch
        if not req.inputs:
            raise ServiceError(
                422,
                "validation_error",
                f"inputs: empty batch; send 1 to {most} rows of {n} values",
                "inputs",
            )
        if len(req.inputs) > most:
            raise ServiceError(
                413,
                "batch_too_large",
                f"inputs: {len(req.inputs)} rows; allowed: at most {most} per call",
                "inputs",
            )
        for i, row in enumerate(req.inputs):
            if len(row) != n:
                raise ServiceError(
                    422,
                    "validation_error",
                    f"inputs[{i}]: has {len(row)} "
                    f"values; fragment {fragment_id} takes {n} input angles",
                    f"inputs[{i}]",
                )
        if (
            req.shots is None
            and self.profile.is_ideal
            and len(req.inputs) <= self.settings.inline_rows
        ):
            return self._run(fragment_id, ld, req)  # small and exact: on the loop
        return await anyio.to_thread.run_sync(self._run, fragment_id, ld, req, limiter=self.limiter)

    def _run(self, fid: str, ld: Loaded, req: ExecuteRequest) -> bytes:
        """One Aer call for the whole batch, then the access-log line. Returns the
        ExecuteResponse as JSON (orjson straight from the arrays: at batch 256 the
        standard json module was half of a call's overhead)."""
        inputs = np.asarray(req.inputs, dtype=float)
        t0 = time.perf_counter()
        out = np.ascontiguousarray(
            ld.runner.run(inputs, shots=req.shots, seed=req.seed), dtype=float
        )
        seconds = time.perf_counter() - t0
        try:
            self.store.append_log(
                {
                    "fragment_id": fid,
                    "provider": self.settings.name,
                    "shots": req.shots,
                    "seed": req.seed,
                    "seconds": seconds,
                    "inputs": inputs,
                    "outputs": out,
                }
            )
        except OSError as e:
            self.log_failures += 1
            self.last_log_error = f"{self.store.log_path}: {e.strerror or e}"
            if self.log_failure_counter is not None:
                self.log_failure_counter.inc()
            log.error(
                "access log append failed (%s); %s",
                self.last_log_error,
                "refusing the answer"
                if self.settings.access_log_required
                else "serving the answer",
            )
            if self.settings.access_log_required:
                raise self.storage_error("access log", e) from None
        return dump_json(
            {
                "outputs": out,
                "provider": self.settings.name,
                "fragment_id": fid,
                "shots": req.shots,
                "seconds": seconds,
            }
        )
