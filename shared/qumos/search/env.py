"""The design space and the gymnasium environment of the security engine.

An action is a whole distributed design (a one-step episode, a contextual bandit):

    MultiDiscrete([n_fragments?] + [block, depth, entanglement, reupload] * max_fragments
                  + [glue, head] + [hide_inputs?])

- `n_fragments?` is present only when the user leaves the number of fragments open
  (then 2..4 fragments; fragment slots beyond the chosen count are ignored).
- the space may narrow depths, glue kinds and heads (`DesignSpace.centralized`: one
  fragment, fixed readout, so a breach of its provider is a full theft)
- depth is 1..6 (`DEPTHS`, or the space's `depths`); block/entanglement/glue index `BLOCK_TYPES`, `ENTANGLEMENTS`,
  `GLUE_KINDS`; head indexes ("readout", "linear"); reupload is 0/1 (ignored for the
  first fragment, which always sees the raw features).
- `hide_inputs?` (0/1: input hiding, a company-held transform before fragment 0) is
  present only when the space allows both (`hiding=(False, True)`); the default space
  has no hiding and its actions are unchanged.

The observation is a fixed task descriptor (dataset one-hot, classes / 4, fixed fragment
count / 4 or 0 when open): the policy learns a distribution over designs for this task.
The reward is the evaluator's score `acc_victim - lambda * max(0, max_j (A_j - S))`.

`SequentialDesignEnv` is the same space taken one fragment per step (K steps for K
fragments; the last step also chooses glue, head and hiding), with the partial design in
the observation and the reward at the last step: the value function sees what is chosen
so far, so credit reaches each fragment's choice separately (PPO with gamma = 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from qumos.errors import DesignError
from qumos.spec import (
    BLOCK_TYPES,
    DATASET_IMAGES,
    ENTANGLEMENTS,
    GLUE_KINDS,
    Design,
    FragmentDesign,
    validate_design,
)

DEPTHS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
HEADS: tuple[str, ...] = ("readout", "linear")
OPEN_FRAGMENTS: tuple[int, ...] = (2, 3, 4)
FIELDS_PER_FRAGMENT = 4  # block, depth, entanglement, reupload


@dataclass(frozen=True)
class DesignSpace:
    """Which designs the engine may choose for one task."""

    dataset: str = "digits"
    task: int = 4
    n_fragments: int | None = 3  # None: the engine chooses 2..4
    n_qubits: int = 4  # qubits of every fragment
    depths: tuple[int, ...] = DEPTHS  # allowed depths per fragment (default 1..6)
    glues: tuple[str, ...] = GLUE_KINDS  # allowed glue kinds
    heads: tuple[str, ...] = HEADS  # allowed heads (centralized: readout only)
    hiding: tuple[bool, ...] = (False,)  # input hiding off, on, or the engine's choice

    def __post_init__(self) -> None:
        if not self.depths or any(not 1 <= d <= 6 for d in self.depths):
            raise DesignError(f"depths: {self.depths}; allowed: a non-empty subset of 1 to 6")
        if not self.glues or not set(self.glues) <= set(GLUE_KINDS):
            raise DesignError(f"glues: {self.glues}; allowed: a non-empty subset of {GLUE_KINDS}")
        if not self.heads or not set(self.heads) <= set(HEADS):
            raise DesignError(f"heads: {self.heads}; allowed: a non-empty subset of {HEADS}")
        if not self.hiding or not set(self.hiding) <= {False, True}:
            raise DesignError(f"hiding: {self.hiding}; allowed: (False,), (True,) or (False, True)")
        if self.dataset not in DATASET_IMAGES:
            raise DesignError(
                f"dataset: unknown {self.dataset!r}; allowed: {sorted(DATASET_IMAGES)}"
            )
        if self.n_fragments is not None and not 1 <= self.n_fragments <= 4:
            raise DesignError(
                f"fragments: {self.n_fragments} fragments; allowed: 1 to 4 "
                "(or leave it open for 2 to 4)"
            )

    @classmethod
    def centralized(
        cls, dataset: str = "digits", task: int = 4, depths: tuple[int, ...] = DEPTHS
    ) -> DesignSpace:
        """One fragment with the fixed readout: the model keeps nothing at the company."""
        return cls(dataset, task, n_fragments=1, depths=depths, glues=("tanh",), heads=("readout",))

    @property
    def max_fragments(self) -> int:
        return self.n_fragments or max(OPEN_FRAGMENTS)

    @property
    def nvec(self) -> np.ndarray:
        head = [len(OPEN_FRAGMENTS)] if self.n_fragments is None else []
        per = [len(BLOCK_TYPES), len(self.depths), len(ENTANGLEMENTS), 2] * self.max_fragments
        hide = [len(self.hiding)] if len(self.hiding) > 1 else []
        return np.array(head + per + [len(self.glues), len(self.heads)] + hide, dtype=np.int64)

    def size(self) -> int:
        """Number of actions (an upper bound on distinct designs)."""
        return int(np.prod(self.nvec.astype(float)))

    def decode(self, action) -> Design:
        a = [int(v) for v in np.asarray(action).reshape(-1)]
        if len(a) != len(self.nvec) or any(not 0 <= v < n for v, n in zip(a, self.nvec)):
            raise DesignError(f"action: {a} is not in MultiDiscrete({self.nvec.tolist()})")
        i = 0
        if self.n_fragments is None:
            k, i = OPEN_FRAGMENTS[a[0]], 1
        else:
            k = self.n_fragments
        frags = []
        for f in range(self.max_fragments):
            b, d, e, r = a[i : i + FIELDS_PER_FRAGMENT]
            i += FIELDS_PER_FRAGMENT
            if f < k:
                frags.append(
                    FragmentDesign(
                        n_qubits=self.n_qubits,
                        block=BLOCK_TYPES[b],
                        depth=self.depths[d],
                        entanglement=ENTANGLEMENTS[e],
                        reupload=bool(r) and f > 0,
                    )
                )
        return validate_design(
            {
                "dataset": self.dataset,
                "task": self.task,
                "fragments": [f.model_dump() for f in frags],
                "glue": self.glues[a[i]],
                "head": self.heads[a[i + 1]],
                "hide_inputs": self.hiding[a[i + 2]] if len(self.hiding) > 1 else self.hiding[0],
            }
        )

    def encode(self, design: Design) -> np.ndarray:
        """An action that decodes to `design` (unused fragment slots are 0)."""
        k = len(design.fragments)
        if self.n_fragments is not None and k != self.n_fragments:
            raise DesignError(f"fragments: the design has {k}; this space has {self.n_fragments}")
        a = [OPEN_FRAGMENTS.index(k)] if self.n_fragments is None else []
        for f in range(self.max_fragments):
            if f < k:
                fd = design.fragments[f]
                a += [
                    BLOCK_TYPES.index(fd.block),
                    self.depths.index(fd.depth),
                    ENTANGLEMENTS.index(fd.entanglement),
                    int(fd.reupload and f > 0),
                ]
            else:
                a += [0, 0, 0, 0]
        a += [self.glues.index(design.glue), self.heads.index(design.head)]
        if design.hide_inputs not in self.hiding:
            raise DesignError(f"hide_inputs: {design.hide_inputs}; this space allows {self.hiding}")
        if len(self.hiding) > 1:
            a.append(self.hiding.index(design.hide_inputs))
        return np.array(a, dtype=np.int64)

    def sample(self, rng: np.random.Generator) -> Design:
        """A uniformly random action's design."""
        return self.decode(np.array([rng.integers(n) for n in self.nvec]))

    def observation(self) -> np.ndarray:
        ds = [1.0 if name == self.dataset else 0.0 for name in sorted(DATASET_IMAGES)]
        return np.array(ds + [self.task / 4.0, (self.n_fragments or 0) / 4.0], dtype=np.float32)


