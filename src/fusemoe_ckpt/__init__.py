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
from .inspection import Inspection, inspect_checkpoint
from .plan import ConversionPlan, plan_conversion
from .source import SourceCheckpoint, open_checkpoint
from .unfuse import UnfuseResult, plan_unfuse, unfuse
from .verify import VerificationError, VerifyResult, verify

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
    "Inspection",
    "SourceCheckpoint",
    "UnfuseResult",
    "UsageError",
    "VerificationError",
    "VerifyResult",
    "__version__",
    "convert",
    "family_by_name",
    "family_for_config",
    "inspect_checkpoint",
    "open_checkpoint",
    "plan_conversion",
    "plan_for",
    "plan_unfuse",
    "resolve_family",
    "unfuse",
    "verify",
]
