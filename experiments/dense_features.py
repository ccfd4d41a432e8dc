"""Dense features of a bundle, studied as the motivating update studied the 10 densest features of a 30M CLT.

1. The 10 densest live features (density: the fraction of the maxima pass's tokens on which a feature is active),
   each with its dataset max, its top dataset examples (the max token marked [[so]], source tag), what it fires on
   in a sample of windows (tokens, sources, documents), its top and bottom output tokens (dreaming.output_tokens)
   and an interpretation. Interpretations are not computed: they are read from
   experiments/dense_features_interpretations.json ({"L/I": text}), written by hand from this evidence; a feature
   without one shows "not interpretable yet".
2. Their cosines: of the normalised decoders concatenated over every output layer (the update's measure; a CLT's
   features of layers a <= b share the output layers from b on, while in a per-layer set features of different
   layers write to different layers, so that cosine is exactly 0), and, a different quantity, of their output
   directions summed into the residual stream (dreaming.output_tokens.output_directions).
3. The antipodal-pair test: each dense feature's most negative partner among all features (similar_features with
   lowest=True) and whether the two fire disjointly on `--windows` corpus windows drawn with `--seed`, run as the
   maxima pass runs them (bf16): tokens where each fires and where both fire, the count expected if they fired
   independently (P(a) P(b) N) and the Jaccard index. The same for `--pairs` random pairs of live features of one
   layer, and for `--null` random live features with their own most negative partner (a lowest cosine among all
   features is an extreme by construction: these say what that extreme is for an ordinary feature).

Writes <out>/dense_features.md (also printed: the same text) and <out>/dense_features.json (every figure). With
`--render` it measures nothing and writes the markdown again from that JSON, with the interpretations as they are
now: run the study, read the evidence, write the interpretations, render.

    python experiments/dense_features.py --bundle "$DREAMING_HOME/default" [--windows 512] [--pairs 1000]
                                         [--null 100] [--seed 0] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.nn.functional import normalize

from dreaming.activation import layer_activations
from dreaming.bundle import default_bundle_dir
from dreaming.dashboard import render_examples
from dreaming.explorer import Explorer
from dreaming.features import Feature, parse_feature
from dreaming.formats import open_transcoder, read_config
from dreaming.maxima import DENSE_ABOVE, Maxima
from dreaming.models import fast_dtype
from dreaming.output_tokens import output_directions, output_tokens
from dreaming.similar import similar_features
from dreaming.transcoders import CLT

DENSEST = 10
EXAMPLES = 4  # top dataset examples shown per feature
SHOWN = 8  # tokens shown per list (promotes, suppresses)
FIRES_ON = 6  # tokens shown of what a feature fires on in the sample
DOCUMENTS = 3  # documents shown with the most of a feature's firings in the sample
MIN_SEEN = 20  # a token's firing rate is shown only for tokens seen this often in the sample
INTERPRETATIONS = Path(__file__).with_name("dense_features_interpretations.json")
PERCENTILES = [0, 1, 5, 25, 50, 75, 95, 99, 100]
# The update's figures for the 30M CLT, quoted as facts.
UPDATE = {"interpretable": "6 of 10", "similar": "~0.5 among the early-layer content-word (#1), newline (#5) and "
          "comma (#8) features", "complementary": "-0.14 for the most complementary pair (#2, unlikely to end a "
          "sentence; #9, possible ends of sentences or clauses)", "antipodal": "no antipodal pairs"}


def read_interpretations() -> dict[str, str]:
    return json.loads(INTERPRETATIONS.read_text()) if INTERPRETATIONS.exists() else {}


def densest(maxima: Maxima, count: int) -> list[Feature]:
    density = maxima.arrays["density"]  # [L, F]
    return [Feature(*divmod(int(i), density.shape[1])) for i in density.flatten().topk(count).indices]


def random_features(maxima: Maxima, count: int, rng: np.random.Generator) -> list[Feature]:
    layers, indices = np.nonzero(maxima.arrays["active_count"].numpy() > 0)
    return [Feature(int(layers[i]), int(indices[i])) for i in rng.choice(len(layers), count, replace=False)]


def random_pairs(maxima: Maxima, count: int, rng: np.random.Generator) -> list[tuple[Feature, Feature]]:
    """`count` random live features, each with another live feature of its layer drawn at random."""
    live = maxima.arrays["active_count"].numpy() > 0  # [L, F]
    pairs = []
    for a in random_features(maxima, count, rng):
        others = np.flatnonzero(live[a.layer])
        pairs.append((a, Feature(a.layer, int(rng.choice(others[others != a.index])))))
    return pairs


def lowest_partner(transcoder_dir: Path, feature: Feature) -> tuple[Feature, float]:
    (hit,) = similar_features(transcoder_dir, feature, top=1, lowest=True)
    return parse_feature(hit["feature"]), hit["cosine"]


def unit_decoders(transcoder_dir: Path, features: list[Feature]) -> torch.Tensor:
    """[n, n_layers * d_model]: each feature's decoder at the output layers it writes to (zeros at the others),
    concatenated and normalised: what dreaming.similar compares."""
    files = open_transcoder(transcoder_dir)
    vectors = torch.zeros(len(features), files.config.n_layers, files.config.d_model)
    for row, f in zip(vectors, features):
        decoder = files.decoder_rows(f.layer, f.index, f.index + 1)[0]  # [output layers, d_model]
        row[f.layer : f.layer + len(decoder)] = decoder
    return normalize(vectors.flatten(1), dim=1)


def corpus_pass(lm, transcoder, maxima: Maxima, sample: np.ndarray, pairs: list[tuple[Feature, Feature]],
                watched: list[Feature], batch_windows: int = 32) -> dict:
    """Over the windows `sample`, as the maxima pass runs them (BOS and padding not counted): `pairs` [n, 3] the
    tokens where a fires, where b fires and where both fire; per key ("token" id, "source", "document") `seen`
    [size] the tokens with each value of the key and `fired` [len(watched), size] those where each watched
    feature fired; `tokens`."""
    windows = maxima.windows
    sizes = {"token": len(lm.tokenizer), "source": len(windows.sources), "document": int(windows.document.max()) + 1}
    layers = sorted({a.layer for a, _ in pairs} | {f.layer for f in watched})
    counts = torch.zeros(len(pairs), 3, dtype=torch.long)
    seen = {key: torch.zeros(size, dtype=torch.long) for key, size in sizes.items()}
    fired = {key: torch.zeros(len(watched), size, dtype=torch.long) for key, size in sizes.items()}
    for start in range(0, len(sample), batch_windows):
        rows = sample[start : start + batch_windows]
        lengths = torch.from_numpy(windows.lengths[rows].astype(np.int64))
        width = int(lengths.max())
        ids = torch.from_numpy(windows.tokens[rows, :width].astype(np.int64))
        positions = torch.arange(width)
        keep = (positions >= 1) & (positions < lengths[:, None])  # [batch, pos]; padding is at the tail
        by_layer = layer_activations(lm, transcoder, ids.to(lm.device), layers=layers)
        per_window = {"source": windows.source[rows], "document": windows.document[rows]}
        keys = {"token": ids[keep], **{key: torch.from_numpy(values.astype(np.int64))[:, None].expand(-1, width)[keep]
                                       for key, values in per_window.items()}}  # each [tokens]
        for key, values in keys.items():
            seen[key] += torch.bincount(values, minlength=sizes[key])
        for layer in layers:
            active = by_layer[layer][keep.to(lm.device)].cpu() > 0  # [tokens, F]
            mine = [i for i, (a, _) in enumerate(pairs) if a.layer == layer]
            if mine:
                a = active[:, [pairs[i][0].index for i in mine]]
                b = active[:, [pairs[i][1].index for i in mine]]
                counts[mine] += torch.stack([a.sum(0), b.sum(0), (a & b).sum(0)], dim=1)
            for w, f in enumerate(watched):
                if f.layer == layer:
                    for key, values in keys.items():
                        fired[key][w] += torch.bincount(values[active[:, f.index]], minlength=sizes[key])
    return {"pairs": counts, "seen": seen, "fired": fired, "tokens": int(seen["token"].sum())}


def co_firing(counts: torch.Tensor, tokens: int) -> dict:
    """One pair's figures from its counts (a fires, b fires, both fire) over `tokens` tokens."""
    a, b, both = counts.tolist()
    expected = a * b / tokens
    return {"fires_a": a, "fires_b": b, "both": both, "expected_both": expected,
            "both_over_expected": both / expected if expected else None,
            "jaccard": both / (a + b - both) if a + b > both else None}


