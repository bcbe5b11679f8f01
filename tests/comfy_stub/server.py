"""Stand-in for ComfyUI's ``server.PromptServer``: records what nodes send to the browser."""

from __future__ import annotations

import threading
from typing import Any


class PromptServer:
    instance: PromptServer | None = None

    def __init__(self) -> None:
        self.client_id = "test-client"
        self.last_node_id: str | None = None
        self.messages: list[tuple[str, Any, str | None]] = []
        self._lock = threading.Lock()

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        with self._lock:
            self.messages.append((event, data, sid))

    def send_progress_text(self, text: str | bytes, node_id: str, sid: str | None = None) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        self.send_sync("progress_text", {"node": node_id, "text": text}, sid)

    def of(self, event: str) -> list[Any]:
        with self._lock:
            return [data for name, data, _ in self.messages if name == event]
