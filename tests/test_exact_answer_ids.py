"""Exact answer ids across turns (processing/plan.py's note; serve/responses.py): an assistant message the server
made is planned from the token ids it generated, not from its text.

Planning: with ids equal to the text's own tokenization the plan is the plain plan (Owl3, both variants; Owl2
ignores them: its template is not cut); with other ids the prompt is each turn's prompt + its answer ids + the end
of turn, independently of how the text would tokenize. Serving: on a random tiny Owl3 model (its answers do not
tokenize back to their ids; checked), a follow-up through `previous_response_id` reuses the whole history from the
prefix cache, answers what the engine answers in process on exactly those ids, and chains over three turns."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import make_tokenizer, png_data_url
from hyperowl.processing.owl2 import Owl2Processor
from hyperowl.processing.processor import Owl3Processor


def _conversation():
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<|image|>What colour is the circle?"},
            {"role": "assistant", "content": "The circle is red."},
            {"role": "user", "content": "Compare the two pictures.<|image|>"},
            {"role": "assistant", "content": "A blue square is left of a green triangle."},
            {"role": "user", "content": "Describe this video."}]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _images():
    return [Image.new("RGB", (60, 40), (200, 30, 30)), Image.new("RGB", (30, 50), (10, 200, 10))]


@pytest.mark.parametrize("variant", ["240728", "241101"])
def test_owl3_ids_equal_to_the_texts_tokenization_give_the_plain_plan(tok, variant):
    proc = Owl3Processor(tok, variant=variant, image_size=28)
    msgs = _conversation()
    plain = proc.plan(msgs, images=_images())
    own = {i: tok.encode(m["content"], add_special_tokens=False).ids for i, m in enumerate(msgs)
           if m["role"] == "assistant"}
    exact = proc.plan(msgs, images=_images(), answer_ids=own)
    assert exact.input_ids.tolist() == plain.input_ids.tolist()
    assert exact.image_positions.tolist() == plain.image_positions.tolist() and exact.prompt == plain.prompt


def test_owl3_prompt_is_each_turns_prompt_plus_its_answer_ids(tok):
    """Other ids than the text's: turn k's prompt ids, then its answer's ids, then <|im_end|><|endoftext|> and the
    rest, so the history is a prefix, token for token, of what the earlier turns computed."""
    proc = Owl3Processor(tok, image_size=28)
    msgs = _conversation()
    answers = {2: [5, 300, 7, 7], 4: [tok.token_to_id("<|image|>"), 42]}  # not what the text tokenizes to
    exact = proc.plan(msgs, images=_images(), answer_ids=answers)
    ids = exact.input_ids.tolist()
    end = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    turn1 = proc.plan(msgs[:2], images=_images()[:1]).input_ids.tolist()
    assert ids[: len(turn1) + 6] == turn1 + answers[2] + end
    turn2 = proc.plan(msgs[:4], images=_images(), answer_ids={2: answers[2]})
    t2 = turn2.input_ids.tolist()
    assert ids[: len(t2) + 4] == t2 + answers[4] + end
    # an image token id inside an answer is text: the image positions are the placeholders' only
    assert exact.image_positions.tolist() == turn2.image_positions.tolist()
    assert len(exact.items) == 2 and exact.prompt == proc.plan(msgs, images=_images()).prompt


def test_owl2_tokenizes_the_text_as_before(tok):
    proc = Owl2Processor(tok, image_size=28)
    msgs = [m for m in _conversation() if m["role"] != "system"]
    plain = proc.plan(msgs, images=_images())
    exact = proc.plan(msgs, images=_images(), answer_ids={1: [5, 6, 7]})
    assert exact.input_ids.tolist() == plain.input_ids.tolist()


# -- through the server -------------------------------------------------------------------------------------------

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

MODEL = "tiny-owl"


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    import hyperowl

    return hyperowl.load(chat_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(model):
    from hyperowl.serve import ServeConfig, ServerThread, create_app

    cfg = ServeConfig(model_name=MODEL, max_stored_responses=3)
    with ServerThread(create_app(model, model.processor, cfg)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _solo(model, ids: list[int], image: Image.Image | None, positions: list[int], max_new: int) -> list[int]:
    """The offline engine's greedy answer to exactly these ids (one request alone, no cache)."""
    from hyperowl.engine import Engine, Request, SamplingParams

    kw = {}
    if image is not None:
        plan = model.processor.plan([{"role": "user", "content": "<|image|>"}], images=[image])
        with torch.no_grad():
            kw = dict(image_embeds=model.model.encode_images(model.processor.pixels(plan)),
                      image_positions=torch.tensor(positions))
    return Engine(model.model).generate([Request(torch.tensor(ids), params=SamplingParams(
        max_new_tokens=max_new, stop_token_ids=model.stop_ids), **kw)])[0]


