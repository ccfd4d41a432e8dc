"""Transcoders in every layout the field publishes, written here with plain safetensors / numpy for tiny models of
four architectures (Llama, Gemma-2, Qwen3, GPT-2): circuit-tracer CLT and set directories (with and without
config.yaml), config.yaml lists of relative / absolute / hf:// files, Gemma Scope params.npz, sparsify folders (with
and without W_skip), Hugging Face repos read from a local hub cache offline. Activations on real model inputs equal a
direct computation from the tensors written and circuit-tracer's own loaders; lazy reads equal whole loads; errors
are one line naming the file; the identity covers the encoders and nothing else."""

import json
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

from conftest import make_tiny_lm, make_tiny_transcoder, random_windows
from dreaming.encoder import LazyEncoder
from dreaming.formats import files as format_files, load_transcoder, open_transcoder
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.formats.files import check_against_model
from dreaming.maxima import MaximaConfig, accumulate, batch_count
from dreaming.models import canonical_hook, load_model
from dreaming.similar import similar_features
from dreaming.transcoders import CLT, SET

ARCHITECTURES = ["llama", "gemma2", "qwen3", "gpt2"]
N_LAYERS, F, K = 3, 16, 4  # layers (the tiny models'), features per layer, k of the topk transcoders
COMMIT, OTHER_COMMIT = "a" * 40, "b" * 40
SPARSIFY_HOOKPOINTS = {"llama": "layers.{}.mlp", "gemma2": "model.layers.{}.mlp", "qwen3": "layers.{}.mlp",
                       "gpt2": "h.{}.mlp"}  # sparsify names hookpoints from the base model (or the full model)


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tmp_path_factory):
    """Each architecture's tiny model, saved with save_pretrained and loaded back as any local model is."""
    loaded = {}
    for family in ARCHITECTURES:
        directory = tmp_path_factory.mktemp(family)
        lm = make_tiny_lm(tiny_tokenizer, family, n_layers=N_LAYERS)
        lm.model.save_pretrained(directory)
        lm.tokenizer.save_pretrained(directory)
        loaded[family] = load_model(str(directory))
    return loaded


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: hub references resolve from it or fail."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # both read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def hub_snapshot(cache: Path, repo_id: str, commit: str = COMMIT, main: bool = True) -> Path:
    """The snapshot folder of `repo_id` at `commit` in the cache's real layout (refs/main -> commit, with `main`)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


# ------------------------------------------------------------------------------- the formats, written by hand


def random_layers(d: int, kind: str = SET, skip: bool = False, seed: int = 0) -> list[dict]:
    """Per layer: W_enc [F, d], b_enc [F], threshold [F], W_dec [F, d] (CLT: [F, N_LAYERS - l, d]), b_dec [d],
    W_skip [d, d] with `skip`; pre-activations of unit scale on normalised inputs, thresholds in [0, 0.5]."""
    rng = np.random.default_rng(seed)
    layers = []
    for l in range(N_LAYERS):
        decoder = (F, N_LAYERS - l, d) if kind == CLT else (F, d)
        p = {"W_enc": rng.standard_normal((F, d)) / np.sqrt(d), "b_enc": 0.3 * rng.standard_normal(F),
             "threshold": 0.5 * rng.random(F), "W_dec": rng.standard_normal(decoder), "b_dec": rng.standard_normal(d)}
        if skip:
            p["W_skip"] = rng.standard_normal((d, d)) / np.sqrt(d)
        layers.append({name: value.astype(np.float32) for name, value in p.items()})
    return layers


def save(path: Path, tensors: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_yaml(path: Path, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields))
    return path


def clt_files(directory: Path, layers: list[dict], threshold: bool) -> None:
    """circuit-tracer's CLT: W_enc_{l}.safetensors (W_enc_l, b_enc_l, b_dec_l, threshold_l?), W_dec_{l}.safetensors."""
    for l, p in enumerate(layers):
        encoder = {f"W_enc_{l}": p["W_enc"], f"b_enc_{l}": p["b_enc"], f"b_dec_{l}": p["b_dec"]}
        if threshold:
            encoder[f"threshold_{l}"] = p["threshold"]
        save(directory / f"W_enc_{l}.safetensors", encoder)
        save(directory / f"W_dec_{l}.safetensors", {f"W_dec_{l}": p["W_dec"]})