def distribution(values: list[float | None]) -> dict:
    values = np.array([v for v in values if v is not None], dtype=float)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES))}


def share_below(values: list[float | None], x: float | None) -> float | None:
    """The fraction of `values` strictly below x (None values left out)."""
    values = [v for v in values if v is not None]
    return None if x is None else sum(v < x for v in values) / len(values)


def group(pairs: list[dict]) -> dict:
    return {"pairs": len(pairs), "cosine": distribution([p["cosine"] for p in pairs]),
            "both_over_expected": distribution([p["both_over_expected"] for p in pairs]),
            "jaccard": distribution([p["jaccard"] for p in pairs]),
            "disjoint": sum(p["both"] == 0 for p in pairs) / len(pairs),
            "above_independence": sum((p["both_over_expected"] or 0) > 1 for p in pairs) / len(pairs)}


def placement(pair: dict, measured: dict) -> dict:
    """Where a pair falls among the random pairs (cosine, co-firing ratio) and among random features' own most
    negative partners (cosine): the share of each group strictly below it."""
    return {"cosine_share_of_random_below": share_below([p["cosine"] for p in measured["random"]], pair["cosine"]),
            "ratio_share_of_random_below": share_below([p["both_over_expected"] for p in measured["random"]],
                                                       pair["both_over_expected"]),
            "cosine_share_of_null_below": share_below([p["cosine"] for p in measured["null"]], pair["cosine"])}


