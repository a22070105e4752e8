"""The OpenAI API as today's clients call it, with the real `openai` client (and LangChain's ChatOpenAI where
installed) against the real server on the tiny checkpoint: legacy completions, the Responses API (plain,
streamed, with an image, instructions, previous_response_id), and no request parameter silently ignored
(each one the server does not implement is a 400 naming it). The model is random (gibberish text): answers are
compared with the library's own answer for the same prompt, never with hard-coded text."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import torch  # noqa: E402

from conftest import png_data_url as image_url  # noqa: E402
from hyperowl.serve import ServeConfig, ServerThread, create_app  # noqa: E402

MODEL = "tiny-owl"


def png(url: str) -> bytes:
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    import hyperowl

    return hyperowl.load(chat_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    cfg = ServeConfig(model_name=MODEL, batch_window_ms=1, max_stored_responses=3)
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw_reference(model, prompt: str, max_new: int) -> tuple[str, int, str]:
    """The library's greedy answer to a raw (untemplated) prompt: (text, completion tokens, finish reason),
    detokenized as `model.chat` does (TextStream: a trailing incomplete UTF-8 character is not sent)."""
    from hyperowl.chat import TextStream
    from hyperowl.engine import Engine, Request, SamplingParams

    tok = model.processor.tokenizer
    ids = tok.encode(prompt, add_special_tokens=True).ids
    out = Engine(model.model).generate([Request(torch.tensor(ids), params=SamplingParams(
        max_new_tokens=max_new, stop_token_ids=model.stop_ids))])[0]
    stopped = bool(out) and out[-1] in model.stop_ids
    stream = TextStream(tok, model.stop_ids)
    return "".join(stream.push(t) for t in out), len(out), "stop" if stopped else "length"


def chat_reference(client, messages, max_tokens):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)


# -- never silently ignored --------------------------------------------------------------------------------

UNSUPPORTED_CHAT = {
    "tools": dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    "tool_choice": dict(tool_choice="auto"),
    "functions": dict(functions=[{"name": "f", "parameters": {"type": "object"}}]),
    "function_call": dict(function_call="auto"),
    "logit_bias": dict(logit_bias={"5": 10}),
    "frequency_penalty": dict(frequency_penalty=0.5),
    "presence_penalty": dict(presence_penalty=0.5),
    "audio": dict(audio={"voice": "alloy", "format": "wav"}),
    "modalities": dict(modalities=["text", "audio"]),
    "prediction": dict(prediction={"type": "content", "content": "x"}),
    "reasoning_effort": dict(reasoning_effort="low"),
    "verbosity": dict(verbosity="low"),
    "web_search_options": dict(web_search_options={}),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_CHAT))
def test_unsupported_chat_parameter_is_a_400_naming_it(client, name):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       **UNSUPPORTED_CHAT[name])
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == name and err["code"] == "unsupported_parameter", err
    assert repr(name) in err["message"]


def test_all_unsupported_parameters_are_named(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       logit_bias={"5": 1}, frequency_penalty=0.5)
    err = e.value.body
    assert err["param"] in ("frequency_penalty", "logit_bias") and all(
        repr(k) in err["message"] for k in ("logit_bias", "frequency_penalty"))


def test_unknown_parameter_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"guided_json": {"type": "object"}})
    assert e.value.body["param"] == "guided_json" and e.value.body["code"] == "unknown_parameter"


def test_neutral_values_and_bookkeeping_fields_are_accepted(client):
    msgs = [{"role": "user", "content": "Hi"}]
    ref = chat_reference(client, msgs, 4)
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, n=1, logprobs=False, response_format={"type": "text"},
        modalities=["text"], frequency_penalty=0, presence_penalty=0, tools=[], tool_choice="none", user="u1",
        metadata={"k": "v"}, store=False, service_tier="auto", safety_identifier="s", prompt_cache_key="p",
        parallel_tool_calls=False)
    assert r.choices[0].message.content == ref.choices[0].message.content and r.choices[0].logprobs is None


@pytest.mark.parametrize("name,kw", [("echo", dict(echo=True)), ("suffix", dict(suffix="end")),
                                     ("logit_bias", dict(logit_bias={"5": 1})),
                                     ("presence_penalty", dict(presence_penalty=1.0))])
def test_unsupported_completion_parameter_is_a_400_naming_it(client, name, kw):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, **kw)
    assert e.value.body["param"] == name and e.value.body["code"] == "unsupported_parameter", e.value.body


@pytest.mark.parametrize("name,kw", [
    ("tools", dict(tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}])),
    ("reasoning", dict(reasoning={"effort": "low"})),
    ("background", dict(background=True)),
    ("truncation", dict(truncation="auto")),
    ("conversation", dict(conversation="conv_1")),
])
def test_unsupported_response_parameter_is_a_400_naming_it(client, name, kw):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="Hello", max_output_tokens=2, **kw)
    assert e.value.body["param"] == name and e.value.body["code"] == "unsupported_parameter", e.value.body


# -- legacy completions ------------------------------------------------------------------------------------

def test_completion_is_the_raw_prompt_continued(client, model):
    prompt = "The capital of France is"
    text, n, reason = raw_reference(model, prompt, 8)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    c = r.choices[0]
    assert r.object == "text_completion" and c.text == text and c.finish_reason == reason
    assert r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == len(model.processor.tokenizer.encode(prompt, add_special_tokens=True).ids)
    # OpenAI's default max_tokens for this endpoint is 16; a list of one prompt is that prompt.
    d = client.completions.create(model=MODEL, prompt=[prompt])
    assert d.choices[0].text == raw_reference(model, prompt, 16)[0] and d.usage.completion_tokens <= 16


def test_completion_streams_as_the_client_reads_it(client, model):
    prompt = "Once upon a time"
    text, n, reason = raw_reference(model, prompt, 10)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n


def test_completion_refuses_token_ids_and_media_placeholders(client):
    for prompt, code in (([1, 2, 3], "unsupported_parameter"), (["a", "b"], "unsupported_parameter"),
                         ("<|image|> what", "invalid_value")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        assert e.value.body["param"] == "prompt" and e.value.body["code"] == code


def test_completion_seed_and_stop(client):
    kw = dict(model=MODEL, prompt="Say something", max_tokens=16, temperature=1.0, seed=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    full = a.choices[0].text
    assert full == b.choices[0].text
    if len(full) < 6:
        pytest.skip("the random model produced too little text to cut")
    stop = full[3:5]
    cut = client.completions.create(stop=stop, **kw).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


# -- the Responses API -------------------------------------------------------------------------------------

def test_response_plain_equals_chat(client):
    msgs = [{"role": "user", "content": "Hello there"}]
    ref = chat_reference(client, msgs, 6)
    r = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=6)
    assert r.object == "response" and r.id.startswith("resp_") and r.output_text == ref.choices[0].message.content
    assert r.status == ("incomplete" if ref.choices[0].finish_reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    u = r.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (
        ref.usage.prompt_tokens, ref.usage.completion_tokens, ref.usage.total_tokens)
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    # GET returns the stored object; DELETE forgets it.
    assert client.responses.retrieve(r.id).output_text == r.output_text
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_response_with_image_and_instructions_equals_chat(client):
    url = image_url()
    ref = chat_reference(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour?"}]}], 5)
    r = client.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=5, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": "What colour?"}]}])
    assert r.output_text == ref.choices[0].message.content and r.instructions == "Be brief."
    d = r.usage.input_tokens_details.model_dump()
    assert d["image_tensors"] >= 1 and d["image_tensors"] == ref.usage.prompt_tokens_details.image_tensors


def test_response_streams_the_events_the_client_accumulates(client):
    ref = client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=8)
    events = list(client.responses.create(model=MODEL, input="Tell me a story", max_output_tokens=8, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{ref.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == ref.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == ref.usage.output_tokens
    # The client's stream helper builds the same text from the deltas (get_final_response needs
    # response.completed: an answer cut by max_output_tokens ends with response.incomplete, as at OpenAI).
    with client.responses.stream(model=MODEL, input="Tell me a story", max_output_tokens=8) as stream:
        seen = [e for e in stream]
    assert "".join(e.delta for e in seen if e.type == "response.output_text.delta") == ref.output_text
    done = [e for e in seen if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == ref.output_text


def test_stream_helper_final_response_when_completed(client):
    """An answer that ends before max_output_tokens (a stop string here) completes: get_final_response works."""
    full = client.responses.create(model=MODEL, input="Say more", max_output_tokens=16, temperature=1.0,
                                   extra_body={"seed": 5}).output_text
    if len(full) < 6:
        pytest.skip("the random model produced too little text to cut")
    kw = dict(model=MODEL, input="Say more", max_output_tokens=16, temperature=1.0, extra_body={"seed": 5,
                                                                                                 "stop": full[3:5]})
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == full[: full.find(full[3:5])]


def test_previous_response_id_continues_the_conversation(client):
    url = image_url((10, 200, 10))
    first = client.responses.create(model=MODEL, instructions="Be brief.", max_output_tokens=4, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": "What is it?"}]}])
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="And its colour?",
                                     max_output_tokens=4)
    # The same conversation sent whole, as chat: instructions are not carried over (as OpenAI does).
    ref = chat_reference(client, [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And its colour?"}], 4)
    assert second.output_text == ref.choices[0].message.content and second.previous_response_id == first.id
    assert second.usage.input_tokens == ref.usage.prompt_tokens
    third = client.responses.create(model=MODEL, previous_response_id=second.id, input="Thanks", max_output_tokens=2)
    assert third.usage.input_tokens > second.usage.input_tokens


def test_previous_response_id_unknown_unstored_or_evicted_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, previous_response_id="resp_nope", input="Hi", max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id" and "resp_nope" in e.value.body["message"]
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, previous_response_id=unstored.id, input="Hi", max_output_tokens=2)
    oldest = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    for _ in range(3):  # the server keeps 3 (max_stored_responses): the oldest goes
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(oldest.id)


def test_response_input_errors_name_the_input(client):
    cases = [([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], 415, "input[0].content[0].type"),
             ([{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}], 400,
              "input[0].content[0].file_id"),
             ([{"type": "function_call_output", "call_id": "c", "output": "x"}], 400, "input[0].type"),
             ([{"role": "assistant", "content": "x"}], 400, "input[0]"),
             ([{"role": "user", "content": [{"type": "input_image", "image_url": "data:text/plain;base64,aGk="}]}],
              415, "input[0].content[0]")]
    for inp, status, param in cases:
        r = httpx.post(str(client.base_url) + "responses", json={"model": MODEL, "input": inp}, timeout=30)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    # A placeholder typed into the text is named where it was typed.
    for body, param in (({"input": "<|image|> hi"}, "input"),
                        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"},
                                                                 {"type": "input_text", "text": "<|video|>"}]}]},
                         "input[0].content[1]"),
                        ({"input": "hi", "instructions": "<|image|>"}, "instructions")):
        r = httpx.post(str(client.base_url) + "responses", json={"model": MODEL, **body}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_disconnected_streams_are_cancelled(server):
    """A client that hangs up mid-stream frees its engine row, on both new endpoints."""
    import time

    def health() -> dict:
        return httpx.get(server.url + "/health", timeout=10).json()["scheduler"]

    for path, body in (("/v1/completions", {"prompt": "Go on forever", "max_tokens": 480}),
                       ("/v1/responses", {"input": "Go on forever", "max_output_tokens": 480})):
        before = health()["cancelled"]
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", server.url + path, json={"model": MODEL, "stream": True, "min_tokens": 480,
                                                          **body}) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(8)]  # a few events, then hang up
        assert any(line.startswith("data: ") for line in got)
        deadline = time.monotonic() + 20
        while (health()["cancelled"] == before or health()["running"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health()["cancelled"] > before and health()["running"] == 0, path


def test_a_client_that_leaves_cancels_every_choice(server):
    """n = 3, the client hangs up before the answer: all three choices' rows are cancelled, not only the first
    one's (plain chat and completions collected choice 0 first and left the others running)."""
    import time

    def health() -> dict:
        return httpx.get(server.url + "/health", timeout=10).json()["scheduler"]

    long = {"model": MODEL, "n": 3, "min_tokens": 480, "seed": 1, "temperature": 1.0}
    for path, body, stream in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Go on"}],
                                                         "max_tokens": 480}, False),
                               ("/v1/completions", {"prompt": "Go on forever", "max_tokens": 480}, False),
                               ("/v1/completions", {"prompt": "Go on forever", "max_tokens": 480}, True)):
        before = health()["cancelled"]
        with httpx.Client(timeout=httpx.Timeout(60, read=60 if stream else 0.5)) as c:
            if stream:
                with c.stream("POST", server.url + path, json={**long, **body, "stream": True}) as r:
                    lines = r.iter_lines()
                    assert any(next(lines).startswith("data: ") for _ in range(4))
            else:
                with pytest.raises(httpx.ReadTimeout):
                    c.post(server.url + path, json={**long, **body})
        deadline = time.monotonic() + 30
        while (health()["cancelled"] < before + 3 or health()["running"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health()["cancelled"] - before == 3 and health()["running"] == 0, (path, stream, health())


# -- LangChain ---------------------------------------------------------------------------------------------

def test_langchain_chat_openai_chat_and_responses(server, client):
    lc = pytest.importorskip("langchain_openai")
    ref = chat_reference(client, [{"role": "user", "content": "Hello"}], 5).choices[0].message.content
    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL, max_tokens=5, temperature=0,
                        max_retries=0)
    assert llm.invoke("Hello").content == ref
    assert "".join(c.content for c in llm.stream("Hello")) == ref
    rllm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=MODEL, max_tokens=5, temperature=0,
                         max_retries=0, use_responses_api=True)
    assert rllm.invoke("Hello").text == ref
    assert "".join(c.text for c in rllm.stream("Hello")) == ref
    assert [m.content for m in llm.batch(["Hello", "Hello"])] == [ref, ref]
    # Structured output: json_schema (chat and Responses) is grammar-constrained, so even this random model's
    # answer parses into the class; function calling is still a clear 400.
    from typing import Literal

    from pydantic import BaseModel

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        legs: Literal[2, 4]

    for chat_model in (llm, rllm):
        long = chat_model.model_copy(update={"max_tokens": 64})
        pet = long.with_structured_output(Pet, method="json_schema").invoke("Hello")
        assert isinstance(pet, Pet)
    with pytest.raises(openai.BadRequestError) as e:
        llm.with_structured_output(Pet, method="function_calling").invoke("Hello")
    assert e.value.body["code"] == "unsupported_parameter" and e.value.body["param"] in {"tools", "tool_choice"}


