"""kws: streaming keyword spotting with mGRADE."""

import os
from pathlib import Path

__version__ = "0.1.0"

DEFAULT_MODEL_NAME = "mgrade-edge.pt"


def default_model_path() -> Path:
    """$KWS_MODEL if set, else the model shipped in the repository's models/ folder."""
    env = os.environ.get("KWS_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models" / DEFAULT_MODEL_NAME
