"""TFDS datasets embedded in cm_jax. Importing this package registers them with TFDS by name."""

from cm_jax.datasets.sklearn_digits import SklearnDigits

EMBEDDED_DATASETS = (SklearnDigits.name,)  # Built locally on first use; never downloaded.
