"""T5 / UMT5 encoder and tokenizer against transformers: tiny random checkpoints saved sharded, as .bin and
in bfloat16 load through ``load_t5_encoder`` and give HF's ``last_hidden_state``; the tokenizer gives
``AutoTokenizer``'s ids; bad folders give one-line errors; full-size encoders shard under FSDP."""

import json
import random
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AbstractMesh, AxisType  # noqa: E402

from sora_jax.parallel import sharding  # noqa: E402
from sora_jax.parallel.mesh import MESH_AXES  # noqa: E402
from sora_jax.text import t5  # noqa: E402

TEXTS = [
    "the cat runs over the bridge",
    "café naïve 東京 straße niño",
    "",
    "  multiple   spaces\tand\nnewlines ",
    "UPPER Case ＡＢＣ ﬁ ½ x\u00a0y a\u3000b",
    "</s> in text <pad> x <unk>",
    "the quick brown fox jumps over the lazy dog " * 6,
]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A tiny unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    syl = str.split("ka to mi ru sen da po li ver gen stra ße né ïv 東 京 日 本 ño ci ud ad qu ick fox")
    words = str.split("the a cat dog runs jumps over quick brown fox lazy river café naïve 東京 straße niño")
    words += ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(200)]
    (d / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(300))
    )
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"),
        model_prefix=str(d / "sp"),
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    return d / "sp.model"


@pytest.fixture(scope="module")
def hf_tokenizer_files(spiece, tmp_path_factory):
    """What transformers 5 writes for a T5 tokenizer: tokenizer.json + tokenizer_config.json (no spiece)."""
    src, out = tmp_path_factory.mktemp("tok_src"), tmp_path_factory.mktemp("tok_saved")
    shutil.copy(spiece, src / "spiece.model")
    transformers.T5Tokenizer.from_pretrained(str(src), extra_ids=0).save_pretrained(str(out))
    return out


def spiece_folder(path, spiece, **conf):
    """A hub-style folder: spiece.model + tokenizer_config.json (``conf`` added to it)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(spiece, path / "spiece.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", **conf}))
    return path


def tiny_config(kind, **kw):
    cls = transformers.UMT5Config if kind == "umt5" else transformers.T5Config
    args = dict(
        vocab_size=120,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
    )
    return cls(**{**args, **kw})


def make_hf(kind, seed, **kw):
    torch.manual_seed(seed)
    cls = transformers.UMT5EncoderModel if kind == "umt5" else transformers.T5EncoderModel
    return cls(tiny_config(kind, **kw)).eval()


def save_bin(model, folder, shards=1):
    """The pre-v5 ``safe_serialization=False`` layout (transformers 5 writes safetensors only)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return
    keys, weight_map = sorted(sd), {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[s::shards]}
        torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.fixture(scope="module")
def batch(hf_tokenizer_files):
    """Padded float32-model inputs of different lengths from our tokenizer (checked against HF below)."""
    tok = t5.T5Tokenizer(hf_tokenizer_files)
    ids, mask, _ = tok.encode(["the cat runs", "café naïve 東京 the quick brown fox " * 2, "", "dog"], 24)
    assert len(set(mask.sum(1).tolist())) == 4
    return ids, mask


def hf_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
        )
    return out.last_hidden_state.float().numpy()


# ---------------------------------------------------------------------------------------------- the encoder


@pytest.mark.parametrize(
    "kind, layout, kw",
    [
        ("t5", "sharded", {}),
        ("t5", "bin", {}),
        ("t5", "single", {"feed_forward_proj": "relu"}),  # original T5: ReLU, one wi
        ("umt5", "sharded", {}),
        ("umt5", "bin_sharded", {}),
    ],
)
def test_encoder_matches_transformers(kind, layout, kw, tmp_path, hf_tokenizer_files, batch):
    model = make_hf(kind, seed=1, **kw)
    folder = tmp_path / "ckpt"
    if layout == "sharded":
        model.save_pretrained(str(folder), safe_serialization=True, max_shard_size="20KB")
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*.safetensors"))) > 2
    elif layout == "single":
        model.save_pretrained(str(folder), safe_serialization=True)
        assert (folder / "model.safetensors").is_file()
    else:
        save_bin(model, folder, shards=3 if layout == "bin_sharded" else 1)
    for f in hf_tokenizer_files.iterdir():
        shutil.copy(f, folder)
    enc, tok = t5.load_t5_encoder(folder)
    assert enc.cfg.bias_per_layer == (kind == "umt5") and enc.cfg.gated == ("relu" not in kw.values())
    assert tok.vocab_size == 120
    ids, mask = batch
    ours = np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask.astype(np.int32))))
    ref = hf_hidden(model, ids, mask)
    # HF's rows at padding are real numbers (padding queries attend to the tokens), so all positions compare
    diff = float(np.abs(ours - ref).max())
    print(f"{kind} {layout} {kw}: max |ours - HF| = {diff:.3e} (|HF| <= {np.abs(ref).max():.2f})")
    assert diff <= 1e-4


