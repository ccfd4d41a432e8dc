"""EPO on a tiny float64 model: honest outputs (round trip, re-measured figures over the counted positions),
determinism, batched features = one at a time, GCG as the special case, restarts, no collapse at the start, the
moves within their length range, origins and novelty, the diverse set, budgets and plateau stops, continuing equals
one run, the chat-template and bf16 paths, the config model and the cache."""

import argparse
import copy
import json
import math

import pytest
import torch
from pydantic import ValidationError

import dreaming.engine.config as engine_config
import dreaming.engine.run as engine_run
import dreaming.engine.results as engine_results
import dreaming.engine.search as engine_search
import dreaming.engine.starts as engine_starts
import dreaming.engine.state as engine_state
import dreaming.explorer as explorer_module
from dreaming.activation import measure_texts, measure_token_ids, tokenize_text
from dreaming.cli import add_config_arguments, config_from_args
from dreaming.dream_cache import DreamCache, dream_key
from dreaming.engine import (
    DreamConfig,
    DreamedPrompt,
    continuation,
    dream,
    dream_many,
    gcg_config,
    longest_shared_run,
    pareto_front,
    previous_config,
    random_search_config,
)
from dreaming.engine.state import SAMPLED, Pool, TaskState, task_generator
from dreaming.features import Feature
from dreaming.objective import Scorer, allowed_tokens, make_target
from test_objective import tiny_transcoder

CONFIG = DreamConfig(prompt_length=4, length_slack=2, template="the {prompt} sat on", iterations=6, population=3,
                     children=4, topk=5, restart_every=3, lambda_min=0.05, lambda_max=1.0, restart_lambda_min=0.1,
                     restart_lambda_max=0.5, insert_delete=0.4, model_proposals=0.3, scan=16, dtype="float32")
A, B = Feature(1, 2), Feature(2, 5)
# top dataset contexts of A: (window ids, BOS first; max position)
CONTEXTS = [([1, 4, 7, 8, 9, 10, 11], 4), ([1, 12, 13, 14, 15], 3)]


@pytest.fixture(scope="module")
def transcoder():
    return tiny_transcoder()


@pytest.fixture(scope="module")
def result(lm64, transcoder):
    return dream(lm64, transcoder, A, CONFIG, dataset_max=0.5, contexts=CONTEXTS)


def figures(result):
    return [(p.token_ids, round(p.activation, 9), round(p.cross_entropy, 9)) for p in result.frontier + result.diverse]


def members(result) -> list[list[int]]:
    return [ids for task in result.state["tasks"] for ids in task["members"]["ids"]]


def test_outputs_round_trip_and_are_remeasured_from_the_text(lm64, transcoder, result):
    assert result.frontier and result.feature == "1/2" and result.dataset_max == 0.5 and result.scale_note is None
    for p in result.frontier + result.diverse:
        assert tokenize_text(lm64, p.text) == p.token_ids
        assert p.text == "the " + p.prompt + " sat on"
        assert p.counted_from == len(tokenize_text(lm64, "the x")) - 1  # BOS and "the": the template's prefix
        measured = measure_texts(lm64, transcoder, A, [p.text], dataset_max=0.5)[0]
        counted = measured.token_activations[p.counted_from :]
        assert p.activation == pytest.approx(max(counted), abs=1e-12)
        assert p.template_activation == pytest.approx(max(measured.token_activations[1 : p.counted_from]), abs=1e-12)
        assert p.fraction_of_max == pytest.approx(p.activation / 0.5)
        assert p.origin == "random" or p.origin.startswith(("sampled #", "dataset #"))
        assert p.longest_shared_run == longest_shared_run(tokenize_text(lm64, p.prompt)[1:], [c[1:] for c, _ in CONTEXTS])
    ces = [p.cross_entropy for p in result.frontier]
    assert ces == sorted(ces)
    assert result.model_dump(mode="json")["config"]["prompt_length"] == 4
    assert result.iterations == CONFIG.iterations and result.stopped == "iterations"


def test_a_feature_firing_only_on_the_template_reports_the_template_apart(lm64, transcoder):
    """A copy of the transcoder whose feature fires at the template's "<eos>" (a token no prompt may hold) and
    nowhere else: the dream reports 0 from the prompt and the template's activation separately."""
    template, feature = "<eos> the {prompt} sat on", Feature(0, 0)
    ids = tokenize_text(lm64, "<eos> the cat sat on")
    h = lm64.capture(torch.tensor([ids]), [("mlp.hook_in", 0)])[("mlp.hook_in", 0)][0]  # [T, d_model]
    fires = transcoder.__class__(transcoder.config, dtype=torch.float64)
    fires.load_state_dict(transcoder.state_dict())
    with torch.no_grad():
        direction = h[1] / h[1].norm()
        fires.W_enc[0, 0] = direction
        fires.b_enc[0, 0] = 0.0
        fires.threshold[0, 0] = 0.999 * float(h[1] @ direction)  # only a hidden state almost exactly h[1] passes
    config = CONFIG.model_copy(update={"template": template, "iterations": 2})
    out = dream(lm64, fires, feature, config, dataset_max=1.0)
    for p in out.frontier:
        whole = measure_token_ids(lm64, fires, feature, [p.token_ids])[0]
        assert whole.activation > 0  # measured over the whole text, the template's "<eos>" fires...
        assert p.activation == 0 and p.template_activation == pytest.approx(whole.activation)  # ...but not the prompt


