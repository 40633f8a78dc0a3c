"""Packaging for wm-trainer: a World Models trainer and a Chainer debugging toolkit."""
from setuptools import find_packages, setup

setup(
    name="wm-trainer",
    version="0.1.0",
    description=(
        "World Models (Ha & Schmidhuber 2018) on Chainer, with a training-extension and "
        "debugging toolkit: per-parameter gradients, float64 mode, NaN/Inf localisation, "
        "TensorBoard histograms, all from YAML."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["wm_trainer", "wm_trainer.*", "extensions", "extensions.*"]),
    package_data={"wm_trainer": ["py.typed"], "extensions": ["py.typed"]},
    install_requires=[
        "chainer==7.8.1",
        # NumPy 2 (the default) or 1.26: extensions.chainer_compat restores the NumPy 1 names Chainer reads,
        # and pkg_resources / numpy.distutils where the installed setuptools / NumPy lack them
        "numpy>=1.26",
        "gymnasium[box2d]>=1.0,<2",
        "vizdoom>=1.2.3,<2",
        "tensorboardX>=2.6,<3",
        "crc32c>=2.3,<3",  # C checksum for tensorboardX: its pure-Python fallback dominates scalar logging
        "pyyaml>=6,<7",
        "cma>=3.3,<5",
        "matplotlib>=3.7,<4",
        "imageio>=2.31,<3",
        "pillow>=10,<12",
        "tqdm>=4.66,<5",
        "threadpoolctl>=3.2,<4",  # the fast LSTM pins BLAS to one thread per batch slice
        # one compiled pass for the toolkit's per-iteration gradient statistics, backup and check on small nets
        "numba>=0.59",
    ],
    extras_require={
        "dev": ["pytest>=7.4,<9", "ruff>=0.5", "tensorboard>=2.14,<3", "threadpoolctl>=3.2"],
        "dask": ["dask[distributed]>=2024.1"],
        # ChainerMN (inside chainer) over MPI: mpi4py's wheels and MPICH as a wheel, no system MPI needed
        "mpi": ["mpi4py>=4.0,<5", "mpich>=4.1"],
        # CuPy 14 (NumPy 2; users who keep NumPy 1 install cupy-cuda12x 13.x, see the README);
        # the nvidia wheels stand in for a CUDA toolkit
        "cuda": ["cupy-cuda12x>=14,<15", "numpy>=2", "nvidia-cublas-cu12", "nvidia-cuda-nvrtc-cu12",
                 "nvidia-cuda-runtime-cu12", "nvidia-curand-cu12"],
        # drivers for CUDA 13: CuPy 14's CUDA 13 build and the CUDA 13 libraries as wheels
        "cuda13": ["cupy-cuda13x>=14,<15", "numpy>=2", "nvidia-cublas>=13,<14", "nvidia-cuda-nvrtc>=13,<14",
                   "nvidia-cuda-runtime>=13,<14", "nvidia-curand>=10.4,<11", "nvidia-nvjitlink>=13,<14"],
        # cuDNN for CuPy 13 on NumPy 1 (it binds cuDNN 8 only; CuPy 14 has no cuDNN)
        "cudnn": ["nvidia-cudnn-cu12>=8.9,<9"],
    },
    entry_points={"console_scripts": ["wm-trainer=wm_trainer.cli:main"]},
)
