"""The `dreaming` command: a thin layer over the library. Commands that report take `--json`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from dreaming.paths import dreaming_home


def _config_fields(config_class) -> list[tuple[str, object, object, str | None]]:
    """(name, type, default, description) of each field of a dataclass or a pydantic model."""
    if hasattr(config_class, "model_fields"):
        return [(name, f.annotation, f.default, f.description) for name, f in config_class.model_fields.items()]
    hints = typing.get_type_hints(config_class)
    return [(f.name, hints[f.name], f.default, None) for f in dataclasses.fields(config_class)]


def add_config_arguments(parser: argparse.ArgumentParser, *config_classes) -> None:
    """One flag per field of a dataclass or pydantic model (`--features-per-layer`), defaults from the class.
    With several classes (the recipes of one command), one flag per name across them, its default each class's
    own (the help lists them); `config_from_args` then builds the one chosen.

    Optional fields take "none" for None; Literal fields become choices; bool fields take true/false."""
    fields: dict[str, tuple] = {}
    for config_class in config_classes:
        for name, kind, default, description in _config_fields(config_class):
            fields.setdefault(name, (kind, description, []))[2].append((config_class, default))
    for name, (kind, description, defaults) in fields.items():
        optional = typing.get_origin(kind) is not typing.Literal and type(None) in typing.get_args(kind)
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
        choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else None
        if choices:
            base = type(choices[0])
        if base is bool:
            base = _boolean
        parse = (lambda text, base=base: None if text.lower() in ("none", "all") else base(text)) if optional else base
        if len(config_classes) == 1:
            default, shown = defaults[0][1], f"default: {defaults[0][1]}"
        else:
            default = argparse.SUPPRESS
            shown = "default: " + ", ".join(f"{_recipe_name(c)} {value}" for c, value in defaults)
        help_text = f"{description}; {shown}" if description else shown
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=parse, default=default, choices=choices,
                            help=help_text.replace("%", "%%"))


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _recipe_name(config_class) -> str:
    from dreaming.build.recipes import RECIPES

    return next((name for name, recipe in RECIPES.items() if recipe.config is config_class), config_class.__name__)


def config_from_args(config_class, args: argparse.Namespace):
    """The config from the flags given (a field with no flag given takes the class's default)."""
    return config_class(**{name: getattr(args, name) for name, *_ in _config_fields(config_class)
                           if hasattr(args, name)})


def add_bundle_argument(parser: argparse.ArgumentParser) -> None:
    """--bundle, the same on every command that reads a bundle; `open_bundle` resolves it."""
    parser.add_argument("--bundle", help="bundle directory (default: $DREAMING_BUNDLE, else the default bundle, "
                        "never built here: `dreaming default build`)")


def open_bundle(args):
    """The bundle a command reads: --bundle, else $DREAMING_BUNDLE (the first, when it lists several as `dreaming
    serve` reads it), else the default bundle (which `dreaming default build` builds; opening never does)."""
    import os

    from dreaming.bundle import Bundle, parse_bundles

    return Bundle.open(args.bundle or parse_bundles(os.environ.get("DREAMING_BUNDLE"))[0][1])


def init_ray(address: str | None) -> None:
    """Attach to the Ray cluster at `address`, else $RAY_ADDRESS, else start a local Ray (once per process)."""
    import os

    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)


def check_ray_arguments(args) -> None:
    if args.ray and args.device:
        raise SystemExit("--device is for the single-process pass: with --ray each actor uses its GPU (CPU without)")
    if not args.ray and (args.actors or args.ray_address):
        raise SystemExit("--actors and --ray-address go with --ray")


def print_json(document) -> None:
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_default_build(args) -> None:
    from dreaming.build.default import build_default_bundle

    bundle = build_default_bundle()
    print(f"default bundle ready in {bundle.directory}")
    print_transcoder_report(bundle.manifest["transcoder_report"])


def cmd_bundle_create(args) -> None:
    from dreaming.build.create import create_bundle
    from dreaming.bundle import bundle_info
    from dreaming.maxima import MaximaConfig

    check_ray_arguments(args)
    if args.ray:
        init_ray(args.ray_address)
    try:
        bundle = create_bundle(args.model, args.transcoder, args.corpus, args.out, tokens=args.tokens,
                               window_length=args.window_length, config=config_from_args(MaximaConfig, args),
                               device=args.device, use_ray=args.ray, actors=args.actors)
    except RuntimeError as error:  # a Ray actor that cannot start, a shard that keeps killing its actors
        raise SystemExit(f"error: {error}") from None
    if args.json:
        return print_json(bundle_info(bundle))
    print(f"bundle ready in {bundle.directory}; step times: "
          + ", ".join(f"{step} {seconds:.1f}s" for step, seconds in bundle.manifest["build_seconds"].items()))
    print(f"use it with --bundle {bundle.directory} (or DREAMING_BUNDLE={bundle.directory})")


