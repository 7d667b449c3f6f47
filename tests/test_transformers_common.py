"""Transformers' own common tests (`ModelTesterMixin`, `ConfigTester`) run against Mask DINO.

The mixins are those of the installed Transformers version, taken from its source distribution, which pip fetches
once into a cache (`$MASKDINO_TRANSFORMERS_TESTS_CACHE`, default `~/.cache/maskdino_hf/transformers-tests/<version>`);
no Transformers code is kept in this repository. Without network access on the first run the module is skipped,
saying so.

The source distribution ships `tests/test_*_common.py` but not the packages they import, so this module provides
stand-ins for them:
- `tests/exporters/test_export.py` (`ExportTesterMixin`, the base class of `ModelTesterMixin`): an empty mixin,
  so the export-backend tests do not run here (`tests/test_export.py` covers `torch.export` and ONNX);
- `tests/generation/test_utils.py` (`GenerationTesterMixin`): an empty class, since Mask DINO does not generate
  (the mixin only checks that non-generative testers do not inherit it);
- `tests/utils/test_configuration_utils.py` (`config_common_kwargs`): read only by a `ConfigTester` check that
  returns early for configs with sub-configs, as this one (the backbone);
- `utils/fetch_hub_objects_for_ci.py` (`url_to_local_path`): needed only to import the image-processing mixin;
- the repository's empty `tests/__init__.py`, written into the cache.

As in Transformers' own Mask2Former and Deformable DETR tests, the attention, hidden-state and retain-grad tests
are written for this model's output layout (deformable attention weights, multi-scale token sequences) and the
training test passes segmentation targets; every other test is the mixin's own.
"""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import tiny_config

from maskdino_hf import (
    MaskDINOConfig,
    MaskDINOForUniversalSegmentation,
    MaskDINOForUniversalSegmentationOutput,
    MaskDINOImageProcessor,
    MaskDINOModel,
)
from maskdino_hf.random_source import MaskDINORandomSource

VERSION = transformers.__version__
CACHE = Path(
    os.environ.get("MASKDINO_TRANSFORMERS_TESTS_CACHE", Path.home() / ".cache" / "maskdino_hf" / "transformers-tests")
) / VERSION
PACKAGE = "transformers_sdist_tests"
NEEDED = ("test_modeling_common.py", "test_configuration_common.py")


