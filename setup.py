"""Build script for flexmoe_kernels.

Pure-Python packages always install. The optional CUDA extension ``flexmoe_kernels._C``
(csrc/) is built by the section marked CUDA EXTENSION below when nvcc is found.
"""
from __future__ import annotations

from setuptools import find_packages, setup

# ---------------------------------------------------------------- CUDA EXTENSION
ext_modules: list = []
cmdclass: dict = {}
# (filled in by csrc/ build support)
# ---------------------------------------------------------------- /CUDA EXTENSION

setup(
    name="flexmoe_kernels",
    version="0.1.0",
    description="Kernels, modules and training for FlexOlmo-style mixture-of-experts",
    python_requires=">=3.11",
    packages=find_packages(include=["flexmoe_kernels", "flexmoe_kernels.*"])
    + ["flexmoe_training"]
    + ["flexmoe_training." + p for p in find_packages(where="training")],
    package_dir={"flexmoe_training": "training"},
    package_data={"flexmoe_kernels": ["configs/*.json"], "flexmoe_training": ["configs/*.json"]},
    install_requires=[
        # torch is not pinned here on purpose: install the build for your machine first
        # (CPU: `pip install torch==2.13.0`), any torch >= 2.11 satisfies this.
        "torch>=2.11",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "train": ["deepspeed>=0.16", "tokenizers", "matplotlib"],
        "bench": ["matplotlib"],
        "test": ["pytest", "transformers>=5", "triton>=3.6", "matplotlib", "tokenizers", "deepspeed>=0.16"],
    },
    entry_points={"console_scripts": ["flexmoe = flexmoe_training.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
