"""The released checkpoints: presets equal to the official configurations, conversion with every key mapped,
resumable verified downloads from a local server, model cards that parse as Hub metadata, an offline push.

`ModelCard.validate` posts the card to the Hub's `/api/validate-yaml` (the rules live on the server), so the cards are
validated here by what can run offline: huggingface_hub's own parsing of the YAML front matter (`ModelCard`,
`metadata_load`) and of `model-index` (`model_index_to_eval_results`), with the values checked.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import threading
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import FIXTURES
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

from maskdino_hf import MaskDINOConfig, MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
from maskdino_hf.convert_maskdino_to_hf import (
    _ALIASES,
    ConversionError,
    check_against_model,
    config_from_official,
    convert_state_dict,
    processor_kwargs_from_official,
)
from maskdino_hf.dataset_categories import COCO_PANOPTIC_CATEGORIES
from maskdino_hf.releases import (
    RELEASES,
    DownloadError,
    convert_release,
    download_file,
    get_release,
    release_model_card,
    releases_table,
    verify_file,
    write_model_card,
)

MANIFESTS = {
    json.loads(path.read_text())["checkpoint"]: path
    for path in (FIXTURES / "manifests").glob("*.json")
    if path.name != "index.json"
}
PANOPTIC = "maskdino-r50-coco-panoptic"
DEMO = Path(__file__).resolve().parents[1] / "src" / "maskdino_hf" / "demo"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


_SAVE_METADATA = {"_name_or_path", "architectures", "dtype", "transformers_version", "auto_map"}


def _architecture(config) -> dict:
    """The config without what saving and loading add (path, class name, dtype, versions)."""
    data = {key: value for key, value in config.to_dict().items() if key not in _SAVE_METADATA}
    data["backbone_config"] = {
        key: value for key, value in data["backbone_config"].items() if key not in _SAVE_METADATA
    }
    return data


def _manifest(release) -> dict:
    return json.loads(MANIFESTS[release.file_name].read_text())


def test_every_release_has_its_official_manifest():
    assert sorted(MANIFESTS) == sorted(release.file_name for release in RELEASES.values())
    assert len(RELEASES) == 8


@pytest.mark.parametrize("name", RELEASES)
def test_preset_equals_the_yaml_route_field_for_field(name):
    release = get_release(name)
    cfg = _manifest(release)["cfg"]
    from_yaml = config_from_official(cfg, id2label=release.id2label)  # thing/stuff split: the yaml route's own
    preset = MaskDINOConfig.from_release(name)
    assert preset.to_dict() == from_yaml.to_dict()
    processor = MaskDINOImageProcessor(**processor_kwargs_from_official(cfg, from_yaml)).to_dict()
    # The ADE20K preset also reduces scene_parse_150 label maps (0 = "other"); a training-data setting only.
    expected = {**processor, "do_reduce_labels": name == "maskdino-r50-ade20k-semantic"}
    assert release.image_processor().to_dict() == expected


def test_presets_hold_the_real_class_names_and_split():
    counts = {name: len(release.id2label) for name, release in RELEASES.items()}
    assert counts == {
        "maskdino-r50-coco-instance-hid1024": 80, "maskdino-r50-coco-instance": 80,
        "maskdino-swinl-coco-instance-no-mask-enhance": 80, "maskdino-swinl-coco-instance": 80,
        "maskdino-r50-coco-panoptic": 133, "maskdino-swinl-coco-panoptic": 133,
        "maskdino-r50-ade20k-semantic": 150, "maskdino-r50-cityscapes-semantic": 19,
    }
    for release in RELEASES.values():
        assert len(set(release.class_names)) == len(release.class_names)
    panoptic = MaskDINOConfig.from_release(PANOPTIC)
    assert panoptic.stuff_labels == list(range(80, 133))
    assert (panoptic.id2label[0], panoptic.id2label[79], panoptic.id2label[80]) == ("person", "toothbrush", "banner")
    assert MaskDINOConfig.from_release("maskdino-r50-coco-instance").stuff_labels == []
    assert MaskDINOConfig.from_release("maskdino-r50-cityscapes-semantic").id2label[18] == "bicycle"
    assert MaskDINOConfig.from_release("maskdino-r50-ade20k-semantic").id2label[149] == "flag"


def test_unknown_release_names_the_choices():
    with pytest.raises(ValueError, match="maskdino-r50-coco-instance"):
        MaskDINOConfig.from_release("maskdino-r101-coco")


def test_releases_table_lists_every_release_with_its_metrics():
    table = releases_table()
    for release in RELEASES.values():
        row = next(line for line in table.splitlines() if f"| {release.name} |" in line)
        assert release.file_name in row
        for value in release.metrics.values():
            assert f"{value:.1f}" in row
    assert "PQ 53.0" in table and "mIoU 48.7" in table and "box AP 59.0" in table


@pytest.mark.parametrize("name", RELEASES)
def test_release_route_maps_every_key_and_shape(name):
    release = get_release(name)
    official = {key: torch.empty(shape, device="meta") for key, shape in _manifest(release)["state_dict"].items()}
    converted = convert_state_dict(official, release.config())
    with torch.device("meta"):
        model = MaskDINOForUniversalSegmentation(release.config())
    check_against_model(converted, model)  # 0 unmapped, 0 missing, 0 mis-shaped


def _random_checkpoint(release, path: Path) -> Path:
    """A full-size official state dict with the manifest's keys and shapes: seeded random values, one tensor per
    shared module under all its aliases, positive batch-norm variances. Each stuff class (80 + i) of a panoptic
    release gets the classifier row of thing class i, so that stuff scores tie with thing scores."""
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for key, shape in _manifest(release)["state_dict"].items():
        canonical = key
        for pattern, replacement in _ALIASES:
            canonical = pattern.sub(replacement, canonical)
        if canonical in state:
            state[key] = state[canonical]
            continue
        if key.endswith("num_batches_tracked"):
            tensor = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        state[key] = state[canonical] = tensor
    for name in ("weight", "bias"):
        rows = state[f"sem_seg_head.predictor.class_embed.{name}"]
        rows[release.stuff_labels] = rows[: len(release.stuff_labels)].clone()
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def panoptic_checkpoint(tmp_path_factory) -> Path:
    return _random_checkpoint(get_release(PANOPTIC), tmp_path_factory.mktemp("official") / "model.pth")


@pytest.fixture(scope="module")
def panoptic_folder(panoptic_checkpoint, tmp_path_factory) -> Path:
    return convert_release(PANOPTIC, tmp_path_factory.mktemp("converted"), checkpoint=panoptic_checkpoint,
                           progress=False)


def test_convert_release_offline_writes_a_loadable_folder(panoptic_checkpoint, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("convert_release with checkpoint= must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    output = convert_release(PANOPTIC, tmp_path / "out", checkpoint=panoptic_checkpoint, progress=False)
    names = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    model = MaskDINOForUniversalSegmentation.from_pretrained(output)
    official = torch.load(panoptic_checkpoint, weights_only=True)["model"]
    assert torch.equal(model.model.decoder.class_embed.weight, official["sem_seg_head.predictor.class_embed.weight"])
    assert _architecture(model.config) == _architecture(MaskDINOConfig.from_release(PANOPTIC))
    processor = MaskDINOImageProcessor.from_pretrained(output)
    assert processor.panoptic_on and processor.stuff_labels == list(range(80, 133))
    assert metadata_load(output / "README.md")["license"] == "apache-2.0"


def test_converted_panoptic_release_gives_thing_classes_only_as_instances(panoptic_folder):
    model = MaskDINOForUniversalSegmentation.from_pretrained(panoptic_folder).eval()
    processor = MaskDINOImageProcessor.from_pretrained(panoptic_folder)
    # 160 x 224 gives 747 encoder tokens, more than the 300 selected queries.
    image = Image.fromarray((torch.rand(160, 224, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    inputs = processor(image, return_tensors="pt", size={"shortest_edge": 160, "longest_edge": 224})
    with torch.inference_mode():
        outputs = model(**inputs)
    # Stuff classes tie with thing classes in this checkpoint: without the thing rule they share the top 100.
    sizes = {"target_sizes": [(160, 224)], "image_sizes": processor.image_sizes_from_pixel_mask(inputs["pixel_mask"])}
    every_class = processor.post_process_instance_segmentation(outputs, panoptic_on=False, **sizes)
    assert (every_class[0]["labels"] >= 80).any()
    result = processor.post_process_instance_segmentation(outputs, **sizes)[0]
    assert len(result["labels"]) > 0
    assert (result["labels"] < 80).all()


def test_full_size_semantic_release_converts_and_segments(tmp_path):
    name = "maskdino-r50-ade20k-semantic"
    checkpoint = _random_checkpoint(get_release(name), tmp_path / "model.pth")
    output = convert_release(name, tmp_path / "out", checkpoint=checkpoint, progress=False)
    model = MaskDINOForUniversalSegmentation.from_pretrained(output).eval()
    processor = MaskDINOImageProcessor.from_pretrained(output)
    official = torch.load(checkpoint, weights_only=True)["model"]
    assert torch.equal(model.model.decoder.query_feat.weight, official["sem_seg_head.predictor.query_feat.weight"])
    assert model.config.num_classifier_outputs == 151 and processor.size == {"shortest_edge": 512, "longest_edge": 2048}
    image = Image.fromarray((torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    inputs = processor(image, return_tensors="pt", size={"shortest_edge": 64, "longest_edge": 96})
    with torch.inference_mode():
        outputs = model(**inputs)
    segmentation = processor.post_process_semantic_segmentation(
        outputs, target_sizes=[(64, 96)], image_sizes=processor.image_sizes_from_pixel_mask(inputs["pixel_mask"])
    )[0]
    assert segmentation.shape == (64, 96) and 0 <= segmentation.min() and segmentation.max() < 150


def test_corrupt_checkpoint_is_refused_with_its_path(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x00" * 1000)
    with pytest.raises(ConversionError, match=str(path)):
        convert_release(PANOPTIC, tmp_path / "out", checkpoint=path, progress=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_checkpoint_of_another_release_is_refused(panoptic_checkpoint, tmp_path):
    with pytest.raises(ConversionError, match="missing|unmapped|shape"):
        convert_release("maskdino-r50-ade20k-semantic", tmp_path, checkpoint=panoptic_checkpoint, progress=False)


def test_push_to_hub_commit_is_captured_offline(panoptic_checkpoint, tmp_path, monkeypatch):
    calls: dict[str, object] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        calls["commit"] = (repo_id, list(operations), commit_message)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    repo_id = "maskdino-org/maskdino-r50-coco-panoptic"
    output = convert_release(PANOPTIC, tmp_path / "out", checkpoint=panoptic_checkpoint, push_to_hub=repo_id,
                             progress=False)
    assert calls["repo"] == repo_id
    committed_repo, operations, message = calls["commit"]
    assert committed_repo == repo_id and PANOPTIC in message
    files = {operation.path_in_repo: Path(operation.path_or_fileobj) for operation in operations}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    assert files["model.safetensors"].read_bytes() == (output / "model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].read_text())
    assert card.data.model_name == "maskdino-r50-coco-panoptic" and card.data.datasets == ["coco"]
    assert f'from_pretrained("{repo_id}")' in card.text
    assert json.loads(files["config.json"].read_text())["stuff_labels"] == list(range(80, 133))


def test_upload_script_converts_and_pushes_each_release_to_the_organisation(panoptic_checkpoint, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("upload_releases", SCRIPTS / "upload_releases.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    commits = []
    monkeypatch.setattr(script, "download_release", lambda name, cache_dir: panoptic_checkpoint)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_commit", lambda self, repo_id, operations, **kwargs: commits.append(
            (repo_id, {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        ),
    )
    argv = ["--organization", "maskdino-org", "--work-dir", str(tmp_path), "--only", PANOPTIC]
    assert script.main([*argv, "--dry-run"]) == 0 and commits == []
    assert "maskdino-org/maskdino-r50-coco-panoptic" in (tmp_path / PANOPTIC / "README.md").read_text()
    assert script.main(argv) == 0
    [(repo_id, files)] = commits
    assert repo_id == "maskdino-org/maskdino-r50-coco-panoptic"
    assert b"maskdino-org/maskdino-r50-coco-panoptic" in files["README.md"] and "model.safetensors" in files


# ------------------------------------------------------------------------------------------------------ model cards


def _check_card(card: ModelCard, metrics: dict[str, float], pipeline_tag: str, base_model: str | None = None):
    parsed = ModelCard(str(card))  # huggingface_hub's parser of the front matter
    data = parsed.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == pipeline_tag and "maskdino" in data["tags"]
    assert data.get("base_model") == base_model
    _, results = model_index_to_eval_results(data["model-index"])
    assert {result.metric_type: result.metric_value for result in results} == metrics
    for section in ("## Usage", "pipeline(", "from_pretrained(", "## Results", "@inproceedings{li2023mask"):
        assert section in parsed.text


@pytest.mark.parametrize("name", RELEASES)
def test_release_model_card_parses_as_hub_metadata(name, tmp_path):
    release = get_release(name)
    card = release_model_card(release, f"maskdino-org/{name}")
    _check_card(card, release.metrics, "image-segmentation")
    assert release.file_name in card.text and release.official_config in card.text
    card.save(tmp_path / "README.md")
    assert metadata_load(tmp_path / "README.md")["datasets"] == [release.hub_dataset]


def test_fine_tuned_model_card_names_its_base_model_and_evaluated_metrics(tmp_path):
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    path = write_model_card(
        tmp_path, model_id="me/maskdino-shapes", task="panoptic", metrics={"mask_ap": 62.0, "pq": 83.0},
        dataset="synthetic-shapes", base_model="maskdino-org/maskdino-r50-coco-panoptic",
        description="Trained on the synthetic shapes data set.",
    )
    card = ModelCard.load(path)
    _check_card(card, {"mask_ap": 62.0, "pq": 83.0}, "image-segmentation", "maskdino-org/maskdino-r50-coco-panoptic")
    assert "Fine-tuned from" in card.text and "Evaluated with" in card.text
    detection = write_model_card(tmp_path, model_id="me/det", task="detection", metrics={"box_ap": 40.0})
    assert metadata_load(detection)["pipeline_tag"] == "object-detection"


def test_model_card_refuses_unknown_task_and_metric(tmp_path):
    for name in ("config.json",):
        (tmp_path / name).write_bytes((DEMO / name).read_bytes())
    with pytest.raises(ValueError, match="task must be one of"):
        write_model_card(tmp_path, task="depth")
    with pytest.raises(ValueError, match="accuracy"):
        write_model_card(tmp_path, task="instance", metrics={"accuracy": 1.0})


# -------------------------------------------------------------------------------------------------------- download

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Server:
    """A local HTTP server for one file, honouring `Range`, that can cut the body after `cut` bytes."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.cut: int | None = None
        self.ranges: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.ranges.append(self.headers.get("Range"))
                start = int(self.headers["Range"][len("bytes="):].rstrip("-")) if self.headers.get("Range") else 0
                if start >= len(server.payload):
                    self.send_response(416)
                    self.end_headers()
                    return
                body = server.payload[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if server.cut is None else body[: server.cut])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.pth"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _download(url: str, destination: Path, **kwargs) -> Path:
    return download_file(url, destination, progress=False, timeout=5, **kwargs)


