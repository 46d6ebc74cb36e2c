"""Structured pruning: nothing removed reproduces the model exactly; the importance scores equal a
float64 reference computed here on transformers' own modules; a pruned checkpoint (depth, heads,
MLP and hidden channels) gives transformers' logits in kdtune; pruning by importance keeps a trained
model better than removing the same layers blindly; bad targets are one error line, nothing written."""

import itertools
import json
import runpy

import pytest
import torch
import torch.nn.functional as F

import kdtune
from kdtune.checkpointing import HFCheckpointer, write_checkpoint
from kdtune.datasets import arithmetic_rows
from kdtune.errors import KDTuneError
from kdtune.pruning import calibration_batches, measure_importance, plan_pruning, prune_state_dict, pruned_config
from kdtune.pruning.structure import check_targets
from kdtune.training import read_metrics
from tests.cli_utils import REPO, run_kdtune
from tests.models.tiny import CONFIGS, make_checkpoint
from tests.recipes.conftest import base_overrides, kd_overrides, tiny_config

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
ENV = {"OMP_NUM_THREADS": "1"}


class Samples:
    """A dataset of token-id samples of different lengths (some shorter than the batch's longest)."""

    def __init__(self, vocab, lengths=(9, 14, 5, 11, 14, 7), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"tokens": self.rows[i]}


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64).eval()


def reference_importance(folder, dataset) -> dict:
    """The scores from their definitions, in float64, on transformers' modules, one sample at a time
    (so no padding is involved at all)."""
    model = hf_model(folder)
    cfg = model.config
    layers = model.model.layers
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sums = {"bi": torch.zeros(len(layers), dtype=torch.float64),
            "heads": torch.zeros(len(layers), cfg.num_attention_heads, dtype=torch.float64),
            "channels": torch.zeros(len(layers), cfg.intermediate_size, dtype=torch.float64),
            "hidden": torch.zeros(cfg.hidden_size, dtype=torch.float64)}
    hooks = []

    def add(key, index, value):  # a hook's side effect only: returning a value would replace the output
        sums[key][index] += value

    for i, layer in enumerate(layers):
        def block(module, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            add("bi", i, (1 - F.cosine_similarity(h_in[0], h_out[0], dim=-1)).sum())
        hooks.append(layer.register_forward_hook(block, with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(
            lambda m, a, o, i=i: add("heads", i, a[0][0].unflatten(-1, (-1, hd)).norm(dim=-1).sum(0))))
        hooks.append(layer.mlp.down_proj.register_forward_hook(
            lambda m, a, o, i=i: add("channels", i, a[0][0].abs().sum(0))))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(lambda m, a, o: add("hidden", slice(None), o[0].abs().sum(0))))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: add("hidden", slice(None), o[0].abs().sum(0))))
    tokens = 0
    losses = []
    with torch.no_grad():
        for sample in dataset.rows:
            ids = torch.tensor([sample])
            model(ids)
            tokens += len(sample)
        for h in hooks:
            h.remove()

        def lm_loss(m):
            total = count = 0
            for sample in dataset.rows:
                ids = torch.tensor([sample])
                logits = m(ids).logits[0, :-1]
                total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += len(sample) - 1
            return total / count

        base = lm_loss(model)
        all_layers = model.model.layers
        for i in range(len(all_layers)):
            model.model.layers = torch.nn.ModuleList(layer for j, layer in enumerate(all_layers) if j != i)
            losses.append(lm_loss(model) - base)
        model.model.layers = all_layers
    norms = 2 * len(layers) + 1
    return {"block_influence": sums["bi"] / tokens, "heads": sums["heads"] / tokens,
            "channels": sums["channels"] / tokens, "hidden": sums["hidden"] / (tokens * norms),
            "skip_loss": torch.tensor(losses, dtype=torch.float64), "base_loss": base}


