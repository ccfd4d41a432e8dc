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
    m = info["maxima"]
    print(f"maxima       {m['features']:,} features over {m['tokens']:,} tokens ({m['tokens_per_second']:,.0f} tokens/s): "
          f"{m['dead']:,} dead, {m['dense']:,} dense" if m else "maxima       not built (`dreaming maxima build`)")
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


def cmd_maxima_build(args) -> None:
    import torch

    from dreaming.bundle import Bundle, maxima_report
    from dreaming.corpus import read_documents, tokenize_windows
    from dreaming.maxima import MaximaConfig, build_maxima
    from dreaming.models import best_device

    config = config_from_args(MaximaConfig, args)
    bundle = Bundle.open(args.bundle)
    lm = bundle.load_model(dtype=torch.bfloat16, device=args.device or best_device())
    if args.corpus:
        windows = tokenize_windows(read_documents(args.corpus, limit=args.max_documents), lm.tokenizer,
                                   window_length=args.window_length, bos_token_id=lm.bos_token_id)
    else:
        windows = bundle.windows()
    out = Path(args.out) if args.out else bundle.directory / "maxima"
    maxima = build_maxima(lm, bundle.load_transcoder(device=lm.device), windows, out, bundle.identity, config)
    report = {**maxima_report(maxima), "directory": str(out)}
    if out == bundle.directory / "maxima":
        bundle.manifest["maxima"] = maxima_report(maxima)
        bundle.save_manifest()
    if args.json:
        return print_json(report)
    print(f"maxima of {report['features']:,} features over {report['tokens']:,} tokens in {report['seconds']:.0f}s "
          f"({report['tokens_per_second']:,.0f} tokens/s): {report['dead']:,} dead, {report['dense']:,} dense "
          f"(active on > {report['dense_above']:.0%} of tokens); saved {out}")


def explorer(args):
    from dreaming.explorer import Explorer

    return Explorer.open(args.bundle, device=getattr(args, "device", None))


def percent(fraction) -> str:
    return "      n/a" if fraction is None else f"{fraction:9.1%}"


def cmd_activation(args) -> None:
    results = explorer(args).activation(args.feature, args.text)
    if args.json:
        return print_json(results)
    for result in results:
        print(f"{result['text']!r}: activation {result['activation']:.3f} = {percent(result['fraction_of_max']).strip()} "
              "of dataset max")
        top = max(result["token_activations"]) or 1.0
        for token, value in zip(result["tokens"], result["token_activations"]):
            print(f"    {token!r:<24} {value:8.3f} {'█' * round(20 * value / top)}")


def cmd_search(args) -> None:
    found = explorer(args).search(args.text, args.top)
    if args.json:
        return print_json(found)
    print(f"{'feature':>10} {'% of max':>9} {'activation':>10} {'density':>9}  max token")
    for hit in found:
        print(f"{hit['feature']:>10} {percent(hit['fraction_of_max'])} {hit['activation']:10.3f} "
              f"{hit['density']:9.2e}  {hit['max_token']!r}")


def cmd_compare(args) -> None:
    page = explorer(args).compare(args.feature, args.top)
    if args.json:
        return print_json(page)
    sources = ", ".join(f"{name} {value:.2f}" for name, value in page["source_max"].items())
    print(f"feature {page['feature']}: dataset max {page['dataset_max']:.3f} over {page['tokens']:,} tokens, "
          f"density {page['density']:.2e}, mean when active {page['mean_when_active']:.3f}")
    print(f"max per source: {sources}")
    print(f"\n{'% of max':>9} {'source':<12} dataset example (max token in [[ ]])")
    for example in page["examples"]:
        print(f"{percent(example['fraction_of_max'])} {example['source']:<12} {example['context']!r}")
    print(f"\n{'% of max':>9} {'CE':>5}  dreamed prompt")
    for dream in page["dreams"]:
        print(f"{percent(dream['fraction_of_max'])} {dream['cross_entropy']:5.2f}  {dream['prompt']!r}")
    if not page["dreams"]:
        print("          (none cached: `dreaming dream --feature " + page["feature"] + "`)")


def cmd_serve(args) -> None:
    import os

    import uvicorn

    if args.bundle:
        os.environ["DREAMING_BUNDLE"] = str(Path(args.bundle).resolve())
    # The service (service/) is started by name: the library never imports it.
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    from dreaming.maxima import MaximaConfig
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

    maxima = commands.add_parser("maxima", help="dataset maxima of every feature")
    maxima_commands = maxima.add_subparsers(dest="maxima_command", required=True)
    build = maxima_commands.add_parser("build", help="one streaming pass over a corpus (default: the bundle's windows)")
    build.add_argument("--bundle", help="bundle directory (default: the default bundle, built if missing)")
    build.add_argument("--corpus", help="corpus spec (.txt/.jsonl/.parquet/dir/hf:NAME); default: the bundle's windows")
    build.add_argument("--max-documents", type=int, help="read at most this many documents of --corpus")
    build.add_argument("--window-length", type=int, default=128, help="tokens per window of --corpus (BOS included)")
    build.add_argument("--out", help="output directory (default: <bundle>/maxima, the maxima the bundle uses)")
    build.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    build.add_argument("--json", action="store_true")
    add_config_arguments(build, MaximaConfig)
    build.set_defaults(run=cmd_maxima_build)

    def explorer_command(name: str, help: str, run, feature: bool):
        command = commands.add_parser(name, help=help)
        if feature:
            command.add_argument("--feature", required=True, help="feature id LAYER/INDEX, e.g. 12/345")
        command.add_argument("--bundle", help="bundle directory (default: the default bundle, built if missing)")
        command.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
        command.add_argument("--json", action="store_true")
        command.set_defaults(run=run)
        return command

    explorer_command("activation", "a feature's activation on texts: %% of dataset max, per-token values",
                     cmd_activation, feature=True).add_argument(
        "--text", action="append", required=True, help="a text to measure (repeat for several)")
    search = explorer_command("search", "the features most active on a text, by %% of their dataset max",
                              cmd_search, feature=False)
    search.add_argument("--text", required=True)
    search.add_argument("--top", type=int, default=20, help="how many features (default: 20)")
    explorer_command("compare", "top dataset examples beside the cached dreamed prompts", cmd_compare,
                     feature=True).add_argument("--top", type=int, default=10, help="dataset examples shown (default: 10)")

    serve = commands.add_parser("serve", help="the HTTP service (OpenAPI at /docs); settings in service/settings.py")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--bundle", help="bundle directory to serve (default: $DREAMING_BUNDLE, else the default bundle)")
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
