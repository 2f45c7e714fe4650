"""Parity with an independent implementation: TRL's trainers, one per method.

TRL tokenises and collates its own batch; the same token ids go through this package's step with
the same tiny model (the policy perturbed away from the reference, so log-ratios are not zero).
Losses, rewards, log-probs, gradients and one optimizer step must agree by the rounding rule of
``helpers``: CPO, ORPO and SimPO run in float64 on both sides; TRL's DPO and KTO compute their
log-probs with a fused float32 output head whatever the model's dtype, so there TRL runs in float32
and this package in float64, and TRL's values are held to the float32 rule around ours. Where TRL's
definition differs on purpose, the documented mapping is tested: the margin (TRL's absolute
``simpo_gamma`` = β · ``gamma_beta_ratio``), IPO's
logged rewards (TRL: β times the summed log-ratio; here: of the averaged one, which the loss
uses) and ORPO's NLL term (TRL: over prompt and response; here: over the response, as the paper).
"""

import copy
import os

import pytest
import torch
import trl  # noqa: F401  (a test dependency: without it these tests fail instead of skipping)

from simpo_lightning.data.batch import PairBatch, Sequences, UnpairedBatch, mismatched
from simpo_lightning.methods.preference import LossConfig, SimPOModule
from simpo_lightning.models.loading import PolicyConfig
from simpo_lightning.scoring.logprobs import IGNORE_INDEX
from simpo_lightning.scoring.sequences import score_sequences

from helpers import rounding_bound

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROWS = [
    {
        "prompt": "Question: what is the capital of France?\nAnswer:",
        "chosen": " Paris",
        "rejected": " The capital is Rome, I think.",
    },
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
    {"prompt": "Name a colour:", "chosen": " blue, like the sky", "rejected": " seven"},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5 or maybe 22"},
]
VOCAB = 49152  # SmolLM2's vocabulary: the longest reduction (the log-softmax)


def agree(ours, theirs, dtype: torch.dtype, scale: float | None = None, what: str = "") -> None:
    """The rounding rule (helpers) for a value derived from log-probs of magnitude ``scale`` (default: its own)."""
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    scale = scale if scale is not None else max(ours.abs().max().item(), theirs.abs().max().item())
    error = (ours - theirs).abs().max().item()
    assert error <= rounding_bound(scale, VOCAB, dtype), f"{what}: {ours} against TRL's {theirs}"


def dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def ours(tiny_dir, seed: int = 1, **loss) -> SimPOModule:
    """Our module with the policy perturbed away from the tiny model (which stays the reference)."""
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=None, loss=LossConfig(**loss))
    module.configure_model()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return module


def trl_models(module, tiny_dir, dtype: torch.dtype):
    """TRL's policy and reference in ``dtype``; ours becomes float64 (the reference of the rounding rule)."""
    from transformers import AutoModelForCausalLM

    policy = copy.deepcopy(module.model).train().to(dtype)
    module.model.double()
    return policy, AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)


def pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def from_chosen_rejected(batch, pad_token_id) -> PairBatch:
    """TRL's CPO/ORPO batches (separate chosen/rejected tensors) padded to one width."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    sides = [
        Sequences(
            pad_to(batch[f"{side}_input_ids"], length, pad_token_id),
            pad_to(batch[f"{side}_attention_mask"], length, 0),
            pad_to(batch[f"{side}_labels"], length, IGNORE_INDEX),
        )
        for side in ("chosen", "rejected")
    ]
    return PairBatch(*sides)


def from_completion_mask(batch, prefix: str = "") -> Sequences:
    """TRL's DPO/KTO batches (``input_ids`` with a ``completion_mask``) as our sequences."""
    labels = batch[f"{prefix}input_ids"].masked_fill(batch[f"{prefix}completion_mask"] == 0, IGNORE_INDEX)
    return Sequences(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], labels)


def halves(seqs: Sequences) -> PairBatch:
    """TRL's concatenated chosen-then-rejected rows as a pair batch."""
    n = len(seqs) // 2
    return PairBatch(seqs.rows(slice(0, n)), seqs.rows(slice(n, None)))