def test_download_of_a_complete_file(tmp_path):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    with _Server(PAYLOAD) as server:
        path = _download(server.url, tmp_path / "model.pth", sha256=sha)
        assert path.read_bytes() == PAYLOAD
        assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
        assert _download(server.url, path, sha256=sha) == path  # cached: verified, not fetched again
        assert server.ranges == [None]


def test_interrupted_download_never_looks_complete_and_resumes(tmp_path):
    destination = tmp_path / "model.pth"
    partial = tmp_path / "model.pth.incomplete"
    with _Server(PAYLOAD) as server:
        server.cut = 300_000
        with pytest.raises(DownloadError, match=str(partial)):
            _download(server.url, destination)
        assert not destination.exists() and partial.stat().st_size == 300_000
        server.cut = None
        path = _download(server.url, destination, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert server.ranges == [None, "bytes=300000-"]
    assert path.read_bytes() == PAYLOAD and not partial.exists()


def test_wrong_file_is_refused_with_its_path(tmp_path):
    destination = tmp_path / "model.pth"
    with _Server(PAYLOAD) as server:
        with pytest.raises(DownloadError, match=r"model\.pth\.incomplete has SHA-256"):
            _download(server.url, destination, sha256=hashlib.sha256(b"another file").hexdigest())
        with pytest.raises(DownloadError, match=r"expected 2000000"):
            _download(server.url, destination, size=2_000_000)
    assert list(tmp_path.iterdir()) == []


def test_truncated_local_checkpoint_is_refused_with_its_path(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(PAYLOAD[:1000])
    with pytest.raises(DownloadError, match=f"{path} has 1000 bytes, expected {len(PAYLOAD)}"):
        verify_file(path, size=len(PAYLOAD))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        verify_file(tmp_path / "missing.pth")


def test_convert_release_downloads_into_the_cache(panoptic_checkpoint, tmp_path, monkeypatch):
    payload = panoptic_checkpoint.read_bytes()
    with _Server(payload) as server:
        monkeypatch.setattr("maskdino_hf.releases.RELEASE_BASE_URL", server.url.rsplit("/", 1)[0])
        release = get_release(PANOPTIC)
        monkeypatch.setitem(RELEASES, PANOPTIC, type(release)(**{**release.__dict__, "file_name": "model.pth"}))
        output = convert_release(PANOPTIC, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "model.pth").read_bytes() == payload
    assert (output / "model.safetensors").is_file()


def test_panoptic_yaml_without_a_known_split_asks_for_stuff_labels():
    cfg = _manifest(get_release(PANOPTIC))["cfg"]
    cfg = {**cfg, "DATASETS": {"TRAIN": ["my_panoptic_train"]}}
    cfg["MODEL"] = {**cfg["MODEL"], "SEM_SEG_HEAD": {**cfg["MODEL"]["SEM_SEG_HEAD"], "NUM_CLASSES": 11}}
    with pytest.raises(ConversionError, match="--stuff-labels"):
        config_from_official(cfg)
    assert config_from_official(cfg, stuff_labels=[7, 8, 9, 10]).stuff_labels == [7, 8, 9, 10]
    assert config_from_official(cfg, stuff_labels=[]).stuff_labels == []
    coco = config_from_official(_manifest(get_release(PANOPTIC))["cfg"])
    assert coco.stuff_labels == list(range(80, len(COCO_PANOPTIC_CATEGORIES)))
