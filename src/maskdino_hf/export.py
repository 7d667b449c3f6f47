"""Compiled and exported inference: `torch.compile` (Inductor), and ONNX export run by ONNX Runtime.

* `compile_model(model)` compiles the model in place with `torch.compile` (what `maskdino-hf predict --compile`
  does); the model is then called as before.
* `export_onnx(model, path)` writes the inference forward pass (pixel values and pixel mask in; final class
  logits, mask logits and boxes out) as an ONNX model through `torch.onnx.export(..., dynamo=True)`: for any input
  size (height and width are dynamic), or with `input_size=(height, width)` for that size only (pad every batch to it
  with the processor's `pad_size`). `MaskDINOOnnxModel(path)` runs such a file with `onnxruntime` and returns a
  `MaskDINOForUniversalSegmentationOutput`, so the image processor's `post_process_*` methods take its outputs as they
  take the model's. Both need the `export` extra (`onnx`, `onnxruntime`, `onnxscript`).

Both equal eager PyTorch to 1e-4 (tests/test_deploy.py, tests/test_export.py); `benchmarks/deploy.py` times them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .configuration_maskdino import MaskDINOConfig
from .modeling_maskdino import (
    MaskDINOForUniversalSegmentation,
    MaskDINOForUniversalSegmentationOutput,
    check_input_size,
    check_pixel_tensor,
)

INPUT_NAMES = ("pixel_values", "pixel_mask")
# The largest height and width of an export for any size (torch.export needs a bound; 8192 covers every use here).
MAX_DYNAMIC_SIDE = 8192
MAX_DYNAMIC_BATCH = 1024
# Backbones whose forward pass exports for any size and batch (checked against eager in tests/test_export.py). Others
# branch on the size (a Swin backbone pads to its windows): torch.export refuses them, after minutes of tracing.
DYNAMIC_SIZE_BACKBONES = ("resnet",)
_NOT_DYNAMIC = (
    "this model ({backbone} backbone) cannot be exported for any input size and batch ({reason}); export it for "
    "one: export_onnx(model, path, input_size=(height, width), batch_size=N), or maskdino-hf export --height H "
    "--width W --batch-size N"
)
# ONNX metadata keys: the model's config (JSON) and its encoder strides, for the runner's input checks.
CONFIG_KEY, STRIDES_KEY = "maskdino_config", "maskdino_encoder_strides"
OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits", "pred_boxes")

__all__ = [
    "INPUT_NAMES", "OUTPUT_NAMES", "MaskDINOInferenceModule", "MaskDINOOnnxModel", "compile_model",
    "dynamic_size_range", "export_onnx",
]


def compile_model(
    model: MaskDINOForUniversalSegmentation, dynamic: bool | None = None, mode: str | None = None
) -> MaskDINOForUniversalSegmentation:
    """Compile `model` in place with `torch.compile` (Inductor, one graph: `fullgraph=True`) and return it.

    Compilation happens on the first call (a minute or more on 2 CPU cores; Inductor on CPU needs a C++ compiler)
    and again for an input whose shape the compiled graph does not cover. `dynamic=None` (Torch's default; use it
    for images of varying sizes): the first size gets static kernels; at the first other size Torch recompiles with
    symbolic height and width, and later sizes reuse that graph unless they cross one of the guards the trace adds
    (at small sizes, the convolutions' layout thresholds). `dynamic=False`: one static compilation per padded size,
    up to Torch's recompile limit (8; then it runs eager): best when every input has one size (the processor's
    `pad_size`). `dynamic=True`: symbolic sizes from the first call.
    `mode`: `torch.compile`'s mode (e.g. "max-autotune" on a GPU)."""
    if not isinstance(model, MaskDINOForUniversalSegmentation):
        raise TypeError(f"model must be a MaskDINOForUniversalSegmentation, got {type(model).__name__}")
    model.compile(fullgraph=True, dynamic=dynamic, mode=mode)
    return model


def _require(package: str) -> None:
    """Import `package` or raise an ImportError that names the extra to install."""
    import importlib

    try:
        importlib.import_module(package)
    except ImportError as error:
        raise ImportError(
            f"ONNX export and ONNX Runtime need {package!r}: pip install 'maskdino-hf[export]' "
            "(onnx, onnxruntime, onnxscript)"
        ) from error


class MaskDINOInferenceModule(nn.Module):
    """The inference forward pass with plain tensor inputs and outputs (what exporters trace): `(pixel_values,
    pixel_mask)` -> `(class_queries_logits, masks_queries_logits, pred_boxes)`."""

    def __init__(self, model: MaskDINOForUniversalSegmentation):
        super().__init__()
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values, pixel_mask=pixel_mask)
        return outputs.class_queries_logits, outputs.masks_queries_logits, outputs.pred_boxes


