"""fusemoe-ckpt: fuse per-expert MoE checkpoints into the layout transformers 5 holds in memory."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    from .hub.download import download_checkpoint
    from .hub.push import push_to_hub
    from .plan.conversion import plan_conversion, plan_for
    from .plan.layout import ConversionPlan
    from .plan.unfusion import plan_unfuse
    from .reading.source import SourceCheckpoint, open_checkpoint
    from .rules.families import FAMILIES, Family, family_by_name, family_for_config
    from .rules.selection import resolve_family

    __version__: str

# Where each public name lives. A name is imported on first use, so `fusemoe-ckpt --version` or a
# small convert does not import the whole package (nor huggingface_hub, for the Hub functions).
_HOMES = {
    ".batch.cluster": ("Shard", "resolve_shard", "select"),
    ".batch.manifest": ("Entry", "load_manifest"),
    ".batch.runner": ("BatchError", "BatchInterrupted", "BatchResult", "EntryResult", "run_batch"),
    ".commands.convert": ("ConvertResult", "convert"),
    ".commands.inspect": ("Inspection", "inspect_checkpoint"),
    ".commands.unfuse": ("UnfuseResult", "unfuse"),
    ".commands.verify": ("VerificationError", "VerifyResult", "verify"),
    ".errors": (
        "CheckpointError",
        "ConversionInterrupted",
        "DestinationError",
        "FamilyError",
        "FusemoeError",
        "HubError",
        "Interrupted",
        "ManifestError",
        "UsageError",
    ),
    ".hub.download": ("download_checkpoint",),
    ".hub.push": ("push_to_hub",),
    ".plan.conversion": ("plan_conversion", "plan_for"),
    ".plan.layout": ("ConversionPlan",),
    ".plan.unfusion": ("plan_unfuse",),
    ".reading.source": ("SourceCheckpoint", "open_checkpoint"),
    ".rules.families": ("FAMILIES", "Family", "family_by_name", "family_for_config"),
    ".rules.selection": ("resolve_family",),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str):
    if name == "__version__":
        from .version import package_version

        return package_version()
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


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
