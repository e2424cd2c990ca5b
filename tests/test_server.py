"""The OpenAI-compatible server (scripts/serve.py) as a client sees it: the official ``openai``
client against a server started on a free local port and stopped by its own process id.
Concurrent greedy requests equal generate() of each prompt alone; streaming; stop strings; chat; batches of prompts and n; bad input and
overload answers (the server healthy after); a client leaving mid-stream frees its pages;
SIGTERM lets the stream in flight finish and exits 0. Every loop here is bounded."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from helpers import computed_once, script_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "models", "default")
PROMPTS = ["Return the number of ", "def f(x):\n    ", "Raise ValueError if ", "This function "]
LONGEST = 12
CHAT_TEMPLATE = os.path.join(ROOT, "tests", "fixtures", "chat_plain.jinja")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs, seconds: float = 240) -> None:
    """Until ``url``'s /health answers 200; fails if one of ``procs`` exits first or time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a server process exited: {p.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail(f"the server did not come up in {seconds:.0f} s")


@pytest.fixture
def server():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--port", str(port),
         "--max-seqs", "4", "--max-step-tokens", "32", "--chunk", "16", "--page-size", "32",
         "--max-waiting", "8", "--chat-template", CHAT_TEMPLATE],
        env=script_env(8), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc])
    except BaseException:
        proc.kill()
        raise
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Greedy tokens of each prompt (generate(), the checkpoint's dtype, no stop ids), made
    once per run: the prompts as one left-padded static batch, whose rows are each prompt's
    alone (tests/test_serving.py's ``alone``)."""
    def compute():
        import moe_relayfree as mr
        from moe_relayfree_models import checkpoint, generation, tokenizer

        model = checkpoint.load_model(DEFAULT, mesh=mr.make_ep_mesh(8))
        tok = tokenizer.load_tokenizer(DEFAULT, model.cfg.vocab_size)
        rows = generation.generate(model, [tok.encode(p) for p in PROMPTS], LONGEST)["tokens"]
        # greedy: prefixes agree
        return {p: [tok.decode(ids[:n]) for n in range(LONGEST + 1)] for p, ids in zip(PROMPTS, rows)}

    return computed_once(tmp_path_factory, "server_references", compute)


def check_concurrent_requests_through_the_openai_client(server, references):
    """16 concurrent greedy requests of different prompts and max_tokens (4 run at a time, 8
    wait, the rest get 429 with Retry-After, which the client honours and retries): each text
    is generate()'s for its prompt alone; streaming gives the same text in pieces."""
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=30)
    cases = [(PROMPTS[i % 4], 3 + (5 * i) % (LONGEST - 2)) for i in range(16)]

    def complete(case):
        prompt, n = case
        r = client.completions.create(model="default", prompt=prompt, max_tokens=n,
                                      temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(complete, cases))
    for (prompt, n), (text, reason, count) in zip(cases, results):
        assert (text, reason, count) == (references[prompt][n], "length", n), (prompt, n)
    assert [m.id for m in client.models.list().data] == ["default"]

    stream = client.completions.create(model="default", prompt=PROMPTS[0], max_tokens=LONGEST,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = [c.choices[0] for c in stream]
    pieces = [c.text for c in chunks]
    assert len(pieces) > 2 and "".join(pieces) == references[PROMPTS[0]][LONGEST]
    ids = [i for c in chunks for i in c.model_extra["token_ids"]]  # vLLM's return_token_ids
    assert len(ids) == LONGEST and chunks[0].model_extra["prompt_token_ids"]
    metrics = httpx.get(f"{url}/metrics").text
    assert 'moe_relayfree_steps_total{schedule="decode"}' in metrics
    assert "moe_relayfree_kv_pages_in_use 0" in metrics
    # the latency histograms: one first token and one end per request, a gap per later token
    tokens = sum(n for _, n in cases) + LONGEST
    for name, count in [("time_to_first_token", 17), ("e2e_request_latency", 17),
                        ("inter_token_latency", tokens - 17)]:
        assert f"moe_relayfree_{name}_seconds_count {count}" in metrics, name
        assert f'moe_relayfree_{name}_seconds_bucket{{le="+Inf"}} {count}' in metrics, name



def check_a_stop_string_across_tokens_ends_the_text_before_it(server, references):
    """A stop string made of the last character of one token and the first of the next: the
    text (plain, and streamed pieces joined) is generate()'s cut before its first occurrence,
    no character of it sent, and finish_reason is "stop"."""
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=5)
    prompt = PROMPTS[0]
    texts = references[prompt]
    full = texts[LONGEST]
    spans = [texts[n][-1] + texts[n + 1][len(texts[n])] for n in range(1, LONGEST)
             if texts[n] and len(texts[n + 1]) > len(texts[n])]
    stop = max(spans, key=full.find)  # the one that lets the most text through
    want = full[:full.find(stop)]
    assert want
    args = dict(model="default", prompt=prompt, max_tokens=LONGEST, temperature=0, stop=[stop],
                extra_body={"ignore_eos": True})
    plain = client.completions.create(**args).choices[0]
    assert (plain.text, plain.finish_reason) == (want, "stop"), stop
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **args)]
    assert "".join(c.text for c in chunks) == want and chunks[-1].finish_reason == "stop"



