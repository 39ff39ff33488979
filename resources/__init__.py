"""Files that ship with the app: the demo slide and its labels, the IDC model and its card.

The one place that knows where they are; every command and the GUI ask here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_SLIDE = "demo_idc_8975.tif"
SHIPPED_MODEL = "idc_model.pt"


def resource_path(name: str) -> Path:
    """Path of a bundled file."""
    return Path(str(files(__name__) / name))


def demo_slide_path() -> Path:
    """The bundled breast IDC demo slide (patient 8975, rebuilt from real patches)."""
    return resource_path(DEMO_SLIDE)


def shipped_model_path() -> Path:
    """The IDC model that ships with the app."""
    return resource_path(SHIPPED_MODEL)
