"""What the attacker holds: its own data, a breached provider's files, and the log rows.

- `attacker_data`: a seeded, stratified `fraction` of the task's training split, labelled
  (the attacker's own labelled images), and the rest of the training split, shuffled, as
  the pool of unlabelled in-distribution images: its own queries come from the front of
  the pool, and in-process evaluations draw the users' traffic (what the providers' logs
  hold) from the back, so the two never overlap. The test split only scores thefts.
- `breach(dir)`: a provider's data directory read as an insider would (its fragments and
  its whole `access.jsonl`).
- `holdings_in_process(victim, j, traffic)`: the same holdings computed in process for an
  evaluation without services: fragment j and a log of the users' `traffic` rows as
  provider j would have executed them (no canaries, no timing).
- `LogRows`: the access log of one fragment as arrays (inputs, outputs, entry of each row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qumos.artifact import FragmentFile
from qumos.datasets import TaskData
from qumos.errors import AttackError
from qumos.spec import ModelSpec


# ----- the attacker's own data -------------------------------------------------------------
@dataclass
class AttackerData:
    x: np.ndarray  # (n, F) features of the labelled images
    y: np.ndarray  # (n,) their labels
    raw: np.ndarray  # (n, H*W) the labelled images
    pool: np.ndarray  # indices into data.train not labelled, seeded order

    def queries(self, data: TaskData, n: int) -> np.ndarray:
        """Indices of the attacker's own `n` query images (front of the pool)."""
        if n > len(self.pool):
            raise AttackError(
                f"queries: {n} is more than the {len(self.pool)} unlabelled "
                f"images of the {data.dataset}-{data.task} training split"
            )
        return self.pool[:n]

    def traffic(self, n: int, queries: int = 0) -> np.ndarray:
        """Indices of `n` users' images (back of the pool, disjoint from the queries)."""
        n = max(0, min(n, len(self.pool) - queries))
        return self.pool[len(self.pool) - n :]


def attacker_data(data: TaskData, fraction: float, seed: int) -> AttackerData:
    """A seeded random `fraction` of data.train, stratified by class (at least one per
    class); the rest of data.train, shuffled, is the unlabelled pool."""
    rng = np.random.default_rng(10_007 + seed)
    y = data.train.y
    n_total = len(y)
    n_want = max(1, int(round(fraction * n_total)))
    chosen: list[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(n_want * len(idx) / n_total)))
        chosen.extend(idx[:k].tolist())
    chosen_arr = rng.permutation(np.array(sorted(chosen)))
    rest = np.setdiff1d(np.arange(n_total), chosen_arr)
    return AttackerData(
        x=data.train.x[chosen_arr],
        y=y[chosen_arr],
        raw=data.train.raw[chosen_arr],
        pool=rng.permutation(rest),
    )


# ----- a breached provider --------------------------------------------------------------------
@dataclass
class LogRows:
    """One fragment's rows in a provider's access log."""

    inputs: np.ndarray  # (R, n_inputs) the angles the provider executed
    outputs: np.ndarray  # (R, n_qubits) what it returned
    entry: np.ndarray  # (R,) index of the log entry (one provider call) of each row
    times: np.ndarray  # (E,) time of each entry (nan in process)
    torn: int = 0  # entries skipped: unreadable or of another shape

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class Holdings:
    """Exactly what one breached provider holds."""

    provider: str
    fragments: list[FragmentFile]  # every fragment it hosts (of any model)
    access_log: list[dict] = field(default_factory=list)

    def fragment(self, model: str | None = None) -> FragmentFile:
        """The stolen fragment (of `model`, if the provider hosts several)."""
        cands = [f for f in self.fragments if model is None or f.model == model]
        if not cands:
            have = sorted({f.model for f in self.fragments})
            raise AttackError(
                f"model: provider {self.provider!r} holds no fragment of "
                f"{model!r}; it holds fragments of {have}"
            )
        if len(cands) > 1:
            have = [f.fragment_id for f in cands]
            raise AttackError(
                f"model: provider {self.provider!r} holds several fragments "
                f"({have}); name the model"
            )
        return cands[0]

    def rows(self, stolen: FragmentFile) -> LogRows:
        """The log rows of `stolen`'s fragment. Entries of another fragment are ignored;
        an entry whose arrays are missing or of the wrong width counts as torn."""
        f = stolen.fragment
        ins, outs, ent, torn = [], [], [], 0
        times: list[float] = []
        for e in self.access_log:
            if e.get("fragment_id") != stolen.fragment_id:
                continue
            try:
                a = np.asarray(e["inputs"], dtype=float)
                b = np.asarray(e["outputs"], dtype=float)
            except (KeyError, TypeError, ValueError):
                torn += 1
                continue
            if (
                a.ndim != 2
                or b.ndim != 2
                or len(a) != len(b)
                or a.shape[1] != f.n_inputs
                or b.shape[1] != f.n_qubits
            ):
                torn += 1
                continue
            ins.append(a)
            outs.append(b)
            ent.append(np.full(len(a), len(times)))
            times.append(float(e.get("time", np.nan)))
        if not ins:
            return LogRows(
                np.zeros((0, f.n_inputs)),
                np.zeros((0, f.n_qubits)),
                np.zeros(0, int),
                np.zeros(0),
                torn,
            )
        return LogRows(
            np.concatenate(ins), np.concatenate(outs), np.concatenate(ent), np.asarray(times), torn
        )


