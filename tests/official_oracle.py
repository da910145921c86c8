"""An independent float64 numpy transcription of the official PBS-Attn semantics.

Written from the paper digest (paper-spec.md §1.4–1.8, §1.11), loop by loop, sharing no code
with ``pbs_jax``: per (batch, head), the last-block proxy softmax over complete-segment keys,
a descending stable argsort inside each segment, zero-padded mean pooling, block softmax over the
allowed blocks, inclusive top-p, sink by original token 0, own-segment blocks, and token-level
causal masking on original positions. Deviations from the official code follow the paper where
the design says so (a row whose allowed mass never reaches the threshold keeps all its blocks).
"""

from __future__ import annotations

import numpy as np


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def oracle_permutation(q, k, block_size, segment_size, gqa="replicate"):
    """q ``[B, N, Hq, D]``, k ``[B, N, Hk, D]`` → (perm ``[B, Hp, N]``, scores ``[B, Hp, G*S]``)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    b_, n, hq, d = q.shape
    hk = k.shape[2]
    group = hq // hk
    hp = hq if gqa == "replicate" else hk
    g = n // segment_size
    length = g * segment_size
    perm = np.zeros((b_, hp, n), np.int64)
    scores = np.zeros((b_, hp, length))
    for b in range(b_):
        for p in range(hp):
            heads = [p] if gqa == "replicate" else list(range(p * group, (p + 1) * group))
            acc = np.zeros(length)
            for h in heads:
                proxy = q[b, max(n - block_size, 0) :, h]  # the last block_size queries
                logits = proxy @ k[b, :length, h // group].T / np.sqrt(d)
                acc += _softmax(logits).mean(axis=0)
            acc /= len(heads)
            scores[b, p] = acc
            order = []
            for s in range(g):
                seg = acc[s * segment_size : (s + 1) * segment_size]
                order.append(np.argsort(-seg, kind="stable") + s * segment_size)
            order.append(np.arange(length, n))
            perm[b, p] = np.concatenate(order)
    return perm, scores


def oracle_block_mask(
    q, k, perm, block_size, segment_size, threshold, force_sink=True, permute=True
):
    """Block mask ``[B, Hq, T, T]`` bool for a given permutation (official MeanPooling selector)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    b_, n, hq, d = q.shape
    hk = k.shape[2]
    hp = perm.shape[1]
    t = -(-n // block_size)
    spb = segment_size // block_size
    mask = np.zeros((b_, hq, t, t), bool)
    for b in range(b_):
        for h in range(hq):
            p = h // (hq // hp)
            kp = k[b, perm[b, p], h // (hq // hk)]
            qpad = np.zeros((t * block_size, d))
            qpad[:n] = q[b, :, h]
            kpad = np.zeros((t * block_size, d))
            kpad[:n] = kp
            pq = qpad.reshape(t, block_size, d).mean(axis=1)
            pk = kpad.reshape(t, block_size, d).mean(axis=1)
            logits = pq @ pk.T / np.sqrt(d)
            sink_block = int(np.where(perm[b, p] == 0)[0][0]) // block_size
            for i in range(t):
                if permute:
                    allowed = [j for j in range(t) if j // spb < i // spb]
                    own = [j for j in range(t) if j // spb == i // spb]
                else:
                    allowed = [j for j in range(i + 1)]
                    own = [i]
                chosen = set(own)
                if force_sink:
                    chosen.add(sink_block if permute else 0)
                if allowed:
                    if threshold >= 1.0:
                        chosen.update(allowed)
                    else:
                        probs = _softmax(logits[i, allowed])
                        order = np.argsort(-probs, kind="stable")
                        cum = 0.0
                        taken = []
                        for o in order:
                            taken.append(allowed[o])
                            cum += probs[o]
                            if cum >= threshold:
                                break
                        chosen.update(
                            taken
                        )  # never reaching the threshold keeps every allowed block
                mask[b, h, i, sorted(chosen)] = True
    return mask


def oracle_attention(q, k, v, perm, block_mask, block_size):
    """Per query row: softmax over the slots of selected blocks whose original position <= row."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    b_, n, hq, d = q.shape
    hk = k.shape[2]
    hp = perm.shape[1]
    out = np.zeros((b_, n, hq, d))
    slot_block = np.arange(n) // block_size
    for b in range(b_):
        for h in range(hq):
            p = h // (hq // hp)
            kv = h // (hq // hk)
            for i in range(n):
                # Slot j is read when its block is selected and its original position <= i.
                selected = block_mask[b, h, i // block_size, slot_block] & (perm[b, p] <= i)
                slots = np.flatnonzero(selected)
                if not slots.size:
                    continue
                pos = perm[b, p, slots]
                w = _softmax(k[b, pos, kv] @ q[b, i, h] / np.sqrt(d))
                out[b, i, h] = w @ v[b, pos, kv]
    return out


def oracle_pbs(
    q, k, v, block_size, segment_size, threshold, force_sink=True, permute=True, gqa="replicate"
):
    """The whole op: (out ``[B, N, Hq, D]``, perm, block_mask) — dense causal when N <= S."""
    q = np.asarray(q, np.float64)
    b_, n, hq, _ = q.shape
    hp = hq if gqa == "replicate" else k.shape[2]
    t = -(-n // block_size)
    if n <= segment_size or not permute:
        perm = np.broadcast_to(np.arange(n), (b_, hp, n)).copy()
    else:
        perm, _ = oracle_permutation(q, k, block_size, segment_size, gqa)
    if n <= segment_size:
        mask = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b_, hq, t, t)).copy()
    else:
        mask = oracle_block_mask(
            q, k, perm, block_size, segment_size, threshold, force_sink, permute
        )
    return oracle_attention(q, k, v, perm, mask, block_size), perm, mask
