"""mmdit: joint audio-video MM-DiT training, sampling, evaluation and serving in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mmdit",
    version="0.1.0",
    description="Twin-stream audio/video MM-DiT (UniTalking, JAM-Flow, Mirage, TalkingMachines) in JAX/Flax",
    python_requires=">=3.10",
    # The top-level kernels/ folder ships as `mmdit_kernels`: the PyPI name `kernels` belongs to an
    # unrelated project, and importing ours under that name would shadow or be shadowed by it.
    packages=find_packages(include=["mmdit", "mmdit.*"]) + ["mmdit_kernels", "mmdit_configs"],
    package_dir={"mmdit_kernels": "kernels", "mmdit_configs": "configs"},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "array-record>=0.8",
        "transformers>=5",
        "einops>=0.8",
        "librosa>=0.11",
        "ml-collections>=1.1",
        "tensorboard>=2.20",
        "tensorboardX>=2.6",
        "av>=14",
        "tqdm>=4.66",
        "flatbuffers>=24",
        "numpy>=1.26",
        "pillow>=10",
        "safetensors>=0.4",  # mmdit convert reads Hugging Face checkpoints tensor by tensor
        # mmdit data ingest's face boxes: the Haar cascade xml ships in the 4.x wheels only (cv2.data.haarcascades)
        "opencv-python-headless>=4.8,<5",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6"],
        # Reference implementations for converter parity fixtures (PyTorch CPU wheel, pinned exactly).
        "parity": ["torch==2.13.0", "diffusers==0.42.1", "safetensors>=0.4"],
        "gpu": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "mmdit=mmdit.cli.main:main",
            "mmdit-info=mmdit.cli.info:main",
            "mmdit-data=mmdit.cli.data:main",
            "mmdit-train=mmdit.cli.train:main",
            "mmdit-distill=mmdit.cli.distill:main",
            "mmdit-sample=mmdit.cli.sample:main",
            "mmdit-stream=mmdit.cli.stream:main",
            "mmdit-export=mmdit.cli.export:main",
            "mmdit-eval=mmdit.cli.eval:main",
            "mmdit-plan=mmdit.cli.plan:main",
            "mmdit-convert=mmdit.cli.convert:main",
        ]
    },
)
