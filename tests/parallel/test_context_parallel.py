"""Context parallelism (Ulysses all-to-all) equals one process, and the reasoner stays blind to DM tokens."""

import copy
import dataclasses
import importlib.util

import pytest
import torch

from megatron_cosmos3.data.synthetic_packs import pack_from_lengths, random_pack
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.objectives.flow_matching import FlowMatchingConfig, add_flow_matching_noise
from megatron_cosmos3.objectives.losses import mot_losses
from megatron_cosmos3.parallel.context_parallel import shard_pack
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.training import tiny_mot_config

CONFIG = tiny_mot_config()

# (n_ar, n_dm) per sample: odd stream lengths, samples with an empty AR or DM section, and packs whose
# DM or AR stream is shorter than the CP size (a rank holds only a pad row of that stream).
EDGE_LENGTHS = [[(3, 5), (0, 7), (4, 0), (2, 1)], [(5, 1), (4, 0)], [(1, 6)]]


def noised(batch, g):
    return add_flow_matching_noise(batch, FlowMatchingConfig(), g)


def with_deepstack(batch, g, layers=2):
    """Qwen3-VL DeepStack features for the pack's ViT rows (checks that CP adds them to the right rows)."""
    n_vision = int(batch.ar_is_vision.sum())
    return batch.replace(ar_deepstack_embeds=torch.randn(layers, n_vision, CONFIG.hidden_size, generator=g))


def equivalence_packs():
    """(name, noised batch, targets): several random packs and the edge cases above."""
    packs = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        packs.append((f"random{seed}", *noised(random_pack(CONFIG, g, num_samples=5), g)))
    for i, lengths in enumerate(EDGE_LENGTHS):
        g = torch.Generator().manual_seed(100 + i)
        packs.append((f"lengths{lengths}", *noised(pack_from_lengths(CONFIG, lengths, g), g)))
    g = torch.Generator().manual_seed(7)
    vision_pack = random_pack(CONFIG, g, num_samples=4, tasks=("understanding", "policy"))
    packs.append(("deepstack", *noised(with_deepstack(vision_pack, g), g)))
    return packs


def step_pack(step):
    g = torch.Generator().manual_seed(1000 + step)
    return noised(random_pack(CONFIG, g, num_samples=4), g)


def _cp_matches_one_process(rank, world_size, dtype, backend, steps, deepspeed_ulysses=False, kv_heads=None):
    import torch.distributed as dist

    from megatron_cosmos3.parallel.context_parallel import SequenceSplit, split_losses
    from megatron_cosmos3.parallel.data_parallel import reduce_replicated_gradients
    from megatron_cosmos3.testing.reference import compare_to_reference

    context = dist.group.WORLD  # the whole world is one CP group (CP x DP below uses initialize_parallel)
    config = dataclasses.replace(CONFIG, attention_backend=backend, num_kv_heads=kv_heads or CONFIG.num_kv_heads)
    torch.manual_seed(0)
    reference = MoTModel(copy.deepcopy(config)).to(dtype)
    model = copy.deepcopy(reference)

    def both(batch, targets):
        for m in (reference, model):
            m.zero_grad(set_to_none=True)
        want = mot_losses(reference, batch, targets)
        want.total.backward()
        split = SequenceSplit(context, context=context, deepspeed_ulysses=deepspeed_ulysses)
        got = split_losses(model, batch, targets, split)
        got.total.backward()
        reduce_replicated_gradients(model.parameters(), context)
        return want, got

    report = {"packs": {}, "steps": []}
    for name, batch, targets in equivalence_packs():
        want, got = both(batch, targets)
        report["packs"][name] = {
            "loss": (want.total.item(), got.total.item()),
            "counts": (int(want.ce_count), int(want.fm_count), int(got.ce_count), int(got.fm_count)),
            "grad": compare_to_reference(model, reference),
        }
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, model)]
    for step in range(steps):
        want, got = both(*step_pack(step))
        for optimizer in optimizers:
            optimizer.step()
        report["steps"].append(
            {"loss": (want.total.item(), got.total.item()), "data": compare_to_reference(model, reference, what="data")}
        )
    return report


# Norm-relative per parameter. fp64 shows the CP math is exact; fp32 gradients differ by summation
# order only (~1e-7 relative).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
# Parameters after AdamW steps, fp32: AdamW divides each gradient element by its own magnitude (+1e-8),
# so an element whose gradient is ~1e-8 turns 1e-9 of summation-order noise into a 0.2% change of its
# update (measured: 3-5e-5 on a 32x32 weight after one step at lr 1e-2). fp64 stays exact.
STEP_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def worst(differences):
    name = max(differences, key=differences.get)
    return name, differences[name]


