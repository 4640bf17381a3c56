"""The latest recorded GPU numbers in ``bench/results/``, for the runs of machines without a GPU.

A CPU run times the reference path, not the kernels; beside it ``python -m bench`` shows what the
kernels did on a GPU: for every (case, shape) measured by a recorded CUDA run, the row of the newest
such run, with that run's device, date and commit. A recorded JSON whose meta has no commit (the
GPU machine had no git history) takes it from the "Code: ... commit <hash>" note that
``bench/results/<run>.md`` carries.
"""

import json
import re
from pathlib import Path
from typing import Any

_COMMIT_NOTE = re.compile(r"\bcommit ([0-9a-f]{7,40})\b")


def _commit_from_notes(markdown: Path) -> str | None:
    try:
        match = _COMMIT_NOTE.search(markdown.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def _gpu_runs(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, document) of every benchmark run JSON in ``results_dir`` measured on CUDA, oldest first."""
    runs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        meta = document.get("meta") if isinstance(document, dict) else None
        if isinstance(meta, dict) and meta.get("device") == "cuda" and isinstance(document.get("results"), list):
            runs.append((path, document))
    return sorted(runs, key=lambda run: run[1]["meta"].get("date", ""))


def _run_id(meta: dict[str, Any]) -> str:
    """ "T1429" for a run dated 2026-11-26T14:29:12Z (how bench/README.md names runs)."""
    date = meta.get("date", "")
    return f"T{date[11:13]}{date[14:16]}" if len(date) >= 16 else date or "unknown"


def latest_gpu_results(results_dir: str | Path, repo: str | Path | None = None) -> dict[str, Any] | None:
    """The newest recorded CUDA row of every (case, shape) in ``results_dir``; None without a CUDA run.

    Returns ``{"runs": {run id: {"file", "device_name", "date", "commit", "commit_source", "torch",
    "cuda", "triton", "ceilings"}}, "rows": [row with "run": run id]}``. Rows keep the recorded fields
    (``bench.runner``'s row format of that run); they are grouped by case, the cases in the order the
    newest runs list them. ``file`` is relative to ``repo`` when given. Run ids are "T<hhmm>", or the
    whole date where two runs share a time of day.
    """
    runs = _gpu_runs(Path(results_dir))
    if not runs:
        return None
    ids = [_run_id(document["meta"]) for _, document in runs]
    if len(set(ids)) < len(ids):
        ids = [document["meta"].get("date", path.stem) for path, document in runs]
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    used: dict[str, dict[str, Any]] = {}
    for run_id, (path, document) in reversed(list(zip(ids, runs))):  # newest first
        meta = document["meta"]
        for row in document["results"]:
            key = (row.get("case"), row.get("shape"))
            if "ours_s" in row and key not in latest:
                latest[key] = dict(row, run=run_id)
                if run_id not in used:
                    commit, source = meta.get("commit"), "run metadata"
                    if not commit:
                        commit, source = _commit_from_notes(path.with_suffix(".md")), f"{path.stem}.md notes"
                    try:
                        file = path.resolve().relative_to(Path(repo).resolve()).as_posix() if repo else str(path)
                    except ValueError:
                        file = str(path)
                    used[run_id] = {
                        "file": file,
                        "device_name": meta.get("device_name"),
                        "date": meta.get("date"),
                        "commit": commit[:10] if commit else None,
                        "commit_source": source if commit else None,
                        "torch": meta.get("torch"),
                        "cuda": meta.get("cuda"),
                        "triton": meta.get("triton"),
                        "ceilings": document.get("ceilings", {}),
                    }
    cases = list(dict.fromkeys(case for case, _ in latest))
    rows = sorted(latest.values(), key=lambda row: cases.index(row["case"]))  # stable: shapes keep their order
    return {"runs": used, "rows": rows}
