# asga-deploy with CUDA and TensorRT: NVIDIA's NGC PyTorch image carries CUDA, a matched torch/torchvision
# build and the TensorRT Python bindings. Pick a recent tag (YY.MM) that matches the host driver.
#
#   docker build -t asga-deploy .
#   # export + TensorRT engine for a policy (mount the policy files and the export bundles):
#   docker run --rm --gpus all -v "$PWD/policies:/work/policies" -v "$PWD/export:/work/export" \
#       asga-deploy export policies/<name>.json --checkpoint export/<name>/finetuned.pt --trt
#   docker run --rm --gpus all -v "$PWD/export:/work/export" asga-deploy profile export/<name>/model.engine
#   # the test suite, TensorRT tests included (they run here: GPU + TensorRT present):
#   docker run --rm --gpus all -w /opt/asga-deploy --entrypoint pytest asga-deploy tests
#   docker run --rm --gpus all -w /opt/asga-deploy --entrypoint pytest asga-deploy -m tensorrt tests
ARG NGC_TAG=25.10
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}-py3

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/asga-deploy
COPY pyproject.toml README.md ./
COPY asga_deploy ./asga_deploy
COPY tests ./tests
COPY policies ./policies

# The CPU machines pin torch/torchvision through constraints.txt; here the image's
# own CUDA builds (and its pip constraints) must stay, so the package goes in with --no-deps and its other
# dependencies, the [onnx] extra and pytest are named explicitly. The [trt] extra (tensorrt) is the image's.
RUN pip install --no-deps . \
 && pip install "typer>=0.12" "rich>=13" "numpy>=1.24" "matplotlib>=3.7" "scipy>=1.9" \
        "onnx>=1.16" "onnxruntime>=1.18" "onnxscript>=0.1" "pytest>=8" \
 && python -c "import tensorrt, torch, torchvision, onnx, onnxruntime, asga_deploy; \
print('tensorrt', tensorrt.__version__, 'torch', torch.__version__, 'asga-deploy', asga_deploy.__version__)"

WORKDIR /work
ENTRYPOINT ["asga"]
CMD ["--help"]
