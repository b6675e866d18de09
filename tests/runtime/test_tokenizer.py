"""Our Tokenizer vs transformers' tokenizer on the same files: the embedded SmolLM2 GGUF (byte-level
BPE from metadata), a tokenizer.json directory saved from it, and a SentencePiece-style ("llama")
GGUF vocabulary; encode/decode on unicode/emoji/whitespace strings and chat template rendering."""

from __future__ import annotations

import json
import os

import gguf
import pytest

from fleetserve.runtime.tokenizer import Tokenizer, TokenizerLoadError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The capital of France is",
    "",
    " ",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\n\n\n",
    "\r\n windows\r\n",
    "émojis 🤗🚀👩‍👩‍👧 and 中文 and 日本語のテキスト",
    "Zürich naïve café ﬁ",
    "numbers 2024, 3.14159 and 1e-9",
    "don't won't I'm we've they'll",
    "x = [1, 2, 3]\nprint(x)  # comment",
    "<|im_start|>user\nhi<|im_end|>",
    "text<|endoftext|>more",
    "a" * 200,
    "😀" * 5,
    "\u200b zero width",
    "<html><body>ok</body></html>",
]

CHATS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3? 🤔"},
    ],
]


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    folder, name = os.path.split(smollm2_path)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def saved_dir(hf_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm2_tok")
    hf_tok.save_pretrained(str(d))
    return d


def _assert_same(ours: Tokenizer, ref):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id


def test_gguf_tokenizer_matches_transformers(smollm2_tokenizer, hf_tok):
    _assert_same(smollm2_tokenizer, hf_tok)
    assert smollm2_tokenizer.eos_token_ids == {2} and smollm2_tokenizer.bos_token_id == 1
    assert set(hf_tok.all_special_ids) <= set(smollm2_tokenizer.all_special_ids)
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) split digits one by one
    assert len(smollm2_tokenizer.encode("12345")) == 5


@pytest.mark.parametrize("chat", CHATS, ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("gen", [True, False])
def test_gguf_chat_template_matches_transformers(smollm2_tokenizer, hf_tok, chat, gen):
    ours = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=gen)
    assert ours == hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    ids = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
    assert ids == smollm2_tokenizer.encode(ours, add_special_tokens=False) and ids.count(1) == ours.count(
        "<|im_start|>"
    )


def test_tokenizer_json_dir_matches_transformers(saved_dir):
    ours = Tokenizer.from_pretrained(str(saved_dir))
    ref = transformers.AutoTokenizer.from_pretrained(str(saved_dir))
    _assert_same(ours, ref)
    assert ours.apply_chat_template(CHATS[1]) == ref.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True
    )
    assert Tokenizer.from_pretrained(str(saved_dir / "tokenizer.json")).encode("hi there") == ref.encode(
        "hi there"
    )


def test_bos_eos_and_cleanup_settings(saved_dir, tmp_path):
    for f in os.listdir(saved_dir):
        (tmp_path / f).write_bytes((saved_dir / f).read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, clean_up_tokenization_spaces=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))

    def check(expect_bos, expect_eos):
        ours = Tokenizer.from_pretrained(str(tmp_path), extra_eos_token_ids=[7])
        ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        ids = ours.encode("Hello , world !")
        assert ids == ref.encode("Hello , world !")
        assert (ids[0] == 1) == expect_bos and (ids[-1] == 2) == expect_eos
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.encode("x", add_special_tokens=False) == ref.encode("x", add_special_tokens=False)
        assert ours.eos_token_ids == {2, 7}

    # next to a tokenizer.json, its post-processor rules (the config's add_bos_token is ignored, as in transformers)
    check(False, False)
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]},
            "<|im_end|>": {"id": "<|im_end|>", "ids": [2], "tokens": ["<|im_end|>"]},
        },
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    check(True, True)


TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set sys = 'default' %}{% endif %}"
    "{{ bos_token }}[{{ sys }}] today={{ strftime_now('%Y') }}\n"
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}"
    "{% endif %}{% if m['content'] == 'skip' %}{% continue %}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}{% if flag is defined %} flag={{ flag }}{% endif %}"
)


def test_chat_template_features_match_transformers(smollm2_tokenizer, hf_tok):
    import jinja2

    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": ' a <b> & "c" é '},
        {"role": "assistant", "content": "skip"},
        {"role": "user", "content": "d"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "<é>"}}}]
    kw = dict(chat_template=TEMPLATE, add_generation_prompt=True, tools=tools, flag=3)
    assert smollm2_tokenizer.apply_chat_template(msgs, **kw) == hf_tok.apply_chat_template(
        msgs, tokenize=False, **kw
    )
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        smollm2_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=TEMPLATE)
    # the sandbox refuses attribute escapes
    with pytest.raises(jinja2.exceptions.SecurityError):
        smollm2_tokenizer.apply_chat_template(msgs, chat_template="{{ messages.__class__.__mro__ }}")


def test_no_chat_template_is_a_clear_error(saved_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((saved_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="cannot read tokenizer file"):
        Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(TokenizerLoadError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_ids_past_the_vocabulary_decode_to_nothing(smollm2_tokenizer):
    # presets (vocab 128256) borrow SmolLM2's tokenizer for detokenizing random-weight outputs
    assert smollm2_tokenizer.decode([19556, 100000, 905]) == "Hello world"


def _write_spm_gguf(path, add_space_prefix=True):
    """A toy SentencePiece vocabulary as llama.cpp writes it (model "llama": scores, byte tokens, no merges)."""
    pieces = [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "▁h",
        "el",
        "ll",
        "lo",
        "▁w",
        "or",
        "ld",
        "▁he",
        "llo",
        "▁hel",
        "▁hello",
        "▁wor",
        "▁world",
        "a",
        "n",
        "▁a",
        "an",
        "nd",
        "▁and",
        "▁an",
    ]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_vocab_matches_transformers(tmp_path):
    from fleetserve.runtime.loader.gguf_loader import GGUFFile

    _write_spm_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf_metadata(GGUFFile(str(tmp_path / "spm.gguf")).meta)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ["hello world", " hello  world and", "hello\nwörld ✓", "", "and and", "héllo 🤗"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == 1  # llama.cpp adds BOS to SentencePiece vocabularies by default
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_path):
    from fleetserve.runtime.loader.gguf_loader import GGUFFile

    return GGUFFile(smollm2_path).meta


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_gguf_pre_tokenizer_splits_match_transformers(smollm2_meta, tmp_path, pre):
    """The split regex chosen from `tokenizer.ggml.pre` (Llama 3, Qwen2, GPT-2 default) on SmolLM2's vocabulary."""
    meta = {k: v for k, v in smollm2_meta.items() if k.startswith("tokenizer.ggml.")}
    meta["tokenizer.ggml.pre"] = pre
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer.from_gguf_metadata(meta)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    _assert_same(ours, ref)
    assert ours.encode("12345 67") == ref.encode("12345 67")
