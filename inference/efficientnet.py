"""EfficientNet-Lite0 and -Lite2 (Tan & Le 2019, the Lite variant: no squeeze-excitation, ReLU6,
the stem and head kept at 32 and 1280 channels) with one output logit (IDC), for patches of any
size (50x50 at 4 um/px ends in a 2x2 map, 4x4 with the stem at stride 1). Lite2 is Lite0 scaled
1.1x wider and 1.2x deeper (6.1 M weights against 4.7 M with ImageNet's classifier).

The layout matches :class:`inference.model.WideResNet` where training needs it: ``trunk`` is
everything up to the last batch norm ``bn``, then ReLU, global average pooling and ``head``.
ImageNet weights, when a run starts from them, come from training.imagenet.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Each variant's stages: (kernel, stride, expansion, output channels, repeats).
STAGES = {
    "lite0": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)),
    "lite2": ((3, 1, 1, 16, 1), (3, 2, 6, 24, 3), (5, 2, 6, 48, 3), (3, 2, 6, 88, 4),
              (5, 1, 6, 120, 4), (5, 2, 6, 208, 5), (3, 1, 6, 352, 1)),
}
STEM, HEAD = 32, 1280


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # as the TensorFlow original was trained


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, 1x1 linear projection."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), _bn(mid), nn.ReLU6()) if expand != 1 else None
        self.depthwise = nn.Sequential(
            nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False), _bn(mid), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(mid, c_out, 1, bias=False), _bn(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return y + x if self.residual else y


def _stages(in_channels: int, stem_stride: int,
            stages: tuple[tuple[int, int, int, int, int], ...]) -> tuple[list[nn.Module], int]:
    """The stem and these stages' blocks, with the channels they end with."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, STEM, 3, stem_stride, 1, bias=False), _bn(STEM), nn.ReLU6()]
    c = STEM
    for kernel, stride, expand, c_out, repeats in stages:
        for i in range(repeats):
            layers.append(MBConv(c, c_out, kernel, stride if i == 0 else 1, expand))
            c = c_out
    return layers, c


