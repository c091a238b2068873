"""mGRADE: a minimally gated recurrent architecture with delay embedding (arXiv 2507.01829).

Each layer mixes time twice: a causal depthwise convolution whose few taps sit at learned
delays (trained as Gaussians, DCLS-style, and rounded to integer delays for inference), and a
minGRU whose gates depend only on the input, so training runs a log-space parallel scan while
inference carries one hidden vector. Inference memory is therefore constant: a delay line of
`delay_window - 1` steps and one hidden vector per layer.

Shapes: audio (B, T) samples at 16 kHz -> per-step logits (B, T // stride, n_classes).
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kws import PROJECT_LICENSE, license_problem
from kws.errors import KwsError
from kws.labels import long_window_problem, threshold_problem

CHECKPOINT_FORMAT = "kws-mgrade"
CHECKPOINT_VERSION = 1


@dataclass
class ModelConfig:
    labels: tuple[str, ...] = ()  # class names, decoder row i is labels[i]
    stride: int = 160  # audio samples per model step; 1 is the paper's per-sample encoder
    frontend: str = "gabor"  # "linear": Linear(1->H) per step; "gabor": learned filterbank energies
    frontend_kernel: int = 400  # samples each step looks at (>= 2 * stride for "gabor")
    frontend_filters: int = 64  # filterbank channels for "gabor"
    # Added to each band's power before the log: the quietest band "gabor" tells apart. At 1e-6
    # speech 20-30 dB below the training clips' level is floored, a quiet microphone's words.
    power_floor: float = 1e-6
    n_layers: int = 6
    width: int = 64  # H
    delay_window: int = 32  # K: taps sit at delays 0..K-1 steps
    n_taps: int = 8
    sigma_start: float = 8.0  # DCLS Gaussian width at the start of training (steps)
    sigma_end: float = 0.25  # ... and at the end, narrow enough that rounding barely matters
    use_delay: bool = True  # ablations switch off one mixer
    use_mingru: bool = True
    dropout: float = 0.1
    # Training puts this much other audio before every clip, so the model never learns to read a
    # word straight from a zero state; whole clips are classified after this much silence. The
    # one setting of both (`kws train --context-s`), in whole steps: see `context_samples`.
    clip_context_s: float = 0.5

    def __post_init__(self):
        self.labels = tuple(self.labels)
        if self.frontend not in ("linear", "gabor"):
            raise ValueError(f"frontend must be 'linear' or 'gabor', not {self.frontend!r}")
        if self.frontend == "linear" and self.frontend_kernel != self.stride:
            raise ValueError("the linear frontend reads exactly one stride: frontend_kernel == stride")
        if self.frontend == "gabor" and self.frontend_kernel < 2 * self.stride:
            raise ValueError("the gabor frontend needs frontend_kernel >= 2 * stride")
        if not (math.isfinite(self.power_floor) and 0 < self.power_floor <= 1):
            raise ValueError(f"power_floor is above 0 and at most 1, not {self.power_floor}")
        if not 0 <= self.clip_context_s <= 10:
            raise ValueError(f"clip_context_s is 0 to 10 seconds, not {self.clip_context_s}")

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def context_samples(self) -> int:
        """Audio before each clip in training, and silence before it in `classify`: whole steps."""
        return round(self.clip_context_s * 16000) // self.stride * self.stride


PRESETS = {
    # The paper's form: every sample is a step. Slow to train on a CPU, meant for a GPU.
    "paper": dict(stride=1, frontend="linear", frontend_kernel=1, n_layers=6, width=64,
                  delay_window=32, n_taps=8),
    # 10 ms steps from a learned filterbank: trains on a 2-core CPU, streams at a tiny cost.
    "edge": dict(stride=160, frontend="gabor", frontend_kernel=400, frontend_filters=64,
                 n_layers=4, width=64, delay_window=32, n_taps=8),
}


def preset(name: str, labels, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(labels=tuple(labels), **{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- front end

def _mel_frequencies(n: int, low: float = 60.0, high: float = 7600.0) -> torch.Tensor:
    mel = torch.linspace(2595 * math.log10(1 + low / 700), 2595 * math.log10(1 + high / 700), n)
    return 700 * (10 ** (mel / 2595) - 1)


def gabor_atoms(n: int, kernel: int) -> torch.Tensor:
    """(2n, kernel) cosine then sine Gabor atoms at n mel-spaced centre frequencies.

    Each atom's Gaussian envelope is sized to its band: a Gaussian of time width s has a power
    response exp(-(2 pi s f)^2), which is -4.3 dB at f = 1 / (2 pi s); setting that to half the
    distance to the neighbouring centres makes neighbours cross at about -4 dB. Low bands would
    need envelopes longer than the kernel, so a Hann window caps them (they then overlap more).
    Every atom has the same energy, so no band starts louder than another."""
    freqs = _mel_frequencies(n)
    edges = torch.cat([freqs[:1] - (freqs[1] - freqs[0]), freqs, freqs[-1:] + (freqs[-1] - freqs[-2])])
    spacing = (edges[2:] - edges[:-2]) / 2  # mean distance to the two neighbours (Hz)
    width_s = 1 / (math.pi * spacing)  # 1 / (2 pi * spacing / 2)
    t = (torch.arange(kernel) - (kernel - 1) / 2) / 16000
    envelope = torch.exp(-0.5 * (t[None, :] / width_s[:, None]) ** 2)
    envelope = envelope * torch.hann_window(kernel, periodic=False)
    phase = 2 * math.pi * freqs[:, None] * t[None, :]
    atoms = torch.cat([torch.cos(phase) * envelope, torch.sin(phase) * envelope])
    # Energy of the Hann-windowed atoms this front end started with, scaled by 8 as they were.
    return atoms * (8 * math.sqrt(0.375) / atoms.norm(dim=1, keepdim=True))


class Frontend(nn.Module):
    """Raw samples -> one H-vector per stride. Causal: step t sees samples up to (t+1)*stride."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.frontend == "linear":
            self.conv = nn.Conv1d(1, cfg.width, cfg.frontend_kernel, stride=cfg.stride)
        else:
            # Pairs of filters start as cosine/sine Gabor atoms at mel-spaced frequencies, so their
            # summed squares are a short-time spectrum that training is free to reshape.
            n, k = cfg.frontend_filters, cfg.frontend_kernel
            self.conv = nn.Conv1d(1, 2 * n, k, stride=cfg.stride, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(gabor_atoms(n, k)[:, None, :])
            self.proj = nn.Linear(n, cfg.width)

    @property
    def history(self) -> int:
        """Samples of the past that the first new step of a chunk still needs."""
        return self.cfg.frontend_kernel - self.cfg.stride

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, L) whose first `history` samples are context -> (B, (L-history)//stride, H)."""
        # The strided conv as one matmul over frames: the same sums, and several times faster
        # on CPUs than conv1d with a single input channel.
        frames = audio.unfold(1, self.cfg.frontend_kernel, self.cfg.stride)
        y = F.linear(frames, self.conv.weight.flatten(1), self.conv.bias)
        if self.cfg.frontend == "gabor":
            re, im = y.chunk(2, dim=-1)
            y = self.proj(torch.log(re.square() + im.square() + self.cfg.power_floor))
        return y


# ----------------------------------------------------------------------------- delay conv

UNFOLD_MAX_STEPS = 32  # batch x steps up to which taps are read without conv1d


class DelayConv(nn.Module):
    """Causal depthwise convolution with `n_taps` taps per channel at learned delays."""

    def __init__(self, width: int, window: int, n_taps: int, sigma: float):
        super().__init__()
        self.window = window
        self.weight = nn.Parameter(torch.randn(width, n_taps) / math.sqrt(n_taps))
        # Spread the taps over the window, jittered so channels differ from the start.
        spread = torch.linspace(0, window - 1, n_taps).expand(width, n_taps)
        self.positions = nn.Parameter((spread + torch.rand(width, n_taps) - 0.5).clamp(0, window - 1))
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.gaussian_at_inference = False  # ablation: keep interpolated taps when not training
        self.rounded = False  # training's final phase: the integer delays inference reads
        self._kernel, self._kernel_key = None, None

    def clamp_positions(self):
        with torch.no_grad():
            self.positions.clamp_(0, self.window - 1)

    def set_rounded(self, on: bool):
        """From now on train on the integer delays: positions frozen at their rounded values."""
        if on and not self.rounded:
            with torch.no_grad():
                self.positions.round_()
        self.positions.requires_grad_(not on)
        self.rounded = on

    def delays(self) -> torch.Tensor:
        """Integer delay of every tap, (width, n_taps): what inference reads."""
        return self.positions.detach().round().long()

    def kernel(self) -> torch.Tensor:
        """(width, window) weights, index d multiplies the input from d steps ago."""
        d = torch.arange(self.window, device=self.weight.device, dtype=self.weight.dtype)
        if self._gaussian():
            g = torch.exp(-0.5 * ((d - self.positions[..., None]) / self.sigma) ** 2)
            g = g / (g.sum(-1, keepdim=True) + 1e-8)
        else:
            g = (d == self.delays()[..., None].to(d.dtype)).to(d.dtype)
        return (self.weight[..., None] * g).sum(1)

    def _gaussian(self) -> bool:
        return (self.training and not self.rounded) or self.gaussian_at_inference

    def forward(self, x: torch.Tensor, line: torch.Tensor | None = None):
        """x (B, T, C) -> (y (B, T, C), line). `line` (B, window-1, C) holds the inputs before x,
        oldest first (zeros if None); the line returned holds the last window-1 inputs."""
        B, T, C = x.shape
        if line is None:
            line = x.new_zeros(B, self.window - 1, C)
        xs = torch.cat([line, x], dim=1)
        kernel = self._oldest_first_kernel()
        if B * T <= UNFOLD_MAX_STEPS:
            # A stream's short chunk: one multiply-and-sum over each step's window costs a
            # quarter of what conv1d's set-up does there.
            y = (xs.unfold(1, self.window, 1) * kernel).sum(-1)
        else:
            y = F.conv1d(xs.transpose(1, 2), kernel[:, None, :], groups=C)
            y = y.transpose(1, 2).contiguous()  # the ops that follow run several times slower on a strided view
        return y, xs[:, T:]

    def _oldest_first_kernel(self) -> torch.Tensor:
        """kernel() in time order, as conv1d reads it. At inference it is kept between calls
        (streaming asks on every chunk) and redone when the weights or positions change."""
        if self.training or self.gaussian_at_inference:
            return self.kernel().flip(-1)
        key = tuple((p.data_ptr(), p._version) for p in (self.weight, self.positions))
        if key != self._kernel_key:
            with torch.inference_mode(False), torch.no_grad():  # usable outside inference mode
                self._kernel = self.kernel().flip(-1).contiguous()
            self._kernel_key = key
        return self._kernel


# ----------------------------------------------------------------------------- minGRU

def _g(x: torch.Tensor) -> torch.Tensor:
    """x + 1/2 for x >= 0, sigmoid(x) below: positive, so scans can run in log space. The larger
    of the two is always the right one (they meet at 0, where sigmoid's slope is 1/4 < 1)."""
    return torch.maximum(x + 0.5, torch.sigmoid(x))


def _log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x), computed without taking the log of a sigmoid."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


