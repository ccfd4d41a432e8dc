"""The transcoder recipes by name: `dreaming train-transcoder --recipe NAME` and the default bundle train with them.

  clt          a cross-layer transcoder trained by gradient (dreaming/build/train_clt.py): the default
  closed-form  a per-layer skip transcoder set fitted without gradient steps (dreaming/build/train.py): fast, and the
               CLT's starting point
Each recipe is a config dataclass (its fields are the command's flags) and a function
train(lm, windows, config, out_dir, progress) -> Transcoder that saves what it trained. Both configs carry
`heldout_windows` and `seed`, which say (through `train.split_windows`) which windows the report holds out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dreaming.build.train import TrainConfig, train_transcoder
from dreaming.build.train_clt import CLTConfig, train_clt


@dataclass(frozen=True)
class Recipe:
    config: type
    train: Callable


RECIPES = {"clt": Recipe(CLTConfig, train_clt), "closed-form": Recipe(TrainConfig, train_transcoder)}
DEFAULT_RECIPE = "clt"


def recipe_of(config) -> str:
    """The name of the recipe whose config `config` is."""
    return next(name for name, recipe in RECIPES.items() if isinstance(config, recipe.config))
