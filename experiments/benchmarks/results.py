"""Benchmark rows in one shape, so that several runs (scripts/gpu_check.sh) make one markdown table.

Each suite prints its own table and, with `--json PATH`, also writes its rows here: `check` (what was measured,
with its setting), `run` (the row), `tokens` (per image or sample), `result` (the measured value with its unit),
`speedup` (vs the run's stock row), `ideal` (FLOP ratio) and `peak_gib` (peak CUDA memory; None off CUDA).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

COLUMNS = ("check", "run", "tokens", "result", "speedup", "ideal", "peak_gib")
HEADER = ("check", "run", "tokens / image", "result", "speedup", "ideal (FLOP ratio)", "peak GiB")


def row(check: str, run: str, result: str, tokens: float | None = None, speedup: float | None = None,
        ideal: float | None = None, peak_gib: float | None = None) -> dict[str, Any]:
    """One table row; numbers stay numbers (formatted only in `markdown_table`)."""
    return {"check": check, "run": run, "tokens": tokens, "result": result, "speedup": speedup, "ideal": ideal,
            "peak_gib": peak_gib}


def write_json(path: str | Path | None, rows: Sequence[dict[str, Any]], **meta: Any) -> None:
    """Write `rows` (and free-form metadata) to `path` as JSON; nothing when `path` is None."""
    if path is None:
        return
    Path(path).write_text(json.dumps({**meta, "rows": list(rows)}, indent=1))


def read_json(path: str | Path) -> list[dict[str, Any]]:
    """The rows a suite wrote with `write_json`; a ValueError naming the file when they are malformed."""
    data = json.loads(Path(path).read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or any(not isinstance(r, dict) or set(r) != set(COLUMNS) for r in rows):
        raise ValueError(f"{path}: expected {{'rows': [...]}} with the keys {COLUMNS}, got {str(data)[:200]}")
    return rows


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key in ("speedup", "ideal"):
        return f"{value:.2f}x"
    if key == "tokens":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if key == "peak_gib":
        return f"{value:.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[dict[str, Any]]) -> str:
    """The rows as one markdown table (columns `HEADER`)."""
    lines = ["| " + " | ".join(HEADER) + " |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["COLUMNS", "HEADER", "markdown_table", "read_json", "row", "write_json"]
