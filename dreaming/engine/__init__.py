"""EPO, evolutionary prompt optimisation ("fluent dreaming", Thompson et al. 2024), for transcoder features.

    config.py   DreamConfig (the CLI's flags and the HTTP body) and its presets (paper, previous, GCG, random)
    results.py  DreamedPrompt, DreamResult and the rules that read them (frontier, best fluent and novel, diverse
                set, the continuation of a run); ENGINE_VERSION
    length.py   the prompt length a feature needs, and the data at a prompt's own length (the second yardstick)
    state.py    the search state on the host: Pool, Kept, TaskState, origins
    starts.py   the starting prompts: sampled and scanned, dataset seeds, random
    search.py   the loop: start → restart → expand → propose → score → select, until a stop
    run.py      dream_many / dream: the entry point, and the fp32 re-measurement of what a search kept

GCG is the special case population = 1, λ = 0 (`gcg_config`); random single-token search replaces the gradient's
top-k by uniform tokens (`random_search_config`); `paper_config` and `previous_config` are the paper's settings and
this engine's defaults before version 4 (experiments/epo_quality.py compares them).
"""

from dreaming.engine.config import (DreamConfig, gcg_config, paper_config, previous_config, random_search_config,
                                    same_search)
from dreaming.engine.run import dream, dream_many
from dreaming.engine.results import (ENGINE_VERSION, FLUENT_CE, NOVEL_BELOW, DreamedPrompt, DreamResult, LengthChoice,
                                     basins, best_fluent, best_novel, continuation, diverse_set, is_novel,
                                     longest_run, longest_shared_run, pareto_front)
from dreaming.engine.search import Progress

__all__ = ["DreamConfig", "gcg_config", "paper_config", "previous_config", "random_search_config", "same_search",
           "dream", "dream_many", "ENGINE_VERSION", "FLUENT_CE", "NOVEL_BELOW", "DreamedPrompt", "DreamResult",
           "LengthChoice", "basins", "best_fluent", "best_novel", "continuation", "diverse_set", "is_novel",
           "longest_run", "longest_shared_run", "pareto_front", "Progress"]