def opening(lm, maxima: Maxima, document: int, width: int = 80) -> tuple[str, str]:
    """A document's source and its first `width` characters (its first window decoded), after the tokens that
    every document of its source starts with (a chat template's system turn)."""
    windows = maxima.windows
    documents, first = np.unique(np.asarray(windows.document), return_index=True)  # each document's first window
    w = first[np.searchsorted(documents, document)]
    same_source = first[np.asarray(windows.source)[first] == windows.source[w]]
    starts = np.asarray(windows.tokens[same_source])  # [documents of the source, window length]
    shared = int(np.argmin((starts == starts[0]).all(0))) if len(same_source) > 1 else 1
    text = lm.tokenizer.decode(windows.tokens[w, max(shared, 1) : windows.lengths[w]])
    return maxima.sources[windows.source[w]], text[:width]


def fires_on(lm, maxima: Maxima, seen: dict, fired: dict) -> dict:
    """What one feature fired on in the sample: the tokens it fired on most often (share of its firings, its rate
    on the token) and most reliably (its rate, among tokens seen MIN_SEEN times or more), its rate per source, and
    the documents with most of its firings (share, rate, source, opening)."""
    total = max(int(fired["token"].sum()), 1)
    rate = {key: fired[key] / seen[key].clamp(min=1) for key in seen}
    often = fired["token"].topk(FIRES_ON).indices.tolist()
    reliably = torch.where(seen["token"] >= MIN_SEEN, rate["token"], 0.0).topk(FIRES_ON).indices.tolist()
    sources = rate["source"].argsort(descending=True).tolist()
    documents = fired["document"].topk(DOCUMENTS).indices.tolist()
    return {
        "tokens_often": [{"token": lm.tokenizer.decode([i]), "share_of_firings": int(fired["token"][i]) / total,
                          "rate": float(rate["token"][i])} for i in often],
        "tokens_reliably": [{"token": lm.tokenizer.decode([i]), "rate": float(rate["token"][i]),
                             "seen": int(seen["token"][i])} for i in reliably],
        "sources": {maxima.sources[s]: float(rate["source"][s]) for s in sources},
        "documents": [dict(zip(("source", "opening"), opening(lm, maxima, d)), document=d,
                           share_of_firings=int(fired["document"][d]) / total, rate=float(rate["document"][d]))
                      for d in documents],
    }


def top_k_sources(maxima: Maxima, feature: Feature) -> dict:
    """The sources of a feature's stored top-k examples, and how many documents they come from."""
    windows = [w for _, w, _ in maxima.top_examples(feature)]
    sources = Counter(maxima.sources[maxima.windows.source[w]] for w in windows)
    return {"examples": len(windows), "documents": len({int(maxima.windows.document[w]) for w in windows}),
            "sources": dict(sources.most_common())}