def cmd_info(args) -> None:
    from dreaming.bundle import bundle_info
    from dreaming.formats.files import layer_span

    info = bundle_info(open_bundle(args))
    if args.json:
        return print_json(info)
    t, c, m = info["transcoder"], info["corpus"], info["maxima"]
    print(f"bundle       {info['bundle']}")
    print(f"model        {info['model']['name']} ({info['model']['source']})")
    every = t["layer_ids"] == list(range(len(t["layer_ids"])))
    layers = f"{t['layers']} layers" + ("" if every else f" ({layer_span(t['layer_ids'])} only)")
    print(f"transcoder   {t['kind']}: {layers} × {t['features_per_layer']} features, {t['activation']}, "
          f"{t['input_hook']} -> {t['output_hook']}")
    recipe = f", trained with the {t['recipe']} recipe" if t.get("recipe") else ""
    print(f"             {t['reference']} ({t['layout']} layout{recipe})")
    print_evaluation_summary(t["evaluation"])
    if m:
        print(f"  over the corpus   {m['dead']:,} dead ({m['dead'] / m['features']:.1%}), {m['dense']:,} active on "
              f"more than {m['dense_above']:.0%} of tokens ({m['dense'] / m['features']:.1%})")
        if "first_token" in m:  # maxima built before positional features were counted lack it
            print(f"  {'':<17} {m['first_token']:,} positional: their top example is a text's first token")
    for source, tokens in sorted(c.get("tokens", {}).items(), key=lambda item: -item[1]):
        print(f"corpus       {source:<16} {c['documents'][source]:>6} documents {tokens:>10,} tokens")
    if c.get("spec"):
        budget = f", a budget of {c['token_budget']:,} tokens" if c.get("token_budget") else ""
        print(f"             from {c['spec']}: {c['documents_read']:,} documents read{budget}")
    if c.get("windows"):
        print(f"             {c['windows']['count']:,} windows of {c['windows']['window_length']} tokens "
              f"({c['windows']['tokens']:,} tokens)" + (f", sha256 {c['sha256'][:16]}" if "sha256" in c else ""))
    print(f"maxima       {m['features']:,} features over {m['tokens']:,} tokens ({m['tokens_per_second']:,.0f} tokens/s)"
          if m else "maxima       not built (`dreaming maxima build`)")
    print("build        " + ", ".join(f"{k} {v:.0f}s" for k, v in info["build_seconds"].items()))
    created = info["created"]
    if created:
        print(f"created      {created['created']} on {created.get('device', '?')}")
        for warning in created.get("warnings", []):
            print(f"  warning    {warning}")


EVALUATION_SETS = (("varied_texts", "varied texts"), ("heldout_windows", "held-out windows"))


def _evaluation_sets(report: dict) -> list[dict]:
    """The evaluation of each of EVALUATION_SETS in a transcoder report ({} where it has none)."""
    return [report.get(name) or {} for name, _ in EVALUATION_SETS]


def print_transcoder_report(report: dict) -> None:
    """The transcoder's evaluation (`evaluate.transcoder_report`): a table per layer, then the summary."""
    print_layer_table(report)
    print_evaluation_summary(report)


def print_layer_table(report: dict) -> None:
    """Per layer, on both sets: FVU, L0 and the cross-entropy with that layer spliced in alone ('-' where a report
    made before a figure existed lacks it)."""
    sets = _evaluation_sets(report)
    columns = (("fvu", ".3f"), ("l0", ".1f"), ("spliced_cross_entropy", ".3f"))
    print(f"{'':>5}" + "".join(f"  {title:^15}" for title in ("FVU", "L0", "CE, layer spliced")))
    print(f"{'layer':>5}" + f"  {'texts':>7} {'windows':>7}" * len(columns))
    for layer in range(len(sets[0]["fvu"])):
        cells = [format(evaluation[key][layer], spec) if key in evaluation else "-"
                 for key, spec in columns for evaluation in sets]  # texts, windows of each column in turn
        print(f"{layer:>5}" + "".join(f"  {texts:>7} {windows:>7}" for texts, windows in zip(cells[::2], cells[1::2])))


def _spread(values: list[float], sign: str = "") -> str:
    """'min to max, mean m' of per-layer values, with `sign` ('+' for increases) before each."""
    return f"{min(values):{sign}.3f} to {max(values):{sign}.3f}, mean {sum(values) / len(values):{sign}.3f}"


def print_evaluation_summary(report: dict) -> None:
    """One row per figure, a column per set (the rows a report made before the figure existed lacks are left out),
    then the histogram of feature densities, one line of counts per set."""
    from dreaming.maxima import DENSE_ABOVE

    sets = _evaluation_sets(report)
    if not any(sets):
        return
    rows = [  # (label, the key a report made before the figure existed lacks, its cell)
        ("tokens", "tokens", lambda r: f"{r['tokens']:,}"),
        ("FVU mean / max (layer)", "fvu",
         lambda r: f"{r['mean_fvu']:.3f} / {r['max_fvu']:.3f} ({r['fvu'].index(r['max_fvu'])})"),
        ("L0 mean", "mean_l0", lambda r: f"{r['mean_l0']:.1f}"),
        ("CE, every MLP replaced", "replacement_cross_entropy",
         lambda r: f"{r['cross_entropy']:.3f} -> {r['replacement_cross_entropy']:.3f}"),
        ("KL(model ‖ replacement)", "replacement_kl", lambda r: f"{r['replacement_kl']:.3f}"),
        ("one layer spliced at a time, CE", "spliced_cross_entropy",
         lambda r: _spread([ce - r["cross_entropy"] for ce in r["spliced_cross_entropy"]], "+")),
        ("one layer spliced at a time, KL", "spliced_kl", lambda r: _spread(r["spliced_kl"])),
        ("dead features", "mean_dead_fraction", lambda r: f"{r['mean_dead_fraction']:.1%}"),
        (f"dense features (> {DENSE_ABOVE:.0%} of tokens)", "mean_dense_fraction",
         lambda r: f"{r['mean_dense_fraction']:.1%}"),
        ("live density p1 / p50 / p99", "density_p1",
         lambda r: f"{r['density_p1']:.1e} / {r['density_p50']:.1e} / {r['density_p99']:.1e}"),
        ("decades spanned, log10(p99 / p1)", "density_decades", lambda r: f"{r['density_decades']:.2f}"),
    ]
    print(f"  {'':<34}" + "".join(f"{label:>32}" for _, label in EVALUATION_SETS))
    for label, key, cell in rows:
        cells = [cell(r) if r.get(key) is not None else "-" for r in sets]
        if any(c != "-" for c in cells):
            print(f"  {label:<34}" + "".join(f"{c:>32}" for c in cells))
    for (_, label), evaluation in zip(EVALUATION_SETS, sets):
        if "log10_density_counts" in evaluation:
            edges = evaluation["log10_density_edges"]
            print(f"  live features per {edges[1] - edges[0]:g} decade of density from 1e{edges[0]:g} to "
                  f"1e{edges[-1]:g}, {label}: " + " ".join(str(count) for count in evaluation["log10_density_counts"]))


