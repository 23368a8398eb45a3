"""What one `weightsync bench` run measures: model, updates, methods, outputs.

A `BenchConfig` validates itself on construction, so a bad option fails before
a multi-minute run starts, with the valid choices in the message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from weightsync.errors import InvalidInputError

# Model shapes `--size` accepts: `weightsync.toymodel`'s sizes plus "116m", the
# codec benchmark's Qwen3-0.6B scaled to ~116M elements (same vocabulary).
BENCH_SIZES: tuple[str, ...] = ("tiny", "small", "medium", "116m", "0.6b")
DEFAULT_LRS: tuple[float, ...] = (1e-6, 3e-6, 1e-5)
DEFAULT_INTERVALS: tuple[int, ...] = (1, 5, 20)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Options of one benchmark run (see `weightsync bench --help`).

    `size` names a random-init model shape (fp32 master, bf16 sampler copy);
    `model_dir` loads a local Hugging Face checkpoint directory instead.
    `lrs` are the AdamW learning rates measured, `steps_per_lr` the optimizer
    steps taken at each (codecs are measured on the last step's pair),
    `intervals` the spans (in optimizer steps) of the interval-sync deltas,
    `e2e_syncs` the number of delta syncs timed per method after the first base.
    `codecs` restricts the methods to these codec names (`None` = every method),
    `e2e_codecs` further restricts the end-to-end section (deployments are slow
    to start; `None` = the same methods as the codec section);
    `e2e_lr` is the learning rate of the end-to-end and interval updates (`None`
    = the smallest of `lrs`: the sparsest updates, nearest to the ~1% changed
    the end-to-end target names).
    `engine` is the deployments' engine: `torch`, or `vllm` (`weightsync serve
    --engine vllm`, run from the vLLM venv), which adds the row "vllm
    reload_weights" — vLLM's own reload of a full directory on the same steps —
    and a column comparing every method with it.
    """

    size: str = "0.6b"
    model_dir: Path | None = None
    lrs: tuple[float, ...] = DEFAULT_LRS
    steps_per_lr: int = 2
    intervals: tuple[int, ...] = DEFAULT_INTERVALS
    e2e_syncs: int = 3
    e2e_lr: float | None = None
    codecs: tuple[str, ...] | None = None
    e2e_codecs: tuple[str, ...] | None = None
    end_to_end: bool = True
    engine: str = "torch"
    seed: int = 0
    batch: int = 4
    seq_len: int = 16
    work_dir: Path | None = None
    hotload_timeout_s: int = 900

    def __post_init__(self) -> None:
        if self.model_dir is None and self.size not in BENCH_SIZES:
            raise InvalidInputError(
                f"unknown benchmark model size {self.size!r}; choose one of "
                f"{', '.join(BENCH_SIZES)} or pass a local Hugging Face directory as model_dir"
            )
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise InvalidInputError(
                f"model_dir {self.model_dir} has no config.json; pass a local Hugging Face "
                "checkpoint directory (config.json plus *.safetensors)"
            )
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise InvalidInputError(f"lrs must be one or more positive numbers, got {self.lrs}")
        if self.steps_per_lr < 1:
            raise InvalidInputError(f"steps_per_lr must be >= 1, got {self.steps_per_lr}")
        if any(span < 1 for span in self.intervals):
            raise InvalidInputError(f"intervals must be >= 1 step each, got {self.intervals}")
        if self.e2e_syncs < 1:
            raise InvalidInputError(f"e2e_syncs must be >= 1, got {self.e2e_syncs}")
        if self.e2e_lr is not None and self.e2e_lr <= 0:
            raise InvalidInputError(f"e2e_lr must be positive, got {self.e2e_lr}")
        if self.engine not in ("torch", "vllm"):
            raise InvalidInputError(
                f"unknown benchmark engine {self.engine!r}; choose torch (the embedded engine) "
                "or vllm (vLLM's own server; adds vLLM's reload_weights as a baseline row)"
            )
        for what, names in (("codecs", self.codecs), ("e2e_codecs", self.e2e_codecs)):
            if names is not None and not names:
                raise InvalidInputError(f"{what}, when given, must name at least one codec")

    @property
    def model_label(self) -> str:
        """Where the weights come from, for the report."""
        if self.model_dir is not None:
            return f"hf:{self.model_dir}"
        return f"toymodel:{self.size}"

    @property
    def trajectory_steps(self) -> int:
        """Optimizer steps of the end-to-end learning rate's run (covers every use)."""
        return max(self.steps_per_lr, self.e2e_syncs, *self.intervals)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = None if self.model_dir is None else str(self.model_dir)
        out["work_dir"] = None if self.work_dir is None else str(self.work_dir)
        out["lrs"] = list(self.lrs)
        out["intervals"] = list(self.intervals)
        out["codecs"] = None if self.codecs is None else list(self.codecs)
        out["e2e_codecs"] = None if self.e2e_codecs is None else list(self.e2e_codecs)
        return out
