"""The inference engine: an MGRADE model run in NumPy from a torch-free model file.

`kws export` writes the file from a checkpoint (`MGRADE.inference_arrays`); `kws listen`,
`kws serve` and `kws info` read it with `load_engine` and never import torch.

The file is a NumPy `.npz` archive read with `allow_pickle=False`: plain arrays named like the
model's layers (Linear weights are (out, in), as in PyTorch), plus `config`, a JSON text that
holds the model's config, the file format's name and version, the checkpoint's parameter
count, and the model's per-word detection thresholds and the long readout window they were
chosen with, when it has them. NumPy reads it with nothing else installed; safetensors would
add a dependency for the same result on a 1-MB file.

Arrays (H = width, F = front-end filters, K = frontend_kernel, W = delay_window, C = classes):
frontend.weight (2F or H, K) [+ frontend.bias (H,) for the linear front end];
frontend.proj.weight (H, F), frontend.proj.bias (gabor); per layer i, `layers.i.` +
delay.kernel (H, W): index d weighs the input d steps ago; delay_norm.{weight,bias};
mingru.weight (2H, H), mingru.bias (2H,): the gate rows, then the candidate rows;
mingru_out.{weight,bias}, mingru_norm.{weight,bias}; mlp_norm.{weight,bias};
mlp.fc1.{weight,bias}, mlp.fc2.{weight,bias}; norm.{weight,bias}; and decoder.{weight,bias}.

`MGRADE.stream` (PyTorch) is the reference; the engine computes the same function with the
weights rearranged once at load. A live stream is fed 3 to 10 steps at a time, where the cost
is the fixed cost of each operator call (about 1 µs per NumPy ufunc), not arithmetic, so:

- delay taps are read with one `take` at precomputed indices (only the taps, not the window),
  tap-major, so that weighing and summing them are two calls on contiguous arrays;
- every call works on contiguous arrays: a wide matmul's column blocks are strided views, on
  which NumPy's calls cost 2-3 times as much, so the gate projection is a stack of (H, H)
  blocks, each block of the output contiguous;
- a bias or LayerNorm weight added to or multiplying a chunk's few steps is a copy broadcast
  to that shape once (`_Tiled`): an add of equal shapes costs a third of a broadcasting one;
  float32 scalars are made once;
- LayerNorm's centring is folded into the matmul before it where there is one, its affine into
  fc1, and GELU's scale factors into the MLP's weights;
- both minGRU gates come from one tanh (sigmoid(x) = (1 + tanh(x / 2)) / 2), and GELU's erf
  from a table read with a few ufuncs;
- the minGRU recurrence runs step by step over a chunk of a few steps, and as a parallel
  prefix scan over longer ones: log2(steps) rounds of whole-array products and sums, with no
  division, so no underflow to guard against (a gate that keeps nothing composes to exactly
  0) and no per-step Python loop over a 1-s clip.

Every function here takes a leading batch axis or none: a stream is one unbatched row, and
`classify` runs a batch of equal-length clips through the same code.
"""

import json
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kws import PROJECT_LICENSE, license_problem
from kws.errors import KwsError
from kws.labels import long_window_problem, threshold_problem

FORMAT = "kws-engine"
VERSION = 1
# kws.audio.SAMPLE_RATE, not imported from there: the engine would load soundfile and soxr too
SAMPLE_RATE = 16000
PIECE_SAMPLES = 16000  # longer chunks run 1 s at a time, so working memory stays constant
LOOP_MAX_STEPS = 4  # chunks up to this many steps run the recurrence step by step: fewer calls
# No floating-point warnings: OpenBLAS on arm64 sets spurious divide/overflow/invalid flags in
# matmuls whose results are correct (numpy issues 28687, 29820), which would print
# RuntimeWarnings on every board.
QUIET = dict(all="ignore")
# 1 + erf(u) tabulated every 1/1024 on [-6, 6] (erf is +-1 beyond, to 2e-17): linear
# interpolation is then within 1.2e-7 of it (|erf''| < 1). Looked up on the uniform grid with a
# few ufuncs: as fast as np.interp on a chunk's few hundred values, and 10x faster than its
# binary search on a batch of clips.
ERF_STEPS_PER_UNIT = 1024
ERF_RANGE = 6.0
_ERF_GRID = np.arange(-ERF_RANGE * ERF_STEPS_PER_UNIT, ERF_RANGE * ERF_STEPS_PER_UNIT + 1) / ERF_STEPS_PER_UNIT
_ONE_PLUS_ERF = 1.0 + np.array([math.erf(u) for u in _ERF_GRID])
_ERF_TABLE = _ONE_PLUS_ERF[:-1].astype(np.float32)
_ERF_SLOPE = np.diff(_ONE_PLUS_ERF).astype(np.float32)  # per grid step
# float32 scalars made once: a Python number costs a conversion on every call
_ONE, _HALF = np.float32(1), np.float32(0.5)
_ERF_STEPS, _ERF_OFFSET = np.float32(ERF_STEPS_PER_UNIT), np.float32(ERF_RANGE * ERF_STEPS_PER_UNIT)