def cmd_corpus_write(args) -> None:
    import time

    from dreaming.build.corpus import WritingConfig, corpus_stats, file_sha256, generate_documents, write_documents
    from dreaming.models import best_device, fast_dtype, load_model

    config = config_from_args(WritingConfig, args)
    device = args.device or best_device()
    lm = load_model("default", dtype=fast_dtype(device), device=device)
    started = time.perf_counter()
    documents = generate_documents(lm.model, lm.tokenizer, config)
    seconds = time.perf_counter() - started
    write_documents(documents, args.out)
    stats = corpus_stats(documents, lm.tokenizer)
    report = {"path": args.out, "sha256": file_sha256(args.out), "seconds": round(seconds, 1),
              "tokens_per_second": round(sum(stats["tokens"].values()) / seconds), **stats}
    if args.json:
        return print_json(report)
    for source, tokens in sorted(stats["tokens"].items()):
        print(f"{source:<16} {stats['documents'][source]:>6} documents {tokens:>10,} tokens")
    print(f"wrote {args.out} in {seconds:.0f}s ({report['tokens_per_second']:,} tokens/s), sha256 {report['sha256']}")


def cmd_train_transcoder(args) -> None:

    from dreaming.build.corpus import read_documents, tokenize_windows
    from dreaming.build.evaluate import transcoder_report
    from dreaming.build.recipes import RECIPES
    from dreaming.build.train import split_windows
    from dreaming.models import best_device, fast_dtype, load_model

    recipe = RECIPES[args.recipe]
    own = {name for name, *_ in _config_fields(recipe.config)}
    foreign = sorted(name for other in RECIPES.values() for name, *_ in _config_fields(other.config)
                     if hasattr(args, name) and name not in own)
    if foreign:
        raise SystemExit(f"--{foreign[0].replace('_', '-')} is not an option of the {args.recipe} recipe")
    config = config_from_args(recipe.config, args)
    device = args.device or best_device()
    lm = load_model(args.model, dtype=fast_dtype(device), device=device)
    corpus = args.corpus or str(dreaming_home() / "default" / "corpus.jsonl")
    if not args.corpus and not Path(corpus).exists():
        raise SystemExit(f"no corpus given and the default corpus {corpus} does not exist: "
                         "pass --corpus or run `dreaming default build`")
    windows = tokenize_windows(read_documents(corpus, limit=args.max_documents), lm.tokenizer,
                               window_length=args.window_length, bos_token_id=lm.bos_token_id)
    transcoder = recipe.train(lm, windows, config, Path(args.out) / "transcoder")
    report = {"recipe": args.recipe,
              **transcoder_report(lm, transcoder, windows, split_windows(windows, config.heldout_windows, config.seed)[1])}
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        return print_json(report)
    print(f"saved {Path(args.out) / 'transcoder'} ({args.recipe} recipe)")
    print_transcoder_report(report)


def cmd_maxima_build(args) -> None:

    from dreaming.build.corpus import read_documents, tokenize_windows
    from dreaming.bundle import maxima_report
    from dreaming.maxima import MaximaConfig, build_maxima
    from dreaming.models import best_device, fast_dtype

    config = config_from_args(MaximaConfig, args)
    check_ray_arguments(args)
    bundle = open_bundle(args)
    lm = None
    if not args.ray or args.corpus:  # with --ray the actors hold the model: here only --corpus's tokenizer needs it
        device = "cpu" if args.ray else args.device or best_device()
        lm = bundle.load_model(dtype=fast_dtype(device), device=device)
    if args.corpus:
        windows = tokenize_windows(read_documents(args.corpus, limit=args.max_documents), lm.tokenizer,
                                   window_length=args.window_length, bos_token_id=lm.bos_token_id)
    else:
        windows = bundle.windows()
    if args.sources:
        if not args.out:
            raise SystemExit("--sources builds the maxima of part of the corpus: give --out DIR, so they do not "
                             "replace the bundle's yardstick")
        windows = windows.of_sources(args.sources.split(","))
    out = Path(args.out) if args.out else bundle.maxima_dir
    if args.ray:
        from dreaming.maxima_ray import build_maxima_ray

        init_ray(args.ray_address)
        try:
            maxima, sharded = build_maxima_ray(bundle, windows, out, config, args.actors)
        except RuntimeError as error:  # an actor that cannot start, a shard that keeps killing its actors
            raise SystemExit(f"error: {error}") from None
    else:
        maxima = build_maxima(lm, bundle.load_encoder(device=lm.device, dtype=lm.dtype), windows, out,
                              bundle.identity, config)
    report = {**maxima_report(maxima, bundle), "directory": str(out), **({"ray": sharded} if args.ray else {})}
    if out == bundle.maxima_dir:
        bundle.manifest["maxima"] = maxima_report(maxima, bundle)
        bundle.save_manifest()
    if args.json:
        return print_json(report)
    print(f"maxima of {report['features']:,} features over {report['tokens']:,} tokens in {report['seconds']:.0f}s "
          f"({report['tokens_per_second']:,.0f} tokens/s): {report['dead']:,} dead, {report['dense']:,} dense "
          f"(active on > {report['dense_above']:.0%} of tokens), {report['first_token']:,} positional (top example at "
          f"a text's first token); saved {out}")
    if args.ray:
        print(f"over {sharded['actors']} Ray actors ({sharded['device']}): {sharded['shards']} shards, "
              f"{sharded['shards_resumed']} resumed from a checkpoint, {sharded['actors_replaced']} actors replaced")


