"""`--quantization gguf`: a GGUF file's Q4_0 / Q4_1 / Q8_0 tensors are served as stored. Their
values and scales, read without dequantizing, equal the `gguf` package's own dequantization bit
for bit, through every rename, llama q/k unpermutation and q/k/v or gate/up fusion the loader
does; a head tied to a Q8_0 embedding table is kept too, and the embedding reads its rows."""
from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch

from models.builtin import builtin_model_path
from models.gguf_quantized import read_q4, read_q8_0
from models.loader import load_model
from models.quantization import quantize_model
from models.quantized_linear import Int4Linear, Int8GroupLinear, QuantizedLinear
from server.config import EngineConfig
from server.engine.engine import Engine
from tests.gguf_writer import write_gguf, write_gpt2_gguf
from tests.test_engine import greedy
from tests.test_quantization import needs_kernel

T = gguf.GGMLQuantizationType
DEFAULT_GGUF = builtin_model_path("smollm2-135m-instruct")
# q/k/v Q4_0 (fused, and q/k unpermuted), gate/up Q4_1 (fused), down Q4_0, o_proj and the
# embedding table (tied to the head) Q8_0
MIXED = {".q_proj.": T.Q4_0, ".k_proj.": T.Q4_0, ".v_proj.": T.Q4_0, ".gate_proj.": T.Q4_1,
         ".up_proj.": T.Q4_1, ".down_proj.": T.Q4_0, ".o_proj.": T.Q8_0, "embed_tokens.": T.Q8_0}


def _prompts(num: int) -> list[list[int]]:  # ids within SmolLM2's 49152
    return [[(i * 3571 + j * 911) % 49152 for j in range(5 + 3 * i)] for i in range(num)]