class EngineFileError(KwsError):
    """A file that is not a readable kws engine file."""


@dataclass
class LayerState:
    """What one layer carries from chunk to chunk (None where the layer lacks that mixer)."""
    line: np.ndarray | None  # (delay_window - 1, width): the layer's last inputs, oldest first
    hidden: np.ndarray | None  # (width,): the minGRU hidden vector


@dataclass
class StreamState:
    """Everything a stream carries, all of fixed size (a leading batch axis in `classify`)."""
    audio: np.ndarray  # samples not yet consumed by a step (fewer than frontend_kernel)
    layers: list[LayerState]

    def arrays(self) -> list[np.ndarray]:
        """Every array of the state, audio first."""
        return [self.audio] + [a for s in self.layers for a in (s.line, s.hidden) if a is not None]

    def copy(self) -> "StreamState":
        return StreamState(self.audio.copy(), [
            LayerState(None if s.line is None else s.line.copy(),
                       None if s.hidden is None else s.hidden.copy()) for s in self.layers])


class StreamEngine:
    """An MGRADE model in NumPy. `description`: {"model": the model's config, "layer_norm_eps",
    "parameters": the checkpoint's count, "license": its weights' licence (SPDX id; the
    project's if absent), and "thresholds" and "long_window_s" when the model has its own per-word
    detection thresholds and readout}; `arrays`: the named arrays (see the module's docstring), as
    `MGRADE.inference_arrays()` gives them. The engine's arrays are read-only, so any number of
    streams share it, each with its own StreamState."""

    def __init__(self, description: Mapping, arrays: Mapping[str, np.ndarray]):
        self.description = dict(description)
        model = description["model"]
        self.labels = tuple(model["labels"])
        self.n_classes = len(self.labels)
        self.stride = int(model["stride"])
        self.width = int(model["width"])
        self.history = int(model["frontend_kernel"]) - self.stride
        self.parameters = int(description["parameters"])
        # the model's per-word detection thresholds (MGRADE.thresholds): the Detector's defaults
        thresholds = description.get("thresholds", {})
        problem = threshold_problem(thresholds, self.labels)
        if problem:
            raise ValueError(problem)
        self.thresholds = dict(thresholds)
        self.long_window_s = description.get("long_window_s", 0.0)  # MGRADE.long_window_s
        problem = long_window_problem(self.long_window_s)
        if problem:
            raise ValueError(problem)
        self.license = description.get("license", PROJECT_LICENSE)
        problem = license_problem(self.license)
        if problem:
            raise ValueError(problem)
        weights = _Weights(arrays)
        with np.errstate(**QUIET):
            self.frontend = _Frontend(model, weights)
            max_steps = (PIECE_SAMPLES + self.history) // self.stride + 1
            self.layers = [_Layer(model, float(description["layer_norm_eps"]), weights, f"layers.{i}.", max_steps)
                           for i in range(int(model["n_layers"]))]
            self.decoder_w = weights.get("decoder.weight", (self.n_classes, self.width)).T.copy()
            self.decoder_b = _Tiled(weights.get("decoder.bias", (self.n_classes,)))
        weights.check_all_used()
        # The state `clip_context_s` of silence leaves: every training clip came after some
        # audio, never a zero state, so streams and clips start from here.
        context = round(float(model["clip_context_s"]) * SAMPLE_RATE) // self.stride * self.stride
        _, self._start = self.stream(np.zeros(context, np.float32), self._zero_state())

    @classmethod
    def from_model(cls, model) -> "StreamEngine":
        """The engine of a torch MGRADE in eval mode (evaluation and export have one at hand)."""
        return cls(*model.inference_arrays())

    @property
    def parameter_bytes(self) -> int:
        """The checkpoint's parameters in float32."""
        return 4 * self.parameters

    @property
    def state_bytes(self) -> int:
        """Largest state of one stream: unconsumed audio (< kernel samples) and per layer a
        delay line and a hidden vector, in float32."""
        audio = self.history + self.stride - 1
        return 4 * (audio + sum(s.size for s in self._zero_state().arrays()[1:]))

    def _zero_state(self, batch: tuple = ()) -> StreamState:
        return StreamState(np.zeros(batch + (self.history,), np.float32), [
            LayerState(np.zeros(batch + (layer.window - 1, self.width), np.float32) if layer.delay else None,
                       np.zeros(batch + (self.width,), np.float32) if layer.mingru else None)
            for layer in self.layers])

    def start_state(self) -> StreamState:
        """A stream's first state: what `clip_context_s` of silence leaves (as `MGRADE.primed_state`)."""
        return self._start.copy()

    def stream(self, samples: np.ndarray, state: StreamState) -> tuple[np.ndarray, StreamState]:
        """float32 samples (n,) of any length -> (logits (steps completed, n_classes), new state).
        Fed in any chunking, a signal gives the same logits. The state passed in is not changed."""
        if samples.shape[-1] > PIECE_SAMPLES:
            pieces = []
            for start in range(0, samples.shape[-1], PIECE_SAMPLES):
                logits, state = self.stream(samples[..., start:start + PIECE_SAMPLES], state)
                pieces.append(logits)
            return np.concatenate(pieces, axis=-2), state
        audio = np.concatenate((state.audio, samples.astype(np.float32, copy=False)), axis=-1)
        steps = (audio.shape[-1] - self.history) // self.stride
        rest = np.ascontiguousarray(audio[..., steps * self.stride:])
        if steps == 0:
            return np.zeros(audio.shape[:-1] + (0, self.n_classes), np.float32), StreamState(rest, state.layers)
        layers = []
        with np.errstate(**QUIET):
            x = self.frontend(audio, steps)
            for layer, s in zip(self.layers, state.layers):
                x, s = layer(x, s)
                layers.append(s)
            return self.decoder_b.add_to(x @ self.decoder_w), StreamState(rest, layers)

    def classify(self, clips: np.ndarray) -> np.ndarray:
        """Whole-clip logits (B, n_classes) of a batch of equal-length clips (B, n): the mean of
        each clip's per-step logits, heard after `clip_context_s` of silence (`MGRADE.classify`)."""
        clips = np.asarray(clips, dtype=np.float32)
        batch = clips.shape[:1]
        start = StreamState(np.broadcast_to(self._start.audio, batch + self._start.audio.shape), [
            LayerState(*(None if a is None else np.broadcast_to(a, batch + a.shape) for a in (s.line, s.hidden)))
            for s in self._start.layers])
        logits, _ = self.stream(clips, start)
        return logits.mean(axis=-2)


