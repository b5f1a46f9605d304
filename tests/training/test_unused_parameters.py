"""DDP's search for unused parameters only where a pack can leave some out (docs/DESIGN.md, "Data
parallelism without find_unused_parameters"): the rule read from the config against what packs of
each task really leave without a gradient, and DDP without the search on the one side of it."""

import copy
import re

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import SUPPORTED_TASKS, random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config
from megatron_cosmos3.training.unused_parameters import possibly_unused


def pack(config, task, seed):
    g = torch.Generator().manual_seed(seed)
    return add_flow_matching_noise(random_pack(config, g, 3, tasks=(task,)), FlowMatchingConfig(), g)


def without_gradient(model, config, task) -> set[str]:
    model.zero_grad(set_to_none=True)
    mot_losses(model, *pack(config, task, 0)).total.backward()
    return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}


@pytest.mark.parametrize("expert_impl", ["grouped", "loop"])
def test_the_rule_names_every_parameter_a_pack_of_each_task_leaves_unused(expert_impl):
    config = tiny_mot_config()
    config.num_experts, config.moe_top_k, config.moe_expert_impl = 8, 1, expert_impl
    torch.manual_seed(0)
    model = MoTModel(copy.deepcopy(config))
    for task in SUPPORTED_TASKS:
        unused = without_gradient(model, config, task)
        assert unused <= set(possibly_unused(model, [task])), task
    # Tight where it matters: text-to-video leaves exactly the audio and action heads (and, looped,
    # the experts no token chose), nothing of the towers.
    heads = {n for n in possibly_unused(model, ["text_to_video"]) if n.startswith("dm_streams.")}
    assert heads == {
        n for n, _ in model.named_parameters() if re.match(r"dm_streams\.(action_\w+|media_\w+\.audio)\.", n)
    }
    experts = [n for n in possibly_unused(model, ["text_to_video"]) if not n.startswith("dm_streams.")]
    assert all(n.endswith(("gate_up_proj", "down_proj")) for n in experts) and bool(experts) == (expert_impl == "loop")
    # Understanding packs hold no DM rows: the Generator's attention inputs go unused too.
    assert any(".generator.self_attn.q_proj." in n for n in possibly_unused(model, SUPPORTED_TASKS))
    for name, param in model.named_parameters():  # frozen parameters are never DDP's concern
        param.requires_grad_(not name.startswith("dm_streams.action_"))
    assert possibly_unused(model, ["video_to_audio"]) == ([] if expert_impl == "grouped" else experts)


def _ddp_without_the_search(rank, world_size, tasks):
    """Two steps of DDP(find_unused_parameters=False) on packs of each task: "ok" or DDP's error."""
    from torch.nn.parallel import DistributedDataParallel

    config = tiny_mot_config()
    outcomes = []
    for task in tasks:
        torch.manual_seed(0)
        model = MoTModel(copy.deepcopy(config))
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith("dm_streams.action_"))
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        try:
            for step in range(2):
                mot_losses(ddp, *pack(config, task, step)).total.backward()
            outcomes.append("ok")
        except RuntimeError as error:
            outcomes.append(str(error))
    return outcomes


@pytest.mark.multiprocess
def test_ddp_without_the_search_trains_where_the_rule_finds_nothing_unused_and_fails_elsewhere():
    model = MoTModel(tiny_mot_config())
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("dm_streams.action_"))
    assert possibly_unused(model, ["video_to_audio"]) == []
    assert possibly_unused(model, ["text_to_video"])  # the audio heads
    [(fine, failed)] = run_on_ranks(_ddp_without_the_search, 1, ["video_to_audio", "text_to_video"])
    assert fine == "ok"
    assert "finished reduction" in failed or "did not receive grad" in failed, failed
