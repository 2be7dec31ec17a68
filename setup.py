"""soar_fast: a performance-first trainer for SOAR post-training of rectified-flow MMDiT models.

Install (CPU machines, uses the local CPU torch wheel):   pip install -e ".[test]"
GPU users install a CUDA torch first (see README), then:  pip install -e ".[gpu]"
The optional native op (kernels/) builds with CMake; see README "Kernels".
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup


def _build_native() -> None:
    """Opt-in (SOAR_FAST_BUILD_NATIVE=1): build kernels/ with CMake and put libsoar_fast_native.so in
    soar_fast/ops/_native/, where soar_fast.ops.native looks for it. A plain install builds nothing."""
    here = Path(__file__).resolve().parent
    build = here / "build" / "native"
    subprocess.run(["cmake", "-S", str(here), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DSOAR_PYTHON={sys.executable}"], check=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], check=True)
    dest = here / "soar_fast" / "ops" / "_native"
    dest.mkdir(exist_ok=True)
    shutil.copy2(build / "kernels" / "libsoar_fast_native.so", dest / "libsoar_fast_native.so")


if os.environ.get("SOAR_FAST_BUILD_NATIVE", "0") not in ("", "0"):
    _build_native()

# torch is a range: the README command pins torch==2.13.0 on CPU machines so pip takes the local CPU
# wheel (a bare range would pull a multi-GB CUDA build); GPU users keep their own CUDA torch.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "numpy",
    "safetensors>=0.4",
    "diffusers>=0.32",
    "tqdm",
    "tyro>=0.9",
    "tensorboard",
    "matplotlib",
    "pillow",
    "scikit-learn",
]

EXTRAS = {
    # the tests build tiny SD3/Flux pipelines (CLIP, T5) and LoRA adapters locally: transformers, peft;
    # they write and cache small .mp4 clips: av
    "test": ["pytest>=8", "pytest-benchmark>=4", "triton==3.8.0; platform_system=='Linux'",
             "transformers>=4.44", "peft>=0.12", "torchao>=0.12", "ruff", "av>=12"],
    "diffusers": ["transformers>=4.44", "peft>=0.12", "sentencepiece", "accelerate"],
    "gpu": ["triton>=3.2", "nvtx", "torchao>=0.12"],
    # Wan: video files (.mp4, .mov, .mkv, .webm, .avi) as `soar-fast cache` input and MP4 samples (PyAV's ffmpeg)
    "video": ["av>=12"],
}
EXTRAS["all"] = sorted({r for v in EXTRAS.values() for r in v})

setup(
    name="soar_fast",
    version="0.1.0",
    description="Performance-first SOAR post-training for rectified-flow diffusion transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["soar_fast", "soar_fast.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["soar-fast=soar_fast.cli:main"]},
    include_package_data=True,
    package_data={"soar_fast.ops": ["_native/*.so"]},
)
