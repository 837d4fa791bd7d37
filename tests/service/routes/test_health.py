"""Liveness and readiness. The app loads the models in the background (its lifespan), so
/healthz answers at once while /readyz says when requests can be served."""

from __future__ import annotations

import asyncio

from tests.service.fakes import FakeInference, build_app, serving


class SlowToLoad(FakeInference):
    """Not ready until `loaded` is set."""

    def __init__(self) -> None:
        super().__init__(ready=False)
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        await self.loaded.wait()
        self.ready = True


def test_healthz_answers_while_the_models_load_and_readyz_once_they_have(tmp_path):
    inference = SlowToLoad()

    async def main() -> None:
        # Models loaded in the way of start-up would hold the app here: the timeout turns that into a failure.
        async with asyncio.timeout(10), serving(build_app(tmp_path, inference)) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            loading = await client.get("/readyz")
            assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
            assert loading.headers["Retry-After"] == "5"
            inference.loaded.set()
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.01)

    asyncio.run(main())