def test_deterministic_under_a_seed(lm64, transcoder, result):
    again = dream(lm64, transcoder, A, CONFIG, dataset_max=0.5, contexts=CONTEXTS)
    assert figures(again) == figures(result)
    other = dream(lm64, transcoder, A, CONFIG.model_copy(update={"seed": 1}), dataset_max=0.5, contexts=CONTEXTS)
    assert figures(other) != figures(result)


def test_batched_features_equal_one_at_a_time(lm64, transcoder):
    config = CONFIG.model_copy(update={"seeds": 2, "init": "dataset"})
    together = dream_many(lm64, transcoder, [A, B], config, [0.5, None], contexts=[CONTEXTS, None])
    alone = [dream(lm64, transcoder, A, config, 0.5, contexts=CONTEXTS), dream(lm64, transcoder, B, config, None)]
    assert [figures(r) for r in together] == [figures(r) for r in alone]
    fallback = together[1]
    assert fallback.scale_note and fallback.dataset_max is None and fallback.frontier[0].fraction_of_max is None
    assert fallback.frontier[0].longest_shared_run is None  # no contexts: novelty unknown
    assert together[0].seeds == [0, 1] and len(together[0].state["tasks"]) == 2


def test_progress_reports_every_iteration_over_all_tasks(lm64, transcoder):
    calls = []
    dream_many(lm64, transcoder, [A, B], CONFIG, [0.5, 0.5], progress=lambda *a: calls.append(a))
    assert [done for done, _, _ in calls] == [2 * (i + 1) for i in range(CONFIG.iterations)]
    assert {total for _, total, _ in calls} == {2 * CONFIG.iterations}


def test_gcg_is_the_special_case_m1_lambda0(lm64, transcoder):
    """GCG written out by hand (one member, f only, best of parent + children) gives the engine's trajectory."""
    config = gcg_config(CONFIG, iterations=5)
    assert config.lambdas().tolist() == [0.0] and config.length_range() == (4, 4)
    s = Scorer(lm64, "mlp.hook_in", config.template, [make_target(transcoder, A, 0.5)])
    allowed = allowed_tokens(lm64)
    k = min(config.topk, int(allowed.sum()))
    task = TaskState(task_generator(config.seed, A), config.prompt_length)
    # the engine's draws, in order
    ((prompt, _),) = engine_starts.initial_prompts(s, config, allowed, [task], [0], [[]])[0]
    g = task.generator
    ids, n, r, row = torch.tensor(prompt), 4, config.children, torch.tensor([0])
    trajectory, best = [], -math.inf
    for _ in range(config.iterations):
        grad = s.gradient(ids[None], torch.tensor([n]), row, torch.zeros(1))[1][0]  # [n, vocab]
        grad[:, ~allowed] = -math.inf
        top = grad.topk(k, dim=-1).indices
        _, where, pick = torch.rand(r, generator=g), torch.rand(r, generator=g), torch.randint(k, (r,), generator=g)
        for draw in (lambda: torch.rand(r, generator=g), lambda: torch.randint(int(allowed.sum()), (r,), generator=g),
                     lambda: torch.randint(min(engine_config.MODEL_TOPK, int(allowed.sum())), (r,), generator=g)):
            draw()  # the engine's draws for the moves GCG does not make
        position = (where * n).long().clamp(max=n - 1)
        pool = ids.expand(r, n).clone()
        pool[torch.arange(r), position] = top[position, pick]
        pool = torch.cat([ids[None], pool[s.round_trips(pool, torch.full((r,), n))]])
        scores = s.score(pool, torch.full((len(pool),), n), torch.zeros(len(pool), dtype=torch.long))
        ids = pool[torch.argmax(scores.f)]  # λ = 0: the target alone, its exact max over positions
        best = max(best, scores.f.max().item())
        trajectory.append(best)
    out = dream(lm64, transcoder, A, config, 0.5)
    assert members(out) == [ids.tolist()]
    assert out.history["best"] == pytest.approx(trajectory, abs=1e-12)


def test_random_search_proposes_without_gradients(lm64, transcoder, monkeypatch):
    monkeypatch.setattr(Scorer, "gradient", lambda *a: pytest.fail("random search must not take gradients"))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: pytest.fail("random search must not take gradients"))
    out = dream(lm64, transcoder, A, random_search_config(CONFIG), 0.5)
    assert out.frontier and out.config.proposal == "random"


@pytest.mark.parametrize("at_start", [False, True])
def test_restarts_use_the_drawn_lambda_and_not_the_start(lm64, transcoder, monkeypatch, at_start):
    seen = []
    original = engine_search.restart_index

    def spy(members, lam, config):
        best = original(members, lam, config)
        seen.append((lam, members.f.clone(), members.ce.clone(), best))
        return best

    monkeypatch.setattr(engine_search, "restart_index", spy)
    config = CONFIG.model_copy(update={"iterations": 7, "restart_every": 2, "restart_lambda_min": 0.2,
                                       "restart_lambda_max": 5.0, "restart_at_start": at_start, "lineage_share": 1.0})
    dream(lm64, transcoder, A, config, 0.5)
    assert len(seen) == (4 if at_start else 3)  # iterations 2, 4, 6 (and 0 only when asked)
    assert len({lam for lam, *_ in seen}) == len(seen)  # drawn each time, not a constant
    for lam, f, ce, best in seen:
        assert 0.2 <= lam <= 5.0
        assert best == torch.argmax(f - lam * ce)


