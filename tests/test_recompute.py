"""--recompute-stages: the backbone's lowest stages run again in the backward pass instead of
keeping their activations, with the gradients and BatchNorm statistics of training without it."""

from __future__ import annotations

import pytest
import torch

from charseg.data.dataset import scan_dataset
from charseg.data.loading import CharacterDataset, collate
from charseg.model.build import build_model, spec_for_weights
from charseg.model.recompute import RecomputingFPN, set_recompute_stages
from charseg.training import runner
from conftest import light_config


def _step(tiny_dataset, stages: int, mask_pixels: bool = False) -> tuple[dict, dict, dict, int]:
    """One training step from the same random init (live BatchNorm, every stage trained) with
    STAGES recomputed: the losses, the gradients, the state after the step, and how many
    tensors autograd saved for the backward pass."""
    torch.manual_seed(0)
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64, fpn_channels=64, mask_pixels=mask_pixels)
    model = build_model(spec)
    model.train()
    set_recompute_stages(model, stages)
    images, targets, _ = collate([CharacterDataset(scan_dataset(tiny_dataset).samples)[i] for i in (0, 1)])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        losses = model(list(images), list(targets))
    sum(losses.values()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return losses, grads, {k: v.clone() for k, v in model.state_dict().items()}, sum(saved)


@pytest.mark.parametrize("stages", [1, 3])
def test_recomputed_stages_give_the_same_step_and_keep_fewer_activations(tiny_dataset, stages):
    losses, grads, state, kept = _step(tiny_dataset, 0)
    again_losses, again_grads, again_state, again_kept = _step(tiny_dataset, stages)
    assert {k: v.item() for k, v in again_losses.items()} == pytest.approx({k: v.item() for k, v in losses.items()})
    assert grads.keys() == again_grads.keys() and "backbone.body.conv1.weight" in grads
    for name in grads:
        torch.testing.assert_close(again_grads[name], grads[name], rtol=1e-4, atol=1e-6)
    # BatchNorm counts the batch once: the recomputation leaves its running statistics alone
    for key in ("backbone.body.bn1.running_mean", "backbone.body.layer1.0.bn1.running_var",
                "backbone.body.bn1.num_batches_tracked"):
        torch.testing.assert_close(again_state[key], state[key])
    assert again_kept < kept


def test_a_pixel_fpn_recomputes_too_and_inference_is_unchanged(tiny_dataset):
    losses, grads, _, kept = _step(tiny_dataset, 0, mask_pixels=True)
    again_losses, again_grads, _, again_kept = _step(tiny_dataset, 2, mask_pixels=True)
    assert sum(again_losses.values()).item() == pytest.approx(sum(losses.values()).item())
    torch.testing.assert_close(again_grads["backbone.body.layer2.0.conv1.weight"],
                               grads["backbone.body.layer2.0.conv1.weight"], rtol=1e-4, atol=1e-6)
    assert again_kept < kept
    model = build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=64, fpn_channels=64))
    model.eval()
    image = torch.rand(3, 64, 64)
    with torch.inference_mode():
        before = model([image])[0]["boxes"]
        set_recompute_stages(model, 4)
        assert isinstance(model.backbone, RecomputingFPN) and model.backbone.recompute_stages == 4
        torch.testing.assert_close(model([image])[0]["boxes"], before)


def test_stages_out_of_range_and_stock_models_are_refused():
    model = build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=64), polygon_native=False)
    set_recompute_stages(model, 0)  # nothing asked: fine on any model
    with pytest.raises(TypeError, match="RecomputingFPN"):
        set_recompute_stages(model, 1)
    with pytest.raises(ValueError, match="0-4"):
        set_recompute_stages(build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=64)), 5)


def test_a_run_recomputes_as_asked_and_a_resume_may_change_it(tiny_dataset, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr("charseg.training.loop.set_recompute_stages",
                        lambda model, stages: asked.append(stages) or set_recompute_stages(model, stages))
    config = light_config(tiny_dataset, tmp_path / "run", epochs=1, recompute_stages=2)
    result = runner.train(config)
    plan = runner.plan_resume(result.final_checkpoint, {"epochs": 2, "recompute_stages": 0})
    assert plan.config.recompute_stages == 0
    runner.resume(plan)
    assert asked == [2, 0]