def _turn(tok, text: str) -> list[int]:
    """A new user turn after a finished assistant turn, ending in the generation prompt (ChatML, by hand)."""
    return tok.encode(f"\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids


def _text(model, out: list[int]) -> str:
    """Detokenized as the server streams it (TextStream)."""
    from hyperowl.chat import TextStream

    stream = TextStream(model.processor.tokenizer, model.stop_ids)
    return "".join(stream.push(t) for t in out)


def _content(model, out: list[int]) -> list[int]:
    return out[:-1] if out and out[-1] in model.stop_ids else out


def test_followup_reuses_the_whole_history_and_answers_as_the_engine_does(model, client):
    tok, block = model.processor.tokenizer, 16
    url = png_data_url((10, 200, 10))
    image = Image.new("RGB", (60, 40), (10, 200, 10))
    first = client.responses.create(model=MODEL, max_output_tokens=24, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": url},
                                     {"type": "input_text", "text": "What is it?"}]}])
    p1 = model.processor.plan([{"role": "user", "content": "<|image|>What is it?"}], images=[image])
    ids1, pos = p1.input_ids.tolist(), p1.image_positions.tolist()
    a1 = _content(model, _solo(model, ids1, image, pos, 24))
    assert first.usage.input_tokens == len(ids1) and first.usage.output_tokens >= len(a1)
    # the premise: this answer's text does not tokenize back to its ids (re-tokenizing would end the reuse here)
    assert tok.encode(first.output_text, add_special_tokens=False).ids != a1

    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="And its colour?",
                                     max_output_tokens=24)
    end = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    ids2 = ids1 + a1 + end + _turn(tok, "And its colour?")
    history = (len(ids1) + len(a1)) // block * block  # the answer's blocks that were full (K/V written)
    assert second.usage.input_tokens_details.cached_tokens >= history > len(ids1)
    assert second.usage.input_tokens == len(ids2)
    a2 = _solo(model, ids2, image, pos, 24)
    assert second.output_text == _text(model, a2)

    # turn 3 reuses turns 1 and 2: their ids, not their texts
    third = client.responses.create(model=MODEL, previous_response_id=second.id, input="Thanks",
                                    max_output_tokens=8)
    ids3 = ids2 + _content(model, a2) + end + _turn(tok, "Thanks")
    assert third.usage.input_tokens == len(ids3)
    assert third.usage.input_tokens_details.cached_tokens >= (len(ids2) + len(_content(model, a2))) // block * block
    assert third.output_text == _text(model, _solo(model, ids3, image, pos, 8))


def test_an_answer_cut_by_a_stop_string_is_planned_from_its_text(model, client):
    """Its ids go past the text the client got: the follow-up is the conversation's text, as chat tokenizes it."""
    tok = model.processor.tokenizer
    full = client.responses.create(model=MODEL, input="Hi", max_output_tokens=12).output_text
    stop = full[-2:]
    cut = full[: full.find(stop)]
    # the premise: the ids the engine had made when the stop string showed are not the cut text's tokens
    a1 = _solo(model, model.processor.plan([{"role": "user", "content": "Hi"}]).input_ids.tolist(), None, [], 12)
    made = next(a1[:k] for k in range(1, len(a1) + 1) if stop in _text(model, a1[:k]))
    assert made != tok.encode(cut, add_special_tokens=False).ids
    first = client.responses.create(model=MODEL, input="Hi", max_output_tokens=12, extra_body={"stop": [stop]})
    assert first.output_text == cut
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="More", max_output_tokens=4)
    ref = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": cut}, {"role": "user", "content": "More"}])
    assert second.usage.input_tokens == ref.usage.prompt_tokens and second.output_text == ref.choices[0].message.content


def test_unstored_and_evicted_responses_are_still_404(client):
    unstored = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, previous_response_id=unstored.id, input="Hi", max_output_tokens=2)
    oldest = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    for _ in range(3):  # the server keeps 3: the oldest goes
        client.responses.create(model=MODEL, previous_response_id=oldest.id if _ == 0 else None, input="Hi",
                                max_output_tokens=2)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, previous_response_id=oldest.id, input="Hi", max_output_tokens=2)
    assert e.value.body["param"] == "previous_response_id"