def test_no_collapse_at_the_start(lm64, transcoder):
    """After the first iteration the population still descends from M different starting prompts; the earlier
    engine's restart at iteration 0 made every member a copy or a one-token child of a single one."""
    config = CONFIG.model_copy(update={"iterations": 1, "population": 4, "restart_every": 0, "init": "sample",
                                       "length_slack": 0, "insert_delete": 0.0})

    def distances(result):
        return [sum(x != y for x, y in zip(a, b)) for a in members(result) for b in members(result)]

    now = dream(lm64, transcoder, A, config, 0.5)
    before = dream(lm64, transcoder, A, config.model_copy(update={"restart_at_start": True, "lineage_share": 1.0}), 0.5)
    assert max(distances(before)) <= 2  # each member at most one token from the one they all restarted from
    assert max(distances(now)) > 2 and len({tuple(ids) for ids in members(now)}) == 4


def test_moves_keep_the_length_range_and_the_round_trip(lm64, transcoder, monkeypatch):
    config = CONFIG.model_copy(update={"iterations": 8, "insert_delete": 1.0, "length_slack": 1})
    lengths = set()
    original = Scorer.score_children

    def spy(self, ids, lengths_, *rest):
        lengths.update(lengths_.tolist())
        for row, n in zip(ids.tolist(), lengths_.tolist()):  # every child scored round-trips
            assert tokenize_text(lm64, self.text(row[:n])[1]) == self.full_ids(row[:n])
        return original(self, ids, lengths_, *rest)

    monkeypatch.setattr(Scorer, "score_children", spy)
    out = dream(lm64, transcoder, A, config, 0.5)
    assert lengths == {3, 4, 5}  # inserting and deleting (a swap where neither may) within 4 ± 1
    for p in out.frontier:
        assert 3 <= len(p.token_ids) - p.counted_from - 2 <= 5 and tokenize_text(lm64, p.text) == p.token_ids


def test_children_all_rejected_by_the_round_trip_do_not_crash(lm64, transcoder, monkeypatch):
    original = Scorer.round_trips
    children = CONFIG.population * CONFIG.children  # one iteration's children; the starts are drawn apart
    monkeypatch.setattr(Scorer, "round_trips", lambda self, ids, lengths: original(self, ids, lengths)
                        if len(ids) != children else torch.zeros(len(ids), dtype=torch.bool))
    out = dream(lm64, transcoder, A, CONFIG, 0.5)
    assert out.frontier and out.iterations == CONFIG.iterations


def test_dataset_seeds_and_origins(lm64, transcoder):
    config = CONFIG.model_copy(update={"init": "dataset", "population": 4, "iterations": 2})
    s = Scorer(lm64, "mlp.hook_in", config.template, [make_target(transcoder, A, 0.5)])
    seeds = engine_starts.seed_prompts(s, CONTEXTS, config.prompt_length)
    assert seeds == [([4, 7, 8, 9], 0), ([12, 13, 14], 1)]  # the tokens up to each max token, BOS left out
    task = TaskState(task_generator(0, A), config.prompt_length)
    starts = engine_starts.initial_prompts(s, config, allowed_tokens(lm64), [task], [0], [seeds])[0]
    assert starts[0] == ([4, 7, 8, 9], 0)
    assert [code for _, code in starts] == [0, SAMPLED, SAMPLED - 1, SAMPLED - 2]
    names = [engine_state.origin_name(code) for _, code in starts]
    assert names == ["dataset #0", "sampled #0", "sampled #1", "sampled #2"]
    out = dream(lm64, transcoder, A, config, 0.5, contexts=CONTEXTS)
    assert "dataset #0" in {p.origin for p in out.frontier + out.diverse} | {
        engine_state.origin_name(code) for code in out.state["tasks"][0]["kept"]["origin"]}


def test_longest_shared_run_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        prompt = torch.randint(5, (8,), generator=g).tolist()
        contexts = [torch.randint(5, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (3,), generator=g)]
        brute = max((j - i for i in range(len(prompt)) for j in range(i + 1, len(prompt) + 1)
                     if any(prompt[i:j] == c[a : a + j - i] for c in contexts for a in range(len(c)))), default=0)
        assert longest_shared_run(prompt, contexts) == brute


def test_the_diverse_set_is_fluent_different_and_most_active_first(result):
    assert result.diverse
    activations = [p.activation for p in result.diverse]
    assert activations == sorted(activations, reverse=True) and len(result.diverse) <= engine_results.DIVERSE
    prompts = [p.token_ids[p.counted_from : -2] for p in result.diverse]  # the suffix " sat on" left out
    for i, a in enumerate(prompts):
        assert result.diverse[i].cross_entropy <= engine_results.FLUENT_CE
        for b in prompts[:i]:
            assert engine_results.jaccard(a, b) <= engine_results.MAX_JACCARD


def test_a_seconds_budget_and_a_plateau_stop_the_search(lm64, transcoder):
    spent = dream(lm64, transcoder, A, CONFIG.model_copy(update={"iterations": 50, "seconds": 1e-3}), 0.5)
    assert spent.stopped == "seconds" and spent.iterations == 1 and len(spent.history["best"]) == 1
    flat = dream(lm64, transcoder, A, CONFIG.model_copy(update={"iterations": 200, "plateau": 3}), 0.5)
    assert flat.stopped == "plateau" and flat.iterations < 200
    last = flat.history["best_fluent"]
    assert max(last[-3:]) < max(last[:-3]) + engine_state.PLATEAU_GAIN


