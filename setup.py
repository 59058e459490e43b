from setuptools import find_packages, setup

setup(
    name="megatron_flextron",
    version="0.1.0",
    description="Flextron elastic LLMs (nested sub-networks, routers) on NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_flextron", "megatron_flextron.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1; python_version<'3.12'",
        "megatron-core>=0.16.1,<=0.19.2; python_version>='3.12'",  # verified: compat/version.py
        # what megatron_flextron imports (tests/test_package_graph.py checks the list)
        "numpy",
        "psutil",  # megatron's torch_dist save needs it and does not declare it
        "safetensors",
        "sentencepiece",
        "tensorboard",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        # foreign formats (HF, GGUF) and report plots, imported only by the code that needs them
        "convert": ["transformers", "gguf", "accelerate"],
        "report": ["matplotlib"],
        # GPU accelerators; never required (they neither install nor import on CPU machines).
        "gpu": ["transformer-engine", "apex"],
        "dev": ["pytest", "ruff==0.17.6"],
    },
)
