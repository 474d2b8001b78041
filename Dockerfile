# The one image every Kubeflow step runs in: Debian bookworm's Python 3.11, the project and
# its pinned dependencies (no test extras) in /opt/venv, run as a non-root user.
#
#     docker build -t ghcr.io/skinlesion/skinlesion:0.1.0 .     # any machine with Docker
#     make image                                                # here: buildah, see README
#
# torch/torchvision come from PyPI at pyproject's pins: the CUDA build, whose wheels carry
# the CUDA libraries, so the base needs no CUDA of its own (the cluster node needs the NVIDIA
# driver only). The base is any Debian bookworm with python3 3.11 and ca-certificates:
# python:3.11-slim-bookworm (python3 in /usr/local/bin) or, where Docker Hub is out of
# reach, a debootstrap-made one (python3 in /usr/bin); `python3 -m venv` works on both.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# pyproject's dependency list alone, so that the dependency layer below is reused whenever
# the list is unchanged (a new version, entry point or package layout does not reinstall).
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml /tmp/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt

FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# git: the data step's DVC clones the dataset's git repository (pipeline/data.py).
# ca-certificates comes with the base and is left as it is: a build that mounts the host's
# CA bundle over /etc/ssl/certs (see image/build.sh) cannot reconfigure it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash skinlesion \
    && python3 -m venv /opt/venv

WORKDIR /app

# Dependencies first, so that a code change does not reinstall them.
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself, without extras (pytest and moto stay out), then checks from / (not
# the sources in /app) that the installed packages import with pyproject's torch.
COPY model/ model/
COPY components/ components/
COPY pipeline/ pipeline/
COPY pyproject.toml README.md params.yaml ./
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info \
    && cd / && python3 -c "import tomllib, torch, torchvision, kfp, dvc, mlflow, model, components, pipeline; \
pin = [d.split('==')[1] for d in tomllib.load(open('/app/pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('torch==')][0]; \
assert torch.__version__.split('+')[0] == pin, f'torch {torch.__version__} != pyproject torch=={pin}'" \
    && git --version \
    && chown -R skinlesion:skinlesion /app

USER skinlesion
ENV HOME=/home/skinlesion \
    TORCH_HOME=/home/skinlesion/.cache/torch \
    MPLCONFIGDIR=/home/skinlesion/.cache/matplotlib

# The build's last step: the console command runs, as the non-root user.
RUN skinlesion --help

CMD ["skinlesion", "--help"]
