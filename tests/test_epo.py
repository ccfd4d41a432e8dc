"""EPO on a tiny float64 model: honest outputs (round trip, re-measured figures), determinism, GCG as the special
case, restarts under the drawn λ, batched features = one at a time, the frontier, the config model, the cache."""

import argparse
import json
import math

import pytest
import torch
from pydantic import ValidationError

import dreaming.epo as epo
from dreaming.activation import measure_texts, tokenize_text
from dreaming.cli import add_config_arguments, config_from_args
from dreaming.dream_cache import DreamCache, config_key
from dreaming.epo import (
    DreamConfig,
    DreamedPrompt,
    dream,
    dream_many,
    gcg_config,
    merge_results,
    pareto_front,
    random_search_config,
)
from dreaming.features import Feature
from dreaming.objective import Scorer, allowed_tokens, make_target
from test_objective import tiny_transcoder

CONFIG = DreamConfig(prompt_length=4, template="the {prompt} sat on", iterations=6, population=3, children=4, topk=5,
                     restart_every=3, lambda_min=0.05, lambda_max=1.0, restart_lambda_min=0.1,
                     restart_lambda_max=0.5)
A, B = Feature(1, 2), Feature(2, 5)


@pytest.fixture(scope="module")
def transcoder():
    return tiny_transcoder()


@pytest.fixture(scope="module")
def result(lm64, transcoder):
    return dream(lm64, transcoder, A, CONFIG, dataset_max=0.5)


def figures(result):
    return [(p.token_ids, round(p.activation, 9), round(p.cross_entropy, 9)) for p in result.frontier]


def test_outputs_round_trip_and_are_remeasured_from_the_text(lm64, transcoder, result):
    assert result.frontier and result.feature == "1/2" and result.dataset_max == 0.5 and result.scale_note is None
    for p in result.frontier:
        assert tokenize_text(lm64, p.text) == p.token_ids
        assert p.text == "the " + p.prompt + " sat on"
        measured = measure_texts(lm64, transcoder, A, [p.text], dataset_max=0.5)[0]
        assert p.activation == pytest.approx(measured.activation, abs=1e-12)
        assert p.fraction_of_max == pytest.approx(measured.activation / 0.5)
    ces = [p.cross_entropy for p in result.frontier]
    assert ces == sorted(ces)
    assert result.model_dump(mode="json")["config"]["prompt_length"] == 4


def test_deterministic_under_a_seed(lm64, transcoder, result):
    again = dream(lm64, transcoder, A, CONFIG, dataset_max=0.5)
    assert figures(again) == figures(result)
    other = dream(lm64, transcoder, A, CONFIG.model_copy(update={"seed": 1}), dataset_max=0.5)
    assert figures(other) != figures(result)


def test_batched_features_equal_one_at_a_time(lm64, transcoder):
    config = CONFIG.model_copy(update={"seeds": 2})
    together = dream_many(lm64, transcoder, [A, B], config, [0.5, None])
    alone = [dream(lm64, transcoder, A, config, 0.5), dream(lm64, transcoder, B, config, None)]
    assert [figures(r) for r in together] == [figures(r) for r in alone]
    fallback = together[1]
    assert fallback.scale_note and fallback.dataset_max is None and fallback.frontier[0].fraction_of_max is None
    assert together[0].seeds == [0, 1]


def test_progress_reports_every_iteration_over_all_tasks(lm64, transcoder):
    calls = []
    dream_many(lm64, transcoder, [A, B], CONFIG, [0.5, 0.5], progress=lambda *a: calls.append(a))
    assert [done for done, _, _ in calls] == [2 * (i + 1) for i in range(CONFIG.iterations)]
    assert {total for _, total, _ in calls} == {2 * CONFIG.iterations}


def test_gcg_is_the_special_case_m1_lambda0(lm64, transcoder):
    """GCG written out by hand (one member, f only, best of parent + children) gives the engine's trajectory."""
    config = gcg_config(CONFIG, iterations=5)
    assert config.lambdas().tolist() == [0.0]
    s = Scorer(lm64, "mlp.hook_in", config.template, 4, [make_target(transcoder, A, 0.5)])
    allowed = allowed_tokens(lm64)
    g = torch.Generator().manual_seed(config.seed)
    ids = epo.initial_prompts(s, config, allowed, g)[0]  # the engine's draws, in its order
    torch.rand((), generator=g, dtype=torch.float64)  # the restart at iteration 0 (a no-op for one member)
    row = torch.tensor([0])
    trajectory, best = [], -math.inf
    for _ in range(config.iterations):
        grad = s.gradient(ids[None], row, torch.zeros(1))[2][0]  # [n, vocab]
        grad[:, ~allowed] = -math.inf
        top = grad.topk(config.topk, dim=-1).indices
        position = torch.randint(4, (config.children,), generator=g)
        token = top[position, torch.randint(config.topk, (config.children,), generator=g)]
        pool = ids.expand(config.children, 4).clone()
        pool[torch.arange(config.children), position] = token
        pool = torch.cat([ids[None], pool[s.round_trips(pool)]])
        f, _, smooth = s.score(pool, torch.zeros(len(pool), dtype=torch.long))
        ids = pool[torch.argmax(smooth)]  # λ = 0: the target alone (its smooth max over positions)
        best = max(best, f.max().item())
        trajectory.append(best)
    _, histories = epo.search(s, config, [0], [config.seed])
    assert histories[0]["best"] == pytest.approx(trajectory, abs=1e-12)


