"""A long streamed completion in a thread: what arrived, when, and whether it ended whole."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx

#: Greedy on the tiny toy model runs to the length limit (it does not pick its EOS), a few
#: seconds of decoding on one engine thread.
LONG_MAX_TOKENS = 1500


class LongCompletion:
    """`POST /v1/completions` with `stream: true`, read chunk by chunk in a thread."""

    def __init__(
        self, url: str, *, headers: dict[str, str] | None = None, model: str = "tiny"
    ) -> None:
        self.body: dict[str, Any] = {
            "model": model,
            "prompt": "ab",
            "max_tokens": LONG_MAX_TOKENS,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.url, self.headers = url, headers or {}
        self.chunks: list[dict[str, Any]] = []
        self.done = False  # `data: [DONE]` arrived
        self.error: BaseException | None = None
        self.first_chunk = threading.Event()
        self.last_chunk_at = 0.0
        self._thread = threading.Thread(target=self._run, name="long-completion", daemon=True)

    def start(self, timeout_s: float = 60.0) -> LongCompletion:
        """Start it and wait for its first chunk (it is then generating)."""
        self._thread.start()
        if not self.first_chunk.wait(timeout_s):
            raise AssertionError(f"no chunk within {timeout_s}s: {self.error!r}")
        return self

    def join(self, timeout_s: float = 120.0) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the completion did not end within {timeout_s}s")

    @property
    def tokens(self) -> int:
        """Completion tokens counted by the final usage chunk (0 without one)."""
        usage = [c["usage"] for c in self.chunks if c.get("usage")]
        return int(usage[-1]["completion_tokens"]) if usage else 0

    @property
    def finish_reasons(self) -> list[str]:
        return [
            choice["finish_reason"]
            for chunk in self.chunks
            for choice in chunk.get("choices", [])
            if choice.get("finish_reason")
        ]

    def _run(self) -> None:
        try:
            with httpx.stream(
                "POST",
                f"{self.url}/v1/completions",
                json=self.body,
                headers=self.headers,
                timeout=httpx.Timeout(30.0, read=120.0),
            ) as answer:
                if answer.status_code != 200:
                    raise AssertionError(f"{answer.status_code}: {answer.read()!r}")
                for line in answer.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    self.last_chunk_at = time.monotonic()
                    if data == "[DONE]":
                        self.done = True
                        continue
                    self.chunks.append(json.loads(data))
                    self.first_chunk.set()
        except (httpx.HTTPError, AssertionError, ValueError) as e:
            self.error = e
        finally:
            self.first_chunk.set()