def check_log_model(h: Holdings, model: str) -> None:
    """A log that holds rows of `model` only under other fragment ids is from another
    model: an error naming it (an empty log is fine)."""
    ids = {e.get("fragment_id") for e in h.access_log if isinstance(e, dict)}
    ours = {f.fragment_id for f in h.fragments if f.model == model}
    if ids and not ids & ours:
        raise AttackError(
            f"access_log: provider {h.provider!r}'s log holds rows of "
            f"{sorted(i for i in ids if i)[:3]}, none of model {model!r} "
            f"(fragments {sorted(ours)}); it is the log of another model"
        )


def breach(provider_dir: Path | str) -> Holdings:
    """Read what one provider holds from its data directory, and nothing else."""
    from qumos.errors import StoreError
    from qumos.store import ProviderStore

    try:
        store = ProviderStore.open_existing(provider_dir)
    except StoreError as e:
        raise AttackError(
            f"breach: {e}; give the data directory of one provider "
            "(it holds provider.json, fragments/ and access.jsonl)"
        ) from None
    frags, problems = store.load_all()
    if not frags:
        extra = f" (unreadable: {'; '.join(problems)})" if problems else ""
        raise AttackError(
            f"breach: provider {store.name!r} at {provider_dir} holds no fragment{extra}"
        )
    return Holdings(
        provider=store.name,
        fragments=sorted(frags.values(), key=lambda f: (f.model, f.index)),
        access_log=store.read_log(),
    )


# ----- the providers' view, in process ----------------------------------------------------------
def fragment_rows(victim: ModelSpec, features: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs, outputs) of every fragment for `features`, as the providers execute them
    (the exact expectation values, computed with the torch simulator in float64)."""
    import torch
    from qumos.model import DistributedQNN

    net = DistributedQNN(victim, dtype=torch.float64)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    rows = []
    with torch.no_grad():
        a = net.encode(x)  # input hiding: fragment 0 sees the transformed angles
        for k in range(victim.n_fragments):
            h = net.sims[k](a, net.weights[k])
            rows.append((a.numpy().copy(), h.numpy().copy()))
            if k < len(net.glue):
                a = net.glue[k](h, x)
    return rows


def holdings_in_process(
    victim: ModelSpec, j: int, traffic_features: np.ndarray, batch: int = 32
) -> Holdings:
    """What provider j would hold had `victim` served `traffic_features` (in batches)."""
    if not 0 <= j < victim.n_fragments:
        raise AttackError(
            f"provider: index {j} out of range; the model has {victim.n_fragments} fragments"
        )
    if victim.fragments[j].params is None:
        raise AttackError(f"fragments[{j}]: untrained; nothing to steal")
    ff = FragmentFile(
        model=victim.name, index=j, provider=victim.placement[j], fragment=victim.fragments[j]
    )
    log: list[dict] = []
    if len(traffic_features):
        ins, outs = fragment_rows(victim, traffic_features)[j]
        for i in range(0, len(ins), batch):
            log.append(
                {
                    "fragment_id": ff.fragment_id,
                    "provider": ff.provider,
                    "inputs": ins[i : i + batch],
                    "outputs": outs[i : i + batch],
                }
            )
    return Holdings(provider=ff.provider, fragments=[ff], access_log=log)
