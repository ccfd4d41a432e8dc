"""The interactive path's bounded queue: past its bound a call is refused at once, and the queue drains."""

import asyncio
import time

import pytest

from service.bundle_view import Busy, ModelThread


def test_a_full_queue_refuses_at_once_and_recovers():
    model = ModelThread(max_waiting=2)

    async def main():
        slow = [asyncio.create_task(model.run(time.sleep, 0.3)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Busy, match="busy with 2"):
            await model.run(time.sleep, 0.3)
        refused_while_busy = not any(task.done() for task in slow)  # refused at once, not after waiting its turn
        await asyncio.gather(*slow)
        return refused_while_busy, await model.run(lambda: "answered")

    refused_while_busy, answer = asyncio.run(main())
    assert refused_while_busy and answer == "answered" and model.waiting == 0
    model.close()