def assert_same_step(ours_model, ours_loss, trl_model, trl_loss, dtype: torch.dtype, relative: float = 0.0):
    """Same gradients, and the same weight update from one SGD step, by the rounding rule in TRL's ``dtype``
    plus ``relative`` times the gradient's size (for values TRL derives from rounded reference log-probs).
    The update also carries the rounding of w + Δw in TRL's weights."""
    ours_loss.backward()
    trl_loss.backward()
    theirs = dict(trl_model.named_parameters())
    before = {name: p.detach().clone() for name, p in ours_model.named_parameters()}
    bounds = {}
    for name, p in ours_model.named_parameters():
        assert p.grad is not None and theirs[name].grad.abs().max() > 0, name
        bounds[name] = rounding_bound(p.grad, VOCAB, dtype) + relative * p.grad.abs().max().item()
        error = (theirs[name].grad.double() - p.grad).abs().max().item()
        assert error <= bounds[name], f"gradient of {name}: error {error:.3g} > {bounds[name]:.3g}"
    lr = 0.1
    for model in (ours_model, trl_model):
        torch.optim.SGD(model.parameters(), lr=lr).step()
    for name, p in ours_model.named_parameters():
        ours_update, trl_update = p.detach() - before[name], theirs[name].detach().double() - before[name]
        assert trl_update.abs().max() > 0, name
        bound = lr * bounds[name] + 2 * torch.finfo(dtype).eps * before[name].abs().max().item()
        assert (ours_update - trl_update).abs().max() <= bound, name


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
PAIR_METRICS += ("logps/chosen", "logps/rejected")


def assert_cpo_parity(module, tiny_dir, tokenizer, args) -> None:
    """Our step against TRL's CPOTrainer (which runs SimPO and CPO) on its batch, both in float64."""
    from trl.experimental.cpo import CPOTrainer

    policy = trl_models(module, tiny_dir, torch.float64)[0]
    reference = CPOTrainer(model=policy, args=args, train_dataset=dataset(ROWS), processing_class=tokenizer)
    batch = next(iter(reference.get_train_dataloader()))
    trl_loss, trl_metrics = reference.get_batch_loss_metrics(reference.model, batch)
    loss, metrics = module.step(from_chosen_rejected(batch, tokenizer.pad_token_id))
    agree(loss, trl_loss.detach(), torch.float64, what="loss")
    for name in PAIR_METRICS:
        agree(metrics[name].mean(), trl_metrics[name], torch.float32, what=name)  # both log in float32
    assert_same_step(module.model, loss, reference.model, trl_loss, torch.float64)


@pytest.mark.parametrize(
    "beta, gamma_beta_ratio, sft_weight, label_smoothing", [(2.0, 0.5, 0.0, 0.0), (10.0, 0.3, 0.5, 0.1)]
)
def test_simpo_matches_trl_cpo_trainer(
    tiny_dir, tokenizer, tmp_path, beta, gamma_beta_ratio, sft_weight, label_smoothing
):
    from trl.experimental.cpo import CPOConfig

    module = ours(
        tiny_dir, beta=beta, gamma_beta_ratio=gamma_beta_ratio, sft_weight=sft_weight, label_smoothing=label_smoothing
    )
    args = CPOConfig(
        output_dir=str(tmp_path),
        loss_type="simpo",
        beta=beta,
        simpo_gamma=beta * gamma_beta_ratio,
        cpo_alpha=sft_weight,
        label_smoothing=label_smoothing,
        max_length=128,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
    )
    assert_cpo_parity(module, tiny_dir, tokenizer, args)


@pytest.mark.parametrize("label_smoothing, loss_type", [(0.0, "sigmoid"), (0.1, "sigmoid"), (0.0, "hinge")])
def test_cpo_matches_trl_cpo_trainer(tiny_dir, tokenizer, tmp_path, label_smoothing, loss_type):
    from trl.experimental.cpo import CPOConfig

    module = ours(tiny_dir, name="cpo", beta=0.5, label_smoothing=label_smoothing, loss_type=loss_type)
    args = CPOConfig(
        output_dir=str(tmp_path),
        loss_type=loss_type,
        beta=0.5,
        label_smoothing=label_smoothing,
        max_length=128,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
    )  # cpo_alpha 1.0
    assert module.sft_weight == args.cpo_alpha == 1.0
    assert_cpo_parity(module, tiny_dir, tokenizer, args)


