"""A small local OpenAI-compatible endpoint, for tests, examples and benchmarks: nothing reaches
the internet and no GPU is needed.

    busagent fake-llm --port 8000 --latency 0.5      # or FakeLLM(latency=0.5).start()

``POST /v1/chat/completions`` answers like a chat model playing the guess game (or chatting), with
``stream: true`` as server-sent events (and a last usage chunk if asked by
``stream_options.include_usage``); ``--latency`` makes each answer take that long (requests
overlap, as on a real inference server) and ``--fail-every N`` answers every Nth request with a
503 to exercise retries. ``GET /stats`` returns the request counts.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")


def answer(messages: list[dict[str, Any]], rng: random.Random) -> str:
    """What the fake model says. Extraction requests get ``The answer is N.``; game prompts a
    short piece of reasoning with a number that drifts toward the last winner, like real
    models do; anything else a reply that quotes the last message."""
    text = "\n".join(str(m.get("content", "")) for m in messages)
    last = str(messages[-1].get("content", "")) if messages else ""
    if "extract the number" in text:
        found = _NUMBER.findall(text.split("extract the number", 1)[1])
        return f"The answer is {found[0]}." if found else "I CAN'T."
    if "report" in text and "number" in text:
        top = 100.0
        m = re.search(r"between 0 and (\d+)", text)
        if m:
            top = float(m.group(1))
        won = re.findall(r"winn\w* number[^\d]*(\d+(?:\.\d+)?)", text)
        guess = (float(won[-1]) * rng.uniform(0.5, 1.0) if won
                 else rng.triangular(0, top, top / 3))
        return (f"Others will guess about {min(top, guess * 1.5):.0f} on average, so I will "
                f"report {round(guess)}.")
    return f"({len(messages)} messages so far) On '{last[:60]}': I agree, let us go on."


def usage(messages: list[dict[str, Any]], text: str) -> dict[str, int]:
    """The fake's token counts: 4 characters a token."""
    return {"prompt_tokens": len(json.dumps(messages)) // 4, "completion_tokens": len(text) // 4}


class FakeLLM:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0,
                 fail_every: int = 0, seed: int | None = None) -> None:
        self.latency = latency
        self.fail_every = fail_every
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/stats"):
                    self._json(200, {"requests": fake.requests, "failed": fake.failed})
                elif self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"data": [{"id": "fake", "object": "model"}]})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(n))
                    messages = list(body["messages"])
                except (ValueError, KeyError, TypeError):
                    self._json(400, {"error": {"message": "expected a JSON chat request"}})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with fake._lock:
                    fake.requests += 1
                    fail = fake.fail_every and fake.requests % fake.fail_every == 0
                    if fail:
                        fake.failed += 1
                    text = answer(messages, fake._rng)
                if fake.latency:
                    time.sleep(fake.latency)
                if fail:
                    self._json(503, {"error": {"message": "overloaded (fake)"}})
                elif body.get("stream"):
                    opts = body.get("stream_options") or {}
                    self._stream(text, str(body.get("model", "fake")),
                                 usage(messages, text) if opts.get("include_usage") else None)
                else:
                    self._json(200, {
                        "id": f"fake-{fake.requests}", "object": "chat.completion",
                        "model": body.get("model", "fake"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": usage(messages, text),
                    })

            def _json(self, status: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _stream(self, text: str, model: str, used: dict[str, int] | None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                words = text.split(" ")
                for i, w in enumerate(words):
                    delta = {"content": w if i == 0 else " " + w}
                    self._chunk({"object": "chat.completion.chunk", "model": model,
                                 "choices": [{"index": 0, "delta": delta}]})
                if used is not None:  # as OpenAI does: a last chunk with usage, no choices
                    self._chunk({"object": "chat.completion.chunk", "model": model,
                                 "choices": [], "usage": used})
                self._chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")

            def _chunk(self, data: Any) -> None:
                line = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
                raw = line.encode()
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024

        self.server = Server((host, port), Handler)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> FakeLLM:
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-llm",
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def config(self, name: str = "fake", **extra: Any) -> dict[str, Any]:
        """A model config pointing at this endpoint."""
        return {"config_name": name, "model_type": "openai_chat", "model_name": "fake",
                "base_url": self.url, **extra}
