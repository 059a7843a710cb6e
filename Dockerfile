# syntax=docker/dockerfile:1
# scribefarm images (docs/deploy.md says how to build, run and size them):
#
#   server           the board alone (FastAPI, PostgreSQL client, S3): python slim, ~0.3 GB
#   farm             the board and a CPU worker in one image, what fly.toml deploys: ~1 GB
#                    plus a baked model
#   worker           a GPU worker: CUDA 12 runtime + cuDNN 9 (what CTranslate2 >= 4.5
#                    needs), faster-whisper: ~4 GB
#   worker-whisperx  a GPU worker with the whisperx engine too (torch 2.8 brings its own
#                    CUDA libraries, which faster-whisper then uses): ~8 GB
#
# The install steps are ./dev's: `pip install -c deploy/constraints.txt ".[extras]"`,
# the versions the test suite ran with (deploy/lock.py), and whisperx's own pins for
# worker-whisperx, as in ./dev's whisperx environment; and, for every worker, the voice
# encoder's weights from Resemblyzer's wheel without its dependencies (./dev's VOICE_ENCODER).
#
# Models: a name (SCRIBEFARM_MODEL=small.en) is fetched at first start into /models
# (mount a volume there to keep it); `--build-arg MODEL=small.en` bakes it into the image
# instead; a mounted CTranslate2 directory works too (SCRIBEFARM_MODEL=/models/my-model).

# --- the project's files, once ------------------------------------------------------
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY deploy/constraints.txt deploy/fetch_model.py /src/deploy/
COPY server /src/server
COPY worker /src/worker
COPY shared /src/shared
COPY migrations /src/migrations

# --- Python images (Debian, the Python CI tests with) ----------------------------------
FROM python:3.11-slim-bookworm AS python-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY --from=source /src /src
WORKDIR /src

FROM python-build AS server-build
RUN /opt/venv/bin/pip install --no-cache-dir -c deploy/constraints.txt ".[server]"

FROM python-build AS farm-build
RUN /opt/venv/bin/pip install --no-cache-dir -c deploy/constraints.txt ".[server,worker,models]" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps resemblyzer==0.1.4
ARG MODEL=""
# A model named at build time is baked in, so a new machine starts without downloading.
RUN mkdir -p /opt/models \
    && if [ -n "$MODEL" ]; then /opt/venv/bin/python deploy/fetch_model.py "$MODEL" /opt/models; fi

FROM python:3.11-slim-bookworm AS python-runtime
RUN groupadd --gid 10001 scribefarm \
    && useradd --create-home --uid 10001 --gid 10001 scribefarm \
    && mkdir /data /models && chown 10001:10001 /data /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    SCRIBEFARM_DATA_DIR=/data HF_HOME=/models SCRIBEFARM_LOG_FORMAT=json

FROM python-runtime AS server
COPY --from=server-build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000
CMD ["scribefarm", "server", "--host", "0.0.0.0", "--port", "8000"]

FROM python-runtime AS farm
COPY --from=farm-build /opt/venv /opt/venv
COPY --from=farm-build /opt/models /opt/models
ARG MODEL=""
ENV SCRIBEFARM_MODEL=${MODEL:+/opt/models/${MODEL}}
USER 10001:10001
EXPOSE 8000
CMD ["scribefarm", "server", "--host", "0.0.0.0", "--port", "8000"]

# --- GPU worker: CUDA 12 runtime + cuDNN 9 (Ubuntu 24.04, Python 3.12) ----------------
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS cuda-python
# Versions of Ubuntu's python3 come with the base image's release; pinning them here
# would break on every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-python AS worker-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
COPY --from=source /src /src
WORKDIR /src
RUN /opt/venv/bin/pip install --no-cache-dir -c deploy/constraints.txt ".[worker,models]" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps resemblyzer==0.1.4
ARG MODEL=""
RUN mkdir -p /opt/models \
    && if [ -n "$MODEL" ]; then /opt/venv/bin/python deploy/fetch_model.py "$MODEL" /opt/models; fi

FROM cuda-python AS worker
RUN groupadd --gid 10001 scribefarm \
    && useradd --create-home --uid 10001 --gid 10001 scribefarm \
    && mkdir /models && chown 10001:10001 /models
COPY --from=worker-build /opt/venv /opt/venv
COPY --from=worker-build /opt/models /opt/models
ARG MODEL=""
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HOME=/models \
    SCRIBEFARM_LOG_FORMAT=json SCRIBEFARM_MODEL=${MODEL:+/opt/models/${MODEL}}
USER 10001:10001
CMD ["scribefarm", "worker"]

# --- GPU worker with whisperx: torch's pip wheels carry CUDA 12 and cuDNN 9 -------------
FROM python-build AS whisperx-build
RUN /opt/venv/bin/pip install --no-cache-dir ".[worker,models,whisperx]" \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps resemblyzer==0.1.4

FROM python-runtime AS worker-whisperx
COPY --from=whisperx-build /opt/venv /opt/venv
# CTranslate2 (faster-whisper) loads cuBLAS and cuDNN from torch's NVIDIA wheels.
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYANNOTE_METRICS_ENABLED=false
USER 10001:10001
CMD ["scribefarm", "worker", "--engine", "whisperx"]
