"""One stream of an MGRADE model, run in NumPy: the inference engine behind every Detector.

`MGRADE.stream` is the reference, written in PyTorch for batches and GPUs. A live stream is
one batch row fed 3 to 10 steps at a time, and there the cost is not arithmetic but the fixed
cost of each operator call: about 2-10 µs per PyTorch operator on a small tensor against
about 1 µs per NumPy ufunc. `StreamEngine` computes the same function with the weights
rearranged once, so each chunk needs fewer and cheaper calls:

- delay taps are read with one `take` at precomputed indices (only the taps, not the window);
- LayerNorm's affine parameters and centring are folded into the neighbouring linear layers
  where one exists, and GELU's scale factors into the MLP's weights;
- the minGRU recurrence runs step by step over a chunk of a few steps, and closed-form over
  longer ones, h_t = A_t (h_0 + sum_s b_s / A_s) with A_t the running product of (1 - z),
  in float64 and in blocks short enough that A stays far from underflow (saturated gates
  fall back to the step-by-step form);
- both gates come from one exp over the joint gate/candidate projection.

Its state has the same parts as `MGRADE.stream`'s: unconsumed audio, then per layer a delay
line of `delay_window - 1` steps and a hidden vector, all fixed-size.
"""

import math

import numpy as np
import torch

PIECE_SAMPLES = 16000  # longer chunks run 1 s at a time, so working memory stays constant
SCAN_BLOCK = 16  # steps per closed-form block: A_t stays above 1e-280 unless gates saturate
LOOP_MAX_STEPS = 4  # chunks up to this many steps run the recurrence step by step: fewer calls
TINY = 1e-280
# No floating-point warnings: an exp that overflows gives a gate of exactly 0 or 1, as meant,
# and OpenBLAS on arm64 sets spurious divide/overflow/invalid flags in matmuls whose results
# are correct (numpy issues 28687, 29820), which would print RuntimeWarnings on every board.
QUIET = dict(all="ignore")


class StreamEngine:
    """`MGRADE.stream` for one stream in NumPy. Built once per model (`MGRADE.stream_engine()`);
    its arrays are read-only, so any number of streams share it, each with its own state."""

    def __init__(self, model):
        if model.training:
            raise ValueError("a stream engine runs a model in eval mode: call model.eval() first")
        self.stride = model.cfg.stride
        self.history = model.frontend.history
        self.n_classes = model.cfg.n_classes
        with torch.no_grad(), np.errstate(**QUIET):
            self.frontend = _Frontend(model.frontend)
            max_steps = (PIECE_SAMPLES + model.frontend.history) // self.stride + 1
            self.layers = [_Layer(layer, max_steps) for layer in model.layers]
            self.decoder_w = _numpy(model.decoder.weight.T)
            self.decoder_b = _numpy(model.decoder.bias)
            self._start = [None if t is None else _numpy(t[0]) for t in model.primed_state(1)]

    def start_state(self) -> list:
        """The state a stream starts from: what `clip_context_s` of silence leaves (as
        `MGRADE.primed_state`): unconsumed audio, then a delay line and hidden vector per layer."""
        return [None if t is None else t.copy() for t in self._start]

    def stream(self, samples: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        """float32 samples (n,) of any length -> (logits (steps completed, n_classes), state)."""
        if len(samples) > PIECE_SAMPLES:
            pieces = []
            for start in range(0, len(samples), PIECE_SAMPLES):
                logits, state = self.stream(samples[start:start + PIECE_SAMPLES], state)
                pieces.append(logits)
            return np.concatenate(pieces), state
        audio = np.concatenate((state[0], samples.astype(np.float32, copy=False)))
        steps = (len(audio) - self.history) // self.stride
        new_state = [audio[steps * self.stride:]]
        if steps == 0:
            return np.zeros((0, self.n_classes), np.float32), new_state + state[1:]
        with np.errstate(**QUIET):
            x = self.frontend(audio, steps)
            for i, layer in enumerate(self.layers):
                x, line, h = layer(x, *state[1 + 2 * i: 3 + 2 * i])
                new_state += [line, h]
            return x @ self.decoder_w + self.decoder_b, new_state


def _numpy(t: torch.Tensor, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype))


