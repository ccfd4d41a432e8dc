"""DreamedPrompt / DreamResult objects built directly (no EPO run), their activations measured for real inside
their template (dreaming.activation.measure_in_template), for tests of what shows, caches and compares dreams."""

from __future__ import annotations

from dreaming.activation import measure_in_template
from dreaming.engine import ENGINE_VERSION, DreamConfig, DreamedPrompt, DreamResult
from dreaming.features import Feature


def dreamed_prompt(lm, transcoder, feature: Feature, prompt: str, template: str, dataset_max: float | None,
                   cross_entropy: float = 3.0, origin: str = "sampled", longest_shared_run: int | None = 2,
                   ) -> DreamedPrompt:
    (m,) = measure_in_template(lm, transcoder, feature, [prompt], template, dataset_max)
    return DreamedPrompt(prompt=prompt, text=m.text, token_ids=m.token_ids, counted_from=m.counted_from,
                         activation=m.activation, fraction_of_max=m.fraction_of_max,
                         template_activation=m.template_activation, cross_entropy=cross_entropy, origin=origin,
                         longest_shared_run=longest_shared_run)


def dream_result(feature: Feature, config: DreamConfig, dataset_max: float | None, frontier: list[DreamedPrompt],
                 diverse: list[DreamedPrompt] | None = None) -> DreamResult:
    fluent = [p for p in frontier if p.cross_entropy <= 5.0]
    return DreamResult(
        feature=str(feature), model="tiny", config=config, engine_version=ENGINE_VERSION,
        prompt_length=config.prompt_length, seed=config.seed, seeds=[config.seed], seconds=1.0,
        dataset_max=dataset_max, scale_note=None, frontier=sorted(frontier, key=lambda p: p.cross_entropy),
        best_fluent=max(fluent, key=lambda p: p.activation) if fluent else None, diverse=diverse or [],
        iterations=config.iterations, stopped="iterations", timings={}, history={})