def _gguf_dequantized(tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def _dequantized(v: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    n, k = v.shape
    return (v.float().view(n, -1, 32) * scale.float()[..., None] + minimum.float()[..., None]).view(n, k)


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """A tiny llama GGUF with Q4_0, Q4_1 and Q8_0 linears (SmolLM2's tokenizer)."""
    import transformers

    from tests.conftest import TINY

    torch.manual_seed(5)
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, vocab_size=49152, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    write_gguf(path, hf_model.eval(), "llama", str(DEFAULT_GGUF), types=MIXED)
    return path


# GPT-2 fuses nothing: c_attn Q4_0, the MLP's c_fc Q4_1 and c_proj Q4_0, attention's c_proj and
# the token embedding (tied to the head) Q8_0; the position embedding stays float
GPT2_TYPES = {".attn.c_attn.": T.Q4_0, ".mlp.c_fc.": T.Q4_1, ".mlp.c_proj.": T.Q4_0, ".attn.c_proj.": T.Q8_0,
              ".wte.": T.Q8_0}


@pytest.fixture(scope="module")
def gpt2_gguf(tmp_path_factory):
    """A tiny GPT-2 GGUF (hidden 64: two 32-groups a row) with GPT-2's vocabulary."""
    from tests.test_tokenizer import gpt2_vocab_as_gguf

    torch.manual_seed(7)
    model = load_model("random:tiny-gpt2", dtype="float32", device="cpu").model
    vocab = {key: field.contents() for key, field in gpt2_vocab_as_gguf().fields.items()}
    path = tmp_path_factory.mktemp("gguf") / "gpt2.gguf"
    write_gpt2_gguf(path, model, vocab, GPT2_TYPES)
    return path


def _kept(model) -> dict[str, QuantizedLinear]:
    return {name: m.kernel for name, m in model.named_modules() if isinstance(getattr(m, "kernel", None), QuantizedLinear)}


def _assert_every_linear_kept(path, count: int, is_q8_0) -> tuple[torch.nn.Module, dict[str, torch.nn.Linear]]:
    """Load `path` in float32, apply --quantization gguf: `count` layers, every linear kept, each
    of its kind (is_q8_0(name): Int8GroupLinear, else Int4Linear) and dequantizing to exactly the
    dequantizing loader's weight. Returns the model and copies of its float linears."""
    model = load_model(str(path), dtype="float32", device="cpu").model
    dense = {name: copy.deepcopy(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantize_model(model, str(path), "gguf") == count
    kept = _kept(model)
    assert sorted(kept) == sorted(dense)
    for name, layer in kept.items():
        assert isinstance(layer, Int8GroupLinear if is_q8_0(name) else Int4Linear), name
        assert torch.equal(layer.dequantize(), dense[name].weight), name
    return model, dense


def test_gpt2_gguf_keeps_its_quantized_layers_as_the_file_stores_them(gpt2_gguf):
    """Every Q4_0/Q4_1/Q8_0 linear of a GPT-2 file is kept (biases beside it), equal to the
    dequantizing loader's weight; so is the head tied to the Q8_0 token embedding, whose rows the
    embedding now reads out of the head."""
    model, dense = _assert_every_linear_kept(gpt2_gguf, 2 * 4 + 1,  # c_attn, c_proj, c_fc, c_proj; the head
                                             lambda name: "attn.c_proj" in name or name == "lm_head")
    for name, layer in _kept(model).items():
        if dense[name].bias is not None:
            assert torch.equal(layer.bias, dense[name].bias.float()), name
    ids = torch.tensor([0, 5, 50256, 1234])
    assert model.transformer.wte.weight is None  # one copy of the table: the head's
    assert torch.equal(model.transformer.wte(ids), dense["lm_head"].weight[ids])


def test_a_tied_head_computes_with_the_table_not_a_duplicate_output_tensor(tmp_path):
    """llama.cpp writes GPT-2's head twice (token_embd, output); the loader ties the head to the
    table, so a kept head must hold the table's values even where `output.weight` is another
    type: here a float table and a Q8_0 duplicate, so the head stays float."""
    from tests.test_tokenizer import gpt2_vocab_as_gguf

    torch.manual_seed(7)
    model = load_model("random:tiny-gpt2", dtype="float32", device="cpu").model
    vocab = {key: field.contents() for key, field in gpt2_vocab_as_gguf().fields.items()}
    types = {k: v for k, v in GPT2_TYPES.items() if k != ".wte."}
    write_gpt2_gguf(tmp_path / "gpt2.gguf", model, vocab, types, output=T.Q8_0)
    loaded = load_model(str(tmp_path / "gpt2.gguf"), dtype="float32", device="cpu").model
    table = loaded.transformer.wte.weight.detach().clone()
    assert quantize_model(loaded, str(tmp_path / "gpt2.gguf"), "gguf") == 2 * 4
    assert loaded.lm_head.kernel is None and torch.equal(loaded.lm_head.weight, table)


def test_default_models_q4_1_tensors_equal_gguf_dequantization():
    reader = gguf.GGUFReader(DEFAULT_GGUF)
    names = ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight"]
    for tensor in (t for t in reader.tensors if t.name in names):
        assert tensor.tensor_type == T.Q4_1
        v, scale, minimum = read_q4(tensor)
        assert v.dtype == torch.uint8 and v.max() <= 15 and scale.dtype == torch.float16
        assert torch.equal(_dequantized(v, scale, minimum), _gguf_dequantized(tensor)), tensor.name


def test_default_models_q8_0_embedding_equals_gguf_dequantization():
    tensor = next(t for t in gguf.GGUFReader(DEFAULT_GGUF).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type == T.Q8_0
    q, scale = read_q8_0(tensor)
    assert q.dtype == torch.int8 and q.shape == (49152, 576) and scale.shape == (49152, 576 // 32)
    assert torch.equal((q.float().view(49152, -1, 32) * scale.float()[..., None]).view(49152, 576),
                       _gguf_dequantized(tensor))


def test_q4_0_tensors_equal_gguf_dequantization(mixed_gguf):
    tensors = [t for t in gguf.GGUFReader(mixed_gguf).tensors if t.tensor_type == T.Q4_0]
    assert len(tensors) == 2 * 4  # q, k, v, down in each of 2 layers
    for tensor in tensors:
        assert torch.equal(_dequantized(*read_q4(tensor)), _gguf_dequantized(tensor)), tensor.name


def test_kept_layers_hold_the_files_weights_after_renames_unpermutes_and_fusions(mixed_gguf):
    """Loaded in float32, each linear holds gguf's dequantization of its tensors (fused and
    unpermuted by the loader); after --quantization gguf each kept layer (Int4Linear for Q4_0 /
    Q4_1, Int8GroupLinear for the Q8_0 o_proj and the head tied to the Q8_0 table) dequantizes
    to exactly that."""
    _assert_every_linear_kept(mixed_gguf, 2 * 4 + 1,  # qkv, o, gate_up, down; the head
                              lambda name: "o_proj" in name or name == "lm_head")


@pytest.mark.parametrize("file", ["mixed_gguf", "gpt2_gguf"])
def test_greedy_output_equals_the_dequantized_model(file, request):
    """float32: the kept layers compute with the very weights the dequantizing loader makes."""
    path = request.getfixturevalue(file)
    outputs = []
    for method in (None, "gguf"):
        loaded = load_model(str(path), dtype="float32", device="cpu")
        engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=4, quantization=method))
        outputs.append([c[0].token_ids for c in engine.generate(_prompts(4), greedy())])
    assert outputs[0] == outputs[1]


@needs_kernel
def test_kernel_serves_the_default_model_like_the_reference_path():
    """The real SmolLM2 GGUF (every linear Q4_1, the tied embedding and head Q8_0), bf16, two
    layers: the kernels and the PyTorch reference give the same greedy tokens."""
    outputs = []
    for fast in (False, True):
        loaded = load_model("smollm2-135m-instruct", dtype="bfloat16", device="cpu", overrides={"layers": "2"})
        engine = Engine(loaded, EngineConfig(num_kv_blocks=64, block_size=4, quantization="gguf", fast_kernels=fast))
        assert sum(isinstance(m, Int4Linear) for m in engine.runner.model.modules()) == 2 * 4
        assert isinstance(engine.runner.model.lm_head.kernel, Int8GroupLinear)
        assert (engine.runner.model.lm_head.kernel.kernel is not None) == fast
        outputs.append([c[0].token_ids for c in engine.generate(_prompts(3), greedy())])
    assert outputs[0] == outputs[1]


def test_a_model_that_is_not_gguf_is_refused():
    loaded = load_model("random:tiny-qwen2", dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="'random:tiny-qwen2' is not a GGUF file"):
        Engine(loaded, EngineConfig(num_kv_blocks=16, quantization="gguf"))


def test_tensor_parallel_is_refused_before_any_worker_starts(mixed_gguf):
    loaded = load_model(str(mixed_gguf), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="--quantization gguf keeps the file's tensors whole"):
        Engine(loaded, EngineConfig(num_kv_blocks=16, quantization="gguf", tensor_parallel_size=2))


def _q8_0_layer(shape: tuple[int, int], bias: bool, use_kernel: bool) -> tuple[Int8GroupLinear, torch.Tensor]:
    """A Q8_0-style layer (int8 values, an fp16 scale per 32 along K) and its exact weight."""
    torch.manual_seed(shape[0] + shape[1])
    linear = torch.nn.Linear(*shape, bias=bias).to(torch.bfloat16)
    n, k = shape[1], shape[0]
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // 32) * 1e-3 + 1e-4).half()  # (N, groups): groups of very different size
    exact = (q.double().view(n, -1, 32) * scale.double()[..., None]).view(n, k)
    return Int8GroupLinear(linear, 32, (q, scale), use_kernel=use_kernel), exact


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=needs_kernel)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 13, 64])
@pytest.mark.parametrize("shape,bias", [((128, 96), True), ((96, 100), False), ((576, 1536), True)])
def test_q8_0_layer_equals_exact_math(use_kernel, rows, shape, bias):
    """Both paths of Int8GroupLinear, at row counts across the kernel's 3-row tile, with N padded
    to whole 64-column blocks (100): within bf16 rounding of the fp64 result."""
    layer, w = _q8_0_layer(shape, bias, use_kernel)
    assert (layer.kernel is not None) == use_kernel
    x = torch.randn(rows, shape[0]).to(torch.bfloat16)
    expected = x.double() @ w.T + (layer.bias.double() if bias else 0)
    tolerance = dict(atol=1e-2 * expected.abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(layer(x).double(), expected, **tolerance)
    torch.testing.assert_close(layer.forward_gelu_tanh(x).double(), torch.nn.functional.gelu(expected, approximate="tanh"),
                               **tolerance)
    assert torch.equal(layer.dequantize().double(), w)
    rows_asked = torch.tensor([shape[1] - 1, 0, 63, 64 % shape[1]])
    assert torch.equal(layer.dequantize(rows_asked).double(), w[rows_asked])


@needs_kernel
def test_q8_0_kernel_rows_do_not_depend_on_their_batch():
    layer, _ = _q8_0_layer((576, 1536), True, True)
    x = torch.randn(20, 576).to(torch.bfloat16)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(20)])
    for rows in (20, 7, 5, 4):  # widened scratch with remainder tiles of 2, 1, 2 and 1 rows
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows
    x = torch.randn(60, 576).to(torch.bfloat16)  # the AVX2 kernel: 6-row tiles, 48-row chunks
    assert torch.equal(layer(x), torch.cat([layer(x[:48]), layer(x[48:])]))
