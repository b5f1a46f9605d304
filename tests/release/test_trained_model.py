"""A checkpoint trained under TP=2 loads into one process and into TP=2 ranks, and exports to a
Hugging Face Qwen3-VL folder and to a release folder that give the same model and the same sample."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_cosmos3.checkpoint.safe_reader import MANIFEST, CheckpointCorruptError, file_record
from megatron_cosmos3.conversion import reasoner_logits
from megatron_cosmos3.conversion.mot_folder import load_mot_folder, save_mot_folder
from megatron_cosmos3.data.synthetic_packs import random_pack
from megatron_cosmos3.encoders.action_normalization import ActionStats, EmbodimentActionStats
from megatron_cosmos3.inference.denoising import sample_dm_tokens
from megatron_cosmos3.inference.solvers import SamplerConfig
from megatron_cosmos3.model.mot import MoTModel
from megatron_cosmos3.parallel.sizes import ParallelSizes
from megatron_cosmos3.release.convert_cli import main as convert
from megatron_cosmos3.release.export import write_hf_folder, write_release_folder
from megatron_cosmos3.release.trained import (
    CheckpointLoadError,
    IncompleteCheckpointError,
    find_checkpoint,
    load_trained_model,
)
from megatron_cosmos3.testing.distributed import run_on_ranks
from megatron_cosmos3.testing.numerics import child_environment
from megatron_cosmos3.testing.training import (
    TINY_MODEL,
    TINY_SYNTHETIC,
    TINY_VISION,
    TINY_VIT,
    tiny_mot_config,
    train_on_ranks,
)

# Every test here shares the checkpoint a module fixture trains on two forked ranks.
pytestmark = pytest.mark.multiprocess

STEPS = 1
CHARACTERS = "abcdefghij "


def write_tokenizer(folder: Path) -> Path:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|im_end|>": 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def write_action_stats(path: Path) -> ActionStats:
    arm = EmbodimentActionStats("single_arm", 100, [0.1 * i for i in range(19)], [1.0 + i for i in range(19)])
    stats = ActionStats({"single_arm": arm})
    stats.save(path)
    return stats


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model with a ViT and an embodiment its stage added, trained for 2 steps under TP=2,
    with a tokenizer and one dataset's action statistics in its config."""
    root = tmp_path_factory.mktemp("trained-tp2")
    tokenizer = write_tokenizer(root / "tokenizer")
    stats = write_action_stats(root / "robot_stats.json")
    (root / "data.yaml").write_text(
        "data:\n  datasets:\n    - name: robots\n      shards: [unused]\n"
        f"      action_stats: {root / 'robot_stats.json'}\n  tokenizer:\n    path: {tokenizer}\n"
    )
    train_on_ranks(
        2,
        "--config",
        str(root / "data.yaml"),
        *TINY_MODEL,
        *TINY_VIT,
        *TINY_SYNTHETIC,
        "parallel.tensor=2",
        f"steps={STEPS}",
        "optimizer.warmup_steps=1",
        "optimizer.micro_batches_per_step=1",
        "checkpoint.async_save=false",
        "tracking.enabled=false",
        "stage.new_embodiments.quadruped.action_dim=12",
        "stage.new_embodiments.quadruped.rate_hz=5.0",
        f"checkpoint.directory={root / 'checkpoints'}",
    )
    return root, stats, listing(root / "checkpoints")


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def trained(run):
    root, *_ = run
    return load_trained_model(root / "checkpoints")


@pytest.fixture(scope="module")
def release(run, trained):
    root, *_ = run
    return write_release_folder(trained, root / "release", max_shard_bytes=40_000)


def saved_global_tensors(step_folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model entries as whole tensors, consolidated by torch.distributed.checkpoint's
    own converter (an independent reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step_folder), str(tmp_path / "whole.pt"))
    state = torch.load(tmp_path / "whole.pt", weights_only=False)
    return {key[len("model/") :]: value for key, value in state.items() if key.startswith("model/")}


