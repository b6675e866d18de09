"""Chat template controls over real HTTP: --chat-template (file or text), per-request chat_template_kwargs,
add_generation_prompt, continue_final_message, and a clear 400 for a chat to a model without a template.

Two small servers run a tiny random Llama whose directory has SmolLM2's tokenizer.json and no chat template:
one as is, one started with --chat-template FILE. Continuation is checked on the session's embedded SmolLM2."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from fleetserve.runtime.config import EngineConfig
from fleetserve.runtime.loader import ModelLoadError, load_model
from fleetserve.runtime.server.config import ServerConfig

from ..runtime.test_loader import tiny_hf_model
from .conftest import ServerThread

TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}[end]{% endfor %}"
    "{% if enable_thinking %}[think]{% endif %}{% if add_generation_prompt %}[assistant]{% endif %}"
)
USER = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-no-template")
    tiny_hf_model(vocab=tokenizer.vocab_size).save_pretrained(d)
    tokenizer.backend.save(str(d / "tokenizer.json"))
    return d


def _serve(model_dir, **kw):
    cfg = EngineConfig(model=str(model_dir), device="cpu", max_model_len=128, num_kv_blocks=32, **kw)
    return ServerThread(cfg, {"main": ServerConfig()}).start()


@pytest.fixture(scope="module")
def plain(tiny_dir):
    srv = _serve(tiny_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def templated(tiny_dir, tmp_path_factory):
    f = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    f.write_text(TEMPLATE)
    srv = _serve(tiny_dir, chat_template=str(f))
    yield srv
    srv.stop()


def _tokenize(url, headers=None, **body) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/tokenize",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_without_template_is_a_clear_400(plain):
    client = openai.OpenAI(base_url=plain.urls["main"] + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=plain.serving().served_model_name, messages=USER, max_tokens=2)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "messages" and err["code"] == "no_chat_template"
    assert "--chat-template" in err["message"]
    status, body = _tokenize(plain.urls["main"], messages=USER)
    assert status == 400 and body["error"]["code"] == "no_chat_template"
    # Plain completions still work on that model.
    out = client.completions.create(model=plain.serving().served_model_name, prompt="hi", max_tokens=2)
    assert out.usage.completion_tokens >= 1


def test_chat_template_flag_kwargs_and_generation_prompt(templated, tokenizer):
    url = templated.urls["main"]

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    assert _tokenize(url, messages=USER)[1]["tokens"] == ids("[user]hi there[end][assistant]")
    assert _tokenize(url, messages=USER, add_generation_prompt=False)[1]["tokens"] == ids(
        "[user]hi there[end]"
    )
    assert _tokenize(url, messages=USER, chat_template_kwargs={"enable_thinking": True})[1]["tokens"] == ids(
        "[user]hi there[end][think][assistant]"
    )
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    name = templated.serving().served_model_name
    out = client.chat.completions.create(
        model=name,
        messages=USER,
        max_tokens=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    assert out.usage.prompt_tokens == len(ids("[user]hi there[end][think][assistant]"))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=name, messages=USER, max_tokens=2, extra_body={"chat_template_kwargs": {"messages": []}}
        )
    assert e.value.status_code == 400 and e.value.body["param"] == "chat_template_kwargs"
    assert "chat_template_kwargs may not set messages" in e.value.body["message"]


def test_chat_template_as_text_and_bad_values(tiny_dir, tmp_path):
    loaded = load_model(EngineConfig(model=str(tiny_dir), device="cpu", chat_template=TEMPLATE))
    assert loaded.tokenizer.apply_chat_template(USER) == "[user]hi there[end][assistant]"
    with pytest.raises(ModelLoadError, match="chat template file '/no/such.jinja' not found"):
        load_model(EngineConfig(model=str(tiny_dir), device="cpu", chat_template="/no/such.jinja"))
    with pytest.raises(ModelLoadError, match="does not compile"):
        load_model(EngineConfig(model=str(tiny_dir), device="cpu", chat_template="{% for m in messages %}"))


def test_continue_final_message(base_url, auth, client, model_name, tokenizer):
    conv = USER + [{"role": "assistant", "content": "The capital of France is"}]
    full = tokenizer.apply_chat_template(conv, add_generation_prompt=False)
    expected = full[: full.rindex("The capital of France is") + len("The capital of France is")]
    assert not expected.endswith("<|im_end|>\n") and "<|im_end|>" in full[len(expected) :]
    status, body = _tokenize(base_url, auth, messages=conv, continue_final_message=True)
    assert status == 200 and body["tokens"] == tokenizer.encode(expected, add_special_tokens=False)
    out = client.chat.completions.create(
        model=model_name,
        messages=conv,
        max_tokens=3,
        temperature=0,
        extra_body={"continue_final_message": True},
    )
    assert out.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=model_name,
            messages=conv,
            max_tokens=3,
            extra_body={"continue_final_message": True, "add_generation_prompt": True},
        )
    assert (
        e.value.body["param"] == "continue_final_message" and "cannot both be true" in e.value.body["message"]
    )
