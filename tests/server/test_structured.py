"""Structured output (`response_format`): every answer parses as JSON and validates against the
schema, greedy and sampled, streamed or not, on completions and chat; bad formats are a 400."""

import json

import pytest

pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")

import slimlm  # noqa: E402
from slimlm.server.app import ServedModel, ServeSettings, create_app  # noqa: E402
from slimlm.server.metrics import Metrics  # noqa: E402
from slimlm.server.scheduler import Scheduler  # noqa: E402
from slimlm.server.server import BackgroundServer  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                         "kind": {"enum": ["cat", "dog"]}}}


def valid(value) -> bool:
    """SCHEMA's rules, checked by hand."""
    return (isinstance(value, dict) and set(value) == {"name", "age", "tags", "kind"}
            and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["age"], int) and not isinstance(value["age"], bool) and 0 <= value["age"] <= 120
            and isinstance(value["tags"], list) and len(value["tags"]) <= 3
            and all(isinstance(t, str) and len(t) <= 8 for t in value["tags"]) and value["kind"] in ("cat", "dog"))


@pytest.fixture(scope="module", params=["in process", "engine process"])
def client(request):
    """The demo model served with its scheduler in this process, and in an engine process of its own
    (`slimlm serve`'s default), which builds each request's grammar state again from the grammar."""
    metrics = Metrics()
    if request.param == "engine process":
        from slimlm.server.replicas import ReplicaSet

        model, tok = None, slimlm.load("demo")[1]
        sched = ReplicaSet("demo", 1, slots=4, max_len=512, metrics=metrics, name="m", threads=1)
    else:
        model, tok = slimlm.load("demo")
        sched = Scheduler(model, slots=4, max_len=512, metrics=metrics, name="m")
    app = create_app({"m": ServedModel("m", model, tok, sched)}, ServeSettings(), metrics)
    with BackgroundServer(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    sched.close()


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}


@pytest.mark.parametrize("temperature, seed", [(0, None), (1.0, 1), (1.0, 2), (1.3, 3)])
def test_completions_follow_the_schema(client, temperature, seed):
    r = client.completions.create(model="m", prompt="The for statement", max_tokens=120, temperature=temperature,
                                  seed=seed, n=2, extra_body={"response_format": SCHEMA_FORMAT})
    for choice in r.choices:
        assert choice.finish_reason == "stop" and valid(json.loads(choice.text)), choice.text


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_object_on_chat_streamed_and_not(client, temperature):
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Describe a class."}], max_tokens=150,
                  temperature=temperature, seed=5, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kwargs)
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == whole.choices[0].message.content


@pytest.mark.parametrize("fmt, text", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "cannot be used"),
    ({"type": "json_schema", "json_schema": "not a dict"}, "json_schema needs"),
    ({"type": "yaml"}, "not supported"),
])
def test_bad_formats_are_a_400(client, fmt, text):
    with pytest.raises(openai.BadRequestError, match=text):
        client.completions.create(model="m", prompt="x", max_tokens=5, extra_body={"response_format": fmt})


def test_plain_text_format_changes_nothing(client):
    a = client.completions.create(model="m", prompt="The for statement", max_tokens=12, temperature=0)
    b = client.completions.create(model="m", prompt="The for statement", max_tokens=12, temperature=0,
                                  extra_body={"response_format": {"type": "text"}})
    assert a.choices[0].text == b.choices[0].text
