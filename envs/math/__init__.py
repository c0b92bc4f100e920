"""Math reasoning tasks: problem datasets (synthetic arithmetic, GSM8K, MATH) and answer checking."""

from envs.math.datasets import DatasetError, LoadedDataset, MathProblem, load_problems
from envs.math.grading import STYLES, AnswerChecker, Grade, extract_answer

__all__ = [
    "STYLES",
    "AnswerChecker",
    "DatasetError",
    "Grade",
    "LoadedDataset",
    "MathProblem",
    "extract_answer",
    "load_problems",
]
