"""Transcoders: file formats (round trips, Gemma Scope npz), lazy encoder rows, activations, decoding, errors."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dreaming import transcoders as T
from dreaming.encoder import LazyEncoder
from dreaming.formats import circuit_tracer, load_transcoder
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.formats.gemma_scope import load_gemma_scope
from dreaming.transcoders import Transcoder, TranscoderConfig

N, D, F = 3, 8, 16  # layers, d_model, features


def random_transcoder(kind=T.CLT, activation="jumprelu", k=None, skip=False, seed=0):
    torch.manual_seed(seed)
    c = TranscoderConfig(kind, N, D, F, activation=activation, k=k, skip_connection=skip, model_name="tiny")
    t = Transcoder(c)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn_like(p))
        if t.threshold is not None:
            t.threshold.copy_(torch.rand(N, F))
    return t


def random_inputs(seed=1):
    torch.manual_seed(seed)
    return torch.randn(N, 2, 5, D)  # [n_layers, batch, pos, d_model]


CASES = [
    dict(kind=T.CLT, activation="jumprelu"),
    dict(kind=T.CLT, activation="relu"),
    dict(kind=T.CLT, activation="jumprelu", skip=True),
    dict(kind=T.SET, activation="jumprelu", skip=True),
    dict(kind=T.SET, activation="relu"),
    dict(kind=T.SET, activation="topk", k=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_save_load_round_trip(tmp_path, case):
    t = random_transcoder(**case)
    save_transcoder(t, tmp_path / "tc")
    u = load_transcoder(tmp_path / "tc")
    assert u.config == t.config
    for (name, a), (_, b) in zip(t.state_dict().items(), u.state_dict().items()):
        assert torch.equal(a, b), name
    x = random_inputs()
    acts_t, rec_t = t(x)
    acts_u, rec_u = u(x)
    assert all(torch.equal(a, b) for a, b in zip(acts_t, acts_u))
    assert torch.equal(rec_t, rec_u)
    assert not [p for p in tmp_path.iterdir() if p.name != "tc"]  # no temporary leftovers


def test_files_follow_the_layout(tmp_path):
    save_transcoder(random_transcoder(T.CLT), tmp_path / "clt")
    names = sorted(p.name for p in (tmp_path / "clt").iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                     "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "clt" / "W_dec_1.safetensors"), framework="pt") as f:
        assert f.get_slice("W_dec_1").get_shape() == [F, N - 1, D]
    with safe_open(str(tmp_path / "clt" / "W_enc_2.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["W_enc_2", "b_dec_2", "b_enc_2", "threshold_2"]


def test_load_without_config_yaml_infers_kind_and_activation(tmp_path):
    for name, case in [("clt", dict(kind=T.CLT)), ("clt-skip", dict(kind=T.CLT, skip=True)),
                       ("set", dict(kind=T.SET, activation="relu", skip=True))]:
        t = random_transcoder(**case)
        save_transcoder(t, tmp_path / name)
        os.remove(tmp_path / name / "config.yaml")
        u = load_transcoder(tmp_path / name)
        assert (u.config.kind, u.config.activation, u.config.skip_connection) == (
            t.config.kind, t.config.activation, t.config.skip_connection)
        assert u.config.feature_input_hook == "mlp.hook_in" and u.config.model_name is None
        x = random_inputs()
        assert torch.equal(t(x)[1], u(x)[1])


def test_save_replaces_an_existing_transcoder(tmp_path):
    save_transcoder(random_transcoder(seed=0), tmp_path / "tc")
    t2 = random_transcoder(seed=1)
    save_transcoder(t2, tmp_path / "tc")
    assert torch.equal(load_transcoder(tmp_path / "tc").W_enc, t2.W_enc)
    assert [p.name for p in tmp_path.iterdir()] == ["tc"]


def test_crash_while_saving_leaves_nothing_half_written(tmp_path, monkeypatch):
    t = random_transcoder(seed=0)
    save_transcoder(t, tmp_path / "old")
    calls = []

    def failing_save_file(tensors, path):
        calls.append(path)
        if len(calls) % 3 == 0:  # the third file of every save
            raise OSError("disk full")
        save_file(tensors, path)

    monkeypatch.setattr(circuit_tracer, "save_file", failing_save_file)
    with pytest.raises(OSError):
        save_transcoder(random_transcoder(seed=1), tmp_path / "new")
    with pytest.raises(OSError):
        save_transcoder(random_transcoder(seed=1), tmp_path / "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # "new" never appeared, no temp dirs
    assert torch.equal(load_transcoder(tmp_path / "old").W_enc, t.W_enc)  # the old one is intact


def spy_on_reads(lazy, layer, log):
    """Record (tensor name, rows) of every read of `layer`'s encoder file."""
    file = lazy.files._layers[layer].W_enc.file
    read = file.read

    def logged(key, rows, transposed=False):
        log.append((key, rows))
        return read(key, rows, transposed)

    file.read = logged


