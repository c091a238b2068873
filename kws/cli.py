"""The `kws` command. Each subcommand lives next to the function it drives and registers itself
here through a `register(subparsers)` function that sets `func` on its parser."""

import argparse
import importlib
import json
import sys
from dataclasses import asdict

from kws import __version__
from kws.errors import KwsError

# Modules that add subcommands, in the order `kws --help` lists them.
COMMAND_MODULES = ["kws.cli", "kws.train", "kws.teacher", "kws.evaluate", "kws.data", "kws.listen", "kws.stream_eval", "kws.bench", "kws.serve"]


def load(path):
    """The model at `path`, or the default (shipped) model when path is None."""
    from kws import default_model_path
    from kws.model import load_model

    return load_model(path or default_model_path())


def model_info(model) -> dict:
    from kws.model import footprint_bytes, parameter_bytes, parameter_count, state_bytes

    return {
        "config": asdict(model.cfg),
        "parameters": parameter_count(model),
        "parameter_bytes": parameter_bytes(model),
        "state_bytes": state_bytes(model.cfg),
        "footprint_bytes": footprint_bytes(model),
    }


def info(args):
    info = model_info(load(args.model))
    if args.json:
        print(json.dumps(info))
        return
    cfg = info.pop("config")
    for key, value in cfg.items():
        if key != "labels":
            print(f"{key:>18}: {value}")
    print(f"{'labels':>18}: {len(cfg['labels'])} ({', '.join(cfg['labels'])})")
    for key, value in info.items():
        print(f"{key:>18}: {value:,}")


def register(sub):
    p = sub.add_parser("info", help="print a model's config, size and inference footprint")
    p.add_argument("--model", help="checkpoint (default: the shipped model or $KWS_MODEL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kws", description="Streaming keyword spotting on raw audio with mGRADE.")
    parser.add_argument("--version", action="version", version=f"kws {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KwsError as e:
        print(f"kws: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
