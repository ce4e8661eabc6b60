"""Top-p truncated teacher distributions and the divergences computed from them.

A teacher distribution R over the vocabulary V is stored as its top-p support S (token ids and their
probabilities, normalised over the *full* vocabulary, not renormalised over S) plus the tail mass
eps = R(V \\ S) measured at capture time. Everything the student is compared against is therefore the
coarse-grained distribution over the |S| + 1 cells {v} for v in S and the tail bucket T = V \\ S:

    KL(R || Q) ~= sum_{v in S} r_v log(r_v / q_v) + eps log(eps / q_T),   q_T = Q(T)

with log q_T = logsumexp(student logits on T) - logsumexp(all student logits), never log(1 - sum_S q)
(which cancels catastrophically when the student puts almost all its mass on S).

Padded batch layout (used by every function here and by the cache reader):
    support_ids   (N, S_max) int64, the support of each row in ascending id order, padded with PAD_ID (-1)
    support_probs (N, S_max) float32, R(v) for each support id, 0.0 on padding
    tail_mass     (N,)       float32, R(V \\ S)
    entropy       (N,)       float32, H(R) of the full distribution (nats)
A padding entry is recognised by its id (< 0), never by its probability: a real support entry may have
probability 0 (underflow) and still belongs to S.

What equals the dense full-vocabulary computation (tests/test_distributions.py checks each):
  * nothing truncated (top_p >= 1 and max_support >= V): the sparse divergences equal the dense ones;
  * for rows as captured (float32, unquantised): sparse KL/JSD <= dense KL/JSD, because merging T into
    one cell is a coarse-graining and both are f-divergences (data processing inequality); rows read
    from the cache are float16-rounded and renormalised, which can move the value slightly either way;
  * gradient w.r.t. the student logits: on S, d KL_sparse / d z_v = (m q_v - r_v) with
    m = sum_S r + eps the stored mass, which is the dense gradient q_v - r_v exactly when the stored
    mass is 1 (float32 capture, or a row the reader renormalised); on T only the sum over the bucket
    matches the dense gradient (sum_T (m q_v - r_v) = m q_T - eps); per token it is q_v (m - eps / q_T),
    with m = 1 the dense gradient of a teacher whose tail is proportional to the student's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_ID = -1


@dataclass
class TruncatedDistributions:
    """A batch of top-p truncated distributions in the padded layout described in the module docstring."""

    support_ids: Tensor  # (N, S_max) int64, ascending per row, PAD_ID padding
    support_probs: Tensor  # (N, S_max) float32, full-vocabulary probabilities, 0 on padding
    tail_mass: Tensor  # (N,) float32
    entropy: Tensor  # (N,) float32

    @property
    def support_mask(self) -> Tensor:
        return self.support_ids >= 0

    @property
    def support_sizes(self) -> Tensor:
        return self.support_mask.sum(dim=-1)

    def __len__(self) -> int:
        return self.support_ids.shape[0]

    def to(self, device: torch.device | str) -> TruncatedDistributions:
        return TruncatedDistributions(
            self.support_ids.to(device),
            self.support_probs.to(device),
            self.tail_mass.to(device),
            self.entropy.to(device),
        )

    def rows(self, start: int, stop: int) -> TruncatedDistributions:
        """Rows start..stop, trimmed to their own widest support."""
        ids = self.support_ids[start:stop]
        width = max(int((ids >= 0).sum(dim=-1).max()), 1) if len(ids) else 1
        return TruncatedDistributions(
            ids[:, :width],
            self.support_probs[start:stop, :width],
            self.tail_mass[start:stop],
            self.entropy[start:stop],
        )


def truncate_top_p(
    logits: Tensor, top_p: float, max_support: int, include: Tensor | None = None
) -> TruncatedDistributions:
    """Truncate softmax(logits) (N, V) to the smallest set of mass >= top_p, at most max_support tokens."""
    return truncate_probabilities(
        torch.softmax(_at_least_float32(logits), dim=-1), top_p, max_support, include
    )


def tail_bucket_errors(teacher: Tensor, student: Tensor, order: Tensor) -> Tensor:
    """(N, W) the exact error of the tail bucket, KL(R||Q) - KL_bucket(R||Q), when the support is the
    first k = 1..W tokens of `order` (N, W): eps * KL(R_T/eps || Q_T/Q(T)), the mismatch of the dropped
    tails' shapes; it only falls as k grows (merging cells never raises a KL). float64."""
    r, q = teacher.double(), student.double()

    def log(values: Tensor) -> Tensor:
        return values.clamp_min(1e-300).log()

    outside_order = torch.ones_like(r, dtype=torch.bool).scatter_(1, order, False)

    def after_each_prefix(per_token: Tensor, kept: Tensor) -> Tensor:
        """(N, W) the sum over the tokens after each prefix: the rest of the vocabulary plus a suffix
        sum over the later candidates (no 1 - cumsum: it cancels where the tail is small)."""
        outside = (per_token * outside_order).sum(-1, keepdim=True)
        suffix = torch.flip(torch.cumsum(torch.flip(kept, [-1]), -1), [-1])
        return outside + torch.nn.functional.pad(suffix[:, 1:], (0, 1))

    r_kept, q_kept = r.gather(1, order), q.gather(1, order)
    tail = after_each_prefix(r, r_kept)
    student_tail = after_each_prefix(q, q_kept)
    pointwise = torch.where(r > 0, r * (log(r) - log(q)), torch.zeros_like(r))
    tail_kl = after_each_prefix(pointwise, pointwise.gather(1, order))
    bucket = torch.where(tail > 0, tail * (log(tail) - log(student_tail)), torch.zeros_like(tail))
    return (tail_kl - bucket).clamp_min(0.0)


