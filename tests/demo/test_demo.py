"""`weightsync demo` end to end: a real deployment, real GRPO steps, a bit-identity check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from weightsync.demo.grpo import RolloutGroup, group_advantages, grpo_update
from weightsync.demo.task import CHAR_CLASSES, TaskPrompt, reward
from weightsync.toymodel import build_model


def test_reward_is_the_fraction_of_characters_in_the_asked_class() -> None:
    prompt = TaskPrompt(text="digits: 4", char_class="digits")
    assert reward(prompt, "1234") == 1.0
    assert reward(prompt, "12ab") == 0.5
    assert reward(prompt, "") == 0.0
    assert set(CHAR_CLASSES) == {"digits", "lower", "upper"}


def test_group_advantages_are_centred_and_zero_for_equal_rewards() -> None:
    adv = group_advantages([1.0, 0.0, 0.5, 0.5])
    assert abs(sum(adv)) < 1e-6
    assert adv[0] > 0 > adv[1]
    assert group_advantages([0.3, 0.3, 0.3]) == [0.0, 0.0, 0.0]


def test_grpo_update_raises_the_likelihood_of_rewarded_completions() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prompt = [4, 5, 6]
    good, bad = [10, 11, 12], [40, 41, 42]
    group = RolloutGroup(
        prompt_token_ids=prompt,
        completion_token_ids=[good, bad, good, bad],
        rewards=[1.0, 0.0, 1.0, 0.0],
        sampled_logprobs=[[], [], [], []],
    )

    def logprob(tokens: list[int]) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
            lp = torch.log_softmax(logits.float(), -1)
            return float(lp.gather(-1, torch.tensor(tokens)[:, None]).sum())

    before = logprob(good) - logprob(bad)
    for _ in range(3):
        stats = grpo_update(model, optimizer, [group])
    assert logprob(good) - logprob(bad) > before
    assert stats.mean_reward == 0.5
    assert stats.num_tokens == 12


@pytest.mark.timeout(600)
def test_demo_command_runs_and_proves_bit_identity(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightsync.cli",
            "demo",
            "--steps",
            "3",
            "--model-size",
            "tiny",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bit-identical" in proc.stdout
    report = json.loads((out / "demo-report.json").read_text())
    assert report["weights_identical"] is True
    assert report["mismatched_tensors"] == []
    assert report["num_tensors_checked"] > 0
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["kind"] == "delta" and s["payload_bytes"] > 0 for s in steps)
    # Each step's rollouts were produced by the snapshot synced after the step before.
    assert steps[1]["served_by"] == [steps[0]["snapshot"]]
    assert steps[2]["served_by"] == [steps[1]["snapshot"]]
    assert report["final_snapshot"].startswith("step-00003-final-")
    png = (out / "demo-plot.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # The deployment the demo started is gone (process and registry record).
    pid = report["deployment_pid"]
    assert isinstance(pid, int) and pid > 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert list((out / "deployments").glob("*/deployment.json")) == []
