"""The benchmarks as subprocesses at smoke size. benchmarks/accelerator.py --quick: every row
group runs on the CPU with tiny shapes, writes its JSON, and each row that ran has a finite
throughput (the GPU-only rows say so); the BERT row is profiled by op; the remat memory ratios
are there. The figures themselves are not checked: this is a smoke test of the command that a
GPU lease runs once, so that it does not fail there."""

import json
import math
import subprocess
import sys

from conftest import ROOT

GROUPS = {"bert", "translation", "lstm", "attention", "linear", "memory"}


def test_accelerator_benchmark_quick(tmp_path):
    out = tmp_path / "accelerator.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--quick", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| group | row |" in proc.stdout  # the table

    result = json.loads(out.read_text())
    assert set(result["groups"]) == GROUPS
    assert all(result["groups"][g]["elapsed_s"] is not None for g in GROUPS)
    assert result["quick"] and result["peak_measured_flops"] > 0

    rows = result["rows"]
    assert {r["group"] for r in rows} == GROUPS
    for row in rows:
        assert row["status"] in ("ok", "n/a"), row  # tiny shapes: nothing fails or runs out
        if row["status"] == "n/a":
            assert row["note"] == "GPU only" and "cudnn" in row["name"].lower(), row
        elif row["group"] != "memory":
            assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0, row
            assert math.isfinite(row["step_s"]) and row["mfu_measured"] > 0, row
            assert row["compiled_bytes"] > 0 and row["note"] == "", row  # a finite loss
    for group in GROUPS - {"memory"}:
        assert any(r["group"] == group and r["status"] == "ok" for r in rows), group
    (profiled,) = [r for r in rows if "profile_ms" in r]  # --quick's default: the BERT-tiny row
    assert profiled["group"] == "bert" and 0 < profiled["profile_matmul_ms"] < profiled[
        "profile_ms"], profiled
    top = [op["ms"] for op in profiled["profile_top"]]
    assert top == sorted(top, reverse=True) and 0 < sum(top) <= profiled["profile_ms"] * 1.0001
    assert "\nprofile of BERT-tiny" in proc.stdout

    memory = result["groups"]["memory"]
    assert set(memory["temp_bytes"]) == {"none", "block", "full"}
    assert set(memory["ratios"]) == {"block", "full"}
    temps = memory["temp_bytes"]
    for remat, ratio in memory["ratios"].items():  # the ratios are of the compiled temps
        assert temps[remat] > 0 and math.isclose(ratio, temps[remat] / temps["none"]), memory
    assert memory["met"] == (memory["ratios"]["block"] <= memory["target"])


def test_translate_budget_benchmark_smoke():
    """benchmarks/translate_budget.py --smoke: a row of costs for each compared model."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "translate_budget.py"),
                           "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[-3:]]
    assert [row[0] for row in rows] == ["transformer", "gru", "bigru"]
    assert all(float(row[3]) > 0 and math.isfinite(float(row[4])) for row in rows)