def test_alphapo_matches_trl_cpo_trainer(tiny_dir, tokenizer, tmp_path):
    """TRL's loss_type "alphapo" is its SimPO with the reward reshaped by ``alpha`` and no NLL term; α ≠ 0."""
    from trl.experimental.cpo import CPOConfig

    module = ours(tiny_dir, name="alphapo", beta=2.0, gamma_beta_ratio=0.5, alphapo_alpha=0.25)
    args = CPOConfig(
        output_dir=str(tmp_path),
        loss_type="alphapo",
        alpha=0.25,
        beta=2.0,
        simpo_gamma=1.0,
        max_length=128,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
    )
    assert args.loss_type == "simpo" and args.cpo_alpha == 0.0 and module.sft_weight == 0.0
    assert_cpo_parity(module, tiny_dir, tokenizer, args)


def test_orpo_matches_trl_orpo_trainer(tiny_dir, tokenizer, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    module = ours(tiny_dir, name="orpo", beta=0.25)
    args = ORPOConfig(
        output_dir=str(tmp_path),
        beta=0.25,
        max_length=128,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
    )
    policy = trl_models(module, tiny_dir, torch.float64)[0]
    reference = ORPOTrainer(model=policy, args=args, train_dataset=dataset(ROWS), processing_class=tokenizer)
    batch = next(iter(reference.get_train_dataloader()))
    with torch.no_grad():
        trl_loss, trl_metrics = reference.get_batch_loss_metrics(reference.model, batch)
        loss, metrics = module.step(from_chosen_rejected(batch, tokenizer.pad_token_id))

    for name in PAIR_METRICS:
        agree(metrics[name].mean(), trl_metrics[name], torch.float32, what=name)  # both log in float32
    # The odds-ratio term agrees exactly; the NLL term differs by design: TRL's covers the prompt too.
    lengths = metrics["lengths/chosen"]
    our_nll = -(metrics["logps/chosen"] * lengths).sum() / lengths.sum()
    assert module.sft_weight == 1.0
    agree(
        loss - our_nll,
        trl_loss - trl_metrics["nll_loss"],
        torch.float32,
        scale=abs(trl_loss.item()),
        what="odds-ratio term",
    )  # logged nll: float32
    agree(metrics["loss"].mean(), -trl_metrics["log_odds_ratio"] * 0.25, torch.float32, what="loss")  # logged: float32

    # Gradients of the odds-ratio term alone.
    module.sft_weight = 0.0
    loss, _ = module.step(from_chosen_rejected(batch, tokenizer.pad_token_id))
    chosen, rejected = reference.concatenated_forward(reference.model, batch)[:2]
    trl_or = -reference.odds_ratio_loss(chosen, rejected)[0].mean()  # TRL casts the log-probs to float32 here
    assert_same_step(module.model, loss, reference.model, trl_or, torch.float32)


@pytest.mark.parametrize(
    "name, loss_type", [("dpo", "sigmoid"), ("dpo", "hinge"), ("ipo", "ipo"), ("lndpo", "sigmoid_norm")]
)
def test_dpo_and_ipo_match_trl_dpo_trainer(tiny_dir, tokenizer, tmp_path, name, loss_type):
    from trl import DPOConfig, DPOTrainer

    module = ours(tiny_dir, name=name, beta=0.5, **({"loss_type": loss_type} if name == "dpo" else {}))
    policy, ref = trl_models(module, tiny_dir, torch.float32)
    args = DPOConfig(
        output_dir=str(tmp_path),
        loss_type=[loss_type],
        beta=0.5,
        max_length=128,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
    )
    reference = DPOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=dataset(ROWS), processing_class=tokenizer
    )
    batch = next(iter(reference.get_train_dataloader()))
    trl_loss = reference.compute_loss(reference.model, batch)
    trl_metrics = {k: v[-1] for k, v in reference._metrics["train"].items()}
    seqs = from_completion_mask(batch)
    ours_batch = halves(seqs)
    # Our reference forward against TRL's; then TRL's reference log-probs go in through our precomputed-
    # reference input, so what follows compares the policy side alone.
    trl_ref = torch.cat(reference.compute_ref_log_probs(reference.ref_model, batch))
    ours_ref = module.reference.sum_logps(module.model, lambda model: score_sequences(model, seqs, module.chunk))
    agree(ours_ref, trl_ref, torch.float32, what="reference log-probs")
    ours_batch.ref_chosen_logps, ours_batch.ref_rejected_logps = trl_ref.chunk(2)
    loss, metrics = module.step(ours_batch)

    # Every value below derives from summed log-probs, whose size sets TRL's float32 rounding.
    scale = 0.5 * ours_ref.abs().max().item()
    agree(loss, trl_loss.detach(), torch.float32, scale, what="loss")
    assert abs(metrics["rewards/margins"]).max() > 1e-2  # the policy really differs from the reference
    if name in ("ipo", "lndpo"):  # TRL logs β times the summed log-ratio; ours, of the averaged one the loss uses
        for side in ("chosen", "rejected"):
            metrics[f"rewards/{side}"] = metrics[f"rewards/{side}"] * metrics[f"lengths/{side}"]
            metrics[f"logps/{side}"] = metrics[f"logps/{side}"] * metrics[f"lengths/{side}"]
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics["rewards/accuracies"] = (metrics["rewards/margins"] > 0).float()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        agree(
            metrics[key].mean(),
            trl_metrics[key],
            torch.float32,
            scale / 0.5 if key.startswith("logps") else scale,
            what=key,
        )
    assert metrics["rewards/accuracies"].mean().item() == trl_metrics["rewards/accuracies"]
    assert_same_step(module.model, loss, reference.model, trl_loss, torch.float32)