def test_bfloat16_checkpoint_and_compute(tmp_path, hf_tokenizer_files, batch):
    """A bf16 safetensors checkpoint (numpy has no bf16: read raw) loads bit-exactly; bf16 compute is close."""
    model = make_hf("t5", seed=2)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
    for f in hf_tokenizer_files.iterdir():
        shutil.copy(f, tmp_path / "bf16")
    ids, mask = batch
    ref = hf_hidden(model.float(), ids, mask)  # the bf16-rounded weights, run in float32
    enc32, _ = t5.load_t5_encoder(tmp_path / "bf16", "float32")
    assert enc32.layers.wq[...].dtype == jnp.float32
    assert float(np.abs(np.asarray(enc32(ids, mask)) - ref).max()) <= 1e-4
    enc16, _ = t5.load_t5_encoder(tmp_path / "bf16", "bfloat16")
    assert enc16.layers.wq[...].dtype == jnp.bfloat16  # params stored in the compute dtype by default
    out16 = np.asarray(enc16(ids, mask).astype(jnp.float32))
    assert enc16(ids, mask).dtype == jnp.bfloat16
    diff32, diff16 = float(np.abs(np.asarray(enc32(ids, mask)) - ref).max()), float(np.abs(out16 - ref).max())
    print(
        f"bf16 checkpoint: float32 compute {diff32:.2e}, bf16 compute {diff16:.2e} (|HF| <= {np.abs(ref).max():.2f})"
    )
    assert diff16 <= 0.1 * float(np.abs(ref).max())


def test_load_onto_mesh_shards_parameters(tmp_path, hf_tokenizer_files, batch):
    model = make_hf("umt5", seed=3)
    model.save_pretrained(str(tmp_path / "u"), safe_serialization=True)
    for f in hf_tokenizer_files.iterdir():
        shutil.copy(f, tmp_path / "u")
    devices = np.asarray(jax.devices()[:8]).reshape(1, 4, 2, 1)
    mesh = jax.sharding.Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    enc, _ = t5.load_t5_encoder(tmp_path / "u", mesh=mesh)
    wq = enc.layers.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    ids, mask = batch
    graphdef, state = nnx.split(enc)  # how callers run it: jitted, parameters as arguments
    run = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m))
    with sharding.activation_sharding(mesh):
        out = run(state, ids, mask)
    diff = float(np.abs(np.asarray(out) - hf_hidden(model, ids, mask)).max())
    print(f"umt5 on a 4x2 mesh, jitted: max |ours - HF| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (32, 16), (64, 256), (8, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    n = 300
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = T5Attention._relative_position_bucket(rel, True, num_buckets, max_distance).numpy()
    np.testing.assert_array_equal(t5.relative_position_buckets(n, n, num_buckets, max_distance), ref)


@pytest.mark.parametrize("name, mesh_shape", [("t5-v1_1-xxl", (1, 8, 1, 1)), ("umt5-xxl", (2, 16, 1, 1))])
def test_full_size_encoder_shards_under_fsdp(name, mesh_shape):
    """XXL through eval_shape (nothing allocated): parameter count and the FSDP promise on an abstract mesh."""
    cfg = t5.VARIANTS[name]
    model = nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert count == {"t5-v1_1-xxl": 4_762_310_656, "umt5-xxl": 5_680_910_336}[name]
    mesh = AbstractMesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    shard = sharding.state_shardings(state, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shard)
    assert sharding.check_sufficiently_sharded(abstract, mesh) <= 1.02 / mesh_shape[1]
    graphdef, st = nnx.split(model)
    spec = jax.ShapeDtypeStruct((2, 16), jnp.int32), jax.ShapeDtypeStruct((2, 16), bool)
    out = jax.eval_shape(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask), st, *spec)
    assert out.shape == (2, 16, 4096)