# One KV head (MQA) for two context ranks: the exchange repeats it (ulysses.spread_kv_heads).
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "dtype, backend, kv_heads",
    [(torch.float32, "sdpa", None), (torch.float64, "dense", None), (torch.float64, "sdpa", 1)],
)
def test_cp2_loss_gradients_and_adamw_steps_match_one_process(dtype, backend, kv_heads):
    tolerance = TOLERANCE[dtype]
    reports = run_on_ranks(_cp_matches_one_process, 2, dtype, backend, 3, False, kv_heads)
    for name in reports[0]["packs"]:
        for report in reports:
            pack = report["packs"][name]
            want, got = pack["loss"]
            assert got == pytest.approx(want, rel=tolerance), name
            assert worst(pack["grad"])[1] <= tolerance, (name, worst(pack["grad"]))
        # Each token is counted on exactly one CP rank.
        counts = [r["packs"][name]["counts"] for r in reports]
        assert sum(c[2] for c in counts) == counts[0][0] and sum(c[3] for c in counts) == counts[0][1], name
    for report in reports:
        for step in report["steps"]:
            want, got = step["loss"]
            assert got == pytest.approx(want, rel=tolerance)
            assert worst(step["data"])[1] <= STEP_TOLERANCE[dtype], worst(step["data"])


def changed_dm_inputs(batch, g):
    """Every DM input changed (latents, noise mask, timesteps); the AR stream untouched."""
    noise_mask = torch.ones_like(batch.dm_noise_mask)
    return batch.replace(
        dm_tokens={k: torch.randn(v.shape, generator=g) * 100 for k, v in batch.dm_tokens.items()},
        dm_noise_mask=noise_mask,
        dm_timesteps=torch.rand(batch.num_dm_tokens, generator=g),
    )


def _ar_outputs_under_cp(rank, world_size, deepspeed_ulysses=False):
    import torch.distributed as dist

    from megatron_cosmos3.objectives.losses import cross_entropy_per_token
    from megatron_cosmos3.parallel.context_parallel import SequenceSplit, split_forward

    torch.manual_seed(0)
    model = MoTModel(copy.deepcopy(CONFIG))
    results = []
    for name, batch, _ in equivalence_packs():
        changed = changed_dm_inputs(batch, torch.Generator().manual_seed(99))
        changed.validate()
        outputs = []
        with torch.no_grad():
            for b in (batch, changed):
                split = SequenceSplit(dist.group.WORLD, context=dist.group.WORLD, deepspeed_ulysses=deepspeed_ulysses)
                output, shard = split_forward(model, b, split)
                outputs.append((output.ar_hidden, cross_entropy_per_token(output, shard.batch)[0], output.dm_hidden))
        (hidden, ce, dm), (changed_hidden, changed_ce, changed_dm) = outputs
        results.append(
            (name, torch.equal(hidden, changed_hidden), torch.equal(ce, changed_ce), not torch.equal(dm, changed_dm))
        )
    return results


@pytest.mark.multiprocess
def test_changing_dm_inputs_changes_no_ar_output_bit_for_bit_under_cp2():
    check_ar_blindness(run_on_ranks(_ar_outputs_under_cp, 2))


def check_ar_blindness(reports):
    for rank_results in reports:
        for name, same_hidden, same_ce, _ in rank_results:
            assert same_hidden and same_ce, name
    # The control: the DM side saw the change (on some rank), so the comparison above is not vacuous.
    for i, (name, *_rest) in enumerate(reports[0]):
        assert any(rank_results[i][3] for rank_results in reports), name


def _under_deepspeed_ulysses(rank, world_size):
    """Both checks above with DeepSpeed's DistributedAttention doing the exchange (one start of the
    ranks: DeepSpeed's import is slow), and the exchange those splits use."""
    import torch.distributed as dist

    from megatron_cosmos3.model.attention import attention_backend
    from megatron_cosmos3.parallel.context_parallel import SequenceSplit

    split = SequenceSplit(dist.group.WORLD, context=dist.group.WORLD, deepspeed_ulysses=True)
    rows, _ = split.rows(step_pack(0)[0], attention_backend("dense"))
    return (
        _cp_matches_one_process(rank, world_size, torch.float64, "dense", 1, deepspeed_ulysses=True),
        _ar_outputs_under_cp(rank, world_size, deepspeed_ulysses=True),
        type(rows.attention).__name__,
    )


