# The image every pod of k8s/rayjob.yaml and k8s/raycluster.yaml runs: Ray's own image (the Ray and Python of
# requirements.lock) with the project installed at the locked versions. From the repository root:
#   docker build -t REGISTRY/mnist-pipeline:0.1.0 .                                # head and CPU workers
#   docker build --build-arg VARIANT=-gpu -t REGISTRY/mnist-pipeline:0.1.0-gpu .   # GPU workers (CUDA)
# The tag is the project's version (pyproject.toml); tests/test_kubernetes.py keeps this file, requirements.lock
# and the manifests in agreement.

# "" (Ray's CPU image) or "-gpu" (Ray's CUDA image, plus TensorFlow's CUDA libraries below)
ARG VARIANT=""
FROM rayproject/ray:2.60.0-py311${VARIANT}
# an ARG before FROM is not visible after it unless declared again
ARG VARIANT=""

# the project lives here, owned by Ray's unprivileged user (the image's USER, who also owns its Python), so that
# pip may build in it; the RayJob's entrypoint names configs/ under it
RUN mkdir -p /home/ray/mnist-pipeline
WORKDIR /home/ray/mnist-pipeline

# dependencies first (their layer is reused while only the code changes): exactly the versions of the lock;
# the GPU variant adds TensorFlow's CUDA and cuDNN wheels, whose versions the locked tensorflow pins
COPY --chown=ray:users requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock \
    && if [ "$VARIANT" = "-gpu" ]; then \
        pip install --no-cache-dir "tensorflow[and-cuda]==$(sed -n 's/^tensorflow==//p' requirements.lock)"; \
    fi

# the project itself (.dockerignore keeps .venv, runs and caches out), without touching the locked dependencies
COPY --chown=ray:users . ./
RUN pip install --no-cache-dir --no-deps . \
    && python -m pipeline config --config configs/kubernetes.yaml > /dev/null
