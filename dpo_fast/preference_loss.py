"""Preference losses of the DPO family, from per-sequence log-probs to a loss and TRL's metrics.

Data flow: validate -> spec -> dispatch.

* **validate**: the loss options once, when a :class:`PreferenceLossSpec` is built (reusable
  across calls); the tensors on every call (``dpo_fast.checks``);
* **dispatch** (``dpo_fast.registry``) to a backend:

  * ``"triton"``: the ``dpo_fast::preference_loss_forward_triton`` / ``..._backward_triton``
    operators (``dpo_fast.ops.preference_loss``, kernels in ``kernels/preference_loss.py``),
    one launch forward (loss, rewards and all metrics) and one backward;
  * ``"torch"``: ``dpo_fast.formulas.preference_losses``, differentiated by autograd. It is
    also THE reference: the tests run it in float64 and compare it with TRL itself.

Nothing reads a value on the host except the eager check of the token counts' values, so the
op traces with ``torch.compile(fullgraph=True)`` and captures in CUDA graphs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import formulas, registry
from .checks import check_loss_options, check_loss_types, check_preference_inputs, check_reward_kind
from .ops import preference_loss as preference_loss_op


class PreferenceLossOutput(NamedTuple):
    """What :func:`preference_loss` returns.

    Attributes:
        loss: fp32, ``()`` (``(P,)`` with ``reduction="none"``); differentiable w.r.t. the
            policy log-probs (and ``chosen_nll``).
        chosen_rewards, rejected_rewards: fp32 ``(P,)``, detached: ``beta`` times the
            log-ratio (reference-based losses), the summed policy log-prob (``cpo``) or the
            mean token log-prob (``simpo``, ``orpo``), as TRL's trainers define them.
        metrics: ``{name: fp32 ()}`` with TRL's names, each a mean over the pairs:
            ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
            ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; plus ``nll_loss`` when
            ``chosen_nll`` is given and ``log_odds_ratio``, ``log_odds_chosen`` for ``orpo``.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor]