@pytest.mark.multiprocess
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_ulysses_matches_one_process_and_keeps_the_reasoner_blind():
    """DeepSpeed-Ulysses around the varlen attention on 2 ranks: packs of several samples (and the
    edge cases) give the one-process loss and gradients, fp64 exactly, and an AdamW step; changing
    every DM input changes no AR output."""
    reports = run_on_ranks(_under_deepspeed_ulysses, 2)
    assert {exchange for *_, exchange in reports} == {"DeepSpeedUlyssesAttention"}
    for name in reports[0][0]["packs"]:
        for report, *_ in reports:
            want, got = report["packs"][name]["loss"]
            assert got == pytest.approx(want, rel=TOLERANCE[torch.float64]), name
            assert worst(report["packs"][name]["grad"])[1] <= TOLERANCE[torch.float64], name
    for report, *_ in reports:
        assert worst(report["steps"][0]["data"])[1] <= STEP_TOLERANCE[torch.float64]
    check_ar_blindness([blindness for _, blindness, _ in reports])


def _cp_times_dp_matches_one_process(rank, world_size, steps):
    from megatron_cosmos3.parallel.context_parallel import SequenceSplit, split_losses
    from megatron_cosmos3.parallel.data_parallel import reduce_replicated_gradients
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.testing.reference import compare_to_reference

    groups = initialize_parallel(ParallelSizes(context=2), CONFIG)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(CONFIG))
        model = copy.deepcopy(reference)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, model)]
        report = []
        for step in range(steps):
            for m in (reference, model):
                m.zero_grad(set_to_none=True)
            # One process: the mean over the DP micro-batches, as DDP averages their gradients.
            for data_rank in range(groups.data_size):
                (mot_losses(reference, *step_pack(10 * step + data_rank)).total / groups.data_size).backward()
            losses = split_losses(
                model, *step_pack(10 * step + groups.data_rank), SequenceSplit(groups.context, context=groups.context)
            )
            losses.total.backward()
            reduce_replicated_gradients(model.parameters(), groups.data_and_context)
            grad = compare_to_reference(model, reference)
            for optimizer in optimizers:
                optimizer.step()
            data = compare_to_reference(model, reference, what="data")
            report.append((groups.context_rank, groups.data_rank, grad, data))
        return report
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_cp2_times_dp2_gradients_and_steps_match_one_process():
    reports = run_on_ranks(_cp_times_dp_matches_one_process, 4, 2)
    # tp-cp-ep-dp-pp order: rank = cp + 2 * dp.
    assert [(r[0][0], r[0][1]) for r in reports] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for report in reports:
        for _, _, grad, data in report:
            assert worst(grad)[1] <= TOLERANCE[torch.float32], worst(grad)
            assert worst(data)[1] <= STEP_TOLERANCE[torch.float32], worst(data)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_shards_hold_every_row_once_and_pad_into_an_isolated_sample(size):
    for name, batch, targets in equivalence_packs():
        shards = [shard_pack(batch, rank, size) for rank in range(size)]
        for shard in shards:
            shard.batch.validate()
        local = [s.batch for s in shards]
        assert torch.equal(torch.cat([b.ar_token_ids for b in local]), batch.ar_token_ids), name
        assert torch.equal(torch.cat([b.dm_timesteps for b in local]), batch.dm_timesteps), name
        for key, values in batch.dm_tokens.items():
            assert torch.equal(torch.cat([b.dm_tokens[key] for b in local]), values), (name, key)
            assert torch.equal(torch.cat([s.local_targets(targets)[key] for s in shards]), targets[key]), (name, key)
        # Every rank's chunk (real + pad rows) has one length; pad rows are < size and form one extra sample.
        layout = shards[0].layout
        for stream, padding in (("ar", "ar_padding"), ("dm", "dm_padding")):
            chunk = {getattr(b, f"num_{stream}_tokens") + getattr(s, padding) for b, s in zip(local, shards)}
            assert len(chunk) == 1, (name, stream)
            pad_rows = sum(getattr(s, padding) for s in shards)
            assert pad_rows < size and chunk.pop() * size == getattr(batch, f"num_{stream}_tokens") + pad_rows
        has_padding = any(s.ar_padding or s.dm_padding for s in shards)
        assert layout.num_samples == batch.num_samples + has_padding, name


MOE_CONFIG = tiny_mot_config(num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16, moe_aux_loss_weight=0.1)