def truncate_probabilities(
    probs: Tensor,
    top_p: float,
    max_support: int,
    include: Tensor | None = None,
    student: Tensor | None = None,
    tail_cost: float = 0.0,
) -> TruncatedDistributions:
    """Truncate full-vocabulary distributions (N, V), e.g. ViKeR's mean of k softmaxes.

    Keeps, per row, the top-p set: the most probable tokens up to and including the one whose cumulative
    mass first reaches top_p (so at least one); top_p >= 1 keeps every token. A top-p set larger than
    max_support keeps its max_support most probable members.
    include (N,) optional token ids that must be in the support as well (precompute passes the
    ground-truth answer token: its teacher probability, and the gradient there, stay exact); when the
    cap is reached it takes the place of the last kept token (the least probable one of a full top-p set).

    student (N, V), with tail_cost > 0: the distributions the KL will compare R with (the student at step
    0, the frozen model on the unmodified input). Candidates (the top max_support) are then ranked by
    R + Q, and the row also keeps those outside the top-p set among the first k that minimise
    error_k + tail_cost * k, error_k the tail bucket's exact error against the student
    (tail_bucket_errors): an entry is added where it buys at least tail_cost nats, so a flat teacher whose
    tail the student's does not resemble gets the entries it needs, and a row whose tails agree gets none
    beyond the top-p set. The top-p set (and the included token) comes first within the max_support cap;
    the extras fill what room it leaves, in R + Q order (a top-p member ranked below the cap by R + Q
    is kept all the same). Where nothing is lost to the cap, the support is the top-p set plus the
    prefix's members.
    Runs on the tensors' device with no per-row Python loop.
    """
    if probs.dim() != 2:
        raise ValueError(f"expected (N, V) probabilities, got shape {tuple(probs.shape)}")
    if not 0.0 < top_p:
        raise ValueError(f"top_p must be > 0, got {top_p}")
    if max_support < 1:
        raise ValueError(f"max_support must be >= 1, got {max_support}")
    probs = _at_least_float32(probs)
    rows, vocab_size = probs.shape
    width = min(max_support, vocab_size)
    top_probs, top_ids = torch.topk(probs, width, dim=-1, sorted=True)

    if top_p >= 1.0:
        keep = torch.ones_like(top_probs, dtype=torch.bool)
    else:
        # Keep entry j when the mass strictly before it is still short of top_p (float64: no drift).
        mass_before = torch.cumsum(top_probs.double(), dim=-1) - top_probs.double()
        keep = mass_before < top_p
        keep[:, 0] = True
    if student is not None and tail_cost > 0:
        top_ids, top_probs, keep = _student_aware(probs, student, top_ids, keep, width, tail_cost)

    if include is not None:
        top_ids, top_probs, keep = _with_included(probs, include, top_ids, top_probs, keep, width)

    # The tail is summed directly over the dropped tokens (not 1 - kept, which cancels for peaked rows).
    # Dropped slots scatter into a spare column V (an id may appear twice, kept once and dropped once).
    kept_ids = torch.where(keep, top_ids, torch.full_like(top_ids, vocab_size))
    kept_full = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=probs.device)
    kept_full = kept_full.scatter_(1, kept_ids, True)[:, :vocab_size]
    tail_mass = probs.masked_fill(kept_full, 0.0).sum(dim=-1, dtype=torch.float64).to(probs.dtype)
    entropy = torch.special.entr(probs).sum(dim=-1, dtype=torch.float64).to(probs.dtype)

    # Store in ascending id order (delta-encodes well); dropped slots sort to the end as padding.
    sort_key = torch.where(keep, top_ids, torch.full_like(top_ids, vocab_size))
    sort_key, order = torch.sort(sort_key, dim=-1)
    sorted_probs = torch.gather(top_probs, 1, order)
    valid = sort_key < vocab_size
    support_ids = torch.where(valid, sort_key, torch.full_like(sort_key, PAD_ID))
    support_probs = torch.where(valid, sorted_probs, torch.zeros_like(sorted_probs))
    used = max(int(valid.sum(dim=-1).max()), 1) if rows else 1
    return TruncatedDistributions(
        support_ids[:, :used], support_probs[:, :used].float(), tail_mass.float(), entropy.float()
    )


