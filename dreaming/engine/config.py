"""The dream configuration (`DreamConfig`, shared by the CLI's flags and the HTTP request body) and its presets:
the paper's settings, the engine's earlier defaults, GCG and random search as special cases."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dreaming.templates import split_template

MODEL_TOPK = 32  # tokens proposed from the model are drawn uniformly among its top MODEL_TOPK at the position
MAX_PROMPT = 128  # the longest prompt a config may ask for: the corpus windows' length, where dataset maxima sit
PAPER = dict(lambda_min=0.1, lambda_max=10.0, restart_lambda_min=0.667, restart_lambda_max=6.0, init="random",
             prompt_length=12)
# the engine's defaults before restarts stopped collapsing the start, selection used the exact max and the
# moves, model proposals, distinct slots and mixed starts came in: the ablation's baseline
PREVIOUS = dict(restart_at_start=True, selection="smooth", length_slack=0, insert_delete=0.0, model_proposals=0.0,
                distinct="none", init="sample", lineage_share=1.0, prompt_length=12)
BUDGET = {"iterations", "seconds", "plateau"}  # the fields a continued dream may change


class DreamConfig(BaseModel):
    """EPO options, shared by the CLI (`--prompt-length` ...) and the HTTP request body."""

    model_config = ConfigDict(extra="forbid")

    prompt_length: int | None = Field(
        None, ge=1, le=MAX_PROMPT, description="tokens of the starting prompts; None: chosen per feature from how "
        "its top dataset examples' activation depends on context (dreaming/engine/length.py), at most "
        "max_prompt_length")
    max_prompt_length: int = Field(64, ge=1, le=MAX_PROMPT, description="the longest prompt the automatic length "
                                   "(prompt_length None) may choose")
    length_slack: int = Field(4, ge=0, le=32, description="insertions and deletions keep a prompt's length within "
                              f"prompt_length ± length_slack (at least 1, at most {MAX_PROMPT}); 0: fixed length")
    template: str | None = Field(None, description="text around the prompt with exactly one {prompt} slot, e.g. "
                                 "'\\n\\nHuman:{prompt}'; None = the model's chat template for one user turn, or "
                                 "the bare '{prompt}' for a base model (no chat template)")
    position: Literal["last", "max"] = Field("max", description="target: the feature at the last prompt token, or "
                                             "its max over the prompt and the template text after it")
    iterations: int = Field(100, ge=1, le=5000, description="EPO iterations of the whole run (at most; see "
                            "seconds and plateau); a continued run's total, its earlier iterations included")
    seconds: float | None = Field(None, gt=0, le=86400, description="wall-clock budget of the search: it stops "
                                  "after the iteration that spends it (None: no budget)")
    plateau: int = Field(0, ge=0, le=5000, description="stop when no task's best fluent target has improved for "
                         "this many iterations (0: never)")
    population: int = Field(8, ge=1, le=64, description="population slots M, one fluency weight λ each")
    children: int = Field(16, ge=1, le=512, description="children per member per iteration (r)")
    topk: int = Field(128, ge=1, le=1_000_000, description="candidate tokens per position from the gradient")
    insert_delete: float = Field(0.0, ge=0, le=1, description="share of children made by inserting or deleting "
                                 "a token (half each) instead of swapping one")
    model_proposals: float = Field(0.0, ge=0, le=1, description="share of new tokens drawn from the model's own "
                                   f"top {MODEL_TOPK} at the position instead of the gradient's top-k")
    distinct: Literal["none", "exact", "jaccard"] = Field(
        "exact", description="slots select in turn, each the best prompt that differs from those the earlier "
        "slots took: 'exact' (not the same ids) or 'jaccard' (token Jaccard <= 0.5: a buffer of the best different "
        "prompts); 'none': selection with replacement (the paper)")
    selection: Literal["exact", "smooth"] = Field("exact", description="select on the exact max over positions "
                                                  "(reported), or on the smooth max the gradient uses")
    restart_every: int = Field(30, ge=0, le=5000, description="restart period T_restart (0: never)")
    restart_at_start: bool = Field(False, description="also restart at iteration 0, before any child is scored "
                                   "(the earlier engine's collapse of the starting prompts into one)")
    lambda_min: float = Field(0.02, ge=0, le=1000, description="smallest fluency weight λ of the log-spaced grid")
    lambda_max: float = Field(1.0, ge=0, le=1000, description="largest fluency weight λ of the grid")
    restart_lambda_min: float = Field(0.05, ge=0, le=1000, description="restarts rank members under λ drawn "
                                      "uniformly from [restart_lambda_min, restart_lambda_max]")
    restart_lambda_max: float = Field(0.3, ge=0, le=1000, description="see restart_lambda_min")
    init: Literal["scan", "dataset", "sample", "random", "mixed"] = Field(
        "dataset", description="starting prompts. 'scan': the most active, pairwise different of `scan` prompts "
        "sampled from the model after the template's prefix and scored for the feature; reads nothing from the "
        "dataset maxima. 'dataset': the scan, with a quarter of the slots seeded by the tokens leading to the "
        "feature's top dataset examples. 'sample': prompts sampled from the model, unscored; 'random': uniform "
        "random tokens (the paper); 'mixed': 3 sampled : 1 random")
    beam_share: float = Field(0.0, ge=0, le=1, description="share of the slots (after the dataset's) started by a "
                              "beam search that builds each prompt token by token from the model's likely tokens, "
                              "scored for the feature at every step (reads nothing from the dataset)")
    scan: int = Field(256, ge=1, le=4096, description="prompts sampled from the model per task for the sampled "
                      "starts (init scan and dataset score the feature on all of them, in one pass)")
    lineage_share: float = Field(0.5, gt=0, le=1, description="the most slots one lineage (the prompts grown "
                                 "from one start; the dataset's starts count as one) may hold, as a share of the "
                                 "population, so other starts keep searching; 1: no cap (the earlier engine)")
    proposal: Literal["gradient", "random"] = Field("gradient", description="children's tokens: top-k of the "
                                                    "token gradient (EPO, GCG) or uniform (random search)")
    seeds: int = Field(1, ge=1, le=64, description="independent runs (seed, seed + 1, ...) merged into one result")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="random seed of the first run")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="dtype of the search model; 'auto': bf16 on a GPU or a CPU with bf16 matmuls in hardware, "
        "else fp32 (models.fast_dtype); figures are re-measured in fp32 whatever it is")

    @field_validator("template")
    @classmethod
    def _template(cls, template):
        if template is not None:
            split_template(template)
        return template

    @model_validator(mode="after")
    def _ranges(self):
        if self.lambda_min > self.lambda_max:
            raise ValueError(f"lambda_min ({self.lambda_min}) must be <= lambda_max ({self.lambda_max})")
        if self.restart_lambda_min > self.restart_lambda_max:
            raise ValueError(f"restart_lambda_min ({self.restart_lambda_min}) must be <= restart_lambda_max "
                             f"({self.restart_lambda_max})")
        return self

    def longest_start(self) -> int:
        """The starting prompts' length: prompt_length, or at most max_prompt_length when it is chosen per feature."""
        return self.prompt_length if self.prompt_length is not None else self.max_prompt_length

    def length_range(self, prompt_length: int | None = None) -> tuple[int, int]:
        """(shortest, longest) prompt the moves allow around `prompt_length` (default: the config's, or its cap)."""
        n = prompt_length if prompt_length is not None else self.longest_start()
        return max(1, n - self.length_slack), min(MAX_PROMPT, n + self.length_slack)

    def cost(self) -> int:
        """The search work this config asks for, in prompt tokens scored: (iterations × population × children +
        the scan's prompts) × seeds × the longest prompt it allows (with an automatic length, its cap's). The
        service caps it per job and per batch."""
        return (self.iterations * self.population * self.children + self.scan) * self.seeds * self.length_range()[1]

    def lambdas(self) -> torch.Tensor:
        """[M] fluency weights: log-spaced from lambda_min to lambda_max (linear when lambda_min is 0)."""
        M = self.population
        if M == 1:
            return torch.tensor([self.lambda_min], dtype=torch.float64)
        if self.lambda_min == 0:
            return torch.linspace(0, self.lambda_max, M, dtype=torch.float64)
        return torch.exp(torch.linspace(math.log(self.lambda_min), math.log(self.lambda_max), M, dtype=torch.float64))


