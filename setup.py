"""Build script for dpo_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and the C++
sources in ``csrc/``; both ship inside the ``dpo_fast`` package (``dpo_fast/kernels/``,
``dpo_fast/csrc/``). Nothing is installed as a top-level ``kernels`` module, which would
shadow PyPI's ``kernels`` package (transformers probes for it); see ``dpo_fast/kernels/__init__.py``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithKernels(build_py):
    """``build_py`` that also copies ``kernels/*.py`` and ``csrc/*.cpp`` into the built package."""

    def run(self):
        super().run()
        for folder, pattern in (("kernels", "*.py"), ("csrc", "*.cpp")):
            target = Path(self.build_lib, "dpo_fast", folder)
            target.mkdir(parents=True, exist_ok=True)
            for source in sorted((ROOT / folder).glob(pattern)):
                shutil.copy2(source, target / source.name)


setup(
    name="dpo-fast",
    version="0.1.0",
    description="Fused kernels for preference-optimization (DPO family) training of language models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "dpo_fast",
        "dpo_fast.kernels",
        "dpo_fast.ops",
        "dpo_fast.hf",
        "dpo_fast.integrations",
        "dpo_fast.app",
    ],
    cmdclass={"build_py": BuildWithKernels},
    # the bundled hh-rlhf subset (MIT, with its licence and attribution): the demo's default data
    package_data={"dpo_fast.app": ["assets/*"]},
    # torch is deliberately unpinned: the install step keeps whatever torch is already there
    # (a CPU build on machines without a GPU, see the Makefile), so pip never swaps it out.
    # 2.6: torch.library.triton_op
    install_requires=["torch>=2.6", "triton>=3.2", "transformers>=4.46"],
    extras_require={
        # the tests compare against TRL and Liger themselves, so they are test dependencies
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "ruff>=0.6",
            "matplotlib>=3.7",
            "peft>=0.13",
            "trl>=1.15,<1.17",
            "liger-kernel>=0.8",
            # the CLI tests read the event files `--report_to tensorboard` writes
            "tensorboard>=2.14",
        ],
        # the releases whose fused-head protocol dpo_fast.integrations.trl implements (SUPPORTED_TRL);
        # with matplotlib for `dpo-fast train`'s training_curves.png
        "trl": ["trl>=1.15,<1.17", "matplotlib>=3.7"],
        "peers": ["trl>=1.15,<1.17", "liger-kernel>=0.8", "cut-cross-entropy>=25.1"],
    },
    entry_points={"console_scripts": ["dpo-fast=dpo_fast.app.cli:main"]},
)
