"""The search's state on the host: prompts as rows (`Pool`), what a task keeps for re-measurement (`Kept`), and a
task's state from iteration to iteration (`TaskState`), which a result stores so `dream --more` continues it.

A task is one (feature, seed) with its own random generator seeded by both, so its search does not depend on what
it is batched with and two features never start alike. Every prompt keeps its origin: the start it grew from."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import torch

from dreaming.engine.results import FLUENT_CE, NOVEL_BELOW, differing
from dreaming.features import Feature

FLUENT_MARGIN = 0.3  # bf16 vs fp32 cross-entropy differences are well below this
KEEP_ACTIVE = 8  # the most active near-fluent prompts of a task kept for re-measurement (besides its frontier)
KEEP_DIVERSE = 16  # and the most active near-fluent prompts that differ pairwise
PLATEAU_GAIN = 0.005  # an improvement of the best fluent target smaller than this (of max) is no improvement

# Origin codes: i >= 0 is "dataset #i" (seeded from the feature's i-th top example); SAMPLED - j is "sampled #j"
# (the j-th start drawn from the model: for init "scan", the j-th most active of the scan); RANDOM: uniform
# tokens; BEAM - j is "beam #j" (the j-th best prompt of the task's beam search)
RANDOM, SAMPLED = -1, -2
BEAM = -1_000_000
DATASET_LINEAGE = 0  # the dataset's starts count as one lineage when capping the slots a lineage holds


def origin_name(code: int) -> str:
    if code >= 0:
        return f"dataset #{code}"
    if code == RANDOM:
        return "random"
    return f"beam #{BEAM - code}" if code <= BEAM else f"sampled #{SAMPLED - code}"


def lineage(code: int) -> int:
    """The lineage a prompt of origin `code` belongs to for the slot cap: its start, or the dataset's starts."""
    return DATASET_LINEAGE if code >= 0 else code


def context_ngrams(contexts: list[list[int]] | None) -> set[tuple[int, ...]] | None:
    """Every run of NOVEL_BELOW tokens of the contexts (None: no contexts, novelty unknown)."""
    if contexts is None:
        return None
    return {tuple(c[i : i + NOVEL_BELOW]) for c in contexts for i in range(len(c) - NOVEL_BELOW + 1)}


def novel_row(row: list[int] | tuple[int, ...], ngrams: set | None) -> bool:
    """Does the row share no run of NOVEL_BELOW tokens with the contexts of `ngrams`? (False when unknown.)"""
    return ngrams is not None and not any(tuple(row[i : i + NOVEL_BELOW]) in ngrams
                                          for i in range(len(row) - NOVEL_BELOW + 1))


