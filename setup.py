"""Build script for dpo_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are
installed as the subpackage ``dpo_fast.kernels``: a top-level module called ``kernels``
would shadow PyPI's ``kernels`` package, which transformers probes for.
"""

from pathlib import Path

from setuptools import setup

setup(
    name="dpo-fast",
    version="0.1.0",
    description="Fused kernels for preference-optimization (DPO family) training of language models",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["dpo_fast", "dpo_fast.kernels", "dpo_fast.csrc", "dpo_fast.hf", "dpo_fast.integrations"],
    package_dir={"dpo_fast": "dpo_fast", "dpo_fast.kernels": "kernels", "dpo_fast.csrc": "csrc"},
    # the C++ sources ship with the package: dpo_fast.cpp compiles them on first CPU use
    # the bundled hh-rlhf subset (MIT, with its licence and attribution): the demo's default data
    package_data={"dpo_fast.csrc": ["*.cpp"], "dpo_fast": ["assets/*"]},
    # torch is deliberately unpinned: the install step keeps whatever torch is already there
    # (a CPU build on machines without a GPU, see the Makefile), so pip never swaps it out.
    install_requires=["torch>=2.4", "triton>=3.0", "transformers>=4.46"],
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
        ],
        # the releases whose fused-head protocol dpo_fast.integrations.trl implements (SUPPORTED_TRL)
        "trl": ["trl>=1.15,<1.17"],
        "peers": ["trl>=1.15,<1.17", "liger-kernel>=0.8", "cut-cross-entropy>=25.1"],
    },
    entry_points={"console_scripts": ["dpo-fast=dpo_fast.cli:main"]},
)