@pytest.mark.parametrize("family", ["qwen3", "llama3_scaled"])
def test_importance_equals_a_float64_reference(family, tmp_path):
    folder = make_checkpoint(family, tmp_path / family)
    data = Samples(CONFIGS[family]["vocab_size"])
    model = kdtune.load_model(folder)
    got = measure_importance(model, calibration_batches(data, num_samples=6, batch_size=4, pad_id=0),
                             device=torch.device("cpu"), skip_loss=True, progress=False)
    want = reference_importance(folder, data)
    assert got.tokens == sum(len(r) for r in data.rows)
    for key in ("block_influence", "heads", "channels", "hidden", "skip_loss"):
        torch.testing.assert_close(getattr(got, key), want[key], rtol=1e-4, atol=1e-6, msg=key)
    assert got.base_loss == pytest.approx(want["base_loss"], rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "llama3_scaled", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"])
def test_a_pruned_checkpoint_gives_transformers_logits(family, tmp_path):
    folder = make_checkpoint(family, tmp_path / family)
    data = Samples(CONFIGS[family]["vocab_size"])
    checkpointer = HFCheckpointer(folder)
    args = checkpointer.model_args
    model = checkpointer.load_model()
    importance = measure_importance(model, calibration_batches(data, num_samples=6, batch_size=3, pad_id=0),
                                    device=torch.device("cpu"), progress=False)
    plan = plan_pruning(importance, args, remove=1, num_attention_heads=2, intermediate_size=48, hidden_size=40)
    out = write_checkpoint(tmp_path / "pruned", pruned_config(checkpointer.config, args, plan),
                           prune_state_dict(model.state_dict(), args, plan), source_dir=folder)
    pruned = kdtune.load_model(out)
    assert (pruned.args.num_layers, pruned.args.num_heads, pruned.args.num_kv_heads, pruned.args.hidden_size,
            pruned.args.intermediate_size, pruned.args.head_dim) == (args.num_layers - 1, 2, 1, 40, 48, args.head_dim)
    tokens = torch.tensor(data.rows[1:2] + data.rows[4:5])
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), hf_model(out)(tokens).logits.float(), atol=1e-5, rtol=1e-5)


