"""Public contrastive losses: info_nce / InfoNCE, clip_loss, multiview_info_nce.

Every loss is composed in plain differentiable PyTorch around ONE primitive, the row (and
column) log-sum-exp of S = scale * Q @ K^T, which the non-reference backends compute tile by tile
without ever holding S (the custom op dgkernels::contrastive_lse, .ops; eager and torch.compile
call the same op). Positive logits, normalisation,
label sums and reductions are O(N * D) PyTorch around it. All statistics are accumulated in
float32 (float64 for float64 inputs); losses are returned in the input dtype.

NaN policy: a NaN or inf in any input propagates to the loss (and gradients); nothing is masked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dispatch
from .._validate import acc_dtype as _acc
from .._validate import check_choice, check_positive_scalar, check_same_device, check_same_dtype, check_tensor
from . import ops, reference

REDUCTIONS = ("none", "mean", "sum")
NEGATIVE_MODES = ("unpaired", "paired")


def _scale(value, *, invert: bool, acc: torch.dtype, device: torch.device):
    """The logit scale as a 0-dim tensor of dtype `acc` (keeps the autograd link of a tensor)."""
    if isinstance(value, torch.Tensor):
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"the temperature/logit_scale tensor is on {value.device}, the features on {device}")
        # non_blocking: a CPU scale for GPU features is staged by the driver without waiting for
        # the stream (a blocking copy would synchronise every call)
        t = value.reshape(()).to(device=device, dtype=acc, non_blocking=True)
        return 1.0 / t if invert else t
    v = 1.0 / float(value) if invert else float(value)
    # torch.full, not torch.tensor: a fill kernel takes the value as an argument, where a copy
    # from host memory would wait for the CUDA stream (a sync per call).
    return torch.full((), v, dtype=acc, device=device)


def _facts(q):
    return _dispatch.call_facts(q.device, q.dtype)


def _lse(q, k, scale, *, exclude_diag=False, want_cols=False, backend=None):
    """(lse_r, lse_c or None) from the selected backend (a constant while torch.compile traces)."""
    name = _dispatch.select_name(ops.LSE, q.device, backend, _facts(q))
    if name == "reference":
        lse_r, lse_c = reference.contrastive_lse(q, k, scale, exclude_diag, want_cols)
    else:
        lse_r, lse_c = ops.lse(q, k, scale, exclude_diag, want_cols, name)
    return lse_r, (lse_c if want_cols else None)


def _vecdot(a, b, acc):
    """Row-wise dot product accumulated in `acc` precision."""
    return torch.linalg.vecdot(a.to(acc), b.to(acc), dim=-1)


def _reduce(loss, reduction, dtype):
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(dtype)


# --------------------------------------------------------------------------------------------
# info_nce (drop-in for info-nce-pytorch 0.1.4)
# --------------------------------------------------------------------------------------------

def _check_info_nce(query, positive_key, negative_keys, temperature, reduction, negative_mode, symmetric):
    check_tensor("query", query)
    check_tensor("positive_key", positive_key)
    if negative_keys is not None:
        check_tensor("negative_keys", negative_keys)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("negative_mode", negative_mode, NEGATIVE_MODES)
    # Same conditions (and order) as info-nce-pytorch, with the shapes added to each message.
    if query.dim() != 2:
        raise ValueError(f"<query> must have 2 dimensions, got shape {tuple(query.shape)}.")
    if positive_key.dim() != 2:
        raise ValueError(f"<positive_key> must have 2 dimensions, got shape {tuple(positive_key.shape)}.")
    if negative_keys is not None:
        if negative_mode == "unpaired" and negative_keys.dim() != 2:
            raise ValueError("<negative_keys> must have 2 dimensions if <negative_mode> == 'unpaired', "
                             f"got shape {tuple(negative_keys.shape)}.")
        if negative_mode == "paired" and negative_keys.dim() != 3:
            raise ValueError("<negative_keys> must have 3 dimensions if <negative_mode> == 'paired', "
                             f"got shape {tuple(negative_keys.shape)}.")
    if len(query) != len(positive_key):
        raise ValueError("<query> and <positive_key> must must have the same number of samples, got "
                         f"{tuple(query.shape)} and {tuple(positive_key.shape)}.")
    if negative_keys is not None and negative_mode == "paired" and len(query) != len(negative_keys):
        raise ValueError("If negative_mode == 'paired', then <negative_keys> must have the same number of samples "
                         f"as <query>, got {tuple(negative_keys.shape)} and {tuple(query.shape)}.")
    if query.shape[-1] != positive_key.shape[-1]:
        raise ValueError("Vectors of <query> and <positive_key> should have the same number of components, got "
                         f"{tuple(query.shape)} and {tuple(positive_key.shape)}.")
    if negative_keys is not None and query.shape[-1] != negative_keys.shape[-1]:
        raise ValueError("Vectors of <query> and <negative_keys> should have the same number of components, got "
                         f"{tuple(query.shape)} and {tuple(negative_keys.shape)}.")
    # Beyond the original package: no empty batch, one device, one dtype, a valid temperature.
    if query.shape[0] == 0 or query.shape[1] == 0:
        raise ValueError(f"<query> must not be empty, got shape {tuple(query.shape)}")
    if negative_keys is not None and negative_keys.numel() == 0:
        raise ValueError(f"<negative_keys> must not be empty, got shape {tuple(negative_keys.shape)}")
    check_same_device(query=query, positive_key=positive_key, negative_keys=negative_keys)
    check_same_dtype(query=query, positive_key=positive_key, negative_keys=negative_keys)
    check_positive_scalar("temperature", temperature)
    if symmetric and negative_keys is not None:
        raise ValueError("symmetric=True needs negative_keys=None (the two directions are query->positive_key "
                         f"and positive_key->query), got negative_keys of shape {tuple(negative_keys.shape)}")


def info_nce(query, positive_key, negative_keys=None, temperature=0.1, reduction="mean", negative_mode="unpaired",
             *, symmetric: bool = False, backend: str | None = None):
    """InfoNCE loss; an exact drop-in for `info_nce.info_nce` of info-nce-pytorch 0.1.4.

    Inputs are L2-normalised; with t = temperature, per query i:
      - negative_keys=None:   logits_i = [q_i.p_j / t]_j over every positive key (label i).
      - 'unpaired' [M, D]:    logits_i = [q_i.p_i / t, q_i.n_1 / t, ..., q_i.n_M / t] (label 0).
      - 'paired' [N, M, D]:   as 'unpaired' with query i's own negatives n_{i,1..M}.
    loss_i = logsumexp(logits_i) - logits_i[label]; reduction 'none' | 'mean' | 'sum'.

    Keyword-only extras: `symmetric=True` (only with negative_keys=None) averages the query->key
    and key->query directions per sample: loss_i = (row_i + col_i) / 2, as CLIP does.
    `backend=` forces a backend. `temperature` may be a one-element tensor (gets a gradient).
    Raises ValueError on the package's conditions, an empty batch, an unknown reduction or
    negative_mode, temperature <= 0, mixed devices; TypeError on non-floating inputs or mixed dtypes.
    """
    _check_info_nce(query, positive_key, negative_keys, temperature, reduction, negative_mode, symmetric)
    dtype, acc = query.dtype, _acc(query.dtype)
    q = F.normalize(query, dim=-1)
    p = F.normalize(positive_key, dim=-1)
    s = _scale(temperature, invert=True, acc=acc, device=q.device)
    pos = s * _vecdot(q, p, acc)
    if negative_keys is None:
        lse_r, lse_c = _lse(q, p, s, want_cols=symmetric, backend=backend)
        loss = lse_r - pos
        if symmetric:
            loss = 0.5 * (loss + (lse_c - pos))
        return _reduce(loss, reduction, dtype)
    n = F.normalize(negative_keys, dim=-1)
    if negative_mode == "unpaired":
        lse_neg, _ = _lse(q, n, s, backend=backend)
    else:
        # [N, M] negative logits are no larger than the [N, M, D] input: plain batched matmul.
        _dispatch.select_name(ops.LSE, q.device, backend, _facts(q))  # same backend errors in every mode
        neg = torch.bmm(n, q.unsqueeze(2)).squeeze(2).to(acc) * s
        lse_neg = torch.logsumexp(neg, dim=1)
    loss = torch.logaddexp(pos, lse_neg) - pos
    return _reduce(loss, reduction, dtype)


class InfoNCE(nn.Module):
    """Module form of `info_nce` (same arguments as info-nce-pytorch's InfoNCE, plus keyword extras)."""

    def __init__(self, temperature=0.1, reduction="mean", negative_mode="unpaired", *, symmetric: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.negative_mode = negative_mode
        self.symmetric = symmetric
        self.backend = backend

    def forward(self, query, positive_key, negative_keys=None):
        return info_nce(query, positive_key, negative_keys, temperature=self.temperature, reduction=self.reduction,
                        negative_mode=self.negative_mode, symmetric=self.symmetric, backend=self.backend)


# --------------------------------------------------------------------------------------------
# clip_loss (open_clip ClipLoss semantics)
# --------------------------------------------------------------------------------------------

def _check_pair(name_a, a, name_b, b):
    check_tensor(name_a, a, dims=2)
    check_tensor(name_b, b, dims=2)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name_a} must not be empty, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape [N, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    check_same_device(**{name_a: a, name_b: b})
    check_same_dtype(**{name_a: a, name_b: b})


def clip_loss(image_features, text_features, logit_scale, *, normalize: bool = True, group=None,
              backend: str | None = None):
    """CLIP's symmetric contrastive loss (open_clip `ClipLoss` semantics).

    With x = image_features, y = text_features (L2-normalised first when normalize=True) and
    s = logit_scale (already exponentiated; float or one-element tensor, which gets a gradient):
        L = 1/2 [ mean_i CE(s x_i.Y^T, i) + mean_j CE(s y_j.X^T, j) ]
    Row and column log-sum-exp come from one pass over the similarity tiles.

    group: a torch.distributed process group. Each rank passes its local rows (same N on every
    rank); features are gathered with gradient, each rank computes its own rows' terms against
    the global batch and returns the global loss value. The gradient of each rank's local
    features equals the single-process gradient of those rows; the logit_scale gradient of each
    rank is its share, summing over ranks to the single-process gradient (so DDP's gradient
    averaging scales every parameter alike, as for the features).
    """
    _check_pair("image_features", image_features, "text_features", text_features)
    check_positive_scalar("logit_scale", logit_scale)
    dtype, acc = image_features.dtype, _acc(image_features.dtype)
    x, y = image_features, text_features
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    s = _scale(logit_scale, invert=False, acc=acc, device=x.device)
    pos = s * _vecdot(x, y, acc)
    if group is None:
        lse_r, lse_c = _lse(x, y, s, want_cols=True, backend=backend)
        return (0.5 * ((lse_r - pos).mean() + (lse_c - pos).mean())).to(dtype)
    return _clip_loss_distributed(x, y, s, pos, group, backend).to(dtype)


def _clip_loss_distributed(x, y, s, pos, group, backend):
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device), group=group)
    sizes = [int(t) for t in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"clip_loss(group=...): every rank must pass the same number of rows, got {sizes}")
    # One tile pass, local images x every text (8 N_local N_global D for forward and backward, not
    # 16 as two passes - images vs all texts, texts vs all images - would cost): the rows give the
    # local images' log-sum-exp; the columns give every text's log-sum-exp over this rank's images,
    # which an all-gather (differentiable) combines across ranks into the global column statistic.
    all_y = torch.cat(dist_nn.all_gather(y, group=group))
    n_local = x.shape[0]
    n_global = all_y.shape[0]
    lse_img, col_part = _lse(x, all_y, s, want_cols=True, backend=backend)
    lse_col = torch.logsumexp(torch.stack(dist_nn.all_gather(col_part, group=group)), dim=0)
    rank = dist.get_rank(group)
    lse_txt = lse_col[rank * n_local:(rank + 1) * n_local]  # local texts vs every image
    local = ((lse_img - pos).sum() + (lse_txt - pos).sum()) / (2 * n_global)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    # Value: the global loss. Gradient: this rank's terms only; all_gather's backward sums the
    # other ranks' terms into our features, so local features get the full global gradient.
    return local + (total - local.detach())


