from setuptools import find_packages, setup

setup(
    name="megatron_flextron",
    version="0.1.0",
    description="Flextron elastic LLMs (nested sub-networks, routers) on NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_flextron", "megatron_flextron.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.6",
        # verified: compat/version.py. On Python 3.11 install it first with `pip install
        # --no-deps --ignore-requires-python megatron-core==0.19.2` (scripts/setup_env.sh)
        "megatron-core==0.19.2",
        "triton",
        # what megatron_flextron imports (tests/test_package_graph.py checks the list)
        "jinja2",  # chat templates (inference)
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
