"""Cancellation on disconnect, over a real uvicorn server and a real HTTP client: a call waiting for the model
thread is dropped when its client disconnects, and never runs."""

import asyncio
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from serving import free_port, wait_for

from service.routes.common import unless_disconnected
from service.bundle_view import ModelThread


def test_a_call_whose_client_disconnected_while_it_waited_never_runs():
    model, ran = ModelThread(max_waiting=8), []
    app = FastAPI()

    @app.post("/work/{name}")
    async def work(name: str, request: Request):
        seconds = 1.0 if name == "slow" else 0.0
        return await unless_disconnected(request, model.run(lambda: (time.sleep(seconds), ran.append(name))))

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_for(lambda: server.started, timeout=30)

        async def clients():
            async with httpx.AsyncClient(base_url=url) as client:
                slow = asyncio.create_task(client.post("/work/slow", timeout=10))
                await asyncio.sleep(0.2)  # the slow call holds the model thread
                with pytest.raises(httpx.ReadTimeout):  # this client gives up while its call waits: a disconnect
                    await client.post("/work/abandoned", timeout=0.3)
                assert (await slow).status_code == 200
                return (await client.post("/work/later", timeout=10)).status_code

        assert asyncio.run(clients()) == 200
        assert ran == ["slow", "later"]  # the abandoned call was dropped before it started
        assert model.waiting == 0
    finally:
        server.should_exit = True
        thread.join(10)
        model.close()
