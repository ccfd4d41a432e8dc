"""Batched scoring of prompts for EPO: a feature's pre-activation and the prompt's cross-entropy, and their
token gradients.

A prompt is `prompt_length` token ids placed inside a template: the text is `prefix + prompt + suffix`, measured
as `[BOS] + tokens` like every other text (dreaming.activation). The prefix never changes, so its KV cache is
computed once and expanded over each batch; a forward pass runs only the prompt and suffix tokens.

For a row (one population member or child) with target feature (layer, w, b) and scale s:
    f   = max over target positions of (h_layer · w + b) / s     (the pre-activation in fractions of max)
    CE  = mean over the prompt tokens of -log p(token | everything before it)   (every optimised token)
    L_λ = f − λ · CE
Target positions: "last" = the last prompt token; "max" = every prompt and suffix token (the prefix cannot
change). For the gradient and for selection f is taken as a smooth max over positions, τ·logsumexp(pre/τ) with
τ = 0.1 of the dataset max, so that every position gets a signal (the exact max is reported). The gradient of L_λ
with respect to the one-hot input (through `inputs_embeds`, the CE's labels
included) is what EPO takes its top-k tokens from; each row uses its own λ, and one backward pass over the sum
of the rows' objectives gives every row its own gradient.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from dreaming.corpus import with_bos
from dreaming.features import Feature, check_feature
from dreaming.models import LanguageModel
from dreaming.transcoders import Transcoder

POSITIONS = ("last", "max")
SMOOTH_MAX = 0.1  # temperature of the smooth max over positions in the gradient, in units of the target (of max)


@dataclass
class Target:
    """One feature's encoder row, and the scale its pre-activation is divided by."""

    feature: Feature
    weight: torch.Tensor  # [d_model]
    bias: float
    scale: float


def make_target(transcoder: Transcoder, feature: Feature, scale: float) -> Target:
    c = transcoder.config
    check_feature(feature, c.n_layers, c.d_transcoder)
    if not scale > 0:
        raise ValueError(f"the target scale must be positive, got {scale}")
    weight = transcoder.W_enc[feature.layer, feature.index].detach().clone()
    return Target(feature, weight, float(transcoder.b_enc[feature.layer, feature.index].detach()), float(scale))


def split_template(template: str) -> tuple[str, str]:
    """'A{prompt}B' -> ('A', 'B'); a template must hold exactly one '{prompt}'."""
    if template.count("{prompt}") != 1:
        raise ValueError(f"a template needs exactly one '{{prompt}}' slot, got {template!r}")
    prefix, suffix = template.split("{prompt}")
    return prefix, suffix


def chat_template(lm: LanguageModel) -> str:
    """The model's chat template for one user turn, with a `{prompt}` slot (no generation prompt)."""
    marker = "\x00PROMPT\x00"
    if not getattr(lm.tokenizer, "chat_template", None):
        raise ValueError(f"{lm.name} has no chat template: give a template such as '\\n\\nHuman:{{prompt}}'")
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text.replace(marker, "{prompt}")


