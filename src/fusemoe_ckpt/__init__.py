"""fusemoe-ckpt: fuse per-expert MoE checkpoints into the layout transformers 5 holds in memory."""

from importlib.metadata import version as _version

from .batch.cluster import Shard, resolve_shard, select
from .batch.manifest import Entry, load_manifest
from .batch.runner import BatchError, BatchInterrupted, BatchResult, EntryResult, run_batch
from .commands.convert import ConvertResult, convert
from .commands.inspect import Inspection, inspect_checkpoint
from .commands.unfuse import UnfuseResult, unfuse
from .commands.verify import VerificationError, VerifyResult, verify
from .errors import (
    CheckpointError,
    ConversionInterrupted,
    DestinationError,
    FamilyError,
    FusemoeError,
    HubError,
    Interrupted,
    ManifestError,
    UsageError,
)
from .plan.conversion import plan_conversion, plan_for
from .plan.layout import ConversionPlan
from .plan.unfusion import plan_unfuse
from .reading.source import SourceCheckpoint, open_checkpoint
from .rules.families import FAMILIES, Family, family_by_name, family_for_config
from .rules.selection import resolve_family

__version__ = _version("fusemoe-ckpt")

# The Hub functions import huggingface_hub: loaded on first use, so a local convert does not pay for it.
_HUB_NAMES = ("download_checkpoint", "push_to_hub")


def __getattr__(name: str):
    if name in _HUB_NAMES:
        from .hub import download, push

        return getattr(download if name == "download_checkpoint" else push, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    "BatchError",
    "BatchInterrupted",
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
    "Interrupted",
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