@pytest.mark.parametrize("kind", [T.CLT, T.SET])
def test_lazy_encoder_reads_only_the_requested_rows(tmp_path, kind):
    t = random_transcoder(kind)
    save_transcoder(t, tmp_path / "tc")
    lazy = LazyEncoder(tmp_path / "tc")
    assert lazy.config == t.config
    idx = [7, 2, 7, 15, 0, 3, 4]  # unsorted, with a repeat
    x = random_inputs()[1]  # [batch, pos, d_model]
    for layer in range(N):
        log = []
        spy_on_reads(lazy, layer, log)
        W, b, thr = lazy.rows(layer, idx)
        assert torch.equal(W, t.W_enc[layer, idx]) and torch.equal(b, t.b_enc[layer, idx])
        assert torch.equal(thr, t.threshold[layer, idx])
        rows_read = [key.stop - key.start for name, key in log if name.startswith("W_enc")]
        assert sum(rows_read) == len(set(idx))  # 0, 2..4, 7, 15: four runs, six rows
        assert len(rows_read) == 4
        assert torch.allclose(lazy.encode(x, layer, idx), t.encode(x, layer)[..., idx], atol=1e-6)


def test_lazy_encoder_encodes_topk_features(tmp_path):
    """A topk feature depends on its whole layer: LazyEncoder reads that layer's encoder and picks the columns."""
    topk = random_transcoder(T.SET, activation="topk", k=3)
    save_transcoder(topk, tmp_path / "topk")
    x = random_inputs()[0]
    assert torch.equal(LazyEncoder(tmp_path / "topk").encode(x, 0, [1, 5]), topk.encode(x, 0)[..., [1, 5]])


def test_lazy_encoder_single_feature_equals_full_encode(tmp_path):
    t = random_transcoder(T.SET, activation="relu")
    save_transcoder(t, tmp_path / "tc")
    x = random_inputs()[2]
    got = LazyEncoder(tmp_path / "tc").encode(x, 2, [5])
    assert got.shape == (2, 5, 1)
    assert torch.allclose(got[..., 0], t.encode(x, 2)[..., 5], atol=1e-6)


def test_jumprelu_semantics():
    t = random_transcoder(activation="jumprelu")
    thr = t.threshold[1]
    pre = torch.stack([thr - 0.1, thr, thr + 0.1, thr * 0 - 5])  # [4, F]
    out = t.activate(pre, 1)
    assert (out[0] == 0).all() and (out[1] == 0).all() and (out[3] == 0).all()
    assert torch.equal(out[2], pre[2])


def test_relu_semantics():
    t = random_transcoder(activation="relu")
    pre = torch.randn(4, F)
    assert torch.equal(t.activate(pre, 0), pre.clamp(min=0))