def _init(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class EfficientNetLite(nn.Module):
    """``variant`` is a key of STAGES; ``stem_stride`` 1 keeps the first layer at the input's
    resolution (ImageNet's is 2)."""

    def __init__(self, in_channels: int = 3, dropout: float = 0.2, stem_stride: int = 2,
                 variant: str = "lite0") -> None:
        super().__init__()
        layers, c = _stages(in_channels, stem_stride, STAGES[variant])
        self.trunk = nn.Sequential(*layers, nn.Conv2d(c, HEAD, 1, bias=False))
        self.bn = _bn(HEAD)
        self.dropout = dropout
        self.head = nn.Linear(HEAD, 1)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.trunk(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.dropout:
            f = F.dropout(f, self.dropout, self.training)
        return self.head(f).squeeze(1)


#: The scan network's block trunk: Lite0's stem and its first SCAN_STAGES stages (to stride 16).
SCAN_STAGES = 5
SCAN_WIDTH = 128
SCAN_MIX = 160


def scan_shape_error(block: int, side: int) -> str | None:
    """Why a scan network cannot have blocks of ``block`` px, ``side`` a side (the cell and
    1 + 2 margin / cell), as one sentence; None if it can."""
    s = block // 16
    if block <= 0 or block % 16 or side < 1 or side % 2 == 0 or side * s - 4 < s:
        return (f"A scan network needs a cell of a multiple of 16 px and a margin of whole cells, at least one "
                f"(two for a 16 px cell); this is a {block} px cell in a patch {side} cells a side.")
    return None


class ScanLite0(nn.Module):
    """A patch network that can also scan a whole region at the cost of one pass per cell
    (after Lin et al. 2018, "ScanNet"), for a task whose margin is a whole number of cells.

    The input (cell + 2 margin px a side, e.g. 96 = 3 x 32) is cut into cell-sized blocks on the
    cell grid; each block goes alone through Lite0's stem and first stages (``trunk``, ImageNet
    weights apply), to a ``block / 16`` square map; unpadded convolutions (``mix``, then
    ``context``, which spans what is left) combine the maps of all the patch's blocks, then batch
    norm, ReLU6 and the one-logit ``head``. Because every block is seen alone, the blocks lie on
    the cell grid and nothing after them is padded, :meth:`scan` over a region of many
    cells computes each block once (not once for each of the nine patches that hold it) and
    gives every cell exactly the logit :meth:`forward` gives its patch.
    """

    def __init__(self, block: int, side: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        problem = scan_shape_error(block, side)
        if problem:
            raise ValueError(problem)
        self.block, self.side = block, side
        layers, c = _stages(3, 2, STAGES["lite0"][:SCAN_STAGES])
        self.trunk = nn.Sequential(*layers)
        s = block // 16  # each block's map
        # Across the blocks: two unpadded 3 x 3 convolutions over the patch's map (so that a
        # region's map gives each cell exactly its patch's), then one that spans what is left.
        self.mix = nn.Sequential(nn.Conv2d(c, SCAN_MIX, 3, bias=False), _bn(SCAN_MIX), nn.ReLU6(),
                                 nn.Conv2d(SCAN_MIX, SCAN_MIX, 3, bias=False), _bn(SCAN_MIX), nn.ReLU6())
        self.context = nn.Conv2d(SCAN_MIX, SCAN_WIDTH, side * s - 4, stride=s, bias=False)
        self.bn = _bn(SCAN_WIDTH)
        self.dropout = dropout
        self.head = nn.Linear(SCAN_WIDTH, 1)
        _init(self)

    def _blocks(self, x: torch.Tensor, need: torch.Tensor | None) -> torch.Tensor:
        """The block maps of a region (B, 3, R b, C b) laid out as one map (B, c, R s, C s); blocks
        outside ``need`` (R, C, B = 1 only) are left at zero, unseen by the trunk."""
        b, (n, _, h, w) = self.block, x.shape
        rows, cols = h // b, w // b
        if h % b or w % b or rows < self.side or cols < self.side:
            raise ValueError(f"A region for the scan network is a whole number of {b} px blocks, at least {self.side} a side.")
        blocks = x.reshape(n, 3, rows, b, cols, b).permute(0, 2, 4, 1, 3, 5).reshape(n * rows * cols, 3, b, b)
        blocks = blocks.contiguous(memory_format=torch.channels_last)  # the trunk's fastest layout
        if need is None:
            maps = self.trunk(blocks)
        else:
            flat = need.reshape(-1)
            seen = self.trunk(blocks[flat])
            maps = seen.new_zeros((flat.numel(), *seen.shape[1:]))
            maps[flat] = seen
        c, s = maps.shape[1], maps.shape[2]
        return maps.reshape(n, rows, cols, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(n, c, rows * s, cols * s)

    def _logits(self, maps: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn(self.context(self.mix(maps))))  # (B, width, cells down, cells across)
        if self.dropout:
            y = F.dropout(y, self.dropout, self.training)
        return torch.einsum("bchw,c->bhw", y, self.head.weight[0]) + self.head.bias[0]

    def scan(self, x: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, R - side + 1, C - side + 1) of every cell of a region (B, 3, R b, C b) whose
        outer ring of blocks is the margin. With ``cells`` (a bool mask of those cells, B = 1),
        only the blocks those cells see go through the trunk; the other cells' logits are
        meaningless."""
        need = None
        if cells is not None:
            pad = self.side // 2
            need = F.max_pool2d(F.pad(cells[None, None].float(), (pad,) * 4), self.side, 1, pad)[0, 0] > 0
        return self._logits(self._blocks(x, need))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per patch (B, 3, side b, side b)."""
        if x.shape[-1] != self.side * self.block or x.shape[-2] != self.side * self.block:
            raise ValueError(f"The scan network scores {self.side * self.block} px patches, not {tuple(x.shape[-2:])}.")
        return self.scan(x)[:, 0, 0]
