"""Batched scoring of prompts for EPO: a feature's pre-activation and the prompt's cross-entropy, and their
token gradients.

A prompt is a row of token ids placed inside a template: the text is `prefix + prompt + suffix`, measured as
`[BOS] + tokens` like every other text (dreaming.activation). Prompts in a batch may differ in length: `ids`
[B, W] is right-padded and `lengths` [B] says how many tokens each row holds; each row's suffix follows its own
last token and padding comes after the suffix, where under causal attention it changes nothing before it.

The prefix never changes, so its KV cache is computed once and expanded over each batch. A child that differs
from its parent from prompt position p on reuses the parent's KV cache up to p - 1 and runs only the rest
(`score_children`); the parent's target values and token log-probabilities before that are its own.

For a row (one population member or child) with target feature (layer, w, b) and scale s:
    f   = max over target positions of (h_layer · w + b) / s     (the pre-activation in fractions of max)
    CE  = mean over the prompt tokens of -log p(token | everything before it)   (every optimised token)
    L_λ = f − λ · CE
Target positions: "last" = the last prompt token; "max" = every prompt and suffix token (the prefix cannot
change, and the measurement leaves it out too). Scores and selection use the exact max; the gradient uses a smooth
max, τ·logsumexp(pre/τ) with τ = 0.1 of the dataset max, since the exact max gives one position all of it. The
gradient of L_λ with respect to the one-hot input (through `inputs_embeds`, the CE's labels included) is what EPO
takes its top-k tokens from; each row uses its own λ, and one backward pass over the sum of the rows' objectives
gives every row its own gradient.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from dreaming.encoder import LazyEncoder
from dreaming.features import Feature, check_feature
from dreaming.generate import pick_tokens
from dreaming.models import LanguageModel
from dreaming.special_tokens import with_bos
from dreaming.templates import template_ids
from dreaming.transcoders import Transcoder

POSITIONS = ("last", "max")
MIN_CHUNK = 32  # children per forward pass at least (see Scorer.score_children)
CPU_BATCH, GPU_BATCH = 128, 1024  # rows per forward pass by default on a CPU and on a GPU
SMOOTH_MAX = 0.1  # temperature of the smooth max over positions in the gradient, in units of the target (of max)


@dataclass
class Target:
    """One feature's encoder row, and the scale its pre-activation is divided by."""

    feature: Feature
    weight: torch.Tensor  # [d_model]
    bias: float
    scale: float


def make_target(transcoder: Transcoder | LazyEncoder, feature: Feature, scale: float) -> Target:
    c = transcoder.config
    check_feature(feature, c.layer_ids, c.d_transcoder)
    if not scale > 0:
        raise ValueError(f"the target scale must be positive, got {scale}")
    weight, bias, _ = transcoder.rows(feature.layer, [feature.index])
    return Target(feature, weight[0].detach().clone(), float(bias[0].detach()), float(scale))


@dataclass
class Scores:
    """Per row: exact f [B] (what selection uses and the search reports), CE [B], smooth f [B]."""

    f: torch.Tensor
    ce: torch.Tensor
    smooth: torch.Tensor


