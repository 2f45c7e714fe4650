"""Models: loading and building a policy and its tokenizer (``loading``), weight formats on the way in (``formats``:
GGUF, 8/4-bit), what a checkpoint holds as a model (``checkpoints``), sharding and bf16 (``parallel``), random
models for tests and benchmarks (``tiny``), and the export command (``export``)."""

from simpo_lightning.models.checkpoints import checkpoint_head, inference_policy, policy_from_checkpoint
from simpo_lightning.models.formats import QuantizationConfig
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, build_policy, load_tokenizer
from simpo_lightning.models.parallel import fast_bf16, shard
from simpo_lightning.models.tiny import TINY_ARCHITECTURE, save_random_model

__all__ = [
    "TINY_ARCHITECTURE",
    "LoraConfig",
    "PolicyConfig",
    "QuantizationConfig",
    "build_policy",
    "checkpoint_head",
    "fast_bf16",
    "inference_policy",
    "load_tokenizer",
    "policy_from_checkpoint",
    "save_random_model",
    "shard",
]
