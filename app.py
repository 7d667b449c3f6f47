"""Hugging Face Space entry point: the Mask DINO web demo with the bundled demo model, offline.

Run ``python app.py`` (or ``maskdino-hf demo``) and open http://127.0.0.1:7860. On a Space, Gradio reads the host
and port from ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``. Another model: set ``MASKDINO_MODEL`` to a local
folder or a Hub id. Needs the ``demo`` extra (``pip install -e ".[demo]"``).
"""

import os
import sys
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "src"
if (SOURCES / "maskdino_hf").is_dir():  # a checkout (or a Space) that did not pip-install the package
    sys.path.insert(0, str(SOURCES))

from maskdino_hf.webdemo import build_demo  # noqa: E402  (after the path set-up above)

demo = build_demo(os.environ.get("MASKDINO_MODEL") or None)

if __name__ == "__main__":
    demo.launch()
