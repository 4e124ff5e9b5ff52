"""Apply what was learned: cluster assignments as Parquet tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ASSIGNMENTS_FILE = "assignments.parquet"


def write_assignments(columns: dict[str, np.ndarray], path: str | Path) -> Path:
    """One row per image: index, cluster, confidence, ood_score (and label when known)."""
    path = Path(path)
    pq.write_table(pa.table({name: pa.array(values) for name, values in columns.items()}), path)
    return path


def read_assignments(path: str | Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy() for name in table.column_names}