@dataclass
class Pool:
    """Prompts of one or more tasks, as rows on the host: ids [N, W] right-padded, lengths [N], exact f, CE and
    smooth f [N] (float64), origin codes [N] and whether each is novel [N]. Only ids travel to the device."""

    ids: torch.Tensor
    lengths: torch.Tensor
    f: torch.Tensor
    ce: torch.Tensor
    smooth: torch.Tensor
    origin: torch.Tensor
    novel: torch.Tensor

    def __getitem__(self, index) -> "Pool":
        return Pool(*(getattr(self, name)[index] for name in Pool.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.ids)

    def cat(self, other: "Pool") -> "Pool":
        return Pool(*(torch.cat([getattr(self, n), getattr(other, n)]) for n in Pool.__dataclass_fields__))

    def put(self, index, other: "Pool") -> None:
        for name in Pool.__dataclass_fields__:
            getattr(self, name)[index] = getattr(other, name)

    def rows(self) -> list[tuple[int, ...]]:
        return [tuple(row[:n]) for row, n in zip(self.ids.tolist(), self.lengths.tolist())]

    def to_json(self) -> dict:
        return {"ids": [list(row) for row in self.rows()], "f": self.f.tolist(), "ce": self.ce.tolist(),
                "smooth": self.smooth.tolist(), "origin": self.origin.tolist(), "novel": self.novel.tolist()}

    @staticmethod
    def from_json(state: dict, width: int) -> "Pool":
        ids = torch.zeros(len(state["ids"]), width, dtype=torch.long)
        for i, row in enumerate(state["ids"]):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        number = lambda key: torch.tensor(state[key], dtype=torch.float64)  # noqa: E731
        return Pool(ids, torch.tensor([len(r) for r in state["ids"]], dtype=torch.long), number("f"), number("ce"),
                    number("smooth"), torch.tensor(state["origin"], dtype=torch.long),
                    torch.tensor(state["novel"], dtype=torch.bool))


@dataclass
class Kept:
    """A task's prompts worth re-measuring: its running frontier, its KEEP_ACTIVE most active near-fluent prompts,
    as many novel ones, the most active near-fluent prompt of every start, and up to KEEP_DIVERSE most active
    near-fluent ones that differ pairwise."""

    pool: Pool

    def add(self, new: Pool) -> None:
        pool = self.pool.cat(new)
        first = list({row: i for i, row in reversed(list(enumerate(pool.rows())))}.values())
        pool = pool[torch.tensor(sorted(first), dtype=torch.long)]
        order = torch.argsort(pool.ce, stable=True)
        running = torch.cummax(pool.f[order], 0).values
        keep = torch.zeros(len(pool), dtype=torch.bool)
        keep[order[0]] = True  # a point is on the front if it beats every lower-CE one
        keep[order[1:]] = pool.f[order[1:]] > running[:-1]
        near = (pool.ce <= FLUENT_CE + FLUENT_MARGIN).nonzero()[:, 0]
        near = near[torch.argsort(pool.f[near], descending=True, stable=True)]
        keep[near[:KEEP_ACTIVE]] = True
        keep[near[pool.novel[near]][:KEEP_ACTIVE]] = True
        origins = pool.origin[near].tolist()
        keep[near[[origins.index(code) for code in set(origins)]]] = True
        rows = pool.rows()
        keep[near[differing([rows[i] for i in near.tolist()], KEEP_DIVERSE)]] = True
        self.pool = pool[keep]


def task_generator(seed: int, feature: Feature) -> torch.Generator:
    """The random stream of the task (feature, seed): seeded by both, so two features never start alike."""
    return torch.Generator().manual_seed((seed * 1_000_003 + feature.layer * 7_919 * 65_536 + feature.index) % 2**63)


@dataclass
class TaskState:
    """What one task (a feature and a seed) carries from iteration to iteration, and what `dream --more` restores."""

    generator: torch.Generator
    prompt_length: int  # the starting prompts' length; the moves keep a prompt within ± the config's length_slack
    ngrams: set | None = None  # the runs of NOVEL_BELOW tokens of the feature's top contexts (None: none given)
    iteration: int = 0  # iterations done
    kept: Kept | None = None
    best: list[float] = field(default_factory=list)  # per iteration: best target so far
    best_fluent: list[float] = field(default_factory=list)  # per iteration: best with CE <= FLUENT_CE (NaN: none)
    since_gain: int = 0  # iterations since the best fluent target last improved by PLATEAU_GAIN

    def record(self) -> None:
        """One iteration done: its best and best fluent target, and the plateau count."""
        kept = self.kept.pool
        fluent = kept.f[kept.ce <= FLUENT_CE]
        self.best.append(float(kept.f.max()))
        self.best_fluent.append(float(fluent.max()) if len(fluent) else math.nan)
        before = [v for v in self.best_fluent[:-1] if not math.isnan(v)]
        gained = not math.isnan(self.best_fluent[-1]) and (not before or self.best_fluent[-1] >= max(before)
                                                            + PLATEAU_GAIN)
        self.since_gain = 0 if gained else self.since_gain + 1
        self.iteration += 1

    def to_json(self, members: Pool) -> dict:
        state = self.generator.get_state().numpy().tobytes()
        return {"iteration": self.iteration, "prompt_length": self.prompt_length,
                "generator": base64.b64encode(state).decode(), "members": members.to_json(),
                "kept": self.kept.pool.to_json(), "best": self.best,
                "best_fluent": [None if math.isnan(v) else v for v in self.best_fluent], "since_gain": self.since_gain}

    @staticmethod
    def from_json(state: dict, width: int, ngrams: set | None) -> tuple["TaskState", Pool]:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["generator"])), dtype=torch.uint8))
        task = TaskState(generator, state["prompt_length"], ngrams, state["iteration"],
                         Kept(Pool.from_json(state["kept"], width)), list(state["best"]),
                         [math.nan if v is None else v for v in state["best_fluent"]], state["since_gain"])
        return task, Pool.from_json(state["members"], width)