def cmd_maxima_import(args) -> None:
    from dreaming.bundle import maxima_report
    from dreaming.exports import import_neuronpedia

    bundle = open_bundle(args)
    out = Path(args.out) if args.out else bundle.maxima_dir
    if (out / "maxima.safetensors").exists() and not args.replace:
        raise SystemExit(f"{out} already holds dataset maxima: pass --replace to overwrite them with the import, "
                         "or --out DIR to import elsewhere")
    maxima = import_neuronpedia(bundle, args.source, out)
    summary = maxima_report(maxima, bundle)
    report = {**summary, "directory": str(out), "imported": maxima.metadata["imported"]}
    if out == bundle.maxima_dir:
        bundle.manifest["maxima"] = summary
        bundle.save_manifest()
    if args.json:
        return print_json(report)
    imported = report["imported"]
    print(f"imported the top examples of {imported['features']:,} features ({imported['examples']:,} records, "
          f"{report['windows']:,} distinct windows) from {args.source}; saved {out}")
    print("unknown (not in the export): " + ", ".join(imported["unknown"]))


def cmd_export(args) -> None:
    from dreaming.exports import export_circuit_tracer, export_gemma_scope_2, export_neuronpedia
    from dreaming.features import parse_features

    if args.format == "gemma-scope-2":
        if args.features:
            raise SystemExit("--features: gemma-scope-2 exports the whole dictionary")
        report = export_gemma_scope_2(explorer(args), args.out)
        if args.json:
            return print_json(report)
        print(f"exported the {report['kind']} ({report['features']:,} features, layers "
              f"{report['layers'][0]}..{report['layers'][-1]}{', with its skip' if report['skip'] else ''}) as "
              f"gemma-scope-2 to {report['directory']}: {report['files']:,} files, {report['bytes'] / 1e9:.2f} GB, "
              f"{report['seconds']:.0f} s")
        print("read it with circuit-tracer's load_gemma_scope_2_clt (a CLT; 0.5.0 needs one path key more, see the "
              "README) or load_transcoder_set(..., special_load_fn='gemma-scope-2'), or `dreaming bundle create "
              "--transcoder` the directory")
        return
    features = parse_features(args.features) if args.features else None
    if args.format == "circuit-tracer":
        report = export_circuit_tracer(explorer(args), args.out, features, scan=args.scan)
    else:
        report = export_neuronpedia(explorer(args), args.out, features)
    if args.json:
        return print_json(report)
    print(f"exported {report['features']:,} features as {report['format']} to {report['directory']}: "
          f"{report['files']:,} files, {report['bytes'] / 1e6:.2f} MB, {report['seconds_per_feature']:.2f} s a feature")
    if args.format == "circuit-tracer":
        print(f"view: circuit-tracer start-server --graph_file_dir GRAPHS --features_dir {Path(args.out) / 'features'}"
              f" (graphs whose metadata.scan is {report['scan']!r})")


def explorer(args):
    from dreaming.explorer import Explorer

    return Explorer(open_bundle(args), device=getattr(args, "device", None))


def percent(fraction) -> str:
    return "      n/a" if fraction is None else f"{fraction:9.1%}"


def cmd_activation(args) -> None:
    results = explorer(args).activation(args.feature, args.text, template=args.template)
    if args.json:
        return print_json(results)
    for result in results:
        first = result["counted_from"]
        print(f"{result['text']!r}: activation {result['activation']:.3f} = {percent(result['fraction_of_max']).strip()} "
              "of dataset max" + (" (the prompt and what follows it)" if args.template else ""))
        if args.template and first > 1:  # a template with text before {prompt}
            print(f"    the template's own prefix (positions 1..{first - 1}, not counted): activation "
                  f"{result['template_activation']:.3f}")
        top = max(result["token_activations"]) or 1.0
        for position, (token, value) in enumerate(zip(result["tokens"], result["token_activations"])):
            where = "  (template)" if 0 < position < first else ""
            print(f"    {token!r:<24} {value:8.3f} {'█' * round(20 * value / top):<20}{where}")


SEARCH_ORDERS = {
    "content": "ranked by % of max; positional features, which fire on a text's first token, are listed last "
               "(marked first-token; --order fraction ranks by % of max alone)",
    "fraction": "ranked by % of max alone; first-token marks a positional feature at the text's first token",
}