def test_config_from_hf():
    cfg = t5.T5Config.from_hf(tiny_config("t5", feed_forward_proj="gated-silu").to_dict(), dtype="bfloat16")
    assert (cfg.activation, cfg.gated, cfg.dtype, cfg.param_dtype) == (
        t5.FFActivation.SILU,
        True,
        "bfloat16",
        "bfloat16",
    )
    assert t5.T5Config.from_hf({**tiny_config("umt5").to_dict()}).bias_per_layer
    with pytest.raises(ValueError, match="model_type='bert'"):
        t5.T5Config.from_hf({"model_type": "bert"})
    with pytest.raises(ValueError, match="lacks \\['d_ff'\\]"):
        t5.T5Config.from_hf({k: v for k, v in tiny_config("t5").to_dict().items() if k != "d_ff"})
    with pytest.raises(ValueError, match="feed_forward_proj='gated-tanhh'"):
        t5.parse_feed_forward_proj("gated-tanhh")


# ------------------------------------------------------------------------------------------------ tokenizer


def check_same_as_hf(folder, texts, max_length):
    ours = t5.T5Tokenizer(folder).encode(texts, max_length)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))(
        texts, padding="max_length", truncation=True, max_length=max_length
    )
    np.testing.assert_array_equal(ours.ids, np.asarray(hf["input_ids"], np.int32))
    np.testing.assert_array_equal(ours.mask, np.asarray(hf["attention_mask"], bool))
    assert ours.ids.dtype == np.int32 and ours.mask.dtype == bool
    full = transformers.AutoTokenizer.from_pretrained(str(folder))(texts)["input_ids"]
    assert ours.num_truncated == sum(len(r) > max_length for r in full)
    return ours


@pytest.mark.parametrize("max_length", [1, 12, 64])
def test_tokenizer_json_matches_autotokenizer(hf_tokenizer_files, max_length):
    out = check_same_as_hf(hf_tokenizer_files, TEXTS, max_length)
    assert out.num_truncated >= 1 + (max_length < 64)
    assert (out.ids[out.mask.all(1), -1] == 1).all()  # truncated rows keep their EOS


@pytest.mark.parametrize("conf", [{"extra_ids": 0}, {}])  # {}: HF's default 100 sentinels <extra_id_i>
@pytest.mark.parametrize("max_length", [12, 64])
def test_spiece_matches_autotokenizer(spiece, tmp_path, conf, max_length):
    folder = spiece_folder(tmp_path / "tok", spiece, **conf)
    texts = TEXTS + ["a <extra_id_0>b<extra_id_1> </s>x", "<extra_id_99>"]
    out = check_same_as_hf(folder, texts, max_length)
    assert out.num_truncated >= 1 + (max_length < 64)
    assert t5.T5Tokenizer(folder).vocab_size == 120 + conf.get("extra_ids", 100)


# ---------------------------------------------------------------------------------------------------- errors


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_bad_folders_give_one_line_errors(tmp_path, hf_tokenizer_files):
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        t5.load_t5_encoder(tmp_path / "nope")
    one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json") as e:
        t5.load_t5_encoder(tmp_path / "empty")
    one_line(e)

    good = tmp_path / "good"
    make_hf("t5", seed=4).save_pretrained(str(good), safe_serialization=True)
    for f in hf_tokenizer_files.iterdir():
        shutil.copy(f, good)

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return d

    no_weights = variant("no_weights", lambda d: (d / "model.safetensors").unlink())
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors") as e:
        t5.load_t5_encoder(no_weights)
    one_line(e)

    def bigger_ff(d):
        conf = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**conf, "d_ff": 48}))

    with pytest.raises(
        ValueError, match=r"wi_0.weight has shape \(64, 32\); config.json implies \(48, 32\)"
    ) as e:
        t5.load_t5_encoder(variant("wrong_shape", bigger_ff))
    one_line(e)

    def drop_key(d):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(d / "model.safetensors"))
        del tensors["encoder.block.1.layer.0.SelfAttention.k.weight"]
        save_file(tensors, str(d / "model.safetensors"))

    with pytest.raises(ValueError, match=r"no tensor 'encoder.block.1.layer.0.SelfAttention.k.weight'") as e:
        t5.load_t5_encoder(variant("missing_key", drop_key))
    one_line(e)

    def no_tokenizer(d):
        (d / "tokenizer.json").unlink()

    with pytest.raises(FileNotFoundError, match="neither spiece.model nor tokenizer.json") as e:
        t5.load_t5_encoder(variant("no_tok", no_tokenizer))
    one_line(e)

    def bad_index(d):
        (d / "model.safetensors").rename(d / "x.safetensors")
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"shared.weight": "gone.st"}})
        )

    with pytest.raises(FileNotFoundError, match="gone.st .*does not exist") as e:
        t5.load_t5_encoder(variant("bad_index", bad_index))
    one_line(e)
