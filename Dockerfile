# kws service image for edge boards: linux/arm64 (Raspberry Pi 4/5, 64-bit OS) and linux/amd64.
#   docker build -t kws .                 (or: docker compose up --build)
#   docker buildx build --platform linux/arm64 -t kws:arm64 --load .
# amd64 takes torch from PyTorch's CPU wheel index; point TORCH_INDEX_URL elsewhere with
# --build-arg when that index is out of reach (PyPI's x86_64 torch wheels bundle CUDA: GBs).

FROM python:3.11-slim AS builder

# PyPI's aarch64 torch wheels are CPU-only already, so arm64 ignores TORCH_INDEX_URL.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.9.1
ARG TORCHAUDIO_VERSION=2.9.1
ARG TARGETARCH

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is the slow, big download and rarely changes.
RUN if [ "$TARGETARCH" != arm64 ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install --no-cache-dir "torch==$TORCH_VERSION" "torchaudio==$TORCHAUDIO_VERSION"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kws ./kws
COPY app ./app
RUN pip install --no-cache-dir /src \
 && rm -rf /opt/venv/lib/python3.11/site-packages/torch/include  # C++ headers: extensions only


FROM python:3.11-slim

# libportaudio2: sounddevice's microphone input (ALSA through /dev/snd).
# libgomp1: torchaudio's aarch64 library links the system OpenMP runtime, which slim lacks.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libportaudio2 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --groups audio --no-create-home --home-dir /app kws

COPY --from=builder /opt/venv /opt/venv
COPY models/mgrade-edge.pt /app/models/mgrade-edge.pt

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KWS_MODEL=/app/models/mgrade-edge.pt

# numeric, so runtimes that require a non-root uid (runAsNonRoot) can verify it
USER 10001
WORKDIR /app
EXPOSE 8000

# slim has no curl: python's urllib fails (exit 1) on anything but a 2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('KWS_PORT', '8000'), timeout=4)"]

# Listens to the microphone passed in with /dev/snd; without one it serves /predict only.
CMD ["kws", "serve", "--host", "0.0.0.0", "--listen"]
