"""The web demo: a Gradio app around the same predict path as ``maskdino-hf predict``.

Upload an image (or pick a bundled one), choose the task (panoptic / instance / semantic / detection), the threshold
and the mask threshold, and get the overlay of :mod:`maskdino_hf.visualization`, its one-line summary and a table of
the segments (id, label, score, area, box). The model runs where it was loaded; nothing is fetched from the network
when the model is a local folder or the bundled demo model (the default), and Gradio's analytics are off unless
``GRADIO_ANALYTICS_ENABLED`` says otherwise.

``maskdino-hf demo [--model ...]`` calls :func:`launch`; ``app.py`` at the repository root builds the same app for a
Hugging Face Space. Gradio is the ``demo`` extra (``pip install "maskdino-hf[demo]"``) and is imported here only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .visualization import TASKS, draw_result, segment_table, summarize

if TYPE_CHECKING:
    import gradio

__all__ = ["TABLE_HEADERS", "build_demo", "default_threshold", "launch"]

TABLE_HEADERS = ["id", "label", "score", "area (px)", "box (x0, y0, x1, y1)"]


def _predict_api():
    """The predict path shared with the CLI, the one place this module says where it lives. Used:
    ``load_model_and_processor``, ``resolve_device``, ``model_predict_fn`` (inference + post-processing),
    ``demo_images``, ``demo_model_dir``, ``default_task``, ``DEFAULT_INSTANCE_THRESHOLD``, ``DEFAULT_MASK_THRESHOLD``
    and ``MASK_THRESHOLD_TASKS``."""
    from . import predict

    return predict


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            'the web demo needs Gradio, which is not installed: pip install "maskdino-hf[demo]"'
        ) from error
    return gradio


def default_threshold(task: str, processor) -> float:
    """The threshold of ``task`` that ``maskdino-hf predict`` uses when none is given: the instance score threshold
    for instance / detection, the processor's query keep threshold for panoptic (semantic has none)."""
    if task == "panoptic":
        return float(processor.object_mask_threshold)
    return float(_predict_api().DEFAULT_INSTANCE_THRESHOLD)


def _table(result: Any, id2label: Mapping[int, str], task: str) -> list[list[Any]]:
    rows = []
    for row in segment_table(result, id2label, task):
        score = "" if row["score"] is None else f"{row['score']:.3f}"
        box = ", ".join(f"{value:g}" for value in row["box"])
        rows.append([row["id"], row["label"], score, row["area"], box])
    return rows


def build_demo(model: str | None = None) -> "gradio.Blocks":
    """The Gradio app for ``model`` (a local folder or Hub id; ``None``: the bundled demo model), loaded once on
    the best available device. Components carry ``elem_id``s (``input-image``, ``task``, ``threshold``,
    ``mask-threshold``, ``run``, ``overlay``, ``summary``, ``segments``) for browser tests and custom CSS."""
    gr = _gradio()
    api = _predict_api()
    device = api.resolve_device("auto")
    network, processor = api.load_model_and_processor(model, device)
    id2label = network.config.id2label
    name = "the bundled demo model" if model is None else str(model)
    first_task = api.default_task(processor)

    def run(image, task: str, threshold: float, mask_threshold: float):
        if image is None:
            raise gr.Error("upload an image first")
        if task not in TASKS:
            raise gr.Error(f"task must be one of {TASKS}, got {task!r}")
        image = image.convert("RGB")
        predict = api.model_predict_fn(
            network, processor, [task], device, None if task == "semantic" else float(threshold),
            mask_threshold=float(mask_threshold) if task in api.MASK_THRESHOLD_TASKS else None,
        )
        result = predict([image])[0][task]
        return draw_result(image, result, id2label, task), summarize(result, id2label, task), _table(
            result, id2label, task
        )

    def on_task(task: str):
        return (
            gr.update(value=default_threshold(task, processor), interactive=task != "semantic"),
            gr.update(interactive=task in api.MASK_THRESHOLD_TASKS),
        )

    examples = [[str(path)] for path in api.demo_images()] if model is None else []
    if examples:
        gr.set_static_paths([str(api.demo_model_dir() / "images")])
    with gr.Blocks(title="Mask DINO") as demo:
        gr.Markdown(
            f"# Mask DINO\nSegment an image with {name} ({device}). Colours are predictions (the image is shown in "
            "grey); hatched areas are void: pixels no segment covers."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", image_mode="RGB", label="image", elem_id="input-image")
                task = gr.Radio(list(TASKS), value=first_task, label="task", elem_id="task")
                threshold = gr.Slider(
                    0.0, 1.0, value=default_threshold(first_task, processor), step=0.01, label="threshold",
                    info="instance / detection: minimum score; panoptic: query keep threshold; semantic: none",
                    interactive=first_task != "semantic", elem_id="threshold",
                )
                mask_threshold = gr.Slider(
                    0.01, 0.99, value=api.DEFAULT_MASK_THRESHOLD, step=0.01, label="mask threshold",
                    info="instance / panoptic: mask probability from which a pixel belongs to a segment (lower: fewer "
                    "void pixels along boundaries); semantic / detection: none",
                    interactive=first_task in api.MASK_THRESHOLD_TASKS, elem_id="mask-threshold",
                )
                button = gr.Button("Segment", variant="primary", elem_id="run")
                if examples:
                    gr.Examples(examples, inputs=[image], label="bundled images")
            with gr.Column():
                overlay = gr.Image(type="pil", format="png", label="overlay", interactive=False, elem_id="overlay")
                summary = gr.Textbox(label="summary", interactive=False, elem_id="summary")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="segments", interactive=False, elem_id="segments")
        task.change(on_task, inputs=task, outputs=[threshold, mask_threshold])
        button.click(run, inputs=[image, task, threshold, mask_threshold], outputs=[overlay, summary, table])
    return demo


def launch(
    model: str | None = None, server_name: str = "127.0.0.1", server_port: int = 7860, share: bool = False
) -> None:
    """Build the app for ``model`` and serve it at ``http://server_name:server_port`` until interrupted
    (``share``: also through a public Gradio link)."""
    build_demo(model).launch(server_name=server_name, server_port=server_port, share=share)
