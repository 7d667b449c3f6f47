"""The 8 released Mask DINO checkpoints: presets, download, conversion and model cards.

A preset (`Release`) states in our own code what the official yaml of a release says (architecture, test-time
pre- and post-processing, the thing/stuff split) plus the data set's real class names, the official download URL and
the official metrics of the official README. `convert_release` turns a release into a model folder
(`config.json`, `model.safetensors`, `preprocessor_config.json`, `README.md`) without the official repository, and
optionally pushes it to the Hub. `write_model_card` writes the card of converted and of fine-tuned models.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_maskdino import MaskDINOConfig
from .dataset_categories import (
    ADE20K_CATEGORIES,
    CITYSCAPES_CATEGORIES,
    COCO_INSTANCE_CATEGORIES,
    COCO_NUM_THINGS,
    COCO_PANOPTIC_CATEGORIES,
)

RELEASE_BASE_URL = "https://github.com/IDEA-Research/detrex-storage/releases/download/maskdino-v0.1.0"
OFFICIAL_REPOSITORY = "https://github.com/IDEA-Research/MaskDINO"
DEFAULT_CACHE_DIR = Path("~/.cache/maskdino_hf")
CACHE_ENV = "MASKDINO_HF_CACHE"
_CHUNK = 1 << 20

# detectron2 `D2SwinTransformer` of the Swin-L (ImageNet-22k, 384) releases, as Transformers' `SwinConfig`.
SWIN_L_BACKBONE = {
    "model_type": "swin",
    "image_size": 384,
    "patch_size": 4,
    "embed_dim": 192,
    "depths": [2, 2, 18, 2],
    "num_heads": [6, 12, 24, 48],
    "window_size": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.3,
    "use_absolute_embeddings": False,
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}
# Differences from `MaskDINOConfig`'s defaults (the R50 hid2048 instance model) shared by several releases.
_SWIN_L_ARCHITECTURE = {
    "backbone_config": SWIN_L_BACKBONE,
    "encoder_in_features": ["res2", "res3", "res4", "res5"],
    "num_feature_levels": 5,
}
_SEMANTIC_ARCHITECTURE = {
    "encoder_ffn_dim": 1024,
    "num_queries": 100,
    "num_feature_levels": 3,
    "feature_order": "high2low",
    "two_stage": False,
    "initialize_box_type": "no",
    "semantic_ce_loss": True,
}
_PANOPTIC_PROCESSING = {"instance_on": True, "panoptic_on": True, "semantic_on": True}
_SEMANTIC_PROCESSING = {"instance_on": False, "panoptic_on": False, "semantic_on": True, "object_mask_threshold": 0.8}
_DATASETS = {  # Hub data set id, readable name, class names
    "coco-instance": ("coco", "COCO 2017 val", COCO_INSTANCE_CATEGORIES),
    "coco-panoptic": ("coco", "COCO panoptic 2017 val", COCO_PANOPTIC_CATEGORIES),
    "ade20k-semantic": ("scene_parse_150", "ADE20K val", ADE20K_CATEGORIES),
    "cityscapes-semantic": ("cityscapes", "Cityscapes val (fine)", CITYSCAPES_CATEGORIES),
}
_METRIC_NAMES = {"mask_ap": "mask AP", "box_ap": "box AP", "pq": "PQ", "miou": "mIoU"}


@dataclass(frozen=True)
class Release:
    """One official checkpoint: what to build (`architecture`, `processor`) and where it comes from."""

    name: str
    backbone: str
    dataset: str  # "coco", "ade20k" or "cityscapes"
    task: str  # "instance", "panoptic" or "semantic"
    file_name: str
    official_config: str  # yaml path in the official repository
    metrics: dict[str, float]  # official README: mask_ap, box_ap, pq, miou
    description: str
    architecture: dict[str, Any] = field(default_factory=dict)  # `MaskDINOConfig` fields that differ from defaults
    processor: dict[str, Any] = field(default_factory=dict)  # `MaskDINOImageProcessor` settings that differ
    sha256: str | None = None  # of the official file, where a maintainer recorded it
    size: int | None = None  # bytes, likewise

    @property
    def url(self) -> str:
        return f"{RELEASE_BASE_URL}/{self.file_name}"

    @property
    def class_names(self) -> tuple[str, ...]:
        return _DATASETS[f"{self.dataset}-{self.task}"][2]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def stuff_labels(self) -> list[int]:
        """COCO panoptic: the 53 stuff classes after the 80 things; instance and semantic releases have none."""
        return list(range(COCO_NUM_THINGS, len(self.class_names))) if self.task == "panoptic" else []

    @property
    def hub_dataset(self) -> str:
        return _DATASETS[f"{self.dataset}-{self.task}"][0]

    @property
    def dataset_name(self) -> str:
        return _DATASETS[f"{self.dataset}-{self.task}"][1]

    def config(self) -> MaskDINOConfig:
        id2label = self.id2label
        return MaskDINOConfig(
            **self.architecture,
            id2label=id2label,
            label2id={name: index for index, name in id2label.items()},
            stuff_labels=self.stuff_labels,
        )

    def processor_kwargs(self) -> dict[str, Any]:
        return {**self.processor, "num_labels": len(self.class_names), "stuff_labels": self.stuff_labels}

    def image_processor(self):
        from .image_processing_maskdino import MaskDINOImageProcessor

        return MaskDINOImageProcessor(**self.processor_kwargs())


RELEASES: dict[str, Release] = {
    release.name: release
    for release in (
        Release(
            name="maskdino-r50-coco-instance-hid1024",
            backbone="R50",
            dataset="coco",
            task="instance",
            file_name="maskdino_r50_50ep_300q_hid1024_3sd1_instance_maskenhanced_mask46.1ap_box51.5ap.pth",
            official_config="configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s.yaml",
            metrics={"mask_ap": 46.1, "box_ap": 51.5},
            description="ResNet-50, encoder feed-forward width 1024, 3 feature levels, mask-enhanced box "
            "initialisation, 50 epochs",
            architecture={
                "encoder_ffn_dim": 1024,
                "num_feature_levels": 3,
                "feature_order": "high2low",
                "initialize_box_type": "bitmask",
            },
        ),
        Release(
            name="maskdino-r50-coco-instance",
            backbone="R50",
            dataset="coco",
            task="instance",
            file_name="maskdino_r50_50ep_300q_hid2048_3sd1_instance_maskenhanced_mask46.3ap_box51.7ap.pth",
            official_config="configs/coco/instance-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml",
            metrics={"mask_ap": 46.3, "box_ap": 51.7},
            description="ResNet-50, encoder feed-forward width 2048, 3 backbone scales plus one downsampled level, "
            "mask-enhanced box initialisation, 50 epochs",
        ),
        Release(
            name="maskdino-swinl-coco-instance-no-mask-enhance",
            backbone="Swin-L (IN21k)",
            dataset="coco",
            task="instance",
            file_name="maskdino_swinl_50ep_300q_hid2048_3sd1_instance_mask52.1ap_box58.3ap.pth",
            official_config="configs/coco/instance-segmentation/swin/"
            "maskdino_R50_bs16_50ep_4s_dowsample1_2048_no_maskEnhance.yaml",
            metrics={"mask_ap": 52.1, "box_ap": 58.3},
            description="Swin-L (ImageNet-22k, 384), 4 backbone scales plus one downsampled level, without "
            "mask-enhanced box initialisation, 50 epochs",
            architecture={**_SWIN_L_ARCHITECTURE, "initialize_box_type": "no"},
        ),
        Release(
            name="maskdino-swinl-coco-instance",
            backbone="Swin-L (IN21k)",
            dataset="coco",
            task="instance",
            file_name="maskdino_swinl_50ep_300q_hid2048_3sd1_instance_maskenhanced_mask52.3ap_box59.0ap.pth",
            official_config="configs/coco/instance-segmentation/swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml",
            metrics={"mask_ap": 52.3, "box_ap": 59.0},
            description="Swin-L (ImageNet-22k, 384), 4 backbone scales plus one downsampled level, mask-enhanced "
            "box initialisation, 50 epochs",
            architecture={**_SWIN_L_ARCHITECTURE, "initialize_box_type": "bitmask"},
        ),
        Release(
            name="maskdino-r50-coco-panoptic",
            backbone="R50",
            dataset="coco",
            task="panoptic",
            file_name="maskdino_r50_50ep_300q_hid2048_3sd1_panoptic_pq53.0.pth",
            official_config="configs/coco/panoptic-segmentation/maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml",
            metrics={"pq": 53.0, "mask_ap": 48.8, "box_ap": 44.3, "miou": 60.6},
            description="ResNet-50, encoder feed-forward width 2048, 3 backbone scales plus one downsampled level, "
            "50 epochs",
            architecture={"initialize_box_type": "no"},
            processor=_PANOPTIC_PROCESSING,
        ),
        Release(
            name="maskdino-swinl-coco-panoptic",
            backbone="Swin-L (IN21k)",
            dataset="coco",
            task="panoptic",
            file_name="maskdino_swinl_50ep_300q_hid2048_3sd1_panoptic_58.3pq.pth",
            official_config="configs/coco/panoptic-segmentation/swin/maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml",
            metrics={"pq": 58.3, "mask_ap": 50.6, "box_ap": 56.2, "miou": 67.5},
            description="Swin-L (ImageNet-22k, 384), 4 backbone scales plus one downsampled level, 50 epochs",
            architecture={**_SWIN_L_ARCHITECTURE, "initialize_box_type": "no"},
            processor=_PANOPTIC_PROCESSING,
        ),
        Release(
            name="maskdino-r50-ade20k-semantic",
            backbone="R50",
            dataset="ade20k",
            task="semantic",
            file_name="maskdino_r50_50ep_100q_celoss_hid1024_3s_semantic_ade20k_48.7miou.pth",
            official_config="configs/ade20k/semantic-segmentation/maskdino_R50_bs16_160k_steplr.yaml",
            metrics={"miou": 48.7},
            description="ResNet-50, 100 learned queries, softmax classifier, encoder feed-forward width 1024, "
            "160k iterations",
            architecture=_SEMANTIC_ARCHITECTURE,
            # scene_parse_150 label maps use 0 for "other": reduced so that class i is label i + 1 in the maps.
            processor={
                **_SEMANTIC_PROCESSING,
                "size": {"shortest_edge": 512, "longest_edge": 2048},
                "do_reduce_labels": True,
            },
        ),
        Release(
            name="maskdino-r50-cityscapes-semantic",
            backbone="R50",
            dataset="cityscapes",
            task="semantic",
            file_name="maskdino_r50_50ep_100q_celoss_hid1024_3s_semantic_cityscapes_79.8miou.pth",
            official_config="configs/cityscapes/semantic-segmentation/maskdino_R50_bs16_90k_steplr.yaml",
            metrics={"miou": 79.8},
            description="ResNet-50, 100 learned queries, softmax classifier, encoder feed-forward width 1024, "
            "90k iterations",
            architecture=_SEMANTIC_ARCHITECTURE,
            processor={**_SEMANTIC_PROCESSING, "size": {"shortest_edge": 1024, "longest_edge": 2048}},
        ),
    )
}


def get_release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"unknown release {name!r}; the releases are: {', '.join(RELEASES)}")
    return RELEASES[name]


def release_config(name: str) -> MaskDINOConfig:
    """The `MaskDINOConfig` of a released checkpoint (see `RELEASES`)."""
    return get_release(name).config()


def releases_table() -> str:
    """The released checkpoints as a Markdown table (name, backbone, data set, task, official metrics, file)."""
    rows = [
        "| name | backbone | data set | task | official metrics | official file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for release in RELEASES.values():
        metrics = ", ".join(f"{_METRIC_NAMES[key]} {value:.1f}" for key, value in release.metrics.items())
        rows.append(
            f"| {release.name} | {release.backbone} | {release.dataset_name} | {release.task} | {metrics} | "
            f"{release.file_name} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------- download


class DownloadError(OSError):
    """A download that did not give the expected file; the message names the file."""


def cache_dir_path(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$MASKDINO_HF_CACHE`, else `~/.cache/maskdino_hf`."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: str | Path, size: int | None = None, sha256: str | None = None) -> Path:
    """Refuse a file whose size or SHA-256 differs from the expected one (where known), naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if size is not None and path.stat().st_size != size:
        raise DownloadError(f"{path} has {path.stat().st_size} bytes, expected {size}: truncated or a different file")
    if sha256 is not None and (actual := file_sha256(path)) != sha256.lower():
        raise DownloadError(f"{path} has SHA-256 {actual}, expected {sha256}: corrupt or a different file")
    return path


