"""The learner: owns the policy, its optimizer and schedule, and the frozen reference model.

`Learner.step` takes one step's rollouts and their advantages and does: old log-probs (only when the
batch is used for more than one update), reference log-probs (only when β > 0), then for each epoch
and minibatch the micro-batched backward passes, gradient clipping and the optimizer step. The loss
normaliser is computed over the whole optimizer step, never per micro-batch, so micro-batching does
not change the loss. What it does not do: sampling, rewards or advantages (the loop's job).

Under torchrun (`shard=True`) the models are sharded with FSDP2 (fsdp.py) and each rank steps on its
own share of the rollouts. The normaliser and the metrics are reduced over ranks and gradients are
summed, so the update equals the one-process update on all ranks' rollouts. Every forward and backward
is then a collective: ranks take as many optimizer steps and pad to as many micro-batches (`idle`).
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from trgrpo.algo.losses import Normalizer, bucket_metrics, bucket_sums, policy_loss
from trgrpo.algo.tis import tis_weights
from trgrpo.algo.token_weights import mean_scale, token_weights, weight_stats
from trgrpo.config.schema import AlgoConfig, TrainerConfig
from trgrpo.learner import fsdp
from trgrpo.learner.attention import use_cpu_attention
from trgrpo.learner.batch import MicroBatch, idle, make_microbatches, to_device
from trgrpo.learner.logprobs import Scorer, uses_varlen_attention
from trgrpo.run import distributed
from trgrpo.run.records import Rollout


def make_optimizer(params: list[Tensor], trainer: TrainerConfig, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW, with torch's fused kernel where these parameters allow it: one kernel over all of them
    instead of ~10 ops per tensor (on CPU, idle 2-core box, 2 threads: 31 → 7 ms a step for the ~10M
    bench model, 570 → 84 ms for SmolLM2-135M; docs/BENCHMARKS.md), the same update up to float
    rounding (~1e-8: runs do not repeat bit for bit across this change).
    fused=False (FSDP2's sharded parameters) or a refusal by torch: its default implementation."""
    kwargs = dict(lr=trainer.lr, weight_decay=trainer.weight_decay, betas=(0.9, 0.999))
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(params, **kwargs)