def _fetch_transformers_tests() -> Path:
    """The `tests/` folder of the installed version's source distribution, downloaded and extracted once."""
    tests = CACHE / "tests"
    if all((tests / name).is_file() for name in NEEDED):
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"transformers=={VERSION}", "-d", work,
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip could not fetch the transformers {VERSION} source distribution in 10 minutes", allow_module_level=True)
        archives = sorted(Path(work).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(
                f"pip could not fetch the transformers {VERSION} source distribution (no network?): {reason}",
                allow_module_level=True,
            )
        prefix = f"transformers-{VERSION}/tests/"
        with tarfile.open(archives[0]) as archive:
            members = [member for member in archive.getmembers() if member.name.startswith(prefix) and member.isfile()]
            archive.extractall(work, members=members, filter="data")
        extracted = Path(work) / prefix
        missing = [name for name in NEEDED if not (extracted / name).is_file()]
        if missing:
            pytest.skip(f"the transformers {VERSION} source distribution has no tests/{missing[0]}", allow_module_level=True)
        # The repository's empty `tests/__init__.py` (read by `direct_transformers_import`) is not in the sdist.
        (extracted / "__init__.py").touch()
        if not tests.exists():
            extracted.rename(tests)
    return tests


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[name] = module


def _import_mixins(tests: Path):
    """Import the sdist's test modules as the package `transformers_sdist_tests`, with the stand-ins above."""
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(tests)]
        sys.modules[PACKAGE] = package
        _stand_in(f"{PACKAGE}.exporters")
        _stand_in(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
        _stand_in(f"{PACKAGE}.generation")
        _stand_in(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
        _stand_in(f"{PACKAGE}.utils")
        _stand_in(f"{PACKAGE}.utils.test_configuration_utils", config_common_kwargs={})
        _stand_in("fetch_hub_objects_for_ci", url_to_local_path=_no_hub_download)
    with warnings.catch_warnings():
        # The sdist's tests use pytest marks registered by Transformers' own conftest (flash_attn_test, ...).
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
        configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
        image_processing = importlib.import_module(f"{PACKAGE}.test_image_processing_common")
    return modeling, configuration, image_processing


def _no_hub_download(url: str) -> str:
    """Stand-in for the CI's Hub-object cache: the tests here never load Hub images."""
    raise FileNotFoundError(f"no local copy of {url}: this test module reads nothing from the Hub")


pytest.importorskip("parameterized", reason="Transformers' common tests import `parameterized` (test extra)")
_modeling_common, _configuration_common, _image_processing_common = _import_mixins(_fetch_transformers_tests())
ModelTesterMixin = _modeling_common.ModelTesterMixin
ConfigTester = _configuration_common.ConfigTester
ImageProcessingTestMixin = _image_processing_common.ImageProcessingTestMixin
ImageProcessingTester = _image_processing_common.ImageProcessingTester
PostProcessSemanticSegmentationTestMixin = _image_processing_common.PostProcessSemanticSegmentationTestMixin


class MaskDINOModelTester:
    """Tiny Mask DINO (hidden size 32, 1 encoder and 2 decoder layers, 10 queries: ~140k parameters) and inputs."""

    def __init__(self, parent, batch_size: int = 2, height: int = 64, width: int = 96, num_labels: int = 5):
        self.parent = parent
        self.batch_size = batch_size
        self.height = height
        self.width = width
        self.num_labels = num_labels
        self.num_queries = 10
        self.hidden_size = 32
        self.num_hidden_layers = 2  # decoder layers
        self.num_attention_heads = 4
        self.is_training = True

    def get_config(self) -> MaskDINOConfig:
        return tiny_config(
            hidden_size=self.hidden_size, decoder_attention_heads=self.num_attention_heads,
            decoder_layers=self.num_hidden_layers, num_queries=self.num_queries, num_labels=self.num_labels,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = torch.randn(self.batch_size, 3, self.height, self.width, device=_modeling_common.torch_device)
        pixel_mask = torch.ones(self.batch_size, self.height, self.width, dtype=torch.long, device=pixel_values.device)
        return self.get_config(), {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def labels(self, device) -> dict:
        """Segmentation targets, and a private random source for the loss's point sampling, so that two calls with
        inputs prepared alike draw alike (the mixin compares such calls)."""
        generator = torch.Generator().manual_seed(0)
        masks = [(torch.rand(count, self.height, self.width, generator=generator) > 0.5).float().to(device) for count in (3, 2)]
        classes = [torch.tensor([0, 1, 4], device=device), torch.tensor([2, 3], device=device)]
        return {
            "mask_labels": masks[: self.batch_size],
            "class_labels": classes[: self.batch_size],
            "random_source": MaskDINORandomSource(torch.Generator().manual_seed(1)),
        }

    def num_tokens(self, config: MaskDINOConfig) -> int:
        """Encoder tokens over all levels: strides 8, 16, 32 and one extra level at 64."""
        strides = [8, 16, 32, 64][: config.num_feature_levels]
        return sum(-(-self.height // stride) * -(-self.width // stride) for stride in strides)


class MaskDINOModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MaskDINOModel, MaskDINOForUniversalSegmentation)
    pipeline_model_mapping = {}
    is_encoder_decoder = False
    test_resize_embeddings = False
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = MaskDINOModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MaskDINOConfig, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = copy.deepcopy(inputs_dict)
        if return_labels and model_class is MaskDINOForUniversalSegmentation:
            inputs_dict.update(self.model_tester.labels(inputs_dict["pixel_values"].device))
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_attention_outputs(self):
        """Deformable attention weights of the encoder, self- and cross-attention weights of the decoder, from the
        argument and from the config (the mixin's version expects square token attention maps)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        tokens = self.model_tester.num_tokens(config)
        queries = self.model_tester.num_queries
        heads = self.model_tester.num_attention_heads
        for model_class in self.all_model_classes:
            for from_config in (False, True):
                model_config = copy.deepcopy(config)
                model_config.output_attentions = from_config
                model = model_class(model_config).eval()
                with torch.no_grad():
                    outputs = model(**inputs) if from_config else model(**inputs, output_attentions=True)
                self.assertEqual(len(outputs.encoder_attentions), config.encoder_layers)
                self.assertEqual(
                    tuple(outputs.encoder_attentions[0].shape),
                    (2, tokens, config.encoder_attention_heads, config.num_feature_levels, config.encoder_n_points),
                )
                self.assertEqual(len(outputs.decoder_attentions), config.decoder_layers)
                self.assertEqual(tuple(outputs.decoder_attentions[0].shape), (2, heads, queries, queries))
                self.assertEqual(len(outputs.cross_attentions), config.decoder_layers)
                self.assertEqual(
                    tuple(outputs.cross_attentions[0].shape),
                    (2, queries, heads, config.num_feature_levels, config.decoder_n_points),
                )

    def test_hidden_states_output(self):
        """Per-layer states of the deformable encoder (input first) and of the decoder (input queries first)."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        tokens = self.model_tester.num_tokens(config)
        for model_class in self.all_model_classes:
            for from_config in (False, True):
                model_config = copy.deepcopy(config)
                model_config.output_hidden_states = from_config
                model = model_class(model_config).eval()
                with torch.no_grad():
                    outputs = model(**inputs) if from_config else model(**inputs, output_hidden_states=True)
                self.assertEqual(len(outputs.encoder_hidden_states), config.encoder_layers + 1)
                self.assertEqual(tuple(outputs.encoder_hidden_states[0].shape), (2, tokens, config.feature_size))
                self.assertEqual(len(outputs.decoder_hidden_states), config.decoder_layers + 1)
                self.assertEqual(
                    tuple(outputs.decoder_hidden_states[0].shape), (2, self.model_tester.num_queries, config.hidden_size)
                )

    def test_retain_grad_hidden_states_attentions(self):
        """Every returned state and attention tensor is on the path of the training loss."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.output_hidden_states = True
        config.output_attentions = True
        model = MaskDINOForUniversalSegmentation(config).train()
        outputs = model(**self._prepare_for_class(inputs, MaskDINOForUniversalSegmentation, return_labels=True))
        watched = [
            outputs.encoder_hidden_states[0], outputs.decoder_hidden_states[0], outputs.intermediate_hidden_states,
            outputs.encoder_attentions[0], outputs.decoder_attentions[0], outputs.cross_attentions[0],
        ]
        for tensor in watched:
            tensor.retain_grad()
        outputs.loss.backward()
        for tensor in watched:
            self.assertIsNotNone(tensor.grad)

    @unittest.skip(reason="Mask DINO has no token embeddings (get_input_embeddings), like Mask2Former")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="Mask DINO takes pixel_values, not inputs_embeds, like Mask2Former")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Mask DINO has no token embeddings to resize, like Mask2Former")
    def test_resize_tokens_embeddings(self):
        pass


class MaskDINOImageProcessingTester(ImageProcessingTester):
    """Small images resized to a short side of 32 (long side at most 64) and padded to a multiple of 32."""

    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"shortest_edge": 32, "longest_edge": 64})
        kwargs.setdefault("size_divisibility", 32)
        kwargs.setdefault("num_labels", 5)
        super().__init__(parent, batch_size=3, min_resolution=20, max_resolution=80, **kwargs)

    def prepare_post_process_semantic_segmentation_inputs(self) -> tuple[dict, dict]:
        """Mask DINO outputs (10 queries, sigmoid class logits, masks at 1/4 of a 32 x 64 padded input); without
        target sizes the semantic map has the padded input's size."""
        generator = torch.Generator().manual_seed(0)
        outputs = MaskDINOForUniversalSegmentationOutput(
            class_queries_logits=torch.randn(self.batch_size, 10, self.num_labels, generator=generator),
            masks_queries_logits=torch.randn(self.batch_size, 10, 8, 16, generator=generator),
        )
        return {"outputs": outputs}, {"num_labels": self.num_labels, "height": 32, "width": 64}

    def _get_image_processing_classes(self) -> dict:
        # The mixin finds the classes by the test file's folder name (`tests/models/<model>/`); ours is `tests/`.
        return {"pil": MaskDINOImageProcessor}

    def expected_output_image_shape(self, images) -> tuple[int, int, int]:
        """detectron2's `ResizeShortestEdge` (scale the short side to `shortest_edge` unless the long side would pass
        `longest_edge`, then round half up; Transformers' rule rounds differently), then padding of the largest
        image up to `size_divisibility`."""
        heights, widths = [], []
        for image in images:
            if isinstance(image, Image.Image):
                width, height = image.size
            elif isinstance(image, np.ndarray):
                height, width = image.shape[:2]
            else:
                height, width = image.shape[-2:]
            scale = self.size["shortest_edge"] / min(height, width)
            if max(height, width) * scale > self.size["longest_edge"]:
                scale = self.size["longest_edge"] / max(height, width)
            heights.append(int(height * scale + 0.5))
            widths.append(int(width * scale + 0.5))
        divisor = self.size_divisibility
        return self.num_channels, -(-max(heights) // divisor) * divisor, -(-max(widths) // divisor) * divisor


class MaskDINOImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = MaskDINOImageProcessingTester

    @unittest.skip(
        reason="the processor has the PIL backend only: torchvision does not install beside the CPU torch this "
        "project pins (a Transformers rule for models added to Transformers itself)"
    )
    def test_new_models_require_torchvision_backend(self):
        pass