def dynamic_size_range(model: MaskDINOForUniversalSegmentation | Sequence[int]) -> tuple[int, int]:
    """(smallest, largest) height and width an ONNX export for any size takes, from the model or its encoder strides:
    sides above the coarsest stride (a level one cell wide or tall would be traced as a special case) up to
    `MAX_DYNAMIC_SIDE`."""
    strides = model.model.encoder_strides if isinstance(model, MaskDINOForUniversalSegmentation) else model
    return max(strides) + 1, MAX_DYNAMIC_SIDE


def _example_size(model: MaskDINOForUniversalSegmentation) -> tuple[int, int]:
    """A traced input size for an export for any size: unequal sides (equal ones would be traced as equal),
    multiples of 32, with enough encoder tokens for the queries."""
    strides = model.model.encoder_strides
    height = 32 * (max(strides) // 32 + 2)
    while True:
        width = height + 32
        try:
            check_input_size(model.config, strides, 1, height, width)
            return height, width
        except ValueError:
            height += 32


def export_onnx(
    model: MaskDINOForUniversalSegmentation,
    path: str | os.PathLike,
    input_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
    opset_version: int | None = None,
) -> Path:
    """Export `model`'s inference forward pass to the ONNX file `path` (written with its folder) and return it.

    The file takes `pixel_values` (batch_size, 3, height, width) float32 and `pixel_mask` (batch_size, height,
    width) int64 (1 on real pixels), as the image processor returns them; outputs: `OUTPUT_NAMES`. With
    `input_size=None` (the default) height and width are dynamic: any size from `dynamic_size_range(model)`, so each
    batch keeps the processor's own padding. With `input_size=(height, width)` the file takes that size only: pad
    every batch to it with `processor(images, pad_size={"height": height, "width": width})`; its graph is smaller and
    ONNX Runtime may optimise it further. Likewise `batch_size=None` (the default) takes batches of any size (up to
    `MAX_DYNAMIC_BATCH`), an int that one only. Dynamic sizes and batches need a backbone of
    `DYNAMIC_SIZE_BACKBONES` (ResNet); other models export for one size and batch. The file's metadata holds the
    model's config, so `MaskDINOOnnxModel` refuses an input the model itself would refuse. Weights are stored in the
    file. Needs `onnx`, `onnxruntime` and `onnxscript` (the `export` extra).
    """
    if not isinstance(model, MaskDINOForUniversalSegmentation):
        raise TypeError(f"model must be a MaskDINOForUniversalSegmentation, got {type(model).__name__}")
    if input_size is not None and (
        len(input_size) != 2 or not all(isinstance(side, int) and side > 0 for side in input_size)
    ):
        raise ValueError(f"input_size must be (height, width) in pixels, or None for any size, got {input_size!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a whole number >= 1, or None for any, got {batch_size!r}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must name an .onnx file, got {str(path)!r}")
    for package in ("onnx", "onnxscript"):
        _require(package)
    backbone = model.config.backbone_config.model_type
    if (input_size is None or batch_size is None) and backbone not in DYNAMIC_SIZE_BACKBONES:
        raise ValueError(_NOT_DYNAMIC.format(backbone=backbone, reason="its graph has not been verified for any size"))
    strides = model.model.encoder_strides
    if input_size is not None:
        check_input_size(model.config, strides, batch_size or 1, *input_size)
    size = _example_size(model) if input_size is None else input_size
    # A traced dimension of size 1 is specialised, so a batch of any size is traced with two images.
    traced_batch = 2 if batch_size is None else batch_size
    pixel_values_dims, pixel_mask_dims = {}, {}
    if batch_size is None:
        batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
        pixel_values_dims[0] = pixel_mask_dims[0] = batch
    if input_size is None:
        low, high = dynamic_size_range(model)
        height, width = torch.export.Dim("height", min=low, max=high), torch.export.Dim("width", min=low, max=high)
        pixel_values_dims.update({2: height, 3: width})
        pixel_mask_dims.update({1: height, 2: width})
    dynamic_shapes = None
    if pixel_values_dims:
        dynamic_shapes = {"pixel_values": pixel_values_dims, "pixel_mask": pixel_mask_dims}
    parameter = next(model.parameters())
    pixel_values = torch.randn(traced_batch, 3, *size, generator=torch.Generator().manual_seed(0))
    inputs = (
        pixel_values.to(device=parameter.device, dtype=parameter.dtype),
        torch.ones(traced_batch, *size, dtype=torch.long, device=parameter.device),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # torch.export first, with its guards: torch.onnx.export alone would fall back to a graph that drops the
            # guards it cannot keep, which is then wrong at other sizes instead of refused.
            try:
                exported = torch.export.export(
                    MaskDINOInferenceModule(model).eval(), inputs, dynamic_shapes=dynamic_shapes
                )
            except RuntimeError as error:
                if dynamic_shapes is None or "Constraints violated" not in str(error):
                    raise
                lines = str(error).splitlines()  # the headline, then one line per violated guard
                reason = "torch.export: " + lines[min(1, len(lines) - 1)].strip(" -")
                raise ValueError(_NOT_DYNAMIC.format(backbone=backbone, reason=reason)) from None
            program = torch.onnx.export(
                exported, dynamo=True, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                opset_version=opset_version, verbose=False,
            )
    finally:
        model.train(was_training)
    program.model.metadata_props.update(
        {CONFIG_KEY: model.config.to_json_string(use_diff=False), STRIDES_KEY: json.dumps(strides)}
    )
    program.save(str(path))
    return path


class MaskDINOOnnxModel:
    """An exported Mask DINO run by ONNX Runtime; called like the model on the image processor's tensors.

    `providers`: ONNX Runtime execution providers (default: CUDA when this onnxruntime has it, else CPU).
    `intra_op_num_threads`: threads of one run (default: ONNX Runtime's choice, all cores).
    `spin`: ONNX Runtime's threads keep spinning after a run (its default: lower latency for back-to-back runs);
    `False` frees the cores at once for other work, such as PyTorch between runs."""

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        intra_op_num_threads: int | None = None,
        spin: bool = True,
    ):
        _require("onnxruntime")
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {str(path)!r} not found (write one with export_onnx)")
        if providers is None:
            available = onnxruntime.get_available_providers()
            providers = [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]
        options = onnxruntime.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=list(providers))
        names = tuple(output.name for output in self.session.get_outputs())
        if names != OUTPUT_NAMES:
            raise ValueError(f"{str(path)!r} has outputs {names}, not those of export_onnx {OUTPUT_NAMES}")
        # An exporter drops an input the graph does not read.
        self.input_names = [entry.name for entry in self.session.get_inputs()]
        shape = self.session.get_inputs()[0].shape
        # Dynamic dimensions are named (strings) rather than sized: None here.
        self.batch_size = shape[0] if isinstance(shape[0], int) else None
        self.input_size = (shape[2], shape[3]) if all(isinstance(side, int) for side in shape[2:]) else None
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.config = MaskDINOConfig.from_dict(json.loads(metadata[CONFIG_KEY])) if CONFIG_KEY in metadata else None
        self.encoder_strides = json.loads(metadata[STRIDES_KEY]) if STRIDES_KEY in metadata else None

    def _check_size(self, pixel_values: torch.Tensor) -> None:
        """Refuse a batch this file was not exported for, or that the model itself would refuse."""
        check_pixel_tensor(pixel_values)  # as the model checks it: a float (batch, 3, height, width) tensor
        batch_size, _, height, width = pixel_values.shape
        if self.input_size is not None and (height, width) != tuple(self.input_size):
            fixed_height, fixed_width = self.input_size
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: this ONNX model was exported for height x width "
                f"{fixed_height} x {fixed_width}; pad batches to it with "
                f"processor(images, pad_size={{'height': {fixed_height}, 'width': {fixed_width}}}), or export it for "
                "any size (export_onnx without input_size)"
            )
        if isinstance(self.batch_size, int) and batch_size != self.batch_size:
            raise ValueError(
                f"pixel_values has a batch of {batch_size}: this ONNX model was exported for batches of "
                f"{self.batch_size} (export_onnx(..., batch_size=N))"
            )
        if self.input_size is None and self.encoder_strides is not None:
            low, high = dynamic_size_range(self.encoder_strides)
            if not (low <= height <= high and low <= width <= high):
                raise ValueError(
                    f"pixel_values of size {(height, width)}: this ONNX model takes heights and widths from {low} to "
                    f"{high} px"
                )
        if self.config is not None:
            check_input_size(self.config, self.encoder_strides, batch_size, height, width)

    def __call__(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> MaskDINOForUniversalSegmentationOutput:
        """Outputs on the CPU (`class_queries_logits`, `masks_queries_logits`, `pred_boxes`); `pixel_mask`
        defaults to all ones."""
        self._check_size(pixel_values)
        if pixel_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long)
        elif tuple(pixel_mask.shape) != (pixel_values.shape[0], *pixel_values.shape[-2:]):
            raise ValueError(
                f"pixel_mask must have shape (batch, height, width) = "
                f"{(pixel_values.shape[0], *pixel_values.shape[-2:])}, got {tuple(pixel_mask.shape)}"
            )
        arrays = {
            "pixel_values": pixel_values.detach().float().cpu().numpy(),
            "pixel_mask": pixel_mask.detach().long().cpu().numpy(),
        }
        feeds = {name: arrays[name] for name in self.input_names}
        outputs = self.session.run(list(OUTPUT_NAMES), feeds)
        return MaskDINOForUniversalSegmentationOutput(
            **{name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, outputs)}
        )
