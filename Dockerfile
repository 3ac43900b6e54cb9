# meta_vqa on a CUDA runtime: PyTorch's own image (torch with CUDA 12.4 and cuDNN 9), the package from
# this checkout, `meta-vqa` as the entry point, offline Hugging Face, a non-root user.
#   docker build -t meta-vqa .
#   docker run --gpus all -v "$PWD/data:/work/data" -v "$PWD/runs:/work/runs" meta-vqa \
#       pipeline -c /opt/meta_vqa/conf/easy_vqa/pipeline.yaml
# DDP on all GPUs of the host: add --ipc=host (or --shm-size=8g) for NCCL's shared memory.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/meta_vqa
# the dependencies first, read from pyproject.toml (a layer that survives code changes); the image's
# torch satisfies pyproject.toml's torch floor and is kept
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
# then the package itself (its dependencies are installed: --no-deps) and the configs
COPY meta_vqa ./meta_vqa
COPY conf ./conf
RUN pip install --no-deps . && meta-vqa --help > /dev/null

RUN useradd --create-home --uid 1000 meta && mkdir -p /work && chown meta /work
USER meta
WORKDIR /work
ENTRYPOINT ["meta-vqa"]
CMD ["--help"]
