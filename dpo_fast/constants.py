"""The names every layer agrees on: statistics, layouts, loss types, backends.

They live below every other module (``checks`` validates against them, the ops, the public
functions and the integrations use them), so importing them never creates a cycle.
"""

from __future__ import annotations

# Optional per-token statistics, shared with TRL's fused LM head protocol.
STAT_NAMES = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")

# How a preference batch is laid out (see dpo_fast.collate).
LAYOUTS = ("padded", "packed", "prefix_shared")
# The [R, L] tensors of a packed / prefix-shared batch.
BLOCK_KEYS = ("input_ids", "position_ids", "doc_ids", "branch_ids", "sequence_ids")
BRANCH_PROMPT, BRANCH_CHOSEN, BRANCH_REJECTED = 0, 1, 2

# Preference losses (TRL 1.16's DPOTrainer, CPOTrainer and ORPOTrainer formulas).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
    "simpo",
    "cpo",
    "orpo",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Losses whose f-divergence generalization is valid (TRL's list): the others need reverse_kl.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# Losses that see no reference model (as TRL's CPOTrainer / ORPOTrainer and its "sft").
REFERENCE_FREE = frozenset({"simpo", "cpo", "orpo", "sft"})
# Losses that read the completion token counts.
NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo", "sft"})
# What the rewards are made of: beta * (policy - reference), beta * policy sum, beta * policy mean.
REWARD_KINDS = ("log_ratio", "policy_sum", "policy_mean")
REDUCTIONS = ("mean", "sum", "none")

# Implementations: "auto" picks one per op and device (dpo_fast.registry).
BACKENDS = ("auto", "triton", "cpp", "torch")
BACKEND_ENV_VAR = "DPO_FAST_BACKEND"
