"""The search loop: every task of one call searched in lockstep, sharing each forward and backward pass.

`Search.run` reads as its steps, one method each:
  start    M starting prompts per task (starts.py), scored;
  restart  every `restart_every` iterations (not at iteration 0, which would collapse the starts into one), the
           slots of each lineage restart from its best member under a λ drawn from [restart_lambda_min,
           restart_lambda_max];
  expand   the members that changed: the token gradient of each one's own L_λ = f − λ·CE (objective.py), the
           model's own top tokens at every position, and the KV cache its children start from;
  propose  r children per member, one move each: swap a token or (insert_delete) insert or delete one, within the
           task's prompt_length ± length_slack; a new token comes from the gradient's top-k there or, with
           probability model_proposals, from the model's own top tokens (uniform for random search); children
           whose text does not re-tokenise to their ids are dropped;
  score    the children, each from its parent's KV cache (objective.Scorer.score_children);
  select   slot m takes the argmax of L_{λ_m} over members and children, the slots choosing in turn among
           prompts that differ from those taken (`distinct`) and whose lineage holds less than `lineage_share` of
           the slots (the dataset's starts count as one lineage); then record what is worth re-measuring;
  stop     after the run's iterations, when `seconds` are spent, when no task's best fluent target has improved for
           `plateau` iterations, or when the caller's progress callback says so.
Selection and restarts use the exact max over positions (what is reported); only the gradient uses the smooth
max. The search state lives on the host (one Pool of every task's members); only ids go to the device, and the
scores and the expansion's proposals come back once each per iteration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dreaming.engine.config import MODEL_TOPK, DreamConfig
from dreaming.engine.results import MAX_JACCARD
from dreaming.engine.starts import Start, host_scores, initial_prompts
from dreaming.engine.state import Kept, Pool, TaskState, lineage, novel_row
from dreaming.models import LanguageModel
from dreaming.objective import Expansion, Scorer, allowed_tokens

# progress(done, total, best fluent fraction of max so far) after every iteration; a string it returns stops the
# search after that iteration and becomes the result's `stopped` (e.g. "cancelled", "deadline": the caller's reason)
Progress = Callable[[int, int, "float | None"], "str | None"]

_ALLOWED: dict[int, tuple[object, torch.Tensor]] = {}


def allowed_for(lm: LanguageModel) -> torch.Tensor:
    """[vocab] bool: the tokens a search may propose with this model's tokenizer (computed once per tokenizer)."""
    key = id(lm.tokenizer)
    if key not in _ALLOWED:
        _ALLOWED[key] = (lm.tokenizer, allowed_tokens(lm))
    return _ALLOWED[key][1]


def select(pool: Pool, lambdas: torch.Tensor, config: DreamConfig) -> torch.Tensor:
    """[M] index into `pool` of each slot's new member. Slots choose in turn, each the argmax of f − λ_m·CE among
    the prompts whose lineage holds fewer than `config.lineage_share` of the slots (so a strong start cannot take
    over the population: the others keep searching), and (`config.distinct`) that differ from the prompts earlier
    slots took; a slot finding none that differs enough ("jaccard") takes the best one not taken, finding none at
    all its argmax."""
    M = len(lambdas)
    f = pool.f if config.selection == "exact" else pool.smooth
    objective = f[None] - lambdas[:, None] * pool.ce[None]  # [M, P]
    if config.distinct == "none" and config.lineage_share >= 1:
        return objective.argmax(dim=1)
    cap = max(1, int(config.lineage_share * M))
    rows = pool.rows()
    sets = [set(row) for row in rows]
    lineages = [lineage(code) for code in pool.origin.tolist()]
    chosen: list[int] = []
    held: dict[int, int] = {}

    def differs(candidate: int) -> bool:
        return all(len(sets[candidate] & sets[j]) <= MAX_JACCARD * len(sets[candidate] | sets[j]) for j in chosen)

    for m in range(M):
        order = torch.argsort(objective[m], descending=True, stable=True).tolist()
        order = [i for i in order if held.get(lineages[i], 0) < cap] or order
        new = [i for i in order if all(rows[i] != rows[j] for j in chosen)] if config.distinct != "none" else order
        different = next((i for i in new if differs(i)), None) if config.distinct == "jaccard" else None
        pick = different if different is not None else new[0] if new else order[0]
        chosen.append(pick)
        held[lineages[pick]] = held.get(lineages[pick], 0) + 1
    return torch.tensor(chosen)