def cmd_search(args) -> None:
    found = explorer(args).search(args.text, args.top, args.order)
    if args.json:
        return print_json(found)
    print(SEARCH_ORDERS[args.order])
    print(f"{'feature':>10} {'% of max':>9} {'activation':>10} {'density':>9}  max token")
    for hit in found:
        print(f"{hit['feature']:>10} {percent(hit['fraction_of_max'])} {hit['activation']:10.3f} "
              f"{hit['density']:9.2e}  {hit['max_token']!r}" + ("  first-token" if hit["positional"] else ""))


def cmd_similar(args) -> None:
    found = explorer(args).similar(args.feature, args.top)
    if args.json:
        return print_json(found)
    with_maxima = bool(found) and "density" in found[0]
    print(f"{'feature':>10} {'cosine':>7}" + (f" {'density':>9} {'dataset max':>11}" if with_maxima else ""))
    for hit in found:
        print(f"{hit['feature']:>10} {hit['cosine']:7.3f}"
              + (f" {hit['density']:9.2e} {hit['dataset_max']:11.3f}" if with_maxima else "")
              + ("  first-token (positional)" if hit.get("first_token") else ""))
    if not found:
        print(f"(none: {args.feature} has an all-zero decoder, or no other feature writes to its layers)")


def shared(run) -> str:
    """The longest run of tokens a dream shares with the feature's top dataset contexts (novelty), or "-"."""
    return "-" if run is None else str(run)


DREAM_HEADER = f"{'% of max':>9} {'% of len':>9} {'tok':>4} {'CE':>5}  {'origin':<11} {'shared':>6}  prompt"
YARDSTICKS = ("% of max: of the dataset max (whole 128-token windows); % of len: of the best top dataset example cut "
              "to the prompt's own token count (tok), the data at the dream's length")


def dream_row(dream, mark="") -> str:
    """One dreamed prompt (a DreamedPrompt or a feature page's dream dict, which says its engine) under
    DREAM_HEADER; a page's dream of an earlier engine is marked so."""
    from dreaming.engine import ENGINE_VERSION

    get = dream.get if isinstance(dream, dict) else lambda name: getattr(dream, name, None)
    tokens = get("prompt_tokens")
    if isinstance(dream, dict) and dream.get("engine_version") != ENGINE_VERSION:
        mark += f" [engine {dream.get('engine_version') or '<5'}]"
    return (f"{percent(get('fraction_of_max'))} {percent(get('fraction_of_length_matched'))} "
            f"{'-' if tokens is None else tokens:>4} {get('cross_entropy'):5.2f}  {get('origin') or '-':<11} "
            f"{shared(get('longest_shared_run')):>6}  {get('prompt')!r}{mark}")


def both_yardsticks(dream) -> str:
    """'112.0% of the dataset max, 131.0% of the best 32-token excerpt' of a DreamedPrompt or a page's dream."""
    get = dream.get if isinstance(dream, dict) else lambda name: getattr(dream, name, None)
    text = f"{percent(get('fraction_of_max')).strip()} of the dataset max"
    if get("fraction_of_length_matched") is not None:
        text += (f", {percent(get('fraction_of_length_matched')).strip()} of the best {get('prompt_tokens')}-token "
                 "dataset excerpt")
    return text


def cmd_compare(args) -> None:
    page = explorer(args).compare(args.feature, args.top, length=args.length)
    if args.json:
        return print_json(page)
    sources = ", ".join(f"{name} {value:.2f}" for name, value in page["source_max"].items())
    print(f"feature {page['feature']}: dataset max {page['dataset_max']:.3f} over {page['tokens']:,} tokens, "
          f"density {page['density']:.2e}, mean when active {page['mean_when_active']:.3f}")
    print(f"max per source: {sources}")
    if page["first_token"]:
        print(f"positional: fires on a text's first token (its top dataset example is there, as are "
              f"{page['first_token_share']:.0%} of its top examples); a prompt reaches that max only with nothing "
              "before it, so asked for in the chat template it is dreamed in the bare template '{prompt}'")
    cut = f"cut to {page['length']} tok: % of max"
    print(f"\n{'% of max':>9} {'source':<12} {cut:>25} {'CE':>5}  dataset example (max token in [[ ]])")
    for example in page["examples"]:
        matched = example["length_matched"]
        print(f"{percent(example['fraction_of_max'])} {example['source']:<12} "
              f"{percent(matched['fraction_of_max']):>25} {matched['cross_entropy']:5.2f}  {example['context']!r}")
    print(f"(cut to {page['length']} tok: the example's last {page['length']} tokens up to its max token, measured "
          "alone after BOS, and their cross-entropy: the data at a dream's length)")
    if page["intervals"]:
        print("\nactivation ranges (a uniform sample of the examples in each; the example's token in [[ ]])")
        for interval in page["intervals"]:
            high = "" if interval["high"] is None else f"{interval['high']:.3g}"
            for example in interval["examples"]:
                print(f"  ({interval['low']:.3g}, {high}] {percent(example['fraction_of_max'])} "
                      f"{example['source']:<12} {example['context']!r}")
    else:
        print("\n(no activation-range examples: these maxima predate them; `dreaming maxima build` adds them)")
    outputs = page["output_tokens"]
    print("\noutput tokens (decoder through the unembedding)")
    if outputs is None:
        print("  none: this dictionary has no decoders (a model's neurons)")
    else:
        print("  promotes:   " + "  ".join(f"{token!r} {value:+.2f}" for token, value in outputs["top"]))
        print("  suppresses: " + "  ".join(f"{token!r} {value:+.2f}" for token, value in outputs["bottom"]))
    print("\ndreamed prompts (frontier; shared: longest token run shared with the top dataset contexts)")
    print(f"({YARDSTICKS})")
    print(DREAM_HEADER)
    for dream in page["dreams"]:
        print(dream_row(dream))
    if not page["dreams"]:
        print("          (none cached: `dreaming dream --feature " + page["feature"] + "`)")
    for yardstick in sorted({dream["yardstick"] for dream in page["dreams"] if dream["yardstick"]}):
        print(f"yardstick: {yardstick}")
    for name in ("best_fluent", "best_novel") if page["dreams"] else ():
        best = page[name]
        print(f"{name.replace('_', ' ')}: " + ("none" if best is None else
              f"{both_yardsticks(best)}, CE {best['cross_entropy']:.2f}, origin {best['origin']}, shared run "
              f"{shared(best['longest_shared_run'])}, {best['prompt']!r}"))
    if page["diverse"]:
        print("\ndiverse (fluent, pairwise different, most active first)")
        print(DREAM_HEADER)
        for dream in page["diverse"]:
            print(dream_row(dream))
    if page["stale_dreams"]:
        print("\nstale (scored against another dataset max)")
        print(f"{'% of its max':>12} {'its max':>8} {'CE':>5}  prompt")
        for dream in page["stale_dreams"]:
            against = "none" if dream["scored_against"] is None else f"{dream['scored_against']:.3f}"
            print(f"{percent(dream['fraction_of_max']):>12} {against:>8} {dream['cross_entropy']:5.2f}  "
                  f"{dream['prompt']!r}")
        print("(dream them again to score them against the current dataset max)")


