"""``kdtune ls | cp | cat | validate | run | download | convert | plot``."""

import argparse
import os
import shutil
import sys
from pathlib import Path

from kdtune.errors import KDTuneError, stop_at_once_on_signals, user_errors


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error
        raise KDTuneError(message)


def cmd_ls(args) -> None:
    from kdtune.config.builtins import RECIPES, available_configs, available_recipes, config_recipe

    if args.components:
        from kdtune.config.registry import COMPONENTS

        width = max(map(len, COMPONENTS))
        for name, path in sorted(COMPONENTS.items()):
            print(f"{name:<{width}}  {path}")
        return
    recipes = available_recipes()
    by_recipe = {name: [] for name in recipes}
    for cfg_name, path in available_configs().items():
        by_recipe.setdefault(config_recipe(path), []).append(cfg_name)
    width = max(len("RECIPE"), *map(len, recipes)) if recipes else len("RECIPE")
    print(f"{'RECIPE':<{width}}  CONFIG")
    for name in RECIPES:
        if name in recipes:
            configs = by_recipe.get(name) or ["-"]
            for i, c in enumerate(configs):
                print(f"{name if i == 0 else '':<{width}}  {c}")


def cmd_cp(args) -> None:
    from kdtune.config.builtins import available_configs, available_recipes, find_config, find_recipe

    if args.name in available_recipes():
        src = find_recipe(args.name)
    elif args.name in available_configs():
        src = find_config(args.name)
    else:
        raise KDTuneError(f"cp: '{args.name}' is neither a built-in recipe nor a built-in config (see 'kdtune ls')")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    elif not dest.suffix:
        dest = dest.with_suffix(src.suffix)
    if dest.exists() and not args.force:
        raise KDTuneError(f"cp: '{dest}' exists; use --force to overwrite it")
    if not dest.parent.is_dir():
        raise KDTuneError(f"cp: directory '{dest.parent}' does not exist")
    shutil.copyfile(src, dest)
    print(f"Copied {src.name} to {dest}")


def cmd_cat(args) -> None:
    from omegaconf import OmegaConf

    from kdtune.config import load_config

    print(OmegaConf.to_yaml(load_config(args.config, args.overrides)), end="")


def cmd_validate(args) -> None:
    from kdtune.config import load_config, validate
    from kdtune.config.builtins import config_recipe, find_config, recipe_settings
    from kdtune.config.settings import RECIPE_SETTINGS, read_settings

    cfg = load_config(args.config, args.overrides)
    # the recipe given, or the one named on the config's first line (# Recipe: NAME)
    recipe = args.recipe or config_recipe(find_config(args.config))
    if not args.recipe and recipe not in RECIPE_SETTINGS:
        recipe = None  # a config line naming no built-in recipe: check components only, as before
    if recipe:
        read_settings(cfg, recipe_settings(recipe))  # the checks the recipe makes before loading anything
    n = validate(cfg)
    settings = f"its settings are what {recipe} accepts; " if recipe else ""
    print(f"Config '{args.config}' is well-formed: {settings}{n} components resolve and their arguments bind.")


def cmd_download(args) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # the token comes from HF_TOKEN or the hub login; it is never printed
        path = snapshot_download(
            args.repo_id, local_dir=args.output_dir, ignore_patterns=args.ignore_patterns or None
        )
    except RepositoryNotFoundError:
        raise KDTuneError(f"download: repository '{args.repo_id}' not found, or it is gated and no valid token is set (HF_TOKEN or `hf auth login`)") from None
    except LocalEntryNotFoundError:
        raise KDTuneError(f"download: cannot reach the Hugging Face hub to fetch '{args.repo_id}' (offline?)") from None
    except HfHubHTTPError as e:
        raise KDTuneError(f"download: '{args.repo_id}': {str(e).splitlines()[0]}") from None
    print(f"Downloaded {args.repo_id} to {path}")


def _need_gguf(what: str) -> None:
    try:
        import gguf  # noqa: F401  (the reader and writer the conversions use)
    except ImportError:
        raise KDTuneError(f"convert {what} needs the gguf package: pip install 'kdtune[gguf]'") from None