def _with_included(
    probs: Tensor, include: Tensor, top_ids: Tensor, top_probs: Tensor, keep: Tensor, width: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The candidates with each row's `include` token appended and kept; a row already at the cap gives
    up its last kept entry (keep is a prefix: the least probable of the top-p set, or the last of the
    student-aware extras)."""
    include = include.to(top_ids.device).long()[:, None]
    missing = ~(keep & (top_ids == include)).any(dim=-1)
    full = missing & (keep.sum(dim=-1) == width)
    last_kept = keep.sum(dim=-1, keepdim=True) - 1
    keep = keep & ~(full[:, None] & (torch.arange(width, device=keep.device) == last_kept))
    top_ids = torch.cat([top_ids, include], dim=1)
    top_probs = torch.cat([top_probs, probs.gather(1, include)], dim=1)
    return top_ids, top_probs, torch.cat([keep, missing[:, None]], dim=1)


def _student_aware(
    probs: Tensor, student: Tensor, top_ids: Tensor, keep: Tensor, width: int, tail_cost: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-p set first, then the other candidates by R + Q; keep the top-p set plus the error-minimising
    prefix's other members, as many as the cap leaves room for (see truncate_probabilities)."""
    student = _at_least_float32(student).to(probs.device)
    _, order = torch.topk(probs + student, width, dim=-1, sorted=True)
    errors = tail_bucket_errors(probs, student, order)
    prefix = torch.argmin(errors + tail_cost * torch.arange(1, width + 1, device=probs.device), dim=-1)
    positions = torch.arange(width, device=probs.device)
    # The top-p set marked over the vocabulary (a spare column V takes the slots it does not keep).
    vocab_size = probs.shape[-1]
    marked = torch.zeros(probs.shape[0], vocab_size + 1, dtype=torch.bool, device=probs.device)
    marked.scatter_(1, torch.where(keep, top_ids, torch.full_like(top_ids, vocab_size)), True)
    outside_top_p = ~marked[:, :vocab_size].gather(1, order)
    extras = (outside_top_p & (positions[None, :] <= prefix[:, None])).sum(dim=-1)
    # Candidates: the top-p slots of top_ids (most probable first), then order's other slots (by R + Q);
    # the top-p set has at most `width` members, so the first `width` chosen slots hold no repeated id.
    chosen = torch.cat([keep, outside_top_p], dim=1)
    slots = torch.arange(2 * width, device=probs.device).expand_as(chosen)
    _, first = torch.sort(torch.where(chosen, slots, slots + 2 * width), dim=-1)
    candidates = torch.cat([top_ids, order], dim=1).gather(1, first[:, :width])
    kept = positions[None, :] < (keep.sum(dim=-1) + extras).clamp(max=width)[:, None]
    return candidates, probs.gather(1, candidates), kept


def quantize_probabilities(
    probs: Tensor, absolute_step: float = 2.0**-14, min_relative_bits: int = 1
) -> Tensor:
    """Round probabilities to the precision a KL needs, as float16 whose low mantissa bits are zero.

    An entry r costs the KL about |dr| * |log(r/q)|: what matters is absolute, not relative, precision.
    Each value is rounded to the coarser of a multiple of `absolute_step` and `min_relative_bits`
    mantissa bits (never finer than float16's 10), i.e. large probabilities keep float16 precision and
    small ones keep fewer bits. The zeroed bits compress away; bench/precompute.py measures the size
    saved and the KL error added once the reader renormalises the support (renormalize_support).
    """
    probs = _at_least_float32(probs)
    mantissa, exponent = torch.frexp(probs)  # probs = mantissa * 2**exponent, mantissa in [0.5, 1)
    # Keep the mantissa bits whose weight 2**(exponent - 1 - bit) is at least absolute_step.
    bits = torch.clamp(exponent - 1 - math.log2(absolute_step), min=min_relative_bits, max=10)
    scale = torch.pow(2.0, bits + 1).to(probs.dtype)
    return torch.ldexp(torch.round(mantissa * scale) / scale, exponent).half()


def renormalize_support(support_probs: Tensor, tail_mass: Tensor) -> Tensor:
    """Rescale stored support probabilities so that support + tail sum to exactly 1 per row.

    Rounding errors of the stored values then cancel instead of adding up (fp16 storage: KL error
    from rounding 2e-4 -> 3e-5 nats per token); the tail mass, stored in float32, is kept as is.
    """
    total = support_probs.sum(dim=-1, keepdim=True, dtype=torch.float64)
    target = (1.0 - tail_mass.double())[:, None]
    scale = torch.where(total > 0, target / total.clamp_min(1e-300), torch.ones_like(total))
    return (support_probs.double() * scale).to(support_probs.dtype)


def malformed_rows(
    support_ids: Tensor, support_probs: Tensor, tail_mass: Tensor, vocab_size: int | None = None
) -> list[tuple[int, str]]:
    """(row, what is wrong) for every row the divergences would turn into a silently wrong number: a
    repeated support id (counted twice), an empty support, a support of the whole vocabulary with tail
    mass left over (the mass would be dropped), or support + tail not summing to 1."""
    valid = support_ids >= 0
    problems: list[tuple[int, str]] = []
    repeated = ((torch.diff(support_ids, dim=1) <= 0) & valid[:, 1:]).any(dim=1)
    empty = ~valid.any(dim=1)
    total = torch.where(valid, support_probs, torch.zeros_like(support_probs)).double().sum(dim=1)
    mass_off = (total + tail_mass.double() - 1.0).abs() > 1e-3
    whole = valid.sum(dim=1) >= vocab_size if vocab_size is not None else torch.zeros_like(empty)
    leftover = whole & (tail_mass > 1e-6)
    for row in torch.nonzero(repeated | empty | mass_off | leftover).flatten().tolist():
        if bool(repeated[row]):
            problems.append((row, "a support id appears twice (ids must be strictly ascending)"))
        elif bool(empty[row]):
            problems.append((row, "an empty support"))
        elif bool(leftover[row]):
            problems.append(
                (
                    row,
                    f"the support is the whole vocabulary but tail mass {float(tail_mass[row]):.3g} is left",
                )
            )
        else:
            problems.append(
                (row, f"support + tail mass sum to {float(total[row] + tail_mass[row]):.6f}, not 1")
            )
    return problems


def _at_least_float32(values: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 for the arithmetic; float64 stays (the dense reference tests use it)."""
    return values if values.dtype == torch.float64 else values.float()


@dataclass
class CoarseCells:
    """Teacher and student masses on the |S| + 1 cells of each row: support tokens, then the tail bucket.

    teacher (N, S_max + 1), student_log (N, S_max + 1), valid (N, S_max + 1): padding entries and the
    tail bucket of a row whose support is the whole vocabulary are not cells (valid False, masses 0).
    """

    teacher: Tensor
    student_log: Tensor
    valid: Tensor


def coarse_cells(
    support_ids: Tensor, support_probs: Tensor, tail_mass: Tensor, student_logits: Tensor
) -> CoarseCells:
    """Coarse-grain the student's distribution onto the teacher's support + tail bucket (differentiable)."""
    rows, vocab_size = student_logits.shape
    if support_ids.shape[0] != rows:
        raise ValueError(f"{support_ids.shape[0]} teacher rows but {rows} student rows")
    support_valid = support_ids >= 0
    if bool((support_ids >= vocab_size).any()):
        raise ValueError(
            f"teacher support id {int(support_ids.max())} is outside the student's vocabulary of {vocab_size}: "
            "cache and model use different tokenizers"
        )
    logits = _at_least_float32(student_logits)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    gather_ids = support_ids.clamp(min=0)
    support_log_q = torch.gather(logits, 1, gather_ids) - log_normaliser[:, None]

    # Tail bucket: logsumexp over the student's logits off S. Padding scatters into a spare column V.
    scatter_ids = torch.where(support_valid, support_ids, torch.full_like(support_ids, vocab_size))
    in_support = torch.zeros(rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
    in_support.scatter_(1, scatter_ids, True)
    in_support = in_support[:, :vocab_size]
    # A row has a tail cell when its support leaves some token out, unless neither side puts any mass
    # there (eps = 0 and every off-support logit -inf): logsumexp over all -inf would send nan backwards.
    reachable = (~in_support & torch.isfinite(logits)).any(dim=-1)
    has_tail = ~in_support.all(dim=-1) & (reachable | (tail_mass > 0))
    # Rows with an empty tail get finite dummy logits so that no -inf/nan reaches the backward pass.
    off_support_logits = torch.where(
        has_tail[:, None], logits.masked_fill(in_support, float("-inf")), torch.zeros_like(logits)
    )
    tail_log_q = torch.logsumexp(off_support_logits, dim=-1) - log_normaliser

    teacher = torch.cat([support_probs.to(logits.dtype), tail_mass.to(logits.dtype)[:, None]], dim=1)
    valid = torch.cat([support_valid, has_tail[:, None]], dim=1)
    teacher = torch.where(valid, teacher, torch.zeros_like(teacher))
    student_log = torch.cat([support_log_q, tail_log_q[:, None]], dim=1)
    student_log = torch.where(valid, student_log, torch.zeros_like(student_log))
    return CoarseCells(teacher=teacher, student_log=student_log, valid=valid)


def _xlogy_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """p (log p - log q) with 0 log 0 = 0, without nan gradients on the p == 0 entries."""
    positive = p > 0
    zero = torch.zeros_like(log_q)
    # Both logs are masked too: 0 * (-inf) in the unselected branch would still send nan backwards.
    difference = torch.where(positive, log_p, zero) - torch.where(positive, log_q, zero)
    return torch.where(positive, p * difference, zero)


def sparse_kl(
    support_ids: Tensor, support_probs: Tensor, tail_mass: Tensor, student_logits: Tensor
) -> Tensor:
    """Per-row KL(R || Q) with the tail bucket: sum_S r log(r/q) + eps log(eps/q_T). Returns (N,)."""
    cells = coarse_cells(support_ids, support_probs, tail_mass, student_logits)
    teacher_log = torch.log(torch.where(cells.teacher > 0, cells.teacher, torch.ones_like(cells.teacher)))
    return _xlogy_ratio(cells.teacher, teacher_log, cells.student_log).sum(dim=-1)


def sparse_jsd(
    support_ids: Tensor, support_probs: Tensor, tail_mass: Tensor, student_logits: Tensor
) -> Tensor:
    """Per-row Jensen-Shannon divergence (nats) between R and Q on the support + tail cells. Returns (N,)."""
    cells = coarse_cells(support_ids, support_probs, tail_mass, student_logits)
    teacher = cells.teacher
    student = torch.where(cells.valid, cells.student_log.exp(), torch.zeros_like(teacher))
    mixture = 0.5 * (teacher + student)
    safe = torch.ones_like(teacher)
    teacher_log = torch.log(torch.where(teacher > 0, teacher, safe))
    mixture_log = torch.log(torch.where(mixture > 0, mixture, safe))
    teacher_term = _xlogy_ratio(teacher, teacher_log, mixture_log)
    student_term = _xlogy_ratio(student, cells.student_log, mixture_log)
    return 0.5 * (teacher_term + student_term).sum(dim=-1)


def sparse_cosine(
    support_ids: Tensor, support_probs: Tensor, tail_mass: Tensor, student_logits: Tensor
) -> Tensor:
    """Per-row cosine distance 1 - <R, Q> / (|R| |Q|) over the full vocabulary (ViKeR Table 9). Returns (N,).

    |Q| is exact, from the logits: log |Q|^2 = logsumexp(2 log softmax(z)). <R, Q> and |R| are taken over
    the support: R's tail mass eps lies on ids the cache does not know. Each tail entry is at most
    r_min = min_S r (top-p keeps the largest), so the tail adds at most eps * max_T q to <R, Q> and at most
    eps * r_min to |R|^2: the cosine of the full rows lies in
    [cos_S * sqrt(n / (n + eps r_min)), cos_S + eps max_T q / (sqrt(n) |Q|)], n = sum_S r^2
    (cosine_tail_bounds; exact when nothing is truncated). A cosine over the |S| + 1 coarse cells would
    instead count the whole tail as one coordinate of mass eps.
    """
    logits = _at_least_float32(student_logits)
    valid = support_ids >= 0
    log_q = torch.log_softmax(logits, dim=-1)
    support_q = torch.gather(log_q, 1, support_ids.clamp(min=0)).exp()
    teacher = torch.where(valid, support_probs.to(logits.dtype), torch.zeros_like(support_q))
    dot = (teacher * torch.where(valid, support_q, torch.zeros_like(support_q))).sum(dim=-1)
    teacher_norm = teacher.square().sum(dim=-1).sqrt()
    student_norm = (0.5 * torch.logsumexp(2 * log_q, dim=-1)).exp()
    return 1.0 - dot / (teacher_norm * student_norm).clamp_min(1e-12)


def cosine_tail_bounds(
    support_ids: Tensor, support_probs: Tensor, tail_mass: Tensor, student_logits: Tensor
) -> tuple[Tensor, Tensor]:
    """(lowest, highest) full-vocabulary cosine distance any tail of mass eps (entries <= min_S r) allows."""
    logits = _at_least_float32(student_logits)
    valid = support_ids >= 0
    log_q = torch.log_softmax(logits, dim=-1)
    q = log_q.exp()
    in_support = torch.zeros_like(q, dtype=torch.bool)
    in_support.scatter_(1, support_ids.clamp(min=0), valid)
    max_tail_q = torch.where(in_support, torch.zeros_like(q), q).max(dim=-1).values
    teacher = torch.where(valid, support_probs.to(logits.dtype), torch.zeros_like(q[:, : valid.shape[1]]))
    norm_squared = teacher.square().sum(dim=-1)
    smallest = torch.where(valid, teacher, torch.full_like(teacher, float("inf"))).min(dim=-1).values
    student_norm = q.square().sum(dim=-1).sqrt()
    eps = tail_mass.to(logits.dtype)
    cosine = 1.0 - sparse_cosine(support_ids, support_probs, tail_mass, student_logits)
    highest_cosine = (cosine + eps * max_tail_q / (norm_squared.sqrt() * student_norm)).clamp(max=1.0)
    lowest_cosine = cosine * torch.sqrt(norm_squared / (norm_squared + eps * smallest.clamp(max=1.0)))
    return 1.0 - highest_cosine, 1.0 - lowest_cosine


# D(R || Q) per answer token from a sparse teacher and the student's logits (ViKeR Table 9), by name.
SPARSE_DIVERGENCES = {"kl": sparse_kl, "jsd": sparse_jsd, "cosine": sparse_cosine}