@dataclass
class Parents:
    """What the gradient pass leaves for scoring children from their parents' KV cache, per row:
    keys/values per layer [B, kv_heads, P + W + s, head_dim] (prefix, prompt, suffix), the target at every
    prompt and suffix position [B, W + s] and each prompt token's log-probability [B, W]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pre: torch.Tensor
    token_logprobs: torch.Tensor

    def take(self, index: torch.Tensor, width: int | None = None) -> "Parents":
        """The rows `index`; keys/values cut to `width` cached positions."""
        return Parents([k[index, :, :width] for k in self.keys], [v[index, :, :width] for v in self.values],
                       self.pre[index], self.token_logprobs[index])


@dataclass
class Expansion:
    """The gradient pass over members: the top-k tokens of the gradient of L_λ at every prompt position
    [B, W, k], the model's own top tokens for every position a token could be at (0..length, so an insertion at
    the end too) [B, W + 1, k_model], and the Parents state their children reuse."""

    gradient_top: torch.Tensor
    model_top: torch.Tensor
    parents: Parents

    def put(self, index: torch.Tensor, other: "Expansion") -> "Expansion":
        """Rows `index` replaced, in place, by `other`'s rows (in order); returns self."""
        self.gradient_top[index], self.model_top[index] = other.gradient_top, other.model_top
        for mine, theirs in zip(self.parents.keys + self.parents.values, other.parents.keys + other.parents.values):
            mine[index] = theirs
        self.parents.pre[index], self.parents.token_logprobs[index] = other.parents.pre, other.parents.token_logprobs
        return self


