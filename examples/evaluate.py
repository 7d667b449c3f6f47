"""Evaluate a Mask DINO model: COCO box/mask AP, panoptic quality and mean IoU.

A thin wrapper of ``maskdino-hf evaluate`` (see ``maskdino_hf.cli``); takes the same arguments::

    python examples/evaluate.py --model path/to/model --data path/to/coco_folder --output report.json
    python examples/evaluate.py --data synthetic/hf --split validation --task panoptic

Several processes share the images and give exactly the single-process metrics (``maskdino_hf.evaluation``)::

    accelerate launch --num_processes 8 examples/evaluate.py --model path/to/model --data coco_val --device cuda
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/evaluate.py --data ...

``--data`` is a COCO-format folder (``images/``, ``annotations/instances.json``, ``annotations/panoptic.json`` +
``panoptic/``, ``semantic/``), a folder holding such ``<split>/`` folders, or a ``datasets`` ``save_to_disk`` folder.
Without ``--model`` the bundled demo model is evaluated.
"""

import sys

from maskdino_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
