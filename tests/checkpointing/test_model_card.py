"""The model card of a checkpoint written outside a run, and what it carries from its source: the
origin a kdtune card names (so prune -> distill names the model it began with) and the license."""

from huggingface_hub import ModelCard, ModelCardData

from kdtune.checkpointing.model_card import write_model_card


def test_a_card_carries_its_sources_origin_and_license(tmp_path):
    source = tmp_path / "pruned"
    source.mkdir()
    data = ModelCardData(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0",
                         tags=["kdtune", "distillation"])
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# pruned\n").save(source / "README.md")
    out = tmp_path / "out"
    out.mkdir()
    write_model_card(out, final_name="epoch_1", run_dir=None, source_dir=source, source_config={})
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.library_name == "transformers" and "distillation" in card.data.tags
    assert "How it was made" not in card.text  # no run records outside a run


def test_without_a_kdtune_card_the_origin_is_the_sources_name_or_folder(tmp_path):
    source = tmp_path / "base"
    source.mkdir()
    (source / "README.md").write_text("# just a readme, no front matter\n")
    # a hub repository id is the card's base_model; a local folder is named in the text only
    for config, origin, base_model in (({"_name_or_path": "Qwen/Qwen2.5-0.5B"}, "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
                                       ({}, str(source.resolve()), None)):
        out = tmp_path / f"out{len(config)}"
        out.mkdir()
        write_model_card(out, final_name="step_3", run_dir=None, source_dir=source, source_config=config)
        card = ModelCard.load(out / "README.md")
        assert card.data.base_model == base_model and origin in card.text and card.data.license is None


def test_damaged_run_records_cost_the_card_its_story_not_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("kd_ratio: 0.5\n")
    (run / "run.json").write_text("{not json")
    source = tmp_path / "base"
    source.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    write_model_card(out, final_name="step_2", run_dir=run, source_dir=source, source_config={})
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and str(source.resolve()) in card.text and "How it was made" not in card.text
    assert "could not be read" in capsys.readouterr().err