class Scorer:
    """Scores token prompts inside one template for a list of targets, in batches, on `lm`'s device and dtype.

    Rows of a batch say which target they serve (`rows`: index into `targets`) and their λ.
    """

    def __init__(self, lm: LanguageModel, hook: str, template: str, targets: list[Target], position: str = "max",
                 batch_size: int | None = None):
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        # rows per forward pass; a GPU runs few large passes (its cost is in launches, not rows), a CPU smaller ones
        self.few_passes = lm.device.type != "cpu"
        batch_size = batch_size or (GPU_BATCH if self.few_passes else CPU_BATCH)
        self.lm, self.hook, self.targets, self.position, self.batch_size = lm, hook, targets, position, batch_size
        self.prefix_text, self.suffix_text, self.prefix_ids, self.suffix_ids = template_ids(lm, template)
        self.suffix = torch.tensor(self.suffix_ids, dtype=torch.long, device=lm.device)  # [s]
        self.pad_id = lm.bos_token_id  # any id: padding sits after the suffix, where nothing reads it
        embeddings = lm.model.get_input_embeddings()
        self.embedding = embeddings.weight  # [vocab, d_model]
        # Gemma's embedding module multiplies its rows by sqrt(d_model); inputs_embeds bypass the module, so the scale
        # is applied here (to the rows and to the one-hot gradient)
        scale = getattr(embeddings, "embed_scale", None)
        self.embed_scale = None if scale is None else scale.to(self.embedding.dtype)
        self.layers = sorted({t.feature.layer for t in targets})
        weights = torch.stack([t.weight for t in targets])  # [targets, d_model]
        self.dtype = torch.float64 if lm.dtype == torch.float64 else torch.float32  # of targets and log-probs
        self.weights = weights.to(lm.device, self.dtype)
        self.biases = torch.tensor([t.bias for t in targets], dtype=self.dtype, device=lm.device)
        self.scales = torch.tensor([t.scale for t in targets], dtype=self.dtype, device=lm.device)
        self.target_layers = torch.tensor([t.feature.layer for t in targets], device=lm.device)
        # transformers >= 5.2x names the KV cache argument `cache` (was `past_key_values`)
        parameters = inspect.signature(lm.model.base_model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        softcap = getattr(lm.model.config, "final_logit_softcapping", None)
        self.softcap = float(softcap) if softcap else None
        with torch.no_grad():  # the prefix, once: its KV cache and the log-probabilities of the first prompt token
            out = lm.model(input_ids=torch.tensor([self.prefix_ids], device=lm.device), use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.2x
        self.prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]  # [1, kv_heads, P, head_dim]
        self.first_logprobs = self._logits(out.logits[0, -1]).log_softmax(-1)  # [vocab]

    # ------------------------------------------------------------------------------------------ forward

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.to(self.dtype)
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def _layout(self, ids: torch.Tensor, lengths: torch.Tensor, start: int):
        """(token ids [B, T], is-prompt [B, T], valid [B, T]) of positions start.. of every row: its prompt tokens,
        then its suffix, then padding; T = the longest row's prompt and suffix, less `start`."""
        s = len(self.suffix_ids)
        width = int(lengths.max()) + s - start
        position = start + torch.arange(width, device=ids.device)  # [T] prompt-relative positions
        is_prompt = position[None] < lengths[:, None]
        valid = position[None] < (lengths + s)[:, None]
        prompt_tokens = ids.gather(1, position.clamp(max=ids.shape[1] - 1).expand(len(ids), -1))
        if s:
            suffix_tokens = self.suffix[(position[None] - lengths[:, None]).clamp(0, s - 1)]
        else:
            suffix_tokens = torch.full_like(prompt_tokens, self.pad_id)
        tokens = torch.where(is_prompt, prompt_tokens, torch.where(valid, suffix_tokens, self.pad_id))
        return tokens, is_prompt, valid

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """What the model's embedding module gives for token ids [...]: [..., d_model]."""
        rows = self.embedding[tokens]
        return rows if self.embed_scale is None else rows * self.embed_scale

    def _forward(self, embeds: torch.Tensor, rows: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                 logit_positions: int):
        """Run embeddings [B, T, d_model] after the cached keys/values (per layer [B, kv_heads, c, head_dim]):
        (target per position [B, T], logits of the first `logit_positions` positions [B, ·, vocab], the cache)."""
        lm = self.lm
        cache = DynamicCache(kv, config=lm.model.config)
        with lm.hooked([(self.hook, layer) for layer in self.layers]) as captured:
            hidden = lm.model.base_model(inputs_embeds=embeds, use_cache=True,
                                         **{self.cache_argument: cache}).last_hidden_state  # [B, T, d_model]
        w, b, s = self.weights[rows], self.biases[rows], self.scales[rows]  # [B, d_model], [B], [B]
        layer_of_row = self.target_layers[rows]
        pre = None  # [B, T]: each row's own feature at its own layer
        for (_, layer), value in captured.items():
            value = (value.to(self.dtype) * w[:, None]).sum(-1)
            pre = value if pre is None else torch.where((layer_of_row == layer)[:, None], value, pre)
        pre = (pre + b[:, None]) / s[:, None]
        batch, vocab = len(embeds), self.embedding.shape[0]
        if logit_positions == 0:  # every row's changed token is its last: nothing left to predict
            return pre, pre.new_zeros(batch, 0, vocab), cache
        last = hidden[:, :logit_positions].reshape(batch * logit_positions, -1)  # contiguous: a strided 3-d input
        logits = self._logits(lm.model.get_output_embeddings()(last)).view(batch, logit_positions, -1)  # is slow
        return pre, logits, cache

    def extend(self, tokens: torch.Tensor, rows: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]] | None
               ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One token per row [B] run after each row's cached keys/values (None: the prefix's): (the row's target at
        it [B], the log-probabilities of the next token [B, vocab], the cache with it). What a prompt built token
        by token (a beam search) asks of the model."""
        kv = self._prefix(len(tokens)) if kv is None else kv
        with torch.no_grad():
            pre, logits, cache = self._forward(self._embed(tokens[:, None]), rows, kv, 1)
        return pre[:, 0], logits[:, 0].log_softmax(-1), [(layer.keys, layer.values) for layer in cache.layers]

    def _prefix(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.prefix_kv]

    def reduce(self, pre: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor, smooth: bool) -> torch.Tensor:
        """f [B] from the target at every prompt and suffix position [B, T] (`valid` marks real ones): the last
        prompt token's, or the (smooth) max."""
        if self.position == "last":
            return pre.gather(1, (lengths - 1)[:, None])[:, 0]
        pre = pre.masked_fill(~valid, -torch.inf)
        return SMOOTH_MAX * torch.logsumexp(pre / SMOOTH_MAX, dim=1) if smooth else pre.max(dim=1).values

    def _scores(self, pre, valid, lengths, token_logprobs) -> Scores:
        ce = -token_logprobs.sum(1) / lengths.to(token_logprobs.dtype)
        return Scores(self.reduce(pre, valid, lengths, False), ce, self.reduce(pre, valid, lengths, True))

    # ------------------------------------------------------------------------------------------ scoring

    def score(self, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor,
              token_logprobs: torch.Tensor | None = None) -> Scores:
        """Scores of prompts ids [B, W] with `lengths` [B], in batches, without gradients. Prompts whose tokens'
        log-probabilities are known ([B, W], as `sample` returns them) run without the unembedding: over a large
        vocabulary the logits cost more than the rest of the model."""
        parts = []
        with torch.no_grad():
            for start in range(0, len(ids), self.batch_size):
                part = slice(start, start + self.batch_size)
                known = None if token_logprobs is None else token_logprobs[part]
                parts.append(self._run(ids[part], lengths[part], rows[part], 0, self._prefix(len(ids[part])),
                                       known_logprobs=known))
        return Scores(*(torch.cat([getattr(p, name) for p in parts]) for name in ("f", "ce", "smooth")))

    def _run(self, ids, lengths, rows, start, kv, parent: Parents | None = None,
             known_logprobs: torch.Tensor | None = None) -> Scores:
        """Scores of rows whose positions before `start` are cached in `kv` (and, past the prefix, are `parent`'s
        positions: their targets and token log-probabilities are the parent's); with `known_logprobs` [B, W] the
        tokens' log-probabilities are those and no logits are computed."""
        tokens, _, valid = self._layout(ids, lengths, start)  # [B, T]
        predicted = 0 if known_logprobs is not None else int(lengths.max()) - 1 - start  # positions start..
        pre, logits, _ = self._forward(self._embed(tokens), rows, kv, max(predicted, 0))  # predict start + 1..
        width = ids.shape[1]
        if known_logprobs is not None:
            token_logprobs = known_logprobs.to(self.dtype)
        else:
            token_logprobs = torch.zeros(len(ids), width, dtype=self.dtype, device=ids.device)  # [B, W]
            token_logprobs[:, 0] = self.first_logprobs[ids[:, 0]]
        if predicted > 0:
            after = ids[:, start + 1 : start + 1 + predicted]  # [B, predicted]
            token_logprobs[:, start + 1 : start + 1 + predicted] = (
                logits.gather(-1, after[..., None])[..., 0] - logits.logsumexp(-1))
        position = torch.arange(width, device=ids.device)
        token_logprobs = token_logprobs.masked_fill(position[None] >= lengths[:, None], 0.0)
        full_valid = valid
        if start:
            token_logprobs[:, 1 : start + 1] = parent.token_logprobs[:, 1 : start + 1]
            pre = torch.cat([parent.pre[:, :start], pre], dim=1)
            full_valid = torch.cat([valid.new_ones(len(ids), start), valid], dim=1)
        return self._scores(pre, full_valid, lengths, token_logprobs)

    def score_children(self, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, parent: torch.Tensor,
                       changed: torch.Tensor, parents: Parents) -> Scores:
        """Scores of children ids [B, W] (`lengths` [B]) that equal their parent (`parent` [B], a row of
        `parents`) before prompt position `changed` [B]. A child can run from position changed - 1 on after its
        parent's cached keys and values (the token before the change runs again: its logits predict the first
        changed token). Children sorted by length (features of one call may have different lengths), then by that
        start, are run in chunks, each from its smallest start to its longest row: on a CPU
        chunks of at least MIN_CHUNK rows, about a quarter of the children each (a few large passes cost less than
        one small pass per start, and a chunk's rows rerun little of their parents); with `few_passes` (a GPU)
        chunks of batch_size, so most iterations take one pass."""
        f = torch.empty(len(ids), dtype=self.dtype, device=ids.device)
        ce, smooth = torch.empty_like(f), torch.empty_like(f)
        starts = (changed - 1).clamp(min=0)
        order = torch.argsort(lengths * (ids.shape[1] + 1) + starts, stable=True)
        size = self.batch_size if self.few_passes else min(self.batch_size, max(MIN_CHUNK, -(-len(ids) // 4)))
        P = len(self.prefix_ids)
        with torch.no_grad():
            for chunk in order.split(size) if len(ids) else ():
                start = int(starts[chunk].min())
                mine = parents.take(parent[chunk], P + start)
                scores = self._run(ids[chunk], lengths[chunk], rows[chunk], start, list(zip(mine.keys, mine.values)),
                                   mine)
                f[chunk], ce[chunk], smooth[chunk] = scores.f, scores.ce, scores.smooth
        return Scores(f, ce, smooth)

    # ------------------------------------------------------------------------------------------ gradient

    def gradient(self, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, lambdas: torch.Tensor):
        """(Scores [B], ∂L_λ/∂one-hot [B, W, vocab]) with each row's own λ, in one backward pass."""
        scores, grad, *_ = self._pass(ids, lengths, rows, lambdas, True)
        return scores, grad

    def _pass(self, ids, lengths, rows, lambdas, with_gradient: bool):
        """The forward pass over rows of ids [B, W] (and the backward pass, `with_gradient`): (scores, the gradient of
        L_λ with respect to each prompt position's one-hot token [B, W, vocab] or None, logits of every prompt
        position [B, max length, vocab], the KV cache, target per position [B, T], token log-probabilities
        [B, max length]).

        The one-hot rows are never built: a token reaches L_λ through its embedding (∂L/∂e_i · Eᵀ) and, as the
        label of its own log-probability in the cross-entropy, through λ/n · log p(· | the tokens before it); the
        sum is the one-hot gradient (tested against finite differences of the one-hot objective)."""
        tokens, is_prompt, valid = self._layout(ids, lengths, 0)  # [B, T]
        B, W = ids.shape
        n = int(lengths.max())
        with torch.set_grad_enabled(with_gradient):
            embeds = self._embed(tokens).detach().requires_grad_(with_gradient)  # [B, T, d_model]
            pre, logits, cache = self._forward(embeds, rows, self._prefix(B), n)
            logprobs = logits.log_softmax(-1)  # [B, n, vocab]: position i predicts token i + 1
            token_logprobs = torch.cat([self.first_logprobs[ids[:, :1]],
                                        logprobs[:, : n - 1].gather(-1, ids[:, 1:n, None])[..., 0]], dim=1)
            token_logprobs = token_logprobs * is_prompt[:, :n]  # [B, n]
            scores = self._scores(pre, valid, lengths, token_logprobs)
            objective = scores.smooth - lambdas.to(self.dtype) * scores.ce
            grad = None
            if with_gradient:  # at the first min(W, T) positions, as wide as the rows' prompts and suffix allow
                through = torch.autograd.grad(objective.sum(), embeds)[0][:, :W] @ self.embedding.T  # [B, ≤W, vocab]
                through = through if self.embed_scale is None else through * self.embed_scale
                width = through.shape[1]
                label = torch.cat([self.first_logprobs.expand(B, 1, -1), logprobs[:, : width - 1].detach()], dim=1)
                weight = (lambdas.to(self.dtype) / lengths.to(self.dtype))[:, None, None] * is_prompt[:, :width, None]
                grad = through.to(self.dtype) + weight * _pad(label, width, 1)
        scores = Scores(scores.f.detach(), scores.ce.detach(), scores.smooth.detach())
        return scores, grad, logits.detach(), cache, pre.detach(), token_logprobs.detach()

    def expand(self, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, lambdas: torch.Tensor,
               allowed: torch.Tensor, topk: int, model_topk: int) -> Expansion:
        """The gradient pass over members ids [B, W] (in batches): what their children are drawn from and
        scored against (see Expansion). `allowed` [vocab] bool marks the tokens that may be proposed; with
        topk = 0 no gradient is taken (random search)."""
        B, W = ids.shape
        s, P = len(self.suffix_ids), len(self.prefix_ids)
        parts = []
        for start in range(0, B, self.batch_size):
            part = slice(start, start + self.batch_size)
            _, grad, logits, cache, pre, token_logprobs = self._pass(
                ids[part], lengths[part], rows[part], lambdas[part], topk > 0)
            if grad is None:
                gradient_top = torch.zeros(len(logits), W, 0, dtype=torch.long, device=ids.device)
            else:  # [b, W, k]; positions past a row's length are not its prompt
                gradient_top = _pad(grad.masked_fill(~allowed, -torch.inf).topk(topk, dim=-1).indices, W, 1)
            # the model's distribution for a token at position a: the prefix's last logits (a = 0), else a - 1's
            next_logits = torch.cat([self.first_logprobs.expand(len(logits), 1, -1), logits], dim=1)
            next_logits = next_logits.masked_fill(~allowed, -torch.inf)
            model_top = torch.full((len(logits), W + 1, model_topk), self.pad_id, dtype=torch.long, device=ids.device)
            model_top[:, : next_logits.shape[1]] = next_logits.topk(model_topk, dim=-1).indices
            parts.append((gradient_top, model_top, cache, pre, token_logprobs))
        width = P + W + s  # every part's cache padded to the widest row the members can have
        layers = range(len(parts[0][2].layers))
        keys = [torch.cat([_pad(p[2].layers[i].keys.detach(), width, 2) for p in parts]) for i in layers]
        values = [torch.cat([_pad(p[2].layers[i].values.detach(), width, 2) for p in parts]) for i in layers]
        parents = Parents(keys, values, torch.cat([_pad(p[3], W + s, 1) for p in parts]),
                          torch.cat([_pad(p[4], W, 1) for p in parts]))
        return Expansion(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), parents)

    # ------------------------------------------------------------------------------------------ sampling, texts

    def sample(self, uniforms: torch.Tensor, allowed: torch.Tensor, temperature: float = 1.0, top_k: int = 64,
               uniform_first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, length] prompts sampled from the model after the prefix, token by token with the KV cache, on the
        model's device, and each token's log-probability under the model [B, length] (what `score` then needs
        instead of the logits): row i's token at step j is drawn by inverse CDF over the allowed top-k of its own
        logits with uniforms[i, j] ([B, length], in [0, 1)), so a row's prompt depends only on its own numbers and
        not on the batch it is drawn in. Rows marked in `uniform_first` [B] bool draw their first token uniformly
        among the allowed ones instead (what the model writes after any word, not only what it starts with).
        Rows run `batch_size` × 4 at a time."""
        lm, vocab = self.lm, self.embedding.shape[0]
        blocked = ~allowed[:vocab].to(lm.device)
        allowed_ids = allowed[:vocab].nonzero()[:, 0].to(lm.device)
        uniform_first = torch.zeros(len(uniforms), dtype=torch.bool) if uniform_first is None else uniform_first
        parts, logprob_parts = [], []
        with torch.no_grad():
            for rows, free in zip(uniforms.split(4 * self.batch_size), uniform_first.split(4 * self.batch_size)):
                rows, free = rows.to(lm.device), free.to(lm.device)
                cache = DynamicCache(self._prefix(len(rows)), config=lm.model.config)
                logits = self.first_logprobs.expand(len(rows), -1)  # [b, vocab]
                ids, token_logprobs = [], []
                for step in range(rows.shape[1]):
                    token = pick_tokens(logits.masked_fill(blocked, -torch.inf), rows[:, step], temperature, top_k)
                    if step == 0:
                        anywhere = allowed_ids[(rows[:, 0] * len(allowed_ids)).long().clamp(max=len(allowed_ids) - 1)]
                        token = torch.where(free, anywhere, token)
                    ids.append(token)
                    token_logprobs.append(logits.gather(1, token[:, None])[:, 0] - logits.logsumexp(-1))
                    if step + 1 < rows.shape[1]:
                        out = lm.model(input_ids=token[:, None], use_cache=True, **{self.cache_argument: cache})
                        logits = self._logits(out.logits[:, -1])
                parts.append(torch.stack(ids, dim=1))
                logprob_parts.append(torch.stack(token_logprobs, dim=1))
        if not parts:
            empty = torch.zeros(0, uniforms.shape[1], device=lm.device)
            return empty.long(), empty.to(self.dtype)
        return torch.cat(parts), torch.cat(logprob_parts)

    def text(self, prompt_ids: list[int]) -> tuple[str, str]:
        """(prompt text, full text) of prompt ids."""
        prompt = self.lm.tokenizer.decode(prompt_ids, clean_up_tokenization_spaces=False)
        return prompt, self.prefix_text + prompt + self.suffix_text

    def full_ids(self, prompt_ids: list[int]) -> list[int]:
        return [*self.prefix_ids, *prompt_ids, *self.suffix_ids]

    def round_trips(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B] bool: does each prompt's full text re-tokenise (as measured) to exactly its ids?"""
        rows = [row[:n] for row, n in zip(ids.tolist(), lengths.tolist())]
        encoded = self.lm.tokenizer([self.text(row)[1] for row in rows], add_special_tokens=False)["input_ids"]
        ok = [with_bos(enc, self.lm.bos_token_id) == self.full_ids(row) for row, enc in zip(rows, encoded)]
        return torch.tensor(ok, dtype=torch.bool)


def _pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """x zero-padded along `dim` to `width`."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def allowed_tokens(lm: LanguageModel) -> torch.Tensor:
    """[vocab] bool: tokens EPO may propose. Special and added tokens (the template's markers among them) are out,
    and so is every token whose decoded text does not re-tokenise to itself (partial UTF-8 bytes, empty text)."""
    tok, vocab = lm.tokenizer, lm.vocab_size
    allowed = torch.zeros(vocab, dtype=torch.bool)
    texts = [tok.decode([i], clean_up_tokenization_spaces=False) for i in range(min(vocab, len(tok)))]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    for i, (text, ids) in enumerate(zip(texts, encoded)):
        allowed[i] = bool(text) and ids == [i]
    banned = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}).keys())
    allowed[[i for i in banned if i < vocab]] = False
    return allowed


def cross_entropy(lm: LanguageModel, sequences: list[list[int]], start: int, lengths: int | list[int],
                  batch_size: int = 32) -> list[float]:
    """Mean next-token cross-entropy of tokens [start, start + length) of each sequence (`lengths`: one for all,
    or one per sequence), in the model's dtype computed in fp32 at least: the re-measured fluency of a prompt
    inside its template. Sequences are run in batches of equal length."""
    lengths = [lengths] * len(sequences) if isinstance(lengths, int) else list(lengths)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (ids, length) in enumerate(zip(sequences, lengths)):
        groups.setdefault((len(ids), length), []).append(i)
    out = [0.0] * len(sequences)
    for (_, length), rows in groups.items():
        for at in range(0, len(rows), batch_size):
            part = rows[at : at + batch_size]
            ids = torch.tensor([sequences[i] for i in part], device=lm.device)  # [B, T]
            with torch.no_grad():
                logits = lm.model(input_ids=ids, use_cache=False).logits[:, start - 1 : start + length - 1]
                dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
                logprobs = logits.to(dtype).log_softmax(-1)  # [B, length, vocab]
                targets = ids[:, start : start + length]
                ces = -logprobs.gather(-1, targets.unsqueeze(-1))[..., 0].mean(-1)
            for i, ce in zip(part, ces.tolist()):
                out[i] = ce
    return out