@pytest.mark.parametrize("seed", [9, 1])  # the KL estimate is 0.30 with seed 9, negative (clamped to 0) with seed 1
def test_kto_matches_trl_kto_trainer(tiny_dir, tokenizer, tmp_path, seed):
    """TRL's KTO on the unpaired form of ROWS (chosen desirable, rejected undesirable, in that order,
    one batch, so its +1 rotation of completions for the KL term is the same as ours).

    TRL computes every log-prob with its fused float32 output head, so its values are held to the
    float32 rounding rule of summed log-probs around ours in float64."""
    from trl import KTOConfig, KTOTrainer

    module = ours(tiny_dir, seed=seed, name="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    policy, ref = trl_models(module, tiny_dir, torch.float32)
    unpaired = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for side in ("chosen", "rejected")
        for r in ROWS
    ]
    args = KTOConfig(
        output_dir=str(tmp_path),
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=1.5,
        max_length=128,
        per_device_train_batch_size=len(unpaired),
        report_to="none",
        use_cpu=True,
    )
    reference = KTOTrainer(
        model=policy, ref_model=ref, args=args, train_dataset=dataset(unpaired), processing_class=tokenizer
    )
    batch = next(iter(reference.get_train_dataloader()))
    assert batch["label"].tolist() == [r["label"] for r in unpaired]
    trl_loss = reference.compute_loss(reference.model, batch)
    trl_metrics = {k: v[-1] for k, v in reference._metrics["train"].items()}

    seqs = from_completion_mask(batch)
    kl_seqs = mismatched(seqs, pad_token_id=tokenizer.pad_token_id)
    width = kl_seqs.input_ids.shape[1]
    assert torch.equal(kl_seqs.input_ids, batch["KL_input_ids"][:, :width])
    assert torch.equal(kl_seqs.labels, from_completion_mask(batch, "KL_").labels[:, :width])
    unpaired_batch = UnpairedBatch(seqs, batch["label"], kl_seqs)
    paired_batch = halves(seqs)
    with torch.no_grad():
        paired_loss, paired_metrics = module.step(paired_batch)
    loss, metrics = module.step(unpaired_batch)

    scale = 0.5 * metrics["logps/rejected"].abs().max().item()  # the size of β · summed log-probs
    agree(metrics["kl"], trl_metrics["kl"], torch.float32, scale, what="kl")
    assert metrics["kl"].item() > 0.1 if seed == 9 else metrics["kl"].item() == 0.0
    agree(loss, trl_loss.detach(), torch.float32, scale, what="loss")
    agree(paired_loss, loss.detach(), torch.float64, scale, what="paired against unpaired loss")
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
        key_scale = scale / 0.5 if key.startswith("logps") else scale
        agree(metrics[key].mean(), trl_metrics[key], torch.float32, key_scale, what=key)
        agree(paired_metrics[key].mean(), trl_metrics[key], torch.float32, key_scale, what=f"paired {key}")
    margin = metrics["rewards/chosen"].mean() - metrics["rewards/rejected"].mean()
    agree(margin, trl_metrics["rewards/margins"], torch.float32, scale, what="margin")
    # TRL's reference and KL log-probs (float32 sums) enter the gradient through σ'(β(ρ - z₀)), whose relative
    # change is at most β times the change of ρ - z₀: β · 2 · (the rounding bound of a summed log-prob).
    relative = 0.5 * 2 * rounding_bound(scale / 0.5, VOCAB)
    assert_same_step(module.model, loss, reference.model, trl_loss, torch.float32, relative)


