"""Reusable training pieces for Mask DINO: data loading, the official augmentations, batch collation, the official
optimizer / learning-rate schedule, and checkpoints that are written atomically and checked before a resume.

Everything here is plain torch / numpy / PIL (no torchvision, no detectron2) and runs on CPU. `examples/train.py`
puts the pieces together with Accelerate; held-out evaluation is `maskdino_hf.evaluation.evaluate`.

Official recipe (MaskDINO `Base-COCO-InstanceSegmentation.yaml`, also in `tests/fixtures/official/*/config.yaml`):

* input: large-scale jitter (`coco_instance_lsj` mapper): horizontal flip, `ResizeScale(0.1, 2.0)` of a square
  target size (1024), `FixedSizeCrop` to that square (random crop when larger, pad with 128 when smaller);
* `SOLVER.OPTIMIZER: ADAMW`, `BASE_LR: 1e-4`, `WEIGHT_DECAY: 0.05` (`WEIGHT_DECAY_NORM: 0`, `WEIGHT_DECAY_EMBED: 0`),
  `BACKBONE_MULTIPLIER: 0.1`;
* `LR_SCHEDULER_NAME: WarmupMultiStepLR`, `STEPS: (327778, 355092)` of `MAX_ITER: 368750` (fractions 0.8889 and
  0.9630), `GAMMA: 0.1`, `WARMUP_FACTOR: 1.0` (i.e. no warm-up), `WARMUP_ITERS: 10`;
* `CLIP_GRADIENTS: {ENABLED: true, CLIP_TYPE: full_model, CLIP_VALUE: 0.01, NORM_TYPE: 2.0}`: the global L2 norm
  of all gradients is clipped to 0.01 before every optimizer step;
* `SOLVER.AMP.ENABLED: true`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch import nn

import datasets

from .data import IGNORE_INDEX, load_coco_folder, mask_to_bbox, panoptic_ids, read_categories, rle_to_mask
from .random_source import MaskDINORandomSource, _as_shape

__all__ = [
    "OFFICIAL_CLIP_VALUE",
    "OFFICIAL_STEP_FRACTIONS",
    "tiny_config",
    "BatchInvariantRandomSource",
    "MaskDINOTrainDataset",
    "MaskDINOTrainCollator",
    "large_scale_jitter",
    "decode_example",
    "load_dataset_splits",
    "dataset_categories",
    "build_param_groups",
    "build_optimizer",
    "build_scheduler",
    "save_checkpoint",
    "resume_checkpoint",
    "check_checkpoint",
    "CheckpointError",
]

OFFICIAL_CLIP_VALUE = 0.01
OFFICIAL_STEP_FRACTIONS = (327778 / 368750, 355092 / 368750)
LSJ_PAD_VALUE = 128  # detectron2 FixedSizeCrop pad value for the image


def tiny_config(**overrides):
    """A small Mask DINO for CPU training on small images: ResNet bottleneck backbone of widths 32-256 (one block
    per stage, from scratch), pixel decoder of width 64 (2 encoder layers), 3 decoder layers with a 256-wide FFN
    (hidden size stays 256, which the config requires), 50 queries. About 2.9 M parameters (11 MB in float32)."""
    from .configuration_maskdino import MaskDINOConfig

    values = dict(
        backbone_config=dict(
            model_type="resnet", embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
            layer_type="bottleneck", out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        feature_size=64, mask_feature_size=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_layers=3, decoder_ffn_dim=256, num_queries=50, denoising_num=50, train_num_points=1024,
        test_topk_per_image=50,
    )
    values.update(overrides)
    return MaskDINOConfig(**values)


# ----------------------------------------------------------------------------------------------------------------
# Data sets and categories
# ----------------------------------------------------------------------------------------------------------------


def load_dataset_splits(path: str | Path) -> datasets.DatasetDict:
    """A `save_to_disk` folder (`DatasetDict` or a single `Dataset`, which becomes `train`), or a COCO-format folder
    with one sub-folder per split (`train/`, `validation/`, ... as `synthetic.make_synthetic_dataset` writes), or a
    single COCO folder (becomes `train`). COCO folders are read through `data.load_coco_folder`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return datasets.DatasetDict({"train": datasets.load_from_disk(str(path))})
    if (path / "images").is_dir():
        return datasets.DatasetDict({"train": load_coco_folder(path)})
    splits = {child.name: load_coco_folder(child) for child in sorted(path.iterdir()) if (child / "images").is_dir()}
    if not splits:
        raise FileNotFoundError(
            f"{path} is neither a save_to_disk folder nor a COCO folder (images/ + annotations/) nor a folder of them"
        )
    return datasets.DatasetDict(splits)