# The longest sequence that runs step by step rather than by the parallel scan (see MinGRU):
# on a GPU, chunks of a stream; on a CPU, any chunk, and whole sequences up to this many steps.
STEPWISE_MAX_STEPS = 16
CPU_STEPWISE_MAX_STEPS = 2000


class MinGRU(nn.Module):
    """h_t = (1 - z_t) * h_{t-1} + z_t * g(W_h x_t), z_t = sigmoid(W_z x_t)."""

    def __init__(self, width: int):
        super().__init__()
        self.to_gate_and_candidate = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None,
                stepwise: bool | None = None) -> torch.Tensor:
        """x (B, T, H) -> hidden states (B, T, H), continuing from h0 (B, H) (zeros if None).

        Two exact ways through time: step by step, or the log-space parallel scan; `stepwise`
        None takes the cheaper one for the device (`kws bench model` times both). A GPU trains
        with the scan, since each step's kernels cost more than their work, and steps only short
        chunks of a stream. On a CPU the float64 scan costs more than stepping, for training's
        150-step examples as for a stream's chunks; it runs only whole sequences longer than
        CPU_STEPWISE_MAX_STEPS (the paper preset's 24,000)."""
        k, v = self.to_gate_and_candidate(x).chunk(2, dim=-1)
        if self.runs_stepwise(x, h0) if stepwise is None else stepwise:
            z = torch.sigmoid(k)
            return self.recurrence(z, _g(v), torch.zeros_like(z[:, 0]) if h0 is None else h0)
        log_keep = -F.softplus(k)  # log(1 - z)
        log_values = -F.softplus(-k) + _log_g(v)  # log(z * g(v))
        return self.scan(log_keep, log_values, h0)

    @staticmethod
    def runs_stepwise(x: torch.Tensor, h0: torch.Tensor | None) -> bool:
        if x.device.type == "cpu":
            return h0 is not None or x.shape[1] <= CPU_STEPWISE_MAX_STEPS
        return h0 is not None and x.shape[1] <= STEPWISE_MAX_STEPS

    @staticmethod
    def recurrence(z: torch.Tensor, g: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """h_t = (1 - z_t) h_{t-1} + z_t g_t one step at a time from h0: (B, T, H) states."""
        hs = []
        for z_t, g_t in zip(z.unbind(1), g.unbind(1)):
            h0 = torch.lerp(h0, g_t, z_t)
            hs.append(h0)
        return torch.stack(hs, dim=1)

    @staticmethod
    def scan(log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor | None = None):
        """h for h_t = a_t h_{t-1} + b_t from h_{-1} = h0 (zeros if None), given log a and log b:
        cumulative sums, no loop over time. h_t = A_t h0 + sum_s (A_t / A_s) b_s, A_t = prod a.

        In float64: log A_t falls without bound over long sequences, and float32 would lose the
        small log h in the difference of two large numbers."""
        a_star = torch.cumsum(log_a.double(), dim=1)
        h = torch.exp((a_star + _logcumsumexp(log_b.double() - a_star)).to(log_a.dtype))
        if h0 is not None:
            h = h + (torch.exp(a_star) * h0.double()[:, None]).to(h.dtype)
        return h


def _logcumsumexp(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """torch.logcumsumexp over dim 1 of (B, T, H) float64, several times faster on CPUs: plain
    cumulative sums of exp inside blocks of `block` steps (float64 keeps their range), then the
    blocks' running totals combined with one short logcumsumexp."""
    B, T, H = x.shape
    pad = -T % block
    xb = F.pad(x, (0, 0, 0, pad), value=-math.inf).view(B, -1, block, H)
    m = xb.amax(2, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    sums = torch.cumsum(torch.exp(xb - m), dim=2)
    if sums.amin() < 1e-280:
        # A step far below a later one in its block underflowed in exp (gates saturated beyond
        # anything trained, e.g. |W_z x| > 40 for a block): the exact, slower path.
        return torch.logcumsumexp(x, dim=1)
    within = torch.log(sums) + m
    before = torch.logcumsumexp(within[:, :, -1], dim=1)
    before = F.pad(before[:, :-1], (0, 0, 1, 0), value=-math.inf)
    before = before[:, :, None].expand_as(within)
    # logaddexp(-inf, -inf) is nan: the first block has nothing before it.
    out = torch.where(torch.isinf(before), within, torch.logaddexp(within, before))
    return out.reshape(B, -1, H)[:, :T]


# ----------------------------------------------------------------------------- layer, model

class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.width
        self.cfg = cfg
        self.delay = DelayConv(H, cfg.delay_window, cfg.n_taps, cfg.sigma_start) if cfg.use_delay else None
        self.delay_norm = nn.LayerNorm(H) if cfg.use_delay else None
        self.mingru = MinGRU(H) if cfg.use_mingru else None
        self.mingru_out = nn.Sequential(nn.Linear(H, H), nn.LayerNorm(H)) if cfg.use_mingru else None
        self.mlp = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(H)

    def forward(self, x, state: list[torch.Tensor] | None = None):
        """x (B, T, H). With `state` [delay line, hidden], returns (y, new state)."""
        line, h = state if state is not None else (None, None)
        if self.delay is not None:
            d, line = self.delay(x, line)
            x = x + self._dropout(self.delay_norm(d))
        if self.mingru is not None:
            hs = self.mingru(x, h)
            h = hs[:, -1]
            x = x + self._dropout(self.mingru_out(hs))
        x = self.norm(x + self._dropout(self.mlp(x)))
        return x, ([line, h] if state is not None else None)

    def _dropout(self, x):
        return self.drop(x) if self.training else x  # skips a call per use: streaming is op-bound


class MGRADE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_classes < 2:
            raise ValueError("a classifier needs at least two labels")
        self.cfg = cfg
        self.frontend = Frontend(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.decoder = nn.Linear(cfg.width, cfg.n_classes)
        # Per-word detection thresholds chosen for these weights on validation streams (`kws
        # eval-stream --choose-thresholds`; kept in the checkpoint's meta): the Detector's
        # defaults. Empty for a model not tuned, which then uses kws.stream.DEFAULT_THRESHOLD.
        self.thresholds: dict[str, float] = {}
        # The readout those thresholds were chosen with: a word's score is the lower of its
        # probability over the last second and over this many seconds (0: the last second alone;
        # kws.stream.Detector). It travels with the thresholds, in the meta and the model file.
        self.long_window_s = 0.0
        # The licence of these weights (an SPDX id; kept in the checkpoint's meta).
        self.license = PROJECT_LICENSE
        self._primed, self._primed_key = None, None

    # -- whole sequences (training, evaluation)
    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, T) -> per-step logits (B, T // stride, n_classes), all steps at once."""
        return self.decoder(self.features(audio))

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """audio (B, T) -> the last layer's outputs (B, T // stride, width): what the decoder
        reads, and what representation distillation projects onto a teacher's embedding."""
        x = self.frontend.encode(F.pad(audio, (self.frontend.history, 0)))
        for layer in self.layers:
            x, _ = layer(x)
        return x

    def classify(self, audio: torch.Tensor) -> torch.Tensor:
        """Whole-clip logits (B, n_classes): the mean of the clip's per-step logits, the clip
        heard as in a running stream, after `clip_context_s` of silence. That silence leaves
        the same state every time, so it is computed once and the clip continues from it."""
        logits, _ = self.stream(audio, self.primed_state(audio.shape[0]))
        return logits.mean(dim=1)

    def _weights_key(self) -> tuple:
        """Changes whenever the weights (or train/eval mode) do: the key of what is derived from
        them and kept between calls."""
        return tuple((p.data_ptr(), p._version) for p in self.parameters()) + (self.training,)

    def primed_state(self, batch_size: int = 1) -> list[torch.Tensor]:
        """The stream state after `clip_context_s` of silence, kept until the weights change."""
        key = self._weights_key()
        if key != self._primed_key:
            context = self.cfg.context_samples
            # Normal tensors even when first asked inside inference mode, for later callers.
            with torch.inference_mode(False), torch.no_grad():
                p = next(self.parameters())
                _, self._primed = self.stream(p.new_zeros(1, context), self.initial_state(1))
            self._primed_key = key
        return [None if t is None else t.expand(batch_size, *t.shape[1:]) for t in self._primed]

    # -- streams (listening)
    def initial_state(self, batch_size: int = 1) -> list[torch.Tensor]:
        """Everything a stream carries: unconsumed audio, then a delay line and hidden per layer."""
        p = next(self.parameters())
        state = [p.new_zeros(batch_size, self.frontend.history)]
        for layer in self.layers:
            line = p.new_zeros(batch_size, self.cfg.delay_window - 1, self.cfg.width) if layer.delay else None
            h = p.new_zeros(batch_size, self.cfg.width) if layer.mingru else None
            state += [line, h]
        return state

    def stream(self, chunk: torch.Tensor, state: list[torch.Tensor]):
        """chunk (B, n) samples of any length -> (logits (B, steps completed, n_classes), state).

        Fed in any chunking, a signal gives the same per-step logits as `forward` on all of it.
        """
        audio = torch.cat([state[0], chunk.to(state[0].dtype)], dim=1)
        steps = (audio.shape[1] - self.frontend.history) // self.cfg.stride
        new_state = [audio[:, steps * self.cfg.stride:]]
        if steps == 0:
            return audio.new_zeros(chunk.shape[0], 0, self.cfg.n_classes), new_state + state[1:]
        x = self.frontend.encode(audio[:, : self.frontend.history + steps * self.cfg.stride])
        for i, layer in enumerate(self.layers):
            x, layer_state = layer(x, state[1 + 2 * i: 3 + 2 * i])
            new_state += layer_state
        return self.decoder(x), new_state

    def inference_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(description, arrays): what inference needs, as JSON-ready values and NumPy arrays,
        for the torch-free engine (kws.runtime documents the names) and `kws export`. Delays
        are read as inference reads them: integer taps, or Gaussians when that ablation is on."""
        if self.training:
            raise ValueError("inference arrays come from a model in eval mode: call model.eval() first")
        eps = {m.eps for m in self.modules() if isinstance(m, nn.LayerNorm)}
        if len(eps) != 1:
            raise ValueError("the engine takes one LayerNorm eps for the whole model")
        arrays = {}

        def put(name: str, tensor: torch.Tensor):
            arrays[name] = tensor.detach().cpu().float().numpy().copy()

        fe = self.frontend
        put("frontend.weight", fe.conv.weight.flatten(1))
        if fe.conv.bias is not None:
            put("frontend.bias", fe.conv.bias)
        if self.cfg.frontend == "gabor":
            put("frontend.proj.weight", fe.proj.weight)
            put("frontend.proj.bias", fe.proj.bias)
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            if layer.delay is not None:
                with torch.no_grad():
                    put(prefix + "delay.kernel", layer.delay.kernel())
                put(prefix + "delay_norm.weight", layer.delay_norm.weight)
                put(prefix + "delay_norm.bias", layer.delay_norm.bias)
            if layer.mingru is not None:
                linear, norm = layer.mingru_out
                put(prefix + "mingru.weight", layer.mingru.to_gate_and_candidate.weight)
                put(prefix + "mingru.bias", layer.mingru.to_gate_and_candidate.bias)
                put(prefix + "mingru_out.weight", linear.weight)
                put(prefix + "mingru_out.bias", linear.bias)
                put(prefix + "mingru_norm.weight", norm.weight)
                put(prefix + "mingru_norm.bias", norm.bias)
            norm_in, fc1, _, fc2 = layer.mlp
            for name, module in (("mlp_norm", norm_in), ("mlp.fc1", fc1), ("mlp.fc2", fc2), ("norm", layer.norm)):
                put(prefix + name + ".weight", module.weight)
                put(prefix + name + ".bias", module.bias)
        put("decoder.weight", self.decoder.weight)
        put("decoder.bias", self.decoder.bias)
        description = {"model": asdict(self.cfg), "layer_norm_eps": eps.pop(),
                       "parameters": parameter_count(self), "license": self.license}
        if self.thresholds:
            description["thresholds"] = dict(self.thresholds)
        if self.long_window_s:
            description["long_window_s"] = self.long_window_s
        return description, arrays

    # -- training helpers
    def set_sigma(self, progress: float):
        """Anneal the Gaussian tap width geometrically from sigma_start to sigma_end."""
        p = min(max(progress, 0.0), 1.0)
        sigma = self.cfg.sigma_start * (self.cfg.sigma_end / self.cfg.sigma_start) ** p
        for layer in self.layers:
            if layer.delay is not None:
                layer.delay.sigma.fill_(sigma)

    def clamp_positions(self):
        for layer in self.layers:
            if layer.delay is not None:
                layer.delay.clamp_positions()

    def set_rounded_delays(self, on: bool):
        """Training's final phase: every tap at its integer delay, as inference reads it."""
        for layer in self.layers:
            if layer.delay is not None:
                layer.delay.set_rounded(on)

    def set_gaussian_at_inference(self, on: bool):
        for layer in self.layers:
            if layer.delay is not None:
                layer.delay.gaussian_at_inference = on


# ----------------------------------------------------------------------------- sizes

def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_bytes(cfg: ModelConfig, bytes_per_value: int = 4) -> int:
    """Largest stream state for one stream: unconsumed audio (< kernel samples), and per layer
    a delay line of window-1 steps and one hidden vector, each `width` wide."""
    audio = cfg.frontend_kernel - 1
    per_layer = cfg.width * ((cfg.delay_window - 1) * cfg.use_delay + cfg.use_mingru)
    return bytes_per_value * (audio + cfg.n_layers * per_layer)


def footprint_bytes(model: "MGRADE") -> int:
    """Inference memory of the model: its parameters plus one stream's state."""
    return parameter_bytes(model) + state_bytes(model.cfg)


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(KwsError):
    """A file that is not a readable kws checkpoint."""


def save_model(model: MGRADE, path: "str | Path", meta: dict | None = None):
    """Weights as plain tensors and the config as JSON text: loading unpickles no code."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": json.dumps(asdict(model.cfg)),
        "meta": json.dumps(meta or {}),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # a crash mid-write never leaves a half checkpoint behind


def read_checkpoint(path: "str | Path") -> tuple[ModelConfig, dict, dict]:
    """(config, state_dict, meta) from a checkpoint, or CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no model file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged zips and pickles
        raise CheckpointError(f"{path} is damaged or not a kws checkpoint ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a kws checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, "
                              f"this kws reads version {CHECKPOINT_VERSION}")
    if not isinstance(payload.get("config"), str):
        raise CheckpointError(f"{path} has no config")
    try:
        cfg = _config_from_json(payload["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid config: {e}") from None
    try:
        meta = json.loads(payload.get("meta", "{}"))
    except (TypeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has invalid metadata (not a JSON object)")
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no weights")
    return cfg, state_dict, meta


def _config_from_json(text: str) -> ModelConfig:
    """The config saved as JSON, each known field checked against its default's type (a foreign
    file must fail here, not deep inside the model); unknown fields are ignored."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    values = {}
    for f in fields(ModelConfig):
        if f.name not in raw:
            continue
        value, default = raw[f.name], f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, str)):
            ok = isinstance(value, type(default)) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:  # labels
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            raise ValueError(f"field {f.name!r} has the wrong type ({value!r})")
        values[f.name] = value
    return ModelConfig(**values)


def _weight_mismatch(model: MGRADE, state_dict: dict) -> str:
    """What keeps `state_dict` from loading into `model`, in a few words ('' if nothing)."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"{k} is {tuple(v.shape)}, the config needs {tuple(expected[k].shape)}"
                 for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if not problems:
        problems = [f"{k} is not finite" for k, v in state_dict.items()
                    if v.is_floating_point() and not torch.isfinite(v).all()]
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def average_models(paths: "list[str | Path]") -> tuple[MGRADE, dict]:
    """(model, meta): the uniform average of the weights of several fine-tunes of one model (a
    "model soup", Wortsman et al. 2022), with every tap at the rounded mean of its positions, an
    integer delay as inference reads it, run with the first checkpoint's settings (fine-tunes may
    change what does not change the shape, such as `power_floor`). Per-word thresholds and their
    long window are not carried over: they belong to one set of weights and are chosen again for
    the average."""
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    checkpoints = [read_checkpoint(p) for p in paths]
    models = [_model_from(p, *checkpoint) for p, checkpoint in zip(paths, checkpoints)]
    first = models[0]
    for path, model in zip(paths[1:], models[1:]):
        if model.cfg.labels != first.cfg.labels or _weight_mismatch(first, model.state_dict()):
            raise CheckpointError(f"{path} is not the same model as {paths[0]} (labels or weight "
                                  f"shapes differ): only fine-tunes of one model can be averaged")
        if model.license != first.license:
            raise CheckpointError(f"{path} is under {model.license}, {paths[0]} under "
                                  f"{first.license}: weights under different licences are not averaged")
    states = [m.state_dict() for m in models]
    average = {}
    for name, value in states[0].items():
        stacked = torch.stack([s[name].float() for s in states]).mean(0)
        average[name] = stacked.round() if name.endswith(".positions") else stacked.to(value.dtype)
    model = MGRADE(first.cfg)
    model.load_state_dict(average)
    model.license = first.license
    sources = [{"path": str(p), **{k: v for k, v in meta.items()
                                   if k not in ("thresholds", "long_window_s")}}
               for p, (_, _, meta) in zip(paths, checkpoints)]
    return model.eval(), {"averaged": sources, "license": first.license}


def load_model(path: "str | Path") -> MGRADE:
    """A ready-to-run model in eval mode (integer delays) from a checkpoint file."""
    return _model_from(path, *read_checkpoint(path))


def _model_from(path: "str | Path", cfg: ModelConfig, state_dict: dict, meta: dict) -> MGRADE:
    """The model of a checkpoint read by read_checkpoint, its weights, thresholds, long window and
    licence checked."""
    try:
        model = MGRADE(cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} has an invalid config: {e}") from None
    mismatch = _weight_mismatch(model, state_dict)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not match its config: {mismatch}")
    model.load_state_dict(state_dict)
    thresholds = meta.get("thresholds", {})
    problem = threshold_problem(thresholds, cfg.labels)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    model.thresholds = dict(thresholds)
    model.long_window_s = meta.get("long_window_s", 0.0)
    problem = long_window_problem(model.long_window_s)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    model.license = meta.get("license", PROJECT_LICENSE)
    problem = license_problem(model.license)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return model.eval()