class NonFiniteStep(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


class Learner:
    def __init__(
        self,
        model,
        ref_model,
        *,
        trainer: TrainerConfig,
        algo: AlgoConfig,
        temperature: float,
        max_new_tokens: int,
        pad_id: int,
        shard: bool = False,
    ):
        """shard: FSDP2-shard the policy and reference model over the process group (torchrun)."""
        self.model, self.ref_model = model, ref_model
        self.trainer, self.algo = trainer, algo
        self.temperature = temperature
        self.max_len = algo.agg_max_len or max_new_tokens
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        if trainer.precision == "bf16" and self.device.type == "cpu":
            for m in (model, ref_model):  # the same attention numerics for policy and reference
                if m is not None:
                    use_cpu_attention(m)
        self.scorer = Scorer(model, compile=trainer.compile)
        self.ref_scorer = None if ref_model is None else Scorer(ref_model, compile=trainer.compile)
        self.sharded = shard
        # one body pass per distinct prompt needs the KV cache, which gradient checkpointing turns off;
        # under FSDP2 the body would run twice per micro-batch (not tested there yet)
        self.share_prompts = trainer.share_prompts and not trainer.gradient_checkpointing and not shard
        mode = str(trainer.padding_free).lower()
        self.padding_free = mode == "true" or (mode == "auto" and uses_varlen_attention(model))
        if shard:  # before the optimizer: sharding replaces the parameters
            for scorer in (self.scorer, self.ref_scorer):
                if scorer is not None:
                    fsdp.shard(scorer, precision=trainer.precision)
        self.optimizer = make_optimizer(
            [p for p in model.parameters() if p.requires_grad], trainer, fused=not shard
        )
        warmup = max(1, trainer.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup)
        )
        self.bad_steps = 0  # consecutive skipped optimizer steps
        self.skipped_steps = 0

    def _weights(self, logprobs: Tensor) -> Tensor:
        w = self.algo.weights
        return token_weights(
            logprobs, shape=w.shape, alpha=w.alpha, tau=w.tau, mu=w.mu, lower=w.lower, upper=w.upper
        )

    @torch.no_grad()
    def _score(self, scorer: Scorer, mbs: Sequence[MicroBatch]) -> list[Tensor]:
        t = self.trainer
        return [
            scorer(
                mb,
                temperature=self.temperature,
                chunk=t.logprob_chunk,
                precision=t.precision,
                share_prompts=self.share_prompts,
                padding_free=self.padding_free,
            )[0]
            for mb in mbs
        ]

    def step(self, rollouts: Sequence[Rollout], advantages: Tensor, group_size: int = 1) -> dict[str, float]:
        """One batch: ppo_epochs × minibatches optimizer steps. Returns the step's metrics.

        Minibatches hold whole groups (rows are group-major); with fewer groups than minibatches (e.g.
        after dynamic sampling) there are as many minibatches as groups (on the rank with the fewest).
        """
        t = self.trainer
        groups = len(rollouts) // group_size
        fewest = int(distributed.all_reduce([groups], op="min")[0])  # every rank steps as often
        count = max(1, min(t.minibatches, fewest))
        bounds = [group_size * (k * groups // count) for k in range(count)] + [len(rollouts)]
        minibatches = []
        for k in range(count):
            rows = list(range(bounds[k], bounds[k + 1]))
            chosen = [rollouts[i] for i in rows]
            mbs = [
                to_device(mb, self.device)
                for mb in make_microbatches(
                    chosen, advantages[rows], max_tokens=t.max_tokens_per_microbatch, pad_id=self.pad_id
                )
            ]
            minibatches.append(mbs)
        most = distributed.all_reduce([len(mbs) for mbs in minibatches], op="max")
        minibatches = [mbs + [idle(mbs[0])] * (int(n) - len(mbs)) for mbs, n in zip(minibatches, most)]
        reuse = t.ppo_epochs > 1 or t.minibatches > 1
        old = [self._score(self.scorer, mbs) for mbs in minibatches] if reuse else None
        ref = None
        if self.algo.kl_coef > 0 and self.ref_scorer is not None:
            ref = [self._score(self.ref_scorer, mbs) for mbs in minibatches]
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        for epoch in range(t.ppo_epochs):
            for k, mbs in enumerate(minibatches):
                metrics = self._update(
                    mbs, None if old is None else old[k], None if ref is None else ref[k], first=epoch == 0
                )
                for key, value in metrics.items():
                    sums[key] += value
                    counts[key] += 1
        out = {key: value / counts[key] for key, value in sums.items()}  # mean over optimizer steps
        out["train/skipped_steps"] = float(self.skipped_steps)
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return out

    def _update(
        self, mbs: Sequence[MicroBatch], old: list[Tensor] | None, ref: list[Tensor] | None, *, first: bool
    ) -> dict[str, float]:
        """One optimizer step over a minibatch's micro-batches."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.backward(mbs, old, ref)
        if not first:
            metrics.pop("rollout/logprob_diff_mean")
            metrics.pop("rollout/logprob_diff_max")
        if self.sharded:
            grad_norm = fsdp.clip_grad_norm(self.model.parameters(), self.trainer.max_grad_norm)
        else:
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.trainer.max_grad_norm)
            )
        self._apply(grad_norm, metrics.get("loss/policy", 0.0) + metrics.get("loss/kl", 0.0))
        metrics["train/grad_norm"] = grad_norm
        return metrics

    def backward(
        self, mbs: Sequence[MicroBatch], old: list[Tensor] | None = None, ref: list[Tensor] | None = None
    ) -> dict[str, float]:
        """Accumulate the gradient of one optimizer step's loss, micro-batch by micro-batch.

        The normaliser covers all of `mbs` on all ranks, so the accumulated gradient does not depend
        on how the rows were split into micro-batches or ranks. Returns the loss parts and diagnostics,
        reduced over ranks.

        `algo.weights.normalize=mean` divides every token weight by the mean weight over the same
        tokens (all of `mbs`, all ranks). The weight is a function of p_old, detached: of the `old`
        log-probs when given, else of the current ones, which are p_old at the only update of a batch.
        Its mean is then known before the backward passes only from `old`; without them:
        - the loss is linear in w (placement `loss`, KL weighted or off; TIS and every aggregation
          are linear too): backward with the raw weights, then scale the step's gradient (and its
          loss metrics) by 1 / mean weight: exact, and no extra forward pass;
        - otherwise (placement `ratio`, or an unweighted KL term): one extra no-grad pass scores p_old
          before the backward passes, like the `old` pass of a reused batch.
        """
        a, t = self.algo, self.trainer
        real = [mb for mb in mbs if mb.rows]  # not the `idle` micro-batches that only join collectives
        normalize = a.weights.normalize == "mean" and a.weights.shape != "none"
        linear = a.weights.placement == "loss" and (a.kl_coef <= 0 or a.weights.weight_kl)
        deferred = normalize and old is None and linear  # scale the gradient after the backward passes
        basis_lp = old  # the log-probs the weights are taken from, when known before the backward passes
        if normalize and old is None and not linear:
            basis_lp = self._score(self.scorer, mbs)
        raw = [None] * len(mbs)  # the weights before normalisation, computed here when basis_lp is known
        weight_sum = 0.0
        if normalize and basis_lp is not None:
            for i, mb in enumerate(mbs):
                if mb.rows:
                    raw[i] = self._weights(basis_lp[i])
                    weight_sum += float(raw[i].double()[mb.response_mask].sum())
        tokens, sequences, weight_sum = distributed.all_reduce(
            [
                float(sum(int(mb.response_mask.sum()) for mb in real)),
                float(sum(len(mb.rows) for mb in real)),
                weight_sum,
            ]
        )
        norm = Normalizer(tokens=tokens, sequences=sequences, max_len=float(self.max_len))
        scale = mean_scale(weight_sum, tokens) if normalize and not deferred else 1.0
        params = [p for p in self.model.parameters() if p.grad is not None] if deferred else []
        prior = [p.grad for p in params]  # gradient already accumulated: not to be scaled below
        for p in params:
            p.grad = None
        metrics: dict[str, float] = defaultdict(float)
        weights_seen, entropy_sum, diff_sum, diff_max = [], 0.0, 0.0, 0.0
        buckets = None
        for i, mb in enumerate(mbs):
            logprobs, entropy = self.scorer(
                mb,
                temperature=self.temperature,
                chunk=t.logprob_chunk,
                with_entropy=True,
                precision=t.precision,
                share_prompts=self.share_prompts,
                padding_free=self.padding_free,
            )
            if not mb.rows:  # idle: FSDP's collectives run in backward too; its gradient is exactly 0
                (0.0 * logprobs.sum()).backward()
                continue
            old_lp = None if old is None else old[i]
            basis = (old_lp if old_lp is not None else logprobs).detach()
            if a.weights.shape == "none":
                w_raw = weights = None
            else:
                w_raw = raw[i] if raw[i] is not None else self._weights(basis)
                weights = w_raw * scale if scale != 1.0 else w_raw
            tis = tis_weights(basis, mb.sampler_logprobs, mb.response_mask, level=a.tis, cap=a.tis_cap)
            loss, parts = policy_loss(
                logprobs,
                old_lp,
                mb.advantages,
                mb.response_mask,
                clip_low=a.clip_low,
                clip_high=a.clip_high,
                agg=a.agg,
                token_weights=weights,
                weight_placement=a.weights.placement,
                weight_kl=a.weights.weight_kl,
                ref_logprobs=None if ref is None else ref[i],
                kl_coef=a.kl_coef,
                kl_estimator=a.kl_estimator,
                norm=norm,
                tis_weights=tis,
            )
            loss.backward()
            for key, value in parts.items():
                metrics[key] += value
            with torch.no_grad():
                m = mb.response_mask
                w = weights if weights is not None else torch.ones_like(basis)
                weights_seen.append((w_raw if w_raw is not None else w)[m])
                entropy_sum += float(entropy[m].sum())
                diff = (basis - mb.sampler_logprobs).abs()[m]
                if diff.numel():
                    diff_sum += float(diff.sum())
                    diff_max = max(diff_max, float(diff.max()))
                b = bucket_sums(basis, mb.advantages, w, m)
                buckets = b if buckets is None else buckets + b
        keys = sorted(metrics)  # each rank's share of the step's value: the sum over ranks is the value
        summed = distributed.all_reduce([metrics[k] for k in keys] + [entropy_sum, diff_sum])
        metrics = defaultdict(float, zip(keys, summed[: len(keys)]))
        entropy_sum, diff_sum = summed[-2:]
        diff_max = distributed.all_reduce([diff_max], op="max")[0]
        if buckets is not None:
            buckets = distributed.all_reduce_tensor(buckets)
        tokens = max(norm.tokens, 1.0)
        all_w = distributed.gather_cat(torch.cat(weights_seen) if weights_seen else torch.ones(0))
        if deferred:  # every rank holds all the weights: the same mean everywhere
            scale = mean_scale(float(all_w.double().sum()), float(all_w.numel()))
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            for key in ("loss/policy", "loss/kl"):  # both linear in w here (loss/kl is 0 when unweighted)
                if key in metrics:
                    metrics[key] *= scale
            if buckets is not None:
                buckets[:, 1:] *= scale  # Σ (1 − p)·|A|·w and Σ w
        for p, g in zip(params, prior):
            p.grad = g if p.grad is None else p.grad.add_(g)
        metrics.update(
            weight_stats(
                all_w,
                torch.ones_like(all_w, dtype=torch.bool),
                lower=a.weights.lower,
                upper=a.weights.upper,
                scale=scale,
            )
        )
        metrics.update(bucket_metrics(buckets) if buckets is not None else {})
        metrics["train/entropy"] = entropy_sum / tokens
        metrics["rollout/logprob_diff_mean"] = diff_sum / tokens
        metrics["rollout/logprob_diff_max"] = diff_max
        metrics["train/tokens"] = norm.tokens
        return dict(metrics)

    def _apply(self, grad_norm: float, loss: float) -> None:
        """Step the optimizer, or skip a non-finite step (counted; abort after max_bad_steps in a row)."""
        if math.isfinite(grad_norm) and math.isfinite(loss):
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            self.skipped_steps += 1
            if self.bad_steps >= self.trainer.max_bad_steps:
                raise NonFiniteStep(
                    f"{self.bad_steps} optimizer steps in a row had a non-finite loss or gradient norm "
                    f"(last grad norm {grad_norm}); lower trainer.lr or check the data"
                )
        with warnings.catch_warnings():  # a skipped step still counts in the schedule: not a misuse
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