def test_random_search_proposes_without_gradients(lm64, transcoder, monkeypatch):
    monkeypatch.setattr(Scorer, "gradient", lambda *a: pytest.fail("random search must not take gradients"))
    out = dream(lm64, transcoder, A, random_search_config(CONFIG), 0.5)
    assert out.frontier and out.config.proposal == "random"


def test_restarts_use_the_drawn_lambda(lm64, transcoder, monkeypatch):
    seen = []
    original = epo.restart

    def spy(f, ce, lam):
        best = original(f, ce, lam)
        seen.append((lam, f.clone(), ce.clone(), best))
        return best

    monkeypatch.setattr(epo, "restart", spy)
    config = CONFIG.model_copy(update={"iterations": 7, "restart_every": 2, "restart_lambda_min": 0.2,
                                       "restart_lambda_max": 5.0})
    dream(lm64, transcoder, A, config, 0.5)
    assert len(seen) == 4  # iterations 0, 2, 4, 6
    assert len({lam for lam, *_ in seen}) == 4  # drawn each time, not a constant
    for lam, f, ce, best in seen:
        assert 0.2 <= lam <= 5.0
        assert best == torch.argmax(f - lam * ce)


def test_pareto_front_of_a_known_set():
    def p(activation, ce):
        return DreamedPrompt(prompt="x", text="x", token_ids=[round(activation * 10), round(ce * 10)],
                             activation=activation, fraction_of_max=None, cross_entropy=ce)

    points = [p(1.0, 2.0), p(0.5, 3.0), p(2.0, 4.0), p(1.5, 4.5), p(3.0, 6.0), p(2.5, 6.0), p(0.2, 1.0)]
    front = pareto_front(points)
    assert [(q.activation, q.cross_entropy) for q in front] == [(0.2, 1.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]
    assert epo.best_fluent(points).activation == 2.0  # CE <= 5


def test_merge_results_of_seeds(lm64, transcoder, result):
    other = dream(lm64, transcoder, A, CONFIG.model_copy(update={"seed": 5}), 0.5)
    merged = merge_results([result, other])
    assert merged.seeds == [0, 5] and merged.config.seeds == 2
    assert merged.frontier == pareto_front(result.frontier + other.frontier)
    with pytest.raises(ValueError):
        merge_results([result, result.model_copy(update={"feature": "0/0"})])


@pytest.mark.parametrize("bad", [dict(prompt_length=0), dict(template="no slot"), dict(template="{prompt}{prompt}"),
                                 dict(lambda_min=2.0, lambda_max=1.0), dict(position="first"), dict(iterations=10**6),
                                 dict(unknown=1)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        DreamConfig(**bad)


def test_lambda_grid_is_log_spaced():
    grid = DreamConfig(population=3, lambda_min=0.1, lambda_max=10).lambdas()
    assert grid.tolist() == pytest.approx([0.1, 1.0, 10.0])


def test_config_flags_from_the_pydantic_model():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DreamConfig)
    args = parser.parse_args(["--prompt-length", "7", "--position", "last", "--template", "A:{prompt}",
                              "--lambda-max", "2.5"])
    config = config_from_args(DreamConfig, args)
    assert config == DreamConfig(prompt_length=7, position="last", template="A:{prompt}", lambda_max=2.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["--position", "first"])


def test_cache_round_trip(tmp_path, result):
    cache = DreamCache(tmp_path / "dreams")
    assert cache.get("model+clt", A, CONFIG) is None
    cache.put("model+clt", result)
    assert cache.get("model+clt", A, CONFIG) == result
    assert cache.for_feature("model+clt", A) == [result]
    assert cache.for_feature("other", A) == []
    assert cache.get("model+clt", A, CONFIG.model_copy(update={"seed": 3})) is None
    # the key is canonical: the same config built in another field order has the same key
    assert config_key(DreamConfig(**dict(reversed(list(CONFIG.model_dump().items()))))) == config_key(CONFIG)
    assert not list((tmp_path / "dreams").rglob("*.partial"))


def test_cli_dream_and_batch_are_cached_where_compare_reads(tiny_bundle, capsys, monkeypatch):
    from dreaming.cli import main

    flags = ["--bundle", str(tiny_bundle.directory), "--template", "the {prompt} sat on", "--iterations", "2",
             "--population", "2", "--children", "3", "--topk", "4", "--prompt-length", "3", "--dtype", "float32",
             "--json"]
    capsys.readouterr()
    main(["dream", "--feature", "1/2", *flags])
    first = json.loads(capsys.readouterr().out)
    assert first["feature"] == "1/2" and first["frontier"] and first["dataset_max"] is not None
    cached = DreamCache(tiny_bundle.directory / "dreams").for_feature(tiny_bundle.identity, Feature(1, 2))
    assert [r.model_dump(mode="json") for r in cached] == [first]
    monkeypatch.setattr(epo, "dream_many", lambda *a, **k: pytest.fail("a cached result must not be recomputed"))
    main(["dream", "--feature", "1/2", *flags])
    assert json.loads(capsys.readouterr().out) == first
    monkeypatch.undo()
    main(["batch", "--features", "1/2,0/3", *flags])
    both = json.loads(capsys.readouterr().out)
    assert [r["feature"] for r in both] == ["1/2", "0/3"] and both[0] == first
    with pytest.raises(SystemExit, match="unknown feature"):
        main(["dream", "--feature", "9/0", *flags])