def test_topk_semantics():
    k = 5
    t = random_transcoder(T.SET, activation="topk", k=k)
    torch.manual_seed(3)
    pre = torch.rand(6, F) + 0.01  # positive, distinct
    out = t.activate(pre, 0)
    assert ((out != 0).sum(-1) == k).all()
    for row_pre, row_out in zip(pre, out):
        keep = sorted(range(F), key=lambda i: -row_pre[i].item())[:k]
        expected = torch.zeros(F)
        expected[keep] = row_pre[keep]
        assert torch.equal(row_out, expected)
    neg = -torch.rand(2, F)  # everything negative: kept values are relu'd to zero
    assert (t.activate(neg, 0) == 0).all()


def test_clt_decode_equals_brute_force_double_loop():
    t = random_transcoder(T.CLT)
    torch.manual_seed(4)
    acts = [torch.randn(3, F) for _ in range(N)]  # [pos, F] per layer
    got = t.decode(acts)
    assert got.shape == (N, 3, D)
    for target in range(N):
        expected = t.b_dec[target].expand(3, D).clone()
        for source in range(target + 1):
            for p in range(3):
                for f in range(F):
                    expected[p] += acts[source][p, f] * t.W_dec[source][f, target - source]
        assert torch.allclose(got[target], expected, atol=1e-5)


@pytest.mark.parametrize("kind", [T.SET, T.CLT])
def test_decode_with_skip(kind):
    t = random_transcoder(kind, skip=True)
    x = random_inputs()
    acts, rec = t(x)
    without = random_transcoder(kind, skip=False)
    without.load_state_dict({name: value for name, value in t.state_dict().items() if name != "W_skip"})
    for l in range(N):  # the skip adds x @ W_skip.T to what the features write
        expected = without(x)[1][l] + x[l] @ t.W_skip[l].T
        assert torch.allclose(rec[l], expected, atol=1e-5)
    with pytest.raises(ValueError, match="W_skip"):
        t.decode(acts)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gradients_reach_every_parameter(case):
    t = random_transcoder(**case)
    x = random_inputs()
    _, rec = t(x)
    rec.square().mean().backward()
    for name, p in t.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gemma_scope_npz_transposes_the_encoder(tmp_path):
    rng = np.random.default_rng(0)
    paths, params = {}, []
    for l in range(2):
        p = dict(W_enc=rng.standard_normal((D, F)), W_dec=rng.standard_normal((F, D)), b_enc=rng.standard_normal(F),
                 b_dec=rng.standard_normal(D), threshold=rng.random(F))
        p = {k: v.astype(np.float32) for k, v in p.items()}
        paths[l] = tmp_path / f"layer_{l}" / "params.npz"
        paths[l].parent.mkdir()
        np.savez(paths[l], **p)
        params.append(p)
    t = load_gemma_scope(paths, feature_input_hook="hook_resid_mid", model_name="gemma-2-2b")
    assert t.config.kind == T.SET and t.config.activation == "jumprelu" and t.config.n_layers == 2
    assert t.config.feature_input_hook == "hook_resid_mid" and t.config.feature_output_hook == "mlp.hook_out"
    x = rng.standard_normal((5, D)).astype(np.float32)
    for l, p in enumerate(params):
        pre = x @ p["W_enc"] + p["b_enc"]
        acts = pre * (pre > p["threshold"])
        got = t.encode(torch.from_numpy(x), l).detach()
        assert np.allclose(got.numpy(), acts, atol=1e-5)
        assert np.allclose(t.decode([got, got])[l].detach().numpy(), acts @ p["W_dec"] + p["b_dec"], atol=1e-4)
    # a list in layer order works too, and the set saves in the circuit-tracer layout
    u = load_gemma_scope([paths[0], paths[1]])
    assert torch.equal(u.W_enc, t.W_enc)
    save_transcoder(t, tmp_path / "saved")
    assert torch.equal(load_transcoder(tmp_path / "saved").threshold, t.threshold)


