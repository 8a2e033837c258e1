"""Layer dropping against hand-built shallower models, and linear CKA against its definition."""

from __future__ import annotations

import re

import pytest
import torch
from families import FAMILIES, build

from ffmerge.adapters import get_adapter
from ffmerge.checkpoint import load_compressed, save_compressed
from ffmerge.cka import cka_matrix, linear_cka
from ffmerge.drop import drop_layers
from ffmerge.features import cache_features

# family -> (state-dict prefix of each stack's layers, config edits that describe the shallower model by hand)
REFERENCES = {
    "llama": ({"decoder": "model.layers"}, lambda c: c.update(num_hidden_layers=3)),
    "gpt2": ({"decoder": "transformer.h"}, lambda c: c.update(n_layer=3)),
    "gemma3_text": (
        {"decoder": "model.layers"},
        lambda c: c.update(
            num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "sliding_attention"]
        ),
    ),
    "marian": (
        {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"},
        lambda c: c.update(encoder_layers=3, decoder_layers=2),
    ),
}


def _renumber(state: dict, prefix: str, start: int, count: int) -> dict:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        if not m:
            out[key] = value
            continue
        i = int(m.group(1))
        if start <= i < start + count:
            continue
        out[f"{prefix}.{i - count if i >= start else i}.{m.group(2)}"] = value
    return out


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_dropped_model_matches_hand_built_reference_and_generates(name, tmp_path):
    model, inputs = build(name)
    prefixes, edit = REFERENCES[name]
    family = FAMILIES[name]
    # the gemma3 fixture has layers [s, s, f, s, s]: dropping 2 from index 1 keeps [s, s, s]
    windows = {stack: (1, 2) for stack in prefixes}
    state = model.state_dict()
    for stack, prefix in prefixes.items():
        state = _renumber(state, prefix, *windows[stack])
    config_dict = model.config.to_dict()
    edit(config_dict)
    reference = type(model)(type(model.config).from_dict(config_dict)).eval()
    reference.load_state_dict(state, strict=True)

    drop_layers(model, windows)
    with torch.no_grad():
        torch.testing.assert_close(family.output(model, inputs), family.output(reference, inputs), rtol=0, atol=0)
    for key, value in config_dict.items():
        if key in ("num_hidden_layers", "n_layer", "encoder_layers", "decoder_layers", "layer_types"):
            assert getattr(model.config, key) == value

    generated = model.generate(
        **{k: v for k, v in inputs.items() if k != "decoder_input_ids"}, max_new_tokens=4, do_sample=False
    )
    expected = reference.generate(
        **{k: v for k, v in inputs.items() if k != "decoder_input_ids"}, max_new_tokens=4, do_sample=False
    )
    assert torch.equal(generated, expected)

    model.save_pretrained(tmp_path / "dropped")
    reloaded = type(model).from_pretrained(tmp_path / "dropped").eval()
    with torch.no_grad():
        torch.testing.assert_close(family.output(reloaded, inputs), family.output(reference, inputs))


def test_drop_rejects_windows_that_do_not_fit():
    model, _ = build("llama")
    with pytest.raises(ValueError, match="cannot drop"):
        drop_layers(model, {"decoder": (4, 3)})
    with pytest.raises(ValueError, match="cannot drop"):
        drop_layers(model, {"decoder": (0, 5)})


def _gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA from centred Gram matrices (HSIC form), the textbook definition."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    gx, gy = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    return float((gx * gy).sum() / (torch.linalg.matrix_norm(gx) * torch.linalg.matrix_norm(gy)))


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    y = torch.randn(200, 12, generator=g, dtype=torch.float64) + x[:, :12] * 0.5
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x @ q * 3.7, y) == pytest.approx(linear_cka(x, y), abs=1e-10)
    assert linear_cka(x, y) == pytest.approx(_gram_cka(x, y), abs=1e-10)
    assert 0.0 < linear_cka(x, y) < 1.0
    unrelated = torch.randn(200, 12, generator=g, dtype=torch.float64)
    assert linear_cka(x, unrelated) < linear_cka(x, y)


def test_cka_matrix_over_cached_layers(tmp_path):
    model, inputs = build("whisper")
    family = FAMILIES["whisper"]
    batches = [{**inputs, "token_masks": family.token_masks(inputs)}]
    n = min(int(m.sum()) for m in family.token_masks(inputs).values())
    store = cache_features(model, batches, tmp_path / "f", n_tokens=n, kinds=("ff_out", "attn_out"), progress=False)
    matrix, labels = cka_matrix(store, "ff_out")
    assert labels == [f"encoder.{i}" for i in range(5)] + [f"decoder.{i}" for i in range(4)]
    assert matrix.shape == (9, 9)
    torch.testing.assert_close(torch.tensor(matrix.diagonal()), torch.ones(9, dtype=torch.float64))
    assert (matrix == matrix.T).all()
    expected = linear_cka(store.load("encoder", "ff_out", 1), store.load("decoder", "ff_out", 2))
    assert matrix[1, 5 + 2] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_saves_and_reloads_after_dropping(name, tmp_path):
    # configs that carry per-layer bookkeeping (DINOv2's backbone stage names) must agree with the new depth,
    # or transformers refuses to load the saved config
    model, inputs = build(name)
    stacks = [s.name for s in get_adapter(model).stacks]
    drop_layers(model, {stack: (1, 2) for stack in stacks})
    save_compressed(model, tmp_path / "dropped")
    reloaded = load_compressed(tmp_path / "dropped").eval()
    family = FAMILIES[name]
    with torch.no_grad():
        torch.testing.assert_close(family.output(reloaded, inputs), family.output(model.eval(), inputs))
