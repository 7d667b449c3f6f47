"""Shared helpers: the official fixtures copied under tests/fixtures/official."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

FIXTURES = Path(__file__).parent / "fixtures" / "official"
CASES = ["instance_r50_mask2box", "panoptic_r50_batch", "semantic_r50_ade", "instance_swin_4scale", "panoptic_decoupled_box"]
# Panoptic fixture metadata (case.json `metadata_registered`): the stuff classes of each case.
STUFF_LABELS = {"panoptic_r50_batch": [7, 8, 9, 10], "panoptic_decoupled_box": [80, 81, 82, 83]}
# panoptic_r50_batch shares the weights file of instance_r50_mask2box.
CHECKPOINTS = {"panoptic_r50_batch": FIXTURES / "instance_r50_mask2box" / "model.pth"}


def _onednn_float32_matmul() -> bool:
    from maskdino_hf.modeling_maskdino import _onednn_float32_matmul_on_this_cpu

    return _onednn_float32_matmul_on_this_cpu()


needs_onednn = pytest.mark.skipif(
    not _onednn_float32_matmul(),
    reason="oneDNN's float32 linear is only taken on x86 CPUs with AVX2 or AVX-512 in PyTorch builds with oneDNN",
)


class OpLog(TorchDispatchMode):
    """Records the names of the ATen / oneDNN ops dispatched inside it (`ops`)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

def case_dir(case: str) -> Path:
    return FIXTURES / case


def checkpoint_path(case: str) -> Path:
    return CHECKPOINTS.get(case, FIXTURES / case / "model.pth")


def case_info(case: str) -> dict:
    return json.loads((FIXTURES / case / "case.json").read_text())


def mask_iou(first, second) -> float:
    """Intersection over union of two boolean masks (NumPy arrays or torch tensors); 1.0 when both are empty."""
    union = float((first | second).sum())
    return float((first & second).sum()) / union if union else 1.0


def tiny_config(**overrides):
    """A small random Mask DINO configuration (ResNet with one block per stage, 10 queries, 5 labels)."""
    from maskdino_hf import MaskDINOConfig

    values = dict(
        num_labels=5,
        backbone_config=dict(
            model_type="resnet", embedding_size=8, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
            layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        feature_size=32, mask_feature_size=32, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=32,
        decoder_layers=2, decoder_ffn_dim=32, num_queries=10, denoising_num=4, train_num_points=16,
    )
    values.update(overrides)
    return MaskDINOConfig(**values)


_MODELS: dict[str, object] = {}


def converted_model(case: str):
    """The case's official checkpoint converted with its config (cached per session)."""
    if case not in _MODELS:
        from maskdino_hf.convert_maskdino_to_hf import convert_checkpoint

        model, processor = convert_checkpoint(
            checkpoint_path(case), case_dir(case) / "config.yaml", stuff_labels=STUFF_LABELS.get(case)
        )
        _MODELS[case] = (model, processor)
    return _MODELS[case]


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
