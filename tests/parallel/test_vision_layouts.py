"""The model's own ViT under every layout that splits the model or the sequence: the loss and every
parameter's gradient (the ViT's included) equal one process doing the same gradient accumulation.

The ViT runs on the first pipeline stage only; there the tensor and context ranks holding the pack
each encode a share of its pictures (parallel/vision_parallel.py) before its rows are split."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from megatron_cosmos3.data.synthetic_packs import SampleSpec, build_sample, random_pack, random_sample_spec
from megatron_cosmos3.model.config import VisionConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.model.packed_batch import PackedBatch
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import TINY_VISION, tiny_mot_config

# 4 layers (pipeline chunks of 1 still hold the one DeepStack layer); 8 / 4 heads so that TP x CP
# splits the KV heads.
CONFIG = tiny_mot_config(num_layers=4, num_attention_heads=8, num_kv_heads=4, vision=VisionConfig(**TINY_VISION))
TOLERANCE = 1e-5  # fp32, norm-relative per parameter
LAYOUTS = {
    "tp2": (2, ParallelSizes(tensor=2)),
    "tp2-sp": (2, ParallelSizes(tensor=2, sequence_parallel=True)),
    "cp2": (2, ParallelSizes(context=2)),
    "pp2": (2, ParallelSizes(pipeline=2)),
    "pp2-interleaved": (2, ParallelSizes(pipeline=2, virtual_pipeline=2)),
    "tp2-sp-x-pp2": (4, ParallelSizes(tensor=2, pipeline=2, sequence_parallel=True)),
    "pp2-x-cp2": (4, ParallelSizes(pipeline=2, context=2)),
}


def picture_packs():
    """Two noised micro-batches (a multiple of the pipeline size): one with pictures in most samples,
    one with a single picture (so some rank has none to encode)."""
    g = torch.Generator().manual_seed(13)  # five pictures
    many = random_pack(CONFIG, g, num_samples=6, tasks=("understanding", "policy", "text_to_video"), pixels=True)
    specs = [random_sample_spec("text_to_video", CONFIG, g) for _ in range(3)]
    specs.append(SampleSpec("understanding", 8, answer_tokens=4, vision_grid=(1, 2, 1)))
    one = PackedBatch.from_samples([build_sample(spec, CONFIG, g, pixels=True) for spec in specs])
    assert many.vision_grid_thw.shape[0] >= 4 and one.vision_grid_thw.shape[0] == 1
    return [add_flow_matching_noise(batch, FlowMatchingConfig(), g) for batch in (many, one)]


def _gradients_against_one_process(rank, world_size, name):
    from megatron_cosmos3.objectives.losses import loss_breakdown, mot_losses
    from megatron_cosmos3.parallel.context_parallel import sequence_split, split_losses
    from megatron_cosmos3.parallel.data_parallel import reduce_replicated_gradients
    from megatron_cosmos3.parallel.pipeline import split_into_stages
    from megatron_cosmos3.parallel.pipeline_schedules import forward_backward
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.parallel.vision_parallel import PictureSharing
    from megatron_cosmos3.testing.reference import compare_to_reference

    sizes = LAYOUTS[name][1]
    groups = initialize_parallel(sizes, CONFIG)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(CONFIG))
        reference.add_vision_encoder()
        model = apply_tensor_parallel(copy.deepcopy(reference), groups)
        model.vision.sharing = PictureSharing.of(groups)
        encoded = []  # pictures this rank's ViT encoded, per call
        model.vision.register_forward_hook(lambda _, args, __: encoded.append(args[1].shape[0]))
        microbatches = picture_packs()
        want = []
        for batch, targets in microbatches:
            loss = loss_breakdown(reference(batch), batch, targets).total
            (loss / len(microbatches)).backward()
            want.append(float(loss.detach()))

        split = sequence_split(groups)
        if sizes.pipeline > 1:
            owner = split_into_stages(model, groups)
            got = [float(report.total) for report in forward_backward(owner, microbatches, split=split)]
        else:
            owner, got = model, []
            for batch, targets in microbatches:
                losses = split_losses(model, batch, targets, split) if split else mot_losses(model, batch, targets)
                (losses.total / len(microbatches)).backward()
                got.append(float(losses.total.detach()))
        if sizes.context > 1:
            reduce_replicated_gradients(owner.parameters(), groups.data_and_context)
        finalize_tensor_parallel_grads(model, groups)
        return {
            "losses": (want, got),
            "grad": compare_to_reference(owner, reference, groups.tensor_rank, sizes.tensor),
            "holds_vit": any(n.startswith("vision.vit.") for n, _ in owner.named_parameters()),
            "first_stage": groups.pipeline_rank == 0,
            "encoded": sum(encoded),
            "pictures": sum(batch.vision_grid_thw.shape[0] for batch, _ in microbatches),
            "sharing": dist.get_world_size(groups.tensor_and_context),
            "last_stage": groups.is_last_stage,
        }
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", LAYOUTS)
def test_vit_and_towers_get_the_gradients_of_one_process(name):
    reports = run_on_ranks(_gradients_against_one_process, LAYOUTS[name][0], name)
    for report in reports:
        assert report["holds_vit"] == report["first_stage"]  # only where the pack enters
        worst = max(report["grad"], key=report["grad"].get)
        assert report["grad"][worst] <= TOLERANCE, (name, worst, report["grad"][worst])
        if report["last_stage"]:
            want, got = report["losses"]
            assert got == pytest.approx(want, rel=TOLERANCE)
    # The first stage's tensor x context ranks share out the pictures: each encoded once in all.
    first = [report for report in reports if report["first_stage"]]
    assert sum(report["encoded"] for report in first) == first[0]["pictures"] * len(first) // first[0]["sharing"]
    if first[0]["sharing"] > 1:
        assert all(report["encoded"] < report["pictures"] for report in first)


def test_pictures_go_whole_to_the_least_loaded_rank_largest_first():
    from megatron_cosmos3.parallel.vision_parallel import assign_pictures

    assert assign_pictures([16, 4, 4, 8, 4], 2) == [0, 1, 1, 1, 0]  # loads 20 and 16
    assert assign_pictures([4], 4) == [0]  # ranks 1-3 encode nothing (and still join the gather)
    assert assign_pictures([], 2) == []