def dataset_categories(
    dataset: datasets.Dataset | datasets.DatasetDict, folder: str | Path | None = None, split: str = "train"
) -> list[dict]:
    """Categories (`id`, `name`, `isthing`) of a data set: `categories.json` in (or beside) a COCO folder or its
    `split` sub-folder, the synthetic data set's description (`maskdino_hf synthetic shapes; categories: [...]`),
    else inferred from the annotations."""
    if folder is not None:
        folder = Path(folder)
        candidates = (folder / "categories.json", folder / split / "categories.json", folder / "train" / "categories.json",
                      folder.parent / "categories.json")
        for candidate in candidates:
            if candidate.is_file():
                return [dict(c) for c in json.loads(candidate.read_text())]
        for candidate in (folder, folder / split, folder / "train"):
            try:
                return read_categories(candidate)
            except (FileNotFoundError, KeyError, ValueError):
                pass
    table = dataset if isinstance(dataset, datasets.Dataset) else next(iter(dataset.values()))
    description = table.info.description or ""
    marker = "categories: "
    if marker in description:
        try:
            return [dict(c) for c in json.loads(description.split(marker, 1)[1])]
        except json.JSONDecodeError:
            pass
    seen: dict[int, int] = {}
    if "segments_info" in table.column_names:
        for segments in table["segments_info"]:
            for s in segments:
                seen[int(s["category_id"])] = int(s["isthing"])
    if "objects" in table.column_names:
        for objects in table["objects"]:
            for o in objects:
                seen.setdefault(int(o["category_id"]), 1)
    if "semantic" in table.column_names and not seen:
        for image in table.select_columns(["semantic"])["semantic"]:
            for value in np.unique(np.asarray(image)):
                if value != IGNORE_INDEX:
                    seen.setdefault(int(value), 0)
    return [{"id": c, "name": str(c), "isthing": t} for c, t in sorted(seen.items())]


# ----------------------------------------------------------------------------------------------------------------
# Decoding and augmentation
# ----------------------------------------------------------------------------------------------------------------


def _to_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, PILImage.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array[..., :3].astype(np.uint8)


