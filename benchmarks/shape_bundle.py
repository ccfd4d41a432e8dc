"""A bundle with the default bundle's shapes and random weights, for timing on a machine the real weights
cannot reach (a GPU machine with no network and a small upload limit).

Takes the small parts of a real bundle (the model's config and tokenizer, the transcoder's config, the token
windows), draws random weights of the same shapes, sets each feature's encoder bias so that it fires on about 1%
of tokens (the density of a trained feature; a feature needs density in [1e-4, 0.1] to be dreamed by the
benchmarks), and builds the dataset maxima on the given device. EPO's and the service's cost depend on the
shapes only, so their timings hold for the real weights; their activations and fluency figures do not.

    python benchmarks/shape_bundle.py --parts DIR --out DIR [--device cuda]   # on the machine that times
    python benchmarks/shape_bundle.py --pack DIR                              # here: copy the small parts
"""

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreaming.bundle import MANIFEST, Bundle, default_bundle_dir, maxima_report  # noqa: E402
from dreaming.formats import read_config  # noqa: E402
from dreaming.formats.circuit_tracer import save_transcoder  # noqa: E402
from dreaming.maxima import MaximaConfig, build_maxima  # noqa: E402
from dreaming.models import LanguageModel, best_device, ensure_default_model  # noqa: E402
from dreaming.transcoders import Transcoder, TranscoderConfig  # noqa: E402
from dreaming.windows import load_windows, save_windows  # noqa: E402

MODEL_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja"]
TARGET_DENSITY = 0.01


def pack(bundle_dir: Path, out: Path) -> None:
    """Copy a bundle's small parts (a few MB) into `out`."""
    bundle = Bundle.open(bundle_dir)
    source = ensure_default_model(verbose=False)
    (out / "model").mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / "model" / name)
    config = dataclasses.asdict(read_config(bundle.directory / "transcoder"))
    (out / "transcoder.json").write_text(json.dumps(config, indent=2))
    shutil.copytree(bundle.directory / "windows", out / "windows", dirs_exist_ok=True)
    print(f"packed {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def calibrated_transcoder(lm: LanguageModel, config, windows, seed: int = 0) -> Transcoder:
    """Random encoder rows; b_enc puts each feature's threshold at the (1 - TARGET_DENSITY) quantile of its
    pre-activations over a sample of windows."""
    generator = torch.Generator().manual_seed(seed)
    transcoder = Transcoder(config)
    with torch.no_grad():
        for parameter in transcoder.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / config.d_model**0.5)
        sample = torch.from_numpy(windows.tokens[:16].astype("int64")).to(lm.device)  # [16, window]
        hook = config.feature_input_hook
        captured = lm.capture(sample, [(hook, layer) for layer in range(config.n_layers)])
        for layer in range(config.n_layers):
            x = captured[(hook, layer)][:, 1:].flatten(0, 1).float().cpu()  # [tokens, d_model], BOS left out
            pre = x @ transcoder.W_enc[layer].T  # [tokens, F]
            transcoder.b_enc[layer] = -pre.quantile(1 - TARGET_DENSITY, dim=0)
    return transcoder


def build(parts: Path, out: Path, device: str) -> None:
    started = time.perf_counter()
    config = TranscoderConfig(**json.loads((parts / "transcoder.json").read_text()))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(parts / "model"), dtype=torch.float32)
    model.eval().requires_grad_(False)
    lm = LanguageModel(model=model.to(device), tokenizer=AutoTokenizer.from_pretrained(parts / "model"),
                       name=f"{config.model_name} shapes, random weights")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    lm.tokenizer.save_pretrained(out / "model")
    windows = load_windows(parts / "windows")
    transcoder = calibrated_transcoder(lm, config, windows)
    save_transcoder(transcoder, out / "transcoder")
    save_windows(windows, out / "windows")
    manifest = {"model": str(out / "model"), "model_name": lm.name, "note": "random weights, default shapes",
                "windows": {"count": len(windows), "window_length": int(windows.tokens.shape[1]),
                            "tokens": int(windows.lengths.sum())}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    bundle = Bundle.open(out)
    lm_bf16 = LanguageModel(model=model.to(torch.bfloat16), tokenizer=lm.tokenizer, name=lm.name)
    maxima = build_maxima(lm_bf16, transcoder.to(device=device, dtype=torch.bfloat16), windows, out / "maxima",
                          bundle.identity, MaximaConfig(), progress=False)
    bundle.manifest["maxima"] = maxima_report(maxima, bundle)
    bundle.save_manifest()
    report = maxima_report(maxima, bundle)
    print(f"shape bundle {out} on {device} in {time.perf_counter() - started:.0f}s; maxima over "
          f"{report['tokens']:,} tokens at {report['tokens_per_second']:,.0f} tokens/s, {report['dead']} dead, "
          f"{report['dense']} dense")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, help="copy the default bundle's small parts here, and stop")
    parser.add_argument("--bundle", type=Path, default=default_bundle_dir(), help="the bundle --pack copies from")
    parser.add_argument("--parts", type=Path, help="a folder made by --pack")
    parser.add_argument("--out", type=Path, help="the shape bundle to build")
    parser.add_argument("--device", default=best_device())
    args = parser.parse_args()
    if args.pack:
        return pack(args.bundle, args.pack)
    if not (args.parts and args.out):
        parser.error("give --pack DIR, or --parts DIR and --out DIR")
    build(args.parts, args.out, args.device)


if __name__ == "__main__":
    main()