def test_the_progress_callback_can_stop_the_search_keeping_what_it_found(lm64, transcoder):
    calls = []

    def progress(done, total, best):
        calls.append(done)
        return "cancelled" if done >= 3 else None

    stopped = dream(lm64, transcoder, A, CONFIG.model_copy(update={"iterations": 50}), 0.5, progress=progress)
    assert stopped.stopped == "cancelled" and stopped.iterations == 3 and calls == [1, 2, 3]
    assert stopped.frontier and len(stopped.history["best"]) == 3  # the partial best is kept
    whole = dream(lm64, transcoder, A, CONFIG.model_copy(update={"iterations": 3}), 0.5)
    assert [p.token_ids for p in stopped.frontier] == [p.token_ids for p in whole.frontier]


def test_continuing_equals_one_run(lm64, transcoder):
    config = CONFIG.model_copy(update={"iterations": 7, "seeds": 2})  # restarts at 3 and 6 on both sides of the cut
    whole = dream(lm64, transcoder, A, config, 0.5, contexts=CONTEXTS)
    first = dream(lm64, transcoder, A, config.model_copy(update={"iterations": 4}), 0.5, contexts=CONTEXTS)
    stored = engine_results.DreamResult.model_validate_json(first.model_dump_json())  # as the cache keeps it
    longer = continuation(stored, 3)  # `more`: three iterations more, the config of the whole run
    assert longer == config
    more = dream(lm64, transcoder, A, longer, 0.5, contexts=CONTEXTS, continue_from=stored)
    assert more.config == whole.config and more.iterations == 7 and more.engine_version == engine_results.ENGINE_VERSION
    assert figures(more) == figures(whole) and more.history == whole.history and members(more) == members(whole)
    with pytest.raises(ValueError, match="own config"):
        dream(lm64, transcoder, A, config.model_copy(update={"topk": 3}), 0.5, continue_from=first)
    with pytest.raises(ValueError, match="longer than the run it continues"):
        dream(lm64, transcoder, A, config.model_copy(update={"iterations": 4}), 0.5, continue_from=first)
    with pytest.raises(ValueError, match="engine version"):
        dream(lm64, transcoder, A, config, 0.5, continue_from=first.model_copy(update={"engine_version": 4}))


def test_the_chat_template_and_the_bf16_search(tiny_tokenizer, transcoder):
    """template None = the model's chat template; a bf16 search re-measured in fp32."""
    from conftest import make_tiny_lm

    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, unk_token="<unk>",
                                         bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}the {{ m['content'] }} sat on{% endfor %}"
    lm32 = make_tiny_lm(tokenizer)
    lm16 = make_tiny_lm(tokenizer)
    lm16.model.to(torch.bfloat16)
    config = CONFIG.model_copy(update={"template": None, "dtype": "bfloat16"})
    transcoder32 = copy.deepcopy(transcoder).float()  # the module's .float() works in place
    out = dream(lm16, transcoder32, A, config, 0.5, measure_lm=lm32)
    assert out.frontier
    for p in out.frontier:
        assert p.text == "the " + p.prompt + " sat on"
        measured = measure_texts(lm32, transcoder32, A, [p.text], 0.5)[0]
        assert p.activation == pytest.approx(max(measured.token_activations[p.counted_from :]), abs=1e-6)


def test_a_base_model_dreams_in_the_bare_template(lm64, transcoder):
    """No chat template (a base model) and no template given: the prompt alone after BOS, and the result says so."""
    assert not getattr(lm64.tokenizer, "chat_template", None)
    out = dream(lm64, transcoder, A, CONFIG.model_copy(update={"template": None, "iterations": 2}), 0.5)
    assert out.template == "{prompt}" and out.template_origin == "bare" and out.config.template is None
    assert out.frontier and all(p.text == p.prompt and p.counted_from == 1 for p in out.frontier)
    given = dream(lm64, transcoder, A, CONFIG.model_copy(update={"iterations": 1}), 0.5)
    assert given.template == CONFIG.template and given.template_origin == "given"


def test_pareto_front_of_a_known_set():
    def p(activation, ce):
        return DreamedPrompt(prompt="x", text="x", token_ids=[round(activation * 10), round(ce * 10)], counted_from=1,
                             activation=activation, fraction_of_max=None, template_activation=0.0, cross_entropy=ce,
                             origin="sampled", longest_shared_run=None)

    points = [p(1.0, 2.0), p(0.5, 3.0), p(2.0, 4.0), p(1.5, 4.5), p(3.0, 6.0), p(2.5, 6.0), p(0.2, 1.0)]
    front = pareto_front(points)
    assert [(q.activation, q.cross_entropy) for q in front] == [(0.2, 1.0), (1.0, 2.0), (2.0, 4.0), (3.0, 6.0)]
    assert engine_results.best_fluent(points).activation == 2.0  # CE <= 5