class Scorer:
    """Scores token prompts inside one template for a list of targets, in batches, on `lm`'s device and dtype.

    Rows of a batch say which target they serve (`rows`: index into `targets`) and their λ.
    """

    def __init__(self, lm: LanguageModel, hook: str, template: str, prompt_length: int, targets: list[Target],
                 position: str = "max", batch_size: int = 128):
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        self.lm, self.hook, self.targets, self.position = lm, hook, targets, position
        self.prompt_length, self.batch_size = prompt_length, batch_size
        self.prefix_text, self.suffix_text = split_template(template)
        tok = lm.tokenizer
        prefix_ids = tok(self.prefix_text, add_special_tokens=False)["input_ids"] if self.prefix_text else []
        self.prefix_ids = with_bos(prefix_ids, lm.bos_token_id)
        self.suffix_ids = tok(self.suffix_text, add_special_tokens=False)["input_ids"] if self.suffix_text else []
        self.embedding = lm.model.get_input_embeddings().weight  # [vocab, d_model]
        self.layers = sorted({t.feature.layer for t in targets})
        weights = torch.stack([t.weight for t in targets])  # [targets, d_model]
        self.weights = weights.to(lm.device, torch.float32 if lm.dtype != torch.float64 else torch.float64)
        self.biases = torch.tensor([t.bias for t in targets], dtype=self.weights.dtype, device=lm.device)
        self.scales = torch.tensor([t.scale for t in targets], dtype=self.weights.dtype, device=lm.device)
        with torch.no_grad():  # the prefix, once: its KV cache and the log-probabilities of the first prompt token
            out = lm.model(input_ids=torch.tensor([self.prefix_ids], device=lm.device), use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.2x
        self.prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]  # [1, heads, P, hd]
        self.first_logprobs = out.logits[0, -1].to(self.weights.dtype).log_softmax(-1)  # [vocab]
        # transformers >= 5.2x names the KV cache argument `cache` (was `past_key_values`)
        parameters = inspect.signature(lm.model.base_model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        softcap = getattr(lm.model.config, "final_logit_softcapping", None)
        self.softcap = float(softcap) if softcap else None

    # ------------------------------------------------------------------------------------------ forward

    def _cache(self, batch: int) -> DynamicCache:
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.prefix_kv],
                            config=self.lm.model.config)

    def _forward(self, prompt_embeds: torch.Tensor, rows: torch.Tensor):
        """(target at every prompt and suffix position [B, n + s], log-probabilities of every prompt token
        [B, n, vocab]) for prompt embeddings [B, n, d_model]."""
        lm, (batch, n, _) = self.lm, prompt_embeds.shape
        suffix = torch.tensor(self.suffix_ids, dtype=torch.long, device=lm.device)
        embeds = torch.cat([prompt_embeds, self.embedding[suffix].unsqueeze(0).expand(batch, -1, -1)], dim=1)
        captured, handles = {}, []
        for layer in self.layers:
            module, where = lm.hook_module(self.hook, layer)

            def hook(module, args, output, layer=layer, where=where):
                captured[layer] = args[0] if where == "input" else output

            handles.append(module.register_forward_hook(hook))
        try:
            cache = {self.cache_argument: self._cache(batch)}
            hidden = lm.model.base_model(inputs_embeds=embeds, use_cache=True, **cache).last_hidden_state  # [B, n+s, d]
        finally:
            for handle in handles:
                handle.remove()
        dtype = self.weights.dtype
        # f: each row's own feature at its own layer
        layer_of_row = torch.tensor([self.targets[r].feature.layer for r in rows.tolist()], device=lm.device)
        w, b, s = self.weights[rows], self.biases[rows], self.scales[rows]  # [B, d_model], [B], [B]
        pre = None  # [B, n + s]
        for layer in self.layers:
            value = (captured[layer].to(dtype) * w[:, None]).sum(-1)
            pre = value if pre is None else torch.where((layer_of_row == layer)[:, None], value, pre)
        pre = (pre + b[:, None]) / s[:, None]
        # token 0 is predicted from the prefix's last logits, token i from position i - 1
        last = hidden[:, : n - 1].reshape(batch * (n - 1), -1)  # contiguous: a 3-d strided input makes a slow bmm
        logits = lm.model.get_output_embeddings()(last).to(dtype).view(batch, n - 1, -1)  # [B, n - 1, vocab]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return pre, torch.cat([self.first_logprobs.expand(batch, 1, -1), logits.log_softmax(-1)], dim=1)

    def reduce(self, pre: torch.Tensor, smooth: bool) -> torch.Tensor:
        """f [B] from the target at every position [B, n + s]: the last prompt token's, or the (smooth) max."""
        if self.position == "last":
            return pre[:, self.prompt_length - 1]
        if smooth:
            return SMOOTH_MAX * torch.logsumexp(pre / SMOOTH_MAX, dim=1)
        return pre.max(dim=1).values

    def objective(self, one_hot: torch.Tensor, rows: torch.Tensor, lambdas: torch.Tensor):
        """(f [B], CE [B], L_λ [B]) of one-hot prompts [B, n, vocab], differentiable in `one_hot`; for position
        "max" f is the smooth max, so that every position gets a gradient (the exact max gives one position all)."""
        pre, logprobs = self._forward(one_hot.to(self.embedding.dtype) @ self.embedding, rows)
        f = self.reduce(pre, smooth=True)
        ce = -(one_hot.to(logprobs.dtype) * logprobs).sum(-1).mean(-1)  # [B]
        return f, ce, f - lambdas.to(f.dtype) * ce

    def score(self, ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f [B], CE [B], smooth f [B]) of prompts ids [B, n], in batches, without gradients. EPO selects on the
        smooth f: with the exact max, a child that raises the target at any other position looks no better."""
        fs, ces, smooth = [], [], []
        with torch.no_grad():
            for start in range(0, len(ids), self.batch_size):
                chunk = ids[start : start + self.batch_size]
                pre, logprobs = self._forward(self.embedding[chunk], rows[start : start + self.batch_size])
                fs.append(self.reduce(pre, smooth=False))
                smooth.append(self.reduce(pre, smooth=True))
                ces.append(-logprobs.gather(-1, chunk.unsqueeze(-1))[..., 0].mean(-1))
        return torch.cat(fs), torch.cat(ces), torch.cat(smooth)

    def gradient(self, ids: torch.Tensor, rows: torch.Tensor, lambdas: torch.Tensor):
        """(f [B], CE [B], ∂L_λ/∂one-hot [B, n, vocab]) with each row's own λ, in one backward pass."""
        vocab = self.embedding.shape[0]
        one_hot = torch.nn.functional.one_hot(ids, vocab).to(self.embedding.dtype).requires_grad_(True)
        with torch.enable_grad():
            f, ce, objective = self.objective(one_hot, rows, lambdas)
            (grad,) = torch.autograd.grad(objective.sum(), one_hot)
        return f.detach(), ce.detach(), grad

    def sample(self, count: int, allowed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[count, n] prompts sampled from the model itself after the prefix (temperature 1, allowed tokens only)."""
        lm, vocab = self.lm, self.embedding.shape[0]
        cache = self._cache(count)
        logprobs = self.first_logprobs.expand(count, -1)  # [count, vocab]
        ids = []
        with torch.no_grad():
            for _ in range(self.prompt_length):
                probs = logprobs.float().exp() * allowed[:vocab].to(logprobs.device)
                token = torch.multinomial(probs.cpu(), 1, generator=generator).to(lm.device)  # [count, 1]
                ids.append(token)
                out = lm.model(input_ids=token, use_cache=True, **{self.cache_argument: cache})
                logprobs = out.logits[:, -1].float().log_softmax(-1)
        return torch.cat(ids, dim=1)

    # ------------------------------------------------------------------------------------------ texts

    def text(self, prompt_ids: list[int]) -> tuple[str, str]:
        """(prompt text, full text) of prompt ids."""
        prompt = self.lm.tokenizer.decode(prompt_ids, clean_up_tokenization_spaces=False)
        return prompt, self.prefix_text + prompt + self.suffix_text

    def full_ids(self, prompt_ids: list[int]) -> list[int]:
        return [*self.prefix_ids, *prompt_ids, *self.suffix_ids]

    def round_trips(self, prompts: torch.Tensor) -> torch.Tensor:
        """[B] bool: does each prompt's full text re-tokenise (as measured) to exactly its ids?"""
        rows = prompts.tolist()
        texts = [self.text(row)[1] for row in rows]
        encoded = self.lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ok = []
        for row, ids in zip(rows, encoded):
            ok.append(with_bos(ids, self.lm.bos_token_id) == self.full_ids(row))
        return torch.tensor(ok, dtype=torch.bool)


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


def cross_entropy(lm: LanguageModel, sequences: list[list[int]], start: int, length: int) -> list[float]:
    """Mean next-token cross-entropy of tokens [start, start + length) of each (equal-length) sequence, in the
    model's dtype computed in fp32 at least: the re-measured fluency of a prompt inside its template."""
    ids = torch.tensor(sequences, device=lm.device)  # [B, T]
    with torch.no_grad():
        logits = lm.model(input_ids=ids, use_cache=False).logits[:, start - 1 : start + length - 1]
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logprobs = logits.to(dtype).log_softmax(-1)  # [B, length, vocab]
        targets = ids[:, start : start + length]
        return (-logprobs.gather(-1, targets.unsqueeze(-1))[..., 0].mean(-1)).tolist()
