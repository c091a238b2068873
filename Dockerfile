# kws service image for edge boards: linux/arm64 (Raspberry Pi 4/5, 64-bit OS) and linux/amd64.
#   docker build -t kws .                 (or: docker compose up --build)
#   docker buildx build --platform linux/arm64 -t kws:arm64 --load .
# The runtime only: NumPy runs the model from the torch-free file `kws export` made
# (models/mgrade-edge.npz); torch is for training and is not in the image.

FROM python:3.11-slim AS builder

# A venv without pip or setuptools (24 MB the service never uses): the base image's pip
# installs into it.
RUN python -m venv --without-pip /opt/venv

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kws ./kws
COPY app ./app
COPY models/mgrade-edge.npz ./models/
# The model file is installed with the package, into /opt/venv/share/kws/models.
RUN pip --python /opt/venv/bin/python install --no-cache-dir /src


FROM python:3.11-slim

# libportaudio2: sounddevice's microphone input (ALSA through /dev/snd).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libportaudio2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --system --uid 10001 --user-group --groups audio --no-create-home --home-dir /app kws

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    KWS_MODEL=/opt/venv/share/kws/models/mgrade-edge.npz

# numeric, so runtimes that require a non-root uid (runAsNonRoot) can verify it
USER 10001
WORKDIR /app
EXPOSE 8000

# slim has no curl: python's urllib fails (exit 1) on anything but a 2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('KWS_PORT', '8000'), timeout=4)"]

# Listens to the microphone passed in with /dev/snd; without one it serves /predict only.
CMD ["kws", "serve", "--host", "0.0.0.0", "--listen"]
