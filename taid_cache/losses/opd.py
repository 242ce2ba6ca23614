"""On-policy distillation (`opd`: Thinking Machines' recipe, TRL's): the student samples the answer, the teacher
scores only the sampled tokens, and each position's reverse-KL estimate log q(x) − log p(x), x the actual next
token, is the negative advantage of a policy gradient: value lq − lp, gradient (lq − lp) · ∇ log q(x). Over
x ~ q that gradient is the exact reverse KL's, Σ_v q_v (log q_v − log p_v); on data the student did not sample it
is not (docs/LOSSES.md). The teacher's log p(x) is gathered from a dense teacher's log-probs, or read from a
cache dumped with --target-logprobs (`target_logprob` of a `TopKTeacher` or `SampledTeacher`)."""

from __future__ import annotations

from .base import F, Loss, register_loss, torch, with_gradient
from .dense import LOG_FLOOR


def at_labels(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values [N, V] at each position's actual next token: [N]."""
    return values.gather(1, labels.long()[:, None])[:, 0]


def advantage(lq: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """The detached estimate lq(x) − lp(x) [N]; lp floored at LOG_FLOOR, as the rkl family's, so a token the teacher
    rules out gives a large finite advantage, not an infinite one."""
    return (lq.float() - lp.float().clamp(min=LOG_FLOOR)).detach()


@register_loss
class OPD(Loss):
    name = "opd"
    summary = ("on-policy distillation: per-token reverse-KL estimate log q(x) − log p(x) as a policy gradient, on "
               "answers the student sampled itself (off-policy data: not the reverse KL's gradient)")
    needs_labels = True
    next_token_only = True
    sampled_how = "exact: the cache's log-prob of each actual next token (--target-logprobs)"

    def dense(self, logits, teacher_logprobs, ctx):
        """The surrogate est + est · (lq − stopgrad lq): its value is the estimate, its gradient est · ∇ lq(x)."""
        lq = at_labels(F.log_softmax(logits.float(), -1), ctx.labels)
        est = advantage(lq, at_labels(teacher_logprobs, ctx.labels))
        return est + est * (lq - lq.detach())

    def closed_form(self, logits, teacher, ctx):
        """A cached teacher: value est, gradient est · (onehot(x) − q), no autograd graph. A dense one: None (`dense`)."""
        from .sparse import DenseTeacher

        if isinstance(teacher, DenseTeacher):
            return None
        if teacher.target_logprob is None:
            raise ValueError(f"{self.name} needs the teacher's log-prob of each actual next token: a cache dumped with "
                             "--target-logprobs (TopKTeacher / SampledTeacher target_logprob)")
        log_q = F.log_softmax(logits.detach().float(), -1)
        est = advantage(at_labels(log_q, ctx.labels), teacher.target_logprob)
        # d lq(x) / d logits = onehot(x) − q, built in place of log q.
        grad = log_q.exp_().neg_().scatter_add_(1, ctx.labels.long()[:, None], torch.ones_like(est)[:, None])
        return est, grad.mul_(est[:, None])

    def sampled(self, logits, teacher, ctx):
        """At --distil-ratio < 1 (the closed form is taken alone), from any cached teacher: the same value and
        gradient, through autograd."""
        value, grad = self.closed_form(logits, teacher, ctx)
        return with_gradient(value, logits, grad)