def run_dreams(args, features: list) -> list:
    """Dream results for `features` under the config in `args`, through `Explorer.dream_many` (the one path of a
    dream): from the bundle's cache, else computed (--batch-size features sharing every forward pass) and cached."""
    from tqdm import tqdm

    from dreaming.engine import DreamConfig

    config = config_from_args(DreamConfig, args)
    dreamer = explorer(args)
    if dreamer.maxima is None:
        print("no dataset maxima in this bundle (dreaming maxima build): targets use the fallback scale",
              file=sys.stderr)
    bar = None

    def progress(done: int, total: int, best) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc="dreaming", unit="it")
        bar.update(done - bar.n)
        bar.set_postfix_str("" if best is None else f"best fluent {best:.0%} of max")

    try:
        return dreamer.dream_many(features, config, progress, more=args.more, read_cache=not args.no_cache,
                                  features_per_call=args.batch_size)
    finally:
        if bar is not None:
            bar.close()


def print_dream(result) -> None:
    from dreaming.engine import NOVEL_BELOW

    fluent, novel = result.best_fluent, result.best_novel
    print(f"feature {result.feature}: {len(result.frontier)} prompts on the frontier, {result.iterations} iterations "
          f"(stopped: {result.stopped}), {result.seconds:.0f}s"
          + (f" ({result.scale_note})" if result.scale_note else ""))
    if result.length_choice is not None:
        choice = result.length_choice
        kept = ", ".join(f"{n}: {k:.0%}" for n, k in zip(choice.lengths, choice.kept))
        print(f"prompt length {result.prompt_length}, chosen: {choice.rule}" + (f" ({kept})" if kept else ""))
    elif result.prompt_length is not None:
        print(f"prompt length {result.prompt_length} (as asked)")
    if result.template_origin == "bare":
        print(f"template: the bare {result.template!r} ({result.model} has no chat template: a base model)")
    if result.yardstick:
        print(f"yardstick: {result.yardstick} (template {result.config.template!r})")
    print(f"({YARDSTICKS})")
    print(DREAM_HEADER)
    for p in result.frontier:
        mark = "".join(f" {sign}" for sign, best in (("*", fluent), ("+", novel))
                       if best is not None and p.token_ids == best.token_ids)
        print(dream_row(p, mark))
    print("best fluent (CE <= 5, marked *): " + ("none" if fluent is None else
          f"{both_yardsticks(fluent)}, {fluent.text!r}"))
    print(f"best novel (fluent, sharing no run of {NOVEL_BELOW} tokens with the top dataset contexts, marked + on the "
          "frontier): " + ("none" if novel is None else f"{both_yardsticks(novel)}, shared run "
                           f"{novel.longest_shared_run}, origin {novel.origin}, {novel.text!r}"))
    print("shared: the longest run of tokens shared with the feature's top dataset contexts (- without maxima)")
    if result.diverse:
        print(f"diverse ({len(result.diverse)} fluent, pairwise different, most active first)")
        print(DREAM_HEADER)
        for p in result.diverse:
            print(dream_row(p))


def cmd_dream(args) -> None:
    from dreaming.features import parse_feature

    (result,) = run_dreams(args, [parse_feature(args.feature)])
    if args.json:
        return print_json(result.model_dump(mode="json"))
    print_dream(result)


def cmd_batch(args) -> None:
    from dreaming.features import parse_features

    if bool(args.features) == bool(args.features_file):
        raise ValueError("give exactly one of --features 12/345,3/7 and --features-file FILE")
    text = args.features or Path(args.features_file).read_text().replace("\n", ",")
    results = run_dreams(args, parse_features(text))
    if args.json:
        return print_json([result.model_dump(mode="json") for result in results])
    for result in results:
        print_dream(result)
        print()