def _centering(n: int) -> np.ndarray:
    """x @ C subtracts each row's mean."""
    return (np.eye(n) - 1.0 / n).astype(np.float32)


def _scale(c: np.ndarray, eps_n: float) -> np.ndarray:
    """A centred row divided by its standard deviation, as LayerNorm does (times sqrt(n)):
    c / sqrt(mean(c^2) + eps) = c * sqrt(n / (sum(c^2) + n * eps)); sqrt(n) lives in the weights."""
    return c / np.sqrt(np.vecdot(c, c)[:, None] + eps_n)


class _Frontend:
    def __init__(self, frontend):
        cfg = frontend.cfg
        self.kernel, self.stride = cfg.frontend_kernel, cfg.stride
        self.gabor = cfg.frontend == "gabor"
        self.w = _numpy(frontend.conv.weight.flatten(1).T)
        self.b = None if frontend.conv.bias is None else _numpy(frontend.conv.bias)
        if self.gabor:
            self.half = cfg.frontend_filters
            self.proj_w = _numpy(frontend.proj.weight.T)
            self.proj_b = _numpy(frontend.proj.bias)

    def __call__(self, audio: np.ndarray, steps: int) -> np.ndarray:
        frames = np.lib.stride_tricks.as_strided(
            audio, (steps, self.kernel), (self.stride * audio.itemsize, audio.itemsize), writeable=False)
        y = np.ascontiguousarray(frames) @ self.w
        if not self.gabor:
            return y + self.b
        y *= y
        power = y[:, :self.half] + y[:, self.half:]
        power += 1e-6
        return np.log(power) @ self.proj_w + self.proj_b