# --------------------------------------------------------------------------------------------
# multiview_info_nce (SupCon, contrast_mode='all')
# --------------------------------------------------------------------------------------------

def multiview_info_nce(views, temperature=0.1, labels=None, reduction="mean", *, normalize: bool = True,
                       base_temperature=None, backend: str | None = None):
    """Supervised contrastive loss (Khosla et al. 2020, SupContrast contrast_mode='all').

    views: [N, V, D] (V views of N samples); labels: optional integer [N]. Let z_a, a = 1..N*V,
    be all views (L2-normalised when normalize=True), t = temperature, y_a the label of a's sample
    (its sample index when labels is None), P(a) = {p != a : y_p = y_a} its positives. Then
        loss_a = log sum_{b != a} exp(z_a.z_b / t)  -  (1/|P(a)|) sum_{p in P(a)} z_a.z_p / t
    (the denominator runs over all N*V - 1 other views). An anchor with no positive (V = 1 and a
    label seen once) has loss 0 and still counts in the mean, as in SupContrast.
    reduction: 'mean' = average over all N*V anchors (SupContrast's loss.view(V, N).mean()),
    'sum', or 'none' -> [N, V]. base_temperature (SupContrast's extra factor t / base_t) is off by
    default (None means factor 1); with V = 2 and no labels this is SimCLR's NT-Xent.
    Sums over positives use per-label sums of embeddings (O(N * D) memory, never N x N).
    """
    check_tensor("views", views, dims=3)
    n, v, d = views.shape
    if n == 0 or v == 0 or d == 0:
        raise ValueError(f"views must not be empty, got shape {tuple(views.shape)}")
    if n * v < 2:
        raise ValueError(f"views needs at least 2 views in all (N * V >= 2) for a denominator, got shape {tuple(views.shape)}")
    check_positive_scalar("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    if base_temperature is not None:
        check_positive_scalar("base_temperature", base_temperature)
    if labels is not None:
        check_tensor("labels", labels, floating=False)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must have shape [N] = [{n}] to match views {tuple(views.shape)}, got {tuple(labels.shape)}")
        check_same_device(views=views, labels=labels)
    dtype, acc = views.dtype, _acc(views.dtype)
    z = views.transpose(0, 1).reshape(v * n, d)  # view-major, as SupContrast's torch.cat(torch.unbind(f, 1))
    if normalize:
        z = F.normalize(z, dim=-1)
    s = _scale(temperature, invert=True, acc=acc, device=z.device)
    lse, _ = _lse(z, z, s, exclude_diag=True, backend=backend)
    # Groups of equal labels, numbered without reading data on the host (no torch.unique, no
    # .max(): both would stop torch.compile): at most n groups, an unused group's row stays zero.
    n_groups = n
    if labels is None:
        group_of = torch.arange(n, device=z.device).repeat(v)
    else:
        sorted_labels, order = torch.sort(labels, stable=True)
        starts = torch.ones_like(sorted_labels, dtype=torch.long)
        starts[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
        inverse = torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0) - 1)
        group_of = inverse.repeat(v)
    zf = z.to(acc)
    sums = torch.zeros(n_groups, d, dtype=acc, device=z.device).index_add(0, group_of, zf)
    ones = torch.ones_like(group_of)
    counts = torch.zeros(n_groups, dtype=torch.long, device=z.device).index_add(0, group_of, ones)[group_of] - 1
    pos_sum = s * torch.linalg.vecdot(zf, sums[group_of] - zf, dim=-1)
    mean_pos = torch.where(counts > 0, pos_sum / counts.clamp(min=1).to(acc), torch.zeros_like(pos_sum))
    loss = torch.where(counts > 0, lse - mean_pos, torch.zeros_like(lse))
    if base_temperature is not None:
        base = base_temperature if isinstance(base_temperature, torch.Tensor) else float(base_temperature)
        loss = loss * (_scale(temperature, invert=False, acc=acc, device=z.device) / base)
    if reduction == "none":
        return loss.reshape(v, n).transpose(0, 1).to(dtype)
    return _reduce(loss, reduction, dtype)
