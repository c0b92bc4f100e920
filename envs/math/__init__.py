"""Math reasoning tasks: prompt datasets (synthetic arithmetic, GSM8K, MATH, user files and hub
datasets), answer checking, the built-in math reward, and MathEnv (an LLM task)."""

from envs.math.datasets import DatasetError, LoadedDataset, load_rows
from envs.math.grading import STYLES, AnswerChecker, Grade, extract_answer

__all__ = [
    "STYLES",
    "AnswerChecker",
    "DatasetError",
    "Grade",
    "LoadedDataset",
    "extract_answer",
    "load_rows",
]
