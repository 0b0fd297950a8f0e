"""Argument checks shared by the operator's entry points."""

from __future__ import annotations

import numbers
from typing import Any

from torch import Tensor

from ..errors import PixifyError


class PixArgumentError(PixifyError, ValueError):
    """A bad PiX argument (zeta, tau, channels, channel_dim); a ``ValueError`` and a ``PixifyError``."""


def _check_zeta(zeta: Any) -> int:
    if type(zeta) is int and zeta >= 1:  # the common case first: these run on every call
        return zeta
    if isinstance(zeta, bool) or not isinstance(zeta, numbers.Integral):
        raise PixArgumentError(f"zeta must be an integer >= 1, got {zeta!r}")
    if zeta < 1:
        raise PixArgumentError(f"zeta must be an integer >= 1, got {zeta!r}")
    return int(zeta)


def _check_tau(tau: Any) -> float:
    if type(tau) is float and 0.0 < tau < 1.0:
        return tau
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise PixArgumentError(f"tau must be a number strictly between 0 and 1, got {tau!r}")
    tau = float(tau)
    if not (0.0 < tau < 1.0):  # also rejects nan
        raise PixArgumentError(f"tau must be a number strictly between 0 and 1, got {tau!r}")
    return tau


def _check_channels(channels: Any) -> int:
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
        raise PixArgumentError(f"channels must be an integer >= 1, got {channels!r}")
    return int(channels)


def _check_channel_dim(channel_dim: Any) -> int:
    if type(channel_dim) is int and channel_dim != 0:
        return channel_dim
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, numbers.Integral) or channel_dim == 0:
        raise PixArgumentError(
            f"channel_dim must be a non-zero integer (dimension 0 is the batch), got {channel_dim!r}"
        )
    return int(channel_dim)


def pix_groups(channels: int, zeta: int) -> int:
    """Number of PiX output channels ``G = ceil(channels / zeta)``."""
    channels = _check_channels(channels)
    zeta = _check_zeta(zeta)
    return -(-channels // zeta)


def _norm_dim(channel_dim: int, ndim: int) -> int:
    cd = channel_dim + ndim if channel_dim < 0 else channel_dim
    if ndim < 2 or not (1 <= cd < ndim):
        raise PixArgumentError(
            f"channel_dim={channel_dim} is not a non-batch dimension of a {ndim}-d input "
            "(PiX needs at least a batch and a channel dimension)"
        )
    return cd


def _check_p(x: Tensor, p: Tensor, zeta: int, cd: int) -> None:
    n, c = x.shape[0], x.shape[cd]
    g = -(-c // zeta)
    if p.dim() != 2 or p.shape[0] != n or p.shape[1] != g:
        raise PixArgumentError(
            f"p must have shape (N, G) = ({n}, {g}) for an input with {c} channels and zeta={zeta}, "
            f"got {tuple(p.shape)}"
        )
