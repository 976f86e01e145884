"""Reading what runs logged: MLflow table artifacts back into one dict per row."""

from __future__ import annotations

import json
from pathlib import Path


def read_examples(path: str | Path) -> list[dict]:
    """An MLflow table artifact (columns + rows, as ``log_table`` writes it) as one dict per held-out example."""
    table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