@pytest.mark.parametrize("bad", [dict(prompt_length=0), dict(template="no slot"), dict(template="{prompt}{prompt}"),
                                 dict(lambda_min=2.0, lambda_max=1.0), dict(position="first"), dict(iterations=10**6),
                                 dict(seconds=0), dict(insert_delete=1.5), dict(distinct="some"), dict(unknown=1)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        DreamConfig(**bad)


def test_lambda_grid_is_log_spaced():
    grid = DreamConfig(population=3, lambda_min=0.1, lambda_max=10).lambdas()
    assert grid.tolist() == pytest.approx([0.1, 1.0, 10.0])


def test_previous_config_is_the_earlier_engine():
    previous = previous_config()
    assert previous.restart_at_start and previous.selection == "smooth" and previous.distinct == "none"
    assert previous.length_range() == (12, 12) and previous.model_proposals == 0 and previous.iterations == 60


def test_config_flags_from_the_pydantic_model():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DreamConfig)
    args = parser.parse_args(["--prompt-length", "7", "--position", "last", "--template", "A:{prompt}",
                              "--lambda-max", "2.5", "--seconds", "30"])
    config = config_from_args(DreamConfig, args)
    assert config == DreamConfig(prompt_length=7, position="last", template="A:{prompt}", lambda_max=2.5, seconds=30)
    with pytest.raises(SystemExit):
        parser.parse_args(["--position", "first"])


def test_cache_round_trip(tmp_path, result):
    cache = DreamCache(tmp_path / "dreams")
    assert cache.get("model+clt", A, CONFIG, 0.5) is None
    cache.put("model+clt", result)
    assert cache.get("model+clt", A, CONFIG, 0.5) == result
    assert cache.get("model+clt", A, CONFIG, 0.7) is None  # scored against another dataset max
    assert [c.result for c in cache.for_feature("model+clt", A, 0.5)] == [result]
    assert cache.for_feature("other", A, 0.5) == []
    assert cache.get("model+clt", A, CONFIG.model_copy(update={"seed": 3}), 0.5) is None
    # the key is canonical: the same config built in another field order has the same key
    assert dream_key("i", "1/2", DreamConfig(**dict(reversed(list(CONFIG.model_dump().items())))), 1.0) == dream_key(
        "i", "1/2", CONFIG, 1.0)
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
    cached = DreamCache(tiny_bundle.directory / "dreams").for_feature(tiny_bundle.identity, Feature(1, 2),
                                                                      first["dataset_max"])
    assert [c.result.model_dump(mode="json") for c in cached] == [first]
    monkeypatch.setattr(explorer_module, "dream_many", lambda *a, **k: pytest.fail("a cached result must not be recomputed"))
    main(["dream", "--feature", "1/2", *flags])
    assert json.loads(capsys.readouterr().out) == first
    monkeypatch.undo()
    main(["batch", "--features", "1/2,0/3", *flags])
    both = json.loads(capsys.readouterr().out)
    assert [r["feature"] for r in both] == ["1/2", "0/3"] and both[0] == first
    with pytest.raises(SystemExit, match="unknown feature"):
        main(["dream", "--feature", "9/0", *flags])
    main(["dream", "--feature", "1/2", "--more", *flags])  # 2 more iterations of the cached run
    more = json.loads(capsys.readouterr().out)
    assert more["iterations"] == 4 and more["config"]["iterations"] == 4 and len(more["history"]["best"]) == 4
    assert more["history"]["best"][:2] == first["history"]["best"]
    longer = [("4" if flag == "2" and before == "--iterations" else flag) for before, flag in zip([""] + flags, flags)]
    main(["dream", "--feature", "1/2", *longer])  # cached as the 4-iteration run it is
    assert json.loads(capsys.readouterr().out) == more
    main(["dream", "--feature", "1/2", "--no-cache", *longer])  # and equal to one run of 4, computed again
    one_run = json.loads(capsys.readouterr().out)
    assert one_run["history"] == more["history"] and one_run["frontier"] == more["frontier"]
    assert one_run["state"]["tasks"][0]["members"] == more["state"]["tasks"][0]["members"]
    with pytest.raises(SystemExit, match="nothing to continue"):
        main(["dream", "--feature", "0/1", "--more", *flags])



def test_dreaming_reads_only_the_encoder_rows_it_needs(lm64, transcoder, result, tmp_path, monkeypatch):
    """A LazyEncoder (the rows of the dreamed feature, read from disk) gives the same dream as the whole
    transcoder in memory, and nothing encodes every feature."""
    from dreaming.transcoders import Transcoder
    from dreaming.formats.circuit_tracer import save_transcoder
    from dreaming.encoder import LazyEncoder
    save_transcoder(transcoder, tmp_path / "tc")
    lazy = LazyEncoder(tmp_path / "tc", dtype=torch.float64)
    monkeypatch.setattr(Transcoder, "encode", lambda *a, **k: pytest.fail("the whole encoder was used"))
    assert figures(dream(lm64, lazy, A, CONFIG, 0.5, contexts=CONTEXTS)) == figures(result)


# ------------------------------------------------------------------------------------------ starts, novelty, basins


def test_the_dataset_free_init_reads_nothing_from_the_maxima(lm64, transcoder, monkeypatch):
    """init "scan": the search (members, history) is the same with the feature's top contexts, with other
    contexts and with none; only novelty, which is measured against them, differs. Init "dataset" does read them."""
    config = CONFIG.model_copy(update={"init": "scan"})
    monkeypatch.setattr(engine_run, "seed_prompts", lambda *a: pytest.fail("init scan read the dataset's examples"))
    runs = [dream(lm64, transcoder, A, config, 0.5, contexts=contexts)
            for contexts in (CONTEXTS, [([1, 20, 21, 22, 23, 24], 2)], None)]
    for run in runs[1:]:
        assert members(run) == members(runs[0]) and run.history == runs[0].history
    assert {p.origin.split(" #")[0] for run in runs for p in run.frontier} == {"sampled"}
    monkeypatch.undo()
    seeded = dream(lm64, transcoder, A, config.model_copy(update={"init": "dataset"}), 0.5, contexts=CONTEXTS)
    assert members(seeded) != members(runs[0])


def test_starts_differ_between_features_and_are_reproducible_under_a_seed(lm64, transcoder):
    config = CONFIG.model_copy(update={"init": "scan", "population": 4})
    s = Scorer(lm64, "mlp.hook_in", config.template, [make_target(transcoder, A, 0.5), make_target(transcoder, B, 0.5)])

    def starts(feature, target, seed=0):
        task = TaskState(task_generator(seed, feature), config.prompt_length)
        return engine_starts.initial_prompts(s, config, allowed_tokens(lm64), [task], [target], [[]])[0]

    a = starts(A, 0)
    assert a == starts(A, 0)  # reproducible
    assert not {tuple(p) for p, _ in a} & {tuple(p) for p, _ in starts(B, 1)}  # another feature: other sentences
    assert a != starts(A, 0, seed=1)
    # the scan's choice: the most active of the draws, pairwise different (token Jaccard <= 0.5)
    scores = s.score(torch.tensor([p for p, _ in a]), torch.full((4,), 4), torch.zeros(4, dtype=torch.long))
    for i, (p, _) in enumerate(a):
        assert all(engine_results.jaccard(p, q) <= engine_results.MAX_JACCARD for q, _ in a[:i])
    fluent = (scores.ce <= engine_results.FLUENT_CE).tolist()
    ranked = [(not ok, -v) for ok, v in zip(fluent, scores.f.tolist())]
    assert ranked == sorted(ranked)
    # and they are what a task dreaming A and B together starts from
    both = [TaskState(task_generator(0, A), config.prompt_length), TaskState(task_generator(0, B), config.prompt_length)]
    together = engine_starts.initial_prompts(s, config, allowed_tokens(lm64), both, [0, 1], [[], []])
    assert together == [a, starts(B, 1)]


def test_batched_sampling_equals_one_at_a_time(lm64, transcoder):
    s = Scorer(lm64, "mlp.hook_in", CONFIG.template, [make_target(transcoder, A, 0.5)], batch_size=2)
    allowed = allowed_tokens(lm64)
    uniforms = torch.rand(11, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batched = s.sample(uniforms, allowed)[0]  # in chunks of 4 * batch_size = 8 rows
    alone = torch.cat([s.sample(uniforms[i : i + 1], allowed)[0] for i in range(len(uniforms))])
    assert torch.equal(batched, alone) and bool(allowed[batched].all())
    assert len({tuple(row) for row in batched.tolist()}) > 1


def test_sampled_prompts_score_without_logits_as_with_them(lm64, transcoder):
    """The log-probabilities `sample` returns with its prompts are the model's: scoring the prompts with them (no
    unembedding run) gives the scores of scoring them from scratch, the cross-entropy included, at any lengths."""
    s = Scorer(lm64, "mlp.hook_in", CONFIG.template, [make_target(transcoder, A, 0.5)], batch_size=4)
    uniforms = torch.rand(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ids, logprobs = s.sample(uniforms, allowed_tokens(lm64))
    lengths, rows = torch.tensor([6, 3, 5, 6, 1, 4, 6, 2, 6]), torch.zeros(9, dtype=torch.long)
    known, scratch = s.score(ids, lengths, rows, logprobs), s.score(ids, lengths, rows)
    for name in ("f", "ce", "smooth"):
        assert torch.allclose(getattr(known, name), getattr(scratch, name), rtol=1e-5, atol=1e-5), name


def test_sampling_follows_the_model_distribution(lm64, transcoder):
    """The first sampled token, drawn by inverse CDF over the top-k, against the model's own distribution after
    the prefix: the empirical frequencies of 4,000 draws within 0.03 of the renormalised top-k probabilities."""
    s = Scorer(lm64, "mlp.hook_in", CONFIG.template, [make_target(transcoder, A, 0.5)])
    allowed = allowed_tokens(lm64)
    uniforms = torch.rand(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = s.sample(uniforms, allowed, top_k=5)[0][:, 0]
    logprobs = s.first_logprobs.masked_fill(~allowed, -torch.inf)
    top = logprobs.topk(5)
    expected = torch.softmax(top.values, -1)
    for token, p in zip(top.indices.tolist(), expected.tolist()):
        assert (drawn == token).double().mean().item() == pytest.approx(p, abs=0.03)
    assert set(drawn.tolist()) <= set(top.indices.tolist())


def brute_shared_run(prompt: list[int], contexts: list[list[int]]) -> int:
    return max((j - i for i in range(len(prompt)) for j in range(i + 1, len(prompt) + 1)
                if any(prompt[i:j] == c[a : a + j - i] for c in contexts for a in range(len(c)))), default=0)


def test_best_novel_agrees_with_a_brute_force_shared_run_check(lm64, transcoder):
    config = CONFIG.model_copy(update={"init": "dataset", "iterations": 8})
    out = dream(lm64, transcoder, A, config, 0.5, contexts=CONTEXTS)
    contexts = [c[1:] for c, _ in CONTEXTS]
    everything = out.frontier + out.diverse + [out.best_fluent] + ([out.best_novel] if out.best_novel else [])
    novel = [p for p in everything if p.cross_entropy <= engine_results.FLUENT_CE
             and brute_shared_run(p.token_ids[p.counted_from : -2], contexts) < engine_results.NOVEL_BELOW]
    assert novel and out.best_novel is not None
    assert brute_shared_run(out.best_novel.token_ids[out.best_novel.counted_from : -2], contexts) < engine_results.NOVEL_BELOW
    assert out.best_novel.activation == max(p.activation for p in novel)
    # the search's own check (runs of NOVEL_BELOW tokens) is the brute force's, on random rows
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        row = torch.randint(4, (7,), generator=g).tolist()
        ctx = [torch.randint(4, (9,), generator=g).tolist() for _ in range(2)]
        assert engine_state.novel_row(row, engine_state.context_ngrams(ctx)) == (brute_shared_run(row, ctx) < engine_results.NOVEL_BELOW)
    assert engine_state.novel_row([1, 2, 3, 4], None) is False  # no contexts: novelty unknown


def test_no_lineage_takes_more_than_its_share_of_the_slots(lm64, transcoder, monkeypatch):
    """Every selection leaves each lineage (one start's descendants; the dataset's starts as one) at most
    lineage_share of the slots while others remain; restarts keep each slot in its lineage."""
    config = CONFIG.model_copy(update={"init": "dataset", "population": 4, "iterations": 8, "restart_every": 3,
                                       "lineage_share": 0.5})
    seen = []
    original = engine_search.select

    def spy(pool, lambdas, config_):
        chosen = original(pool, lambdas, config_)
        lineages = [engine_state.lineage(code) for code in pool.origin[chosen].tolist()]
        if len({engine_state.lineage(code) for code in pool.origin.tolist()}) > 1:
            seen.append(max(lineages.count(x) for x in lineages))
        return chosen

    monkeypatch.setattr(engine_search, "select", spy)
    dream(lm64, transcoder, A, config, 0.5, contexts=CONTEXTS)
    assert seen and max(seen) <= 2
    monkeypatch.undo()
    pool = Pool(torch.tensor([[5], [6], [7], [8]]), torch.ones(4, dtype=torch.long),
                    torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                    torch.zeros(4, dtype=torch.float64), torch.tensor([0, 1, SAMPLED, SAMPLED - 1]),
                    torch.zeros(4, dtype=torch.bool))
    two = config.model_copy(update={"population": 2})
    # the dataset's examples #0 and #1 are one lineage: the second slot goes to a sampled start
    assert original(pool, two.lambdas(), two).tolist() == [0, 2]
    assert original(pool, two.lambdas(), two.model_copy(update={"lineage_share": 1.0})).tolist() == [0, 1]


def test_the_diverse_set_spans_basins():
    def p(activation, tokens, origin):
        return DreamedPrompt(prompt="x", text="x", token_ids=[1, *tokens, 2, 3], counted_from=1,
                             activation=activation, fraction_of_max=activation, template_activation=0.0,
                             cross_entropy=3.0, origin=origin, longest_shared_run=None)

    one = [p(2.0 - i / 10, [10 * i + j for j in range(3)], "dataset #0") for i in range(10)]
    other = [p(1.0 - i / 10, [200 + 10 * i + j for j in range(3)], "sampled #0") for i in range(2)]
    chosen = engine_results.diverse_set(one + other, 2)
    assert len(chosen) == engine_results.DIVERSE and engine_results.basins(chosen) == 2
    assert [q.activation for q in chosen] == sorted((q.activation for q in chosen), reverse=True)
    assert sum(q.origin == "dataset #0" for q in chosen) == engine_results.DIVERSE - 2  # the rest filled from the strong one
    assert engine_results.diverse_set(one, 2) == one[: engine_results.DIVERSE]  # one basin: as before, the most active different


def test_a_uniform_first_token_is_drawn_from_its_own_number(lm64, transcoder):
    s = Scorer(lm64, "mlp.hook_in", CONFIG.template, [make_target(transcoder, A, 0.5)])
    allowed = allowed_tokens(lm64)
    ids = allowed.nonzero()[:, 0]
    uniforms = torch.rand(6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    free = torch.tensor([False, True] * 3)
    drawn = s.sample(uniforms, allowed, uniform_first=free)[0]
    assert drawn[free, 0].tolist() == ids[(uniforms[free, 0] * len(ids)).long()].tolist()
    assert torch.equal(drawn[~free], s.sample(uniforms[~free], allowed)[0])


def children_one_at_a_time(members, gradient_top, model_top, config, tasks, allowed_ids):
    """The reference: the engine's moves written out one child at a time, in the same draws."""
    M, r = config.population, config.children
    lo, hi = config.length_range()
    k = min(config.topk, len(allowed_ids))
    out = []
    for member in range(len(members)):
        g = tasks[member // M].generator
        move, where, pick, source = (torch.rand(r, generator=g), torch.rand(r, generator=g),
                                     torch.randint(k, (r,), generator=g), torch.rand(r, generator=g))
        uniform = torch.randint(len(allowed_ids), (r,), generator=g)
        from_model = torch.randint(engine_config.MODEL_TOPK, (r,), generator=g)
        n = int(members.lengths[member])
        row = members.ids[member, :n].tolist()
        for c in range(r):
            insert = move[c] < config.insert_delete / 2 and n < hi
            delete = not insert and move[c] < config.insert_delete and n > lo
            p = min(int(where[c] * (n + 1 if insert else n)), n if insert else n - 1)
            if config.proposal == "random":
                token = int(allowed_ids[uniform[c]])
            elif source[c] < config.model_proposals or p == n:
                token = int(model_top[member, p, from_model[c] % model_top.shape[-1]])
            else:
                token = int(gradient_top[member, p, pick[c]])
            child = (row[:p] + [token] + row[p:] if insert else row[:p] + row[p + 1 :] if delete
                     else row[:p] + [token] + row[p + 1 :])
            out.append((child, member, p))
    return out


@pytest.mark.parametrize("changes", [dict(), dict(insert_delete=1.0, length_slack=1), dict(model_proposals=1.0),
                                     dict(proposal="random"), dict(insert_delete=0.5, model_proposals=0.5)])
def test_children_made_at_once_equal_one_at_a_time(changes):
    config = CONFIG.model_copy(update={"population": 3, "children": 64, **changes})
    g = torch.Generator().manual_seed(7)
    W, N = config.length_range()[1], 6  # two tasks of 3 members
    lengths = torch.randint(config.length_range()[0], W + 1, (N,), generator=g)
    ids = torch.randint(4, 30, (N, W), generator=g) * (torch.arange(W) < lengths[:, None])
    k = 0 if config.proposal == "random" else config.topk
    gradient_top, model_top = torch.randint(4, 30, (N, W, k), generator=g), torch.randint(4, 30, (N, W + 1, 7),
                                                                                          generator=g)
    zeros = torch.zeros(N, dtype=torch.float64)
    members = Pool(ids, lengths, zeros, zeros, zeros, torch.zeros(N, dtype=torch.long),
                   torch.zeros(N, dtype=torch.bool))
    allowed_ids = torch.arange(4, 30)

    def tasks():
        return [TaskState(torch.Generator().manual_seed(s), config.prompt_length,
                                        engine_state.context_ngrams([[5, 6, 7, 8, 9]])) for s in (1, 2)]

    children, parent, changed = engine_search.make_children(members, gradient_top, model_top, config, tasks(),
                                                            allowed_ids)
    expected = children_one_at_a_time(members, gradient_top, model_top, config, tasks(), allowed_ids)
    assert [list(row) for row in children.rows()] == [child for child, _, _ in expected]
    assert parent.tolist() == [m for _, m, _ in expected] and changed.tolist() == [p for _, _, p in expected]
    ngrams = {(5, 6, 7, 8), (6, 7, 8, 9)}
    assert children.novel.tolist() == [engine_state.novel_row(child, ngrams) for child, _, _ in expected]


def reference_beams(s: Scorer, allowed: torch.Tensor, generator: torch.Generator, target: int, length: int,
                    beams: int) -> list[list[int]]:
    """A beam search by brute force: every extension scored from scratch (Scorer.score: exact max over the prompt,
    mean cross-entropy), its candidates drawn with the same numbers as the engine's; the suffix-free template
    makes Scorer.score's target the beam's."""
    rows = [[]]
    for step in range(length):
        candidates = []
        for row in rows:
            if row:
                ids = torch.tensor([row + [0]])
                with torch.no_grad():
                    logits = s.lm.model(input_ids=torch.tensor([s.full_ids(row)])).logits[0, -1]
                logprobs = logits.double().log_softmax(-1)
            else:
                logprobs = s.first_logprobs.double()
            logprobs = logprobs.masked_fill(~allowed, -torch.inf)
            top = logprobs.topk(min(engine_starts.BEAM_TOP, len(allowed)))
            uniforms = torch.rand(top.indices.shape[0], generator=generator, dtype=torch.float64)
            gumbel = top.values - torch.log(-torch.log(uniforms.clamp(1e-12, 1 - 1e-12)))
            picked = top.indices[gumbel.topk(min(engine_starts.BEAM_CANDIDATES, len(gumbel))).indices]
            candidates += [row + [int(token)] for token in picked]
        ids = torch.tensor(candidates)
        scores = s.score(ids, torch.full((len(ids),), step + 1), torch.full((len(ids),), target))
        value = scores.f.double() - engine_starts.BEAM_LAMBDA * scores.ce.double()
        order = value.argsort(descending=True, stable=True)[:beams]
        rows = [candidates[i] for i in order.tolist()]
    return rows


def test_beam_starts_equal_a_brute_force_beam_search_and_batch_like_one_at_a_time(lm64, transcoder):
    config = CONFIG.model_copy(update={"template": "the {prompt}", "prompt_length": 3, "population": 4})
    s = Scorer(lm64, "mlp.hook_in", config.template, [make_target(transcoder, A, 0.5), make_target(transcoder, B, 0.5)])
    allowed = allowed_tokens(lm64)

    def beams(features_targets, counts, lengths):
        tasks = [TaskState(task_generator(0, f), n) for (f, _), n in zip(features_targets, lengths)]
        return engine_starts.beam_starts(s, config, allowed, tasks, [t for _, t in features_targets], counts)

    (alone,) = beams([(A, 0)], [3], [3])
    expected = reference_beams(s, allowed, task_generator(0, A), 0, 3, 3)
    assert [row for row, _ in alone] == expected
    assert [engine_state.origin_name(code) for _, code in alone] == ["beam #0", "beam #1", "beam #2"]
    # with another feature's task beside it (another length, another count): the same beams
    together = beams([(B, 1), (A, 0)], [2, 3], [2, 3])
    assert together[1] == alone and [row for row, _ in together[0]] == reference_beams(
        s, allowed, task_generator(0, B), 1, 2, 2)
    # a search with half its slots started by beams: two beams and two sampled starts
    out = dream(lm64, transcoder, A, config.model_copy(update={"beam_share": 0.5, "init": "scan", "iterations": 1}),
                0.5)
    origins = {engine_state.origin_name(code) for code in out.state["tasks"][0]["kept"]["origin"]}
    assert {"beam #0", "beam #1"} <= origins <= {"beam #0", "beam #1", "sampled #0", "sampled #1"}