def test_loads_in_one_process_as_saved_under_tp2(run, trained, tmp_path):
    root, stats, before = run
    assert listing(root / "checkpoints") == before  # loading wrote nothing
    assert trained.step == STEPS and trained.source == root / "checkpoints" / f"step_{STEPS:08d}"
    assert trained.plan.groups is None and not torch.distributed.is_initialized()
    model = trained.model
    assert model.vision is not None and not model.training
    assert sorted(model.config.embodiments) == ["humanoid", "quadruped", "single_arm"]
    assert model.config.embodiments["quadruped"].action_dim == 12
    assert trained.config.data.tokenizer.path == str(root / "tokenizer")
    assert trained.action_stats == {"robots": stats}
    assert trained.tokenizer().encode("a b") == [2, 12, 3]
    assert trained.tasks == list(trained.config.synthetic.tasks)

    saved = saved_global_tensors(trained.source, tmp_path)
    params = dict(model.named_parameters())
    assert sorted(saved) == sorted(params)
    for name, param in params.items():
        assert torch.equal(param, saved[name].view(param.shape)), name
    # Control: training moved the weights away from their initialisation (the run's seed draws it).
    torch.manual_seed(trained.config.seed)
    fresh = MoTModel(model.config)
    assert not torch.equal(fresh.layers[0].generator.mlp.up_proj.weight, model.layers[0].generator.mlp.up_proj.weight)


def fixed_batch(config):
    """Samples with DM targets and pictures for the ViT: policy and image-to-video ones."""
    return random_pack(config, torch.Generator().manual_seed(3), 3, ("policy", "image_to_video"), pixels=True)


def sample(model, batch):
    return sample_dm_tokens(model, batch, SamplerConfig("euler", 3), seeds=[5 + i for i in range(batch.num_samples)])


# How long the plan's groups wait for a rank in ``_load_on_rank`` (megatron-core's default: 30 minutes).
PLAN_TIMEOUT_S = 7.0


def _load_on_rank(rank: int, world_size: int, path: str) -> tuple[dict, dict, float]:
    trained = load_trained_model(path, parallel=ParallelSizes(tensor=2), timeout_s=PLAN_TIMEOUT_S)
    assert trained.plan.groups is not None
    tensor_group = trained.plan.groups.tensor._get_backend(torch.device("cpu"))

    def split_dim(param):
        return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None

    held = {name: (p.detach().clone(), split_dim(p)) for name, p in trained.model.named_parameters()}
    return held, sample(trained.model, fixed_batch(trained.model.config)), tensor_group.options._timeout.total_seconds()


def test_loads_under_tp2_each_rank_its_shard(run, trained):
    """Each rank holds its shard and samples what one process does; the plan's groups wait the
    ``timeout_s`` given (they kept megatron-core's default of 30 minutes)."""
    root, *_ = run
    ranks = run_on_ranks(_load_on_rank, 2, str(root / "checkpoints"), timeout_s=120)
    whole = dict(trained.model.named_parameters())
    sharded = 0
    one_process = sample(trained.model, fixed_batch(trained.model.config))
    for rank, (held, generated, group_timeout_s) in enumerate(ranks):
        assert group_timeout_s == PLAN_TIMEOUT_S, rank
        # Generation under TP=2 gives the one-process sample (to float tolerance: sums split over ranks).
        for key, tokens in one_process.items():
            torch.testing.assert_close(generated[key], tokens, rtol=1e-4, atol=1e-5)
        assert sorted(held) == sorted(whole)
        for name, (local, dim) in held.items():
            want = whole[name] if dim is None else torch.chunk(whole[name], 2, dim=dim)[rank]
            sharded += dim is not None
            assert torch.equal(local, want), (rank, name)
    assert sharded > 0


def test_the_checkpoint_carries_the_action_statistics_it_trained_with(run):
    """Loading needs no dataset: the statistics saved in meta.json win over the file the config
    names, here re-measured after the run (and then gone), as a dataset's file changes or moves."""
    root, stats, _ = run
    file = root / "robot_stats.json"
    original = file.read_bytes()
    arm = EmbodimentActionStats("single_arm", 7, [0.0] * 19, [2.0] * 19)
    try:
        ActionStats({"single_arm": arm}).save(file)
        remeasured = load_trained_model(root / "checkpoints")
        file.unlink()
        moved = load_trained_model(root / "checkpoints")
    finally:
        file.write_bytes(original)
    assert remeasured.action_stats == moved.action_stats == {"robots": stats}