def load_engine(path: "str | Path") -> StreamEngine:
    """The engine in a file written by `kws export`, or EngineFileError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise EngineFileError(f"{path} is a folder, not a model file" if path.is_dir() else f"no model file at {path}")
    if path.suffix == ".onnx":
        raise EngineFileError(f"{path} is an ONNX graph for other runtimes; kws reads the .npz "
                              f"model file (or the .pt checkpoint) it was exported from")
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = dict(npz)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise EngineFileError(f"{path} is damaged or not a kws model file ({type(e).__name__})") from None
    try:
        config = json.loads(str(files.pop("config")))
    except (KeyError, ValueError):
        raise EngineFileError(f"{path} is not a kws model file (no config)") from None
    if not isinstance(config, dict) or config.pop("format", None) != FORMAT:
        raise EngineFileError(f"{path} is not a kws model file")
    version = config.pop("version", None)
    if version != VERSION:
        raise EngineFileError(f"{path} has model file version {version}, this kws reads version {VERSION}")
    try:
        return StreamEngine(config, files)
    except (KeyError, TypeError, ValueError) as e:
        raise EngineFileError(f"{path} is not a usable kws model file: {e}") from None


def save_engine(path: "str | Path", description: Mapping, arrays: Mapping[str, np.ndarray]):
    """Write an engine file (checked by building the engine first); never half a file."""
    StreamEngine(description, arrays)
    config = {"format": FORMAT, "version": VERSION, **description}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, config=np.array(json.dumps(config)), **arrays)
    tmp.replace(path)


# ----------------------------------------------------------------------------- the layers

class _Weights:
    """The file's arrays, each checked for its shape as the engine takes it."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays, self.used = arrays, set()

    def get(self, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"array {name} is missing")
        a = np.asarray(self.arrays[name])
        if a.shape != shape:
            raise ValueError(f"array {name} is {a.shape}, the config needs {shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"array {name} is not finite")
        self.used.add(name)
        return np.ascontiguousarray(a, dtype=dtype)

    def check_all_used(self):
        unknown = sorted(set(self.arrays) - self.used)
        if unknown:
            raise ValueError(f"unexpected array(s) {', '.join(unknown[:3])}")


def _centering(n: int) -> np.ndarray:
    """x @ C subtracts each row's mean."""
    return np.eye(n) - 1.0 / n


class _Tiled:
    """A vector (or small array) applied in place to arrays of its trailing shape. For small
    arrays (a chunk's few steps) it keeps a copy broadcast to each shape it meets: an add or
    multiply of equal shapes costs a third of a broadcasting one. Bigger arrays (batches) take
    the broadcasting call."""
    TILE_MAX = 2048  # elements: a few KB per shape, and a few shapes per stream

    def __init__(self, b: np.ndarray):
        self.b = np.ascontiguousarray(b, dtype=np.float32)
        self._tiles: dict[tuple, np.ndarray] = {}

    def _tile(self, shape: tuple) -> np.ndarray:
        if math.prod(shape) > self.TILE_MAX:
            return self.b
        tile = self._tiles[shape] = np.ascontiguousarray(np.broadcast_to(self.b, shape))
        return tile

    def add_to(self, y: np.ndarray) -> np.ndarray:
        tile = self._tiles.get(y.shape)
        y += self._tile(y.shape) if tile is None else tile
        return y

    def multiply(self, y: np.ndarray) -> np.ndarray:
        tile = self._tiles.get(y.shape)
        y *= self._tile(y.shape) if tile is None else tile
        return y


def _row_norm(c: np.ndarray, eps_n: np.float32) -> np.ndarray:
    """What LayerNorm divides centred rows c by, over sqrt(n): sqrt(sum(c^2) + n * eps), shape
    (..., 1)."""
    norm = np.vecdot(c, c)
    norm += eps_n
    np.sqrt(norm, out=norm)
    return norm[..., None]


def _layer_norm(c: np.ndarray, eps_n: np.float32) -> np.ndarray:
    """LayerNorm, but for its affine, of centred rows c, over sqrt(n) (LayerNorm's weight, times
    sqrt(n), makes up for it). A new array."""
    return np.divide(c, _row_norm(c, eps_n))


class _Frontend:
    def __init__(self, model: Mapping, weights: _Weights):
        self.kernel, self.stride = int(model["frontend_kernel"]), int(model["stride"])
        H = int(model["width"])
        self.gabor = model["frontend"] == "gabor"
        if self.gabor:
            # files exported before the floor was a setting were all trained and run at 1e-6
            self.floor = np.float32(model.get("power_floor", 1e-6))
            n = int(model["frontend_filters"])
            w = weights.get("frontend.weight", (2 * n, self.kernel)).T
            self.w = np.stack((w[:, :n], w[:, n:]))  # the filters' two quadratures, as blocks
            self.proj_w = weights.get("frontend.proj.weight", (H, n)).T.copy()
            self.b = _Tiled(weights.get("frontend.proj.bias", (H,)))
        elif model["frontend"] == "linear":
            self.w = weights.get("frontend.weight", (H, self.kernel)).T.copy()
            self.b = _Tiled(weights.get("frontend.bias", (H,)))
        else:
            raise ValueError(f"unknown front end {model['frontend']!r}")

    def __call__(self, audio: np.ndarray, steps: int) -> np.ndarray:
        """audio (..., L), C-contiguous float32 -> (..., steps, H)."""
        # The overlapping frames as a view (np.ndarray over the buffer: as_strided's Python
        # wrapper costs more than the rest of a 32-ms chunk's front end), then one copy that
        # BLAS can take.
        frames = np.ascontiguousarray(np.ndarray(audio.shape[:-1] + (steps, self.kernel), np.float32, audio,
                                                 strides=audio.strides[:-1] + (4 * self.stride, 4)))
        if not self.gabor:
            return self.b.add_to(frames @ self.w)
        y = frames[..., None, :, :] @ self.w  # (..., 2, steps, filters): contiguous halves
        y *= y
        power = np.add(y[..., 0, :, :], y[..., 1, :, :])
        power += self.floor
        np.log(power, out=power)
        return self.b.add_to(power @ self.proj_w)


class _Layer:
    """One layer, its weights rearranged for few NumPy calls, each on contiguous arrays (NumPy
    calls on strided views, such as a wide matmul's column blocks, cost 2-3 times as much).
    LayerNorm's centring is folded into the matmul before it; the minGRU's gates come from one
    tanh; GELU's erf from a table (`_one_plus_erf`)."""

    def __init__(self, model: Mapping, eps: float, weights: _Weights, prefix: str, max_steps: int):
        H = int(model["width"])
        centre = _centering(H)
        root_h = math.sqrt(H)
        self.centre = centre.astype(np.float32)
        self.eps_n = np.float32(H * eps)  # every LayerNorm's eps, as _layer_norm takes it (times n)
        self.delay = bool(model["use_delay"])
        self.window = int(model["delay_window"])
        if self.delay:
            kernel = weights.get(prefix + "delay.kernel", (H, self.window))[:, ::-1]  # oldest first
            # Only the non-zero taps: integer delays leave n_taps per channel (fewer where two
            # round to the same delay); Gaussian taps (an ablation) fill the window.
            taps = max(1, int((kernel != 0).sum(1).max()))
            order = np.argsort(kernel == 0, axis=1, kind="stable")[:, :taps]  # non-zero first
            self.tap_w = _Tiled(np.take_along_axis(kernel, order, 1).T[:, None, :])  # (taps, 1, H)
            self.tap_index = order.T * H + np.arange(H)  # (taps, H): into (window-1+T, H).ravel()
            self.row_offsets = np.arange(max_steps)[:, None] * H
            self._tap_indices: dict[int, np.ndarray] = {}
            self.delay_g = _Tiled(weights.get(prefix + "delay_norm.weight", (H,)) * root_h)
            self.delay_b = _Tiled(weights.get(prefix + "delay_norm.bias", (H,)))
        self.mingru = bool(model["use_mingru"])
        if self.mingru:
            # Blocks [k / 2, v / 2, v + 1/2] (x @ blocks makes each a contiguous array):
            # z = sigmoid(k) and sigmoid(v) come from one tanh, as sigmoid(x) =
            # (1 + tanh(x / 2)) / 2, and g(v) = max(v + 1/2, sigmoid(v)).
            w = weights.get(prefix + "mingru.weight", (2 * H, H)).T
            b = weights.get(prefix + "mingru.bias", (2 * H,))
            self.gate_w = np.stack((w[:, :H] / 2, w[:, H:] / 2, w[:, H:]))
            self.gate_b = _Tiled(np.stack((b[:H] / 2, b[H:] / 2, b[H:] + 0.5))[:, None, :])
            self.out_w = (weights.get(prefix + "mingru_out.weight", (H, H), np.float64).T @ centre).astype(np.float32)
            self.out_b = _Tiled(weights.get(prefix + "mingru_out.bias", (H,), np.float64) @ centre)
            self.out_g = _Tiled(weights.get(prefix + "mingru_norm.weight", (H,)) * root_h)
            self.out_b2 = _Tiled(weights.get(prefix + "mingru_norm.bias", (H,)))
        # The MLP: LayerNorm's affine folded into fc1, which emits u = y / sqrt(2), so
        # GELU(y) = y * (1 + erf(u)) / 2 = u * (1 + erf(u)) / sqrt(2), and 1/sqrt(2) goes into
        # fc2. The final LayerNorm normalises x + fc2(.), whose centred form is the centred x
        # plus fc2's output centred.
        w1 = weights.get(prefix + "mlp.fc1.weight", (2 * H, H), np.float64).T
        gamma = weights.get(prefix + "mlp_norm.weight", (H,), np.float64)
        beta = weights.get(prefix + "mlp_norm.bias", (H,), np.float64)
        self.fc1_w = (centre @ (gamma[:, None] * w1 * root_h) / math.sqrt(2)).astype(np.float32)
        self.fc1_b = _Tiled((beta @ w1 + weights.get(prefix + "mlp.fc1.bias", (2 * H,), np.float64)) / math.sqrt(2))
        self.fc2_w = (weights.get(prefix + "mlp.fc2.weight", (H, 2 * H), np.float64).T @ centre
                      / math.sqrt(2)).astype(np.float32)
        self.fc2_b = _Tiled(weights.get(prefix + "mlp.fc2.bias", (H,), np.float64) @ centre)
        self.norm_g = _Tiled(weights.get(prefix + "norm.weight", (H,)) * root_h)
        self.norm_b = _Tiled(weights.get(prefix + "norm.bias", (H,)))

    def __call__(self, x: np.ndarray, state: LayerState) -> tuple[np.ndarray, LayerState]:
        """x (..., T, H) -> (..., T, H); x is not changed."""
        T = x.shape[-2]
        line, h = state.line, state.hidden
        if self.delay:
            xs = np.concatenate((line, x), axis=-2)
            index = self._tap_indices.get(T)
            if index is None:  # a chunk's steps take a few values: each index is made once
                index = self._tap_indices[T] = (self.row_offsets[:T] + self.tap_index[:, None, :]).ravel()
            taps = xs.reshape(xs.shape[:-2] + (-1,)).take(index, axis=-1)
            taps = taps.reshape(x.shape[:-2] + self.tap_w.b.shape[:1] + x.shape[-2:])  # tap-major
            d = np.add.reduce(self.tap_w.multiply(taps), axis=-3)
            y = self.delay_b.add_to(self.delay_g.multiply(_layer_norm(d @ self.centre, self.eps_n)))
            y += x
            x, line = y, xs[..., T:, :]
        if self.mingru:
            a = self.gate_b.add_to(x[..., None, :, :] @ self.gate_w)  # k/2, v/2, v + 1/2
            s = np.tanh(a[..., :2, :, :])
            s *= _HALF
            s += _HALF  # sigmoid of k and v
            z, g = s[..., 0, :, :], s[..., 1, :, :]
            keep = np.subtract(_ONE, z)
            np.maximum(g, a[..., 2, :, :], out=g)
            z *= g  # z g(v): what each step adds
            hs = _recurrence(keep, z, h)
            h = hs[..., -1, :]
            y = _layer_norm(self.out_b.add_to(hs @ self.out_w), self.eps_n)
            y = self.out_b2.add_to(self.out_g.multiply(y))
            y += x
            x = y
        c = x @ self.centre
        u = self.fc1_b.add_to(np.divide(x @ self.fc1_w, _row_norm(c, self.eps_n)))
        position = np.multiply(u, _ERF_STEPS)
        position += _ERF_OFFSET
        m = _one_plus_erf(position)
        m *= u
        y = m @ self.fc2_w
        y += c
        y = _layer_norm(self.fc2_b.add_to(y), self.eps_n)
        return self.norm_b.add_to(self.norm_g.multiply(y)), LayerState(line, h)


def _one_plus_erf(position: np.ndarray) -> np.ndarray:
    """1 + erf(u) for float32 u, within 5e-7 (float32 rounding included), given u's position on
    the table's grid, u * ERF_STEPS_PER_UNIT + ERF_RANGE * ERF_STEPS_PER_UNIT, which is
    overwritten. Positions off the table read its ends (take's mode="clip"), where erf is +-1
    to 2e-17 and the slope 0; u is bounded by the weights (a LayerNorm's output through fc1), so
    its position fits a 32-bit integer."""
    whole = np.floor(position)
    position -= whole  # the fraction of a grid step
    i = whole.astype(np.int32)  # vectorised, where a conversion to intp is not
    result = _ERF_SLOPE.take(i, mode="clip")
    result *= position
    result += _ERF_TABLE.take(i, mode="clip")
    return result


def _recurrence(a: np.ndarray, b: np.ndarray, h: np.ndarray) -> np.ndarray:
    """h_t = a_t h_{t-1} + b_t for every t from h; a, b (..., T, H) float32, both overwritten.
    A chunk of a few steps runs step by step (fewer calls); a longer one as a Hillis-Steele scan
    of the affine maps h -> a h + b: after the round of shift s, (a_t, b_t) is the composition of
    steps t-2s+1..t, so log2(T) rounds of whole-array calls replace T steps. Only products and
    sums of non-negative numbers: no division, nothing to underflow into an error."""
    T, shift = a.shape[-2], 1
    if T <= LOOP_MAX_STEPS:
        for t in range(T):
            h_t = b[..., t, :]
            h_t += a[..., t, :] * h
            h = h_t
        return b
    b[..., 0, :] += a[..., 0, :] * h
    while shift < T:
        b[..., shift:, :] += a[..., shift:, :] * b[..., :-shift, :]  # old b: the product is made first
        if 2 * shift < T:
            a[..., shift:, :] *= a[..., :-shift, :]  # NumPy reads overlapping inputs before writing
        shift *= 2
    return b
