"""CloudClient against a real OpenAI-compatible server on loopback, behind the fault proxy: one retry policy for plain
and streamed requests, and a thread-safe request count."""
from __future__ import annotations

import threading
import time

import pytest

from edgelm.cloud import CloudClient, CloudConfig, CloudError
from tests.cloud_fixtures import direct_chat

MSGS = [{"role": "user", "content": "def add(a, b):"}]
PAYLOAD = {"messages": MSGS, "max_tokens": 8, "temperature": 0}


@pytest.mark.parametrize("stream", [False, True])
def test_a_timed_out_first_attempt_is_retried(stream, cloud, proxy):
    proxy.mode, proxy.delay = "slow-first", 3.0
    client = CloudClient(CloudConfig(url=proxy.url, read_timeout=1.0, retries=2, backoff=0.05))
    direct_chat(cloud.url, MSGS, 8)  # the server's cache holds this prompt for both requests (see direct_chat)
    deadline = time.monotonic() + 60
    try:
        if stream:
            text = "".join(client.stream("chat/completions", PAYLOAD, deadline))
        else:
            text = client.chat(MSGS, max_tokens=8, deadline=deadline, temperature=0)
    finally:
        client.close()
    assert text == direct_chat(cloud.url, MSGS, 8) and text
    assert client.calls == 2 and not client.breaker_open


@pytest.mark.parametrize("stream", [False, True])
def test_no_retry_once_the_deadline_is_spent(stream, proxy):
    proxy.mode, proxy.delay = "slow", 3.0
    client = CloudClient(CloudConfig(url=proxy.url, read_timeout=30.0, retries=3, backoff=0.05))
    with pytest.raises(CloudError) as e:
        deadline = time.monotonic() + 1.0
        if stream:
            list(client.stream("chat/completions", PAYLOAD, deadline))
        else:
            client.chat(MSGS, max_tokens=8, deadline=deadline)
    client.close()
    assert e.value.reason == "deadline" and client.calls == 1


class SlowCount(int):
    """An int whose += takes a while: a count updated outside a lock loses updates when threads overlap."""

    def __add__(self, other: int) -> "SlowCount":
        time.sleep(0.002)
        return SlowCount(int(self) + other)


def test_request_count_is_exact_under_concurrency(proxy):
    """Many threads, each request failing fast (500, no retries): every one is counted, by the client and the server."""
    proxy.mode = "500"
    client = CloudClient(CloudConfig(url=proxy.url, retries=0, breaker_failures=10**9))
    client.calls = SlowCount(0)

    def work():
        for _ in range(10):
            with pytest.raises(CloudError):
                client.chat(MSGS, max_tokens=1, deadline=time.monotonic() + 10)

    threads = [threading.Thread(target=work) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        client.close()
    assert client.calls == proxy.count == 8 * 10