def test_loading_and_saving_in_one_process_print_no_torch_warning(run, tmp_path):
    """A fresh process without a process group (cosmos3-generate, cosmos3-eval, export, a one-rank
    run) loads the checkpoint and saves it again, synchronously and in the background, with nothing
    on stderr: torch warned at every save and load that it assumed one process."""
    root, _, _ = run
    script = textwrap.dedent(
        """
        import sys
        from megatron_cosmos3.checkpoint.checkpointer import Checkpointer
        from megatron_cosmos3.release.trained import load_trained_model

        model = load_trained_model(sys.argv[1]).model
        for step, background in ((1, False), (2, True)):
            checkpointer = Checkpointer(sys.argv[2], async_save=background)
            checkpointer.save(step, model, None, {}, {"step": step})
            checkpointer.wait()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(root / "checkpoints"), str(tmp_path / "again")],
        capture_output=True,
        text=True,
        env=child_environment(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "again" / "step_00000002").is_dir()
    assert "torch.distributed is disabled" not in result.stderr, result.stderr[-3000:]


def test_release_folder_gives_the_same_model_and_sample(run, trained, release):
    root, stats, _ = run
    again = load_trained_model(release)
    assert again.step == STEPS and again.source == release and again.is_release
    assert again.model.config == trained.model.config
    ours, theirs = dict(trained.model.named_parameters()), dict(again.model.named_parameters())
    assert sorted(ours) == sorted(theirs)
    for name, param in ours.items():
        assert torch.equal(param, theirs[name]), name
    assert again.action_stats == {"robots": stats}
    assert (release / "tokenizer.json").is_file() and again.tokenizer().encode("a b") == [2, 12, 3]

    batch = fixed_batch(trained.model.config)
    want, got = sample(trained.model, batch), sample(again.model, batch)
    assert sorted(want) == sorted(got) == sorted(batch.dm_tokens) and any(k.startswith("action/") for k in want)
    for key, tokens in want.items():
        assert torch.equal(tokens, got[key]), key
    # Control: a changed Generator weight changes the sample, so the comparison can fail.
    with torch.no_grad():
        again.model.layers[0].generator.mlp.up_proj.weight.add_(0.1)
    assert not torch.equal(want["video"], sample(again.model, batch)["video"])

    # The release's weights are an ordinary weights folder too.
    model, vision = load_mot_folder(release)
    assert torch.equal(model.embed_tokens.weight, trained.model.embed_tokens.weight)
    assert torch.equal(vision.vit.patch_embed.proj.weight, trained.model.vision.vit.patch_embed.proj.weight)


def hf_inputs() -> dict:
    """One prompt with an image (4 merged tokens of a 4x4 patch grid), as a Qwen3-VL processor gives it."""
    g = torch.Generator().manual_seed(0)
    image = TINY_VISION["image_token_id"]
    ids = torch.cat(
        [
            torch.randint(0, 50, (5,), generator=g),
            torch.tensor([TINY_VISION["vision_start_token_id"], *[image] * 4, TINY_VISION["vision_end_token_id"]]),
            torch.randint(0, 50, (4,), generator=g),
        ]
    )[None]
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == image).long(),
        pixel_values=torch.randn(16, 3 * 2 * 16 * 16, generator=g),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
    )


def test_hf_export_loads_in_transformers_with_the_reasoner_logits(run, trained, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    root, *_ = run
    out = write_hf_folder(trained, tmp_path / "hf")
    assert (out / "tokenizer.json").is_file()  # the run's tokenizer came along
    hf = Qwen3VLForConditionalGeneration.from_pretrained(str(out)).eval()
    inputs = hf_inputs()
    with torch.no_grad():
        want = hf(**inputs).logits
        got = reasoner_logits(trained.model, trained.model.vision, **inputs)
    scale = want.abs().max().item()
    assert scale > 0
    assert (got - want).abs().max().item() <= 1e-5 * max(scale, 1.0)


def test_command_line_exports_a_checkpoint_and_says_when_there_is_no_vit(run, tmp_path, capsys):
    root, *_ = run
    hf, release = tmp_path / "hf", tmp_path / "release"
    assert convert(["export", str(root / "checkpoints"), str(hf), "--release", str(release)]) == 0
    assert (hf / "config.json").is_file() and (release / "config.yaml").is_file()
    assert json.loads((release / "release.json").read_text())["step"] == STEPS

    # A weights folder as import writes it (model.yaml, safetensors, the tokenizer beside them), without a ViT.
    no_vit = save_mot_folder(MoTModel(tiny_mot_config()), None, tmp_path / "no-vit")
    shutil.copy(root / "tokenizer" / "tokenizer.json", no_vit)
    trained = load_trained_model(no_vit)
    assert trained.step is None and trained.model.vision is None
    assert trained.config.data.tokenizer.path == str(no_vit)
    assert convert(["export", str(no_vit), str(tmp_path / "hf2"), "--release", str(tmp_path / "release2")]) == 2
    assert "the run trained no ViT (model.vision is not set)" in capsys.readouterr().err
    assert (tmp_path / "release2" / "model.yaml").is_file()  # the release was written all the same


def rewrite_meta(folder: Path, meta: dict) -> None:
    """Replaces meta.json and its checksum record."""
    (folder / "meta.json").write_text(json.dumps(meta))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["meta.json"] = file_record(folder / "meta.json")
    (folder / MANIFEST).write_text(json.dumps(manifest))


def copy_step(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained.source, tmp_path / trained.source.name))


def test_named_errors(run, trained, release, tmp_path):
    root, *_ = run
    with pytest.raises(CheckpointLoadError, match=f"checkpoint path {tmp_path / 'nowhere'} does not exist"):
        load_trained_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointLoadError, match="is not a checkpoint: it has no .metadata, latest or model.yaml"):
        load_trained_model(tmp_path / "empty")

    # An incomplete save: the .partial folder itself, a folder holding only one, a step folder without meta.json.
    partial = Path(shutil.copytree(trained.source, tmp_path / "run" / f".step_{STEPS:08d}.partial"))
    with pytest.raises(IncompleteCheckpointError, match=r"is an incomplete save \(a .partial folder"):
        load_trained_model(partial)
    only_partial = rf"holds only an incomplete save \(\.step_{STEPS:08d}\.partial\)"
    with pytest.raises(IncompleteCheckpointError, match=only_partial):
        load_trained_model(tmp_path / "run")
    (partial / "meta.json").unlink()
    bare = partial.rename(tmp_path / "run" / f"step_{STEPS:08d}")
    with pytest.raises(IncompleteCheckpointError, match="has no meta.json: its save never committed"):
        find_checkpoint(bare)
    (tmp_path / "run" / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointLoadError, match="names step_00000009, which does not exist"):
        load_trained_model(tmp_path / "run")
    # Beside a committed checkpoint, a stale .partial folder is left alone (read-only), not swept as resume does.
    shutil.copytree(trained.source, tmp_path / "run2" / trained.source.name)
    (tmp_path / "run2" / "latest").write_text(trained.source.name)
    (tmp_path / "run2" / ".step_00000004.partial").mkdir()
    assert load_trained_model(tmp_path / "run2").source == tmp_path / "run2" / trained.source.name
    assert (tmp_path / "run2" / ".step_00000004.partial").is_dir()

    # A flipped byte in a weights file: the checksum names the file.
    damaged = copy_step(trained, tmp_path / "damaged")
    data = next(p for p in damaged.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match=f"file {data.name} .*does not match its sha256 checksum"):
        load_trained_model(damaged)
    damaged_release = Path(shutil.copytree(release, tmp_path / "damaged-release"))
    shard = next(damaged_release.glob("model*.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match=f"file {shard.name} does not match its sha256 checksum"):
        load_trained_model(damaged_release)

    # meta.json without the config, or with a bad one (its checksum updated, so only the config is wrong).
    no_config = copy_step(trained, tmp_path / "no-config")
    meta = json.loads((no_config / "meta.json").read_text())
    rewrite_meta(no_config, {k: v for k, v in meta.items() if k != "config"})
    with pytest.raises(CheckpointLoadError, match="meta.json has no 'config'"):
        load_trained_model(no_config)
    rewrite_meta(no_config, {**meta, "config": meta["config"].replace("hidden_size: 32", "hidden_size: -32", 1)})
    with pytest.raises(CheckpointLoadError, match=r"meta.json 'config': not a valid training config: .*hidden_size"):
        load_trained_model(no_config)
    # Sizes beyond any real model (model/config.py MODEL_SIZE_LIMITS): refused by name, nothing built.
    for key, value in (("num_layers", 10**9), ("vocab_size", 10**12), ("num_experts", 10**7)):
        crafted = re.sub(rf"(?m)^  {key}: .*$", f"  {key}: {value}", meta["config"], count=1)
        assert crafted != meta["config"], key
        rewrite_meta(no_config, {**meta, "config": crafted})
        with pytest.raises(
            CheckpointLoadError, match=rf"meta.json 'config': not a valid training config: .*{key}={value}"
        ):
            load_trained_model(no_config)
    no_config = Path(shutil.copytree(release, tmp_path / "no-config-release"))
    (no_config / "config.yaml").unlink()
    manifest = json.loads((no_config / MANIFEST).read_text())
    del manifest["files"]["config.yaml"]
    (no_config / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointLoadError, match="no-config-release: no config.yaml"):
        load_trained_model(no_config)


def test_a_pipeline_layout_without_the_deepstack_layers_on_the_first_chunk_is_refused_as_training_does(
    trained, tmp_path
):
    """Loading under ``parallel`` checks the layout as training does: a first pipeline chunk short
    of the ViT's DeepStack layers is the trainer's named error, before any group or model exists
    (the load skipped the check and built a model whose later stage never got the features)."""
    from omegaconf import OmegaConf

    from megatron_cosmos3.training.config import config_from_yaml

    uneven = ParallelSizes(pipeline=2, num_layers_in_first_pipeline_stage=1)
    # Control: the ViT as trained has one DeepStack set, which layer 0 on the first chunk takes: the
    # layout passes this check and is refused for the one process's world size.
    with pytest.raises(ValueError, match=r"world_size=1 is not divisible by tensor\*pipeline\*context"):
        load_trained_model(trained.source, parallel=uneven)
    folder = copy_step(trained, tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    config = OmegaConf.create(meta["config"])
    config.model.vision.deepstack_visual_indexes = [0, 1]  # layers 0 and 1: one chunk of 1 layer holds one
    rewrite_meta(folder, {**meta, "config": OmegaConf.to_yaml(config)})
    want = r"2 DeepStack feature sets join Reasoner layers 0..1, .* num_layers_in_first_pipeline_stage=1 gives it 1"
    with pytest.raises(ValueError, match=want):
        load_trained_model(folder, parallel=uneven)
    config.parallel = OmegaConf.structured(uneven)
    with pytest.raises(ValueError, match=want):  # the same error as the trainer's config load
        config_from_yaml(OmegaConf.to_yaml(config), "the crafted config")


def test_a_release_folder_without_its_checksums_is_refused(release, tmp_path):
    """Export always writes checksums.json; a release folder (its release.json says so) without one
    loaded with nothing verified, whatever its files had become."""
    crafted = Path(shutil.copytree(release, tmp_path / "release"))
    (crafted / MANIFEST).unlink()
    with pytest.raises(CheckpointLoadError, match=rf"release folder {crafted}: release.json but no {MANIFEST}"):
        load_trained_model(crafted)


def test_a_file_added_to_a_release_folder_is_refused_naming_it(release, tmp_path):
    """The loader reads the tokenizer's files from the folder: one added after the export (not in
    its checksums.json) would be read unverified, so the folder is refused naming it."""
    crafted = Path(shutil.copytree(release, tmp_path / "release"))
    load_trained_model(crafted)  # control: as exported
    # A model hub's or a person's documents beside the weights are never read: they may be there.
    (crafted / "README.md").write_text("# model card\n")
    (crafted / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    load_trained_model(crafted)
    (crafted / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointCorruptError, match=f"file tokenizer_config.json is not in its {MANIFEST}"):
        load_trained_model(crafted)


@pytest.mark.parametrize("field", ["data.tokenizer.path", "data.datasets[0].action_stats"])
@pytest.mark.parametrize("spelled", ["relative", "absolute"])
def test_a_release_config_naming_a_path_outside_the_folder_is_refused_by_field(release, tmp_path, field, spelled):
    """Export writes the tokenizer as "." and each dataset's statistics under action_stats/: a
    config.yaml naming a copy outside the folder by ``..`` or an absolute path (checksums resealed,
    as a crafted release would) loaded it without a word, unverified by the folder's checksums."""
    from omegaconf import OmegaConf

    from megatron_cosmos3.checkpoint.safe_reader import write_manifest

    crafted = Path(shutil.copytree(release, tmp_path / "release"))
    config = OmegaConf.load(crafted / "config.yaml")
    assert config.data.tokenizer.path == "." and config.data.datasets[0].action_stats.startswith("action_stats/")
    if field == "data.tokenizer.path":
        outside = tmp_path / "tokenizer"
        outside.mkdir()
        shutil.copy(crafted / "tokenizer.json", outside)
    else:
        outside = Path(shutil.copy(crafted / config.data.datasets[0].action_stats, tmp_path / "stats.json"))
    value = f"../{outside.name}" if spelled == "relative" else str(outside)
    OmegaConf.update(config, field, value)
    (crafted / "config.yaml").write_text(OmegaConf.to_yaml(config))
    files = sorted(str(p.relative_to(crafted)) for p in crafted.rglob("*") if p.is_file() and p.name != MANIFEST)
    write_manifest(crafted, extra=tuple(files))
    with pytest.raises(
        CheckpointLoadError, match=re.escape(f"{crafted / 'config.yaml'}: {field}={value!r} is not a path inside")
    ):
        load_trained_model(crafted)


