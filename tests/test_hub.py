"""Sharing a Mask DINO checkpoint: `save_pretrained` writes the code and `auto_map` for remote code, a machine with
only `transformers` (and its own dependencies) loads the folder with `trust_remote_code=True`, and `push_to_hub`
uploads the right files.

The remote-code check runs in a fresh interpreter started with `-S` (no site-packages processing, so no editable
install of `maskdino_hf`) whose only library path is a directory of links to the distributions that `transformers`,
`torch` and `pillow` require (their dependency closure from the installed metadata): `maskdino_hf`, `kernels`,
`pycocotools`, `scipy`, `timm`, `accelerate`... are absent there, as on a machine with only `transformers`.

`push_to_hub` is tested offline: `HfApi.create_repo` / `HfApi.create_commit` and the model-card download are replaced
by recorders, everything else (`PushToHubMixin.push_to_hub`, `save_pretrained` into its temporary folder,
`CommitOperationAdd`) is the real code; the test checks the commit it would have made.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import FIXTURES, converted_model, tiny_config
from huggingface_hub.errors import EntryNotFoundError
from packaging.requirements import Requirement
from PIL import Image
from safetensors.torch import load as load_safetensors
from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import maskdino_hf
from maskdino_hf import MaskDINOConfig, MaskDINOForUniversalSegmentation, MaskDINOImageProcessor

CASE = "panoptic_r50_batch"
IMAGE = FIXTURES / CASE / "inputs" / "image0_original.png"
PACKAGE_DIR = Path(maskdino_hf.__file__).resolve().parent
# The modeling file and everything it imports relatively (recursively), which is what `save_pretrained` copies and
# what Transformers copies into its dynamic-module cache; it must include at least REQUIRED_MODEL_CODE.
MODEL_CODE = {"modeling_maskdino.py"} | {
    Path(path).name for path in get_relative_import_files(str(PACKAGE_DIR / "modeling_maskdino.py"))
}
REQUIRED_MODEL_CODE = {
    "configuration_maskdino.py",
    "modeling_maskdino.py",
    "ms_deform_attn.py",
    "random_source.py",
    "loss_maskdino.py",
}
PROCESSOR_CODE = {"image_processing_maskdino.py"}
OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits", "pred_boxes")





def _run_model(model, processor, image):
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return inputs, outputs


def _post_processed(processor, outputs, size) -> dict[str, torch.Tensor]:
    instance = processor.post_process_instance_segmentation(outputs, target_sizes=[size])[0]
    panoptic = processor.post_process_panoptic_segmentation(outputs, target_sizes=[size])[0]
    semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0]
    detection = processor.post_process_object_detection(outputs, target_sizes=[size])[0]
    return {
        "instance_scores": instance["scores"],
        "instance_labels": instance["labels"],
        "instance_masks": instance["masks"],
        "panoptic_segmentation": panoptic["segmentation"],
        "panoptic_labels": torch.tensor([s["label_id"] for s in panoptic["segments_info"]], dtype=torch.int64),
        "semantic": semantic,
        "detection_boxes": detection["boxes"],
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The converted fixture model and its processor, saved to one folder as a user would share them."""
    model, processor = converted_model(CASE)
    folder = tmp_path_factory.mktemp("maskdino_saved")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model.eval(), processor


# ---------------------------------------------------------------------------------------------------------------------
# save_pretrained: code files and auto_map
# ---------------------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_code_and_auto_map(saved, tmp_path):
    _, model, processor = saved
    folder = tmp_path / "fresh"  # saved here, so that the copies are compared with the package files of the moment
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    files = {path.name for path in folder.iterdir()}
    assert files == {"config.json", "model.safetensors", "preprocessor_config.json"} | MODEL_CODE | PROCESSOR_CODE
    for name in MODEL_CODE | PROCESSOR_CODE:  # verbatim copies of the package modules
        assert (folder / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "maskdino"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_maskdino.MaskDINOConfig",
        "AutoModelForUniversalSegmentation": "modeling_maskdino.MaskDINOForUniversalSegmentation",
        # the image-segmentation and object-detection pipelines load through these
        "AutoModelForImageSegmentation": "modeling_maskdino.MaskDINOForUniversalSegmentation",
        "AutoModelForObjectDetection": "modeling_maskdino.MaskDINOForUniversalSegmentation",
    }
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == {"AutoImageProcessor": "image_processing_maskdino.MaskDINOImageProcessor"}
    assert preprocessor["image_processor_type"] == "MaskDINOImageProcessor"


def test_every_relative_import_of_the_saved_code_is_saved_with_it(saved):
    """What Transformers copies into its dynamic-module cache is the file plus its relative imports, recursively."""
    folder, _, _ = saved
    assert REQUIRED_MODEL_CODE <= MODEL_CODE
    model_files = {Path(p).name for p in get_relative_import_files(str(folder / "modeling_maskdino.py"))}
    assert model_files | {"modeling_maskdino.py"} == MODEL_CODE
    assert all((folder / name).is_file() for name in MODEL_CODE)
    assert get_relative_import_files(str(folder / "image_processing_maskdino.py")) == []


