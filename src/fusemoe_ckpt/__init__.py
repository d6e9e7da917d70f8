"""fusemoe-ckpt: fuse per-expert MoE checkpoints into the layout transformers 5 holds in memory."""

from importlib.metadata import version as _version

from .converter import ConvertResult, convert, plan_for, resolve_family
from .errors import (
    CheckpointError,
    ConversionInterrupted,
    DestinationError,
    FamilyError,
    FusemoeError,
    UsageError,
)
from .families import FAMILIES, Family, family_by_name, family_for_config
from .plan import ConversionPlan, plan_conversion
from .source import SourceCheckpoint, open_checkpoint

__version__ = _version("fusemoe-ckpt")

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "ConversionInterrupted",
    "ConversionPlan",
    "ConvertResult",
    "DestinationError",
    "Family",
    "FamilyError",
    "FusemoeError",
    "SourceCheckpoint",
    "UsageError",
    "__version__",
    "convert",
    "family_by_name",
    "family_for_config",
    "open_checkpoint",
    "plan_conversion",
    "plan_for",
    "resolve_family",
]
