"""Dataset maxima for every feature, in one streaming pass over a corpus; their examples rendered; search.

One pass runs the corpus windows (fixed-length, independent sequences, BOS first) through the model and every
layer's transcoder encoder, and keeps per feature, in fixed-size arrays whatever the corpus size:
  top_values / top_window / top_position [L, F, k]  the k strongest windows (at most one example per window;
                                                   between equal values the lower window id)
  active_count [L, F], active_sum [L, F]           -> density and mean activation when active (the sum in fixed
                                                   point: see FRACTION_SCALE)
  histogram [L, F, bins]                           counts per activation bin (bin 0: inactive tokens)
  source_max [L, F, S]                             the maximum per corpus source tag
BOS and padding positions are ignored. The statistics of two disjoint sets of windows merge
(`MaximaAccumulator.merge`) into exactly, bit for bit, what one pass over both gives, so a pass can be cut into
shards of whole batches (dreaming/maxima_ray.py). On disk (a directory): `maxima.safetensors` (the arrays; metadata:
format version, the identity of the model + transcoder, sources, token counts) and `windows/` (the corpus
token ids, memory-mapped on load), so contexts and per-token values are rendered on demand by re-running
the window, and re-measuring an example's window reproduces its value.

A feature is *positional* ("first-token") when its strongest dataset example is a text's first token (position 1,
right after the BOS; `Maxima.first_token`): its max is a fact about position, which a prompt inside a template
cannot reach. Search ranks such a feature's hits at a text's first token after every content hit unless asked
to rank by fraction of max alone (`search_features`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dreaming.activation import layer_activations, token_pieces, tokenize_text
from dreaming.atomic import atomic_directory
from dreaming.encoder import LazyEncoder
from dreaming.features import Feature, check_feature
from dreaming.maxima_checkpoint import Checkpoint, pass_key
from dreaming.models import LanguageModel
from dreaming.transcoders import Transcoder
from dreaming.windows import Windows, load_windows, save_windows

FORMAT_VERSION = 1
# Histogram bin edges: bin 0 holds inactive tokens (activation 0); bin i >= 1 holds (edges[i-1], edges[i]];
# the last bin also takes everything above the top edge. Log-spaced, 8 per decade, so any scale fits.
HISTOGRAM_EDGES = np.concatenate([[0.0], np.logspace(-3, 4, 57)]).astype(np.float32)
# Interval examples: a few examples from each activation range, so a dashboard shows typical activations, not only
# the extremes. Range r holds (edges[r-1], edges[r]] (range 0: above 0 up to edges[0]; the last: above edges[-1]).
# Log-spaced, 2 per decade: fixed ranges, so they are filled in the same streaming pass as the top-k.
INTERVAL_EDGES = HISTOGRAM_EDGES[1::4]  # every 4th histogram edge: range = (histogram bin + 2) // 4
# active_sum in fixed point: whole units and 2**-32 units, as two int64 sums, so that any grouping of the same values
# adds up to the same bits (exact for bf16 activations above 2**-25, fp32 ones above 2**-9; deterministic always;
# up to 2**31 active tokens per feature)
FRACTION_SCALE = 2**32
DENSE_ABOVE = 0.1  # a feature active on more than this fraction of tokens counts as dense
FIRST_TOKEN = 1  # the position of a text's first token (the BOS is at 0)
SearchOrder = Literal["content", "fraction"]
# how search ranks its hits by default: "content" lists positional hits (a positional feature at the text's first
# token) after every content hit; "fraction" ranks by fraction of max alone
SEARCH_ORDER: SearchOrder = "content"


@dataclass
class MaximaConfig:
    """Options of `build_maxima`; `dreaming maxima build` has one flag per field."""

    top_k: int = 32  # examples kept per feature
    interval_examples: int = 4  # examples kept per feature and activation range (INTERVAL_EDGES)
    batch_windows: int = 32  # windows per forward pass

    def __post_init__(self):
        if not 1 <= self.top_k <= 1024:
            raise ValueError(f"top_k must be in 1..1024, got {self.top_k}")
        if not 1 <= self.interval_examples <= 64:
            raise ValueError(f"interval_examples must be in 1..64, got {self.interval_examples}")
        if not 1 <= self.batch_windows <= 4096:
            raise ValueError(f"batch_windows must be in 1..4096, got {self.batch_windows}")


def strongest(values: torch.Tensor, windows: torch.Tensor, positions: torch.Tensor, k: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k strongest candidates along the last dim (values float32 >= 0, windows, positions: same shape), strongest
    first, ties to the lower window id: the order candidates come in never matters. Zero values come back as empty
    slots (window -1, position 0)."""
    key = (values.view(torch.int32).long() << 32) | ((1 << 31) - 1 - windows)  # a float32 >= 0 orders as its bits
    order = key.topk(k, dim=-1).indices
    top = values.gather(-1, order)
    return (top, torch.where(top > 0, windows.gather(-1, order), -1),
            torch.where(top > 0, positions.gather(-1, order), 0))


