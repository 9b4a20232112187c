"""Layer geometry: how a Conv2d or Linear layer maps its input to rows of X.

Every solver in cdfast works on the *matrix view* of a layer. For a layer with
``G`` groups, ``C_in`` input and ``C_out`` output channels and kernel ``k_h × k_w``,

* the weight becomes a tensor of shape ``(G, C_out/G, D)`` with
  ``D = (C_in/G)·k_h·k_w`` (column order: input channel, then kernel row, then
  kernel column, which is PyTorch's ``unfold`` order);
* the input ``h`` becomes ``X`` of shape ``(G, D, M)`` with ``M = N·H_out·W_out``
  (im2col), so that the layer's linear map is ``W_g · X_g`` per group.

A Linear layer is the case ``G = 1``, ``k = 1``, ``M = N`` (any leading batch dims
are flattened into ``N``). When the bias is fitted, a row of ones is appended to
``X`` and the bias becomes the last column of the weight (``D + 1`` columns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerGeometry"]


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class LayerGeometry:
    """Shape facts of one compressible layer (``nn.Conv2d`` or ``nn.Linear``)."""

    kind: str  # "conv2d" or "linear"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    has_bias: bool = False

    @classmethod
    def of(cls, layer: nn.Module) -> "LayerGeometry":
        """Geometry of ``layer``; raises ``TypeError`` for unsupported modules."""
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and 0 in layer.weight.shape:
            raise ValueError(f"teacher_layer: a layer with an empty weight {tuple(layer.weight.shape)} has "
                             "nothing to compress")
        if isinstance(layer, nn.Conv2d):
            if isinstance(layer.padding, str):
                if layer.padding == "valid":
                    padding = (0, 0)
                else:  # "same" with stride 1 (PyTorch forbids other strides)
                    kh, kw = layer.kernel_size
                    dh, dw = layer.dilation
                    if (dh * (kh - 1)) % 2 or (dw * (kw - 1)) % 2:
                        raise ValueError(
                            "teacher_layer: padding='same' with an even effective kernel is "
                            "asymmetric; use explicit padding")
                    padding = (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
            else:
                padding = _pair(layer.padding)
            if layer.padding_mode != "zeros":
                raise ValueError(f"teacher_layer: padding_mode={layer.padding_mode!r} is not "
                                 "supported; expected 'zeros'")
            return cls("conv2d", layer.in_channels, layer.out_channels, _pair(layer.kernel_size),
                       _pair(layer.stride), padding, _pair(layer.dilation), layer.groups,
                       layer.bias is not None)
        if isinstance(layer, nn.Linear):
            return cls("linear", layer.in_features, layer.out_features, has_bias=layer.bias is not None)
        raise TypeError(f"teacher_layer: expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")

    # ----------------------------------------------------------------- sizes
    @property
    def taps(self) -> int:
        """Kernel taps per input channel, ``k_h·k_w``."""
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def group_in(self) -> int:
        return self.in_channels // self.groups

    @property
    def group_out(self) -> int:
        return self.out_channels // self.groups

    @property
    def cols(self) -> int:
        """Weight columns per group, ``D = (C_in/G)·k_h·k_w`` (bias column excluded)."""
        return self.group_in * self.taps

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return ho, wo

    def rows(self, h: torch.Tensor) -> int:
        """Columns of ``X`` that the batch ``h`` contributes: ``M = N·H_out·W_out``."""
        if self.kind == "linear":
            return h.numel() // self.in_channels
        ho, wo = self.output_hw(h.shape[-2], h.shape[-1])
        return h.shape[0] * ho * wo

    # ------------------------------------------------------------- the views
    def unfold(self, h: torch.Tensor, fit_bias: bool = False) -> torch.Tensor:
        """im2col: ``h`` → ``X`` of shape ``(G, D[+1], M)``."""
        if self.kind == "linear":
            x = h.reshape(-1, self.in_channels).t().unsqueeze(0)
        else:
            cols = F.unfold(h, self.kernel_size, self.dilation, self.padding, self.stride)
            n, _, l = cols.shape  # (N, C_in·k·k, L)
            cols = cols.view(n, self.groups, self.cols, l)
            x = cols.permute(1, 2, 0, 3).reshape(self.groups, self.cols, n * l)
        if fit_bias:
            ones = torch.ones(x.shape[0], 1, x.shape[2], dtype=x.dtype, device=x.device)
            x = torch.cat([x, ones], dim=1)
        return x

    def weight_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Layer weight (and bias, if given) → matrix view ``(G, C_out/G, D[+1])``."""
        w = weight.reshape(self.groups, self.group_out, self.cols)
        if bias is not None:
            w = torch.cat([w, bias.reshape(self.groups, self.group_out, 1)], dim=2)
        return w

    def weight_tensor(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inverse of :meth:`weight_matrix`: returns ``(weight, bias_or_None)``."""
        bias = None
        if matrix.shape[-1] == self.cols + 1:
            bias = matrix[..., -1].reshape(self.out_channels)
            matrix = matrix[..., :-1]
        if self.kind == "linear":
            shape = (self.out_channels, self.in_channels)
        else:
            shape = (self.out_channels, self.group_in, *self.kernel_size)
        return matrix.reshape(shape), bias

    def apply(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's linear map ``W∗h (+ b)``."""
        if self.kind == "linear":
            return F.linear(h, weight, bias)
        return F.conv2d(h, weight, bias, self.stride, self.padding, self.dilation, self.groups)