def cmd_convert(args) -> None:
    import torch

    _need_gguf("gguf")
    from kdtune.checkpointing.from_gguf import convert_gguf

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = convert_gguf(Path(args.file), Path(args.out_dir), dtype=dtype)
    print(f"Converted {args.file} to {out} ({args.dtype})")


def cmd_to_gguf(args) -> None:
    _need_gguf("to-gguf")
    from kdtune.checkpointing.to_gguf import export_gguf

    out = export_gguf(Path(args.checkpoint_dir), Path(args.out), qtype=args.type)
    print(f"Wrote {out} ({args.type}, {out.stat().st_size / 2**20:,.1f} MiB)")


def cmd_plot(args) -> None:
    from kdtune.training.plot import plot_metrics

    print(f"Wrote {plot_metrics(args.output_dir, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdtune", description="Distill large language models: recipes, configs, fused KD losses.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors (also KDTUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("ls", help="list recipes with their built-in configs")
    p.add_argument("--components", action="store_true", help="list the component registry instead")
    p.set_defaults(fn=cmd_ls)

    p = sub.add_parser("cp", help="copy a built-in recipe or config for editing")
    p.add_argument("name")
    p.add_argument("dest")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(fn=cmd_cp)

    for name, fn, text in (("cat", cmd_cat, "print a config after overrides"),
                           ("validate", cmd_validate, "check a config's settings and that every component binds")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", help="built-in config name or .yaml path")
        p.add_argument("overrides", nargs="*", help="key=value, +key=value or ~key")
        if name == "validate":
            p.add_argument("--recipe", default=None,
                           help="check against this recipe (a name or a copied .py); default: the config's own")
        p.set_defaults(fn=fn)

    sub.add_parser("run", help="run a recipe: kdtune run [torchrun options] RECIPE --config CONFIG [overrides]",
                   add_help=False)

    p = sub.add_parser("download", help="download a model from the Hugging Face hub")
    p.add_argument("repo_id")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--ignore-patterns", nargs="*", default=None, help="glob patterns of files to skip")
    p.set_defaults(fn=cmd_download)

    p = sub.add_parser("convert", help="convert a checkpoint between Hugging Face folders and GGUF files")
    formats = p.add_subparsers(dest="format", required=True, parser_class=_Parser)
    g = formats.add_parser("gguf", help="a GGUF file (llama.cpp, Ollama) into a Hugging Face folder")
    g.add_argument("file", help="the .gguf file")
    g.add_argument("out_dir", help="the Hugging Face folder to write (a new one)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="the dequantized weights' dtype")
    g.set_defaults(fn=cmd_convert)
    g = formats.add_parser("to-gguf", help="a Hugging Face folder (a run's step_N too) into a GGUF file")
    g.add_argument("checkpoint_dir", help="the Hugging Face checkpoint folder")
    g.add_argument("out", help="the .gguf file to write (a new one)")
    g.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="the weights' type in the file (1-D tensors stay f32)")
    g.set_defaults(fn=cmd_to_gguf)

    p = sub.add_parser("plot", help="draw the loss curves of a run into a PNG")
    p.add_argument("output_dir")
    p.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/loss_curves.png)")
    p.set_defaults(fn=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    stop_at_once_on_signals()
    # PyTorch's CPU allocator asks the kernel for transparent huge pages for large tensors when this
    # is set: a training step's fresh [V, d] gradients then fault in 2 MB pages, not 4 kB ones (measured
    # in docs/performance.md). torch reads it at its first allocation, so it is set before torch is
    # imported; THP_MEM_ALLOC_ENABLE=0 turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[: argv.index("run")] if "run" in argv else "--debug" in argv
    with user_errors(debug):
        # `run` hands everything after it to torchrun's parser and the recipe untouched.
        if "run" in argv and all(a.startswith("-") for a in argv[: argv.index("run")]):
            from kdtune.cli.run import run

            return run(argv[argv.index("run") + 1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and (not hasattr(args, "overrides") or any(a.startswith("-") for a in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:  # overrides after an option (validate CONFIG --recipe R key=value): argparse stops at it
            args.overrides += extra
        args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
