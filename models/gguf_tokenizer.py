"""A GGUF file's embedded byte-level BPE vocabulary -> `HFTokenizer`.

llama.cpp's converter stores the vocabulary as parallel arrays (`tokenizer.ggml.tokens`,
`tokenizer.ggml.token_type`), the merges as "left right" strings, and names the
pre-tokenizer (`tokenizer.ggml.pre`): the regex splits applied before BPE. We rebuild the same
pipeline with the `tokenizers` library, mirroring llama.cpp's per-type regexes (llama-vocab.cpp):

    gpt-2, gpt2, mpt, ...    GPT-2's regex ("gpt-2" is what llama.cpp's converter writes for GPT-2)
    smollm, starcoder, ...   every digit alone (\\p{N}), then GPT-2's regex
    qwen2, stablelm2         Qwen2's regex (one digit per piece); NFC like Qwen's tokenizer.json
    llama-bpe, dbrx, ...     Llama 3's regex (up to three digits per piece); whole-word vocabulary
                             hits skip the merges (`ignore_merges`), as in Llama 3's tokenizer.json

tiktoken is not an option here: it needs every single byte in the vocabulary, and SmolLM2's
lacks some (the control bytes 0x04 0x06 0x13 0x14 0x16 0x1D, and 0xF1 0xF2 which only start
code points in the unassigned planes 4-11, plus 0xC0 0xC1 0xF5-0xFF which UTF-8 never uses).
Text containing those bytes loses them on encoding, as it does in llama.cpp; no vocabulary
entry could represent them.
"""

from __future__ import annotations

import logging

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from models.tokenizer import HFTokenizer, Tokenizer
from models.vocab_files import QWEN_PATTERN

logger = logging.getLogger(__name__)

LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
GPT2_STYLE = {"gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"}
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell"}
QWEN2_STYLE = {"qwen2", "stablelm2"}
LLAMA3_STYLE = {"llama-bpe", "llama3", "dbrx", "smaug-bpe"}
SUPPORTED_PRE = GPT2_STYLE | DIGITS_THEN_GPT2 | QWEN2_STYLE | LLAMA3_STYLE

# llama.cpp's token types; both kinds below are matched as whole tokens inside text.
CONTROL, USER_DEFINED = 3, 4
# Control tokens that end a turn whatever the EOS id says (llama.cpp's end-of-generation set).
END_OF_GENERATION_TEXTS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>",
                           "<|end|>", "<end_of_turn>"}


def tokenizer_from_gguf(reader) -> Tokenizer:
    """Build the tokenizer of an open `gguf.GGUFReader`."""
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise ValueError("this GGUF file carries no tokenizer (no tokenizer.ggml.model); use a GGUF "
                         "converted with its vocabulary, or the Hugging Face checkpoint directory")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model {model!r} is not supported (only 'gpt2', "
                         "byte-level BPE); serve the Hugging Face checkpoint directory instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise ValueError("this GGUF file's BPE tokenizer lacks tokenizer.ggml.tokens or "
                         "tokenizer.ggml.merges; re-convert it with llama.cpp's convert_hf_to_gguf.py")
    token_types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)  # 1: normal
    backend = _bpe_backend(tokens, merges, _pre_type(reader))
    backend.add_special_tokens(_added_tokens(tokens, token_types, CONTROL))
    backend.add_tokens(_added_tokens(tokens, token_types, USER_DEFINED))
    return HFTokenizer(backend,
                       bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
                       eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
                       stop_token_ids=_end_of_generation_ids(reader, tokens, token_types),
                       add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token")),
                       chat_template=_field(reader, "tokenizer.chat_template"))


def _bpe_backend(tokens: list[str], merges: list[str], pre: str) -> Backend:
    """BPE model + the pre-tokenizer llama.cpp uses for `pre` + byte-level decoding."""
    if pre not in SUPPORTED_PRE:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(SUPPORTED_PRE)}); "
                         "serve the Hugging Face checkpoint directory with its tokenizer.json instead")
    # A merge is "left right"; llama.cpp splits at the first space after the first character.
    merge_pairs = [(m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]) for m in merges]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merge_pairs, ignore_merges=pre in LLAMA3_STYLE))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    if pre in QWEN2_STYLE:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _pre_type(reader) -> str:
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre is None:
        logger.warning("GGUF file names no tokenizer.ggml.pre; splitting text like GPT-2")
    return pre or "gpt2"


def _added_tokens(tokens: list[str], token_types: list[int], token_type: int) -> list[AddedToken]:
    """Tokens of one type, matched whole inside text (only CONTROL ones count as special)."""
    return [AddedToken(token, special=token_type == CONTROL, normalized=False)
            for token, kind in zip(tokens, token_types) if kind == token_type]


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    gpt2_regex_then_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in GPT2_STYLE:
        return gpt2_regex_then_bytes
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        gpt2_regex_then_bytes])
    pattern = QWEN_PATTERN if pre in QWEN2_STYLE else LLAMA3_PATTERN
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _end_of_generation_ids(reader, tokens: list[str], token_types: list[int]) -> tuple[int, ...]:
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    by_text = [i for i, token in enumerate(tokens)
               if token_types[i] == CONTROL and token in END_OF_GENERATION_TEXTS]
    return tuple(i for i in (eot, *by_text) if i is not None)


def _field(reader, key: str):
    """A metadata value (str, int, bool or list), or None when the key is absent."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()