def check_chat_completions_render_the_template(server):
    """/v1/chat/completions through the openai client (plain and streamed) gives the text that
    /v1/completions gives for the template's rendering of the messages as token ids, none
    added (the server's --chat-template here; checkpoints' templates: tests/test_chat.py)."""
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=5)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Return the number of "}]}]
    from moe_relayfree_models.serving.chat import ChatTemplate
    from moe_relayfree_models.tokenizer import encode

    ids = encode(ChatTemplate.from_folder(DEFAULT, CHAT_TEMPLATE).render(messages), bos=False)
    args = dict(model="default", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    want = client.completions.create(prompt=ids, **args).choices[0].text
    answer = client.chat.completions.create(messages=messages, **args)
    assert answer.choices[0].message.content == want and answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    # vLLM's /tokenize and /detokenize: the same ids a chat or a completion is given
    assert httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"] == ids
    text = "Return the number of "
    got = httpx.post(f"{url}/tokenize", json={"prompt": text}).json()
    assert got["tokens"] == encode(text) and got["count"] == len(text) + 1  # BOS + bytes
    assert httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}
                      ).json()["tokens"] == encode(text, bos=False)
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"] == \
        ChatTemplate.from_folder(DEFAULT, CHAT_TEMPLATE).render(messages)
    assert httpx.post(f"{url}/detokenize", json={"tokens": "x"}).status_code == 400
    assert client.models.list().data[0].model_extra["max_model_len"] == 1024



def check_a_batch_of_prompts_and_n_completions_each(server, references):
    """/v1/completions with two prompts and n=2: four choices in OpenAI's order (prompt by
    prompt), greedy ones each generate()'s text, usage counting each prompt once; streamed
    (chunks of the choices interleaved, each naming its index) the same texts. Sampled with a
    seed, completion j of a prompt is the seed + j sample: reproducible, and not all alike."""
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=5)
    prompts, n = [PROMPTS[0], PROMPTS[2]], 6
    args = dict(model="default", prompt=prompts, max_tokens=n, n=2, temperature=0,
                extra_body={"ignore_eos": True})
    answer = client.completions.create(**args)
    want = [references[p][n] for p in prompts for _ in range(2)]
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert [c.text for c in answer.choices] == want
    from moe_relayfree_models.tokenizer import encode

    assert answer.usage.prompt_tokens == sum(len(encode(p)) for p in prompts)
    assert answer.usage.completion_tokens == 4 * n
    texts = ["", "", "", ""]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **args))
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == want and chunks[-1].usage.completion_tokens == 4 * n

    def sampled(seed, count):
        r = client.completions.create(model="default", prompt=PROMPTS[3], max_tokens=8, n=count,
                                      temperature=1, seed=seed, extra_body={"ignore_eos": True})
        return [c.text for c in r.choices]

    three = sampled(7, 3)
    assert sampled(7, 3) == three and sampled(8, 1) == three[1:2] and sampled(9, 1) == three[2:]
    assert len(set(three)) > 1

    # a 71-token prompt (BOS + 70 bytes) sent again: its first two 32-row pages were cached
    long = "Return the number of items in the list, counting nested lists as one. "[:70]
    usage = [client.completions.create(model="default", prompt=long, max_tokens=2,
                                       temperature=0).usage for _ in range(2)]
    assert [u.prompt_tokens_details.cached_tokens for u in usage] == [0, 64]


