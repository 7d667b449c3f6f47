"""`evaluation.evaluate` under Accelerate: two CPU processes (gloo) give exactly the single-process metrics, each
process predicting its own share of the images, and every process returns the metrics.

Run as a script (`python tests/test_evaluate_distributed.py DATA OUT`) this file is the worker that both runs
launch: the bundled demo model on a synthetic validation split, batch size 2, every task.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 5  # batches of 2, 2, 1: the two processes get 2 and 1 batches


def _worker(data: str, output: str) -> None:
    import datasets
    from accelerate import PartialState

    from maskdino_hf.predict import load_model_and_processor, model_predict_fn
    from maskdino_hf.evaluation import evaluate, tasks_for_dataset
    from maskdino_hf.synthetic import SHAPES_CATEGORIES

    dataset = datasets.load_from_disk(data)
    model, processor = load_model_and_processor(None, "cpu")
    tasks = tasks_for_dataset("all", dataset.column_names)
    predict = model_predict_fn(model, processor, tasks, "cpu")
    seen = []

    def counted(images, rows):
        seen.extend(int(row["image_id"]) for row in rows)
        return predict(images, rows)

    metrics = evaluate(model, processor, dataset, tasks, categories=SHAPES_CATEGORIES, batch_size=2,
                       predict_fn=counted)
    state = PartialState()  # the one evaluate set up
    Path(output, f"rank{state.process_index}.json").write_text(
        json.dumps({"metrics": metrics, "images": seen, "num_processes": state.num_processes})
    )
    state.wait_for_everyone()
    state.destroy_process_group()  # as a script under `accelerate launch` ends (Accelerator.end_training)


def _free_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _launch(launcher: list[str], data: Path, output: Path) -> subprocess.CompletedProcess:
    output.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*launcher, __file__, str(data), str(output)], env=env, capture_output=True, text=True,
                          timeout=600)


def _run(launcher: list[str], data: Path, output: Path) -> list[dict]:
    done = _launch(launcher, data, output)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [json.loads(path.read_text()) for path in sorted(output.glob("rank*.json"))]


def _two_processes() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", _free_port()]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_two_processes_give_exactly_the_single_process_metrics(tmp_path):
    pytest.importorskip("accelerate")
    from maskdino_hf.synthetic import generate_shapes_split

    data = tmp_path / "validation"
    generate_shapes_split(NUM_IMAGES, image_size=((96, 128), (96, 128)), seed=5, split="validation").save_to_disk(
        str(data)
    )
    (single,) = _run([sys.executable], data, tmp_path / "one")
    ranks = _run(_two_processes(), data, tmp_path / "two")

    assert single["num_processes"] == 1 and sorted(single["images"]) == list(range(1, NUM_IMAGES + 1))
    assert [r["num_processes"] for r in ranks] == [2, 2]
    # each process predicted its own share, together every image once
    shares = [r["images"] for r in ranks]
    assert len(shares[0]) == 4 and len(shares[1]) == 1, shares
    assert sorted(shares[0] + shares[1]) == sorted(single["images"])
    # the metrics are not trivial, and equal to the last bit on every process
    expected = single["metrics"]
    assert expected["segm_AP"] > 0.2 and expected["PQ"] > 0.3 and expected["mIoU"] > 0.3, expected
    for rank in ranks:
        assert rank["metrics"].keys() == expected.keys()
        different = {k: (v, expected[k]) for k, v in rank["metrics"].items() if not _same(v, expected[k])}
        assert not different, different


def test_a_failure_on_one_process_stops_every_process(tmp_path):
    """The last image (the second process's share) cannot be decoded: both processes stop with the error naming
    it, instead of the first one waiting for the second at the gather."""
    pytest.importorskip("accelerate")
    import datasets

    from maskdino_hf.synthetic import generate_shapes_split

    rows = generate_shapes_split(NUM_IMAGES, image_size=((96, 128), (96, 128)), seed=5, split="validation")
    rows = rows.cast_column("image", datasets.Image(decode=False))
    broken = rows.map(lambda row, i: {"image": {"bytes": row["image"]["bytes"][:200], "path": None}}
                      if i == NUM_IMAGES - 1 else {}, with_indices=True)
    data = tmp_path / "broken"
    broken.cast_column("image", datasets.Image()).save_to_disk(str(data))
    done = _launch(_two_processes(), data, tmp_path / "out")
    assert done.returncode != 0
    assert "row 4" in done.stderr and "cannot decode its image" in done.stderr, done.stderr[-3000:]
    assert "evaluation failed on 1 process(es)" in done.stderr, done.stderr[-3000:]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