def set_file(path: Path, p: dict, threshold: bool) -> Path:
    """circuit-tracer's per-layer file: W_enc, W_dec, b_enc, b_dec, activation_function.threshold?, W_skip?."""
    tensors = {name: p[name] for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if threshold:
        tensors["activation_function.threshold"] = p["threshold"]
    if "W_skip" in p:
        tensors["W_skip"] = p["W_skip"]
    return save(path, tensors)


def npz_file(path: Path, p: dict, compressed: bool = False) -> Path:
    """Gemma Scope's params.npz: W_enc stored [d_model, F]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, W_enc=p["W_enc"].T, W_dec=p["W_dec"], b_enc=p["b_enc"],
                                                      b_dec=p["b_dec"], threshold=p["threshold"])
    return path


def sparsify_folders(root: Path, layers: list[dict], hookpoint: str, skip: bool, **cfg) -> None:
    """EleutherAI sparsify: <hookpoint>/cfg.json and sae.safetensors (encoder.weight, encoder.bias, W_dec, b_dec,
    W_skip?) per layer."""
    for l, p in enumerate(layers):
        folder = root / hookpoint.format(l)
        tensors = {"encoder.weight": p["W_enc"], "encoder.bias": p["b_enc"], "W_dec": p["W_dec"], "b_dec": p["b_dec"]}
        if skip:
            tensors["W_skip"] = p["W_skip"]
        save(folder / "sae.safetensors", tensors)
        (folder / "cfg.json").write_text(json.dumps({
            "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": F, "k": K,
            "multi_topk": False, "skip_connection": skip, "transcode": True, "d_in": p["W_enc"].shape[1], **cfg}))


# ------------------------------------------------------------------------------- circuit-tracer's loaders


def their_clt(directory: Path):
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    clt = load_clt(str(directory), device=torch.device("cpu"), dtype=torch.float32)
    return clt.encode_layer


def their_set(paths: list[Path], gemma_scope: bool = False):
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    transcoders = load_transcoder_set({l: str(p) for l, p in enumerate(paths)}, scan=None,
                                      feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
                                      device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                                      special_load_fn="gemma-scope" if gemma_scope else None)
    return transcoders.encode_layer


# ----------------------------------------------------------------------------------------------- layouts


@dataclass
class Case:
    reference: str
    layout: str
    activation: str
    layers: list[dict]  # the tensors written, per layer (see random_layers)
    theirs: object = None  # circuit-tracer's encode_layer(x, layer) over the same files, where it reads them


def ct_clt(root, cache, family, d):
    layers = random_layers(d, CLT)
    clt_files(root / "clt", layers, threshold=True)
    write_yaml(root / "clt" / "config.yaml", model_kind=CLT, feature_input_hook="mlp.hook_in",
               feature_output_hook="mlp.hook_out", model_name=f"tiny-{family}")
    return Case(str(root / "clt"), "circuit-tracer-clt", "jumprelu", layers, their_clt(root / "clt"))


def ct_clt_bare(root, cache, family, d):  # no config.yaml, no thresholds: a relu CLT
    layers = random_layers(d, CLT, seed=1)
    clt_files(root / "clt", layers, threshold=False)
    return Case(str(root / "clt"), "circuit-tracer-clt", "relu", layers, their_clt(root / "clt"))


def ct_clt_topk(root, cache, family, d):  # topk, reading the (pre-norm) residual stream
    layers = random_layers(d, CLT, seed=2)
    clt_files(root / "clt", layers, threshold=False)
    write_yaml(root / "clt" / "config.yaml", model_kind=CLT, feature_input_hook="hook_resid_mid",
               feature_output_hook="hook_mlp_out", activation="topk", k=K)
    return Case(str(root / "clt"), "circuit-tracer-clt", "topk", layers)


def ct_set(root, cache, family, d):  # with W_skip and config.yaml
    layers = random_layers(d, skip=True, seed=3)
    paths = [set_file(root / "set" / f"layer_{l}.safetensors", p, threshold=True) for l, p in enumerate(layers)]
    write_yaml(root / "set" / "config.yaml", model_kind=SET, feature_input_hook="ln2.hook_normalized",
               feature_output_hook="hook_mlp_out")
    return Case(str(root / "set"), "circuit-tracer-set", "jumprelu", layers, their_set(paths))


def ct_set_bare(root, cache, family, d):
    layers = random_layers(d, seed=4)
    paths = [set_file(root / "set" / f"layer_{l}.safetensors", p, threshold=False) for l, p in enumerate(layers)]
    return Case(str(root / "set"), "circuit-tracer-set", "relu", layers, their_set(paths))


def ct_set_topk(root, cache, family, d):
    layers = random_layers(d, seed=5)
    for l, p in enumerate(layers):
        set_file(root / "set" / f"layer_{l}.safetensors", p, threshold=False)
    write_yaml(root / "set" / "config.yaml", model_kind=SET, feature_input_hook="mlp.hook_in",
               feature_output_hook="mlp.hook_out", activation="topk", k=K)
    return Case(str(root / "set"), "circuit-tracer-set", "topk", layers)


def list_relative(root, cache, family, d):  # the reference is the config.yaml itself; entries relative to it
    layers = random_layers(d, seed=6)
    paths = [set_file(root / "weights" / f"relu-{l}.safetensors", p, threshold=False) for l, p in enumerate(layers)]
    config = write_yaml(root / "tc" / "config.yaml", model_kind=SET, feature_input_hook="mlp.hook_in",
                        feature_output_hook="mlp.hook_out",
                        transcoders=[f"../weights/relu-{l}.safetensors" for l in range(N_LAYERS)])
    return Case(str(config), "circuit-tracer-set", "relu", layers, their_set(paths))


def list_absolute(root, cache, family, d):  # the reference is the directory holding the config.yaml
    layers = random_layers(d, skip=True, seed=7)
    paths = [set_file(root / "elsewhere" / str(l) / "t.safetensors", p, threshold=True) for l, p in enumerate(layers)]
    write_yaml(root / "tc" / "config.yaml", model_kind=SET, feature_input_hook="mlp.hook_in",
               feature_output_hook="mlp.hook_out", transcoders=[str(p) for p in paths])
    return Case(str(root / "tc"), "circuit-tracer-set", "jumprelu", layers, their_set(paths))


def list_hub_files(root, cache, family, d):  # a local config.yaml naming hub files, three ways of giving revisions
    layers = random_layers(d, seed=8)
    snapshot = hub_snapshot(cache, "someone/weights")
    paths = [set_file(snapshot / "per-layer" / f"l{l}.safetensors", p, threshold=True) for l, p in enumerate(layers)]
    entries = ["hf://someone/weights/per-layer/l0.safetensors",
               f"hf://someone/weights/per-layer/l1.safetensors@{COMMIT}",
               f"hf://someone/weights/per-layer/l2.safetensors?revision={COMMIT}"]
    config = write_yaml(root / "config.yaml", model_kind=SET, feature_input_hook="mlp.hook_in",
                        feature_output_hook="mlp.hook_out", transcoders=entries)
    return Case(str(config), "circuit-tracer-set", "jumprelu", layers, their_set(paths))


def gemma_scope_local(root, cache, family, d):  # npz files in a local list, one of them compressed
    layers = random_layers(d, seed=9)
    paths = [npz_file(root / f"layer_{l}" / "width_16k" / "params.npz", p, compressed=l == 1)
             for l, p in enumerate(layers)]
    config = write_yaml(root / "config.yaml", model_kind=SET, feature_input_hook="ln2.hook_normalized",
                        feature_output_hook="hook_mlp_out",
                        transcoders=[f"layer_{l}/width_16k/params.npz" for l in range(N_LAYERS)])
    return Case(str(config), "gemma-scope", "jumprelu", layers, their_set(paths, gemma_scope=True))


def gemma_scope_hub(root, cache, family, d):  # the legacy name "gemma": mwhanna's config.yaml, Google's params
    layers = random_layers(d, seed=10)
    weights = hub_snapshot(cache, "google/gemma-scope-2b-pt-transcoders")
    paths = [npz_file(weights / f"layer_{l}" / "width_16k" / "average_l0_76" / "params.npz", p)
             for l, p in enumerate(layers)]
    write_yaml(hub_snapshot(cache, "mwhanna/gemma-scope-transcoders") / "config.yaml", model_kind=SET,
               feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out",
               transcoders=[f"hf://google/gemma-scope-2b-pt-transcoders/layer_{l}/width_16k/average_l0_76/params.npz"
                            for l in range(N_LAYERS)])
    return Case("gemma", "gemma-scope", "jumprelu", layers, their_set(paths, gemma_scope=True))


def sparsify_skip(root, cache, family, d):
    layers = random_layers(d, skip=True, seed=11)
    sparsify_folders(root / "sparsify", layers, SPARSIFY_HOOKPOINTS[family], skip=True)
    return Case(str(root / "sparsify"), "sparsify", "topk", layers)


def sparsify_plain(root, cache, family, d):
    layers = random_layers(d, seed=12)
    sparsify_folders(root / "sparsify", layers, SPARSIFY_HOOKPOINTS[family], skip=False)
    return Case(str(root / "sparsify"), "sparsify", "topk", layers)


def hub_clt(root, cache, family, d):  # hf://owner/repo: its config.yaml and every W_enc/W_dec of the repo root
    layers = random_layers(d, CLT, seed=13)
    snapshot = hub_snapshot(cache, "someone/clt")
    clt_files(snapshot, layers, threshold=True)
    write_yaml(snapshot / "config.yaml", model_kind=CLT, feature_input_hook="mlp.hook_in",
               feature_output_hook="mlp.hook_out")
    return Case("hf://someone/clt", "circuit-tracer-clt", "jumprelu", layers, their_clt(snapshot))


def hub_set_subfolder(root, cache, family, d):  # hf://owner/repo/subfolder@commit, a commit that is not main
    layers = random_layers(d, seed=14)
    hub_snapshot(cache, "someone/sets")  # main: empty
    snapshot = hub_snapshot(cache, "someone/sets", OTHER_COMMIT, main=False)
    paths = [set_file(snapshot / "relu" / f"layer_{l}.safetensors", p, threshold=False) for l, p in enumerate(layers)]
    write_yaml(snapshot / "relu" / "config.yaml", model_kind=SET, feature_input_hook="mlp.hook_in",
               feature_output_hook="mlp.hook_out")
    return Case(f"hf://someone/sets/relu@{OTHER_COMMIT}", "circuit-tracer-set", "relu", layers, their_set(paths))


def hub_sparsify(root, cache, family, d):  # a bare owner/repo, no config.yaml: sparsify hookpoint folders
    layers = random_layers(d, skip=True, seed=15)
    sparsify_folders(hub_snapshot(cache, "someone/skip-transcoders"), layers, SPARSIFY_HOOKPOINTS[family], skip=True)
    return Case("someone/skip-transcoders", "sparsify", "topk", layers)


LAYOUTS = [ct_clt, ct_clt_bare, ct_clt_topk, ct_set, ct_set_bare, ct_set_topk, list_relative, list_absolute,
           list_hub_files, gemma_scope_local, gemma_scope_hub, sparsify_skip, sparsify_plain, hub_clt,
           hub_set_subfolder, hub_sparsify]


def direct(p: dict, activation: str, x: torch.Tensor) -> np.ndarray:
    """Activations [..., F] computed by hand from the tensors written (float64)."""
    pre = x.double().numpy() @ p["W_enc"].astype(np.float64).T + p["b_enc"]
    if activation == "relu":
        return np.maximum(pre, 0)
    if activation == "jumprelu":
        return np.where(pre > p["threshold"], pre, 0)
    top = np.argsort(-pre, axis=-1)[..., :K]
    out = np.zeros_like(pre)
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    return out


def inputs(lm, hook: str) -> dict[int, torch.Tensor]:
    """Every layer's input hook on a real sentence: {layer: [1, pos, d_model]}."""
    ids = lm.tokenizer("<bos> the cat sat on the mat and the dog ran fast", return_tensors="pt").input_ids
    with torch.no_grad():
        captured = lm.capture(ids, [(hook, layer) for layer in range(N_LAYERS)])
    return {layer: captured[(canonical_hook(hook), layer)] for layer in range(N_LAYERS)}


@pytest.mark.parametrize("build", LAYOUTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("family", ARCHITECTURES)
def test_activations_equal_the_files_and_circuit_tracer(models, tmp_path, hub, family, build):
    lm = models[family]
    case = build(tmp_path, hub, family, lm.d_model)
    files = open_transcoder(case.reference)
    c = files.config
    assert (files.layout, c.activation, c.n_layers, c.d_model, c.d_transcoder) == (
        case.layout, case.activation, N_LAYERS, lm.d_model, F)
    assert files.reference == case.reference or Path(files.reference).is_absolute()
    check_against_model(files, lm)
    whole, lazy = files.load(), LazyEncoder(case.reference)
    chosen = [5, 0, 5, 15]  # unsorted, a repeat
    with torch.no_grad():
        for layer, x in inputs(lm, c.feature_input_hook).items():
            expected = direct(case.layers[layer], case.activation, x)
            for got in (lazy.encode(x, layer), whole.encode(x, layer)):
                np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
            np.testing.assert_allclose(lazy.encode(x, layer, chosen).numpy(), expected[..., chosen], atol=1e-4)
            if case.theirs is not None:  # circuit-tracer zeroes position 0 (BOS): compare the others
                np.testing.assert_allclose(lazy.encode(x, layer)[:, 1:].numpy(),
                                           case.theirs(x, layer)[:, 1:].numpy(), atol=1e-5)
            # the rest of the files, as loaded: decoders, output biases, skip connections
            p = case.layers[layer]
            np.testing.assert_array_equal(whole.W_dec[layer].numpy(), p["W_dec"])
            np.testing.assert_array_equal(files.decoder_rows(layer, 2, 5).numpy(),
                                          p["W_dec"][2:5].reshape(3, -1, c.d_model))  # [rows, output layers, d]
            np.testing.assert_array_equal(whole.b_dec[layer].numpy(), p["b_dec"])
            assert (whole.W_skip is not None) == ("W_skip" in p)
            if whole.W_skip is not None:
                np.testing.assert_array_equal(whole.W_skip[layer].numpy(), p["W_skip"])


# ------------------------------------------------------------------------------------- lazy reads, budgets


def test_gemma_scope_npz_members_are_memory_mapped(tmp_path):
    """np.savez stores members uncompressed: rows are read from a memory map of the file; a compressed member is
    loaded. Both read the same."""
    p = random_layers(8)[0]
    mapped, compressed = (open_transcoder(write_yaml(
        tmp_path / name / "config.yaml",
        transcoders=[str(npz_file(tmp_path / name / "params.npz", p, compressed=name == "z"))])) for name in "mz")
    arrays = [files._layers[0].W_enc.file._npz_array("W_enc") for files in (mapped, compressed)]
    assert isinstance(arrays[0], np.memmap) and not isinstance(arrays[1], np.memmap)
    for files in (mapped, compressed):
        W, b, threshold = files.encoder_rows(0, [3, 1])
        np.testing.assert_array_equal(W.numpy(), p["W_enc"][[3, 1]])
        np.testing.assert_array_equal(threshold.numpy(), p["threshold"][[3, 1]])


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_lazy_encoder_equals_loading_whole_within_any_budget(tmp_path, activation):
    """Rows, one layer, every feature: equal to the whole transcoder loaded, whether layers stay resident (default
    budget), one fits (first come, first kept) or none (each use reads the layer again)."""
    layers = random_layers(8, seed=20)
    for l, p in enumerate(layers):
        set_file(tmp_path / "set" / f"layer_{l}.safetensors", p, threshold=activation == "jumprelu")
    write_yaml(tmp_path / "set" / "config.yaml", model_kind=SET, activation=activation,
               k=K if activation == "topk" else None)
    whole = load_transcoder(tmp_path / "set")
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    one_layer = F * 8 * 4 + F * 4 + (F * 4 if activation == "jumprelu" else 0)  # fp32 bytes of W, b, threshold
    for budget, resident in ((None, [0, 1, 2]), (one_layer, [0]), (0, [])):
        lazy = LazyEncoder(tmp_path / "set", **({} if budget is None else {"cache_bytes": budget}))
        for layer in range(N_LAYERS):
            assert torch.equal(lazy.encode(x, layer), whole.encode(x, layer))
            assert torch.equal(lazy.encode(x, layer, [7, 2, 7]), whole.encode(x, layer, [7, 2, 7]))
            W, b, threshold = lazy.rows(layer, [9, 3])
            assert torch.equal(W, whole.W_enc[layer, [9, 3]]) and torch.equal(b, whole.b_enc[layer, [9, 3]])
            assert (threshold is None) == (activation != "jumprelu")
        assert sorted(lazy.resident) == resident
        assert torch.equal(lazy.encode(x, 0), whole.encode(x, 0))  # again, resident or read again


def test_maxima_pass_over_lazy_encoders_is_bit_identical(tiny_lm, tmp_path):
    """The maxima pass holding encoders only (bf16, resident or streamed per layer) gives the statistics of the
    whole transcoder loaded in bf16, bit for bit."""
    transcoder = make_tiny_transcoder(tiny_lm)
    save_transcoder(transcoder, tmp_path / "tc")
    windows = random_windows(12, 16, len(tiny_lm.tokenizer), seed=2)
    config = MaximaConfig(top_k=4, batch_windows=5)
    batches = range(batch_count(windows, config))
    expected = accumulate(tiny_lm, load_transcoder(tmp_path / "tc", dtype=torch.bfloat16), windows, config,
                          batches).state()
    for budget in (1 << 30, 0):
        encoder = LazyEncoder(tmp_path / "tc", dtype=torch.bfloat16, cache_bytes=budget)
        state = accumulate(tiny_lm, encoder, windows, config, batches).state()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), name


def test_hub_files_are_fetched_when_first_used(hub, monkeypatch):
    """A CLT's encoders are all a hub snapshot asks for; a set's per-layer hub files are fetched one by one when
    first used; a decoder missing from the cache is a one-line error only when a decoder is read."""
    d = 8
    snapshot = hub_snapshot(hub, "someone/clt")
    clt_files(snapshot, random_layers(d, CLT), threshold=False)
    write_yaml(snapshot / "config.yaml", model_kind=CLT)
    for l in range(N_LAYERS):
        (snapshot / f"W_dec_{l}.safetensors").unlink()  # as after a download of the encoders only
    layers = random_layers(d, seed=1)
    weights = hub_snapshot(hub, "someone/weights")
    for l, p in enumerate(layers):
        set_file(weights / f"layer_{l}.safetensors", p, threshold=False)
    write_yaml(hub_snapshot(hub, "someone/set") / "config.yaml", model_kind=SET,
               transcoders=[f"hf://someone/weights/layer_{l}.safetensors" for l in range(N_LAYERS)])
    fetched, patterns = [], []

    def download(repo_id, filename, **kwargs):
        fetched.append(filename)
        return huggingface_hub.hf_hub_download(repo_id, filename, **kwargs)

    def snapshot_download(repo_id, **kwargs):
        patterns.append(kwargs["allow_patterns"])
        return huggingface_hub.snapshot_download(repo_id, **kwargs)

    monkeypatch.setattr(format_files, "hf_hub_download", download)
    monkeypatch.setattr(format_files, "snapshot_download", snapshot_download)
    clt = open_transcoder("hf://someone/clt")
    assert fetched == ["config.yaml"] and patterns == [["W_enc_*.safetensors"]]
    LazyEncoder(clt).encode(torch.zeros(2, d), 2)
    with pytest.raises(FileNotFoundError, match="hf://someone/clt/W_dec_1.safetensors") as error:
        clt.decoder_rows(1, 0, 2)
    assert "\n" not in str(error.value)

    fetched.clear()
    files = open_transcoder("hf://someone/set")
    assert fetched == ["config.yaml", "layer_0.safetensors"]  # the config, and layer 0 for the sizes
    W, _, _ = files.encoder_rows(2, [4])
    assert fetched[-1] == "layer_2.safetensors" and "layer_1.safetensors" not in fetched
    np.testing.assert_array_equal(W.numpy(), layers[2]["W_enc"][[4]])


def test_decoder_readers_take_any_reference(models, tmp_path):
    """similar_features reads a sparsify transcoder as it reads the same weights saved in circuit-tracer's layout."""
    layers = random_layers(32, seed=3)
    sparsify_folders(tmp_path / "sparsify", layers, "layers.{}.mlp", skip=False)
    save_transcoder(load_transcoder(tmp_path / "sparsify"), tmp_path / "saved")
    for feature in ("0/3", "2/11"):
        assert similar_features(tmp_path / "sparsify", feature, top=5) == similar_features(tmp_path / "saved",
                                                                                           feature, top=5)


def test_round_trip_of_our_own_saves(tiny_lm, tmp_path):
    transcoder = make_tiny_transcoder(tiny_lm)
    save_transcoder(transcoder, tmp_path / "tc")
    files = open_transcoder(tmp_path / "tc")
    assert files.config == transcoder.config and files.layout == "circuit-tracer-clt"
    for (name, a), (_, b) in zip(transcoder.state_dict().items(), files.load().state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------ identity


def rewrite(path: Path, change) -> None:
    """Rewrite a safetensors file with `change(tensors)` applied to its arrays."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def nudge(array: np.ndarray) -> None:
    array.flat[-1] = np.nextafter(array.flat[-1], np.float32(np.inf))  # one ulp: a byte or two


@pytest.mark.parametrize("kind", [CLT, SET])
def test_identity_changes_with_any_encoder_byte_and_no_decoder(tmp_path, kind):
    layers = random_layers(8, kind, seed=4)
    if kind == CLT:
        clt_files(tmp_path, layers, threshold=True)
        encoder, decoder = tmp_path / "W_enc_2.safetensors", tmp_path / "W_dec_2.safetensors"
        names = {"W_enc": "W_enc_2", "b_enc": "b_enc_2", "threshold": "threshold_2", "W_dec": "W_dec_2",
                 "b_dec": "b_dec_2"}
    else:
        for l, p in enumerate(layers):
            set_file(tmp_path / f"layer_{l}.safetensors", p, threshold=True)
        encoder = decoder = tmp_path / "layer_2.safetensors"
        names = {"W_enc": "W_enc", "b_enc": "b_enc", "threshold": "activation_function.threshold",
                 "W_dec": "W_dec", "b_dec": "b_dec"}
    first = open_transcoder(tmp_path).identity("m")
    assert len(first) == 16 and open_transcoder(tmp_path).identity("m") == first
    assert open_transcoder(tmp_path).identity("another model") != first
    for part, path in (("W_dec", decoder), ("b_dec", encoder)):  # decoders: never part of the identity
        rewrite(path, lambda tensors: nudge(tensors[names[part]]))
        assert open_transcoder(tmp_path).identity("m") == first, part
    seen = {first}
    for part in ("W_enc", "b_enc", "threshold"):
        rewrite(encoder, lambda tensors: nudge(tensors[names[part]]))
        identity = open_transcoder(tmp_path).identity("m")
        assert identity not in seen, part
        seen.add(identity)


def test_identity_of_gemma_scope_covers_its_encoder(tmp_path):
    p = random_layers(8)[0]
    config = write_yaml(tmp_path / "config.yaml", transcoders=["params.npz"])
    npz_file(tmp_path / "params.npz", p)
    first = open_transcoder(config).identity("m")
    npz_file(tmp_path / "params.npz", {**p, "W_dec": p["W_dec"] + 1})
    assert open_transcoder(config).identity("m") == first
    W_enc = p["W_enc"].copy()
    nudge(W_enc)
    npz_file(tmp_path / "params.npz", {**p, "W_enc": W_enc})
    assert open_transcoder(config).identity("m") != first


# -------------------------------------------------------------------------------------------------- errors


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_check_against_model(models, tmp_path):
    lm = models["llama"]
    narrow = random_layers(16)  # d_model 16, the model's is 32
    for l, p in enumerate(narrow):
        set_file(tmp_path / "narrow" / f"layer_{l}.safetensors", p, threshold=False)
    with pytest.raises(ValueError, match=r"layer_0\.safetensors: d_model 16, expected 32") as error:
        check_against_model(open_transcoder(tmp_path / "narrow"), lm)
    one_line(error)
    # a CLT needs every layer of the model; a per-layer set may hold some (a warning), not more than it has
    clt_files(tmp_path / "short-clt", random_layers(32, CLT)[:2], threshold=False)
    with pytest.raises(ValueError, match="2 layers, expected 3") as error:
        check_against_model(open_transcoder(tmp_path / "short-clt"), lm)
    one_line(error)
    for l, p in enumerate(random_layers(32)[:2]):
        set_file(tmp_path / "short" / f"layer_{l}.safetensors", p, threshold=False)
    (warning,) = check_against_model(open_transcoder(tmp_path / "short"), lm)
    assert "layers 0..1 only" in warning
    set_file(tmp_path / "deep" / "layer_5.safetensors", random_layers(32)[0], threshold=False)
    with pytest.raises(ValueError, match=r"layers 5, but .* has layers 0\.\.2") as error:
        check_against_model(open_transcoder(tmp_path / "deep"), lm)
    one_line(error)
    # a model name that differs is a warning (a base model's transcoder on its instruct model), not an error
    sparsify_folders(tmp_path / "sparsify", random_layers(32), "layers.{}.mlp", skip=False)
    (tmp_path / "sparsify" / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    (warning,) = check_against_model(open_transcoder(tmp_path / "sparsify"), lm)
    assert "SmolLM2-135M" in warning and lm.name in warning
    (tmp_path / "sparsify" / "config.json").write_text(json.dumps({"model": f"someone/{lm.name}"}))
    assert check_against_model(open_transcoder(tmp_path / "sparsify"), lm) == []


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, hub):
    d = 8
    layers = random_layers(d)

    def a_set(name, threshold=False):
        for l, p in enumerate(layers):
            set_file(tmp_path / name / f"layer_{l}.safetensors", p, threshold)
        return tmp_path / name

    # a missing layer file: a per-layer set has the others; a CLT needs them all; a config.yaml list names a file
    (a_set("gap") / "layer_1.safetensors").unlink()
    gap = open_transcoder(tmp_path / "gap")
    assert gap.config.layer_ids == [0, 2] and gap.config.n_layers == 3
    with pytest.raises(ValueError, match=r"layer 1 is not in this dictionary: its layers are 0, 2") as error:
        gap.encoder_rows(1, [0])
    one_line(error)
    clt_files(tmp_path / "clt-gap", random_layers(d, CLT), threshold=False)
    (tmp_path / "clt-gap" / "W_enc_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing layers \[1\]") as error:
        open_transcoder(tmp_path / "clt-gap")
    one_line(error)
    config = write_yaml(tmp_path / "list" / "config.yaml", transcoders=["../gap/layer_0.safetensors",
                                                                        "../gap/layer_1.safetensors"])
    with pytest.raises(FileNotFoundError, match=r"config\.yaml: layer 1's file .*gap/layer_1\.safetensors") as error:
        open_transcoder(config)
    one_line(error)

    # an unknown hook, an unknown activation in config.yaml
    write_yaml(a_set("hook") / "config.yaml", model_kind=SET, feature_input_hook="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match=r"config\.yaml: unknown hook point 'blocks\.0\.hook_resid_post'") as error:
        open_transcoder(tmp_path / "hook")
    one_line(error)
    write_yaml(a_set("gelu") / "config.yaml", model_kind=SET, activation="gelu")
    with pytest.raises(ValueError, match=r"config\.yaml: unknown activation 'gelu'") as error:
        open_transcoder(tmp_path / "gelu")
    one_line(error)

    # a corrupt (truncated) safetensors file, encoder or decoder
    path = a_set("corrupt") / "layer_2.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"layer_2\.safetensors: not a readable safetensors file") as error:
        open_transcoder(tmp_path / "corrupt")
    one_line(error)
    clt_files(tmp_path / "clt", random_layers(d, CLT), threshold=False)
    path = tmp_path / "clt" / "W_dec_1.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    files = open_transcoder(tmp_path / "clt")  # measuring never reads decoders
    with pytest.raises(ValueError, match=r"W_dec_1\.safetensors: not a readable safetensors file") as error:
        files.decoder_rows(1, 0, 1)
    one_line(error)

    # d_model that changes between layers; a jumprelu layer without its threshold
    set_file(a_set("widths") / "layer_1.safetensors", random_layers(d + 1)[1], threshold=False)
    with pytest.raises(ValueError, match=r"layer_1\.safetensors: tensor 'W_enc' has shape \[16, 9\], "
                                         r"expected \[16, 8\]") as error:
        open_transcoder(tmp_path / "widths")
    one_line(error)
    set_file(a_set("thresholds", threshold=True) / "layer_2.safetensors", layers[2], threshold=False)
    with pytest.raises(ValueError, match=r"layer_2\.safetensors: missing tensor 'activation_function\.threshold'"):
        open_transcoder(tmp_path / "thresholds")

    # sparsify: another activation, a transcoder at a hookpoint that is not an MLP's
    for name, cfg, message in [("groupmax", {"activation": "groupmax"}, "unknown activation 'groupmax'"),
                               ("resid", {}, "unknown hookpoint 'layers.0'")]:
        sparsify_folders(tmp_path / name, layers, "layers.{}" if name == "resid" else "layers.{}.mlp", skip=False,
                         **cfg)
        with pytest.raises(ValueError, match=r"layers\.0(\.mlp)?/cfg\.json: " + message) as error:
            open_transcoder(tmp_path / name)
        one_line(error)

    # nothing there; a hub repo the cache does not hold (offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dictionary found") as error:
        open_transcoder(tmp_path / "empty")
    one_line(error)
    with pytest.raises(FileNotFoundError, match="hf://nobody/nothing") as error:
        open_transcoder("hf://nobody/nothing")
    one_line(error)