def test_errors_name_what_was_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_transcoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LazyEncoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="layer_0.safetensors"):
        load_transcoder(tmp_path / "empty")

    save_transcoder(random_transcoder(T.SET), tmp_path / "tc")
    lazy = LazyEncoder(tmp_path / "tc")
    with pytest.raises(ValueError, match=r"0\.\.15"):
        lazy.rows(0, [3, 16])
    with pytest.raises(ValueError, match=r"0\.\.15"):
        lazy.encode(torch.zeros(D), 0, [-1])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        lazy.rows(3, [0])

    os.remove(tmp_path / "tc" / "layer_1.safetensors")  # a per-layer set with a gap has the other layers
    assert LazyEncoder(tmp_path / "tc").config.layer_ids == [0, 2]
    save_transcoder(random_transcoder(T.CLT), tmp_path / "clt-gap")  # a CLT needs them all
    os.remove(tmp_path / "clt-gap" / "W_enc_1.safetensors")
    with pytest.raises(FileNotFoundError, match=r"missing layers \[1\]"):
        load_transcoder(tmp_path / "clt-gap")

    save_transcoder(random_transcoder(T.CLT), tmp_path / "clt")
    save_file({"W_dec_1": torch.zeros(F, N, D)}, str(tmp_path / "clt" / "W_dec_1.safetensors"))  # wrong shape
    with pytest.raises(ValueError, match=r"W_dec_1.*\[16, 3, 8\].*expected \[16, 2, 8\]"):
        load_transcoder(tmp_path / "clt")
    os.remove(tmp_path / "clt" / "W_dec_2.safetensors")
    with pytest.raises(FileNotFoundError, match="W_dec_2"):
        load_transcoder(tmp_path / "clt")


def test_config_validation():
    with pytest.raises(ValueError, match="kind"):
        TranscoderConfig("clt", N, D, F)
    with pytest.raises(ValueError, match="k"):
        TranscoderConfig(T.SET, N, D, F, activation="topk")


def test_identity_covers_every_encoder_tensor(tmp_path):
    """A change to a threshold or a bias (stored after the first MiB of a large file) changes the identity."""
    from dreaming.formats import open_transcoder

    def transcoder_identity(model_name, directory):
        return open_transcoder(directory).identity(model_name)

    config = T.TranscoderConfig(T.CLT, 2, 256, 1024, activation="jumprelu")  # W_enc_0 alone is 1 MiB
    transcoder = T.Transcoder(config)
    save_transcoder(transcoder, tmp_path / "t")
    first = transcoder_identity("m", tmp_path / "t")
    assert transcoder_identity("m", tmp_path / "t") == first and transcoder_identity("other", tmp_path / "t") != first
    for name in ("threshold", "b_enc"):
        changed = load_transcoder(tmp_path / "t")
        with torch.no_grad():
            getattr(changed, name)[1, -1] += 0.5
        save_transcoder(changed, tmp_path / name)
        assert transcoder_identity("m", tmp_path / name) != first


@pytest.mark.parametrize("case", [dict(kind=T.CLT), dict(kind=T.CLT, skip=True),
                                  dict(kind=T.SET, activation="relu", skip=True)])
def test_decode_layer_equals_the_whole_decode(case):
    transcoder, x = random_transcoder(**case), random_inputs()
    with torch.no_grad():
        acts, reconstruction = transcoder(x)
        for layer in range(N):
            torch.testing.assert_close(transcoder.decode_layer(dict(enumerate(acts)), layer, x[layer]),
                                       reconstruction[layer])
    if case.get("skip"):
        with pytest.raises(ValueError, match="needs the inputs"):
            transcoder.decode_layer(dict(enumerate(acts)), 0)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_encoding_chosen_features_equals_the_columns_of_all(activation):
    transcoder = random_transcoder(kind=T.SET, activation=activation, k=4 if activation == "topk" else None)
    x = random_inputs()
    indices = [5, 0, 3]
    assert torch.allclose(transcoder.encode(x, 1, indices), transcoder.encode(x, 1)[..., indices], atol=1e-6)
