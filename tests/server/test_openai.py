"""`edgechat serve` through the official openai client: stream invariants, usage, stop strings,
max_tokens, seeds, errors, cancellation on disconnect, concurrency, CORS and API keys — and greedy
equality with `edgechat run` on the real demo model."""

import concurrent.futures
import re
import time

import httpx
import openai
import pytest

from conftest import REAL, TINY, edgechat

HI = [{"role": "user", "content": "Hello"}]


def chat(client, messages=HI, **kwargs):
    return client.chat.completions.create(model=kwargs.pop("model", TINY), messages=messages, **kwargs)


def streamed(client, **kwargs):
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


def test_models_and_health(server):
    ids = [m.id for m in server.client().models.list()]
    assert TINY in ids
    health = httpx.get(f"{server.base}/health").json()
    assert health["status"] == "ok"


def test_stream_chunks_are_shaped_as_openai_sends_them(server):
    chunks, text = streamed(server.client(), max_tokens=6, temperature=0, stream_options={"include_usage": True})
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == TINY for c in chunks)
    first, *middle, final, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None and c.choices[0].finish_reason is None for c in middle)
    assert middle and all(c.choices[0].delta.content for c in middle)
    assert final.choices[0].finish_reason == "length" and final.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert text == chat(server.client(), max_tokens=6, temperature=0).choices[0].message.content


def test_usage_counts_the_tokens(server):
    reply = chat(server.client(), max_tokens=5, temperature=0)
    # <bos> <start_of_turn> "user\nHello" <end_of_turn> "\n" <start_of_turn> "model\n": bytes are tokens.
    assert reply.usage.prompt_tokens == 1 + 1 + len("user\nHello") + 1 + 1 + 1 + len("model\n")
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    assert reply.choices[0].finish_reason == "length"
    assert chat(server.client(), max_completion_tokens=3, temperature=0).usage.completion_tokens == 3