def restart_index(members: Pool, lam: float, config: DreamConfig) -> int:
    """The member a restart copies: the best under the drawn λ."""
    f = members.f if config.selection == "exact" else members.smooth
    return int(torch.argmax(f - lam * members.ce))


def make_children(members: Pool, gradient_top: torch.Tensor, model_top: torch.Tensor, config: DreamConfig,
                  tasks: list[TaskState], allowed_ids: torch.Tensor) -> tuple[Pool, torch.Tensor, torch.Tensor]:
    """(children, index of each one's parent among the members, first prompt position where it differs from its
    parent): r per member, one move each, drawn from the member's task's generator. `gradient_top` [N, W, k] and
    `model_top` [N, W + 1, k_model] are the expansion's proposals, on the host."""
    M, r, W = config.population, config.children, members.ids.shape[1]
    k = min(config.topk, len(allowed_ids))
    ids, lengths, parents, changed, novel = [], [], [], [], []
    members_ids, members_lengths = members.ids.tolist(), members.lengths.tolist()
    for member in range(len(members)):
        task = tasks[member // M]
        g = task.generator
        lo, hi = config.length_range(task.prompt_length)
        move, where, pick, source = (torch.rand(r, generator=g), torch.rand(r, generator=g),
                                     torch.randint(k, (r,), generator=g), torch.rand(r, generator=g))
        uniform = torch.randint(len(allowed_ids), (r,), generator=g)
        from_model = torch.randint(MODEL_TOPK, (r,), generator=g)
        row, n = members_ids[member][: members_lengths[member]], members_lengths[member]
        # the r moves at once, in the draws' float32 ([r] each): which move, where, and the new token
        insert = (move < config.insert_delete / 2) & (n < hi)
        delete = ~insert & (move < config.insert_delete) & (n > lo)
        position = torch.minimum((where * torch.where(insert, n + 1, n)).long(), torch.where(insert, n, n - 1))
        if config.proposal == "random":
            token = allowed_ids[uniform]
        else:
            modelled = (source < config.model_proposals) | (position == n)
            token = torch.where(modelled, model_top[member, position, from_model % model_top.shape[-1]],
                                gradient_top[member, position.clamp(max=gradient_top.shape[1] - 1), pick])
        for p, t, grow, shrink in zip(position.tolist(), token.tolist(), insert.tolist(), delete.tolist()):
            rest = row[p:] if grow else row[p + 1 :]  # an insertion keeps the token at p, a swap or deletion not
            child = row[:p] + rest if shrink else row[:p] + [t] + rest
            ids.append(child + [0] * (W - len(child)))
            lengths.append(len(child))
            parents.append(member)
            changed.append(p)
            novel.append(novel_row(child, task.ngrams))
    parents = torch.tensor(parents, dtype=torch.long)
    pool = Pool(torch.tensor(ids, dtype=torch.long).view(-1, W), torch.tensor(lengths, dtype=torch.long),
                members.f[parents], members.ce[parents], members.smooth[parents], members.origin[parents],
                torch.tensor(novel, dtype=torch.bool))
    return pool, parents, torch.tensor(changed, dtype=torch.long)


@dataclass
class Search:
    """Every task of one call searched in lockstep. The members of all tasks are one Pool on the host, task
    after task ([T * M] rows, W wide: the longest prompt any task's moves allow); their expansion (gradient and
    model proposals, KV caches) lives on the device. `run` is the loop; each step below is one method."""

    scorer: Scorer
    config: DreamConfig
    task_targets: list[int]  # [T] the target (index into scorer.targets) of each task
    tasks: list[TaskState]
    members: Pool | None = None  # a continued search's members; None: start afresh
    expansion: Expansion | None = None
    proposals: tuple[torch.Tensor, torch.Tensor] | None = None  # the expansion's gradient_top, model_top on the host

    def __post_init__(self):
        M, T = self.config.population, len(self.tasks)
        self.device = self.scorer.lm.device
        self.allowed = allowed_for(self.scorer.lm)  # [vocab] bool
        self.allowed_ids = self.allowed.nonzero()[:, 0]
        self.lambdas = self.config.lambdas()  # [M]
        self.width = width(self.config, self.tasks)
        self.rows = torch.tensor(self.task_targets, dtype=torch.long).repeat_interleave(M)  # [T * M] target per member
        self.fresh = torch.ones(T * M, dtype=torch.bool)  # members whose expansion is out of date
        self.start_seconds = self.iteration_seconds = 0.0  # what the starts and the iterations took (run sets them)

    def run(self, iterations: int, dataset_seeds: list[list[Start]], progress: Progress | None = None,
            reported: list[bool] | None = None) -> str:
        """Search for `iterations` more (or until a stop); returns why it stopped."""
        started = time.perf_counter()
        if self.members is None:
            self.start(dataset_seeds)
        self.start_seconds = time.perf_counter() - started
        try:
            for step in range(iterations):
                self.restart()
                self.expand()
                children, parent, changed = self.propose()
                self.score(children, parent, changed)
                self.select_and_record(children, parent)
                stopped = self.stop(step, iterations, started, progress, reported)
                if stopped:
                    return stopped
            return "iterations"
        finally:
            self.iteration_seconds = time.perf_counter() - started - self.start_seconds

    def start(self, dataset_seeds: list[list[Start]]) -> None:
        """Every task's M starting prompts (init), scored; the first prompts its Kept holds."""
        M = self.config.population
        starts = [s for mine in initial_prompts(self.scorer, self.config, self.allowed, self.tasks, self.task_targets,
                                                 dataset_seeds) for s in mine]
        ids = torch.zeros(len(starts), self.width, dtype=torch.long)
        for i, (prompt, _) in enumerate(starts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        lengths = torch.tensor([len(prompt) for prompt, _ in starts], dtype=torch.long)
        f, ce, smooth = host_scores(self.scorer.score(ids.to(self.device), lengths.to(self.device),
                                                      self.rows.to(self.device)))
        novel = [novel_row(prompt, self.tasks[i // M].ngrams) for i, (prompt, _) in enumerate(starts)]
        self.members = Pool(ids, lengths, f, ce, smooth, torch.tensor([code for _, code in starts], dtype=torch.long),
                            torch.tensor(novel, dtype=torch.bool))
        for t, task in enumerate(self.tasks):
            mine = self.members[t * M : (t + 1) * M]
            task.kept = Kept(mine[:0])
            task.kept.add(mine)

    def restart(self) -> None:
        """Every restart_every iterations (and at iteration 0 with restart_at_start), under a λ drawn uniformly from
        [restart_lambda_min, restart_lambda_max]: the slots of each lineage restart from its best member (every
        slot from the best member when lineages are not capped, lineage_share = 1)."""
        c, M = self.config, self.config.population
        for t, task in enumerate(self.tasks):
            if not ((task.iteration == 0 and c.restart_at_start)
                    or (task.iteration > 0 and c.restart_every and task.iteration % c.restart_every == 0)):
                continue
            lo, hi = c.restart_lambda_min, c.restart_lambda_max
            lam = lo + (hi - lo) * torch.rand((), generator=task.generator, dtype=torch.float64).item()
            mine = self.members[torch.arange(t * M, (t + 1) * M)]  # a copy
            groups: dict[int, list[int]] = {}
            for slot, code in enumerate(mine.origin.tolist()):
                groups.setdefault(0 if c.lineage_share >= 1 else lineage(code), []).append(slot)
            for slots in groups.values():
                best = slots[restart_index(mine[slots], lam, c)]
                self.members.put([t * M + s for s in slots], mine[[best] * len(slots)])
                self.fresh[torch.tensor([t * M + s for s in slots if s != best], dtype=torch.long)] = True

    def expand(self) -> None:
        """The gradient pass over the members that changed (all of them at first): what their children are drawn
        from and scored against; an unchanged member keeps its expansion."""
        if self.expansion is None:
            self.fresh[:] = True
        if not self.fresh.any():
            return
        c, d, T = self.config, self.device, len(self.tasks)
        index = self.fresh.nonzero()[:, 0]
        new = self.scorer.expand(self.members.ids[index].to(d), self.members.lengths[index].to(d),
                                 self.rows[index].to(d), self.lambdas.repeat(T)[index].to(d), self.allowed.to(d),
                                 min(c.topk, len(self.allowed_ids)) if c.proposal == "gradient" else 0,
                                 min(MODEL_TOPK, len(self.allowed_ids)))
        gradient_top, model_top = new.gradient_top.cpu(), new.model_top.cpu()
        if self.expansion is None or len(index) == len(self.members):
            self.expansion, self.proposals = new, (gradient_top, model_top)
        else:
            self.expansion.put(index.to(d), new)
            self.proposals[0][index], self.proposals[1][index] = gradient_top, model_top
        self.fresh[:] = False

    def propose(self) -> tuple[Pool, torch.Tensor, torch.Tensor]:
        """r children per member, one move each (make_children); those whose text does not round-trip are
        dropped. Returns (children, each one's parent member, the first position where it differs)."""
        children, parent, changed = make_children(self.members, *self.proposals, self.config, self.tasks,
                                                  self.allowed_ids)
        ok = self.scorer.round_trips(children.ids, children.lengths)
        return children[ok], parent[ok], changed[ok]

    def score(self, children: Pool, parent: torch.Tensor, changed: torch.Tensor) -> None:
        """The children's scores, each child run from its parent's KV cache."""
        d = self.device
        scores = self.scorer.score_children(children.ids.to(d), children.lengths.to(d), self.rows[parent].to(d),
                                            parent.to(d), changed.to(d), self.expansion.parents)
        children.f, children.ce, children.smooth = host_scores(scores)

    def select_and_record(self, children: Pool, parent: torch.Tensor) -> None:
        """Per task: each slot takes its new member from the members and the children (select), the children worth
        re-measuring are kept, and the iteration's best targets are recorded."""
        M = self.config.population
        child_task = parent // M
        for t, task in enumerate(self.tasks):
            mine = slice(t * M, (t + 1) * M)
            theirs = children[child_task == t]
            pool = self.members[mine].cat(theirs)
            chosen = select(pool, self.lambdas, self.config)
            self.fresh[mine] = chosen != torch.arange(M)  # a slot that kept its member keeps its expansion
            self.members.put(mine, pool[chosen])
            task.kept.add(theirs)
            task.record()

    def stop(self, step: int, iterations: int, started: float, progress: Progress | None,
             reported: list[bool] | None) -> str | None:
        """Why to stop after this iteration, if at all: the progress callback's reason, a plateau of every task,
        or the seconds budget spent."""
        c, tasks = self.config, self.tasks
        if progress is not None:
            fluent = [task.best_fluent[-1] for t, task in enumerate(tasks)
                      if (reported is None or reported[t]) and not math.isnan(task.best_fluent[-1])]
            stopped = progress((step + 1) * len(tasks), iterations * len(tasks), max(fluent) if fluent else None)
            if stopped:
                return stopped
        if c.plateau and all(task.since_gain >= c.plateau for task in tasks):
            return "plateau"
        if c.seconds is not None and time.perf_counter() - started >= c.seconds:
            return "seconds"
        return None


def width(config: DreamConfig, tasks: list[TaskState]) -> int:
    """The Pool's width: the longest prompt any task's moves allow."""
    return max(config.length_range(task.prompt_length)[1] for task in tasks)