def study(explorer: Explorer, windows: int, pairs: int, null: int, seed: int) -> dict:
    bundle, maxima = explorer.bundle, explorer.require_maxima()
    transcoder_dir = bundle.directory / "transcoder"
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(maxima.windows), min(windows, len(maxima.windows)), replace=False))
    dense = densest(maxima, DENSEST)
    partners = [lowest_partner(transcoder_dir, f) for f in dense]
    null_features = random_features(maxima, null, rng)
    null_partners = [lowest_partner(transcoder_dir, f) for f in null_features]
    groups = {"dense": [(f, p) for f, (p, _) in zip(dense, partners)], "random": random_pairs(maxima, pairs, rng),
              "null": [(f, p) for f, (p, _) in zip(null_features, null_partners)]}
    lm = bundle.load_model(dtype=fast_dtype(explorer.device), device=explorer.device)  # as the maxima pass
    all_pairs = [pair for members in groups.values() for pair in members]
    counted = corpus_pass(lm, bundle.load_transcoder(dtype=lm.dtype, device=lm.device), maxima, sample, all_pairs,
                          dense)
    cosines = iter((unit_decoders(transcoder_dir, [a for a, _ in all_pairs])
                    * unit_decoders(transcoder_dir, [b for _, b in all_pairs])).sum(1).tolist())
    figures = iter(co_firing(c, counted["tokens"]) for c in counted["pairs"])
    measured = {name: [{"a": str(a), "b": str(b), "cosine": next(cosines), **next(figures)} for a, b in members]
                for name, members in groups.items()}
    interpretations = read_interpretations()
    outputs = output_tokens(explorer.lm, transcoder_dir, dense, k=SHOWN)
    density = maxima.arrays["density"]
    features = []
    for i, f in enumerate(dense):
        pair = measured["dense"][i]
        summary = maxima.summary(f)
        features.append({
            "feature": str(f), "density": summary["density"], "sample_density": pair["fires_a"] / counted["tokens"],
            "dataset_max": summary["dataset_max"], "mean_when_active": summary["mean_when_active"],
            "examples": [{key: e[key] for key in ("source", "document", "activation", "fraction_of_max", "context")}
                         for e in render_examples(explorer.lm, explorer.transcoder, maxima, f, top=EXAMPLES)],
            "top_k": top_k_sources(maxima, f),
            "fires_on": fires_on(explorer.lm, maxima, counted["seen"],
                                 {key: fired[i] for key, fired in counted["fired"].items()}),
            "output_tokens": outputs[i],
            "interpretation": interpretations.get(str(f)),
            "lowest_partner": {**pair, "partner_density": float(density[partners[i][0].layer, partners[i][0].index]),
                               **placement(pair, measured)},
        })
    unit = unit_decoders(transcoder_dir, dense)
    residual = normalize(output_directions(transcoder_dir, dense), dim=1)
    config = read_config(transcoder_dir)
    return {
        "bundle": {"model": bundle.manifest.get("model_name"), "transcoder": config.kind,
                   "layers": config.n_layers, "features_per_layer": config.d_transcoder,
                   "recipe": bundle.manifest.get("recipe"), "train_config": bundle.manifest.get("train_config"),
                   "maxima_tokens": maxima.metadata["tokens"]},
        "density": {"median": float(density.flatten().median()), "max": float(density.max()),
                    "dense_above": DENSE_ABOVE, "dense": int((density > DENSE_ABOVE).sum()),
                    "live": int((maxima.arrays["active_count"] > 0).sum())},
        "sample": {"windows": len(sample), "tokens": counted["tokens"], "seed": seed},
        "features": features,
        "decoder_cosine": (unit @ unit.T).tolist(),
        "output_direction_cosine": (residual @ residual.T).tolist(),
        "pairs": {name: group(members) for name, members in measured.items()},
        "measured_pairs": measured,
    }


def code(text: str) -> str:
    """Inline code for markdown (double backticks, so single ones inside survive), newlines shown as ⏎."""
    return "`` " + text.replace("\n", "⏎").replace("\t", "⇥") + " ``"


def percent(x: float | None) -> str:
    return "—" if x is None else f"{x:.0%}"


