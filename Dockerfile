# syntax=docker/dockerfile:1.7
# The image for cluster nodes: Ray head and workers (`ray up`, KubeRay), SLURM nodes through a
# container runtime. CUDA runtime + the locked environment (uv.lock, `uv sync --frozen`) + the
# project, run as a non-root user. See cluster/README.md:
#
#   docker build -t REGISTRY/wsol:TAG .
#   docker push REGISTRY/wsol:TAG
#   docker run --rm --gpus all REGISTRY/wsol:TAG python jobs/train_imagenet.py --use-gpu --num-workers 1
#
# The wheels in uv.lock (torch, nvidia-dali-cuda130) bring their own CUDA 13 libraries; the base
# image gives the CUDA 13 runtime they expect and the driver hooks of the NVIDIA container runtime.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.9.5

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG USER_NAME=wsol
ARG USER_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RAY_ENABLE_UV_RUN_RUNTIME_ENV=0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# wget: KubeRay's health probes; procps: Ray's process checks; libgl/glib: OpenCV/matplotlib.
# Versions follow the base image's release (pinning them breaks every base-image update).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates wget procps libgomp1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /uvx /usr/local/bin/

# Ubuntu images ship a user with UID 1000: replace it with the project's user.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid "${USER_UID}" --shell /bin/bash "${USER_NAME}"

WORKDIR /app

# The locked dependencies first (a layer that changes only with uv.lock), then the project.
RUN uv python install "${PYTHON_VERSION}"
COPY pyproject.toml uv.lock README* ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --python "${PYTHON_VERSION}"
COPY . .
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --python "${PYTHON_VERSION}" \
    && python -c "import wsol_core, ray, torch, mlflow, submitit; print('wsol image ok, ray', ray.__version__, 'torch', torch.__version__)" \
    && chown "${USER_NAME}:${USER_NAME}" /app

USER ${USER_NAME}
ENV HOME=/home/${USER_NAME} \
    WSOL_STORAGE_PATH=/home/${USER_NAME}/wsol_runs

# Ray's head and workers are started by `ray up` / KubeRay / cluster/launch_slurm.py with their own
# commands; alone, the image runs the training job's embedded default.
CMD ["python", "jobs/train_imagenet.py"]
