"""`consumers`: which engines load the fused layout, per model type, from rules/consumers.py."""

from __future__ import annotations

from dataclasses import dataclass

from ..rules.consumers import (
    ENGINES,
    STATUSES,
    UNKNOWN,
    Support,
    checked_model_type,
    consumers_of,
    engine_label,
    model_types,
)

SCHEMA_VERSION = 1
_STATUS_WORDS = {
    "loads": "loads the fused layout",
    "needs_unfuse": "needs the per-expert layout (fusemoe-ckpt unfuse)",
    "wrong": "WARNING: accepts the fused layout and loads it wrong",
    "unknown": "unknown (not checked)",
}


@dataclass(frozen=True)
class ConsumersReport:
    rows: dict[str, list[Support]]  # model type -> one row per engine

    def to_json(self) -> dict:
        """The documented `consumers --json` schema."""
        return {
            "schema_version": SCHEMA_VERSION,
            "statuses": list(STATUSES),
            "engines": [{"name": e.name, "version": e.version} for e in ENGINES],
            "model_types": {
                model_type: [
                    {
                        "engine": s.engine.name,
                        "version": s.engine.version,
                        "status": s.status,
                        "detail": s.detail,
                        "evidence": s.evidence,
                        "confirmed": s.confirmed,
                    }
                    for s in rows
                ]
                for model_type, rows in self.rows.items()
            },
        }

    def lines(self, *, evidence: bool = False) -> list[str]:
        """The table for people: per model type, one line per engine (and its evidence, if asked)."""
        lines: list[str] = []
        for model_type, rows in self.rows.items():
            lines.append(f"{model_type}:")
            for s in rows:
                how = "" if s.status == UNKNOWN else (" [checked]" if s.confirmed else " [reported]")
                lines.append(f"  {engine_label(s.engine)}: {_STATUS_WORDS[s.status]}{how}")
                if s.status != UNKNOWN:
                    lines.append(f"    {s.detail}")
                    if evidence:
                        lines.append(f"    evidence: {s.evidence}")
        return lines


def consumers(model_type: str | None = None) -> ConsumersReport:
    """The engines table for `model_type` (config.json's `model_type`), or for every model type it records."""
    chosen = [checked_model_type(model_type)] if model_type is not None else model_types()
    return ConsumersReport({m: consumers_of(m) for m in chosen})
