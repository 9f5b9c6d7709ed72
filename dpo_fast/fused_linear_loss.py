"""The whole preference head in one module: hidden states -> lm_head -> log-probs -> loss.

Data flow: ``dpo_fast.linear_sequence_logprobs`` turns the policy's hidden states into
per-sequence log-prob sums and token counts, tiling over tokens so no ``tokens x V`` logits
exist; the reference's come from precomputed values or from the same function under
``no_grad``; ``dpo_fast.preference_loss`` turns both into the loss, rewards and TRL's
metrics. Gradients reach the hidden states, the lm_head weight and its bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import registry
from .constants import REFERENCE_FREE
from .linear_logprobs import linear_sequence_logprobs
from .preference_loss import PreferenceLossSpec, preference_loss


class FusedLinearPreferenceAux(NamedTuple):
    """The second output of :class:`FusedLinearPreferenceLoss`; all detached.

    The first seven fields are in the order of Liger's ``LigerFusedLinearDPOLoss`` aux
    outputs, so code indexing those keeps working.

    Attributes:
        chosen_logps, rejected_logps: fp32 ``(P,)`` policy log-probs as the loss saw them
            (sums, or means with ``average_log_prob``).
        chosen_logits_mean, rejected_logits_mean: fp32 ``()`` mean logit over the scored
            tokens (TRL's ``logits/chosen``; Liger also counts padding positions).
        nll_loss: fp32 ``()`` token-mean NLL of the chosen completions.
        chosen_rewards, rejected_rewards: fp32 ``(P,)``, as ``dpo_fast.preference_loss``.
        metrics: TRL's metric names -> fp32 ``()``: those of ``preference_loss`` plus
            ``logits/chosen``, ``logits/rejected`` and ``nll_loss``.
        ref_chosen_logps, ref_rejected_logps: fp32 ``(P,)`` or None (reference-free): the
            reference log-probs used, e.g. to cache them for the next epoch.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_logits_mean: torch.Tensor
    rejected_logits_mean: torch.Tensor
    nll_loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor]
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None


def _check_reference_head(
    hidden: torch.Tensor, lin_weight: object, ref_hidden: object, ref_weight: object
) -> None:
    """``ref_hidden`` ``(2P, T, H')`` scores the policy's labels and ``ref_weight`` ``(V, H')`` the
    policy's vocabulary (the reference may have another hidden size)."""
    for name, tensor, like, like_name in (
        ("ref_hidden", ref_hidden, hidden, "hidden"),
        ("ref_weight", ref_weight, lin_weight, "lin_weight"),
    ):
        if tensor is None or not isinstance(like, torch.Tensor):
            continue  # absent (lin_weight itself is checked with the head)
        if not isinstance(tensor, torch.Tensor) or tensor.shape[:-1] != like.shape[:-1]:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"{name} must have the leading dims of {like_name} {tuple(like.shape[:-1])}, got {got}"
            )


