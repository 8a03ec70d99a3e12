"""Supervised fine-tuning with the s1 recipe (TRL ``SFTTrainer``): data, masking, FSDP launch."""

from .data import Example, TrainingSet, build_training_set, load_examples, math_rows, render, tokenize
from .recipe import FSDP_CONFIG, Recipe, build_trainer, sft_config, train

__all__ = [
    "FSDP_CONFIG",
    "Example",
    "Recipe",
    "TrainingSet",
    "build_trainer",
    "build_training_set",
    "load_examples",
    "math_rows",
    "render",
    "sft_config",
    "tokenize",
    "train",
]