BAD = [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x" * 1100}, 400, "prompt"),  # past the model's 1024 positions
    ({"prompt": "x", "max_tokens": 1024}, 400, "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": ["x", "y"], "n": 5}, 400, "n"),  # 10 completions, past the queue's 8
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "return_token_ids": "yes"}, 400, "return_token_ids"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": []}, 400,
     "chat_template_kwargs"),
]


def check_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, _ = server
    for body, status, param in BAD:
        route = "chat/completions" if "messages" in body else "completions"
        r = httpx.post(f"{url}/v1/{route}", json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], body
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def check_malformed_json_and_the_client_error_types(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt="x", temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def check_overload_is_429_with_retry_after(server):
    """20 requests at once on 4 slots and a queue of 8: some are refused at once with 429 and
    Retry-After, none hangs, and every accepted one completes."""
    url, _ = server

    def post(_):
        return httpx.post(f"{url}/v1/completions", json={"prompt": "Return ", "max_tokens": 10,
                                                          "temperature": 0}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(post, range(20)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def check_a_client_leaving_mid_stream_frees_its_pages(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": "Return ", "max_tokens": 200, "temperature": 0,
                            "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: {") for line in got)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if "moe_relayfree_kv_pages_in_use 0" in text and "moe_relayfree_requests_running 0" in text:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned request still holds pages after 60 s")


def check_sigterm_finishes_the_stream_in_flight_and_exits_0(server):
    """Stops the server: a stream started before SIGTERM gets all its tokens and [DONE]; the
    process exits 0."""
    url, proc = server
    received = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                      json={"prompt": "Return ", "max_tokens": 40, "temperature": 0,
                            "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                received.append(line[6:])
            if len(received) == 2:
                proc.send_signal(signal.SIGTERM)
    assert received[-1] == "[DONE]"
    chunks = [json.loads(c) for c in received[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=120) == 0


def check_the_serving_benchmark_drives_it(server, tmp_path):
    """scripts/bench_serve.py against the server: 6 requests at once, every one streamed to its
    max_tokens (counted from the stream's usage chunk), the report's numbers consistent with
    each other, its JSON, markdown and plot written."""
    url, _ = server
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_serve

    out = tmp_path / "serve"
    assert bench_serve.main(["--base-url", url, "--num-prompts", "6", "--input-len", "8",
                             "--output-len", "6", "--goodput", "ttft:100000", "tpot:100000",
                             "--out", str(out)]) == 0
    run = json.loads((out / "serve.json").read_text())["run"]
    from moe_relayfree_models.serving.loadgen import Workload

    want = sum(m for _, m in Workload(num_prompts=6, input_len=8, output_len=6).requests())
    assert (run["completed"], run["failed"]) == (6, 0) and run["good_requests"] == 6
    assert run["output_throughput"] * run["duration_s"] == pytest.approx(want)
    assert 0 < run["ttft_ms"]["median"] <= run["e2el_ms"]["median"]
    assert run["tpot_ms"]["p99"] > 0 and run["itl_ms"]["p50"] > 0
    assert "| ttft |" in (out / "serve.md").read_text() and (out / "serve.png").stat().st_size > 1000


def test_the_server_as_an_openai_client_sees_it(server, references, tmp_path):
    """One server, one test (the checks share it, and the last one stops it)."""
    check_concurrent_requests_through_the_openai_client(server, references)
    check_a_stop_string_across_tokens_ends_the_text_before_it(server, references)
    check_chat_completions_render_the_template(server)
    check_a_batch_of_prompts_and_n_completions_each(server, references)
    check_the_serving_benchmark_drives_it(server, tmp_path)
    check_bad_requests_get_openai_errors_and_the_server_keeps_serving(server)
    check_malformed_json_and_the_client_error_types(server)
    check_overload_is_429_with_retry_after(server)
    check_a_client_leaving_mid_stream_frees_its_pages(server)
    check_sigterm_finishes_the_stream_in_flight_and_exits_0(server)


def test_two_processes_serve_as_one(references):
    """2 processes x 4 CPU devices (jax.distributed over 127.0.0.1): process 0 serves HTTP and
    schedules, process 1 runs the steps it sends. Concurrent greedy requests through the
    openai client (plain and streamed) equal generate() of each prompt alone on one process;
    SIGTERM to process 0 drains it, and both exit 0."""
    from test_multihost import free_port as free_pair

    coordinator, port = free_pair(), free_port()
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--devices", "4",
         "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2", "--process-id",
         str(i), "--port", str(port), "--max-seqs", "4", "--max-step-tokens", "32", "--chunk",
         "16", "--page-size", "32"],
        env=dict(script_env(), JAX_PLATFORMS="cpu"), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, procs)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=5)
        cases = [(PROMPTS[i % 4], 4 + 2 * i) for i in range(4)]

        def complete(case):
            prompt, n = case
            return client.completions.create(model="default", prompt=prompt, max_tokens=n,
                                             temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(complete, cases))
        assert texts == [references[p][n] for p, n in cases]
        stream = client.completions.create(model="default", prompt=PROMPTS[1], max_tokens=LONGEST,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream) == references[PROMPTS[1]][LONGEST]
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_inference_script_across_two_processes(references):
    """scripts/infer.py over 2 processes x 4 devices, batch 8 (each process holds half of
    every step's tokens): only process 0 reports, and each completion is generate()'s of its
    prompt alone on one process."""
    from test_multihost import free_port as free_pair

    coordinator = free_pair()
    argv = [sys.executable, os.path.join(ROOT, "scripts", "infer.py"), "--json", "--quiet",
            "--max-new-tokens", "6", "--ignore-eos", "--batch", "8", "--devices", "4",
            "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    procs = [subprocess.Popen(argv + ["--process-id", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(script_env(), JAX_PLATFORMS="cpu"), cwd=ROOT)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            outs.append(out)
    finally:
        for p in procs:
            p.kill()

    def report(text):  # gloo writes connection lines to stdout, also in the middle of a line
        text = "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))
        return text[text.find("{"): text.rfind("}") + 1] if "{" in text else ""

    multi = json.loads(report(outs[0]))
    assert report(outs[1]).strip() == ""  # only process 0 reports
    assert multi["processes"] == 2 and multi["devices"] == 8
    assert [o["prompt"] for o in multi["outputs"]] == PROMPTS * 2
    assert [o["completion"] for o in multi["outputs"]] == [references[p][6] for p in PROMPTS * 2]


def test_chat_without_a_template_is_a_clear_400():
    """A checkpoint with no chat template (the default model, served without --chat-template):
    /v1/chat/completions says so and where to go (the app alone: nothing reaches an engine)."""
    from fastapi.testclient import TestClient

    from moe_relayfree_models.serving.server import Server
    from moe_relayfree_models.tokenizer import ByteTokenizer

    client = TestClient(Server(None, ByteTokenizer(), model_name="default").app)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "--chat-template" in r.json()["error"]["message"]