def decode_example(
    example: Mapping,
    task: str,
    category_id_to_label: Mapping[int, int] | None = None,
    detection_only: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row of the common column layout to `(image (H, W, 3) uint8, masks (N, H, W) bool, labels (N,) int64)`.

    * `instance`: the `objects` column (crowd objects skipped), or the thing segments of `panoptic` when there is
      no `objects` column;
    * `panoptic`: every non-crowd segment of `panoptic` + `segments_info` (things and stuff);
    * `semantic`: one mask per class present in the `semantic` map (`ignore_index` excluded).

    `detection_only`: the masks are the filled boxes (`objects[*].bbox`), so box-only annotations go through the
    same geometric augmentation. Category ids are mapped with `category_id_to_label` (identity when `None`);
    categories missing from the mapping are dropped.
    """
    image = _to_rgb_array(example["image"])
    height, width = image.shape[:2]

    def label_of(category_id: int) -> int | None:
        if category_id_to_label is None:
            return int(category_id)
        return category_id_to_label.get(int(category_id))

    masks: list[np.ndarray] = []
    labels: list[int] = []
    if task == "instance" and "objects" in example and example["objects"] is not None:
        for obj in example["objects"]:
            if obj.get("iscrowd", 0):
                continue
            label = label_of(obj["category_id"])
            if label is None:
                continue
            if detection_only:
                x, y, w, h = (float(v) for v in obj["bbox"])
                mask = np.zeros((height, width), dtype=bool)
                mask[int(math.floor(y)) : int(math.ceil(y + h)), int(math.floor(x)) : int(math.ceil(x + w))] = True
            else:
                mask = rle_to_mask(obj["segmentation"])
            masks.append(mask)
            labels.append(label)
    elif task in ("instance", "panoptic"):
        if "panoptic" not in example or "segments_info" not in example:
            raise ValueError(f"task {task!r} needs an 'objects' or a 'panoptic' + 'segments_info' column")
        ids = panoptic_ids(example["panoptic"])
        for segment in example["segments_info"]:
            if segment.get("iscrowd", 0) or (task == "instance" and not segment.get("isthing", 1)):
                continue
            label = label_of(segment["category_id"])
            if label is None:
                continue
            mask = ids == int(segment["id"])
            if detection_only:
                x, y, w, h = mask_to_bbox(mask)
                if w:
                    mask = np.zeros_like(mask)
                    mask[y : y + h, x : x + w] = True
            masks.append(mask)
            labels.append(label)
    elif task == "semantic":
        if "semantic" not in example:
            raise ValueError("task 'semantic' needs a 'semantic' column")
        semantic = np.asarray(example["semantic"]).astype(np.int64)
        for value in np.unique(semantic):
            if value == ignore_index:
                continue
            label = label_of(int(value))
            if label is None:
                continue
            masks.append(semantic == value)
            labels.append(label)
    else:
        raise ValueError(f"task must be 'instance', 'panoptic' or 'semantic', got {task!r}")
    mask_array = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
    return image, mask_array, np.asarray(labels, dtype=np.int64)


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    rng: np.random.Generator,
    image_size: int,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    flip: bool = True,
    pad_value: int = LSJ_PAD_VALUE,
) -> tuple[np.ndarray, np.ndarray]:
    """The official `coco_instance_lsj` augmentation (detectron2 `RandomFlip`, `ResizeScale`, `FixedSizeCrop`).

    1. horizontal flip with probability 0.5;
    2. draw `scale ~ U(min_scale, max_scale)` and resize by `min(scale * S / H, scale * S / W)` (S = `image_size`),
       image bilinear (PIL, uint8), masks nearest;
    3. crop a random `S x S` window when the result is larger (offset uniform in `[0, excess]`), then pad
       bottom/right to `S x S` (image with `pad_value`, masks with 0).

    Returns the `(S, S, 3)` image and the `(N, S, S)` masks (masks may become empty; drop them afterwards).
    """
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
        masks = masks[:, :, ::-1]
    height, width = image.shape[:2]
    scale = rng.uniform(min_scale, max_scale)
    factor = min(scale * image_size / height, scale * image_size / width)
    new_height, new_width = max(int(round(height * factor)), 1), max(int(round(width * factor)), 1)
    image = np.asarray(
        PILImage.fromarray(np.ascontiguousarray(image)).resize((new_width, new_height), PILImage.BILINEAR)
    )
    if len(masks):
        masks = np.stack(
            [
                np.asarray(PILImage.fromarray(np.ascontiguousarray(m).astype(np.uint8)).resize(
                    (new_width, new_height), PILImage.NEAREST
                )).astype(bool)
                for m in masks
            ]
        )
    else:
        masks = np.zeros((0, new_height, new_width), dtype=bool)
    offset_y = int(rng.integers(0, new_height - image_size + 1)) if new_height > image_size else 0
    offset_x = int(rng.integers(0, new_width - image_size + 1)) if new_width > image_size else 0
    image = image[offset_y : offset_y + image_size, offset_x : offset_x + image_size]
    masks = masks[:, offset_y : offset_y + image_size, offset_x : offset_x + image_size]
    out_image = np.full((image_size, image_size, 3), pad_value, dtype=np.uint8)
    out_image[: image.shape[0], : image.shape[1]] = image
    out_masks = np.zeros((masks.shape[0], image_size, image_size), dtype=bool)
    out_masks[:, : masks.shape[1], : masks.shape[2]] = masks
    return out_image, out_masks


class MaskDINOTrainDataset(torch.utils.data.Dataset):
    """Decodes and augments rows of a `datasets.Dataset`. The augmentation of row `i` in epoch `e` draws from
    `np.random.default_rng([seed, e, i])` only, so it is the same whatever the process, worker or resume point.

    With `image_size=None` no augmentation is applied (the collator then resizes with the processor)."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        task: str,
        image_size: int | None,
        category_id_to_label: Mapping[int, int] | None = None,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        flip: bool = True,
        seed: int = 0,
        detection_only: bool = False,
    ):
        self.dataset = dataset
        self.task = task
        self.image_size = image_size
        self.category_id_to_label = dict(category_id_to_label) if category_id_to_label is not None else None
        self.min_scale, self.max_scale, self.flip = min_scale, max_scale, flip
        self.seed = seed
        self.epoch = 0
        self.detection_only = detection_only

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        image, masks, labels = decode_example(
            self.dataset[int(index)], self.task, self.category_id_to_label, self.detection_only
        )
        if self.image_size is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            image, masks = large_scale_jitter(
                image, masks, rng, self.image_size, self.min_scale, self.max_scale, self.flip
            )
        keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, dtype=bool)
        return {"image": image, "masks": masks[keep], "labels": labels[keep], "index": int(index)}


