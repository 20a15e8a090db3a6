import dataclasses

import pytest
import torch

from pipeline.checkpoint_reader import PipelineReader
from pipeline.engines.pipe import BlockLayer, EmbeddingLayer, HeadLayer, pipeline_name
from pipeline.config import TrainSection
from pipeline.engines.blocks import prepare_blocks
from pipeline.model import PRESETS, Transformer, causal_lm_loss


def grads(model, tokens):
    model.zero_grad()
    causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_blocks_give_the_same_gradients():
    cfg = PRESETS["tiny"]
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    plain = grads(Transformer(cfg, seed=5), tokens)
    model = Transformer(cfg, seed=5)
    recomputations = prepare_blocks(enumerate(model.layers),
                                    TrainSection(steps=1, micro_batch_size=1, activation_checkpointing=True))
    recomputed = grads(model, tokens)
    assert recomputations.count == cfg.n_layers  # equal gradients also when nothing was recomputed
    assert plain.keys() == recomputed.keys()
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_pipeline_layers_start_from_the_plain_models_weights(fused, tmp_path):
    """Also: the layer files PipelineModule.save_state_dict would write (one state dict per layer
    under layer_XX-model_states.pt) read back through the export's PipelineReader, fused or not."""
    cfg = dataclasses.replace(PRESETS["tiny"], fused_projections=fused)
    plain = Transformer(cfg, seed=9).state_dict()
    layers = [EmbeddingLayer(cfg, 9)] + [BlockLayer(cfg, 9, i) for i in range(cfg.n_layers)] + [HeadLayer(cfg, 9)]
    got = {}
    for idx, layer in enumerate(layers):
        torch.save(layer.state_dict(), tmp_path / f"layer_{idx:02d}-model_states.pt")
        for name, t in layer.state_dict().items():
            got[pipeline_name(idx, name, cfg.n_layers)] = t
    assert got.keys() == plain.keys()
    assert all(torch.equal(got[k], plain[k]) for k in plain)
    read = dict(PipelineReader(tmp_path, cfg).tensors())
    assert list(read) == list(plain) and all(torch.equal(read[k], plain[k]) for k in plain)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    h = tokens
    for layer in layers:
        h = layer(h)
    torch.testing.assert_close(h, Transformer(cfg, seed=9)(tokens), rtol=0, atol=0)