# -- structured outputs and logprobs ---------------------------------------------------------------------

def test_chat_json_schema_answers_validate(client):
    jsonschema = pytest.importorskip("jsonschema")
    import json

    schemas = [{"type": "object", "properties": {"label": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"}},
                "required": ["label", "ok"], "additionalProperties": False},
               {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["r", "g"]},
                                                          "maxItems": 2}}, "required": ["tags"],
                "additionalProperties": False}]
    for schema in schemas:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=64,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "x", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError):  # not a schema the grammar can take
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "x", "schema": {"type": "nonsense"}}})


def test_logprobs_chat_and_completions(client, model):
    from hyperowl.engine import Engine, Request, SamplingParams

    msgs = [{"role": "user", "content": "Hello"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:  # greedy: the chosen token leads its sorted alternatives
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and c.top_logprobs[0].token == c.token
        assert abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6 and bytes(c.bytes).decode() == c.token
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, logprobs=True,
                                                 top_logprobs=3, stream=True))
    streamed = [c.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    assert streamed == [c.logprob for c in content]
    # legacy completions: the logprobs equal log_softmax of a full forward over prompt + answer
    tok = model.processor.tokenizer
    ids = tok.encode("Hello", add_special_tokens=True).ids
    out = Engine(model.model).generate([Request(torch.tensor(ids), params=SamplingParams(
        max_new_tokens=5, stop_token_ids=model.stop_ids))])[0]
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, logprobs=2)
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([ids + out[:-1]])).logits[0].float()
    ref = torch.log_softmax(logits[len(ids) - 1:], -1)
    got = c.choices[0].logprobs.token_logprobs
    kept = [t for t in out if t not in model.stop_ids]
    assert len(got) == len(kept)
    for j, (t, v) in enumerate(zip(kept, got)):
        assert abs(v - float(ref[j, t])) <= 1e-4