def test_pruning_nothing_reproduces_the_model_exactly(world, tmp_path):
    out = tmp_path / "same"
    proc = run_kdtune("run", "prune", "--config", "tiny/prune", f"checkpoint_dir={world['teacher']}",
                      f"output_dir={out}", f"dataset.data_files={world['data']}", "num_layers_to_remove=0")
    assert proc.returncode == 0, proc.stderr
    tokens = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        assert torch.equal(kdtune.load_model(out)(tokens), kdtune.load_model(world["teacher"])(tokens))
    report = json.loads((out / "prune_report.json").read_text())
    assert report["parameters"]["before"] == report["parameters"]["after"]
    assert all(layer["kept"] for layer in report["layers"])


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A 4-layer model trained on arithmetic chats, and held-out rows to score pruned copies on."""
    root = tmp_path_factory.mktemp("trained")
    train = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
             for r in arithmetic_rows(2048, seed=3, max_digits=2)]
    held_out = [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
                for r in arithmetic_rows(64, split="test", seed=3, max_digits=2)]
    (root / "train.json").write_text(json.dumps(train))
    (root / "held_out.json").write_text(json.dumps(held_out))
    init = kdtune.checkpointing.write_random_checkpoint(tiny_config(4, 64, 4, 2), root / "init", seed=2)
    for f in world["tokenizer"].iterdir():
        (init / f.name).write_bytes(f.read_bytes())
    proc = run_kdtune("run", "full_finetune_single_device", "--config", "tiny/full_finetune_single_device",
                      f"output_dir={root / 'run'}", f"checkpointer.checkpoint_dir={init}",
                      f"dataset.data_files={root / 'train.json'}", "batch_size=32", "optimizer.lr=0.003",
                      "dataset.train_on_input=true", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert read_metrics(root / "run" / "metrics.jsonl")[-1]["loss"] < 2.0
    return root


def held_out_loss(folder, data_file) -> float:
    tok, model = kdtune.load_tokenizer(folder), kdtune.load_model(folder)
    total = count = 0
    for sample in kdtune.datasets.alpaca_dataset(tok, data_files=str(data_file), train_on_input=True):
        ids = torch.tensor([sample["tokens"]])
        with torch.no_grad():
            total += F.cross_entropy(model(ids)[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def test_pruning_by_importance_keeps_more_of_a_trained_model_than_blind_removal(trained):
    folder = trained / "run" / "epoch_1"
    checkpointer = HFCheckpointer(folder)
    args, model = checkpointer.model_args, checkpointer.load_model()
    tok = kdtune.load_tokenizer(folder)
    data = kdtune.datasets.alpaca_dataset(tok, data_files=str(trained / "train.json"), train_on_input=True)
    importance = measure_importance(model, calibration_batches(data, num_samples=128, batch_size=16,
                                                               pad_id=tok.pad_id),
                                    device=torch.device("cpu"), skip_loss=True, progress=False)

    def loss_keeping(layers):
        plan = plan_pruning(importance, args, remove=0)
        plan.kv_groups, plan.channels = [plan.kv_groups[i] for i in layers], [plan.channels[i] for i in layers]
        plan.layers = list(layers)
        out = write_checkpoint(trained / "pruned" / "_".join(map(str, layers)), pruned_config(checkpointer.config,
                               args, plan), prune_state_dict(model.state_dict(), args, plan), source_dir=folder)
        return held_out_loss(out, trained / "held_out.json")

    losses = {kept: loss_keeping(kept) for n in (2, 3) for kept in itertools.combinations(range(4), n)}
    for remove in (1, 2):
        # Removing `remove` layers at random: the expected loss is the mean over every choice.
        choices = [kept for kept in losses if len(kept) == 4 - remove]
        at_random = sum(losses[kept] for kept in choices) / len(choices)
        for method in ("block_influence", "skip_loss"):
            kept = tuple(plan_pruning(importance, args, remove=remove, layer_importance=method).layers)
            print(f"remove {remove}, {method}: keeps {kept}, held-out loss {losses[kept]:.3f}; at random "
                  f"{at_random:.3f}" + (f", every other layer {losses[(0, 2)]:.3f}" if remove == 2 else ""))
            assert losses[kept] < at_random


CASES = [
    (["num_layers_to_remove=3"], "num_layers_to_remove: the model has 3 layers; remove 0 to 2"),
    (["num_layers=0"], "num_layers: expected a positive integer"),
    (["num_layers=2", "num_layers_to_remove=1"], "give one of them"),
    (["num_attention_heads=3"], "num_attention_heads: 3 breaks the model's grouped-query attention"),
    (["num_attention_heads=8"], "num_attention_heads: 8 breaks"),
    (["intermediate_size=1000"], "intermediate_size: expected 1 to the model's 128"),
    (["hidden_size=0"], "hidden_size: expected a positive integer"),
    (["dataset.data_files={empty}"], "no samples"),
    (["layer_importance=random"], "layer_importance: expected one of block_influence, skip_loss"),
]


@pytest.mark.parametrize("overrides, fragment", CASES, ids=[c[1][:30] for c in CASES])
def test_bad_targets_are_one_line_and_write_nothing(overrides, fragment, world, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "out"
    main = runpy.run_path(str(REPO / "recipes" / "prune.py"))["main"]
    with pytest.raises(SystemExit) as stopped:
        main(["--config", "tiny/prune", f"checkpoint_dir={world['teacher']}", f"output_dir={out}",
              f"dataset.data_files={world['data']}", *(o.format(empty=empty) for o in overrides)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("kdtune: error: ") and fragment in err[0], err
    assert not out.exists()


def test_a_pruned_teacher_is_a_student_for_distillation(world, tmp_path):
    student = tmp_path / "student"
    proc = run_kdtune("run", "prune", "--config", "tiny/prune", f"checkpoint_dir={world['teacher']}",
                      f"output_dir={student}", f"dataset.data_files={world['data']}", "intermediate_size=64",
                      "layer_importance=skip_loss")
    assert proc.returncode == 0, proc.stderr
    assert "3 -> 2" in proc.stdout
    world = {**world, "student": student}
    proc = run_kdtune("run", "knowledge_distillation_single_device", "--config", "tiny/KD_full_single_device",
                      *kd_overrides(world, tmp_path / "kd"), "max_steps_per_epoch=2", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(read_metrics(tmp_path / "kd" / "metrics.jsonl")) == 2
    _ = base_overrides  # the same world as the recipe tests


def test_width_pruning_of_fused_projections_is_refused(tmp_path):
    args = HFCheckpointer(make_checkpoint("phi3", tmp_path / "phi3")).model_args
    with pytest.raises(KDTuneError, match="intermediate_size: width pruning of phi3's fused"):
        check_targets(args, intermediate_size=48)
    assert check_targets(args, num_layers_to_remove=1) == 1  # depth alone is fine