def _cp_with_experts_matches_one_process(rank, world_size, dtype):
    import torch.distributed as dist

    from megatron_cosmos3.model.moe import MoEMLP
    from megatron_cosmos3.parallel.context_parallel import SequenceSplit, split_losses
    from megatron_cosmos3.parallel.data_parallel import reduce_replicated_gradients
    from megatron_cosmos3.testing.reference import compare_to_reference

    def aux_losses(model):
        return [float(m.aux_loss.detach()) for m in model.modules() if isinstance(m, MoEMLP)]

    torch.manual_seed(0)
    reference = MoTModel(copy.deepcopy(MOE_CONFIG)).to(dtype)
    model = copy.deepcopy(reference)
    report = {}
    # Odd stream lengths: some ranks hold pad rows, which the balancing loss leaves out.
    for name, batch, targets in equivalence_packs()[1:4]:
        for m in (reference, model):
            m.zero_grad(set_to_none=True)
        want = mot_losses(reference, batch, targets)
        want.total.backward()
        got = split_losses(model, batch, targets, SequenceSplit(dist.group.WORLD, context=dist.group.WORLD))
        got.total.backward()
        reduce_replicated_gradients(model.parameters(), dist.group.WORLD)
        report[name] = {
            "loss": (want.total.item(), got.total.item()),
            "aux": (aux_losses(reference), aux_losses(model)),
            "grad": compare_to_reference(model, reference),
        }
    return report


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cp2_with_experts_matches_one_process_in_loss_balancing_loss_and_gradients(dtype):
    """The balancing loss is that of the whole micro-batch on every rank (not of the rank's tokens),
    and its gradient comes out right after the CP gradient average."""
    tolerance = TOLERANCE[dtype]
    for report in run_on_ranks(_cp_with_experts_matches_one_process, 2, dtype):
        for name, pack in report.items():
            want, got = pack["loss"]
            assert got == pytest.approx(want, rel=tolerance), name
            want_aux, got_aux = pack["aux"]
            assert len(want_aux) == 2 * MOE_CONFIG.num_layers and got_aux == pytest.approx(want_aux, rel=tolerance)
            assert pack["grad"]["layers.0.generator.mlp.router.weight"] <= tolerance, name
            assert worst(pack["grad"])[1] <= tolerance, (name, worst(pack["grad"]))


# Sequence parallelism inside context parallelism: 8 query / 4 KV heads so that TP=2 x CP=2 still
# splits the KV heads; experts in both towers (FFN units split over TP, balancing loss over CP).
SP_CP_CONFIG = tiny_mot_config(
    num_attention_heads=8, num_kv_heads=4, num_experts=4, moe_top_k=2, moe_ffn_hidden_size=16, moe_aux_loss_weight=0.1
)


def _sp_times_cp_matches_one_process(rank, world_size):
    from megatron_cosmos3.model.moe import MoEMLP
    from megatron_cosmos3.parallel.context_parallel import SequenceSplit, split_losses
    from megatron_cosmos3.parallel.data_parallel import reduce_replicated_gradients
    from megatron_cosmos3.parallel.state import destroy_parallel, initialize_parallel
    from megatron_cosmos3.parallel.tensor_parallel import apply_tensor_parallel, finalize_tensor_parallel_grads
    from megatron_cosmos3.testing.reference import compare_to_reference

    config = dataclasses.replace(SP_CP_CONFIG, attention_backend="dense")
    sizes = ParallelSizes(tensor=2, context=2, sequence_parallel=True)
    groups = initialize_parallel(sizes, config, config.num_experts)
    try:
        torch.manual_seed(0)
        reference = MoTModel(copy.deepcopy(config)).double()
        model = apply_tensor_parallel(copy.deepcopy(reference), groups)
        split = SequenceSplit(groups.tensor_and_context, context=groups.context, sequence_parallel=True)
        report = {}
        g = torch.Generator().manual_seed(3)
        packs = [("random", *noised(random_pack(config, g, num_samples=5), g))]
        packs += [(f"lengths{n}", *noised(pack_from_lengths(config, n, g), g)) for n in EDGE_LENGTHS[:2]]
        for name, batch, targets in packs:
            for m in (reference, model):
                m.zero_grad(set_to_none=True)
            want = mot_losses(reference, batch, targets)
            want.total.backward()
            got = split_losses(model, batch, targets, split)
            got.total.backward()
            reduce_replicated_gradients(model.parameters(), groups.data_and_context)
            finalize_tensor_parallel_grads(model, groups)
            aux = [[float(m.aux_loss) for m in net.modules() if isinstance(m, MoEMLP)] for net in (reference, model)]
            report[name] = {
                "loss": (want.total.item(), got.total.item()),
                "aux": aux,
                "grad": compare_to_reference(model, reference, groups.tensor_rank, sizes.tensor),
            }
        return report
    finally:
        destroy_parallel()


@pytest.mark.multiprocess
def test_sequence_parallel_inside_context_parallel_matches_one_process():
    """TP=2 with SP x CP=2 on 4 ranks: each rank holds a quarter of each stream's rows; fp64, exact."""
    for report in run_on_ranks(_sp_times_cp_matches_one_process, 4):
        for name, pack in report.items():
            want, got = pack["loss"]
            assert got == pytest.approx(want, rel=1e-10), name
            assert pack["aux"][1] == pytest.approx(pack["aux"][0], rel=1e-10), name
            assert worst(pack["grad"])[1] <= 1e-10, (name, worst(pack["grad"]))