@pytest.mark.parametrize("loss_type, correction", [("grpo", True), ("dr_grpo", True), ("dapo", True), ("dapo", False)])
def test_grpo_loss_and_gradients_match_trls(tiny_dir, tokenizer, tmp_path, loss_type, correction):
    """GRPOTrainer's ``_compute_loss`` and ours on the same completions, old and reference log-probs and
    advantages (ratios away from 1, some clipped; β 0.04, ε 0.2 / 0.28, temperature 0.7), with and without the
    KL's importance-ratio correction: the same loss and gradients. TRL in float32, ours in float64, held to
    the float32 rule."""
    from trl import GRPOConfig, GRPOTrainer

    from simpo_lightning.generation.sampling import SamplingConfig
    from simpo_lightning.methods import GRPOConfig as OurGRPOConfig
    from simpo_lightning.methods import GRPOModule, Rollout, UpdateConfig

    module = GRPOModule(
        policy=PolicyConfig(name_or_path=tiny_dir),
        lora=None,
        method=OurGRPOConfig(beta=0.04, loss_type=loss_type, kl_bias_correction=correction),
        update=UpdateConfig(epsilon=0.2, epsilon_high=0.28),
        sampling=SamplingConfig(n=2, temperature=0.7, max_new_tokens=6),
    )
    module.configure_model()
    policy = copy.deepcopy(module.model).train().float()
    module.model.double()
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        temperature=0.7, beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, report_to="none",
        use_cpu=True, bf16=False, use_bias_correction_kl=correction,
    )  # fmt: skip
    trl_trainer = GRPOTrainer(
        model=policy,
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=dataset([{"prompt": "Say hi."}] * 4),
        processing_class=tokenizer,
    )
    trl_trainer.current_gradient_accumulation_steps = 1
    generator = torch.Generator().manual_seed(0)
    prompt = tokenizer("Name a colour:")["input_ids"]
    completions = torch.randint(100, 5000, (4, 6), generator=generator)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5])
    completions = completions.masked_fill(mask == 0, tokenizer.pad_token_id)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    with torch.no_grad():
        current = module.logps(module.model, [prompt] * 4, completions, mask)
    old = (current + 0.3 * torch.randn(current.shape, generator=generator, dtype=torch.float64)) * mask
    ref = (current + 0.2 * torch.randn(current.shape, generator=generator, dtype=torch.float64)) * mask
    rewards = torch.zeros(4)
    rollout = Rollout(
        prompts=[prompt] * 4,
        completions=completions,
        mask=mask,
        ended=mask[:, -1].bool(),
        rewards=rewards,
        texts=[],
        advantages=advantages,
        old_logps=old,
        ref_logps=ref,
    )
    ours_loss, _ = module.micro_loss(rollout, torch.arange(4), sequences=4, tokens=float(mask.sum()))
    inputs = {
        "prompt_ids": torch.tensor([prompt] * 4),
        "prompt_mask": torch.ones(4, len(prompt), dtype=torch.long),
        "completion_ids": completions,
        "completion_mask": mask,
        "advantages": advantages.float(),
        "old_per_token_logps": old.float(),
        "ref_per_token_logps": ref.float(),
        "num_items_in_batch": mask.sum().float(),
    }
    trl_loss = trl_trainer._compute_loss(trl_trainer.model, inputs)
    # the loss is a sum of ratios exp(log π - log π_old): its rounding is that of log-probs of size max|log π|
    scale = current.abs().max().item()
    agree(ours_loss.detach(), trl_loss.detach(), torch.float32, scale=scale, what=f"{loss_type} loss")
    clipped = trl_trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert clipped > 0, "no ratio was clipped: the test would not see the clip"
    assert_same_step(module.model, ours_loss, trl_trainer.model, trl_loss, torch.float32)
