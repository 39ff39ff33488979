"""Files that ship with the app: the demo slide and its labels, the models and their cards.

The one place that knows where they are, and the one list of the shipped models: every
command and the GUI ask here.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_SLIDE = "demo_idc_8975.tif"
#: The shipped models by name, in the order the GUI lists them; the first is the default.
SHIPPED_MODELS = {"idc": "idc_model.pt", "metastasis": "metastasis_model.pt"}
DEFAULT_MODEL = "idc"


def resource_path(name: str) -> Path:
    """Path of a bundled file."""
    return Path(str(files(__name__) / name))


def demo_slide_path() -> Path:
    """The bundled breast IDC demo slide (patient 8975, rebuilt from real patches)."""
    return resource_path(DEMO_SLIDE)


def shipped_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The shipped model called ``name`` ("idc", "metastasis")."""
    return resource_path(SHIPPED_MODELS[name])


def model_path(name_or_path: str | Path | None) -> Path:
    """A shipped model's file by name, else the path given (None: the default model)."""
    if name_or_path is None:
        return shipped_model_path()
    text = str(name_or_path)
    if text in SHIPPED_MODELS:
        return shipped_model_path(text)
    path = Path(text)
    if not path.exists():
        raise ValueError(f"No model called {text!r}: give a shipped model's name "
                                f"({', '.join(SHIPPED_MODELS)}) or the path of a model file.")
    return path
