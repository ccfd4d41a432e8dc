"""Where a search starts: each task's M starting prompts (`initial_prompts`), at the task's own prompt length.

- sampled: prompts sampled from the model after the template's prefix, every other one after a uniformly drawn
  first token; init "scan" and "dataset" score the feature on all `scan` of them in one pass and keep the most
  active that differ pairwise (reading nothing from the dataset);
- dataset (init "dataset", a quarter of the slots): the tokens leading to the feature's top dataset examples;
- beam (`beam_share` of the other slots): prompts built token by token by a beam search over the model's likely
  tokens, scored for the feature at every step (reading nothing from the dataset);
- random: uniform random allowed tokens (the paper's start).
Every start that is kept re-tokenises to its own ids inside the template."""

from __future__ import annotations

import torch

from dreaming.engine.config import DreamConfig
from dreaming.engine.results import FLUENT_CE, differing
from dreaming.engine.state import BEAM, RANDOM, SAMPLED, TaskState
from dreaming.objective import Scorer

Start = tuple[list[int], int]  # (prompt ids, origin code)
BEAM_CANDIDATES = 16  # extensions of each beam per step
BEAM_TOP = 64  # drawn among the model's top tokens there
BEAM_LAMBDA = 0.1  # fluency weight of a beam's score (target in fractions of the max, cross-entropy in nats)