def assert_one_prefill(server, create) -> None:
    """`create()` asks for n = 3 choices: the engine's counters (via /health) show the prompt prefilled once and
    the whole blocks of it (all but the last token's block) reused by the other two choices."""
    import time

    def sched():
        return httpx.get(server.url + "/health", timeout=10).json()["scheduler"]

    before = sched()["prefix_cache"]
    r = create()
    assert len(r.choices) == 3
    for _ in range(100):  # the counters are published after the step that finished the rows
        s = sched()
        if s["running"] == 0 and s["waiting"] == 0:
            break
        time.sleep(0.05)
    p, bs = r.usage.prompt_tokens, s["kv_cache"]["block_size"]
    shared = (p - 1) // bs * bs
    assert shared > 0
    assert s["prefix_cache"]["cached_tokens"] - before["cached_tokens"] == 2 * shared
    assert s["prefix_cache"]["prefill_tokens"] - before["prefill_tokens"] == p + 2 * (p - shared)


def test_n_choices_share_one_prefill(server, client):
    """n = 3 on the continuous server: the prompt is prefilled once, the other two choices reuse its whole
    blocks (all but the last token's block: usage counts the prompt once, the first choice's, so the engine's
    counters tell). Before the change the three rows were prefilled side by side and reused nothing."""
    msgs = [{"role": "user", "content": "Tell me three things about owls that live in snowy northern forests."}]
    assert_one_prefill(server, lambda: client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, n=3,
                                                                      temperature=1.0, seed=11))


