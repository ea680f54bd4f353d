"""A batch's row tensors on the rank that trains on them.

Under several processes every rank knows every row's metadata (reward, length, group) but holds the tensors (prompt,
answer, sampler log-probs) of the rows its plan needs only (:mod:`nft.train.plan`), moved to it by :func:`localize`
from the rank that sampled them."""

from __future__ import annotations

import torch

from ..dist import Dist
from ..modeling import length_mask
from .config import TrainConfig
from .plan import needed_rows, plan_all_ranks

#: a batch's per-row tensors (what a rank holds for its own rows only); the other keys are every row's metadata
ROW_KEYS = ("prompt_ids", "response", "mask", "sampler_logprobs")


def row_at(batch: dict, idx) -> torch.Tensor:
    """Where rows (global indices) are in the batch's row tensors: themselves, or (a rank's localized batch) the
    positions ``batch["local"]`` gives."""
    t = torch.as_tensor(idx, dtype=torch.long)
    if "local" not in batch:
        return t
    at = batch["local"][t]
    if (at < 0).any():
        raise RuntimeError(f"update: rows {t[at < 0].tolist()[:5]} are not held by this rank")
    return at


def take_rows(batch: dict, idx: list[int]) -> dict:
    t, at = torch.tensor(idx, dtype=torch.long), row_at(batch, idx)
    out = {}
    for k, v in batch.items():
        if k in ("local", "T"):
            continue
        i = at if k in ROW_KEYS else t
        out[k] = [v[j] for j in i.tolist()] if isinstance(v, list) else v[i]
    return out


def answer_width(batch: dict) -> int:
    """The batch's answer width (its longest answer: the row tensors' width)."""
    return int(batch.get("T", batch["response"].shape[1]))


def _pack_rows(batch: dict, rows: list[int]) -> dict:
    """Rows to send, as few tensors: each answer cut to its length and concatenated (token ids as int32; the mask
    is not sent, it is the length), the prompts as lists."""
    at = row_at(batch, rows).tolist()
    n = [int(batch["lengths"][i]) for i in rows]
    return {
        "rows": rows,
        "lengths": n,
        "prompt_ids": [batch["prompt_ids"][j] for j in at],
        "response": torch.cat([batch["response"][j, :k] for j, k in zip(at, n)]).int() if rows else None,
        "sampler_logprobs": torch.cat([batch["sampler_logprobs"][j, :k] for j, k in zip(at, n)]) if rows else None,
    }


def _unpack_rows(piece: dict) -> dict[int, tuple]:
    """``row -> (prompt ids, answer ids, sampler log-probs)`` from :func:`_pack_rows`."""
    if not piece["rows"]:
        return {}
    resp = piece["response"].long().split(piece["lengths"])
    lps = piece["sampler_logprobs"].split(piece["lengths"])
    return {i: (p, r, lp) for i, p, r, lp in zip(piece["rows"], piece["prompt_ids"], resp, lps)}


def localize(batch: dict, minis, cfg: TrainConfig, seed: int, step: int, dist: Dist, plans=None) -> dict:
    """This rank's batch: every row's metadata, and the row tensors of the rows its plan needs, nothing else. Rows
    it sampled stay; the others come from the rank that sampled them (``batch["owner"]``), each row sent to the
    ranks that need it only. A batch every rank holds whole (the supervised control's) is cut down without
    exchange. ``plans``: every rank's plan, if already made."""
    plans = plans or plan_all_ranks(batch, cfg, seed, step, dist)[1]
    need = [needed_rows(minis, p) for p in plans]
    B = len(batch["rewards"])
    if "owner" not in batch:  # every row here: keep the needed ones
        mine = torch.tensor(need[dist.rank], dtype=torch.long)
        held = {
            k: ([batch[k][i] for i in mine.tolist()] if isinstance(batch[k], list) else batch[k][mine])
            for k in ROW_KEYS
        }
    else:
        owner = batch["owner"]
        send = [_pack_rows(batch, [i for i in need[r] if int(owner[i]) == dist.rank]) for r in range(dist.world)]
        got: dict[int, tuple] = {}
        for piece in dist.exchange(send):
            got.update(_unpack_rows(piece))
        mine = torch.tensor(need[dist.rank], dtype=torch.long)
        rows = [got[i] for i in mine.tolist()]
        T = answer_width(batch)
        held = {"prompt_ids": [r[0] for r in rows]}
        for j, k in enumerate(("response", "sampler_logprobs"), start=1):
            t = [torch.nn.functional.pad(r[j], (0, T - r[j].shape[0])) for r in rows]
            held[k] = torch.stack(t) if t else batch[k][:0]
        held["mask"] = length_mask(batch["lengths"][mine], T)
    local = torch.full((B,), -1, dtype=torch.long)
    local[mine] = torch.arange(len(mine))
    meta = {k: v for k, v in batch.items() if k not in ROW_KEYS and k not in ("owner", "local")}
    return {**meta, **held, "local": local, "T": answer_width(batch)}


def micro_rows(batch: dict, rows: list[int], first: int, trim: bool = False) -> dict:
    """The rows, or (a rank with nothing left) one row of the mini-batch with an empty mask: it runs forward and
    backward like the others and adds nothing. ``trim``: the row tensors cut to these rows' longest answer."""
    sub = take_rows(batch, rows or [first])
    if not rows:
        sub["mask"] = torch.zeros_like(sub["mask"])
    if trim:
        w = max(1, int(sub["lengths"].max()))
        for k in ("response", "mask", "sampler_logprobs"):
            sub[k] = sub[k][:, :w]
    return sub