def same_search(previous: DreamConfig, config: DreamConfig) -> bool:
    """Do the two configs describe the same search, but for how long it runs?"""
    return previous.model_dump(exclude=BUDGET) == config.model_dump(exclude=BUDGET)


def _preset(config: DreamConfig | None, preset: dict, changes: dict) -> DreamConfig:
    return DreamConfig(**{**(config or DreamConfig()).model_dump(), **preset, **changes})


def paper_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """The paper's settings (λ grid 0.1–10, restarts under λ in [0.667, 6], k = 512, r = 32, 12 random starting
    tokens, target at the last token, no template) in the earlier engine's search (PREVIOUS)."""
    return _preset(config, {**PREVIOUS, **PAPER, "topk": 512, "children": 32, "position": "last",
                            "template": "{prompt}"}, changes)


def previous_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """This engine's defaults before version 4: the baseline every change is measured against."""
    return _preset(config, {**PREVIOUS, "iterations": 60}, changes)


def gcg_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """GCG inside EPO: one member, λ = 0 (no fluency term), no restarts, single-token swaps from the gradient."""
    return _preset(config, dict(population=1, lambda_min=0.0, lambda_max=0.0, restart_lambda_min=0.0,
                                restart_lambda_max=0.0, restart_every=0, restart_at_start=False, length_slack=0,
                                insert_delete=0.0, model_proposals=0.0), changes)


def random_search_config(config: DreamConfig | None = None, **changes) -> DreamConfig:
    """Random single-token search: GCG with uniform tokens instead of the gradient's top-k."""
    return gcg_config(config, proposal="random", **changes)