class PreferenceLossInputs(NamedTuple):
    """The validated tensors of one :func:`preference_loss` call, as the backends take them
    (``dpo_fast.formulas.preference_losses``, ``dpo_fast.ops.preference_loss``).

    Attributes:
        chosen, rejected: ``(P,)`` policy log-probs (differentiable).
        ref_chosen, ref_rejected: ``(P,)`` reference log-probs, or None (reference-free).
        chosen_lengths, rejected_lengths: ``(P,)`` token counts (any real dtype), or None.
        chosen_nll: ``(P,)`` (a batch scalar expanded), or None.
        bco_delta: ``bco_pair``'s shift: the spec's float or a per-call 0-dim tensor (detached).
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    chosen_nll: torch.Tensor | None
    bco_delta: float | torch.Tensor


@dataclass(frozen=True)
class PreferenceLossSpec:
    """The options of a preference loss, validated once; pass it as ``preference_loss(..., spec=)``.

    The fields are :func:`preference_loss`'s keywords of the same names, with its defaults.
    Building a spec checks them (``ValueError`` / ``TypeError`` naming the option) and
    normalizes them: ``loss_type`` becomes a tuple of distinct names and ``loss_weights`` a
    tuple of their weights (a type listed twice gets the sum of its weights); ``rewards`` is
    derived (``dpo_fast.constants.REWARD_KINDS``). A spec is immutable and hashable.

    Example::

        spec = PreferenceLossSpec(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1], beta=0.2)
        out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths=lc,
                              rejected_lengths=lr, spec=spec)
    """

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    reduction: str = "mean"
    bco_delta: float = 0.0
    rewards: str = field(init=False)

    def __post_init__(self) -> None:
        weights = check_loss_types(self.loss_type, self.loss_weights)
        options = {
            "beta": self.beta,
            "label_smoothing": self.label_smoothing,
            "f_divergence": self.f_divergence,
            "f_alpha": self.f_alpha,
            "discopop_tau": self.discopop_tau,
            "simpo_gamma": self.simpo_gamma,
            "reduction": self.reduction,
            "bco_delta": self.bco_delta,
        }
        check_loss_options(weights, **options)
        normalized = {
            "loss_type": tuple(weights),
            "loss_weights": tuple(weights.values()),
            **{name: float(value) for name, value in options.items() if not isinstance(value, str)},
            "rewards": check_reward_kind(weights),
        }
        for name, value in normalized.items():
            object.__setattr__(self, name, value)  # a frozen dataclass sets its fields once, here


# The loss options preference_loss takes as keywords, with their defaults (those of the spec).
_OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PreferenceLossSpec) if f.init}


def _spec_for_call(spec: PreferenceLossSpec | None, options: dict) -> PreferenceLossSpec:
    """``spec``, or a spec built from the keyword options; never both."""
    if spec is None:
        if isinstance(options["bco_delta"], torch.Tensor):  # a per-call value, checked with the tensors
            options = {**options, "bco_delta": 0.0}
        return PreferenceLossSpec(**options)
    if not isinstance(spec, PreferenceLossSpec):
        raise TypeError(f"spec must be a PreferenceLossSpec, got {type(spec).__name__}")
    given = []
    for name, value in options.items():
        if isinstance(value, torch.Tensor):  # bco_delta: a per-call value, unless the spec has its own
            if spec.bco_delta != 0.0:
                given.append(name)
        elif value != _OPTION_DEFAULTS[name]:
            given.append(name)
    if given:
        raise ValueError(
            f"pass the loss options in spec or as keywords, not both: got spec and {given} "
            "(a 0-dim tensor bco_delta goes with a spec whose bco_delta is 0)"
        )
    return spec


def _select_metrics(stats: dict[str, torch.Tensor], spec: PreferenceLossSpec, has_nll: bool):
    """The metrics this call reports (TRL's trainers report ORPO's and the NLL only with them)."""
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    names += ["logps/chosen", "logps/rejected"]
    if has_nll:
        names.append("nll_loss")
    if "orpo" in spec.loss_type:
        names += ["log_odds_ratio", "log_odds_chosen"]
    return {name: stats[name] for name in names}


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    reduction: str = "mean",
    chosen_nll: torch.Tensor | None = None,
    bco_delta: float | torch.Tensor = 0.0,
    backend: str = "auto",
    spec: PreferenceLossSpec | None = None,
) -> PreferenceLossOutput:
    """Preference loss of the DPO family from per-sequence log-probs, with TRL's metrics.

    The formulas are TRL 1.16's (``DPOTrainer`` for the DPO family, ``CPOTrainer`` for
    ``cpo``/``simpo``, ``ORPOTrainer`` for ``orpo``), computed in fp32 whatever the inputs'
    dtype (the torch backend computes float64 inputs in float64: the tests' oracle).
    Gradients flow to ``chosen_logps``, ``rejected_logps`` and ``chosen_nll`` only; the
    references and lengths are constants. Every loss value and gradient is finite for finite
    inputs (see ``f_divergence`` and ``orpo`` for the two bounds that take).

    Args:
        chosen_logps, rejected_logps: ``(P,)`` float16/bfloat16/float32/float64 summed
            log-probs of the chosen / rejected completions (sums over completion tokens).
        ref_chosen_logps, ref_rejected_logps: ``(P,)`` the reference model's; required by every
            loss except the reference-free ``simpo``, ``cpo``, ``orpo`` (which reject them)
            and ``sft``.
        loss_type: one of :data:`LOSS_TYPES` or a list of them (TRL's MPO-style mixture, e.g.
            ``["sigmoid", "bco_pair", "sft"]``): the loss is the weighted sum of the types'
            losses.

            * ``sigmoid``: DPO; with ``label_smoothing > 0`` it is cDPO (TRL <= 0.28, OpenRLHF).
            * ``hinge``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``,
              ``apo_zero``, ``apo_down``, ``discopop``: as TRL.
            * ``ipo``, ``sigmoid_norm``: scores divided by the completion token counts.
            * ``aot``, ``aot_unpaired``: sort log-ratios across the batch. The sort runs in
              PyTorch (it couples the pairs); with ``reduction="none"`` their per-pair values
              are per sorted position, not per pair.
            * ``sft``: TRL's token-mean NLL of the chosen completions,
              ``-sum(chosen_logps) / sum(chosen_lengths)``; per pair (``reduction="none"``)
              ``-chosen_logps_i * P / sum(chosen_lengths)``, whose mean is that.
            * ``simpo``: reference-free, on mean token log-probs, margin ``simpo_gamma``.
            * ``cpo``: reference-free DPO on summed log-probs (TRL's CPOTrainer with
              ``loss_type="sigmoid"``), plus ``chosen_nll`` when given (scale it by
              ``cpo_alpha`` yourself; TRL's default is 1).
            * ``orpo``: ``chosen_nll - beta * logsigmoid(log odds ratio)`` of the mean token
              log-probs; needs ``chosen_nll``. Mean log-probs above ``-1e-30`` count as
              ``-1e-30`` (``dpo_fast.formulas.ORPO_MAX_LOGP``, the gradient passing through):
              a log-prob of 0 gives the finite limits of the loss and gradient.
        loss_weights: one weight per entry of ``loss_type`` (default 1 each).
        beta: > 0.
        label_smoothing: in [0, 1]: cDPO's for ``sigmoid``, ``cpo``, ``simpo``, ``aot``,
            ``aot_unpaired``; the flip rate for ``robust`` (< 0.5); EXO's epsilon for
            ``exo_pair`` (> 0). Ignored by the other types.
        chosen_lengths, rejected_lengths: ``(P,)`` integer or float completion token counts
            (both or neither; >= 0, checked eagerly); required by ``ipo``, ``sigmoid_norm``,
            ``simpo``, ``orpo`` and ``sft``. Counts of 0 clamp to 1, as TRL does.
        f_divergence: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence`` or
            ``alpha_divergence`` (f-DPO; only with ``sigmoid``, ``sigmoid_norm``, ``hinge``,
            ``ipo``, ``exo_pair``, ``robust``, ``discopop``, ``sft``, as TRL). The forward KL's
            and alpha divergence's scores grow exponentially in the log-ratio: their exponent
            is clamped so that ``|f'| <= 1e15`` (``dpo_fast.formulas.SCORE_BOUND``), which keeps
            IPO's square finite (TRL clamps the alpha divergence's exponent; its forward KL
            overflows).
        f_alpha: the alpha of ``alpha_divergence`` (|alpha - 1| < 1e-6 is the reverse KL).
        discopop_tau: DiscoPOP's temperature (> 0).
        simpo_gamma: SimPO's target reward margin.
        reduction: ``"mean"`` over pairs (TRL), ``"sum"`` or ``"none"`` (per pair).
        chosen_nll: ``()`` or ``(P,)`` float: the chosen completions' NLL (TRL's ``nll_loss``,
            a token-mean cross-entropy). Required by ``orpo``, optional for ``cpo``, rejected
            otherwise. It adds to the loss once per ``orpo``/``cpo`` entry.
        bco_delta: ``bco_pair``'s reward shift delta, a float or a 0-dim tensor:
            ``-logsigmoid(beta x_c - delta) - logsigmoid(-(beta x_r - delta))``. TRL 1.16 uses
            none (0, the default); TRL <= 0.2x shifted by a running mean of the rewards: keep
            that mean yourself (e.g. on the device) and pass it here, also with a ``spec``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``dpo_fast.registry``; there is
            no ``"cpp"`` loss: ``"auto"`` on CPU is the PyTorch backend).
        spec: a :class:`PreferenceLossSpec` holding ``loss_type`` ... ``bco_delta`` (a float),
            validated when it was built; then leave those keywords at their defaults.

    Returns:
        :class:`PreferenceLossOutput` ``(loss, chosen_rewards, rejected_rewards, metrics)``,
        fp32 (float64 from the torch backend on float64 inputs).
        Rewards are ``beta`` times the log-ratio for the DPO family, the summed policy
        log-prob for ``cpo``, the mean token log-prob for ``simpo``/``orpo`` (TRL's trainers);
        a mixture must combine losses of one such kind (``sft`` goes with any).

    Raises:
        ValueError / TypeError: naming the argument, what it got and what was expected.
    """
    options = {
        "loss_type": loss_type,
        "loss_weights": loss_weights,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "f_divergence": f_divergence,
        "f_alpha": f_alpha,
        "discopop_tau": discopop_tau,
        "simpo_gamma": simpo_gamma,
        "reduction": reduction,
        "bco_delta": bco_delta,
    }
    spec = _spec_for_call(spec, options)
    inputs = PreferenceLossInputs(
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
        chosen_nll,
        bco_delta,
    )
    check_preference_inputs(inputs, spec.loss_type, spec.rewards)
    inputs = inputs._replace(
        # a stride-0 view of a batch scalar; autograd sums its gradient back
        chosen_nll=None if chosen_nll is None else chosen_nll.expand(chosen_logps.shape),
        bco_delta=bco_delta.detach() if isinstance(bco_delta, torch.Tensor) else spec.bco_delta,
    )
    if registry.resolve("preference_loss", backend, chosen_logps.device.type) == "triton":
        loss, chosen_rewards, rejected_rewards, stats = preference_loss_op.triton_preference_loss(
            inputs, spec
        )
    else:
        loss, chosen_rewards, rejected_rewards, stats = formulas.preference_losses(inputs, spec)
    return PreferenceLossOutput(
        loss, chosen_rewards, rejected_rewards, _select_metrics(stats, spec, chosen_nll is not None)
    )