def example_priority(windows: torch.Tensor, positions: torch.Tensor, layer: int, features: torch.Tensor
                     ) -> torch.Tensor:
    """A pseudo-random int64 in [0, 2**53) per (window, position, layer, feature): each activation range keeps the
    examples of lowest priority, a uniform sample that does not depend on batching or order (reproducible)."""
    # distinct below 65,536 windows of 8,192 tokens, 1,024 layers, 2**24 features; beyond, keys wrap (only ties
    # between two examples, which the 53-bit priority makes vanishingly rare, would then depend on the order)
    key = ((windows * 8192 + positions) * 1024 + layer) * (1 << 24) + features
    mixed = key * -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (Fibonacci hashing); wraps mod 2**64
    mixed = mixed ^ (mixed >> 29)
    mixed = mixed * -4658895280553007687  # 0xBF58476D1CE4E5B9
    return (mixed >> 11) & ((1 << 53) - 1)


class MaximaAccumulator:
    """The fixed-size running statistics of the pass; `add` folds in one batch of windows, `merge` the statistics
    of other windows (another accumulator's `state()`)."""

    TOP = ("top_values", "top_window", "top_position")
    INTERVALS = ("interval_priority", "interval_values", "interval_window", "interval_position")
    STATE = (*TOP, "active_count", "active_sum_whole", "active_sum_fraction", "histogram", "source_max", *INTERVALS)

    def __init__(self, n_layers: int, n_features: int, n_sources: int, top_k: int, device, interval_examples: int = 4):
        L, F, k = n_layers, n_features, top_k
        R, E = len(INTERVAL_EDGES) + 1, interval_examples
        self.interval_priority = torch.full((L, F, R, E), torch.iinfo(torch.int64).max, device=device)  # empty: max
        self.interval_values = torch.zeros(L, F, R, E, device=device)
        self.interval_window = torch.full((L, F, R, E), -1, dtype=torch.int64, device=device)
        self.interval_position = torch.zeros(L, F, R, E, dtype=torch.int64, device=device)
        self.edges = torch.tensor(HISTOGRAM_EDGES, device=device)
        self.top_values = torch.zeros(L, F, k, device=device)
        self.top_window = torch.full((L, F, k), -1, dtype=torch.int64, device=device)
        self.top_position = torch.zeros(L, F, k, dtype=torch.int64, device=device)
        self.active_count = torch.zeros(L, F, dtype=torch.int64, device=device)
        self.active_sum_whole = torch.zeros(L, F, dtype=torch.int64, device=device)  # see FRACTION_SCALE
        self.active_sum_fraction = torch.zeros(L, F, dtype=torch.int64, device=device)
        self.histogram = torch.zeros(L, F, len(HISTOGRAM_EDGES) + 1, dtype=torch.int64, device=device)
        self.source_max = torch.zeros(L, F, n_sources, device=device)
        self.tokens = 0

    def add(self, layer: int, acts: torch.Tensor, windows: torch.Tensor, sources: torch.Tensor):
        """acts [batch, pos, F] (any float dtype), zero at ignored positions (BOS, padding); windows/sources
        [batch]."""
        batch, width, F = acts.shape
        flat = acts.flatten(0, 1)  # [tokens, F]
        rows, features = (flat > 0).nonzero(as_tuple=True)  # the active entries only (a few %); bool is 3x faster
        values = flat[rows, features].float()
        in_batch, positions = rows // width, rows % width
        self.active_count[layer] += torch.bincount(features, minlength=F)
        whole = values.floor()
        self.active_sum_whole[layer].index_add_(0, features, whole.long())
        self.active_sum_fraction[layer].index_add_(0, features, ((values - whole) * FRACTION_SCALE).long())
        n_bins = self.histogram.shape[-1]
        bins = torch.bucketize(values, self.edges)  # >= 1 since values > 0; bin 0 (inactive) is filled in arrays()
        self.histogram[layer] += torch.bincount(features * n_bins + bins, minlength=F * n_bins).view(F, n_bins)
        self._add_intervals(layer, values, features, (bins + 2) // 4, windows[in_batch], positions)

        # one candidate example per window: its max (0 if inactive) at its first position, from the active entries
        slot = in_batch * F + features  # [n]
        window_max = values.new_zeros(batch * F).scatter_reduce_(0, slot, values, "amax")
        first = window_max[slot] == values
        window_argmax = torch.full_like(window_max, width, dtype=torch.int64).scatter_reduce_(
            0, slot[first], positions[first], "amin")
        window_max, window_argmax = window_max.view(batch, F), window_argmax.view(batch, F) % width  # [batch, F]
        self.top_values[layer], self.top_window[layer], self.top_position[layer] = strongest(
            torch.cat([self.top_values[layer], window_max.T], dim=1),  # [F, k + batch]
            torch.cat([self.top_window[layer], windows[None, :].expand(F, -1)], dim=1),
            torch.cat([self.top_position[layer], window_argmax.T], dim=1), self.top_values.shape[-1])
        for source in sources.unique().tolist():
            best = window_max[sources == source].max(0).values  # [F]
            self.source_max[layer, :, source] = torch.maximum(self.source_max[layer, :, source], best)

    def _add_intervals(self, layer: int, values, features, ranges, windows, positions):
        """Fold active entries (values, features, activation ranges, windows, positions: [n] each) into the
        per-range samples."""
        R, E = self.interval_values.shape[-2:]
        group = features * R + ranges  # [n]: (feature, range) as one index
        priority = example_priority(windows, positions, layer, features)
        table = [t[layer].view(-1, E) for t in (self.interval_priority, self.interval_values,
                                                 self.interval_window, self.interval_position)]  # [F * R, E] each
        enters = priority < table[0][group, -1]  # below the group's worst kept priority (after a while: few)
        if not enters.any():
            return
        group, new = group[enters], (priority[enters], values[enters], windows[enters], positions[enters])
        touched = group.unique()  # the groups to re-rank: their kept entries compete with the new ones
        groups = torch.cat([touched.repeat_interleave(E), group])
        candidates = [torch.cat([kept[touched].flatten(), fresh.to(kept.dtype)]) for kept, fresh in zip(table, new)]
        order = candidates[0].argsort(stable=True)  # by priority, then (stably) by group
        order = order[groups[order].argsort(stable=True)]
        groups = groups[order]
        rank = torch.arange(len(groups), device=groups.device) - torch.searchsorted(groups, groups)
        keep = rank < E
        for kept, candidate in zip(table, candidates):
            kept[groups[keep], rank[keep]] = candidate[order][keep]

    def state(self) -> dict[str, torch.Tensor]:
        """The running statistics as CPU tensors (`tokens` as a 1-element tensor): what `merge` takes."""
        return {**{name: getattr(self, name).cpu() for name in self.STATE}, "tokens": torch.tensor([self.tokens])}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        """Fold in the statistics of other windows (an accumulator's `state()`; disjoint from the windows seen here):
        the result is exactly what `add` would give over both. Counts and sums add, maxima take the max, the top-k
        keep the strongest by `strongest`'s order, each interval sample the examples of lowest priority (a tie in
        priority, a hash collision that `example_priority` makes vanishingly rare, keeps the examples held here)."""
        other = {name: t.to(self.top_values.device) for name, t in state.items()}
        self.tokens += int(other["tokens"])
        for name in ("active_count", "active_sum_whole", "active_sum_fraction", "histogram"):
            getattr(self, name).add_(other[name])
        self.source_max = torch.maximum(self.source_max, other["source_max"])
        self.top_values, self.top_window, self.top_position = strongest(
            *(torch.cat([getattr(self, name), other[name]], dim=-1) for name in self.TOP),  # [L, F, 2k]
            self.top_values.shape[-1])
        E = self.interval_values.shape[-1]
        order = torch.cat([self.interval_priority, other["interval_priority"]], dim=-1).argsort(dim=-1, stable=True)
        for name in self.INTERVALS:  # [L, F, R, 2E] -> the E of lowest priority, lowest first
            setattr(self, name, torch.cat([getattr(self, name), other[name]], dim=-1).gather(-1, order[..., :E]))

    def arrays(self) -> dict[str, torch.Tensor]:
        """The arrays saved, derived on the CPU whatever device the pass ran on: a CUDA division by a scalar goes
        through its reciprocal, so the same statistics would otherwise give other bits on another device."""
        s = self.state()
        active_sum = s["active_sum_whole"].double() + s["active_sum_fraction"].double() / FRACTION_SCALE
        inactive = self.tokens - s["active_count"]  # histogram bin 0
        return {
            "max_activation": s["top_values"][..., 0].float(),
            "top_values": s["top_values"].float(),
            "top_window": s["top_window"].int(),
            "top_position": s["top_position"].int(),
            "active_count": s["active_count"],
            "density": (s["active_count"] / max(self.tokens, 1)).float(),
            "mean_active": (active_sum / s["active_count"].clamp(min=1)).float(),
            "histogram": torch.cat([inactive.unsqueeze(-1), s["histogram"][..., 1:]], dim=-1),
            "histogram_edges": torch.from_numpy(HISTOGRAM_EDGES.copy()),
            "source_max": s["source_max"].float(),
            "interval_values": s["interval_values"].float(),
            "interval_window": s["interval_window"].int(),
            "interval_position": s["interval_position"].int(),
            "interval_edges": torch.from_numpy(INTERVAL_EDGES.copy()),  # the fixed ranges, saved for readers
        }


@dataclass
class Maxima:
    """Dataset maxima of every feature of one transcoder, as stored in a maxima directory."""

    arrays: dict[str, torch.Tensor]
    metadata: dict
    windows: Windows

    @property
    def identity(self) -> str:
        return self.metadata["identity"]

    @property
    def sources(self) -> list[str]:
        return self.windows.sources

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.arrays["max_activation"].shape)

    def check(self, feature: Feature) -> Feature:
        return check_feature(feature, *self.shape)

    def dataset_max(self, feature: Feature) -> float:
        self.check(feature)
        return float(self.arrays["max_activation"][feature.layer, feature.index])

    @cached_property
    def first_token_features(self) -> torch.Tensor:
        """[L, F] bool: the positional features, whose strongest dataset example is a text's first token."""
        return (self.arrays["top_position"][..., 0] == FIRST_TOKEN) & (self.arrays["top_window"][..., 0] >= 0)

    def first_token(self, feature: Feature) -> bool:
        """Is the feature positional: is its strongest dataset example a text's first token (position 1)?"""
        self.check(feature)
        return bool(self.first_token_features[feature.layer, feature.index])

    def summary(self, feature: Feature) -> dict:
        """The feature's statistics (no contexts): max, density, mean when active, histogram, max per source,
        whether it is positional (`first_token`) and the share of its top examples at a text's first token."""
        self.check(feature)
        at = (feature.layer, feature.index)
        edges = self.arrays["histogram_edges"].tolist()
        positions = [position for _, _, position in self.top_examples(feature)]
        return {
            "feature": str(feature),
            "dataset_max": float(self.arrays["max_activation"][at]),
            "density": float(self.arrays["density"][at]),
            "mean_when_active": float(self.arrays["mean_active"][at]),
            "dead": bool(self.arrays["active_count"][at] == 0),
            "dense": bool(self.arrays["density"][at] > DENSE_ABOVE),
            "first_token": self.first_token(feature),
            "first_token_share": positions.count(FIRST_TOKEN) / len(positions) if positions else 0.0,
            "source_max": dict(zip(self.sources, self.arrays["source_max"][at].tolist())),
            "histogram": {"edges": edges, "counts": self.arrays["histogram"][at].tolist(),
                          "note": "bin 0: inactive tokens; bin i: (edges[i-1], edges[i]]; last bin: above"},
            "tokens": self.metadata["tokens"],
        }

    def top_examples(self, feature: Feature) -> list[tuple[float, int, int]]:
        """[(activation, window, position)] strongest first, stored values (the pass's dtype)."""
        self.check(feature)
        at = (feature.layer, feature.index)
        rows = zip(self.arrays["top_values"][at].tolist(), self.arrays["top_window"][at].tolist(),
                   self.arrays["top_position"][at].tolist())
        return [(value, window, position) for value, window, position in rows if window >= 0]

    def interval_examples(self, feature: Feature) -> list[dict]:
        """A uniform sample of the feature's examples in each activation range that has any, highest range first:
        [{"low", "high" (None: open), "examples": [(activation, window, position)] strongest first}]; [] for
        maxima built before interval examples were kept."""
        self.check(feature)
        if "interval_values" not in self.arrays:
            return []
        at = (feature.layer, feature.index)
        edges = [0.0, *self.arrays["interval_edges"].tolist(), None]
        ranges = []
        for r, (values, windows, positions) in enumerate(zip(self.arrays["interval_values"][at].tolist(),
                                                             self.arrays["interval_window"][at].tolist(),
                                                             self.arrays["interval_position"][at].tolist())):
            examples = sorted(((v, w, p) for v, w, p in zip(values, windows, positions) if w >= 0), reverse=True)
            if examples:
                ranges.append({"low": edges[r], "high": edges[r + 1], "examples": examples})
        return ranges[::-1]

    def top_contexts(self, feature: Feature, top: int | None = None) -> list[tuple[list[int], int]]:
        """[(window token ids, BOS first; the max token's position)] of the top examples, strongest first."""
        return self.contexts(self.top_examples(feature)[:top])

    def contexts(self, examples: list[tuple[float, int, int]]) -> list[tuple[list[int], int]]:
        """[(window token ids, BOS first; the example's position)] of (activation, window, position) examples."""
        windows = self.windows
        return [(np.asarray(windows.tokens[w, : windows.lengths[w]]).tolist(), position) for _, w, position in examples]


