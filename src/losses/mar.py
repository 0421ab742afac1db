"""MAR losses: soft multilabel reference learning (Yu et al., CVPR 2019).

Exact, vectorised versions of the three loss terms of the original code (KovenYu/MAR,
``src/utils.py``), specified in ``docs/mar_losses.md``:

- :class:`JointLoss` (RJ, reference-agent joint embedding),
- :class:`MultilabelLoss` (CML, cross-view consistent soft multilabels),
- :class:`DiscriminativeLoss` (MDL, multilabel-guided discriminative mining),

plus the helpers :func:`soft_multilabel`, :func:`log_soft_multilabel`,
:func:`pairwise_agreement` and :func:`condensed_pairwise_agreement`.

A training step runs without host synchronisation: no ``.item()``, no data-dependent shapes
(masked sums and clamped counts replace the original's Python loops), tensors are created on the
inputs' device. Everything computes in fp32 (float64 inputs stay float64) with autocast disabled,
so bf16/fp16 activations cannot overflow CML's sums or underflow the log of soft multilabels.
The state (MDL threshold, CML centres, their "initialised" flags) lives in registered buffers and
is checkpointed with the module.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DiscriminativeLoss",
    "JointLoss",
    "MultilabelLoss",
    "condensed_pairwise_agreement",
    "log_soft_multilabel",
    "pairwise_agreement",
    "soft_multilabel",
]

# Output elements (rows x cols) per chunk of the pairwise L1 helpers. `torch.cdist(p=1)` never
# materialises the rows x cols x K differences (the full 184 x 184 x 4101 block: 57 ms against
# 232 ms for a chunked broadcast |a - b| sum on the CPU), so a chunk only bounds the output block.
_CHUNK_ELEMENTS_CPU = 1 << 22
_CHUNK_ELEMENTS_DEVICE = 1 << 26
_TRIANGLE_ROWS_CPU = 16


# ----------------------------------------------------------------------------------------------
# fp32 / validation helpers
# ----------------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (exactness tests), else float32 (upcasts bf16/fp16)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


@contextlib.contextmanager
def _autocast_disabled(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device`` so that no matmul inside is cast back to 16 bits."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _check_matrix(name: str, x: Any, rows: int | None = None, cols: int | None = None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor, got {shape}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"`{name}` must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"`{name}` must have {cols} columns, got shape {tuple(x.shape)}")


def _check_vector(name: str, x: Any, length: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 1 or x.shape[0] != length:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`{name}` must be a 1-D tensor of length {length}, got {shape}")


def _check_finite_once(name: str, x: Tensor) -> None:
    """Finiteness check for one-off initialisation (a host sync is fine there)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` contains NaN or inf values; cannot initialise from it")


# ----------------------------------------------------------------------------------------------
# Soft multilabels and agreements
# ----------------------------------------------------------------------------------------------
def _scaled_similarity(features: Tensor, agents: Tensor, scale: float) -> Tensor:
    _check_matrix("features", features)
    _check_matrix("agents", agents, cols=features.shape[1])
    dtype = _compute_dtype(features, agents)
    # Same association as the original: f · (A_detachedᵀ · scale).
    return features.to(dtype).mm(agents.detach().to(dtype).t() * scale)


def soft_multilabel(features: Tensor, agents: Tensor, scale: float = 30.0) -> Tensor:
    """Soft multilabels ``softmax(scale · f · Aᵀ)`` over the reference agents.

    Args:
        features: (B, d) target features (unit norm in MAR).
        agents: (K, d) reference agents (unit norm); detached, so the gradient reaches
            ``features`` only.
        scale: the cosine scale (``scala_ce`` = 30 in the paper).

    Returns:
        (B, K) rows summing to 1, fp32 (float64 for float64 inputs) even under autocast.
    """
    with _autocast_disabled(features.device):
        return torch.softmax(_scaled_similarity(features, agents, scale), dim=1)


def log_soft_multilabel(features: Tensor, agents: Tensor, scale: float = 30.0) -> Tensor:
    """``log(soft_multilabel(...))`` computed with ``log_softmax``: (B, K), the CML input.

    The original takes ``torch.log`` of the softmax output. In fp32 the two agree (the smallest
    probability at scale 30 is about e^-60/K ≈ 2e-30, far above fp32's underflow) but log-of-
    softmax underflows to -inf in 16-bit; ``log_softmax`` never does.
    """
    with _autocast_disabled(features.device):
        return torch.log_softmax(_scaled_similarity(features, agents, scale), dim=1)


def _chunk_rows(rows: int, cols: int, device: torch.device, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
        return chunk_size
    budget = _CHUNK_ELEMENTS_CPU if device.type == "cpu" else _CHUNK_ELEMENTS_DEVICE
    return max(1, min(rows, budget // max(1, cols)))


def _l1_distances(a: Tensor, b: Tensor, step: int) -> Tensor:
    """(N, M) L1 distances between the rows of ``a`` and ``b``, ``step`` rows of ``a`` at a time."""
    blocks = [torch.cdist(rows.unsqueeze(0), b.unsqueeze(0), p=1)[0] for rows in a.split(step)]
    return torch.cat(blocks) if blocks else a.new_zeros(0, b.shape[0])


def pairwise_agreement(a: Tensor, b: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """Multilabel agreement ``1 − ‖a_i − b_j‖₁ / 2`` for every pair of rows.

    For probability rows (each summing to 1) this equals ``Σ_k min(a_ik, b_jk)`` ∈ [0, 1].

    Args:
        a: (N, K) multilabels.
        b: (M, K) multilabels; ``None`` means ``a``.
        chunk_size: rows of ``a`` per chunk (each chunk holds a chunk·M block of distances);
            ``None`` picks a size from the device.

    Returns:
        (N, M) agreements, fp32 (float64 for float64 inputs).
    """
    b = a if b is None else b
    _check_matrix("a", a)
    _check_matrix("b", b, cols=a.shape[1])
    with _autocast_disabled(a.device):
        dtype = _compute_dtype(a, b)
        a, b = a.to(dtype), b.to(dtype)
        step = _chunk_rows(a.shape[0], b.shape[0], a.device, chunk_size)
        return 1 - _l1_distances(a, b, step) / 2


def condensed_pairwise_agreement(x: Tensor, chunk_size: int | None = None) -> Tensor:
    """Agreements ``1 − ‖x_i − x_j‖₁ / 2`` of the pairs i < j, in scipy ``pdist`` order.

    Only the upper triangle is computed (half the work of :func:`pairwise_agreement`).

    Args:
        x: (N, K) multilabels.
        chunk_size: rows per chunk; ``None`` picks a size from the device.

    Returns:
        (N·(N−1)/2,) agreements ordered like ``scipy.spatial.distance.pdist``.
    """
    _check_matrix("x", x)
    n = x.shape[0]
    with _autocast_disabled(x.device):
        x = x.to(_compute_dtype(x))
        full = x.new_zeros(n, n)
        # Blocks of rows against the columns from their first row on (upper triangle): small
        # blocks skip most of the lower half. On the CPU 16 rows measured fastest (31 ms at
        # 184 x 4101 against 57 ms for one full block); each pair's value does not depend on the
        # blocking (bitwise). A Python loop over a number of blocks fixed by the batch size.
        if chunk_size is None and x.device.type == "cpu":
            step = max(1, min(n, _TRIANGLE_ROWS_CPU))
        else:
            step = _chunk_rows(n, n, x.device, chunk_size)
        for start in range(0, n, step):
            stop = min(start + step, n)
            full[start:stop, start:] = _l1_distances(x[start:stop], x[start:], stop - start)
        rows, cols = torch.triu_indices(n, n, offset=1, device=x.device)
        return 1 - full[rows, cols] / 2


# ----------------------------------------------------------------------------------------------
# Mixin: Python mirror of a checkpointed "initialised" flag
# ----------------------------------------------------------------------------------------------
class _InitialisedFlagMixin(nn.Module):
    """Keeps a bool buffer ``is_initialized`` and a Python mirror, so that ``forward`` can check
    initialisation without a host sync; the mirror is refreshed when a state dict is loaded."""

    _initialized: bool

    def _set_initialized(self, value: bool) -> None:
        self.is_initialized.fill_(value)
        self._initialized = value

    @property
    def initialized(self) -> bool:
        """Whether the state was initialised (``init_*`` called or loaded from a checkpoint)."""
        return self._initialized

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        flag = state_dict.get(prefix + "is_initialized")
        if isinstance(flag, Tensor):
            self._initialized = bool(flag)  # one-off sync at load time


# ----------------------------------------------------------------------------------------------
# RJ: reference-agent joint embedding
# ----------------------------------------------------------------------------------------------
class JointLoss(nn.Module):
    """RJ loss: pull source features onto their own agent, push every feature away from the
    agents it is too close to (mar.md §2).

    Hard agents of a row are those with (detached) similarity ``> 1 − margin/2`` (for unit
    vectors exactly where the hinge ``[margin − ‖f − a‖²]₊`` is active), the source's own agent
    excluded. Collected terms: ``‖f_i − a_{y_i}‖²`` for every source row; for every source and
    target row with at least one hard agent, the mean over its hard agents of
    ``[margin − ‖x − a_j‖²]₊``. The loss is the plain mean of all collected terms.

    After ``forward``, ``last_stats`` holds detached diagnostics: ``hard_agents_source`` /
    ``hard_agents_target`` (mean hard agents per row), ``active_rows_source`` /
    ``active_rows_target`` (fraction of rows with a hard agent).
    """

    # Gather only the hard pairs on the CPU (see `_hard_agent_means`); tests flip it to check
    # that both paths agree.
    sparse_on_cpu: bool = True

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = float(margin)
        self.sim_margin = 1 - self.margin / 2
        self.last_stats: dict[str, Tensor] = {}

    def _hard_agent_means(self, x: Tensor, agents: Tensor, hard: Tensor) -> tuple[Tensor, Tensor]:
        """Per row: mean over hard agents of the hinge ``[margin − ‖x − a_j‖²]₊`` (0 for a row
        without any), and the count.

        Two exact paths. On accelerators, one dense (B, K) distance matrix (‖x‖² + ‖a‖² − 2x·a,
        whose gradient equals that of the direct differences) keeps the step free of host
        syncs. On the CPU, where there is no device to sync with, only the ~10 hard pairs per
        row out of thousands of agents are gathered, which is ~10x cheaper than the dense form.
        """
        count = hard.sum(1)
        if x.device.type == "cpu" and self.sparse_on_cpu:
            rows, cols = hard.nonzero(as_tuple=True)
            hinge = (self.margin - (x[rows] - agents[cols]).pow(2).sum(1)).clamp(min=0)
            sums = x.new_zeros(x.shape[0]).index_add(0, rows, hinge)
        else:
            sq_dist = (
                x.pow(2).sum(1, keepdim=True) + agents.pow(2).sum(1)[None, :] - 2 * x.mm(agents.t())
            )
            hinge = (self.margin - sq_dist).clamp(min=0)
            sums = torch.where(hard, hinge, 0).sum(1)
        return sums / count.clamp(min=1), count

    def forward(
        self,
        features: Tensor,
        agents: Tensor,
        labels: Tensor,
        similarity: Tensor,
        features_target: Tensor,
        similarity_target: Tensor,
    ) -> Tensor:
        """RJ loss.

        Args:
            features: (B_s, d) source features.
            agents: (K, d) reference agents (detached here: RJ moves the features only).
            labels: (B_s,) source identities in [0, K).
            similarity: (B_s, K) source feature-agent similarities (detached here).
            features_target: (B_t, d) target features.
            similarity_target: (B_t, K) target similarities (detached here).

        Returns:
            Scalar loss (fp32, or float64 for float64 inputs).
        """
        _check_matrix("features", features)
        batch_source, dim = features.shape
        _check_matrix("agents", agents, cols=dim)
        num_agents = agents.shape[0]
        _check_vector("labels", labels, batch_source)
        _check_matrix("similarity", similarity, rows=batch_source, cols=num_agents)
        _check_matrix("features_target", features_target, cols=dim)
        _check_matrix("similarity_target", similarity_target, features_target.shape[0], num_agents)

        with _autocast_disabled(features.device):
            dtype = _compute_dtype(features, agents, features_target)
            f = features.to(dtype)
            g = features_target.to(dtype)
            a = agents.detach().to(dtype)
            labels = labels.long()

            positive = (f - a[labels]).pow(2).sum(1)
            agent_ids = torch.arange(num_agents, device=features.device)
            own_agent = agent_ids[None, :] == labels[:, None]
            hard_source = (similarity.detach().to(dtype) > self.sim_margin) & ~own_agent
            hard_target = similarity_target.detach().to(dtype) > self.sim_margin

            neg_source, count_source = self._hard_agent_means(f, a, hard_source)
            neg_target, count_target = self._hard_agent_means(g, a, hard_target)
            active_source = count_source > 0
            active_target = count_target > 0
            # Rows without a hard agent contribute 0 to the sums and are not counted.
            total = positive.sum() + neg_source.sum() + neg_target.sum()
            num_terms = batch_source + active_source.sum() + active_target.sum()
            loss = total / num_terms.clamp(min=1)

        with torch.no_grad():
            self.last_stats = {
                "hard_agents_source": count_source.to(dtype).mean(),
                "hard_agents_target": count_target.to(dtype).mean(),
                "active_rows_source": active_source.to(dtype).mean(),
                "active_rows_target": active_target.to(dtype).mean(),
            }
        return loss


# ----------------------------------------------------------------------------------------------
# CML: cross-view consistent soft multilabel learning
# ----------------------------------------------------------------------------------------------
class MultilabelLoss(_InitialisedFlagMixin):
    """CML loss: per-camera mean and std of the log soft multilabels pulled towards shared
    centres (squared 2-Wasserstein distance between diagonal Gaussians, mar.md §2).

    For each camera v with n_v ≥ 2 samples in the batch: μ_v, σ_v = per-dimension mean and
    unbiased std of its rows; terms ``‖μ_v − C_μ‖²`` and ``‖σ_v − C_σ‖²`` (the latter only with
    ``use_std``); the loss is the mean over all terms. Before the loss, the centres (buffers)
    move towards the detached batch statistics averaged over qualifying cameras:
    ``C ← (1 − η)·C + η·mean_v(stat_v)``, ``η = batch_size / 10000``.

    Args:
        batch_size: total batch size of the original recipe (source + target = 368), which
            only sets the momentum η.
        use_std: also match the per-camera std.
        num_views: number of cameras; views must then lie in [0, num_views). With it the camera
            one-hot matrix has a static shape and ``forward`` does no host sync. ``None`` finds
            the cameras with ``torch.unique`` (one host sync per step).
        num_classes: K, to allocate the centre buffers up front (otherwise they are allocated
            by :meth:`init_centers` or when a state dict is loaded).

    ``last_stats`` after ``forward``: ``num_views_used`` (qualifying cameras in the batch).
    """

    def __init__(
        self,
        batch_size: int,
        use_std: bool = True,
        num_views: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        if num_views is not None and num_views < 1:
            raise ValueError(f"`num_views` must be >= 1 or None, got {num_views}")
        self.batch_size = int(batch_size)
        self.use_std = bool(use_std)
        self.moment = batch_size / 10000
        self.num_views = num_views
        size = 0 if num_classes is None else int(num_classes)
        self.register_buffer("center_mean", torch.zeros(size))
        self.register_buffer("center_std", torch.zeros(size))
        self.register_buffer("is_initialized", torch.tensor(False))
        self._initialized = False
        self.last_stats: dict[str, Tensor] = {}

    # -- camera statistics ---------------------------------------------------------------------
    def _view_onehot(self, views: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, V) one-hot camera matrix."""
        views = views.long()
        if self.num_views is None:
            unique, inverse = torch.unique(views, return_inverse=True)  # host sync (documented)
            return F.one_hot(inverse, unique.numel()).to(dtype)
        if views.device.type == "cpu" and views.numel():
            low, high = int(views.min()), int(views.max())  # free on the CPU
            if low < 0 or high >= self.num_views:
                raise ValueError(
                    f"`views` must lie in [0, num_views={self.num_views}), got range "
                    f"[{low}, {high}]"
                )
        return F.one_hot(views, self.num_views).to(dtype)

    def _camera_stats(self, x: Tensor, views: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per camera: mean (V, K), unbiased std (V, K), and whether it has ≥ 2 samples (V,)."""
        onehot = self._view_onehot(views, x.dtype)
        counts = onehot.sum(0)
        mean = onehot.t().mm(x) / counts.clamp(min=1)[:, None]
        centred = x - onehot.mm(mean)  # two-pass variance: no cancellation at |log p| ~ 60
        var = onehot.t().mm(centred.pow(2)) / (counts - 1).clamp(min=1)[:, None]
        # sqrt has an infinite slope at 0 (singleton or degenerate cameras): take 0 there.
        positive = var > 0
        std = torch.where(positive, torch.where(positive, var, 1).sqrt(), 0)
        return mean, std, counts >= 2

    @staticmethod
    def _average_over(stat: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep[:, None], stat, 0).sum(0) / keep.sum().clamp(min=1)

    def _allocate_centers(self, size: int) -> None:
        for name in ("center_mean", "center_std"):
            old = getattr(self, name)
            if old.shape != (size,):
                setattr(self, name, old.new_zeros(size))

    # -- public API ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_centers(self, log_multilabels: Tensor, views: Tensor) -> None:
        """Centres = per-camera mean / std of the log multilabels, averaged over cameras.

        Args:
            log_multilabels: (N, K) log soft multilabels of the whole target training set.
            views: (N,) camera ids.

        Cameras with a single sample are skipped (their std is undefined); at least one camera
        must have two samples. Buffers keep the module's device and dtype.
        """
        _check_matrix("log_multilabels", log_multilabels)
        _check_vector("views", views, log_multilabels.shape[0])
        with _autocast_disabled(log_multilabels.device):
            x = log_multilabels.detach().to(_compute_dtype(log_multilabels))
            _check_finite_once("log_multilabels", x)
            mean, std, qualifies = self._camera_stats(x, views.to(x.device))
            if not bool(qualifies.any()):
                raise ValueError(
                    "init_centers: no camera in `views` has at least two samples; cannot "
                    "compute per-camera standard deviations"
                )
            self._allocate_centers(x.shape[1])
            self.center_mean.copy_(self._average_over(mean, qualifies))
            self.center_std.copy_(self._average_over(std, qualifies))
        self._set_initialized(True)

    def forward(self, log_multilabels: Tensor, views: Tensor) -> Tensor:
        """Update the centres from the detached batch, then return the CML loss.

        Args:
            log_multilabels: (B, K) log soft multilabels (gradient flows through them).
            views: (B,) camera ids.

        Returns:
            Scalar loss; 0 (still attached to the graph) when no camera has two samples, in
            which case the centres are left unchanged.
        """
        if not self._initialized:
            raise RuntimeError(
                "MultilabelLoss.forward called before init_centers(); initialise the centres "
                "from the target training set (or load a checkpoint) first"
            )
        _check_matrix("log_multilabels", log_multilabels, cols=self.center_mean.shape[0])
        _check_vector("views", views, log_multilabels.shape[0])
        with _autocast_disabled(log_multilabels.device):
            dtype = _compute_dtype(log_multilabels)
            x = log_multilabels.to(dtype)
            mean, std, qualifies = self._camera_stats(x, views)
            any_camera = qualifies.any()

            with torch.no_grad():
                eta = self.moment
                stats = [(self.center_mean, mean)]
                if self.use_std:
                    stats.append((self.center_std, std))
                for center, stat in stats:
                    batch_center = self._average_over(stat.detach(), qualifies)
                    updated = center.to(dtype) * (1 - eta) + batch_center * eta
                    center.copy_(torch.where(any_camera, updated, center.to(dtype)))

            center_mean = self.center_mean.to(dtype)
            terms = torch.where(qualifies, (mean - center_mean).pow(2).sum(1), 0).sum()
            num_terms = qualifies.sum()
            if self.use_std:
                center_std = self.center_std.to(dtype)
                terms = terms + torch.where(qualifies, (std - center_std).pow(2).sum(1), 0).sum()
                num_terms = 2 * num_terms
            loss = terms / num_terms.clamp(min=1)

        self.last_stats = {"num_views_used": qualifies.sum().detach()}
        return loss

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The centres' size K is only known once initialised: adopt the checkpoint's size.
        saved = state_dict.get(prefix + "center_mean")
        if isinstance(saved, Tensor) and saved.dim() == 1:
            self._allocate_centers(saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args)


# ----------------------------------------------------------------------------------------------
# MDL: multilabel-guided discriminative learning
# ----------------------------------------------------------------------------------------------
class DiscriminativeLoss(_InitialisedFlagMixin):
    """MDL loss: among the closest feature pairs of the batch, pull together those whose soft
    multilabels agree (> T) and push apart the rest (mar.md §2).

    Over the pairs i < j of the batch: D_ij = ‖g_i − g_j‖ (detached), agreement
    A_ij = 1 − ‖M_i − M_j‖₁/2 from the multilabels (memory rows). The n = ⌊C(B,2)·mining_ratio⌋
    pairs with the smallest D are split into P = {A > T} (strict) and N (the rest). Then
    T ← 0.9·T + 0.1·t_b with t_b the n-th largest agreement over all batch pairs. Loss
    ``−log(P̄ / (P̄ + N̄))`` with P̄ = mean_P exp(−‖g_i − g_j‖²) (1 if P is empty) and N̄ likewise
    (0.5 if N is empty); the gradient flows through the features of the mined pairs.

    Deviation from the original: when n = 0 (batch too small for the ratio) T stays unchanged
    (the original drags it to the minimum agreement) and the loss is the constant log(1.5), with
    a warning once.

    ``last_stats`` after ``forward`` (detached tensors, no host sync): ``num_positives``,
    ``num_negatives``, ``tp_rate`` (only when ``labels`` is given: fraction of mined positives
    with equal labels, 0 without positives), ``threshold_used`` (T of the split),
    ``threshold`` (T after the update), ``batch_quantile`` (t_b).
    """

    def __init__(self, mining_ratio: float = 0.001) -> None:
        super().__init__()
        if not 0 <= mining_ratio <= 1:
            raise ValueError(f"`mining_ratio` must be in [0, 1], got {mining_ratio}")
        self.mining_ratio = float(mining_ratio)
        self.moment = 0.1
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("is_initialized", torch.tensor(False))
        self._initialized = False
        self._warned_no_pairs = False
        self.last_stats: dict[str, Tensor] = {}

    def num_mined_pairs(self, batch_size: int) -> int:
        """n = ⌊C(B, 2)·mining_ratio⌋ (a Python int: it depends on the batch size only)."""
        return int(batch_size * (batch_size - 1) // 2 * self.mining_ratio)

    @torch.no_grad()
    def init_threshold(self, pairwise_agreements: Tensor | np.ndarray) -> None:
        """T₀ = the k-th largest of the given agreements, k = max(1, ⌊M·mining_ratio⌋).

        Args:
            pairwise_agreements: (M,) condensed agreements of all target-train pairs (numpy or
                tensor, e.g. from :func:`condensed_pairwise_agreement`).
        """
        values = torch.as_tensor(pairwise_agreements).detach().reshape(-1)
        if values.numel() == 0:
            raise ValueError("init_threshold: `pairwise_agreements` is empty")
        if not values.is_floating_point():
            raise ValueError(f"init_threshold: expected float agreements, got {values.dtype}")
        _check_finite_once("pairwise_agreements", values)
        total = values.numel()
        k = max(1, int(total * self.mining_ratio))  # the original indexes sorted[-k]; k=0 = min
        kth_largest = torch.kthvalue(values.to(torch.float64), total - k + 1).values
        self.threshold.copy_(kth_largest.to(self.threshold.dtype))
        self._set_initialized(True)

    def forward(
        self, features: Tensor, multilabels: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """MDL loss, updating the threshold.

        Args:
            features: (B, d) target features (gradient flows through the mined pairs).
            multilabels: (B, K) soft multilabels of the same samples (memory rows).
            labels: optional (B,) ground-truth identities, used for diagnostics only.

        Returns:
            Scalar loss.
        """
        if not self._initialized:
            raise RuntimeError(
                "DiscriminativeLoss.forward called before init_threshold(); initialise T from "
                "the target training set's pairwise agreements (or load a checkpoint) first"
            )
        _check_matrix("features", features)
        batch = features.shape[0]
        _check_matrix("multilabels", multilabels, rows=batch)
        if labels is not None:
            _check_vector("labels", labels, batch)
        num_mined = self.num_mined_pairs(batch)

        with _autocast_disabled(features.device):
            dtype = _compute_dtype(features, multilabels)
            g = features.to(dtype)
            if num_mined == 0:
                return self._no_pair_fallback(g, batch, labels is not None)

            rows, cols = torch.triu_indices(batch, batch, offset=1, device=g.device)
            with torch.no_grad():
                gd = g.detach()
                sq_norm = gd.pow(2).sum(1)
                # Ranking by D² = ranking by D (the original's pdist).
                sq_dist = sq_norm[:, None] + sq_norm[None, :] - 2 * gd.mm(gd.t())
                nearest = sq_dist[rows, cols].topk(num_mined, largest=False).indices
                agreement = condensed_pairwise_agreement(multilabels.detach().to(dtype))
                threshold_used = self.threshold.detach().clone()
                is_positive = agreement[nearest] > threshold_used.to(dtype)
                batch_quantile = agreement.topk(num_mined).values[-1]
                # The split above used the old T; the EMA moves it afterwards.
                self.threshold.copy_(
                    self.threshold * (1 - self.moment)
                    + batch_quantile.to(self.threshold.dtype) * self.moment
                )

            first, second = rows[nearest], cols[nearest]
            pair_sim = torch.exp(-(g[first] - g[second]).pow(2).sum(1))
            num_pos = is_positive.sum()
            num_neg = num_mined - num_pos
            pos_mean = torch.where(
                num_pos > 0, torch.where(is_positive, pair_sim, 0).sum() / num_pos.clamp(min=1), 1.0
            )
            neg_mean = torch.where(
                num_neg > 0, torch.where(is_positive, 0, pair_sim).sum() / num_neg.clamp(min=1), 0.5
            )
            loss = -torch.log(pos_mean) + torch.log(pos_mean + neg_mean)

        stats = {
            "num_positives": num_pos.detach(),
            "num_negatives": num_neg.detach(),
            "threshold_used": threshold_used,
            "threshold": self.threshold.detach().clone(),
            "batch_quantile": batch_quantile.detach(),
        }
        if labels is not None:
            same_identity = labels[first] == labels[second]
            true_pos = (same_identity & is_positive).sum()
            stats["tp_rate"] = true_pos.to(dtype) / num_pos.clamp(min=1).to(dtype)
        self.last_stats = stats
        return loss

    def _no_pair_fallback(self, g: Tensor, batch: int, with_labels: bool) -> Tensor:
        """n = 0: no pair mined, T unchanged, loss = −log(1 / (1 + 0.5)) = log 1.5 (constant)."""
        if not self._warned_no_pairs:
            warnings.warn(
                f"DiscriminativeLoss: batch of {batch} gives floor(C({batch},2) x "
                f"{self.mining_ratio}) = 0 mined pairs; MDL is the constant log(1.5) and the "
                "threshold is left unchanged. Use a larger (global) batch or mining ratio.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_no_pairs = True
        zero = g.new_zeros((), dtype=torch.long)
        threshold = self.threshold.detach().clone()
        self.last_stats = {
            "num_positives": zero,
            "num_negatives": zero.clone(),
            "threshold_used": threshold,
            "threshold": threshold.clone(),
            "batch_quantile": threshold.clone(),  # no batch quantile: report T (NaN-free)
        }
        if with_labels:
            self.last_stats["tp_rate"] = g.new_zeros(())
        # Attached to the graph so that backward() works; the gradient is zero.
        return (g * 0).sum() + math.log(1.5)
