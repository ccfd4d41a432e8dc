"""The `dreaming` command: a thin layer over the library. Commands that report take `--json`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from dreaming.paths import dreaming_home


def add_config_arguments(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per dataclass field (`--features-per-layer`), defaults taken from the dataclass itself."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = hints[field.name]
        optional = type(None) in typing.get_args(kind)
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        parse = (lambda text, base=base: None if text.lower() in ("none", "all") else base(text)) if optional else base
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=parse, default=field.default,
                            help=f"default: {field.default}")


def config_from_args(config_class, args: argparse.Namespace):
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def print_json(document) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_default_build(args) -> None:
    from dreaming.bundle import build_default_bundle

    bundle = build_default_bundle()
    print(f"default bundle ready in {bundle.directory}")


def bundle_info(bundle) -> dict:
    from dreaming.transcoders import read_config

    manifest = bundle.manifest
    transcoder = read_config(bundle.directory / "clt")
    report = manifest.get("clt_report", {})
    return {
        "bundle": str(bundle.directory),
        "model": {"name": manifest["model_name"], "source": manifest["model"]},
        "transcoder": {
            "kind": transcoder.kind,
            "layers": transcoder.n_layers,
            "features_per_layer": transcoder.d_transcoder,
            "features": transcoder.n_layers * transcoder.d_transcoder,
            "d_model": transcoder.d_model,
            "activation": transcoder.activation,
            "input_hook": transcoder.feature_input_hook,
            "output_hook": transcoder.feature_output_hook,
            "mean_fvu": report.get("mean_fvu"),
            "mean_l0": report.get("mean_l0"),
            "mean_dead_fraction": report.get("mean_dead_fraction"),
            "cross_entropy": report.get("cross_entropy"),
            "replacement_cross_entropy": report.get("replacement_cross_entropy"),
            "per_layer": {key: report[key] for key in ("fvu", "l0", "dead_fraction") if key in report},
        },
        "corpus": {**manifest.get("corpus", {}), "windows": manifest.get("windows")},
        "maxima": manifest.get("maxima"),
        "build_seconds": manifest.get("build_seconds", {}),
    }


def cmd_info(args) -> None:
    from dreaming.bundle import Bundle

    info = bundle_info(Bundle.open(args.bundle))
    if args.json:
        return print_json(info)
    t, c = info["transcoder"], info["corpus"]
    print(f"bundle       {info['bundle']}")
    print(f"model        {info['model']['name']}")
    print(f"transcoder   {t['kind']}: {t['layers']} layers × {t['features_per_layer']} features, {t['activation']}, "
          f"{t['input_hook']} -> {t['output_hook']}")
    if t["mean_fvu"] is not None:
        print(f"             held-out FVU {t['mean_fvu']:.3f}, L0 {t['mean_l0']:.1f}, dead {t['mean_dead_fraction']:.1%}, "
              f"cross-entropy {t['cross_entropy']:.3f} -> {t['replacement_cross_entropy']:.3f} with every MLP replaced")
    for source, tokens in sorted(c.get("tokens", {}).items()):
        print(f"corpus       {source:<12} {c['documents'][source]:>6} documents {tokens:>10,} tokens")
    if c.get("windows"):
        print(f"             {c['windows']['count']:,} windows of {c['windows']['window_length']} tokens")
    print(f"maxima       {info['maxima'] or 'not built'}")
    print("build        " + ", ".join(f"{k} {v:.0f}s" for k, v in info["build_seconds"].items()))


def cmd_train_clt(args) -> None:
    import torch

    from dreaming.corpus import read_documents, tokenize_windows
    from dreaming.models import best_device, load_model
    from dreaming.train import TrainConfig, evaluate_clt, split_windows, train_clt

    config = config_from_args(TrainConfig, args)
    lm = load_model(args.model, dtype=torch.bfloat16, device=args.device or best_device())
    corpus = args.corpus or str(dreaming_home() / "default" / "corpus.jsonl")
    if not args.corpus and not Path(corpus).exists():
        raise SystemExit(f"no corpus given and the default corpus {corpus} does not exist: "
                         "pass --corpus or run `dreaming default build`")
    windows = tokenize_windows(read_documents(corpus, limit=args.max_documents), lm.tokenizer,
                               window_length=args.window_length, bos_token_id=lm.bos_token_id)
    transcoder = train_clt(lm, windows, config, Path(args.out))
    report = evaluate_clt(lm, transcoder, windows, split_windows(windows, config)[1])
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        return print_json(report)
    print(f"saved {Path(args.out) / 'clt'}")
    print("layer   FVU     L0   dead")
    for layer, (fvu, l0, dead) in enumerate(zip(report["fvu"], report["l0"], report["dead_fraction"])):
        print(f"{layer:>5} {fvu:6.3f} {l0:6.1f} {dead:6.1%}")
    print(f"mean  {report['mean_fvu']:6.3f} {report['mean_l0']:6.1f} {report['mean_dead_fraction']:6.1%}")
    print(f"cross-entropy {report['cross_entropy']:.3f} -> {report['replacement_cross_entropy']:.3f} "
          "with every MLP replaced by the CLT")


def build_parser() -> argparse.ArgumentParser:
    from dreaming.train import TrainConfig

    parser = argparse.ArgumentParser(prog="dreaming", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    default = commands.add_parser("default", help="the embedded default bundle")
    default_commands = default.add_subparsers(dest="default_command", required=True)
    default_commands.add_parser("build", help="build the default bundle (idempotent)").set_defaults(run=cmd_default_build)

    info = commands.add_parser("info", help="model, transcoder, corpus and maxima of a bundle")
    info.add_argument("--bundle", help="bundle directory (default: the default bundle, built if missing)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    train = commands.add_parser("train-clt", help="train a cross-layer transcoder on a model's activations")
    train.add_argument("--model", default="default", help="'default', a local directory or a Hugging Face id")
    train.add_argument("--corpus", help="corpus spec (.txt/.jsonl/.parquet/dir/hf:NAME); default: the default corpus")
    train.add_argument("--max-documents", type=int, help="read at most this many documents")
    train.add_argument("--window-length", type=int, default=128)
    train.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    train.add_argument("--out", required=True, help="output directory (checkpoint, clt/, report.json)")
    train.add_argument("--json", action="store_true")
    add_config_arguments(train, TrainConfig)
    train.set_defaults(run=cmd_train_clt)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