RewardFn = Callable[[Design], tuple[float, dict]]


class DesignEnv(gym.Env):
    """One step = choose a whole design and receive its score (then the episode ends)."""

    metadata = {"render_modes": []}

    def __init__(self, space: DesignSpace, reward_fn: RewardFn):
        super().__init__()
        self.design_space = space
        self.reward_fn = reward_fn
        self.action_space = spaces.MultiDiscrete(space.nvec)
        obs = space.observation()
        self.observation_space = spaces.Box(low=0.0, high=1.0, shape=obs.shape, dtype=np.float32)
        self._obs = obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self._obs.copy(), {}

    def pending_design(self, action) -> Design:
        """The design this step's action chooses (every step completes one)."""
        return self.design_space.decode(action)

    def step(self, action):
        design = self.design_space.decode(action)
        reward, info = self.reward_fn(design)
        info = {**info, "design": design.short(), "key": design.key()}
        return self._obs.copy(), float(reward), True, False, info


class SequentialDesignEnv(gym.Env):
    """A K-fragment design chosen one fragment per step; the reward comes at step K.

    Action (every step): MultiDiscrete([block, depth, entanglement, reupload, glue, head]
    + [hide_inputs?]); at step k the first four fields choose fragment k (re-uploading is
    ignored for fragment 0), the rest are read at the last step only.
    Observation: the task descriptor, the step one-hot (4 slots) and, per fragment slot,
    the one-hot of the chosen block, depth, entanglement and the re-upload bit (zeros
    until chosen).
    """

    metadata = {"render_modes": []}
    MAX_FRAGMENTS = 4

    def __init__(self, space: DesignSpace, reward_fn: RewardFn):
        super().__init__()
        if space.n_fragments is None:
            raise DesignError(
                "fragments: the sequential environment needs a fixed number "
                "of fragments (1 to 4); 'open' is for DesignEnv"
            )
        self.design_space = space
        self.reward_fn = reward_fn
        self.k = space.n_fragments
        nv = space.nvec
        self._tail = nv[FIELDS_PER_FRAGMENT * self.k :]  # glue, head(, hiding)
        self.action_space = spaces.MultiDiscrete(
            np.concatenate([nv[:FIELDS_PER_FRAGMENT], self._tail]).astype(np.int64)
        )
        self._per = [len(BLOCK_TYPES), len(space.depths), len(ENTANGLEMENTS), 1]
        n_obs = len(space.observation()) + self.MAX_FRAGMENTS * (1 + sum(self._per))
        self.observation_space = spaces.Box(low=0.0, high=1.0, shape=(n_obs,), dtype=np.float32)
        self._chosen: list[np.ndarray] = []

    def _obs(self) -> np.ndarray:
        step = np.zeros(self.MAX_FRAGMENTS, dtype=np.float32)
        if len(self._chosen) < self.MAX_FRAGMENTS:
            step[len(self._chosen)] = 1.0
        slots = []
        for f in range(self.MAX_FRAGMENTS):
            parts = [np.zeros(n, dtype=np.float32) for n in self._per]
            if f < len(self._chosen):
                b, d, e, r = self._chosen[f]
                parts[0][b] = parts[1][d] = parts[2][e] = 1.0
                parts[3][0] = float(r and f > 0)
            slots.append(np.concatenate(parts))
        return np.concatenate([self.design_space.observation(), step, *slots])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._chosen = []
        return self._obs(), {}

    def pending_design(self, action) -> Design | None:
        """The design this action completes, or None when it is not the last step."""
        if len(self._chosen) != self.k - 1:
            return None
        a = np.asarray(action).reshape(-1)
        frags = [*self._chosen, a[:FIELDS_PER_FRAGMENT]]
        return self.design_space.decode(np.concatenate([*frags, a[FIELDS_PER_FRAGMENT:]]))

    def step(self, action):
        design = self.pending_design(action)
        if design is None:
            self._chosen.append(np.asarray(action).reshape(-1)[:FIELDS_PER_FRAGMENT].copy())
            return self._obs(), 0.0, False, False, {}
        reward, info = self.reward_fn(design)
        self._chosen = [*self._chosen, np.zeros(FIELDS_PER_FRAGMENT, dtype=np.int64)]
        info = {**info, "design": design.short(), "key": design.key()}
        return self._obs(), float(reward), True, False, info