def test_n_choices_seeded_plain_and_streamed(client):
    msgs = [{"role": "user", "content": "Hello"}]
    one = lambda **kw: client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, **kw)  # noqa: E731
    greedy = one().choices[0].message.content
    r = one(n=2)
    assert [c.index for c in r.choices] == [0, 1] and all(c.message.content == greedy for c in r.choices)
    # sampling: choice i is the single answer seeded seed + i
    r = one(n=3, temperature=1.0, seed=5)
    want = [one(temperature=1.0, seed=5 + i).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in r.choices] == want
    assert r.usage.completion_tokens == sum(one(temperature=1.0, seed=5 + i).usage.completion_tokens
                                            for i in range(3))
    got = {0: "", 1: "", 2: ""}
    fins = {}
    for ch in one(n=3, temperature=1.0, seed=5, stream=True):
        for c in ch.choices:
            got[c.index] += c.delta.content or ""
            if c.finish_reason:
                fins[c.index] = c.finish_reason
    assert [got[i] for i in range(3)] == want and set(fins) == {0, 1, 2}
    with pytest.raises(openai.UnprocessableEntityError):
        one(n=9)


# -- logprobs on /v1/responses; n and best_of on /v1/completions ---------------------------------------------

def test_response_logprobs_plain_and_streamed(client):
    """include: ["message.output_text.logprobs"] + top_logprobs: the output_text part's logprobs (and each
    delta's, streamed) are chat's for the same conversation (chat's equal a full forward: test_structured.py)."""
    ref = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                         logprobs=True, top_logprobs=3).choices[0].logprobs.content
    def flat(entries, tops=True):  # (tokens, values): every token and logprob, alternatives included
        toks, vals = [], []
        for x in entries:
            toks.append(x.token)
            vals.append(x.logprob)
            for t in (x.top_logprobs or []) if tops else []:
                toks.append(t.token)
                vals.append(t.logprob)
        return toks, vals

    def same(a, b) -> bool:
        return a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-5)

    want = flat(ref)
    kw = dict(model=MODEL, input="Hello", max_output_tokens=6)
    r = client.responses.create(include=["message.output_text.logprobs"], top_logprobs=3, **kw)
    part = r.output[0].content[0]
    assert same(flat(part.logprobs), want) and len(part.logprobs) == len(ref) > 0 and r.top_logprobs == 3
    assert all(len(x.top_logprobs) == 3 for x in part.logprobs)
    assert all(bytes(x.bytes).decode() == x.token for x in part.logprobs)
    events = list(client.responses.create(include=["message.output_text.logprobs"], top_logprobs=3, stream=True,
                                          **kw))
    assert same(flat([x for e in events if e.type == "response.output_text.delta" for x in e.logprobs]), want)
    done = next(e for e in events if e.type == "response.output_text.done")
    chosen = flat(ref, tops=False)
    assert same(flat(done.logprobs, tops=False), chosen)
    assert same(flat(events[-1].response.output[0].content[0].logprobs, tops=False), chosen)
    # include alone: no alternatives; top_logprobs alone also turns them on (never silently ignored); neither: none
    alone = client.responses.create(include=["message.output_text.logprobs"], **kw).output[0].content[0].logprobs
    assert same(flat(alone), chosen) and all(not x.top_logprobs for x in alone)
    top = client.responses.create(top_logprobs=2, **kw).output[0].content[0].logprobs
    assert [len(x.top_logprobs) for x in top] == [2] * len(ref)
    assert client.responses.create(**kw).output[0].content[0].logprobs == []
    with pytest.raises(openai.BadRequestError) as e:  # data this server does not have: named
        client.responses.create(include=["reasoning.encrypted_content"], **kw)
    assert e.value.body["param"] == "include[0]" and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.UnprocessableEntityError):
        client.responses.create(top_logprobs=21, **kw)


