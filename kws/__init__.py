"""kws: streaming keyword spotting with mGRADE."""

import os
import sys
from pathlib import Path

__version__ = "0.1.0"

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL_NAME = "mgrade-edge.npz"  # torch-free, written by `kws export` from the checkpoint
DEFAULT_CHECKPOINT_NAME = "mgrade-edge.pt"
# The licence of a model's weights (an SPDX id) unless the model file names another: the
# project's own. A model distilled from a teacher takes the teacher's (kws.teacher).
PROJECT_LICENSE = "MIT"


def license_problem(value) -> str | None:
    """What is wrong with a model file's licence entry, or None when it names one."""
    return None if isinstance(value, str) and value else f"its licence is not a name ({value!r})"


def default_model_path() -> Path:
    """$KWS_MODEL if set, else the shipped model file that inference loads (kws.runtime): in the
    repository's models/ (a clone, `pip install -e`), or where `pip install .` put it."""
    env = os.environ.get("KWS_MODEL")
    if env:
        return Path(env)
    in_clone = MODELS_DIR / DEFAULT_MODEL_NAME
    installed = Path(sys.prefix) / "share" / "kws" / "models" / DEFAULT_MODEL_NAME
    return installed if not in_clone.is_file() and installed.is_file() else in_clone


def default_checkpoint_path() -> Path:
    """$KWS_MODEL if set, else the shipped PyTorch checkpoint (training, evaluation, export)."""
    env = os.environ.get("KWS_MODEL")
    return Path(env) if env else MODELS_DIR / DEFAULT_CHECKPOINT_NAME