class MaskDINOTrainCollator:
    """Stacks augmented examples into model inputs through the image processor (normalisation, zero padding to the
    batch size rounded to `size_divisibility`, `mask_labels` / `class_labels` / `boxes` in the official
    `prepare_targets` layout). Augmented examples are already at their training size, so no resize happens
    (`do_resize=False`) unless `resize=True` (no augmentation: the processor's test-time resize)."""

    def __init__(self, processor, resize: bool = False):
        self.processor = processor
        self.resize = resize

    def __call__(self, examples: Sequence[dict]) -> dict:
        annotations = [
            {"annotations": [{"segmentation": m.astype(np.uint8), "category_id": int(l)} for m, l in zip(e["masks"], e["labels"])]}
            for e in examples
        ]
        batch = self.processor(
            images=[e["image"] for e in examples],
            annotations=annotations,
            do_resize=self.resize,
            return_tensors="pt",
            input_data_format="channels_last",
        )
        return {
            "pixel_values": batch["pixel_values"],
            "pixel_mask": batch["pixel_mask"],
            "mask_labels": batch["mask_labels"],
            "class_labels": batch["class_labels"],
            "boxes": batch["boxes"],
            "indices": torch.tensor([e["index"] for e in examples]),
        }


class BatchInvariantRandomSource(MaskDINORandomSource):
    """A random source whose draws do not depend on how the images are split into batches: every draw is the first
    row of a fixed-seed stream, repeated along the leading dimension. Only for equivalence tests (e.g. one process
    with batch 2 versus two processes with batch 1); it is not a sensible source for real training. `randint` and
    the `*_like` helpers come from the protocol (`randint` is drawn by the parent from `torch.randint`, so it is
    overridden here to derive from `rand`)."""

    def __init__(self, seed: int = 0):
        super().__init__(generator=None)
        self.seed = seed

    def rand(self, *shape, device=None, dtype=torch.float32) -> torch.Tensor:
        shape = _as_shape(shape)
        generator = torch.Generator().manual_seed(self.seed)
        row = torch.rand(shape[1:] if len(shape) > 1 else (1,), generator=generator, dtype=torch.float32)
        if len(shape) <= 1:
            row = row.expand(*shape) if shape else row[0]
        else:
            row = row[None].expand(*shape).contiguous()
        return row.to(device=device, dtype=dtype)

    def randint(self, low: int, high: int, shape, device=None) -> torch.Tensor:
        return (low + (self.rand(_as_shape((shape,)), device=device) * (high - low)).floor()).long()


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, clipping
# ----------------------------------------------------------------------------------------------------------------

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    backbone_multiplier: float = 0.1,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
) -> list[dict]:
    """Parameter groups of the official Mask2Former / Mask DINO `build_optimizer`: backbone parameters get
    `lr * backbone_multiplier`; parameters of normalisation layers get `weight_decay_norm`, of `nn.Embedding` (and
    Swin's `relative_position_bias_table` / `absolute_pos_embed`) `weight_decay_embed`, all others `weight_decay`.
    Frozen parameters are skipped. One group per (lr, weight decay) pair, with a `name` for logging."""
    groups: dict[tuple[float, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            is_backbone = ".backbone." in f".{full_name}" or full_name.startswith("backbone.")
            group_lr = lr * backbone_multiplier if is_backbone else lr
            if isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower():
                decay = weight_decay_norm
            elif isinstance(module, nn.Embedding) or param_name in ("relative_position_bias_table", "absolute_pos_embed"):
                decay = weight_decay_embed
            else:
                decay = weight_decay
            key = (group_lr, decay)
            if key not in groups:
                groups[key] = {
                    "params": [],
                    "lr": group_lr,
                    "weight_decay": decay,
                    "name": f"{'backbone' if is_backbone else 'head'}_wd{decay:g}",
                }
            groups[key]["params"].append(parameter)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    backbone_multiplier: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `build_param_groups` (official `SOLVER.OPTIMIZER: ADAMW`)."""
    return torch.optim.AdamW(build_param_groups(model, lr, weight_decay, backbone_multiplier), lr=lr, betas=betas, eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    step_fractions: Sequence[float] = OFFICIAL_STEP_FRACTIONS,
    gamma: float = 0.1,
    warmup_steps: int = 0,
    warmup_factor: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """detectron2 `WarmupMultiStepLR`: the learning rate is multiplied by `gamma` at each milestone
    `round(fraction * max_steps)` and, during the first `warmup_steps`, by a linear ramp from `warmup_factor` to 1
    (`warmup_factor=1.0`, the official value, means no warm-up)."""
    milestones = sorted(int(round(fraction * max_steps)) for fraction in step_fractions)

    def factor(step: int) -> float:
        decay = gamma ** sum(step >= milestone for milestone in milestones)
        if warmup_steps > 0 and step < warmup_steps:
            alpha = step / warmup_steps
            decay *= warmup_factor * (1 - alpha) + alpha
        return decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
_PICKLED_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed: unfinished, truncated, or holding more than tensors and plain
    containers. The message names the folder or file."""


def finished_checkpoints(folder: str | Path) -> list[Path]:
    """The `checkpoint-N` folders under `folder`, oldest first. Unfinished ones (`checkpoint-N.tmp`, left by a run
    killed while saving) and other names are not listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        step = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(accelerator, folder: str | Path, step: int, total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into `folder/checkpoint-STEP.tmp`, renamed to `checkpoint-STEP` once complete
    (`os.replace`), so that a run killed while saving never leaves a half-written `checkpoint-STEP`. With
    `total_limit`, only the newest `total_limit` finished checkpoints are kept. Every process must call it."""
    final = Path(folder) / f"{CHECKPOINT_PREFIX}{step}"
    temporary = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit:
            for old in finished_checkpoints(folder)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_checkpoint(path: str | Path) -> None:
    """Refuse a checkpoint folder that cannot be resumed, naming the bad file: no model weights, a `.safetensors`
    file whose data does not cover its header (truncated), or a pickled file (optimizer, scheduler, RNG and custom
    states) that does not load with `torch.load(weights_only=True)`: truncated, or holding objects other than
    tensors and plain containers. A pickle payload is therefore refused before Accelerate (which loads custom states
    with `weights_only=False`) could run it."""
    from accelerate.utils import load as accelerate_load
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder (expected a checkpoint-N folder of save_state)")
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"checkpoint {path} is unfinished (a run was stopped while saving it)")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not any(p.name.startswith(("model", "pytorch_model")) for p in files):
        raise CheckpointError(f"checkpoint {path} has no model weights (model.safetensors)")
    for file in files:
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as weights:
                    weights.keys()
            elif file.suffix in _PICKLED_SUFFIXES:
                accelerate_load(file, map_location="cpu")  # weights_only=True: never runs code
        except Exception as error:  # noqa: BLE001  (safetensors, zip and unpickling errors alike)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(
                f"checkpoint file {file} cannot be loaded: truncated, corrupt, or holding more than tensors "
                f"({type(error).__name__}: {reason[:200]})"
            ) from None


