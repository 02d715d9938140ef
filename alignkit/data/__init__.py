"""Datasets: validation, built-in synthetic tasks."""

from .synthetic import builtin_dataset_names, load_builtin_dataset
from .validation import DatasetError, validate_preference_dataset

__all__ = ["DatasetError", "builtin_dataset_names", "load_builtin_dataset", "validate_preference_dataset"]
