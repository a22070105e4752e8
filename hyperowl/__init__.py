"""hyperowl: run, serve, fine-tune and evaluate mPLUG-Owl models in plain PyTorch."""

from .config import Owl3Config, SiglipConfig, PRESETS
from .errors import HyperowlError, InputError, CheckpointError

__version__ = "0.1.0"
