"""Request and response bodies: what the OpenAPI schema at /openapi.json describes."""

from typing import Literal

from pydantic import BaseModel, Field


class Error(BaseModel):
    """Every 4xx answer: `detail` names the problem."""
    detail: str = Field(examples=["audio is 0.05 s long; at least 0.1 s is needed"])


class Score(BaseModel):
    label: str
    score: float = Field(ge=0, le=1, description="softmax probability")


class Detection(BaseModel):
    time_s: float = Field(description="seconds from the start of the clip or stream")
    label: str
    score: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    label: str = Field(description="the most likely class of the clip read as one 1-s keyword clip: "
                       "a word, or _background_ for silence and noise; the words of a longer clip "
                       "are in detections")
    score: float = Field(ge=0, le=1)
    top: list[Score] = Field(description="the five most likely classes, best first")
    duration_s: float
    sample_rate: int = Field(description="sample rate of the upload, before resampling to 16 kHz")
    latency_ms: float = Field(description="decoding and inference time on the server")
    detections: list[Detection] | None = Field(
        None, description="keyword detections by the streaming detector (clips longer than 1.5 s)")


class LiveDetection(Detection):
    id: int = Field(description="increases by one per detection since start-up")
    at: float = Field(description="Unix time of the detection (seconds)")


class Detections(BaseModel):
    detections: list[LiveDetection]
    now: float = Field(description="server Unix time: pass it as `since` to poll for newer ones")


class LiveScores(BaseModel):
    """The /events `scores` event: the live listener's best scores now."""
    time_s: float = Field(description="stream time of the scores (seconds since the listener "
                                      "started), as a LiveDetection's time_s")
    top: list[Score] = Field(description="the five best words, best first")


class InputLevel(BaseModel):
    """The /events `level` event: the live input's level over the last quarter second."""
    time_s: float = Field(description="stream time, as in LiveScores")
    rms_dbfs: float = Field(description="RMS level in dB below full scale (-120 for silence)")
    peak_dbfs: float = Field(description="peak level in dB below full scale")
    state: Literal["listening", "silent", "clipping"] = Field(
        description="silent: below -60 dBFS RMS (a muted or unplugged microphone); clipping: a "
                    "sample at full scale. A dashboard that gets no level for a while shows "
                    "'no input'.")


class MemorySample(BaseModel):
    at: float = Field(description="Unix time")
    rss_bytes: int = Field(description="resident memory of the process then")


class MemoryHistory(BaseModel):
    interval_s: float = Field(description="seconds between samples")
    samples: list[MemorySample] = Field(description="oldest first, the last ten minutes")


class Listener(BaseModel):
    state: Literal["off", "running", "stopped", "unavailable"] = Field(
        description="off: not asked for; running: listening; stopped: its input file ended (see "
                    "detail when it ended early); unavailable: no usable input device (see detail)")
    detail: str | None = Field(None, description="why the listener is unavailable, or why its input "
                                                 "file ended early")


class DetectorSettings(BaseModel):
    """What the live listener and long /predict clips report (`--threshold`, `--words`)."""
    threshold: float | dict[str, float] = Field(
        description="one probability for every word, or a probability per word")
    words: list[str] = Field(description="the words reported")
    long_window_s: float = Field(
        description="0: a word's score is its probability over the last second; else the lower "
        "of that and its probability over this many seconds (the model's own readout, the one "
        "its thresholds were chosen with)")


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="degraded: the service cannot take work now (see detail)")
    detail: str | None = Field(None, description="why the service is degraded")
    model: str = Field(description="file name of the model being served (a kws export .npz, or a "
                                   "checkpoint converted on loading)")
    model_license: str = Field(description="licence of the served model's weights (SPDX id)")
    listener: Listener
    detector: DetectorSettings


class Stats(BaseModel):
    rss_bytes: int = Field(description="resident memory of the process now")
    peak_rss_bytes: int = Field(description="largest resident memory since start-up")
    model_parameters: int
    model_bytes: int = Field(description="memory of the model parameters")
    stream_state_bytes: int = Field(description="memory of one stream's state")
    audio_queue_depth: int = Field(description="audio blocks waiting for the live listener")
    dropped_frames: int = Field(description="audio frames the live listener could not keep up with")
    at: float = Field(description="server Unix time of these figures (the memory history's clock)")
    uptime_s: float
    requests: dict[str, dict[str, int]] = Field(
        description="HTTP requests answered since start-up, by route and status code",
        examples=[{"/predict": {"200": 41, "422": 2}}])
    in_flight: int = Field(description="requests being answered now")
    detections: int = Field(description="live detections since start-up")
    classify_batches: int = Field(description="batches /predict's clips were classified in")
    classified_clips: int = Field(description="clips classified; over classify_batches, the "
                                  "mean batch size")
    listener: Listener