def batch_count(windows: Windows, config: MaximaConfig) -> int:
    """Batches of the pass: batch b holds windows [b * batch_windows, (b + 1) * batch_windows)."""
    if len(windows) == 0:
        raise ValueError("no windows to build maxima from (empty corpus)")
    return -(-len(windows) // config.batch_windows)


def accumulate(lm: LanguageModel, transcoder: LazyEncoder | Transcoder, windows: Windows, config: MaximaConfig,
               batches: range, on_batch: Callable[[int], object] | None = None,
               stats: MaximaAccumulator | None = None) -> MaximaAccumulator:
    """The statistics of the given batches of `windows` (all of them, or one shard; see `batch_count`), through the
    model and every layer's encoder (a LazyEncoder holds encoders only, within its byte budget), in the encoder's
    dtype, added to `stats` (default: empty); `on_batch(tokens)` after each batch."""
    tc = transcoder.config
    device = lm.device
    if stats is None:
        stats = MaximaAccumulator(tc.n_layers, tc.d_transcoder, len(windows.sources), config.top_k, device,
                                  config.interval_examples)
    hook = tc.feature_input_hook
    for batch in batches:
        start = batch * config.batch_windows
        stop = min(start + config.batch_windows, len(windows))
        lengths = torch.from_numpy(np.asarray(windows.lengths[start:stop], dtype=np.int64))
        width = int(lengths.max())
        tokens = torch.from_numpy(np.asarray(windows.tokens[start:stop, :width], dtype=np.int64)).to(device)
        positions = torch.arange(width)
        keep = ((positions[None, :] >= 1) & (positions[None, :] < lengths[:, None])).to(device)  # [batch, pos]
        # Padding is at the tail, so under causal attention it cannot change the positions kept: no mask needed,
        # and each window is measured exactly as it would be alone.
        window_ids = torch.arange(start, stop, device=device)
        sources = torch.from_numpy(np.asarray(windows.source[start:stop], dtype=np.int64)).to(device)
        with torch.no_grad():
            captured = lm.capture(tokens, [(hook, layer) for layer in tc.layer_ids])
            for layer in tc.layer_ids:
                # in the encoder's dtype (the pass's bf16 on the default path): the statistics read these dense arrays
                # several times, so half the bytes is most of their cost; only the active values are widened to fp32
                acts = transcoder.encode(captured.pop((hook, layer)), layer)
                stats.add(layer, acts.masked_fill_(~keep.unsqueeze(-1), 0), window_ids, sources)
        stats.tokens += int(keep.sum())
        if on_batch is not None:
            on_batch(int(lengths.sum()))
    return stats


def build_maxima(lm: LanguageModel, transcoder: LazyEncoder | Transcoder, windows: Windows, out_dir: str | Path,
                 identity: str, config: MaximaConfig | None = None, progress: bool = True) -> Maxima:
    """One pass over `windows` through the model and every layer's encoder (give it in the pass's dtype);
    writes `out_dir` atomically.

    The running statistics are checkpointed at most once a minute (dreaming/maxima_checkpoint.py): a new run of the
    same pass after a kill resumes from them and writes the same maxima, bit for bit (seconds: over every run)."""
    config = config or MaximaConfig()
    batches = batch_count(windows, config)
    tc = transcoder.config
    stats = MaximaAccumulator(tc.n_layers, tc.d_transcoder, len(windows.sources), config.top_k, lm.device,
                              config.interval_examples)
    checkpoint = Checkpoint(out_dir, pass_key(identity, windows, config, "single process"))
    done, seconds_before = checkpoint.resume(stats)
    done = done or 0  # batches finished
    started = time.perf_counter() - seconds_before
    lengths = np.asarray(windows.lengths, dtype=np.int64)

    def after_batch(tokens: int) -> None:
        nonlocal done
        done += 1
        bar.update(tokens)
        if done < batches:
            checkpoint.save_if_due(stats, done, time.perf_counter() - started)

    with tqdm(total=int(lengths.sum()), initial=int(lengths[: done * config.batch_windows].sum()), desc="maxima",
              unit="tok", unit_scale=True, disable=not progress) as bar:
        accumulate(lm, transcoder, windows, config, range(done, batches), after_batch, stats)
    maxima = save_maxima(stats, windows, out_dir, identity, lm.name, config, time.perf_counter() - started)
    checkpoint.remove()
    return maxima


def save_maxima(stats: MaximaAccumulator, windows: Windows, out_dir: str | Path, identity: str, model: str,
                config: MaximaConfig, seconds: float) -> Maxima:
    """Write a whole pass's statistics and its windows to `out_dir` atomically (through `<out_dir>.partial`, which
    is replaced); return them as loaded."""
    out_dir = Path(out_dir)
    metadata = {"format_version": FORMAT_VERSION, "identity": identity, "model": model,
                "tokens": stats.tokens, "windows": len(windows), "top_k": config.top_k,
                "interval_examples": config.interval_examples,
                "seconds": round(seconds, 1), "tokens_per_second": round(stats.tokens / seconds, 1)}
    with atomic_directory(out_dir) as scratch:
        save_file({name: t.contiguous().cpu() for name, t in stats.arrays().items()},
                  str(scratch / "maxima.safetensors"), metadata={"dreaming": json.dumps(metadata)})
        save_windows(windows, scratch / "windows")
    return load_maxima(out_dir)


def maxima_metadata(path: str | Path) -> dict:
    """What a maxima file records of its build (format version, identity, model, tokens...), from its header."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["dreaming"])


def load_maxima(directory: str | Path, identity: str | None = None) -> Maxima:
    """Open a maxima directory; with `identity`, refuse maxima built for another model or transcoder."""
    directory = Path(directory)
    path = directory / "maxima.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no dataset maxima at {directory}: build them with `dreaming maxima build`")
    metadata = maxima_metadata(path)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: maxima format {metadata.get('format_version')}, this version reads "
                         f"{FORMAT_VERSION}; rebuild with `dreaming maxima build`")
    if identity is not None and metadata["identity"] != identity:
        raise ValueError(f"{path} was built for another model/transcoder ({metadata['identity']}, this bundle is "
                         f"{identity}); rebuild with `dreaming maxima build`")
    return Maxima(load_file(str(path)), metadata, load_windows(directory / "windows"))


def search_features(lm: LanguageModel, transcoder: Transcoder | LazyEncoder, maxima: Maxima, text: str,
                    top: int = 20, order: SearchOrder = SEARCH_ORDER) -> list[dict]:
    """The features most active on `text`, ranked by fraction of their dataset max (dead features skipped).

    A hit is `positional` when its feature is (`first_token`) and its max on this text is at the text's first
    token: order "content" (the default) ranks positional hits after every content hit, "fraction" ranks every
    hit by fraction of max alone."""
    if not 1 <= top <= 1000:
        raise ValueError(f"top must be in 1..1000, got {top}")
    if order not in get_args(SearchOrder):
        raise ValueError(f"order must be one of {', '.join(get_args(SearchOrder))}, got {order!r}")
    ids = tokenize_text(lm, text)
    input_ids = torch.tensor([ids], device=lm.device)
    by_layer = layer_activations(lm, transcoder, input_ids)
    dataset_max = maxima.arrays["max_activation"]
    activation = torch.zeros_like(dataset_max)  # [L, F]: zero on the layers the dictionary lacks
    position = torch.zeros(dataset_max.shape, dtype=torch.long)  # [L, F]
    for layer, acts in by_layer.items():
        activation[layer], position[layer] = acts[0].max(0)
    fraction = torch.where(dataset_max > 0, activation / dataset_max.clamp(min=1e-12), 0.0)
    fraction = torch.where(activation > 0, fraction, 0.0)
    positional = maxima.first_token_features & (position == FIRST_TOKEN)
    if order == "content":
        ranked = [*strongest_hits(torch.where(positional, 0.0, fraction), top),
                  *strongest_hits(torch.where(positional, fraction, 0.0), top)][:top]
    else:
        ranked = strongest_hits(fraction, top)
    tokens = lm.tokenizer.convert_ids_to_tokens(ids)
    found = []
    for value, index in ranked:
        layer, feature_index = divmod(index, fraction.shape[1])
        at = (layer, feature_index)
        found.append({
            "feature": str(Feature(layer, feature_index)),
            "activation": float(activation[at]),
            "fraction_of_max": value,
            "dataset_max": float(dataset_max[at]),
            "density": float(maxima.arrays["density"][at]),
            "max_token": token_pieces(lm, [tokens[int(position[at])]])[0],
            "max_position": int(position[at]),
            "first_token": bool(maxima.first_token_features[at]),
            "positional": bool(positional[at]),
        })
    return found


def strongest_hits(fraction: torch.Tensor, top: int) -> list[tuple[float, int]]:
    """[(fraction, flat index)] of the `top` largest fractions above 0 of an [L, F] array, largest first."""
    values, flat = fraction.flatten().topk(min(top, fraction.numel()))
    return [(value, index) for value, index in zip(values.tolist(), flat.tolist()) if value > 0]