def host_scores(scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores brought to the host once, as float64: (f, CE, smooth f)."""
    both = torch.stack([scores.f, scores.ce, scores.smooth]).to("cpu", torch.float64)
    return both[0], both[1], both[2]


def seed_prompts(scorer: Scorer, contexts: list[tuple[list[int], int]], length: int) -> list[Start]:
    """[(prompt ids, example #i)]: the `length` tokens leading to (and including) each top example's max token,
    shortened from the front until the text round-trips in the template; examples that never do are left out."""
    seeds = []
    for i, (ids, position) in enumerate(contexts):
        tokens = ids[max(1, position + 1 - length) : position + 1]
        while tokens:
            row = torch.tensor([tokens])
            if scorer.round_trips(row, torch.tensor([len(tokens)]))[0]:
                seeds.append((tokens, i))
                break
            tokens = tokens[1:]
    return seeds


def sampled_starts(scorer: Scorer, config: DreamConfig, allowed: torch.Tensor, tasks: list[TaskState],
                   task_targets: list[int], counts: list[int]) -> list[list[Start]]:
    """Per task, `counts[t]` starting prompts of its own length sampled from the model after the template's prefix,
    with their origin codes. Every task draws `config.scan` prompts (its own uniform numbers, from its own
    generator; every other one begins with a uniformly drawn token, so the scan is not only what the model starts a
    chat turn with) and all are sampled in one batched pass on the device (as long as the longest task's; a row
    keeps its own length's tokens). Init "scan"/"dataset" score the task's feature on all of them in one pass and
    take the most active that differ pairwise (fluent ones first); "sample"/"mixed" take them as drawn. Prompts
    whose text does not round-trip are dropped; a task with too few left draws again."""
    starts: list[list[Start]] = [[] for _ in tasks]
    needed = [t for t, count in enumerate(counts) if count]
    for _ in range(20):
        if not needed:
            return starts
        lengths = [tasks[t].prompt_length for t in needed]
        width = max(lengths)
        uniforms = [torch.rand(max(config.scan, 2 * counts[t]), n, generator=tasks[t].generator, dtype=torch.float64)
                    for t, n in zip(needed, lengths)]
        sizes = [len(u) for u in uniforms]
        every_other = torch.cat([torch.arange(size) % 2 == 1 for size in sizes])
        padded = torch.cat([torch.nn.functional.pad(u, (0, width - u.shape[1])) for u in uniforms])
        ids, logprobs = scorer.sample(padded, allowed, uniform_first=every_other)  # [sum of draws, width]
        ids = ids.cpu()
        row_lengths = torch.cat([torch.full((size,), n) for size, n in zip(sizes, lengths)])
        ok = scorer.round_trips(ids, row_lengths)
        drawn = [[row[:n] for row in part[good].tolist()]
                 for part, good, n in zip(ids.split(sizes), ok.split(sizes), lengths)]
        if config.init in ("scan", "dataset") and any(drawn):
            device = scorer.lm.device
            rows = torch.tensor([task_targets[t] for t, mine in zip(needed, drawn) for _ in mine], dtype=torch.long)
            # the drawn rows in order, with the log-probabilities they were drawn with (no logits computed again);
            # a row's positions past its own length are not read
            flat_lengths = torch.tensor([len(row) for mine in drawn for row in mine], dtype=torch.long)
            f, ce, _ = host_scores(scorer.score(ids[ok].to(device), flat_lengths.to(device), rows.to(device),
                                                logprobs[ok.to(logprobs.device)]))
            ranked = []  # fluent first, then most active
            for mine, f_, ce_ in zip(drawn, f.split([len(m) for m in drawn]), ce.split([len(m) for m in drawn])):
                order = sorted(range(len(mine)), key=lambda i: (float(ce_[i]) > FLUENT_CE, -float(f_[i])))
                ranked.append([mine[i] for i in order])
            drawn = [[mine[i] for i in differing(mine, len(mine))] for mine in ranked]
        for t, mine in zip(needed, drawn):
            have = len(starts[t])
            starts[t] += [(row, SAMPLED - (have + j)) for j, row in enumerate(mine[: counts[t] - have])]
        needed = [t for t in needed if len(starts[t]) < counts[t]]
    raise ValueError("could not draw starting prompts whose text re-tokenises to the same ids in this template; "
                     "with a BPE tokenizer the text before {prompt} must not end with a space (the optimised tokens "
                     "carry their own): write '\\n\\nHuman:{prompt}', not '\\n\\nHuman: {prompt}'")


def beam_starts(scorer: Scorer, config: DreamConfig, allowed: torch.Tensor, tasks: list[TaskState],
                task_targets: list[int], counts: list[int]) -> list[list[Start]]:
    """Per task, `counts[t]` prompts of its own length built token by token by a beam search (as ADAPT builds its
    starts, arXiv 2602.17867): `counts[t]` beams, each extended at every step by BEAM_CANDIDATES tokens the model
    finds likely there (drawn without replacement from its top BEAM_TOP by Gumbel top-k with the task's own
    numbers), every extension run once after its beam's KV cache and scored as the search scores prompts (the
    feature's target so far, exact max or last token, less BEAM_LAMBDA × the mean cross-entropy so far); the
    best `counts[t]` extensions are the next beams. Reads nothing from the dataset. Beams whose text does not
    round-trip are left out (the scan fills their slots)."""
    starts: list[list[Start]] = [[] for _ in tasks]
    vocab, device = len(allowed), scorer.lm.device
    blocked = ~allowed.to(device)
    for length in sorted({task.prompt_length for task in tasks}):
        group = [t for t, task in enumerate(tasks) if task.prompt_length == length and counts[t]]
        if not group:
            continue
        beams = [counts[t] for t in group]  # beams per task
        owner = torch.arange(len(group))  # the task (in `group`) of each row: one empty prompt each to start
        ids = torch.zeros(len(group), 0, dtype=torch.long)  # [rows, step]
        best = torch.full((len(group),), -torch.inf, dtype=torch.float64)  # target so far (exact max or last)
        nll = torch.zeros(len(group), dtype=torch.float64)  # summed -log p of the tokens so far
        logprobs = scorer.first_logprobs.expand(len(group), vocab).masked_fill(blocked, -torch.inf)
        kv = None
        for step in range(length):
            # BEAM_CANDIDATES tokens per row, drawn from its top BEAM_TOP with the owning task's own numbers
            top = logprobs.topk(min(BEAM_TOP, vocab), dim=-1)  # [rows, BEAM_TOP]
            uniforms = torch.cat([torch.rand(int((owner == i).sum()), top.indices.shape[1],
                                             generator=tasks[group[i]].generator, dtype=torch.float64)
                                  for i in range(len(group))]).to(device)
            gumbel = top.values.double() - torch.log(-torch.log(uniforms.clamp(1e-12, 1 - 1e-12)))
            pick = gumbel.topk(min(BEAM_CANDIDATES, top.indices.shape[1]), dim=-1).indices  # [rows, c]
            tokens, chosen_lp = top.indices.gather(1, pick), top.values.gather(1, pick)  # [rows, c]
            c = tokens.shape[1]
            parent = torch.arange(len(ids)).repeat_interleave(c)  # [rows * c]
            rows_kv = None if kv is None else [(k[parent.to(k.device)], v[parent.to(v.device)]) for k, v in kv]
            targets = torch.tensor([task_targets[group[i]] for i in owner.tolist()], dtype=torch.long)[parent]
            pre, next_logprobs, new_kv = scorer.extend(tokens.reshape(-1), targets.to(device), rows_kv)
            pre = pre.to("cpu", torch.float64)
            f = pre if config.position == "last" else torch.maximum(best[parent], pre)
            total_nll = nll[parent] - chosen_lp.reshape(-1).to("cpu", torch.float64)
            score = f - BEAM_LAMBDA * total_nll / (step + 1)
            keep = []  # per task, its best `beams` extensions
            for i, b in enumerate(beams):
                mine = (owner[parent] == i).nonzero()[:, 0]
                keep.append(mine[score[mine].argsort(descending=True, stable=True)[:b]])
            keep = torch.cat(keep)
            owner = owner[parent][keep]
            ids = torch.cat([ids[parent[keep]], tokens.reshape(-1).cpu()[keep][:, None]], dim=1)
            best, nll = f[keep], total_nll[keep]
            logprobs = next_logprobs[keep.to(device)].masked_fill(blocked, -torch.inf)
            kv = [(k[keep.to(k.device)], v[keep.to(v.device)]) for k, v in new_kv]
        ok = scorer.round_trips(ids, torch.full((len(ids),), length))
        for i, t in enumerate(group):
            mine = [row for row, good, o in zip(ids.tolist(), ok.tolist(), owner.tolist()) if good and o == i]
            starts[t] = [(row, BEAM - j) for j, row in enumerate(mine)]
    return starts


def random_starts(scorer: Scorer, length: int, allowed_ids: torch.Tensor, generator: torch.Generator,
                  count: int) -> list[Start]:
    """`count` prompts of `length` uniform random allowed tokens whose text round-trips (the paper's start)."""
    drawn = []
    for _ in range(100):
        if len(drawn) >= count:
            return [(row, RANDOM) for row in drawn[:count]]
        ids = allowed_ids[torch.randint(len(allowed_ids), (count, length), generator=generator)]
        drawn.extend(ids[scorer.round_trips(ids, torch.full((len(ids),), length))].tolist())
    raise ValueError("could not draw random starting prompts whose text re-tokenises to the same ids")


def initial_prompts(scorer: Scorer, config: DreamConfig, allowed: torch.Tensor, tasks: list[TaskState],
                    task_targets: list[int], dataset_seeds: list[list[Start]]) -> list[list[Start]]:
    """Per task, M starting prompts whose text round-trips, with their origin codes: dataset seeds (init "dataset":
    a quarter of the slots, strongest example first), beams (`beam_share` of the other slots), then sampled ones
    and (init "random", "mixed": all, 1 in 4) uniform random ones."""
    M = config.population
    seeded = [seeds[: max(1, M // 4)] if config.init == "dataset" else [] for seeds in dataset_seeds]
    beamed = beam_starts(scorer, config, allowed, tasks, task_targets,
                         [round(config.beam_share * (M - len(s))) for s in seeded])
    taken = [len(s) + len(b) for s, b in zip(seeded, beamed)]
    random_counts = [{"random": M - n, "mixed": (M - n) // 4}.get(config.init, 0) for n in taken]
    sampled = sampled_starts(scorer, config, allowed, tasks, task_targets,
                             [M - n - r for n, r in zip(taken, random_counts)])
    allowed_ids = allowed.nonzero()[:, 0]
    return [seeded[t] + beamed[t] + sampled[t]
            + (random_starts(scorer, task.prompt_length, allowed_ids, task.generator, random_counts[t])
               if random_counts[t] else [])
            for t, task in enumerate(tasks)]