def resume_checkpoint(resume_from: str | Path, checkpoints_folder: str | Path) -> Path:
    """The checkpoint folder to resume from, checked with `check_checkpoint`.

    `"latest"`: the newest finished `checkpoint-N` under `checkpoints_folder` that passes the check; unfinished and
    broken ones are skipped with a warning naming them. A path: that checkpoint, or a `CheckpointError` naming the
    bad file and the newest good checkpoint beside it."""
    if str(resume_from) == "latest":
        skipped = []
        for candidate in reversed(finished_checkpoints(checkpoints_folder)):
            try:
                check_checkpoint(candidate)
            except CheckpointError as error:
                skipped.append(str(error))
                warnings.warn(f"--resume-from latest skips {candidate}: {error}", stacklevel=2)
                continue
            return candidate
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise FileNotFoundError(f"--resume-from latest: no good checkpoint-N folder under {checkpoints_folder}{detail}")
    path = Path(resume_from)
    try:
        check_checkpoint(path)
    except CheckpointError as error:
        good = None
        for candidate in reversed(finished_checkpoints(path.parent)):
            try:
                check_checkpoint(candidate)
            except CheckpointError:
                continue
            good = candidate
            break
        hint = f"; the newest good checkpoint is {good}" if good else f"; no good checkpoint in {path.parent}"
        raise CheckpointError(f"{error}{hint}") from None
    return path
