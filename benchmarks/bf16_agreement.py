"""Does bf16 autocast inference give the float32 results? Measured on a trained model over many held-out images.

The speed issue's precision rule: bf16 results compared with fp32 ones, "same top instances, mask IoU >= 0.98". This
script measures it on the bundled demo model (or `--model`) over `--images` held-out synthetic validation images
(the demo model's validation distribution; none of them was trained on), and prints:

* the held-out metrics in fp32 and under bf16 autocast (COCO mask / box AP, PQ) through `evaluation.evaluate`;
* for the fp32 top-`--top` instances of every image: the share that has a bf16 instance of the same label with mask
  IoU >= `--min-iou` (matched by mask, since instances with close scores may swap ranks), by fp32 score band;
* the same share for a float32 run on the input rounded to bfloat16 (`pixel_values.bfloat16().float()`): no bf16
  arithmetic at all, only the input perturbed at bf16 resolution. This is the sensitivity floor of the instances
  themselves: an instance that moves here cannot be expected to hold under bf16 arithmetic either.

    python benchmarks/bf16_agreement.py                     # demo model, 200 images
    python benchmarks/bf16_agreement.py --model PATH --images 500 --top 5 --min-iou 0.98
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

BANDS = ((0.5, 1.01, "score >= 0.5"), (0.1, 0.5, "0.1 <= score < 0.5"), (0.0, 0.1, "score < 0.1"))


def mask_iou(first: torch.Tensor, second: torch.Tensor) -> float:
    union = (first | second).sum().item()
    return (first & second).sum().item() / union if union else 1.0


def best_match(reference: dict, rank: int, candidates: dict) -> float:
    """Best mask IoU between the reference's instance `rank` and the candidate instances of the same label."""
    label = reference["labels"][rank].item()
    same = (candidates["labels"] == label).nonzero().flatten().tolist()
    return max((mask_iou(candidates["masks"][other], reference["masks"][rank]) for other in same), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--min-iou", type=float, default=0.98)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from maskdino_hf import MaskDINOForUniversalSegmentation, MaskDINOImageProcessor
    from maskdino_hf.predict import demo_model_dir
    from maskdino_hf.synthetic import SHAPES_CATEGORIES, generate_shapes_split
    from maskdino_hf.evaluation import evaluate

    folder = args.model or demo_model_dir()
    model = MaskDINOForUniversalSegmentation.from_pretrained(folder).eval()
    processor = MaskDINOImageProcessor.from_pretrained(folder)
    # The demo model's data: validation split of seed 0 at 96-128 px (TRAINING.md); training used the train split.
    dataset = generate_shapes_split(args.images, image_size=((96, 128), (96, 128)), seed=0, split="validation")
    print(f"model {folder}; {args.images} held-out synthetic images; torch {torch.__version__}, {args.threads} threads")

    started = time.perf_counter()
    metrics = {
        name: evaluate(model, processor, dataset, ["instance", "panoptic"], categories=SHAPES_CATEGORIES, batch_size=4,
                       bf16=bf16)
        for name, bf16 in (("fp32", False), ("bf16", True))
    }
    keys = [key for key in ("segm_AP", "segm_AP50", "bbox_AP", "PQ") if key in metrics["fp32"]]
    print("\nheld-out metrics (fraction, not percent)")
    print("        " + "".join(f"{key:>10s}" for key in keys))
    for name, values in metrics.items():
        print(f"{name:8s}" + "".join(f"{values[key]:10.4f}" for key in keys))

    shares = {"bf16": {band: [] for *_, band in BANDS}, "fp32, bf16-rounded input": {band: [] for *_, band in BANDS}}
    lowest = {name: (1.0, None) for name in shares}
    with torch.inference_mode():
        for row in range(len(dataset)):
            image = dataset[row]["image"].convert("RGB")
            inputs = processor(images=image, return_tensors="pt")
            size = [(image.height, image.width)]
            reference = processor.post_process_instance_segmentation(model(**inputs), target_sizes=size)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = processor.post_process_instance_segmentation(model(**inputs), target_sizes=size)[0]
            rounded = inputs["pixel_values"].bfloat16().float()
            perturbed = processor.post_process_instance_segmentation(model(pixel_values=rounded), target_sizes=size)[0]
            for name, candidates in (("bf16", bf16), ("fp32, bf16-rounded input", perturbed)):
                for rank in range(min(args.top, len(reference["scores"]))):
                    score = reference["scores"][rank].item()
                    iou = best_match(reference, rank, candidates)
                    band = next(band for low, high, band in BANDS if low <= score < high)
                    shares[name][band].append(iou)
                    if iou < lowest[name][0]:
                        lowest[name] = (iou, f"image {row} rank {rank} score {score:.3f}")

    print(f"\nfp32 top-{args.top} instances with a same-label match at mask IoU >= {args.min_iou}")
    print(f"{'compared with':28s}" + "".join(f"{band:>22s}" for *_, band in BANDS) + f"{'all':>16s}")
    for name, by_band in shares.items():
        cells = []
        for *_, band in BANDS:
            values = np.array(by_band[band])
            cells.append(f"{(values >= args.min_iou).mean():.3f} of {len(values):4d}" if len(values) else "-")
        everything = np.concatenate([np.array(v) for v in by_band.values()])
        print(f"{name:28s}" + "".join(f"{cell:>22s}" for cell in cells)
              + f"{(everything >= args.min_iou).mean():>10.3f} of {len(everything)}")
        print(f"{'':28s}median IoU {np.median(everything):.4f}; lowest {lowest[name][0]:.3f} ({lowest[name][1]})")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
