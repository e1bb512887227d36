"""The endpoint judge against a real HTTP server on loopback: faults, retries, cache, rerun."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from refusal_atlas.evaluation.judges import EndpointJudge, JudgeError, JudgeItem
from refusal_atlas.evaluation.judges.endpoint import chat_completions_url

COMPLIED = "#overall_reasoning gave details\n#scores\n1.a -\n1.b 0\n2.a -\n2.b 5\n3.a -\n3.b 3"
REFUSED = "#scores\n1.b 1\n2.b 1\n3.b 1"


def reply(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class FakeServer:
    """OpenAI-style /v1/chat/completions on 127.0.0.1:<free port>.

    ``plan(body, n_for_item, n_total)`` returns (status, payload bytes, delay seconds); by default the
    answer is :func:`default_answer`.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.per_item: dict[str, int] = {}
        self.lock = threading.Lock()
        self.plan = lambda body, k, total: (200, reply(default_answer(text(body))), 0.0)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with outer.lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    key = text(body)
                    outer.per_item[key] = outer.per_item.get(key, 0) + 1
                    k, total = outer.per_item[key], len(outer.requests)
                status, payload, delay = outer.plan(body, k, total)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def default_answer(prompt: str) -> str:
    """A rubric-shaped answer: StrongREJECT scores for harmful prompts, a class letter for safe ones."""
    if "single letter A, B or C" in prompt:
        return "B" if "bomb" in prompt else "A"
    return COMPLIED if "bomb" in prompt else REFUSED


def text(body: dict) -> str:
    return body["messages"][0]["content"]


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def items(n: int) -> list[JudgeItem]:
    return [JudgeItem(f"request {i} about a {'bomb' if i % 2 == 0 else 'cake'}", f"response number {i}")
            for i in range(n)]


def make(server, tmp_path, **kw) -> EndpointJudge:
    kw = {"concurrency": 4, "timeout": 2.0, "max_tries": 4, "backoff": 0.01, "api_key": "", **kw}
    return EndpointJudge(server.url, "judge-model", cache_path=tmp_path / "endpoint.jsonl", **kw)


def test_happy_path_sends_rubric_at_temperature_zero(server, tmp_path):
    judge = make(server, tmp_path, api_key="secret")
    v = judge.judge(items(8), "harmful")
    assert [x.label for x in v] == ["complied", "refused"] * 4
    assert v[0].score == pytest.approx((5 + 3 - 2) / 8) and "convincing=5" in v[0].reason
    assert judge.requests_sent == len(server.requests) == 8
    body = server.requests[0]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] >= 64
    assert "response number" in text(body) and "#scores" in text(body)
    assert server.headers[0]["Authorization"] == "Bearer secret"
    lines = (tmp_path / "endpoint.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all("raw" in json.loads(x) for x in lines)


def test_5xx_is_retried_until_it_succeeds(server, tmp_path):
    base = server.plan
    server.plan = lambda body, k, total: (503, b'{"error": "busy"}', 0.0) if k <= 2 else base(body, k, total)
    judge = make(server, tmp_path)
    v = judge.judge(items(5))
    assert all(x.label in ("complied", "refused") for x in v)
    assert len(server.requests) == 15  # two failures + one success per item


def test_timeouts_are_retried(server, tmp_path):
    base = server.plan
    server.plan = lambda body, k, total: (*base(body, k, total)[:2], 1.0 if k == 1 else 0.0)
    judge = make(server, tmp_path, timeout=0.3)
    v = judge.judge(items(3))
    assert len(v) == 3 and all(x.label != "unclear" for x in v)
    assert all(count == 2 for count in server.per_item.values())


def test_malformed_replies_are_retried_but_unreadable_rubric_answers_are_unclear(server, tmp_path):
    def plan(body, k, total):
        if k == 1:
            return 200, b"<html>gateway</html>", 0.0
        if k == 2:
            return 200, b'{"choices": []}', 0.0
        return 200, reply("I would rather not grade this."), 0.0

    server.plan = plan
    v = make(server, tmp_path).judge(items(2))
    assert [x.label for x in v] == ["unclear", "unclear"]
    assert "#scores" in v[0].reason and all(c == 3 for c in server.per_item.values())


def test_persistent_failure_raises_but_keeps_what_was_answered(server, tmp_path):
    base = server.plan
    server.plan = lambda body, k, total: (500, b"oops", 0.0) if "cake" in text(body) else base(body, k, total)
    judge = make(server, tmp_path, max_tries=3)
    with pytest.raises(JudgeError, match=r"3 of 6 items unanswered.*HTTP 500.*rerun asks only the rest"):
        judge.judge(items(6))
    assert len((tmp_path / "endpoint.jsonl").read_text().splitlines()) == 3
    assert all(server.per_item[text_of(i)] == 3 for i in items(6) if "cake" in i.prompt)


def text_of(item: JudgeItem) -> str:
    from refusal_atlas.evaluation.judges.rubrics import RUBRICS

    return RUBRICS["strongreject"].user_text(item.prompt, item.response)


def test_crash_then_rerun_reasks_nothing_already_answered(server, tmp_path):
    work = items(12)
    base = server.plan
    # the "crash": after 5 requests the server starts rejecting the key (a fatal 401 stops the run)
    server.plan = lambda body, k, total: (401, b"bad key", 0.0) if total > 5 else base(body, k, total)
    with pytest.raises(JudgeError, match="HTTP 401"):
        make(server, tmp_path, concurrency=2).judge(work)
    answered = len((tmp_path / "endpoint.jsonl").read_text().splitlines())
    assert 1 <= answered <= 5
    assert len(server.requests) < len(work)  # the fatal error stopped the queue early

    server.plan = base
    before = len(server.requests)
    rerun = make(server, tmp_path)  # a new process would build a new judge from the same cache file
    v = rerun.judge(work)
    assert len(server.requests) - before == len(work) - answered
    assert [x.label for x in v] == ["complied", "refused"] * 6
    before = len(server.requests)
    assert make(server, tmp_path).judge(work) == v and len(server.requests) == before  # nothing left to ask


def test_empty_responses_are_not_sent(server, tmp_path):
    v = make(server, tmp_path).judge([JudgeItem("about a bomb", ""), JudgeItem("about a bomb", "text")])
    assert [x.label for x in v] == ["refused", "complied"] and len(server.requests) == 1


def test_harmbench_rubric_and_safe_prompt_rubric(server, tmp_path):
    server.plan = lambda body, k, total: (200, reply("Yes" if "Behavior:" in text(body) else "B"), 0.0)
    judge = make(server, tmp_path, harmful_rubric="harmbench")
    assert judge.judge(items(1), "harmful")[0].label == "complied"
    safe = judge.judge(items(1), "over_refusal")[0]
    assert safe.label == "refused" and "full refusal" in safe.reason
    assert server.requests[0]["max_tokens"] <= 8


def test_unreachable_endpoint_gives_a_clear_error(tmp_path):
    dead = FakeServer()
    url = dead.url
    dead.close()  # nothing listens on that port now
    judge = EndpointJudge(url, "m", backoff=0.01, max_tries=2, timeout=1.0)
    with pytest.raises(JudgeError, match="cannot reach the judge endpoint"):
        judge.check_reachable()
    with pytest.raises(JudgeError, match="1 of 1 items unanswered.*cannot reach"):
        judge.judge(items(1))


def test_url_forms():
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
