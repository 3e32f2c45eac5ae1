"""Spectral pooling: resize a feature map by keeping only the low frequencies of its 2D spectrum.

``SpectralPool2d`` takes the 2D FFT over height and width of an NCHW tensor, keeps the centred
low-frequency block of the output size, and takes the inverse FFT. This is the intended operation
of the Inception U-Net papers; their TensorFlow code transforms the wrong axes (W and C of NHWC)
and is not a low-pass filter at all.

Conventions (each side is handled on its own, so non-square and odd sizes are fine):

* Normalisation: ``norm="forward"`` on both transforms, so the zero-frequency coefficient is the
  mean and the inverse transform simply sums the kept waves. A constant image keeps its value and
  an image whose spectrum lies inside the kept band is sampled exactly on the coarser grid.
* Even output sizes have a Nyquist bin ``n/2`` that stands for both ``+n/2`` and ``-n/2``. Pooling
  *folds* both input bins into it (sums them); this is exactly the coarse-grid sample of those
  two waves, and for a real input the sum of a bin and its conjugate partner is real, so real
  inputs give real outputs. Upsampling (``spectral_resize`` to a larger size) *splits* the Nyquist
  bin in halves over ``+n/2`` and ``-n/2``, so pooling undoes upsampling exactly and
  ``SpectralLowPass2d`` (pool, then upsample back) is an idempotent projection.
* Odd sizes keep the symmetric band ``-(n-1)/2 .. (n-1)/2``; there is no Nyquist bin.

The crop is done on the unshifted spectrum (positive frequencies at the start, negative ones at
the end of each axis); it is the same as fftshift, centred crop, ifftshift with the fold above.
FFTs run in float32 at least (half precision FFTs need power-of-two sizes on CUDA), and the result
is cast back to the input's dtype. Everything is differentiable.
"""

from __future__ import annotations

import torch
from torch import nn


def _resize_axis(spectrum: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Crop (fold the Nyquist bin) or zero-pad (split it) one axis of an unshifted spectrum."""
    old = spectrum.shape[dim]
    if size == old:
        return spectrum
    small = min(size, old)
    half = small // 2
    # Frequencies 0..half-1 (0..half when ``small`` is odd) and -(half-1)..-1 are kept as they are.
    low = spectrum.narrow(dim, 0, half + small % 2)
    high = spectrum.narrow(dim, old - (half - 1 + small % 2), half - 1 + small % 2)
    if small % 2 == 0:
        if size < old:  # fold +n/2 and -n/2 into the output's single Nyquist bin
            nyquist = [spectrum.narrow(dim, half, 1) + spectrum.narrow(dim, old - half, 1)]
        else:  # split the input's Nyquist bin over +n/2 and -n/2 of the larger grid
            part = spectrum.narrow(dim, half, 1) / 2
            nyquist = [part, part]
    else:
        nyquist = []
    if size < old:
        parts = [low, *nyquist, high]
    else:
        shape = list(spectrum.shape)
        shape[dim] = size - old - (1 if small % 2 == 0 else 0)
        zeros = spectrum.new_zeros(shape)
        parts = [low, *nyquist[:1], zeros, *nyquist[1:], high]
    return torch.cat(parts, dim=dim)


def resize_spectrum(spectrum: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop or zero-pad the last two axes of an unshifted ``fft2`` spectrum to ``size``."""
    return _resize_axis(_resize_axis(spectrum, -2, size[0]), -1, size[1])


def spectral_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two axes of a real tensor to ``size`` through its spectrum.

    Smaller sides are low-passed (spectral pooling), larger ones band-limited interpolated
    (zero-padding the spectrum); the mean is kept in both directions.
    """
    if x.is_complex():
        raise TypeError("spectral_resize takes a real tensor")
    if min(size) < 1:
        raise ValueError(f"spectral_resize needs a positive output size, got {tuple(size)}")
    dtype = x.dtype
    spectrum = torch.fft.fft2(x.to(torch.promote_types(dtype, torch.float32)), norm="forward")
    out = torch.fft.ifft2(resize_spectrum(spectrum, size), norm="forward").real
    return out.to(dtype)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class SpectralPool2d(nn.Module):
    """Spectral pooling of an NCHW tensor to ``output_size`` or to its size divided by ``factor``.

    Give exactly one of ``output_size`` (an int for a square, or ``(height, width)``) and
    ``factor`` (an int ``>= 1``; each side becomes ``side // factor``, as with max pooling).
    Refuses to enlarge: an output side larger than the input side raises ``ValueError``.
    """

    def __init__(
        self, output_size: int | tuple[int, int] | None = None, factor: int | None = None
    ) -> None:
        super().__init__()
        if (output_size is None) == (factor is None):
            raise ValueError("SpectralPool2d takes exactly one of output_size and factor")
        if factor is not None and factor < 1:
            raise ValueError(f"SpectralPool2d factor must be at least 1, got {factor}")
        self.output_size = None if output_size is None else _pair(output_size)
        self.factor = factor

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The output size for an input of ``height x width``."""
        if self.factor is not None:
            size = (height // self.factor, width // self.factor)
        else:
            size = self.output_size
        if min(size) < 1 or size[0] > height or size[1] > width:
            raise ValueError(
                f"SpectralPool2d cannot pool {height}x{width} to {size[0]}x{size[1]}: "
                "each output side must be between 1 and the input side"
            )
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spectral_resize(x, self.target_size(*x.shape[-2:]))

    def extra_repr(self) -> str:
        return f"factor={self.factor}" if self.factor else f"output_size={self.output_size}"


class SpectralLowPass2d(nn.Module):
    """Keep the size but remove every frequency that ``SpectralPool2d(factor=factor)`` drops.

    Pooling then upsampling through the spectrum: an ideal low-pass filter that is the stride-1
    counterpart of spectral pooling (and a projection: applying it twice changes nothing).
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.pool = SpectralPool2d(factor=factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        size = self.pool.target_size(height, width)
        dtype = x.dtype
        spectrum = torch.fft.fft2(x.to(torch.promote_types(dtype, torch.float32)), norm="forward")
        spectrum = resize_spectrum(resize_spectrum(spectrum, size), (height, width))
        return torch.fft.ifft2(spectrum, norm="forward").real.to(dtype)
