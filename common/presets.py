"""The named presets: a model, a dataset and the hyperparameters that make that task train well.

A run names one with ``preset=...`` (``privatune simulate --preset``); every value can be overridden in the run
config, where ``""``/``0`` mean "the preset's". docs/fine-tuning.md lists them (tests/test_custom_task.py checks
the table against this dict).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """Defaults that make one task train well; any of them can be overridden."""

    model: str
    dataset: str
    mode: str
    lr: float
    batch_size: int
    local_epochs: int
    num_server_rounds: int
    max_length: int = 64
    description: str = ""
    # 0 = lr. A preset whose lr was tuned under DP-SGD (each step's update at most the clipping norm) names the lr
    # for dp=false, where the unclipped gradient at that lr diverges (docs/benchmarks.md, "The tuned LoRA side by
    # side").
    lr_without_dp: float = 0.0


def _tuned_lora(dataset: str, max_length: int, task: str) -> Preset:
    """The LoRA settings the issue-11 tuning runs found best under DP at epsilon 8 (docs/benchmarks.md, "Tuning
    LoRA"): larger logical batches and more, shorter rounds than the mode's defaults; one place for both tasks."""
    return Preset(
        model="minilm",
        dataset=dataset,
        mode="lora",
        lr=6.0,
        batch_size=128,
        local_epochs=1,
        num_server_rounds=10,
        max_length=max_length,
        description=f"{task} with LoRA (rank 8, query/value), tuned under DP at epsilon 8",
        lr_without_dp=1.0,
    )


PRESETS: dict[str, Preset] = {
    "sms-spam": Preset(
        model="minilm",
        dataset="sms-spam",
        mode="head",
        lr=2.0,
        batch_size=64,
        local_epochs=5,
        num_server_rounds=5,
        description="SMS spam detection (2 classes, 89% ham), MiniLM text encoder",
    ),
    "trec6": Preset(
        model="minilm",
        dataset="trec6",
        mode="head",
        lr=2.0,
        batch_size=64,
        local_epochs=5,
        num_server_rounds=5,
        description="TREC question type (6 classes), MiniLM text encoder",
    ),
    "digits": Preset(
        model="digits-cnn",
        dataset="digits",
        mode="head",
        lr=0.5,
        batch_size=32,
        local_epochs=3,
        num_server_rounds=3,
        description="sklearn 8x8 digits upscaled to 28x28, MNIST-pretrained CNN",
    ),
    "fashion-mnist": Preset(
        model="digits-cnn",
        dataset="fashion-mnist",
        mode="last-k",
        lr=0.5,
        batch_size=64,
        local_epochs=2,
        num_server_rounds=5,
        description="Fashion-MNIST (10 clothing classes, 60,000 train / 10,000 test), MNIST-pretrained CNN",
    ),
    "trec6-lora": _tuned_lora("trec6", 32, "TREC question type"),
    "sms-spam-lora": _tuned_lora("sms-spam", 48, "SMS spam detection"),
}
