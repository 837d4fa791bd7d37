"""What the model calls of one process may hold decoded at once, counted in pixels.

Memory is bounded by pixels, not by request count: an image costs the pixels its decode holds
(`image_header.decode_cost`, read from its header before any pixel is decoded), and the model
calls running at once hold no more than the budget together. An image that alone costs more than
the whole budget is never decoded. The embedded batcher (`inference.batching`) and the Redis
worker (`inference.worker`) each keep one, shared by all their model replicas.

Not thread-safe: it lives on the event loop that hands work to the replicas' threads.
"""

from __future__ import annotations

import asyncio

from inference.image_header import ModelInput, pixel_cost
from inference.results import ImageTooLarge


class PixelBudget:
    def __init__(self, total: int | None, model_input: ModelInput) -> None:
        """`total` pixels, or None for no bound (then every image costs nothing)."""
        self.total = total
        self._model_input = model_input
        self._free = total or 0
        self._freed = asyncio.Event()

    def cost(self, image: bytes) -> int:
        """The pixels decoding `image` holds; raises `ImageTooLarge` if more than the whole budget."""
        if self.total is None:
            return 0
        pixels = pixel_cost(image, self._model_input)
        if not self.holds(pixels):
            raise ImageTooLarge.over(pixels, self.total)
        return pixels

    def holds(self, pixels: int) -> bool:
        """Whether the whole budget, all of it free, has room for `pixels`."""
        return self.total is None or pixels <= self.total

    def fits(self, pixels: int) -> bool:
        """Whether the budget has room for `pixels` now."""
        return self.total is None or pixels <= self._free

    def take(self, pixels: int) -> None:
        if self.total is not None:
            self._free -= pixels

    def give_back(self, pixels: int) -> None:
        if self.total is not None:
            self._free += pixels
            self._freed.set()

    async def freed(self) -> None:
        """Returns once a model call has given pixels back (how many: see `fits`)."""
        self._freed.clear()
        await self._freed.wait()

    async def take_when_free(self, pixels: int) -> None:
        while not self.fits(pixels):
            await self.freed()
        self.take(pixels)
