"""A judge behind any OpenAI-compatible chat-completions server (vLLM, llama.cpp, hosted APIs).

Standard library only (urllib + a thread pool). Each item is one request at temperature 0.
Transient faults (connection refused, timeouts, HTTP 408/429/5xx, a reply that is not a
chat-completions JSON) are retried with exponential backoff; other HTTP errors (401, 404, 400)
are the caller's to fix and stop the run at once. Every verdict is appended to a JSONL cache in the
run directory the moment it arrives, so a crash or a rerun never asks an answered item again.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.evaluation.judges.base import JudgeError, JudgeItem, Role, Verdict, VerdictCache, judge_cached
from refusal_atlas.evaluation.judges.rubrics import rubric_for

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _Transient(Exception):
    """A fault worth retrying."""


class _Fatal(Exception):
    """A fault retrying cannot fix (bad key, wrong URL or model name)."""


def chat_completions_url(url: str) -> str:
    """Accept a base URL (``http://host:8000/v1``) or the full ``.../chat/completions`` URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"endpoint URL must look like http://host:port/v1, got {url!r}")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class EndpointJudge:
    name = "endpoint"

    def __init__(self, url: str, model: str, *, harmful_rubric: str = "strongreject",
                 cache_path: str | Path | None = None, concurrency: int = 8, timeout: float = 60.0,
                 max_tries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0,
                 api_key: str | None = None):
        rubric_for("harmful", harmful_rubric)
        if not model:
            raise ConfigError("the endpoint judge needs a model name (--endpoint-model), as the server serves it")
        if concurrency < 1 or max_tries < 1 or timeout <= 0:
            raise ConfigError("endpoint judge: concurrency and max_tries must be >= 1 and timeout > 0")
        self.url, self.model = chat_completions_url(url), model
        self.harmful_rubric, self.concurrency, self.timeout = harmful_rubric, concurrency, timeout
        self.max_tries, self.backoff, self.max_backoff = max_tries, backoff, max_backoff
        self._api_key = api_key  # the CLI passes $OPENAI_API_KEY (settings.endpoint_api_key)
        self.cache = VerdictCache(cache_path)
        self.requests_sent = 0  # for tests and logs: how many HTTP requests this judge made
        self._count_lock = threading.Lock()

    def describe(self, role: Role = "harmful") -> dict:
        return {"judge": f"endpoint:{self.model}:{self.harmful_rubric}", "judge_kind": self.name,
                "judge_model": self.model, "rubric": rubric_for(role, self.harmful_rubric).name}

    def check_reachable(self) -> None:
        """Fail fast (before any generation) if nothing listens at the endpoint's host:port."""
        parsed = urllib.parse.urlparse(self.url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=min(self.timeout, 10.0)).close()
        except OSError as exc:
            raise JudgeError(f"cannot reach the judge endpoint {self.url}: {exc.strerror or exc}") from None

    def judge(self, items: Sequence[JudgeItem], role: Role = "harmful") -> list[Verdict]:
        rubric = rubric_for(role, self.harmful_rubric)
        abort = threading.Event()
        errors: list[str] = []

        def one(item: JudgeItem, key: str) -> None:
            if abort.is_set():
                return
            try:
                content = self._ask(rubric.user_text(item.prompt, item.response), rubric.max_tokens, abort)
            except _Fatal as exc:
                abort.set()
                errors.append(str(exc))
                return
            except _Transient as exc:
                errors.append(str(exc))
                return
            self.cache.put(key, rubric.parse(content), rubric=rubric.name, raw=content[-2000:])

        def ask(indices: list[int], keys: list[str]) -> None:
            with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
                list(pool.map(lambda a: one(*a), [(items[i], k) for i, k in zip(indices, keys)]))
            if errors:
                done = sum(self.cache.get(k) is not None for k in keys)
                raise JudgeError(
                    f"endpoint judge {self.url}: {len(keys) - done} of {len(keys)} items unanswered "
                    f"(last error: {errors[-1]}); the {done} answered are saved"
                    + (f" in {self.cache.path}, and a rerun asks only the rest" if self.cache.path else ""))

        return judge_cached(items, self.cache, f"endpoint:{self.model}", rubric.rubric_id, ask)

    # transport ---------------------------------------------------------------------------------
    def _ask(self, text: str, max_tokens: int, abort: threading.Event) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": text}],
                           "temperature": 0, "max_tokens": max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last = ""
        for attempt in range(self.max_tries):
            if attempt:
                if abort.is_set():
                    raise _Transient(last)
                time.sleep(self._delay(attempt))
            try:
                return self._post(body, headers)
            except _Transient as exc:
                last = str(exc)
        raise _Transient(f"{last} (after {self.max_tries} tries)")

    def _delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return base * (1 + 0.1 * random.random())  # jitter spreads retries of parallel workers

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        with self._count_lock:
            self.requests_sent += 1
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            msg = f"HTTP {exc.code} from {self.url}: {detail}"
            raise (_Transient if exc.code in RETRY_STATUS else _Fatal)(msg) from None
        except (TimeoutError, socket.timeout):
            raise _Transient(f"timed out after {self.timeout:g} s") from None
        except urllib.error.URLError as exc:
            raise _Transient(f"cannot reach {self.url}: {exc.reason}") from None
        except (ConnectionError, OSError) as exc:  # reset or dropped mid-reply
            raise _Transient(f"connection error: {exc}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient(f"malformed reply (not chat-completions JSON): {raw[:120]!r}") from None
        if not isinstance(content, str):
            raise _Transient(f"malformed reply: message content is {type(content).__name__}")
        return content