def test_a_release_folder_missing_a_tensor_is_named_as_the_checkpoint_given(release, tmp_path):
    """The error names what the user passed (the commands' --checkpoint), not a training setting."""
    from megatron_cosmos3.checkpoint.checkpointer import MissingParametersError
    from megatron_cosmos3.conversion.safetensors_io import INDEX_FILE

    crafted = shutil.copytree(release, tmp_path / "release")
    index = json.loads((crafted / INDEX_FILE).read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    (crafted / INDEX_FILE).write_text(json.dumps(index))
    manifest = json.loads((crafted / MANIFEST).read_text())  # resealed: crafted, not damaged
    manifest["files"][INDEX_FILE] = file_record(crafted / INDEX_FILE)
    (crafted / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MissingParametersError, match=rf"^checkpoint={crafted}: the weights lack parameter '{dropped}'"):
        load_trained_model(crafted)


def test_a_release_folder_with_nan_weights_is_refused_naming_the_parameter(release, tmp_path):
    """Weights that can only generate NaN (a diverged run, a crafted file) are refused at load, and
    the commands print it as one line: NonFiniteWeightsError is one of LOAD_ERRORS."""
    from safetensors.torch import load_file, save_file

    from megatron_cosmos3.release.trained import LOAD_ERRORS, NonFiniteWeightsError

    crafted = shutil.copytree(release, tmp_path / "release")
    shard = sorted(crafted.glob("model*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    manifest = json.loads((crafted / MANIFEST).read_text())  # resealed: crafted, not damaged
    manifest["files"][shard.name] = file_record(shard)
    (crafted / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NonFiniteWeightsError, match=rf"^checkpoint={crafted}: parameter '{name}' holds NaN or inf"):
        load_trained_model(crafted)
    assert issubclass(NonFiniteWeightsError, LOAD_ERRORS)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"[" * 100_000, r"not JSON \(nested deeper than the parser reads\)"),  # was a raw RecursionError
        (b'{"step": 1' + b"0" * 5000 + b"}", r"step=<an integer of 5001 digits> is not a number"),
        (b'{"step": 1}\xff', r"not UTF-8 text"),
    ],
)
def test_a_release_json_that_is_not_json_is_named(tmp_path, data, message):
    (tmp_path / "model.yaml").write_text("model: {}\n")
    (tmp_path / "release.json").write_bytes(data)
    with pytest.raises(CheckpointLoadError, match=rf"{tmp_path / 'release.json'}: {message}"):
        load_trained_model(tmp_path)