def cmd_serve(args) -> None:
    import os

    import uvicorn

    from dreaming.bundle import parse_bundles

    if args.bundle:
        os.environ["DREAMING_BUNDLE"] = ",".join(args.bundle)
    parse_bundles(os.environ.get("DREAMING_BUNDLE"))  # a bad bundle list is a one-line error before anything starts
    # The service (service/) is started by name: the library never imports it.
    uvicorn.run("service.app:create_app", factory=True, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    from dreaming.build.corpus import WritingConfig
    from dreaming.build.recipes import DEFAULT_RECIPE, RECIPES
    from dreaming.bundle import WINDOW_LENGTH
    from dreaming.maxima import SEARCH_ORDER, MaximaConfig

    parser = argparse.ArgumentParser(prog="dreaming", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    default = commands.add_parser("default", help="the embedded default bundle")
    default_commands = default.add_subparsers(dest="default_command", required=True)
    default_commands.add_parser("build", help="build the default bundle (idempotent)").set_defaults(run=cmd_default_build)

    info = commands.add_parser("info", help="model, transcoder, corpus and maxima of a bundle")
    add_bundle_argument(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)

    bundle = commands.add_parser("bundle", help="bundles of any model and transcoder")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True)
    create = bundle_commands.add_parser(
        "create", help="a bundle of a model, a transcoder and a corpus (see dreaming/build/create.py): checked "
                       "first, built in OUT.partial, resumable, idempotent")
    create.add_argument("--model", required=True, help="'default', a Hugging Face id (HF_HUB_OFFLINE=1: the local "
                        "cache only), a local save_pretrained directory, or a GGUF file (converted once)")
    create.add_argument("--transcoder", required=True, help="the dictionary, referenced, never copied: a "
                        "circuit-tracer directory or config.yaml (CLT or per-layer set), hf://owner/repo[/sub][@rev], "
                        "Gemma Scope npz, Gemma Scope 2, SAELens or EleutherAI sparsify folders (transcoders or "
                        "SAEs, some layers only if need be), or `neurons` (the model's MLP neurons)")
    create.add_argument("--corpus", required=True, help="corpus spec (.txt/.md/.jsonl/.parquet/dir/hf:NAME[:CONFIG])")
    create.add_argument("--out", required=True, help="the bundle directory to create")
    create.add_argument("--tokens", type=int, help="a budget of corpus tokens, BOS included (default: the whole "
                        "corpus); the corpus is read only as far as it needs")
    create.add_argument("--window-length", type=int, default=WINDOW_LENGTH,
                        help=f"tokens per window, BOS included (default: {WINDOW_LENGTH})")
    create.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    create.add_argument("--ray", action="store_true", help="shard the maxima pass over Ray actors (see `dreaming "
                        "maxima build --ray`)")
    create.add_argument("--actors", type=int, help="with --ray: how many actors (default: one per GPU)")
    create.add_argument("--ray-address", help="with --ray: the Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    create.add_argument("--json", action="store_true", help="print the bundle's info as JSON")
    add_config_arguments(create, MaximaConfig)
    create.set_defaults(run=cmd_bundle_create)

    corpus = commands.add_parser("corpus", help="the default corpus")
    corpus_commands = corpus.add_subparsers(dest="corpus_command", required=True)
    write = corpus_commands.add_parser(
        "write", help="sample the model-written part of the default corpus again (the package ships the one "
                      "the default bundle uses: dreaming/build/data/written.jsonl.gz)")
    write.add_argument("--out", required=True, help="output file (.jsonl or .jsonl.gz)")
    write.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    write.add_argument("--json", action="store_true")
    add_config_arguments(write, WritingConfig)
    write.set_defaults(run=cmd_corpus_write)

    train = commands.add_parser("train-transcoder", aliases=["train-clt"],
                                help="train a transcoder for a model's MLPs: a CLT by gradient (--recipe clt, "
                                     "dreaming/build/train_clt.py) or a per-layer skip set in closed form (--recipe "
                                     "closed-form, dreaming/build/train.py)")
    train.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                       help=f"which transcoder to train (default: {DEFAULT_RECIPE}); the options below say each "
                            "recipe's default, and an option of the other recipe is refused")
    train.add_argument("--model", default="default", help="'default', a local directory or a Hugging Face id")
    train.add_argument("--corpus", help="corpus spec (.txt/.jsonl/.parquet/dir/hf:NAME); default: the default corpus")
    train.add_argument("--max-documents", type=int, help="read at most this many documents")
    train.add_argument("--window-length", type=int, default=WINDOW_LENGTH)
    train.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    train.add_argument("--out", required=True, help="output directory (transcoder/, report.json)")
    train.add_argument("--json", action="store_true")
    add_config_arguments(train, *(recipe.config for recipe in RECIPES.values()))
    train.set_defaults(run=cmd_train_transcoder)

    maxima = commands.add_parser("maxima", help="dataset maxima of every feature")
    maxima_commands = maxima.add_subparsers(dest="maxima_command", required=True)
    build = maxima_commands.add_parser("build", help="one streaming pass over a corpus (default: the bundle's windows)")
    add_bundle_argument(build)
    build.add_argument("--corpus", help="corpus spec (.txt/.jsonl/.parquet/dir/hf:NAME); default: the bundle's windows")
    build.add_argument("--max-documents", type=int, help="read at most this many documents of --corpus")
    build.add_argument("--window-length", type=int, default=WINDOW_LENGTH,
                       help="tokens per window of --corpus (BOS included)")
    build.add_argument("--sources", help="only the windows of these corpus sources, comma-separated (a dashboard of "
                       "part of the corpus; needs --out)")
    build.add_argument("--out", help="output directory (default: <bundle>/maxima, the maxima the bundle uses)")
    build.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    build.add_argument("--ray", action="store_true", help="shard the pass over Ray actors, one per GPU of the "
                       "cluster (CPU actors on a cluster without GPUs): the same maxima, bit for bit; every node "
                       "needs the bundle at the same path; an actor that dies is replaced, and a new run of the "
                       "same command resumes from <out>.partial/checkpoint.safetensors")
    build.add_argument("--actors", type=int, help="with --ray: how many actors (default: one per GPU of the "
                       "cluster; 2 on a cluster without GPUs)")
    build.add_argument("--ray-address", help="with --ray: the Ray cluster to attach to (default: $RAY_ADDRESS, "
                       "else a new local Ray)")
    build.add_argument("--json", action="store_true")
    add_config_arguments(build, MaximaConfig)
    build.set_defaults(run=cmd_maxima_build)
    imported = maxima_commands.add_parser("import", help="the dataset maxima from a Neuronpedia export (its "
                                          "activation batches): the yardstick of a published transcoder")
    imported.add_argument("--from", dest="source", required=True,
                          help="the export directory (holding */activations/batch-N.jsonl.gz)")
    add_bundle_argument(imported)
    imported.add_argument("--out", help="output directory (default: <bundle>/maxima, the maxima the bundle uses)")
    imported.add_argument("--replace", action="store_true", help="overwrite the maxima already at the destination")
    imported.add_argument("--json", action="store_true")
    imported.set_defaults(run=cmd_maxima_import)

    export = commands.add_parser("export", help="feature dashboards as circuit-tracer feature files or Neuronpedia "
                                 "export batches, or the dictionary itself in Gemma Scope 2's layout (what "
                                 "circuit-tracer reads a CLT's skip from; see dreaming/exports.py)")
    export.add_argument("--format", required=True, choices=["circuit-tracer", "neuronpedia", "gemma-scope-2"])
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--features", help="comma-separated feature ids, e.g. 12/345,3/7 (default: every feature)")
    export.add_argument("--scan", help="circuit-tracer: the metadata.scan of the graphs that show these features "
                        "(default: dreaming-<bundle identity>)")
    add_bundle_argument(export)
    export.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    export.add_argument("--json", action="store_true")
    export.set_defaults(run=cmd_export)

    def explorer_command(name: str, help: str, run, feature: bool):
        command = commands.add_parser(name, help=help)
        if feature:
            command.add_argument("--feature", required=True, help="feature id LAYER/INDEX, e.g. 12/345")
        add_bundle_argument(command)
        command.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
        command.add_argument("--json", action="store_true")
        command.set_defaults(run=run)
        return command

    activation = explorer_command("activation", "a feature's activation on texts: %% of dataset max, per-token values",
                                  cmd_activation, feature=True)
    activation.add_argument("--text", action="append", required=True, help="a text to measure (repeat for several)")
    activation.add_argument("--template", help="measure each text as a prompt inside this template (one {prompt} "
                            "slot, e.g. '\\n\\nHuman:{prompt}'; 'chat': the model's chat template), as a dream is: "
                            "the template's own activation is reported apart")
    search = explorer_command("search", "the features most active on a text, by %% of their dataset max",
                              cmd_search, feature=False)
    search.add_argument("--text", required=True)
    search.add_argument("--top", type=int, default=20, help="how many features (default: 20)")
    search.add_argument("--order", choices=list(SEARCH_ORDERS), default=SEARCH_ORDER,
                        help="content: positional features at the text's first token after every other hit; "
                        f"fraction: by %% of max alone (default: {SEARCH_ORDER})")
    compare = explorer_command("compare", "top dataset examples beside the cached dreamed prompts", cmd_compare,
                               feature=True)
    compare.add_argument("--top", type=int, default=10, help="dataset examples shown (default: 10)")
    compare.add_argument("--length", type=int, help="each example is also measured cut to its last LENGTH tokens up "
                         "to its max token (default: the default dream prompt length)")
    similar = explorer_command("similar", "the features whose decoder directions are closest (cosine) to a "
                               "feature's", cmd_similar, feature=True)
    similar.add_argument("--top", type=int, default=10, help="how many features (default: 10)")

    from dreaming.engine import DreamConfig
    from dreaming.explorer import FEATURES_PER_CALL

    for name, help, run in (("dream", "EPO for one feature: the Pareto frontier of activation vs. cross-entropy",
                             cmd_dream),
                            ("batch", "EPO for many features, several sharing each forward pass", cmd_batch)):
        command = commands.add_parser(name, help=help)
        if name == "dream":
            command.add_argument("--feature", required=True, help="feature id LAYER/INDEX, e.g. 12/345")
        else:
            command.add_argument("--features", help="comma-separated feature ids, e.g. 12/345,3/7")
            command.add_argument("--features-file", help="a file of feature ids, one per line or comma-separated")
        command.add_argument("--batch-size", type=int, default=FEATURES_PER_CALL,
                             help=f"features per shared batch (default: {FEATURES_PER_CALL})")
        add_bundle_argument(command)
        command.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
        command.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
        command.add_argument("--more", action="store_true", help="continue the cached dream of this config (the one "
                             "that ran longest) for --iterations more (or --seconds): the same as one longer run")
        command.add_argument("--json", action="store_true")
        add_config_arguments(command, DreamConfig)
        command.set_defaults(run=run)

    serve = commands.add_parser("serve", help="the HTTP service (OpenAPI at /docs); settings in service/settings.py")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--bundle", action="append", help="a bundle to serve: DIR (named after the directory) or "
                       "NAME=DIR; repeat for several, the first being the default (default: $DREAMING_BUNDLE, "
                       "comma-separated, else the default bundle)")
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
