"""The training recipes hold their own step, in plain sight, and the recipes that must train alike
keep the same loop line for line: a distributed recipe and its single-device twin differ only where
distribution differs (process group, sharding, saving), never in the step."""

import ast
import difflib

import pytest

from tests.cli_utils import REPO

TRAINING = ("full_finetune_single_device", "lora_finetune_single_device", "lora_finetune_distributed",
            "knowledge_distillation_single_device", "knowledge_distillation_distributed",
            "on_policy_distillation_single_device", "on_policy_distillation_distributed")
# Recipes whose loops (the training loop and the step's helper functions) must stay identical.
TWINS = [("knowledge_distillation_single_device", "knowledge_distillation_distributed"),
         ("lora_finetune_single_device", "lora_finetune_distributed"),
         ("on_policy_distillation_single_device", "on_policy_distillation_distributed"),
         ("full_finetune_single_device", "lora_finetune_single_device")]
# What every step shows: the forward, the loss, backward, clipping, the optimizer and schedule steps,
# logging and checkpointing.
STEP_CALLS = ("backward", "clip_grad_norm", "step", "zero_grad", "log_dict", "save", "state_dict")


def source(name: str) -> str:
    return (REPO / "recipes" / f"{name}.py").read_text()


def main_body(name: str) -> list[ast.stmt]:
    tree = ast.parse(source(name))
    (main,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    return main.body


def loop_parts(name: str) -> str:
    """The training loop (from the progress bar to the end) and the step's nested functions, as code."""
    body = main_body(name)
    functions = [ast.unparse(node) for node in body if isinstance(node, ast.FunctionDef)]
    start = next(i for i, node in enumerate(body) if "progress_bar" in ast.unparse(node))
    return "\n".join(functions + [ast.unparse(node) for node in body[start:]])


@pytest.mark.parametrize("single, twin", TWINS, ids=[f"{a}~{b}" for a, b in TWINS])
def test_twin_recipes_share_their_loop_line_for_line(single, twin):
    a, b = loop_parts(single), loop_parts(twin)
    diff = "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), single, twin, lineterm=""))
    assert a == b, f"the loops of {single} and {twin} drifted apart:\n{diff}"


@pytest.mark.parametrize("name", TRAINING)
def test_each_training_recipe_shows_its_step(name):
    loop = next(node for node in main_body(name) if isinstance(node, ast.While))
    called = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
              for node in ast.walk(loop) if isinstance(node, ast.Call)}
    missing = [call for call in STEP_CALLS if call not in called]
    assert not missing, f"{name}: its loop does not call {missing}"
    code = ast.unparse(loop)
    assert "kd_ratio" not in code or "(1 - kd_ratio) * ce + kd_ratio * kd_term" in code  # the mix, in sight
    assert len(source(name).splitlines()) <= 300


def test_the_recipes_use_no_hidden_trainer():
    for name in TRAINING:
        text = source(name)
        for gone in ("build_loop", "TrainLoop", "Objective"):
            assert gone not in text, (name, gone)
