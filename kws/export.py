"""`kws export CHECKPOINT OUT`: the torch-free model file that `kws listen`, `kws serve` and
`kws info` load (OUT.npz, format: kws.runtime), an ONNX graph of one streaming step with
its state as explicit inputs and outputs (OUT.onnx), for C++, phones and browsers, or a copy
of the checkpoint (OUT.pt). `--thresholds` sets the model's per-word detection thresholds
(what `kws eval-stream --choose-thresholds` chose on validation streams) and the long readout
window they were chosen with in whichever it writes: the Detector's defaults wherever the
model goes.

The ONNX graph takes `audio`, exactly `steps` x stride new samples (batch 1), and the state:
`audio_state` (the last frontend_kernel - stride samples), then per layer `line_i` (delay line)
and `hidden_i` (minGRU). It returns `logits` (1, steps, classes) and the new state under the
same names + "_out". Its metadata (`kws.labels`, `kws.stride`, `kws.steps`, `kws.thresholds`,
`kws.long_window_s`, `kws.license`, `kws.start_state`: JSON) holds what a caller needs. The
readout (kws.stream) is the softmax of the mean logits of the last second; with a long window
of S > 0 seconds, a word's score is the lower of that and the same over the last S seconds. The
start state is what `clip_context_s` of silence leaves. The shapes are fixed, so tracing
`model.stream` records exactly one path: the delay taps and the step-by-step recurrence for
`steps` steps.

The export checks itself: the file is read back (the ONNX one by onnxruntime) and must give
the checkpoint's `model.stream` logits (computed in float64) on a few seconds of seeded test
audio within EXPORT_TOLERANCE, or it is not written."""

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from kws.audio import SAMPLE_RATE
from kws.errors import KwsError

EXPORT_KINDS = (".npz", ".onnx", ".pt")  # what `kws export` writes, by the output's suffix
EXPORT_TOLERANCE = 1e-4  # largest difference allowed between the file's and the model's logits
CHECK_SECONDS = 3.0
CHECK_CHUNK = 512  # 32 ms, as kws listen feeds it


def check_audio(seconds: float = CHECK_SECONDS, seed: int = 0) -> np.ndarray:
    """Seeded noise with tone bursts, so every part of the model is exercised."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    audio = 0.02 * rng.standard_normal(len(t))
    for start in np.arange(0.1, seconds - 0.4, 0.7):
        on = (t >= start) & (t < start + 0.3)
        audio[on] += 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t[on])
    return audio.astype(np.float32)


ONNX_STEPS = 3  # model steps per ONNX call: 30 ms for the edge preset
ONNX_OPSET = 17
INSTALL_ONNX = "pip install 'kws[onnx]'"


def stream_difference(model, engine, audio: np.ndarray, chunk: int = CHECK_CHUNK) -> float:
    """Largest absolute difference between `model.stream` (PyTorch, the whole signal, in
    float64) and the engine fed `chunk` samples at a time. The reference is float64 because
    float32 PyTorch is itself up to ~1e-4 from exact on some weights: it checks the file against
    the model's arithmetic, not against one float32 rounding of it."""
    import copy

    import torch

    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        expected, _ = exact.stream(torch.from_numpy(audio).double()[None], exact.primed_state(1))
    state, got = engine.start_state(), []
    for start in range(0, len(audio), chunk):
        logits, state = engine.stream(audio[start:start + chunk], state)
        got.append(logits)
    return float(np.abs(np.concatenate(got) - expected[0].numpy()).max())


def state_names(model) -> list[str]:
    """The ONNX graph's state inputs, in the order of `model.stream`'s state (None left out)."""
    names = ["audio_state"]
    for i, layer in enumerate(model.layers):
        names += [f"line_{i}"] * (layer.delay is not None) + [f"hidden_{i}"] * (layer.mingru is not None)
    return names


def export_onnx(model, out, steps: int = ONNX_STEPS):
    """One streaming step of `model` as an ONNX graph with explicit state (see the module)."""
    import torch

    try:
        import onnx
    except ImportError:
        raise KwsError(f"writing ONNX needs the onnx package: {INSTALL_ONNX}") from None

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, audio, *state):
            given = iter(state)
            full = [next(given)]  # model.stream's state: None where a layer lacks a mixer
            for layer in self.model.layers:
                full += [next(given) if layer.delay is not None else None,
                         next(given) if layer.mingru is not None else None]
            logits, new = self.model.stream(audio, full)
            return (logits, *[t for t in new if t is not None])

    names = state_names(model)
    start = [t.clone() for t in model.primed_state(1) if t is not None]
    audio = torch.zeros(1, steps * model.cfg.stride)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and trace notes
        torch.onnx.export(Step().eval(), (audio, *start), str(out), dynamo=False,
                          input_names=["audio", *names],
                          output_names=["logits", *[n + "_out" for n in names]],
                          opset_version=ONNX_OPSET)
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, {
        "kws.labels": json.dumps(list(model.cfg.labels)), "kws.stride": str(model.cfg.stride),
        "kws.steps": str(steps), "kws.thresholds": json.dumps(model.thresholds),
        "kws.long_window_s": str(model.long_window_s), "kws.license": model.license,
        "kws.start_state": json.dumps({n: t[0].tolist() for n, t in zip(names, start)})})
    onnx.save(proto, str(out))