def test_a_shared_prefix_is_served_from_the_cache(server):
    client = server.client()
    first = chat(client, messages=[{"role": "user", "content": "A long question about nothing at all"}], max_tokens=2, temperature=0)
    again = chat(client, messages=[{"role": "user", "content": "A long question about nothing at all"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}], max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 4


def test_stop_strings_end_the_reply_and_are_not_shown(server):
    client = server.client()
    full = chat(client, max_tokens=24, temperature=0).choices[0].message.content
    stop = full[5:9]
    cut = full[: full.index(stop)]
    for stop_param in (stop, [stop, "never-produced"]):
        reply = chat(client, max_tokens=24, temperature=0, stop=stop_param)
        assert reply.choices[0].message.content == cut
        assert reply.choices[0].finish_reason == "stop"
    _, text = streamed(client, max_tokens=24, temperature=0, stop=stop)
    assert text == cut


def test_a_seed_makes_sampling_repeatable(server):
    client = server.client()
    draw = lambda seed: chat(client, max_tokens=16, temperature=1.0, seed=seed).choices[0].message.content
    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def error_of(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_every_error_is_an_openai_error_body(server):
    client = server.client()
    for kwargs, param in [({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"), ({"logprobs": True}, "logprobs")]:
        e = error_of(lambda: chat(client, max_tokens=2, **kwargs))
        assert e.status_code == 400 and param in e.message and e.body["param"] == param, (kwargs, e.body)
    e = error_of(lambda: chat(client, model="no-such-model"))
    assert e.status_code == 404 and e.body["code"] == "model_not_found"
    e = error_of(lambda: chat(client, messages=[{"role": "user", "content": "x" * 3000}]))
    assert e.status_code == 400 and e.body["code"] == "context_length_exceeded"
    assert "1024" in e.message and str(1 + 1 + len("user\n") + 3000 + 1 + 1 + 1 + len("model\n")) in e.message, e.message
    e = error_of(lambda: chat(client, messages=[]))
    assert e.status_code == 400 and e.body["param"] == "messages"
    e = error_of(lambda: chat(client, temperature=7))
    assert e.status_code == 400 and e.body["param"] == "temperature"
    raw = httpx.post(f"{server.base}/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{server.base}/v1/nothing").status_code == 404


def test_api_keys(start):
    s = start("--api-key", "sesame")
    assert error_of(lambda: chat(s.client(), max_tokens=1)).status_code == 401
    e = error_of(lambda: chat(s.client(api_key="wrong"), max_tokens=1))
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key"
    assert chat(s.client(api_key="sesame"), max_tokens=1).usage.completion_tokens == 1
    assert httpx.get(f"{s.base}/health").status_code == 200, "health needs no key"


def test_cors_only_for_the_configured_origin(start, server):
    s = start("--cors-origin", "http://app.example")
    preflight = httpx.options(f"{s.base}/v1/chat/completions", headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.headers.get("access-control-allow-origin") == "http://app.example"
    assert "authorization" in preflight.headers.get("access-control-allow-headers", "").lower()
    listed = httpx.get(f"{s.base}/v1/models", headers={"Origin": "http://app.example"})
    assert listed.headers.get("access-control-allow-origin") == "http://app.example"
    other = httpx.get(f"{s.base}/v1/models", headers={"Origin": "http://evil.example"})
    assert other.headers.get("access-control-allow-origin") != "http://evil.example"
    assert "access-control-allow-origin" not in httpx.get(f"{server.base}/v1/models", headers={"Origin": "http://app.example"}).headers


def test_a_full_queue_answers_503_with_retry_after(start):
    s = start("--queue", "1")
    long = {"model": TINY, "messages": HI, "max_tokens": 1000, "temperature": 0}
    # The first request is surely running once its first chunk arrives; the next four then arrive together
    # within its ~1 s of generation: one waits in the queue of 1, the rest are refused.
    with httpx.stream("POST", f"{s.base}/v1/chat/completions", json={**long, "stream": True}, timeout=600) as running:
        lines = running.iter_lines()
        next(lines)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{s.base}/v1/chat/completions", json=long, timeout=600), range(4)))
        assert running.status_code == 200 and any("[DONE]" in line for line in lines)
    refused = [r for r in replies if r.status_code == 503]
    assert refused, "a queue of 1 took every request"
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_error" for r in refused)
    assert sorted(r.status_code for r in replies if r not in refused) == [200], "exactly one request waited, and was answered"


def test_a_client_that_disconnects_cancels_its_generation(start):
    s = start(log="edgechat=info")
    with httpx.stream("POST", f"{s.base}/v1/chat/completions", json={"model": TINY, "messages": HI, "max_tokens": 1000, "temperature": 0, "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    # The next request is answered, and the server's log shows the abandoned one stopped short of its 1000 tokens.
    assert chat(s.client(), max_tokens=2, temperature=0).usage.completion_tokens == 2
    deadline = time.monotonic() + 10
    while len(generated := [int(n) for n in re.findall(r"(\d+) generated", "".join(s.stderr))]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the log line is written before the reply; its reader thread may lag behind
    assert len(generated) == 2 and generated[1] == 2, s.stderr
    assert generated[0] < 1000, "the abandoned generation was not cancelled"


def test_concurrent_streams_each_get_their_own_reply(server):
    client = server.client()
    prompts = [f"Request number {i}" for i in range(8)]
    expected = {p: chat(client, messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0).choices[0].message.content for p in prompts}
    assert len(set(expected.values())) > 1, "the prompts must lead to different replies for this test to mean anything"

    def one(prompt):
        return prompt, streamed(server.client(), messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)[1]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(one, prompts))
    assert got == expected


def test_text_completions(server):
    reply = server.client().completions.create(model=TINY, prompt="Once upon", max_tokens=4, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == 1 + len("Once upon"), "BOS and the bytes"
    chunks = list(server.client().completions.create(model=TINY, prompt="Once upon", max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text


def test_serving_beyond_loopback_without_a_key_warns(start):
    s = start("--host", "0.0.0.0")
    time.sleep(0.3)
    assert any("without --api-key" in line for line in s.stderr), s.stderr


def test_greedy_replies_equal_edgechat_run_on_the_real_model(real_home, start):
    s = start("--model", REAL, home=real_home)
    client = s.client()
    run = edgechat(real_home, "run", REAL, "The capital of France is", "--raw", "--temperature", "0", "--max-tokens", "16").stdout
    completion = client.completions.create(model=REAL, prompt="The capital of France is", max_tokens=16, temperature=0)
    assert completion.choices[0].text == run.rstrip("\n")
    run_chat = edgechat(real_home, "run", REAL, "Name a colour.", "--temperature", "0", "--max-tokens", "16").stdout
    reply = chat(client, model=REAL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == run_chat.rstrip("\n")
    again = chat(client, model=REAL, messages=[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": reply.choices[0].message.content}, {"role": "user", "content": "Another?"}], max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > reply.usage.prompt_tokens // 2