def test_optional_packages_are_not_required_imports_of_the_saved_code(saved):
    """`check_imports` refuses remote code whose (unguarded, anywhere in the file) imports are missing."""
    folder, _, _ = saved
    required = set()
    for name in MODEL_CODE | PROCESSOR_CODE:
        required |= set(get_imports(str(folder / name))) - set(sys.stdlib_module_names)
    assert required <= {"torch", "transformers", "huggingface_hub", "numpy", "PIL"}, required


# ---------------------------------------------------------------------------------------------------------------------
# trust_remote_code on a machine with only transformers
# ---------------------------------------------------------------------------------------------------------------------


def _dependency_closure(roots: list[str]) -> list[importlib.metadata.Distribution]:
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in found:
            continue
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[key] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


def _transformers_only_site(folder: Path) -> Path:
    """A directory of links to the top-level entries of transformers', torch's and pillow's dependency closure."""
    folder.mkdir()
    for distribution in _dependency_closure(["transformers", "torch", "pillow"]):
        for file in distribution.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth") or (folder / top).exists():
                continue
            source = Path(distribution.locate_file(top))
            if source.exists():
                (folder / top).symlink_to(source)
    return folder


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path

    folder, image_path, result_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    report = {"sys_path": sys.path}
    try:
        import maskdino_hf  # noqa: F401
    except ImportError as error:
        report["import_maskdino_hf"] = f"{type(error).__name__}: {error}"
    else:
        raise SystemExit("maskdino_hf is importable: this is not a transformers-only environment")
    report["absent"] = [n for n in ("kernels", "pycocotools", "scipy", "timm", "accelerate")
                        if importlib.util.find_spec(n) is None]

    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation
    torch.set_num_threads(threads)

    model = AutoModelForUniversalSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    report["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    report["config_class"] = f"{type(model.config).__module__}.{type(model.config).__qualname__}"
    report["processor_class"] = f"{type(processor).__module__}.{type(processor).__qualname__}"
    report["msda_module"] = sorted({type(m).__module__ for m in model.modules() if type(m).__name__.endswith("DeformableAttention")})
    report["id2label"] = {str(k): v for k, v in model.config.id2label.items()}

    image = Image.open(image_path).convert("RGB")
    size = (image.height, image.width)
    inputs = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    instance = processor.post_process_instance_segmentation(outputs, target_sizes=[size])[0]
    panoptic = processor.post_process_panoptic_segmentation(outputs, target_sizes=[size])[0]
    semantic = processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0]
    detection = processor.post_process_object_detection(outputs, target_sizes=[size])[0]
    tensors = {
        "pixel_values": inputs["pixel_values"],
        "pixel_mask": inputs["pixel_mask"],
        **{name: getattr(outputs, name) for name in %(OUTPUT_NAMES)r},
        "instance_scores": instance["scores"],
        "instance_labels": instance["labels"],
        "instance_masks": instance["masks"],
        "panoptic_segmentation": panoptic["segmentation"],
        "panoptic_labels": torch.tensor([s["label_id"] for s in panoptic["segments_info"]], dtype=torch.int64),
        "semantic": semantic,
        "detection_boxes": detection["boxes"],
    }
    from transformers import pipeline
    segmenter = pipeline("image-segmentation", model=folder, trust_remote_code=True)
    report["pipeline_instance"] = [
        (r["label"], round(r["score"], 4)) for r in segmenter(image_path, subtask="instance", threshold=0.0)
    ]
    detector = pipeline("object-detection", model=folder, trust_remote_code=True)
    report["pipeline_detection"] = [(r["label"], round(r["score"], 4)) for r in detector(image_path, threshold=0.0)]
    save_file({k: v.contiguous() for k, v in tensors.items()}, result_path)
    Path(result_path).with_suffix(".json").write_text(json.dumps(report))
    """
) % {"OUTPUT_NAMES": OUTPUT_NAMES}


def test_remote_code_loads_without_the_package_and_gives_the_same_outputs(saved, tmp_path):
    folder, model, processor = saved
    site = _transformers_only_site(tmp_path / "site")
    modules_cache = tmp_path / "modules"
    result_path = tmp_path / "remote.safetensors"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_", "MASKDINO_"))
    }
    env.update(
        PYTHONPATH=str(site),
        PYTHONNOUSERSITE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(modules_cache),
    )
    completed = subprocess.run(
        [sys.executable, "-S", "-c", REMOTE_SCRIPT, str(folder), str(IMAGE), str(result_path)]
        + [str(torch.get_num_threads())],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(result_path.with_suffix(".json").read_text())

    # the environment really lacks the package and the optional libraries
    assert report["import_maskdino_hf"].startswith("ModuleNotFoundError")
    assert str(PACKAGE_DIR.parent) not in report["sys_path"]
    assert set(report["absent"]) == {"kernels", "pycocotools", "scipy", "timm", "accelerate"}
    # ...and the classes came from the dynamic-module copy of the saved code
    for key in ("model_class", "config_class", "processor_class"):
        assert report[key].startswith("transformers_modules."), report[key]
    assert report["model_class"].endswith("modeling_maskdino.MaskDINOForUniversalSegmentation")
    assert report["processor_class"].endswith("image_processing_maskdino.MaskDINOImageProcessor")
    assert report["msda_module"] and all(m.endswith(".ms_deform_attn") for m in report["msda_module"])
    assert report["id2label"] == {str(k): v for k, v in model.config.id2label.items()}
    # pipelines by folder path with remote code, with the model's label names
    assert report["pipeline_instance"] and report["pipeline_detection"]
    names = set(model.config.id2label.values())
    assert {label for label, _ in report["pipeline_instance"] + report["pipeline_detection"]} <= names

    # exactly the saved code was copied into the dynamic-module cache
    copied = {path.name for path in modules_cache.rglob("*.py") if path.name != "__init__.py"}
    assert copied == MODEL_CODE | PROCESSOR_CODE
    for path in modules_cache.rglob("*.py"):
        if path.name != "__init__.py":
            assert path.read_bytes() == (folder / path.name).read_bytes()

    # same preprocessing, same model outputs, same post-processing as the in-process model
    remote = load_safetensors(result_path.read_bytes())
    image = Image.open(IMAGE).convert("RGB")
    inputs, outputs = _run_model(model, processor, image)
    torch.testing.assert_close(remote["pixel_values"], inputs["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(remote["pixel_mask"], inputs["pixel_mask"], rtol=0, atol=0)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(remote[name], getattr(outputs, name), rtol=1e-5, atol=1e-5)
    local = _post_processed(processor, outputs, (image.height, image.width))
    for name, value in local.items():
        if value.is_floating_point():
            torch.testing.assert_close(remote[name], value, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(remote[name], value, rtol=0, atol=0)


def test_kernels_is_optional_for_the_msda_module(monkeypatch):
    """Without `kernels`, the op keeps the PyTorch forward and `load_msda_kernel` falls back instead of raising."""
    import maskdino_hf.ms_deform_attn as msda

    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` now raises ImportError
    module = importlib.util.module_from_spec(importlib.util.find_spec("maskdino_hf.ms_deform_attn"))
    module.__spec__.loader.exec_module(module)
    op = module.MultiScaleDeformableAttention()
    assert "forward" not in op.__dict__
    layer = torch.nn.Sequential(op)
    assert module.load_msda_kernel(layer, local_path="/nonexistent", device="cuda") is layer
    assert op.msda_backend == "pytorch"
    assert msda.MultiScaleDeformableAttention is not module.MultiScaleDeformableAttention  # the package is untouched


def test_pycocotools_is_optional_for_the_image_processor(monkeypatch, saved):
    """Without `pycocotools` the processor works; only COCO RLE / polygon masks say what is missing."""
    folder, model, processor = saved
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    module = importlib.util.module_from_spec(importlib.util.find_spec("maskdino_hf.image_processing_maskdino"))
    module.__spec__.loader.exec_module(module)
    bare = module.MaskDINOImageProcessor.from_pretrained(folder)
    image = Image.open(IMAGE).convert("RGB")
    _, outputs = _run_model(model, bare, image)
    size = (image.height, image.width)
    expected = _post_processed(processor, outputs, size)
    for name, value in _post_processed(bare, outputs, size).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        bare.post_process_instance_segmentation(outputs, target_sizes=[size], return_coco_annotation=True)
    polygon = {"annotations": [{"segmentation": [[0, 0, 10, 0, 10, 10]], "category_id": 1}]}
    with pytest.raises(ImportError, match="pycocotools"):
        bare(images=[image], annotations=[polygon], return_tensors="pt")


# ---------------------------------------------------------------------------------------------------------------------
# push_to_hub, offline
# ---------------------------------------------------------------------------------------------------------------------


class _FakeHub:
    """Records what `create_repo` / `create_commit` receive; file contents are read while the temp folder exists."""

    def __init__(self):
        self.repos: list[dict] = []
        self.commits: list[dict] = []

    def create_repo(self, api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok})
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, *, commit_message, **kwargs):
        files = {}
        for operation in operations:
            assert isinstance(operation, huggingface_hub.CommitOperationAdd)
            with operation.as_file() as handle:
                content = handle.read()
            assert operation.upload_info.sha256 == hashlib.sha256(content).digest()
            assert operation.upload_info.size == len(content)
            files[operation.path_in_repo] = content
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": files, **kwargs})
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
            commit_message=commit_message,
            commit_description=kwargs.get("commit_description") or "",
            oid="0" * 40,
        )


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = _FakeHub()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **k: hub.create_repo(api, *a, **k))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda api, *a, **k: hub.create_commit(api, *a, **k))

    def no_readme(repo_id, filename, **kwargs):  # a new repository: no model card yet
        raise EntryNotFoundError(f"{filename} not found in {repo_id}")

    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", no_readme)
    return hub


def test_push_to_hub_commits_weights_config_processor_and_code(fake_hub, saved, tmp_path):
    _, model, processor = saved
    model.push_to_hub("someone/maskdino-test", commit_message="Add Mask DINO", private=True)
    processor.push_to_hub("someone/maskdino-test", revision="refs/pr/1")

    assert [repo["repo_id"] for repo in fake_hub.repos] == ["someone/maskdino-test"] * 2
    assert fake_hub.repos[0]["private"] is True and fake_hub.repos[0]["exist_ok"] is True
    model_commit, processor_commit = fake_hub.commits
    assert model_commit["repo_id"] == processor_commit["repo_id"] == "someone/maskdino-test"
    assert model_commit["message"] == "Add Mask DINO"
    assert processor_commit["message"] == "Upload processor" and processor_commit["revision"] == "refs/pr/1"

    model_files, processor_files = model_commit["files"], processor_commit["files"]
    assert set(model_files) == {"config.json", "model.safetensors", "README.md"} | MODEL_CODE
    assert set(processor_files) == {"preprocessor_config.json", "README.md"} | PROCESSOR_CODE
    for name in MODEL_CODE:
        assert model_files[name] == (PACKAGE_DIR / name).read_bytes()
    for name in PROCESSOR_CODE:
        assert processor_files[name] == (PACKAGE_DIR / name).read_bytes()
    assert b"library_name: transformers" in model_files["README.md"]

    config = json.loads(model_files["config.json"])
    assert config["auto_map"] == {
        "AutoConfig": "configuration_maskdino.MaskDINOConfig",
        "AutoModelForUniversalSegmentation": "modeling_maskdino.MaskDINOForUniversalSegmentation",
        # the image-segmentation and object-detection pipelines load through these
        "AutoModelForImageSegmentation": "modeling_maskdino.MaskDINOForUniversalSegmentation",
        "AutoModelForObjectDetection": "modeling_maskdino.MaskDINOForUniversalSegmentation",
    }
    assert MaskDINOConfig.from_dict(config).to_dict() == model.config.to_dict()
    preprocessor = json.loads(processor_files["preprocessor_config.json"])
    assert preprocessor["auto_map"] == {"AutoImageProcessor": "image_processing_maskdino.MaskDINOImageProcessor"}
    assert MaskDINOImageProcessor.from_dict(preprocessor).to_dict() == processor.to_dict()

    # the uploaded weights are the model's
    uploaded = load_safetensors(model_files["model.safetensors"])
    state = model.state_dict()
    assert uploaded.keys() <= state.keys()
    for key, tensor in uploaded.items():
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=0)

    # the repository as it would be after both commits loads back to the same model and processor
    repo = tmp_path / "repo"
    repo.mkdir()
    for commit in fake_hub.commits:
        for name, content in commit["files"].items():
            (repo / name).write_bytes(content)
    reloaded = AutoModelForUniversalSegmentation.from_pretrained(repo).eval()
    reloaded_processor = AutoImageProcessor.from_pretrained(repo)
    assert type(reloaded) is MaskDINOForUniversalSegmentation
    assert type(reloaded_processor) is MaskDINOImageProcessor
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == state.keys()
    for key, tensor in state.items():
        torch.testing.assert_close(reloaded_state[key], tensor, rtol=0, atol=0)
    image = Image.open(IMAGE).convert("RGB")
    _, expected = _run_model(model, processor, image)
    _, actual = _run_model(reloaded, reloaded_processor, image)
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=0, atol=0)


def test_push_to_hub_needs_no_network(fake_hub, monkeypatch):
    """Any HTTP request escaping the fakes fails the test (push_to_hub of a small random model)."""
    import httpx2  # huggingface_hub 2's HTTP client

    def refuse(*args, **kwargs):
        raise AssertionError(f"network request attempted: {args[1:3]}")

    monkeypatch.setattr(httpx2.Client, "send", refuse)
    monkeypatch.setattr(httpx2.AsyncClient, "send", refuse)
    model = MaskDINOForUniversalSegmentation(tiny_config())
    info = model.push_to_hub("someone/tiny")
    assert info.oid == "0" * 40
    assert "model.safetensors" in fake_hub.commits[0]["files"]
