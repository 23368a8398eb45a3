"""Render the fault matrix's observations (JSON lines) as the table of docs/reliability.md.

WEIGHTSYNC_MATRIX_OUT=/tmp/matrix.jsonl .venv/bin/pytest tests/faults -q
.venv/bin/python tests/faults/matrix_table.py /tmp/matrix.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _short(text: str, limit: int = 110) -> str:
    text = re.sub(r"-[0-9a-f]{8}\b", "", text)  # session ids vary run to run
    text = re.sub(r"/tmp/\S+", "<tmp>", text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(lines: list[dict]) -> str:
    rows = [
        "| case | expected | syncer / HTTP answer | replica stage (error) | serves (checked) | "
        "ledger, last row | test |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in lines:
        last = d["ledger_last"] or {}
        ledger = f"{_short(str(last.get('identity')), 40)} {last.get('result')}" if last else "-"
        served = _short(str(d["serves_reference_of"]), 40)
        test = d["test"].removeprefix("tests/faults/")
        stage = d["stage"] + (f": {_short(d['error'], 90)}" if d.get("error") else "")
        rows.append(
            f"| {d['case']} | {d['expected']} | {_short(d['syncer'])} | {stage} | "
            f"{served} ✓ | {ledger} | `{test}` |"
        )
    unverified = sum(1 for d in lines if d["serves_reference_of"] != d["serving"])
    lost = sum(1 for d in lines if d["ledger_ok"] and d["ledger_ok"][-1] != d["serving"])
    rows.append("")
    rows.append(
        f"{len(lines)} observations; replicas serving unverified weights: {unverified}; "
        f"lost snapshots (served ≠ the ledger's newest verified load): {lost}."
    )
    return "\n".join(rows)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/matrix.jsonl")
    print(render([json.loads(line) for line in path.read_text().splitlines() if line.strip()]))
