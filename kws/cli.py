"""The `kws` command. Each subcommand lives next to the function it drives and registers itself
through a `register(subparsers)` function that sets `func` on its parser. Only the module of the
command being run is imported (the others are listed by name and summary), so `kws listen` and
`kws serve` never import torch, and a command that needs it says how to install it."""

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from kws import __version__
from kws.errors import KwsError

# name: (module that registers it, summary for `kws --help`), in the order the help lists them.
COMMANDS = {
    "info": ("kws.cli", "print a model's config, size and inference footprint"),
    "export": ("kws.export", "write a checkpoint's torch-free model file (what listen and serve "
               "load), or ONNX"),
    "train": ("kws.train", "train an mGRADE keyword model"),
    "average": ("kws.train", "average the weights of fine-tunes of one model (a model soup)"),
    "teacher": ("kws.teacher", "the distillation teacher: train it or score it (kws[distill])"),
    "eval": ("kws.evaluate", "clip accuracy on a Speech Commands split"),
    "data": ("kws.download", "get the dataset or render synthetic speech"),
    "listen": ("kws.listen", "spot keywords live in the microphone stream (or a file)"),
    "eval-stream": ("kws.stream_eval", "hits, substitutions, misses, false alarms per hour "
                    "and latency on long test streams through the live detection path"),
    "bench": ("kws.bench", "measure speed and memory on this machine"),
    "serve": ("kws.serve", "run the HTTP service: /predict, live detections, dashboard"),
}
TORCH_MODULES = ("torch", "torchaudio")
INSTALL_TORCH = "pip install 'kws[train]'"
INSTALL_DISTILL = "pip install 'kws[distill]'"  # the teacher's extra: torch and its embedding


def has_torch() -> bool:
    """Whether PyTorch is installed (the runtime-only install has none), without importing it."""
    return importlib.util.find_spec("torch") is not None


def require_torch(what: str):
    """A KwsError naming the fix when PyTorch is not installed."""
    if not has_torch():
        raise KwsError(f"{what} needs PyTorch, which is not installed: {INSTALL_TORCH}")


def check_writable(out: Path, flag: str):
    """A KwsError now, not after a long run, when the file `out` (given as `flag`) cannot be written."""
    if out.is_dir():
        raise KwsError(f"{flag} {out} is a folder; give a file name in it")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK) or (
            out.exists() and not os.access(out, os.W_OK)):
        raise KwsError(f"cannot write {flag} {out}: {folder} is not a writable folder")


def load(path=None):
    """The PyTorch model of the checkpoint at `path` (default: the shipped checkpoint, or
    $KWS_MODEL): what training-side commands (eval, eval-stream, export) run."""
    from kws import default_checkpoint_path

    require_torch("reading a PyTorch checkpoint")
    from kws.model import load_model

    if path and Path(path).suffix == ".npz":
        raise KwsError(f"{path} is a model file for listen, serve and info; this command reads "
                       f"the PyTorch checkpoint (.pt) it was exported from")
    return load_model(path or default_checkpoint_path())


def load_engine(path=None):
    """The inference engine (kws.runtime) of the model file at `path` (default: the shipped
    one, or $KWS_MODEL): what `kws listen`, `kws serve` and `kws info` run. A PyTorch
    checkpoint (.pt) is converted on the way when torch is installed."""
    from kws import default_model_path
    from kws.runtime import StreamEngine, load_engine as read_engine_file

    named_by_env = not path and os.environ.get("KWS_MODEL")
    path = Path(path) if path else default_model_path()
    try:
        if path.suffix == ".pt":
            if not path.is_file():
                raise KwsError(f"{path} is a folder, not a model file" if path.is_dir()
                               else f"no model file at {path}")
            if not has_torch():
                raise KwsError(f"{path} is a PyTorch checkpoint: convert it with `kws export` where "
                               f"torch is installed ({INSTALL_TORCH})")
            return StreamEngine.from_model(load(path))
        return read_engine_file(path)
    except KwsError as e:
        if named_by_env:  # the user may not remember setting it
            raise KwsError(f"{e} (the model named by $KWS_MODEL)") from None
        raise


def model_info(engine) -> dict:
    return {
        "config": engine.description["model"],
        "thresholds": engine.thresholds,
        "long_window_s": engine.long_window_s,
        "license": engine.license,
        "parameters": engine.parameters,
        "parameter_bytes": engine.parameter_bytes,
        "state_bytes": engine.state_bytes,
        "footprint_bytes": engine.parameter_bytes + engine.state_bytes,
    }


def info(args):
    info = model_info(load_engine(args.model))
    if args.json:
        print(json.dumps(info))
        return
    cfg, thresholds, weights_license = info.pop("config"), info.pop("thresholds"), info.pop("license")
    long_window_s = info.pop("long_window_s")
    for key, value in cfg.items():
        if key != "labels":
            print(f"{key:>18}: {value}")
    print(f"{'labels':>18}: {len(cfg['labels'])} ({', '.join(cfg['labels'])})")
    print(f"{'thresholds':>18}: " + (", ".join(f"{w} {t:g}" for w, t in thresholds.items())
                                     if thresholds else "none of its own (the default for every word)"))
    print(f"{'long window':>18}: " + (f"{long_window_s:g} s (a word's score is the lower of its "
                                      f"1-s and {long_window_s:g}-s scores)" if long_window_s else "none"))
    print(f"{'license':>18}: {weights_license}")
    for key, value in info.items():
        print(f"{key:>18}: {value:,}")


def register(sub):
    p = sub.add_parser("info", help=COMMANDS["info"][1],
                       description="Print a model's labels, settings, parameter count, licence, "
                       "per-word thresholds and the bytes inference keeps (parameters and stream "
                       "state). Reads the .npz model file without torch; a .pt checkpoint needs it.")
    p.add_argument("--model", help="model file, or a checkpoint (default: $KWS_MODEL or the "
                   "shipped model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=info)


def command_module(name: str):
    """The module that registers command `name`; a one-line error when it needs torch and
    torch is missing."""
    try:
        return importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name in TORCH_MODULES:
            install = INSTALL_DISTILL if name == "teacher" else INSTALL_TORCH
            raise KwsError(f"kws {name} needs PyTorch, which is not installed: {install}") from None
        raise


def build_parser(argv=()) -> argparse.ArgumentParser:
    """The parser with every command listed and the command named in `argv` (if any) in full;
    `build_parser(COMMANDS)` builds every command in full."""
    parser = argparse.ArgumentParser(
        prog="kws", description="Streaming keyword spotting on raw audio with mGRADE.")
    parser.add_argument("--version", action="version", version=f"kws {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    full = {COMMANDS[a][0]: a for a in argv if a in COMMANDS}  # module: the command asked for
    registered = set()
    for name, (module, summary) in COMMANDS.items():
        if module not in full:
            sub.add_parser(name, help=summary)
        elif module not in registered:
            command_module(full[module]).register(sub)
            registered.add(module)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser([command] if command else []).parse_args(argv)
        code = args.func(args) or 0
        sys.stdout.flush()  # a reader that has gone is found here, not in the flush at exit
        return code
    except BrokenPipeError:
        # The reader of our output went away (`kws listen --json | head -n1`): end quietly with
        # the status of a tool stopped by SIGPIPE, and let the flush at exit write nowhere.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KwsError as e:
        print(f"kws: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the system refused (permissions, a full disk): say which
        where = f"{e.filename}: " if e.filename else ""
        print(f"kws: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
