# The one image every Kubeflow step runs in: a CUDA PyTorch runtime plus this project
# (no dev/test extras), run as a non-root user. Build from the project root:
#
#     docker build -t ghcr.io/skinlesion/skinlesion:0.1.0 .
#
# The base image must carry the torch that pyproject.toml pins (torch==2.14.1, CUDA 13.0
# build, as in the development venv) so that pip keeps it instead of fetching another.
# The tag follows pytorch/pytorch's <torch>-cuda<cuda>-cudnn<cudnn>-runtime scheme; it was
# written offline and could not be checked against the registry: confirm it with
# `docker manifest inspect` before the first build, and change only this ARG.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

RUN useradd --create-home --uid 1000 --shell /bin/bash skinlesion
WORKDIR /app

# Dependencies first, read from pyproject.toml itself, so that a code change does not
# reinstall them. torch/torchvision are already in the base image at the pinned versions.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (no extras: pytest and moto stay out of the image), then a check that
# the installed package imports (from / , not the sources in /app) with the base image's
# torch being the one pyproject.toml pins.
COPY model/ model/
COPY components/ components/
COPY pipeline/ pipeline/
COPY params.yaml ./
RUN pip install --no-cache-dir --no-deps . \
    && cd / && python -c "import tomllib, torch, components.cli, model, pipeline.data; \
pin = [d.split('==')[1] for d in tomllib.load(open('/app/pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('torch==')][0]; \
assert torch.__version__.split('+')[0] == pin, f'base image torch {torch.__version__} != pyproject torch=={pin}'" \
    && chown -R skinlesion:skinlesion /app

USER skinlesion
ENV HOME=/home/skinlesion \
    TORCH_HOME=/home/skinlesion/.cache/torch \
    MPLCONFIGDIR=/home/skinlesion/.cache/matplotlib

CMD ["skinlesion", "--help"]