def download_file(
    url: str,
    destination: str | Path,
    size: int | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `destination`, resumably.

    Bytes go to `destination.incomplete`; an existing partial file is continued with an HTTP `Range` request (a
    server that ignores it restarts the file). Only a file of the announced (or expected) size and, where given, the
    expected SHA-256 is renamed to `destination`, so an interrupted or refused download never looks complete; an
    existing `destination` is verified and reused.
    """
    from tqdm.auto import tqdm

    destination = Path(destination)
    if destination.is_file():
        return verify_file(destination, size, sha256)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".incomplete")
    start = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not start:  # 416: the partial file already holds every byte
            raise DownloadError(f"downloading {url} to {partial} failed: HTTP {error.code} {error.reason}") from error
        response = None
    except (urllib.error.URLError, TimeoutError) as error:
        raise DownloadError(f"downloading {url} to {partial} failed: {error}") from error
    total = size
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                start = 0
            length = response.headers.get("Content-Length")
            if length is not None:
                total = int(length) + start
            with open(partial, "ab" if resumed else "wb") as handle, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, desc=destination.name, disable=not progress
            ) as bar:
                try:
                    while block := response.read(_CHUNK):
                        handle.write(block)
                        bar.update(len(block))
                except (OSError, http.client.HTTPException) as error:  # a cut connection: IncompleteRead
                    raise DownloadError(
                        f"download of {url} interrupted; {partial} keeps {handle.tell()} bytes and the next call "
                        f"resumes it: {error}"
                    ) from error
    received = partial.stat().st_size
    if total is not None and received < total:
        raise DownloadError(
            f"download of {url} stopped at {received} of {total} bytes; {partial} is kept and the next call resumes it"
        )
    try:
        verify_file(partial, size if size is not None else total, sha256)
    except DownloadError:
        partial.unlink()
        raise
    partial.replace(destination)
    return destination


def download_release(name: str, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The official `.pth` of a release in the cache (downloaded, or resumed, if not there yet)."""
    release = get_release(name)
    destination = cache_dir_path(cache_dir) / release.file_name
    return download_file(release.url, destination, release.size, release.sha256, progress=progress)


# ------------------------------------------------------------------------------------------------------- conversion


def convert_release(
    name: str,
    output_dir: str | Path,
    checkpoint: str | Path | None = None,
    cache_dir: str | Path | None = None,
    push_to_hub: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a released checkpoint into `output_dir` and return it.

    The official `.pth` is `checkpoint` (verified against the release's known size and hash) or downloaded into the
    cache. Every official key is mapped and every model key filled with the right shape, else `ConversionError`.
    Writes `config.json`, `model.safetensors`, `preprocessor_config.json` and the model card `README.md`;
    `push_to_hub` (a repo id) then uploads the folder in one commit.
    """
    from .convert_maskdino_to_hf import load_official_checkpoint, model_from_official

    release = get_release(name)
    if checkpoint is not None:
        path = verify_file(checkpoint, release.size, release.sha256)
    else:
        path = download_release(name, cache_dir, progress=progress)
    model = model_from_official(load_official_checkpoint(path), release.config())
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    release.image_processor().save_pretrained(output_dir)
    write_model_card(output_dir, release=release, model_id=push_to_hub)  # usage examples name the Hub id
    if push_to_hub is not None:
        message = f"Mask DINO {release.name} converted from {release.file_name}"
        upload_folder(output_dir, push_to_hub, commit_message=message)
    return output_dir


def upload_folder(
    folder: str | Path, repo_id: str, commit_message: str, private: bool = False, token: str | None = None
):
    """Create `repo_id` if needed and upload every file of `folder` (weights, config, processor, code, card) in one
    commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)


# ------------------------------------------------------------------------------------------------------ model cards

CITATION = """@inproceedings{li2023mask,
  title={Mask DINO: Towards A Unified Transformer-based Framework for Object Detection and Segmentation},
  author={Li, Feng and Zhang, Hao and Xu, Huaizhe and Liu, Shilong and Zhang, Lei and Ni, Lionel M.
          and Shum, Heung-Yeung},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={3041--3050},
  year={2023}
}"""

_TASK_TEXT = {
    "instance": "instance segmentation and object detection",
    "panoptic": "panoptic segmentation (also instance and semantic segmentation and object detection)",
    "semantic": "semantic segmentation",
    "detection": "object detection",
}
_METRIC_TASKS = {  # metric -> (Hub task type, readable task)
    "mask_ap": ("image-segmentation", "Instance segmentation"),
    "box_ap": ("object-detection", "Object detection"),
    "pq": ("image-segmentation", "Panoptic segmentation"),
    "miou": ("image-segmentation", "Semantic segmentation"),
}

_CARD_TEMPLATE = """---
{card_data}
---

# {title}

[Mask DINO](https://arxiv.org/abs/2206.02777) (Li et al., CVPR 2023) is a unified DETR-style detector and segmenter:
a backbone, a multi-scale deformable-attention pixel decoder and a DINO decoder whose queries each predict a class,
a box and a mask (unified query selection, mask-enhanced box initialisation, unified denoising training). One model
gives boxes, instance, panoptic and semantic masks.

{description}

This model is used for **{task_text}** with {num_labels} classes{dataset_text}.

## Usage

Install the `maskdino-hf` package (`pip install maskdino-hf`), or load the code saved beside the weights with
`trust_remote_code=True`.

```python
import maskdino_hf  # registers Mask DINO with the Auto classes and pipelines
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="{model_id}", subtask="{subtask}")
detector = pipeline("object-detection", model="{model_id}")
```

```python
import torch
from PIL import Image
from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor

model = MaskDINOForUniversalSegmentation.from_pretrained("{model_id}").eval()
processor = MaskDINOImageProcessor.from_pretrained("{model_id}")
image = Image.open("image.jpg").convert("RGB")
inputs = processor(image, return_tensors="pt")
with torch.inference_mode():
    outputs = model(**inputs)
result = processor.{post_process}(outputs, target_sizes=[image.size[::-1]])[0]
```

## Results

{results}

## Citation

```bibtex
{citation}
```
"""


_EVALUATION_KEYS = {"segm_AP": "mask_ap", "bbox_AP": "box_ap", "PQ": "pq", "mIoU": "miou"}


def card_metrics(evaluation: dict[str, float]) -> dict[str, float]:
    """The headline results of `maskdino_hf.evaluation` (fractions: `segm_AP`, `bbox_AP`, `PQ`, `mIoU`) as card
    metrics in percent; absent or NaN results are left out."""
    return {
        ours: round(100.0 * float(evaluation[key]), 2)
        for key, ours in _EVALUATION_KEYS.items()
        if key in evaluation and evaluation[key] == evaluation[key]
    }


def _results_table(metrics: dict[str, float], source: str) -> str:
    if not metrics:
        return "No evaluation results were recorded."
    header = "| " + " | ".join(_METRIC_NAMES.get(key, key) for key in metrics) + " |"
    values = "| " + " | ".join(f"{value:.1f}" for value in metrics.values()) + " |"
    return f"{source}\n\n{header}\n| {' | '.join('---' for _ in metrics)} |\n{values}"


def build_model_card(
    config: MaskDINOConfig,
    task: str,
    model_id: str,
    metrics: dict[str, float] | None = None,
    dataset: str | None = None,
    dataset_name: str | None = None,
    base_model: str | None = None,
    description: str = "",
    metrics_source: tuple[str, str] | None = None,
) -> ModelCard:
    """A Hub model card: YAML metadata (`library_name`, `pipeline_tag`, `tags`, `datasets`, `license`,
    `base_model`, `model-index`), the architecture and task, usage, results and the citation.

    `metrics` maps `mask_ap` / `box_ap` / `pq` / `miou` to percentages (official or evaluated); `metrics_source`
    is `(name, url)` of where they come from.
    """
    if task not in _TASK_TEXT:
        raise ValueError(f"task must be one of {sorted(_TASK_TEXT)}, got {task!r}")
    metrics = dict(metrics or {})
    unknown = sorted(set(metrics) - set(_METRIC_TASKS))
    if unknown:
        raise ValueError(f"metrics {unknown} are unknown; allowed: {sorted(_METRIC_TASKS)}")
    source_name, source_url = metrics_source or (None, None)
    eval_results = [
        EvalResult(
            task_type=_METRIC_TASKS[key][0],
            task_name=_METRIC_TASKS[key][1],
            dataset_type=dataset or "custom",
            dataset_name=dataset_name or dataset or "custom",
            metric_type=key,
            metric_name=_METRIC_NAMES[key],
            metric_value=float(value),
            source_name=source_name,
            source_url=source_url,
        )
        for key, value in metrics.items()
    ]
    backbone = getattr(config.backbone_config, "model_type", "resnet")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="object-detection" if task == "detection" else "image-segmentation",
        license="apache-2.0",
        tags=["maskdino", "vision", "image-segmentation", "object-detection", task, backbone],
        datasets=[dataset] if dataset else None,
        base_model=base_model,
        model_name=model_id.split("/")[-1],
        eval_results=eval_results or None,
    )
    subtask = "panoptic" if task == "panoptic" else "semantic" if task == "semantic" else "instance"
    post_process = {
        "panoptic": "post_process_panoptic_segmentation",
        "semantic": "post_process_semantic_segmentation",
        "detection": "post_process_object_detection",
    }.get(task, "post_process_instance_segmentation")
    source = f"From [{source_name}]({source_url})." if source_name else "Evaluated with `maskdino_hf.evaluation`."
    if base_model:
        description = f"{description}\n\nFine-tuned from [{base_model}](https://huggingface.co/{base_model}).".strip()
    content = _CARD_TEMPLATE.format(
        card_data=data.to_yaml(),
        title=f"Mask DINO: {model_id.split('/')[-1]}",
        description=description,
        task_text=_TASK_TEXT[task],
        num_labels=config.num_labels,
        dataset_text=f" ({dataset_name or dataset})" if dataset else "",
        model_id=model_id,
        subtask=subtask,
        post_process=post_process,
        results=_results_table(metrics, source),
        citation=CITATION,
    )
    return ModelCard(content)


def release_model_card(release: Release, model_id: str | None = None) -> ModelCard:
    """The card of a converted release: official metrics with the official README as their source."""
    return build_model_card(
        release.config(),
        release.task,
        model_id or release.name,
        metrics=release.metrics,
        dataset=release.hub_dataset,
        dataset_name=release.dataset_name,
        description=(
            f"Official weights `{release.file_name}` ({release.description}) from [{OFFICIAL_REPOSITORY}]"
            f"({OFFICIAL_REPOSITORY}), converted with maskdino-hf; official configuration "
            f"`{release.official_config}`."
        ),
        metrics_source=("the official Mask DINO README", f"{OFFICIAL_REPOSITORY}#results"),
    )


def write_model_card(
    model_dir: str | Path,
    release: Release | str | None = None,
    model_id: str | None = None,
    **card_kwargs: Any,
) -> Path:
    """Write `README.md` into a saved model folder: the release's card, or `build_model_card(config, **card_kwargs)`
    with the folder's config (fine-tuned models: pass `task`, `metrics`, `dataset`, `base_model`)."""
    model_dir = Path(model_dir)
    if release is not None:
        release = get_release(release) if isinstance(release, str) else release
        card = release_model_card(release, model_id)
    else:
        config = MaskDINOConfig.from_pretrained(model_dir)
        card = build_model_card(config, model_id=model_id or model_dir.name, **card_kwargs)
    path = model_dir / "README.md"
    card.save(path)
    return path


__all__ = [
    "RELEASES",
    "DownloadError",
    "Release",
    "build_model_card",
    "card_metrics",
    "convert_release",
    "download_file",
    "download_release",
    "file_sha256",
    "get_release",
    "release_config",
    "release_model_card",
    "releases_table",
    "upload_folder",
    "verify_file",
    "write_model_card",
]