class OnnxStream:
    """An exported ONNX file under onnxruntime, with the engine's `start_state`/`stream`, for
    chunks of exactly `samples_per_call` samples."""

    def __init__(self, path):
        try:
            import onnxruntime
        except ImportError:
            raise KwsError(f"running ONNX needs onnxruntime: {INSTALL_ONNX}") from None
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels = tuple(json.loads(meta["kws.labels"]))
        self.samples_per_call = int(meta["kws.stride"]) * int(meta["kws.steps"])
        self.names = [i.name for i in self.session.get_inputs()][1:]
        start = json.loads(meta["kws.start_state"])
        self._start = {n: np.asarray(start[n], np.float32)[None] for n in self.names}

    def start_state(self) -> dict:
        return dict(self._start)

    def stream(self, samples: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        outputs = self.session.run(None, {"audio": samples[None].astype(np.float32), **state})
        return outputs[0][0], dict(zip(self.names, outputs[1:]))


def export(checkpoint, out, steps: int = ONNX_STEPS, thresholds: dict | None = None,
           long_window_s: float | None = 0.0) -> float:
    """Write `out` (.npz, .onnx, or .pt) from `checkpoint`, with `thresholds` as the model's
    per-word detection thresholds and `long_window_s` as the long window they were chosen with,
    if given (else the checkpoint's own, if it has them). With `long_window_s` None (thresholds
    set by hand), the words named take these thresholds, the others and the long window stay the
    checkpoint's. Returns the checked difference in logits."""
    from kws.cli import check_writable, load
    from kws.labels import long_window_problem, threshold_problem
    from kws.runtime import StreamEngine, load_engine, save_engine

    kind = Path(out).suffix
    if kind not in EXPORT_KINDS:
        raise KwsError(f"{out}: the file to write must end in {', '.join(EXPORT_KINDS)}")
    model = load(checkpoint)  # without torch, this is the error that says how to get it
    if thresholds is not None:
        if long_window_s is None:
            thresholds, long_window_s = {**model.thresholds, **thresholds}, model.long_window_s
        problem = (threshold_problem(thresholds, model.cfg.labels)
                   or long_window_problem(long_window_s))
        if problem:
            raise KwsError(problem)
        model.thresholds, model.long_window_s = dict(thresholds), float(long_window_s)
    check_writable(Path(out), "OUT")
    # Written beside `out` and moved there only once checked: a file that fails leaves `out` as it was.
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=Path(out).parent, prefix=f".{Path(out).stem}.", suffix=kind)
    except OSError as e:
        raise KwsError(f"cannot write OUT {out}: {e.strerror}") from None
    os.close(handle)
    unchecked = Path(name)
    try:
        if kind == ".pt":
            from kws.model import read_checkpoint, save_model

            meta = read_checkpoint(checkpoint)[2]
            save_model(model, unchecked, {**meta, "thresholds": model.thresholds,
                                          "long_window_s": model.long_window_s, "license": model.license})
            difference = stream_difference(model, StreamEngine.from_model(load(unchecked)), check_audio())
        elif kind == ".onnx":
            export_onnx(model, unchecked, steps)
            stream = OnnxStream(unchecked)
            difference = stream_difference(model, stream, check_audio(), stream.samples_per_call)
        else:
            save_engine(unchecked, *model.inference_arrays())
            difference = stream_difference(model, load_engine(unchecked), check_audio())
        if not difference <= EXPORT_TOLERANCE:
            raise KwsError(f"the exported logits differ from the checkpoint's by {difference:.2g} "
                           f"(more than {EXPORT_TOLERANCE:g}): {out} not written")
        unchecked.replace(out)
    finally:
        unchecked.unlink(missing_ok=True)
    return difference


def run(args):
    from kws.stream import read_choice

    if args.steps < 1:
        raise KwsError(f"--steps must be positive, got {args.steps}")
    thresholds, long_window_s = read_choice(args.thresholds) if args.thresholds else (None, 0.0)
    difference = export(args.checkpoint, args.out, args.steps, thresholds, long_window_s)
    print(f"kws export: wrote {args.out} (logits within {difference:.1e} of the checkpoint's)",
          file=sys.stderr)


def register(sub):
    from kws.cli import COMMANDS

    p = sub.add_parser("export", help=COMMANDS["export"][1],
                       description="Write the torch-free model file of a checkpoint (OUT.npz: "
                       "named arrays and a JSON config, read without pickle), one streaming "
                       "step as ONNX with explicit state inputs and outputs (OUT.onnx), or a "
                       "copy of the checkpoint (OUT.pt), each with the model's per-word "
                       "detection thresholds and the long readout window they were chosen with.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="PyTorch checkpoint (.pt) from kws train")
    p.add_argument("out", metavar="OUT", help="file to write: .npz (what kws listen/serve load), "
                   ".onnx, or .pt")
    p.add_argument("--thresholds", metavar="JSON", help="the per-word detection thresholds to "
                   "store as the model's defaults: a file kws eval-stream --choose-thresholds "
                   "wrote replaces them and the long window they were chosen with; a file of "
                   'thresholds alone ({"thresholds": {"yes": 0.9}}) changes the words it names. '
                   "Without it, the checkpoint's own, if it has them")
    p.add_argument("--steps", type=int, default=ONNX_STEPS,
                   help=f"ONNX: model steps per call, fixed in the graph ({ONNX_STEPS})")
    p.set_defaults(func=run)
