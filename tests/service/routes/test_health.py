"""Liveness and readiness. The app loads the models in the background (its lifespan), so
/healthz answers at once while /readyz says when requests can be served."""

from __future__ import annotations

import asyncio

from service.app import create_app
from service.assembly import build_components
from service.settings import Settings
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


class FailsToLoad(FakeInference):
    def __init__(self) -> None:
        super().__init__(ready=False)

    async def start(self) -> None:
        raise RuntimeError("the weights hold no model")


def test_readyz_says_failed_when_the_models_fail_to_load_and_the_app_tells_its_owner(tmp_path):
    heard: list[BaseException] = []
    app = create_app(
        build_components(Settings(auth_mode="none", data_dir=tmp_path, redis_url=None), inference=FailsToLoad()),
        on_load_failure=heard.append,
    )

    async def main() -> None:
        async with asyncio.timeout(10), serving(app) as client:
            while not heard:
                await asyncio.sleep(0.01)
            failed = await client.get("/readyz")
            assert (failed.status_code, failed.json()) == (503, {"status": "failed"})
            assert "Retry-After" not in failed.headers  # retrying will not help: the process is going
            assert (await client.get("/healthz")).status_code == 200

    asyncio.run(main())
    assert [str(error) for error in heard] == ["the weights hold no model"]