def test_completion_n_choices_seeded_plain_and_streamed(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=6)
    greedy = client.completions.create(**kw).choices[0].text
    r = client.completions.create(n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1] and all(c.text == greedy for c in r.choices)
    singles = [client.completions.create(temperature=1.0, seed=5 + i, **kw) for i in range(3)]
    want = [x.choices[0].text for x in singles]
    r = client.completions.create(n=3, temperature=1.0, seed=5, **kw)
    assert [c.text for c in r.choices] == want  # choice i is the single answer seeded seed + i
    assert r.usage.completion_tokens == sum(x.usage.completion_tokens for x in singles)
    got, fins = {0: "", 1: "", 2: ""}, {}
    for ch in client.completions.create(n=3, temperature=1.0, seed=5, stream=True, **kw):
        for c in ch.choices:
            got[c.index] += c.text
            if c.finish_reason:
                fins[c.index] = c.finish_reason
    assert [got[i] for i in range(3)] == want and set(fins) == {0, 1, 2}
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(n=9, **kw)


def test_completion_best_of_returns_the_n_best_candidates(client):
    kw = dict(model=MODEL, prompt="Say something", max_tokens=6, temperature=1.0)
    cands = [client.completions.create(seed=7 + i, logprobs=0, **kw) for i in range(4)]
    mean = [sum(c.choices[0].logprobs.token_logprobs) / max(1, len(c.choices[0].logprobs.token_logprobs))
            for c in cands]
    best = sorted(range(4), key=lambda i: -mean[i])[:2]
    r = client.completions.create(n=2, best_of=4, seed=7, **kw)
    assert [c.text for c in r.choices] == [cands[i].choices[0].text for i in best]
    assert r.usage.completion_tokens == sum(c.usage.completion_tokens for c in cands)  # all candidates count
    assert all(c.logprobs is None for c in r.choices)  # ranked by logprobs, which were not asked for
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(n=1, best_of=2, stream=True, **kw)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(n=3, best_of=2, **kw)


def test_completion_n_choices_share_one_prefill(server, client):
    """As chat's n: the prompt is prefilled once, the other choices reuse its whole blocks (prefix cache)."""
    prompt = "Owls that live in snowy northern forests hunt at dusk, and they " * 3
    assert_one_prefill(server, lambda: client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=3,
                                                                 temperature=1.0, seed=11))
