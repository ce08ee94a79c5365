"""lab/quant_report.py: the first-order column g.e must be the bpb's actual first-order change;
frontier variants are read like the environment."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import tiny_env
from lab import quant_report


def test_val_gradient_predicts_a_small_weight_change(tiny_data, tmp_path):
    h = tg.Hyperparameters.from_env(tiny_env(tiny_data, tmp_path, VAL_BATCH_SIZE="4096"))
    torch.manual_seed(0)
    model = tg.GPT(tg.ModelConfig.from_hparams(h)).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the zero-initialized projections would leave most gradients at zero
        for name in ("blocks.0.mlp.proj.weight", "blocks.1.attn.proj.weight"):
            state[name].normal_(std=0.05)
    sp = tg.load_tokenizer(str(tiny_data["tokenizer_model"]))
    luts = tg.build_byte_luts(sp, h.vocab_size)
    val = torch.from_numpy(tg.load_validation_tokens(h.data_path)[:20_000].astype(np.int32))
    grads = quant_report.val_gradient(model, state, h, val, luts)

    name, eps = "blocks.0.mlp.fc.weight", 1e-2
    direction = torch.randn_like(state[name])
    bpb = {}
    for sign in (1, -1):
        moved = dict(state, **{name: state[name] + sign * eps * direction})
        bpb[sign] = quant_report.val_bpb(model, moved, h, val, luts)
    measured = (bpb[1] - bpb[-1]) / 2  # central difference: the second-order terms cancel
    predicted = float((grads[name] * eps * direction).sum())
    assert abs(predicted) > 1e-6
    assert abs(measured - predicted) < 0.05 * abs(predicted)  # measured: within 1.3%


def test_frontier_variants_are_read_like_the_environment():
    label, overrides = quant_report.parse_variant("k x1.5:clip_method=sdclip,SDCLIP_K_MLP=17")
    assert label == "k x1.5" and overrides == {"clip_method": "sdclip", "sdclip_k_mlp": 17.0}
    with pytest.raises(ValueError, match="CLIP_METHOD"):
        quant_report.parse_variant("x:clip_method=nope")
    with pytest.raises(ValueError, match="NOPE is not a train_gpt.py hyperparameter"):
        quant_report.parse_variant("x:NOPE=1")
    for overrides in quant_report.FRONTIER_VARIANTS.values():
        dataclasses.replace(tg.Hyperparameters(), **overrides).check()