def number(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def matrix(labels: list[str], rows: list[list[float]]) -> list[str]:
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    return lines + [f"| {label} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for label, row in zip(labels, rows)]


def off_diagonal(rows: list[list[float]], same_layer: bool | None, labels: list[str]) -> list[tuple[float, str, str]]:
    """(cosine, a, b) for each pair i < j of features of the same layer (False: of different layers; None: all)."""
    layer = [parse_feature(label).layer for label in labels]
    return [(rows[i][j], labels[i], labels[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))
            if same_layer is None or (layer[i] == layer[j]) == same_layer]


def evidence(f: dict) -> list[str]:
    """The markdown lines of what a feature fired on in the sample, and where its top-k examples come from."""
    fires, top_k = f["fires_on"], f["top_k"]
    sources = list(fires["sources"].items())
    return [
        f"Its stored top {top_k['examples']} examples come from {top_k['documents']} documents: "
        + ", ".join(f"{source} {n}" for source, n in top_k["sources"].items()) + ".",
        "",
        "In the sample it fires most often on (share of its firings; its rate on the token): "
        + ", ".join(f"{code(t['token'])} {t['share_of_firings']:.1%}; {t['rate']:.0%}" for t in fires["tokens_often"])
        + f"; most reliably on (its rate; tokens seen, at least {MIN_SEEN}): "
        + ", ".join(f"{code(t['token'])} {t['rate']:.0%}; {t['seen']}" for t in fires["tokens_reliably"]) + ".",
        "",
        "Its rate per source: highest " + ", ".join(f"{s} {r:.1%}" for s, r in sources[:3])
        + ", lowest " + ", ".join(f"{s} {r:.1%}" for s, r in sources[-2:]) + ".",
        "",
        "Its documents with the most firings in the sample (share of its firings; its rate in the document):",
        "",
    ] + [f"- {d['source']} #{d['document']}, {d['share_of_firings']:.0%}; {d['rate']:.0%}: {code(d['opening'])}"
         for d in fires["documents"]] + [""]


def markdown(report: dict, command: str) -> str:
    b, d, s = report["bundle"], report["density"], report["sample"]
    features = report["features"]
    labels = [f["feature"] for f in features]
    train = b["train_config"] or {}
    cross_layer = b["transcoder"] == CLT
    if "k" not in train:
        how = ""
    elif b.get("recipe") == "closed-form":
        how = (f" (fitted with k = {train['k']} of {train['features_per_layer']:,}: each feature fires on "
               f"{train['k'] / train['features_per_layer']:.2%} of the fit tokens)")
    else:
        how = (f" (trained with BatchTopK, k = {train['k']} of {train['features_per_layer']:,}: features fire on "
               f"{train['k'] / train['features_per_layer']:.2%} of the tokens on average, each as often as training "
               "made it)")
    lines = [
        f"# Dense features of {b['model']}'s transcoder",
        "",
        f"    {command}",
        "",
        f"{b['model']} with a {b['transcoder']} of {b['layers']} layers x {b['features_per_layer']:,} features{how}"
        + f". Densities from the maxima pass over {b['maxima_tokens']:,} tokens: {d['live']:,} live features, "
        f"median density {d['median']:.2%}, the densest {d['max']:.2%}; {d['dense']} features are dense by the "
        f"dashboards' line (> {d['dense_above']:.0%}). Co-firing over {s['windows']} windows drawn with seed "
        f"{s['seed']} ({s['tokens']:,} tokens), run in bf16 as the maxima pass.",
        "",
        "## The 10 densest features",
        "",
        "| # | feature | density | density in the sample | dataset max | interpretation |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for rank, f in enumerate(features, 1):
        lines.append(f"| {rank} | {f['feature']} | {f['density']:.2%} | {f['sample_density']:.2%} | "
                     f"{f['dataset_max']:.2f} | {f['interpretation'] or 'not interpretable yet'} |")
    for rank, f in enumerate(features, 1):
        lines += ["", f"### {rank}. {f['feature']}", "",
                  f"Density {f['density']:.2%}, dataset max {f['dataset_max']:.2f}, mean when active "
                  f"{f['mean_when_active']:.2f}.", "", "Top dataset examples (source #document, activation re-measured "
                  "in fp32, % of the dataset max; the max token in [[ ]]):", ""]
        lines += [f"- {e['source']} #{e['document']}, {e['activation']:.2f} ({e['fraction_of_max']:.0%}): "
                  f"{code(e['context'])}" for e in f["examples"]]
        lines += [""] + evidence(f)
        for side, verb in (("top", "Promotes"), ("bottom", "Suppresses")):
            lines.append(f"{verb} (logit effect): " + ", ".join(f"{code(token)} {value:+.2f}"
                                                                for token, value in f["output_tokens"][side]))
            lines.append("")
        lines.append(f"Interpretation: {f['interpretation'] or 'not interpretable yet'}")
    lines += ["", "## Decoder cosines among the 10", "",
              "Cosine of the normalised decoders concatenated over every output layer (the update's measure). "
              + ("A feature of layer l writes to layers l and later, so two features of layers a <= b are compared "
                 "over the layers from b on." if cross_layer else
                 "In a per-layer set a feature writes only to its own layer, so features of different layers have "
                 "cosine exactly 0 by construction; only same-layer pairs carry information."), ""]
    lines += matrix(labels, report["decoder_cosine"])
    lines += ["", "A different quantity, the closest analogue across layers: the cosine of the features' output "
              "directions summed into the residual stream (`output_directions`). For two features of one layer of "
              "a set it equals the decoder cosine.", ""]
    lines += matrix(labels, report["output_direction_cosine"])
    compared = off_diagonal(report["decoder_cosine"], None if cross_layer else True, labels)
    across = off_diagonal(report["output_direction_cosine"], False, labels)
    lines += [""] + [f"- {name}: {len(pairs)} pairs, from {min(pairs)[0]:.2f} ({min(pairs)[1]}, {min(pairs)[2]}) to "
                     f"{max(pairs)[0]:.2f} ({max(pairs)[1]}, {max(pairs)[2]})" for name, pairs in
                     ((("every pair" if cross_layer else "same layer") + ", decoder cosine", compared),
                      ("different layers, output-direction cosine", across)) if pairs]
    lines += ["", "## The antipodal-pair test", "",
              "Each dense feature's most negative partner among all features (lowest decoder cosine), and how the "
              "two fire on the sample: tokens where each fires, where both fire, the count expected if they fired "
              "independently (P(a) P(b) N), their ratio (0: disjoint; 1: independent) and the Jaccard index. The "
              "last three columns: the share of the random same-layer pairs below it in cosine and in ratio, and "
              "the share of random live features' own most negative partners below it in cosine.", "",
              "| feature | most negative partner | cosine | partner density | a fires | b fires | both | expected | "
              "both / expected | Jaccard | random pairs, lower cosine | random pairs, lower ratio | random "
              "features' lowest partners, lower cosine |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in features:
        p = f["lowest_partner"]
        lines.append(f"| {f['feature']} | {p['b']} | {p['cosine']:.3f} | {p['partner_density']:.2%} | {p['fires_a']:,}"
                     f" | {p['fires_b']:,} | {p['both']:,} | {p['expected_both']:.1f} | "
                     f"{number(p['both_over_expected'])} | {number(p['jaccard'], 3)} | "
                     f"{percent(p['cosine_share_of_random_below'])} | {percent(p['ratio_share_of_random_below'])} | "
                     f"{percent(p['cosine_share_of_null_below'])} |")
    names = {"dense": "dense features' most negative partners", "random": "random live pairs of one layer",
             "null": "random live features' most negative partners"}
    lines += ["", "Distributions (percentiles) over the three groups of pairs:", "",
              "| pairs | n | figure | " + " | ".join(f"p{p}" for p in PERCENTILES)
              + " | disjoint (both = 0) | both / expected > 1 |",
              "|---|---:|---|" + "---:|" * (len(PERCENTILES) + 2)]
    for name, g in report["pairs"].items():
        for figure in ("cosine", "both_over_expected", "jaccard"):
            lines.append(f"| {names[name]} | {g['pairs']} | {figure} | "
                         + " | ".join(f"{v:.3f}" for v in g[figure].values())
                         + f" | {g['disjoint']:.0%} | {g['above_independence']:.0%} |")
    lines += ["", "## Against the update's figures (30M CLT)", ""] + comparison(report, compared, cross_layer)
    return "\n".join(lines) + "\n"


def comparison(report: dict, compared: list[tuple[float, str, str]], cross_layer: bool) -> list[str]:
    """`compared`: the decoder cosines that carry information (a CLT's every pair, a set's same-layer pairs)."""
    features = report["features"]
    interpreted = sum(f["interpretation"] is not None for f in features)
    layers = sorted({parse_feature(f["feature"]).layer for f in features})
    partners = [f["lowest_partner"] for f in features]
    dense, null, random = (report["pairs"][name] for name in ("dense", "null", "random"))
    return [
        f"- Interpretable: the update had {UPDATE['interpretable']}; here {interpreted} of {len(features)} have an "
        "interpretation written from the evidence above.",
        f"- Similar dense features: the update had {UPDATE['similar']}. Here the 10 are in layers "
        f"{', '.join(map(str, layers))}; " + ("decoder cosines" if cross_layer else "same-layer decoder cosines")
        + (f" range from {min(compared)[0]:.2f} to {max(compared)[0]:.2f} over {len(compared)} pairs" if compared
           else " range over no pairs")
        + ("." if cross_layer else "; cross-layer decoder cosines are 0 by construction (output-direction cosines "
           "above)."),
        f"- Most complementary pair: the update had {UPDATE['complementary']}. Here the lowest decoder cosine among "
        "the 10 is " + (f"{min(compared)[0]:.2f} ({min(compared)[1]}, {min(compared)[2]})" if compared
                        else "none (no same-layer pair)")
        + ".",
        f"- Antipodal pairs: the update found {UPDATE['antipodal']}. Here the dense features' most negative partners "
        f"among all features have cosines {min(p['cosine'] for p in partners):.2f} to "
        f"{max(p['cosine'] for p in partners):.2f} (median over random live features' most negative partners "
        f"{null['cosine']['p50']:.2f}); their co-firing is {dense['both_over_expected']['p0']:.2f} to "
        f"{dense['both_over_expected']['p100']:.2f} times the independence expectation: "
        f"{sum(p['both'] == 0 for p in partners)} of {len(partners)} never fire together in the sample and "
        f"{dense['above_independence']:.0%} fire together more often than independence predicts (random features' "
        f"most negative partners {null['above_independence']:.0%}, random pairs {random['above_independence']:.0%}).",
    ]


def plot(report: dict, path: Path) -> None:
    """Decoder cosine against co-firing (both / expected, log) for the three groups of pairs: an antipodal pair
    would sit at a cosine near -1 and a co-firing near 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 5))
    groups = [("random", "random live pairs of one layer", "#9ca3af", "."),
              ("null", "random live features and their most negative partner", "#2563eb", "x"),
              ("dense", "the 10 densest features and their most negative partner", "#dc2626", "o")]
    for key, label, color, marker in groups:
        pairs = [pair for pair in report["measured_pairs"][key] if pair["both_over_expected"] is not None]
        # a pair that never fires together is drawn at the bottom of the axis, 1e-2
        axis.scatter([pair["cosine"] for pair in pairs], [max(pair["both_over_expected"], 1e-2) for pair in pairs],
                     s=18 if key != "random" else 6, color=color, marker=marker, label=label)
    axis.axhline(1, color="gray", linestyle="--", linewidth=1)
    axis.set_yscale("log")
    axis.set_xlabel("cosine of the normalised concatenated decoders")
    axis.set_ylabel("co-firing: both / expected if independent (log; 1e-2: never)")
    axis.set_title("No antipodal pairs: the most negative partners fire together")
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=str(default_bundle_dir()))
    parser.add_argument("--windows", type=int, default=512, help="corpus windows sampled for co-firing")
    parser.add_argument("--pairs", type=int, default=1000, help="random same-layer pairs of live features")
    parser.add_argument("--null", type=int, default=100, help="random live features, with their most negative partner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results", help="results directory")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write <out>/dense_features.md again from its JSON, with the "
                             "interpretations as they are now in " + INTERPRETATIONS.name)
    args = parser.parse_args()
    out = Path(args.out)
    if args.render:
        report = json.loads((out / "dense_features.json").read_text())
        interpretations = read_interpretations()
        for f in report["features"]:
            f["interpretation"] = interpretations.get(f["feature"])
    else:
        started = time.perf_counter()
        explorer = Explorer.open(args.bundle)
        report = study(explorer, args.windows, args.pairs, args.null, args.seed)
        bundle = '"$DREAMING_HOME/default"' if Path(args.bundle) == default_bundle_dir() else "DIR"
        report["command"] = (f"python experiments/dense_features.py --bundle {bundle} --windows {args.windows} "
                             f"--pairs {args.pairs} --null {args.null} --seed {args.seed}")
        report["seconds"] = round(time.perf_counter() - started)
    text = markdown(report, report["command"]) + f"\nThe script took {report['seconds']} s.\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dense_features.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "dense_features.md").write_text(text)
    plot(report, out / "dense_features.png")
    print(text)


if __name__ == "__main__":
    main()
