"""fusemoe-ckpt: fuse per-expert MoE checkpoints into the layout transformers 5 holds in memory."""

from importlib.metadata import version as _version

from .batch import BatchError, BatchResult, EntryResult, run_batch
from .converter import ConvertResult, convert, plan_for, resolve_family
from .errors import (
    CheckpointError,
    ConversionInterrupted,
    DestinationError,
    FamilyError,
    FusemoeError,
    HubError,
    ManifestError,
    UsageError,
)
from .families import FAMILIES, Family, family_by_name, family_for_config
from .inspection import Inspection, inspect_checkpoint
from .manifest import Entry, load_manifest
from .plan import ConversionPlan, plan_conversion
from .sharding import Shard, resolve_shard, select
from .source import SourceCheckpoint, open_checkpoint
from .unfuse import UnfuseResult, plan_unfuse, unfuse
from .verify import VerificationError, VerifyResult, verify

__version__ = _version("fusemoe-ckpt")

# The Hub functions import huggingface_hub: loaded on first use, so a local convert does not pay for it.
_HUB_NAMES = ("download_checkpoint", "push_to_hub")


def __getattr__(name: str):
    if name in _HUB_NAMES:
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "BatchError",
    "BatchResult",
    "CheckpointError",
    "ConversionInterrupted",
    "ConversionPlan",
    "ConvertResult",
    "DestinationError",
    "Entry",
    "EntryResult",
    "Family",
    "FamilyError",
    "FusemoeError",
    "HubError",
    "Inspection",
    "ManifestError",
    "Shard",
    "SourceCheckpoint",
    "UnfuseResult",
    "UsageError",
    "VerificationError",
    "VerifyResult",
    "__version__",
    "convert",
    "download_checkpoint",
    "family_by_name",
    "family_for_config",
    "inspect_checkpoint",
    "load_manifest",
    "open_checkpoint",
    "plan_conversion",
    "plan_for",
    "plan_unfuse",
    "push_to_hub",
    "resolve_family",
    "resolve_shard",
    "run_batch",
    "select",
    "unfuse",
    "verify",
]
