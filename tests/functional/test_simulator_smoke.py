"""The traffic simulator (bench/simulate.py) still drives the real gateway end to end.

A tenth of the population: too small for the detection targets (docs/distillation.md has the full
run), enough to catch a simulator the gateway's API changes have broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("store", ["memory", "behind"])
def test_small_simulation_runs_and_flags_no_legitimate_account(tmp_path: Path, store: str) -> None:
    out = tmp_path / "sim.json"
    proc = subprocess.run([sys.executable, "bench/simulate.py", "--scale", "0.1", "--seed", "1",
                           "--store", store, "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    populations = result["populations"]
    legitimate = [p for name, p in populations.items() if not name.startswith("campaign")]
    campaigns = [p for name, p in populations.items() if name.startswith("campaign")]
    assert legitimate and campaigns
    assert all(p["flagged"] == 0 for p in legitimate)  # no false positive
    assert sum(p["flagged"] for p in campaigns) > 0  # friction reached some campaign accounts
    assert result["precision"] == 1.0
    if store == "behind":  # the write-behind mirror answered most requests
        assert result["signal_store"]["local_batches"] > 0 and result["signal_store"]["flush_errors"] == 0
