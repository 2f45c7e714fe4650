from simpo_lightning.data import PreferenceDataModule, demo


def test_demo_data(tokenizer):
    dm = PreferenceDataModule(tokenizer=tokenizer, cache_dir=None)
    dm.setup()
    train_questions = {tuple(p["prompt"]) for p in dm.splits["train"]}
    examples = dm.generation_examples("val")
    assert len(examples) == len(demo.rows("val")) // 2 and not train_questions & {tuple(p) for p, _ in examples}
    assert all(
        demo.exact_match(tokenizer.decode(p["chosen"], skip_special_tokens=True), p["reference"])
        for p in dm.splits["val"]
    )
    assert demo.exact_match(' "Paris." ', "paris") and not demo.exact_match("The capital is Paris.", "Paris")