class _Layer:
    def __init__(self, layer, max_steps: int):
        H = layer.cfg.width
        self.centre = centre = _centering(H)
        self.delay = layer.delay is not None
        if self.delay:
            kernel = layer.delay._oldest_first_kernel().detach().cpu().numpy()  # (H, window)
            # Only the non-zero taps: integer delays leave n_taps per channel (fewer where two
            # round to the same delay); Gaussian taps at inference (an ablation) fill the window.
            taps = max(1, int((kernel != 0).sum(1).max()))
            order = np.argsort(kernel == 0, axis=1, kind="stable")[:, :taps]  # non-zero first
            self.tap_w = np.take_along_axis(kernel, order, 1).astype(np.float32)
            self.tap_index = (order * H + np.arange(H)[:, None]).ravel()  # into (window-1+T, H).ravel()
            self.row_offsets = np.arange(max_steps)[:, None] * H
            self.delay_eps = H * layer.delay_norm.eps
            self.delay_g = _numpy(layer.delay_norm.weight) * math.sqrt(H)
            self.delay_b = _numpy(layer.delay_norm.bias)
        self.mingru = layer.mingru is not None
        if self.mingru:
            gate = layer.mingru.to_gate_and_candidate
            # The candidate columns negated: one exp of [k | -v] gives the keep gate
            # 1 - z = 1 / (1 + exp(k)) and sigmoid(v) = 1 / (1 + exp(-v)) together.
            sign = np.concatenate([np.ones(H), -np.ones(H)]).astype(np.float32)
            self.gate_w, self.gate_b = _numpy(gate.weight.T) * sign, _numpy(gate.bias) * sign
            linear, norm = layer.mingru_out
            self.out_w = _numpy(linear.weight.T) @ centre  # output already centred
            self.out_b = _numpy(linear.bias) @ centre
            self.out_eps = H * norm.eps
            self.out_g = _numpy(norm.weight) * math.sqrt(H)
            self.out_b2 = _numpy(norm.bias)
        norm_in, fc1, _, fc2 = layer.mlp
        # LayerNorm's affine folded into fc1; fc1 emits u = y / sqrt(2), so
        # GELU(y) = y * (1 + erf(u)) / 2 = u * (1 + erf(u)) / sqrt(2), and the 1/sqrt(2) is in fc2.
        w1 = _numpy(fc1.weight.T, np.float64)
        gamma, beta = _numpy(norm_in.weight, np.float64), _numpy(norm_in.bias, np.float64)
        self.fc1_w = (gamma[:, None] * w1 * math.sqrt(H / 2)).astype(np.float32)
        self.fc1_b = ((beta @ w1 + _numpy(fc1.bias, np.float64)) / math.sqrt(2)).astype(np.float32)
        self.mlp_eps = H * norm_in.eps
        # ... and the final LayerNorm's centring: it centres x + fc2(.), and x comes centred.
        self.fc2_w = _numpy(fc2.weight.T) @ centre / np.float32(math.sqrt(2))
        self.fc2_b = _numpy(fc2.bias) @ centre
        self.norm_eps = H * layer.norm.eps
        self.norm_g = _numpy(layer.norm.weight) * math.sqrt(H)
        self.norm_b = _numpy(layer.norm.bias)

    def __call__(self, x: np.ndarray, line, h):
        T, H = x.shape
        if self.delay:
            xs = np.concatenate((line, x))
            taps = xs.ravel().take(self.row_offsets[:T] + self.tap_index).reshape(T, H, -1)
            d = np.vecdot(taps, self.tap_w)
            line = xs[T:]
            x = x + _scale(d @ self.centre, self.delay_eps) * self.delay_g + self.delay_b
        if self.mingru:
            k_minus_v = x @ self.gate_w + self.gate_b
            s = 1.0 / (1.0 + np.exp(k_minus_v))  # [1 - z | sigmoid(v)]
            keep = s[:, :H]
            g = np.maximum(0.5 - k_minus_v[:, H:], s[:, H:])
            hs = _recurrence(keep, (1.0 - keep) * g, h)
            h = hs[-1]
            x = x + _scale(hs @ self.out_w + self.out_b, self.out_eps) * self.out_g + self.out_b2
        c = x @ self.centre
        u = _scale(c, self.mlp_eps) @ self.fc1_w + self.fc1_b
        m = (u * (1.0 + torch.erf(torch.from_numpy(u)).numpy())) @ self.fc2_w + self.fc2_b
        return _scale(c + m, self.norm_eps) * self.norm_g + self.norm_b, line, h


def _recurrence(a: np.ndarray, b: np.ndarray, h: np.ndarray) -> np.ndarray:
    """h_t = a_t h_{t-1} + b_t for every t from h; a, b (T, H) float32. Short chunks step by
    step; longer ones closed-form in float64 blocks of SCAN_BLOCK steps."""
    if len(a) <= LOOP_MAX_STEPS:
        return _step_by_step(a, b, h)
    out = np.empty_like(b)
    for start in range(0, len(a), SCAN_BLOCK):
        ab, bb = a[start:start + SCAN_BLOCK].astype(np.float64), b[start:start + SCAN_BLOCK].astype(np.float64)
        A = np.cumprod(ab, axis=0)
        if A[-1].min() > TINY:
            block = A * (np.cumsum(bb / A, axis=0) + h)
        else:  # a gate saturated to keep nothing: the product underflowed
            block = _step_by_step(ab, bb, h)
        out[start:start + len(ab)] = block
        h = block[-1]
    return out


def _step_by_step(a: np.ndarray, b: np.ndarray, h: np.ndarray) -> np.ndarray:
    out = np.empty_like(b)
    for t in range(len(a)):
        h = a[t] * h + b[t]
        out[t] = h
    return out
