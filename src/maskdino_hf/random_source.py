"""One place for every random draw of Mask DINO training.

Training draws random numbers in three places: the denoising queries (label flips, replacement labels and box
jitter, drawn by the model), the hybrid matcher (one set of mask points per image per call) and the PointRend mask
loss (oversampled candidate points, then the random share of the final points). The model and the loss take a
*random source* instead of calling `torch.rand` directly, so that:

* normal training uses [`MaskDINORandomSource`]: torch's global RNG (exactly what the official code does) or a
  private `torch.Generator`;
* a test can feed the tensors that the official implementation drew, in the same order, through
  [`ReplayRandomSource`] and compare losses and matchings bit for bit.

Every source implements the same small protocol: `rand(*shape, device=..., dtype=...)` (uniform in [0, 1)) and
`randint(low, high, shape, device=...)` (int64 in [low, high)), plus `rand_like` / `randint_like` helpers and
`rand_blocks` (one `rand` handed out block by block). Call order is part of the contract: the model draws its
denoising noise first (label `rand_like`, `randint_like`, box `rand_like`), then the loss draws, for the final
layer, the matcher points (image by image) and the PointRend points of the matched masks, then those of the
denoising queries, and so on per auxiliary layer, and last the encoder proposals (`interm`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch


def _as_shape(shape: tuple) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return tuple(int(size) for size in shape)


class MaskDINORandomSource:
    """Draws from torch's RNG: the global one (default, like the official code) or `generator` when given.

    With the global RNG the numbers are drawn directly on the requested device, i.e. by the same generator the
    official implementation uses there. A private `generator` draws on its own device and the result is moved.
    """

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def _draw_device(self, device: torch.device | str | None) -> torch.device | str | None:
        return self.generator.device if self.generator is not None else device

    def rand(
        self, *shape: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Uniform numbers in [0, 1) of the given shape (`rand(2, 3)` or `rand((2, 3))`)."""
        shape = _as_shape(shape)
        values = torch.rand(shape, generator=self.generator, device=self._draw_device(device), dtype=dtype)
        return values.to(device) if device is not None else values

    def rand_blocks(
        self,
        *shape: int,
        block_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[torch.Tensor]:
        """The numbers of `rand(*shape)` as consecutive blocks of at most `block_size` along dim 0, drawn as the
        blocks are iterated. Torch's CPU generator produces its stream in order, so there each block is its own
        draw and the whole (60 MB for PointRend's candidates of 200 masks) is never in memory; an accelerator's
        generator (whose stream depends on how it is cut) and a source that overrides `rand` make one draw, split."""
        shape = _as_shape(shape)
        draw_device = torch.device(self._draw_device(device) or "cpu")
        if draw_device.type != "cpu" or type(self).rand is not MaskDINORandomSource.rand:
            yield from self.rand(*shape, device=device, dtype=dtype).split(block_size)
            return
        for start in range(0, shape[0], block_size):
            yield self.rand(min(block_size, shape[0] - start), *shape[1:], device=device, dtype=dtype)

    def randint(
        self, low: int, high: int, shape: Sequence[int], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """int64 numbers uniform in [low, high)."""
        shape = _as_shape((shape,))
        values = torch.randint(
            low, high, shape, generator=self.generator, device=self._draw_device(device), dtype=torch.int64
        )
        return values.to(device) if device is not None else values

    def rand_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """`rand` with the shape, device and (floating) dtype of `tensor`."""
        dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
        return self.rand(*tensor.shape, device=tensor.device, dtype=dtype)

    def randint_like(self, tensor: torch.Tensor, low: int, high: int) -> torch.Tensor:
        """`randint` with the shape and device of `tensor` (the result is int64)."""
        return self.randint(low, high, tensor.shape, device=tensor.device)


class ReplayRandomSource(MaskDINORandomSource):
    """Returns pre-recorded tensors, one per call, in order.

    Each call checks that the next recorded tensor has the requested shape (and, for `randint`, an integer dtype and
    values in [low, high)) and returns it on the requested device (`rand` also casts to the requested dtype). A
    request for more draws than were recorded, or with another shape, raises `RuntimeError` naming the draw.

    A request for an EMPTY tensor (a zero in its shape) does not advance torch's RNG, so recorders may or may not
    have stored it: it consumes the next recorded tensor only when that one has exactly the requested (empty) shape,
    and otherwise is answered with an empty tensor without consuming anything.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]):
        super().__init__(generator=None)
        self._tensors = [torch.as_tensor(tensor) for tensor in tensors]
        self._position = 0

    @property
    def num_remaining(self) -> int:
        return len(self._tensors) - self._position

    def _next(self, shape: tuple[int, ...], what: str) -> torch.Tensor | None:
        empty_request = any(size == 0 for size in shape)
        if self._position >= len(self._tensors):
            if empty_request:
                return None
            raise RuntimeError(
                f"ReplayRandomSource is exhausted: {what} with shape {list(shape)} requested after all "
                f"{len(self._tensors)} recorded draws were used"
            )
        recorded = self._tensors[self._position]
        if tuple(recorded.shape) != shape:
            if empty_request:
                return None
            raise RuntimeError(
                f"ReplayRandomSource draw {self._position}: {what} requested shape {list(shape)} but the recorded "
                f"tensor has shape {list(recorded.shape)}"
            )
        self._position += 1
        return recorded

    def rand(
        self, *shape: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        shape = _as_shape(shape)
        recorded = self._next(shape, "rand")
        if recorded is None:
            return torch.empty(shape, device=device, dtype=dtype)
        if not recorded.is_floating_point():
            raise RuntimeError(
                f"ReplayRandomSource draw {self._position - 1}: rand requested but the recorded tensor is "
                f"{recorded.dtype}"
            )
        return recorded.to(device=device, dtype=dtype, copy=True)

    def randint(
        self, low: int, high: int, shape: Sequence[int], device: torch.device | str | None = None
    ) -> torch.Tensor:
        shape = _as_shape((shape,))
        recorded = self._next(shape, f"randint({low}, {high})")
        if recorded is None:
            return torch.empty(shape, device=device, dtype=torch.int64)
        if recorded.is_floating_point() or (recorded.numel() and (recorded.min() < low or recorded.max() >= high)):
            raise RuntimeError(
                f"ReplayRandomSource draw {self._position - 1}: randint({low}, {high}) requested but the recorded "
                f"tensor is {recorded.dtype} with values outside [{low}, {high})"
            )
        return recorded.to(device=device, dtype=torch.int64, copy=True)


__all__ = ["MaskDINORandomSource", "ReplayRandomSource"]