class FusedLinearPreferenceLoss(torch.nn.Module):
    """Fused lm_head + preference loss for users who hold hidden states.

    A drop-in for Liger's ``LigerFusedLinearDPOLoss``: the same constructor keywords and
    ``forward`` argument order, chosen rows first then rejected rows. Unlike Liger it tiles
    over tokens (never holding a pair's fp32 log-softmax), skips prompt and padding tokens
    before the matmul, supports every loss of ``dpo_fast.preference_loss`` (IPO, mixtures,
    f-divergences, SimPO/CPO/ORPO) and accepts precomputed reference log-probs.

    Args:
        ignore_index: label value of positions that are not scored.
        beta, loss_type, loss_weights, label_smoothing, discopop_tau, simpo_gamma,
        f_divergence, f_alpha, bco_delta: as :func:`dpo_fast.preference_loss`.
        alpha, compute_nll_loss: add ``alpha * nll`` (the chosen completions' token-mean NLL)
            to the loss, as Liger (RPO-style for the DPO family). For ``cpo`` it is passed as
            the loss's ``chosen_nll``; ``orpo`` always includes ``alpha * nll`` (its
            definition, TRL's ORPO for ``alpha = 1``).
        use_ref_model: False means reference log-probs of 0 for losses that need them, and
            ``ref_hidden``/``ref_weight``/``ref_bias`` are ignored (Liger's convention);
            True (default) requires ``ref_hidden`` or ``ref_chosen_logps``/``ref_rejected_logps``.
        average_log_prob: feed mean token log-probs to the loss instead of sums (Liger's
            option; TRL's DPO sums). The loss then sees token counts of 1 (``ipo``,
            ``simpo``... do not normalize twice).
        shift: False (Liger's convention): ``hidden[:, t]`` scores ``labels[:, t]``; True (Hugging
            Face's): it scores ``labels[:, t + 1]``.
        temperature, softcap, logit_scale: the logit transform, as
            :func:`dpo_fast.linear_sequence_logprobs`.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"`` for the head; the loss resolves
            the same name among its own backends (``"cpp"`` there means ``"auto"``).
        compiled, chunk_size: Liger's; accepted so its users switch by changing one import,
            without effect (chunks are sized by memory, over tokens).
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        *,
        loss_weights: Sequence[float] | None = None,
        simpo_gamma: float = 0.5,
        f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5,
        bco_delta: float = 0.0,
        shift: bool = False,
        temperature: float = 1.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        del compiled, chunk_size  # Liger's knobs; see the class docstring
        # the loss options are validated here, once, into the spec every call uses
        self.spec = PreferenceLossSpec(
            loss_type=loss_type,
            loss_weights=loss_weights,
            beta=beta,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma,
            f_divergence=f_divergence,
            f_alpha=f_alpha,
            bco_delta=bco_delta,
        )
        self.loss_types = self.spec.loss_type
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.head_options = {
            "ignore_index": ignore_index,
            "shift": shift,
            "temperature": temperature,
            "softcap": softcap,
            "logit_scale": logit_scale,
        }
        # one backend runs both the head and the loss: one both implement (the loss has no C++ one;
        # "auto" runs the head's C++ kernels on CPU)
        shared = [
            b for b in registry.backends("linear_logprobs") if b in registry.backends("preference_loss")
        ]
        if backend not in ("auto", *shared):
            raise ValueError(f"backend must be one of {('auto', *shared)}, got {backend!r}")
        self.backend = backend

    def forward(
        self,
        lin_weight: torch.Tensor,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        *,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FusedLinearPreferenceAux]:
        """Loss of ``P`` pairs.

        Args:
            lin_weight: ``(V, H)`` lm_head weight.
            hidden: ``(2P, T, H)`` policy hidden states, the ``P`` chosen rows then the ``P``
                rejected rows.
            labels: ``(2P, T)`` integer; ``ignore_index`` for prompt and padding positions.
            bias: optional ``(V,)``.
            ref_hidden: ``(2P, T, H)`` reference hidden states, scored with ``ref_weight``
                and ``ref_bias`` (default: the policy's ``lin_weight`` and ``bias``, detached).
            ref_chosen_logps, ref_rejected_logps: ``(P,)`` precomputed reference log-probs
                (sums, or means with ``average_log_prob``), instead of ``ref_hidden``.

        Returns:
            ``(loss, aux)``: the fp32 scalar loss (mean over pairs) and a
            :class:`FusedLinearPreferenceAux`.
        """
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.dim() != 3
            or hidden.shape[0] % 2
            or not len(hidden)
        ):
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"hidden must be (2P, T, H) with chosen rows then rejected rows, got {shape}")
        _check_reference_head(hidden, lin_weight, ref_hidden, ref_weight)
        P = hidden.shape[0] // 2
        sums, counts, stats = linear_sequence_logprobs(
            hidden,
            lin_weight,
            labels,
            bias=bias,
            stats=("mean_logits",),
            backend=self.backend,
            **self.head_options,
        )
        refs = self._references(
            P,
            sums,
            lin_weight,
            bias,
            labels,
            ref_hidden,
            ref_weight,
            ref_bias,
            ref_chosen_logps,
            ref_rejected_logps,
        )
        lengths = counts.clamp(min=1)
        if self.average_log_prob:
            logps, lengths = sums / lengths, torch.ones_like(lengths)
        else:
            logps = sums
        nll = -sums[:P].sum() / counts[:P].sum().clamp(min=1)
        # orpo's definition holds the NLL; cpo takes it as its chosen_nll when asked for
        nll_inside = "orpo" in self.loss_types or ("cpo" in self.loss_types and self.compute_nll_loss)
        out = preference_loss(
            logps[:P],
            logps[P:],
            *refs,
            chosen_lengths=lengths[:P],
            rejected_lengths=lengths[P:],
            chosen_nll=self.alpha * nll if nll_inside else None,
            # the loss has no C++ backend: "cpp" picks the head's kernels only
            backend="auto" if self.backend == "cpp" else self.backend,
            spec=self.spec,
        )
        loss = out.loss
        if self.compute_nll_loss and not nll_inside:
            loss = loss + self.alpha * nll
        logits_sum = stats["mean_logits"].sum(-1)
        logits_mean = [
            logits_sum[s].sum() / counts[s].sum().clamp(min=1) for s in (slice(0, P), slice(P, None))
        ]
        nll = nll.detach()
        metrics = {
            **out.metrics,
            "logits/chosen": logits_mean[0],
            "logits/rejected": logits_mean[1],
            "nll_loss": nll,
        }
        detached = logps.detach()
        aux = FusedLinearPreferenceAux(
            detached[:P],
            detached[P:],
            logits_mean[0],
            logits_mean[1],
            nll,
            out.chosen_rewards,
            out.rejected_rewards,
            metrics,
            *(r.detach() if r is not None else None for r in refs),
        )
        return loss, aux

    def _references(
        self,
        P,
        sums,
        lin_weight,
        bias,
        labels,
        ref_hidden,
        ref_weight,
        ref_bias,
        ref_chosen_logps,
        ref_rejected_logps,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The reference log-probs: given, scored from ``ref_hidden``, zeros or None."""
        needs_ref = sorted(set(self.loss_types) - REFERENCE_FREE)
        if not self.use_ref_model:
            if ref_chosen_logps is not None or ref_rejected_logps is not None:
                raise ValueError(
                    "ref_chosen_logps/ref_rejected_logps were passed to a loss built with "
                    "use_ref_model=False; build it with use_ref_model=True to use them"
                )
            # Liger's convention: a reference of log-prob 0; ref_hidden and ref_weight are ignored
            zeros = torch.zeros_like(sums[:P])
            return (zeros, zeros) if needs_ref else (None, None)
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            if ref_hidden is not None:
                raise ValueError("pass ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
            return ref_chosen_logps, ref_rejected_logps
        if ref_hidden is not None:
            if ref_weight is None:
                ref_weight, ref_bias = lin_weight, bias
            with torch.no_grad():
                ref_sums, _, _ = linear_sequence_logprobs(
                    ref_hidden.detach(),
                    ref_weight.detach(),
                    labels,
                    bias=ref_bias.detach() if ref_bias is not None else None,
                    average=self.average_log_prob,
                    backend=self.backend,
                    **self.head_options,
                )
            return ref_sums[:P], ref_sums[P:]
        if not needs_ref:
            return None, None
        raise ValueError(
            f"{needs_ref} need reference log-probs: pass ref_hidden (and ref_weight) or "
            "ref_chosen_logps and ref_rejected_logps, or construct with use_ref_model=False"
        )
