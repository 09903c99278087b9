# Palimpsest: one image for every role (migrate, api, worker, beat); the command picks it.
#
# This is the CPU image: torch comes from the PyTorch CPU wheel index, which keeps the
# image small and runs anywhere. For GPU workers build from a CUDA runtime base instead
# (e.g. nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 with Python 3.11) and install torch
# from the matching CUDA index (https://download.pytorch.org/whl/cu124); then set
# PALIMPSEST_DEVICE=cuda and run the `gpu` queue on that image.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/palimpsest

# torch first, in its own layer: by far the largest download, and it changes least.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<2.14"

COPY pyproject.toml README.md* alembic.ini ./
COPY migrations ./migrations
COPY workers ./workers
COPY app ./app
# A regular install: the migrations ship as a package, so `palimpsest db upgrade` finds
# them in site-packages.
# The `s3` extra: artifacts may live on S3 or an S3-compatible store (README).
RUN pip install '.[s3]' \
    && python -c "import app.cli, migrations, workers.celery_app"

# Unprivileged user; the beat schedule is written under palimpsest-data/ in the workdir,
# and artifacts plus the signing key live on the shared /data volume.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin palimpsest \
    && mkdir -p /opt/palimpsest/palimpsest-data /data/artifacts \
    && chown -R palimpsest:palimpsest /opt/palimpsest/palimpsest-data /data

ENV PALIMPSEST_ARTIFACT_ROOT=/data/artifacts \
    PALIMPSEST_SIGNING_KEY_FILE=/data/signing-key.pem \
    PALIMPSEST_DEVICE=cpu

USER palimpsest
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]

ENTRYPOINT ["palimpsest"]
# One API process per core by default; PALIMPSEST_API_WORKERS (or --workers) sets it.
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
