"""The service under hostile or broken clients: crafted files, slow uploads, disconnects, bad
HTTP, exposure on a network, SIGTERM. Every case is bounded to a few seconds (short timeouts
set for the test)."""

import math

import numpy as np
import pytest
from test_app import (assert_error, audio_bytes, client, client_for, model_path,  # noqa: F401
                      upload)
from test_audio_decode import noise, silence_flac, unknown_length

from app.schemas import Prediction
from app.settings import Settings


# ----------------------------------------------------------------------------- crafted files

def test_huge_finite_sample_gets_finite_scores_not_a_500(client):  # noqa: F811
    samples = np.zeros(16000, np.float32)
    samples[100] = 3e38
    response = upload(client, audio_bytes(samples=samples, subtype="FLOAT"))
    assert response.status_code == 200, response.text
    result = Prediction.model_validate(response.json())
    assert all(math.isfinite(s.score) for s in result.top)


def test_flac_of_unknown_length_is_accepted(client):  # noqa: F811
    data = unknown_length(audio_bytes(samples=noise(2.0), fmt="FLAC"))
    response = upload(client, data, name="pipe.flac", content_type="audio/flac")
    assert response.status_code == 200, response.text
    assert response.json()["duration_s"] == pytest.approx(2.0)


@pytest.mark.parametrize("data,words", [
    (silence_flac(640_000, 8, 0.5), ["640000 Hz"]),
    (audio_bytes(samples=np.zeros(10, np.float32), rate=1, subtype="FLOAT"), ["1 Hz"]),
    (unknown_length(audio_bytes(samples=noise(3.0), fmt="FLAC")), ["longer than the limit of 2 s"]),
], ids=["640 kHz x 8 channels", "1-Hz WAV posing as 10 s", "unknown length past the limit"])
def test_crafted_file_is_refused_with_422(model_path, data, words):  # noqa: F811
    with client_for(Settings(model=model_path, max_duration_s=2)) as client:
        assert_error(upload(client, data, content_type="audio/flac"), 422, *words)
