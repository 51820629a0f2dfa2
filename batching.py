"""Log-probs and micro-batches, fast: the speed and memory tricks both stages call in one line, each stating what
it equals (fused log-softmax with a hand-written backward, micro-batches by token budget, the shared-prompt row
layout and its attention, the CPU allocator setting) and each proved by a test in tests/test_train_grlo.py.
Importing it has no side effects (the shared-prompt attention registers only when a model asks for it).
"""

import ctypes
import functools
import os
from typing import Optional

import torch


class TokenLogProbs(torch.autograd.Function):
    """Equals `(log_softmax(z).gather(targets), entropy(softmax(z)))` with z = logits.float() / T, computed in fp32
    `chunk` rows at a time (tests/test_train_grlo.py checks values and gradients against autograd).

    Autograd through log_softmax keeps an (N, V) fp32 softmax for backward (or recomputes the whole
    chunk under checkpointing). Here backward rebuilds p = exp(z - logZ) from the logits it already
    holds and the saved log-normaliser, and applies the closed-form gradients:
        d log p_y / dz = onehot(y) - p        dH / dz = -p * (log p + H)        (then / T for d/d logits)
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature: float, chunk: int):  # logits (N, V), targets (N,)
        logz, logprobs, entropy = [], [], []
        for i in range(0, logits.shape[0], chunk):
            z = logits[i : i + chunk].float() / temperature
            lz = torch.logsumexp(z, dim=-1)
            logz.append(lz)
            logprobs.append(z.gather(-1, targets[i : i + chunk, None]).squeeze(-1) - lz)
            entropy.append(lz - (torch.exp(z - lz[:, None]) * z).sum(-1))
        logz, logprobs, entropy = torch.cat(logz), torch.cat(logprobs), torch.cat(entropy)
        ctx.save_for_backward(logits, targets, logz, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)  # an unused output (entropy, usually) arrives as None: skip its term
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, logz, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for i in range(0, logits.shape[0], ctx.chunk):
            s = slice(i, i + ctx.chunk)
            logp = logits[s].float() / ctx.temperature - logz[s, None]  # (n, V) log p
            p = logp.exp()
            g = -grad_logprobs[s, None] * p if grad_logprobs is not None else torch.zeros_like(p)
            if grad_logprobs is not None:
                g[torch.arange(len(g), device=g.device), targets[s]] += grad_logprobs[s]
            if grad_entropy is not None:
                g -= grad_entropy[s, None] * p * (logp + entropy[s, None])
            torch.div(g, ctx.temperature, out=grad[s])  # straight into the slice: no temporary, no copy
        return grad, None, None, None


def completion_logprobs(model, batch: dict, temperature: float, chunk_tokens: Optional[int] = None):
    """Equals, per completion token of each sample in a `collate` micro-batch,
    `log_softmax(model(prompt + completion).logits / T).gather(completion)` and the entropy of that softmax, as if
    the sample were forwarded alone: two (b, C) tensors, zero-padded after each completion
    (tests/test_train_grlo.py compares both, with and without the shared prompt, against that reference).

    The lm_head runs only on the columns in batch["logits_keep"], the ones that predict completion tokens, and
    `TokenLogProbs` takes the fp32 log-softmax `chunk_tokens` rows at a time, so a full (b, C, V) fp32 softmax
    never exists, not even for backward: at 16K tokens x 151,936 vocabulary it would take 10 GiB. Default chunk:
    1024 rows on GPU (few kernel launches); on CPU ~1 MB of fp32 logits, which stays in cache for the dozen passes
    over each row (measured 4-5x faster than 1024-row chunks on SmolLM2's 49k vocabulary)."""
    return logprobs_from_logits(model(**model_inputs(batch)).logits, batch, temperature, chunk_tokens)


def model_inputs(batch: dict) -> dict:
    """The forward's keyword arguments for a `collate` micro-batch: logits only on the columns that predict
    completion tokens (`logits_keep`), the shared-prompt layout if any."""
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=batch["logits_keep"],
                shared_prefix_slots=batch["shared_prefix_slots"])  # fmt: skip


def logprobs_from_logits(logits, batch: dict, temperature: float, chunk_tokens: Optional[int] = None):
    """`completion_logprobs` after the forward: logits (rows, S*C, V) of the kept columns -> (b, C) log-probs and
    entropies (train_ppo.py runs one forward for the policy and the critic, then this)."""
    C, V = batch["completion_ids"].shape[1], logits.shape[-1]
    logits = logits.reshape(-1, C, V)  # one row per slot
    if logits.shape[0] != len(batch["slot_rows"]):  # a group with fewer than S samples leaves empty slots
        logits = logits[batch["slot_rows"]]
    chunk = chunk_tokens or (max(1, 2**18 // V) if logits.device.type == "cpu" else 1024)
    targets = batch["completion_ids"].reshape(-1)
    logprobs, entropy = TokenLogProbs.apply(logits.reshape(-1, V), targets, temperature, chunk)
    return logprobs.view(-1, C), entropy.view(-1, C)


def prompt_groups(indices: list, prompt_ids: list, group_size: int) -> list:
    """Runs of consecutive indices with the same prompt, at most group_size long (the rollout keeps each
    group's G samples contiguous). group_size 1 gives one sample per run."""
    groups = []
    for i in indices:
        if groups and len(groups[-1]) < group_size and prompt_ids[groups[-1][-1]] == prompt_ids[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def make_microbatches(prompt_ids: list, completion_ids: list, token_budget: int, group_size: int = 1, indices=None):
    """Split sample `indices` (default: all) into micro-batches whose padded size (rows x (P + S*C)) fits the token
    budget. Equals: a partition of `indices`; only the gradient-accumulation split changes.

    A row is one sample, or with group_size > 1 (--share-prompt) one group: its prompt once and S slots of
    C columns (see collate); groups are never split here. Sorting rows by length first keeps padding low; a
    row larger than the budget gets its own micro-batch. Returns lists of sample indices, groups contiguous."""
    size = lambda g: (len(prompt_ids[g[0]]), max(len(completion_ids[i]) for i in g), len(g))  # noqa: E731
    batches, cur, p_max, c_max, s_max = [], [], 0, 0, 0
    indices = range(len(prompt_ids)) if indices is None else indices
    for g in sorted(prompt_groups(indices, prompt_ids, group_size), key=size):
        p, c, s = (max(a, b) for a, b in zip(size(g), (p_max, c_max, s_max)))
        if cur and (len(cur) + 1) * (p + s * c) > token_budget:
            batches.append(cur)
            cur, (p, c, s) = [], size(g)
        cur.append(g)
        p_max, c_max, s_max = p, c, s
    return [[i for g in b for i in g] for b in batches + [cur] if b]


def collate(indices: list, prompt_ids: list, completion_ids: list, pad_id: int, device, group_size: int = 1) -> dict:
    """Model inputs for a micro-batch, read by `completion_logprobs`. completion_ids and completion_mask come out
    as (b, C), one row per sample in `indices` order, and completion_mask is 1 exactly on completion tokens, so
    prompt and pad tokens never enter the loss.

    Each row holds one group from prompt_groups: its prompt once (left-padded to end at column P-1), then S
    slots of C columns, one completion per slot. S = 1 (group_size 1) is the usual prompt + completion row with
    a 2-D padding mask. With --share-prompt (S = G) every slot's positions continue from the prompt's end and
    the attention mask lets a token see the prompt and the earlier tokens of its own slot only, so each
    completion gets exactly the logits it would get in a row of its own, and the prompt is forwarded (and
    back-propagated) once per group instead of G times. logits_keep lists, slot by slot, the columns whose
    logits predict the slot's tokens: P-1 (the prompt's last token) for the first one, then the slot's own
    columns. shared_prefix_slots = (S, C) lets `shared_prefix_attention` skip the blocks the mask hides."""
    groups = prompt_groups(indices, prompt_ids, group_size)
    P = max(len(prompt_ids[g[0]]) for g in groups)
    C = max(max(len(completion_ids[i]) for i in indices), 1)
    S = max(len(g) for g in groups)
    L = P + S * C
    ids = torch.full((len(groups), L), pad_id, dtype=torch.long)
    seg = torch.full((len(groups), L), -1)  # -1 padding, 0 prompt, k + 1 slot k
    pos = torch.zeros(len(groups), L, dtype=torch.long)
    comp = torch.full((len(indices), C), pad_id, dtype=torch.long)
    cmask = torch.zeros(len(indices), C)
    slot_rows = []  # which slot (row * S + k) holds each sample, in order
    for r, g in enumerate(groups):
        p = torch.tensor(prompt_ids[g[0]], dtype=torch.long)
        ids[r, P - len(p) : P], seg[r, P - len(p) : P], pos[r, P - len(p) : P] = p, 0, torch.arange(len(p))
        for k, i in enumerate(g):
            c = torch.tensor(completion_ids[i], dtype=torch.long)
            s = P + k * C
            ids[r, s : s + len(c)], seg[r, s : s + len(c)] = c, k + 1
            pos[r, s : s + len(c)] = torch.arange(len(p), len(p) + len(c))
            comp[len(slot_rows), : len(c)], cmask[len(slot_rows), : len(c)] = c, 1
            slot_rows.append(r * S + k)
    keep = torch.cat([torch.cat([torch.tensor([P - 1]), torch.arange(P + k * C, P + k * C + C - 1)]) for k in range(S)])
    attn = (seg >= 0).long() if S == 1 else shared_prefix_mask(seg)  # (rows, L) or (rows, 1, L, L)
    batch = {
        "input_ids": ids,
        "attention_mask": attn,
        "position_ids": pos,
        "logits_keep": keep,
        "slot_rows": torch.tensor(slot_rows),
        "completion_ids": comp,
        "completion_mask": cmask,
    }
    return {k: v.to(device) for k, v in batch.items()} | {"shared_prefix_slots": (S, C) if S > 1 else None}


def pad_values(values: list, indices: list, width: int, device) -> torch.Tensor:
    """Right-pad per-sample 1-D values (lists or tensors, e.g. log-probs) to (len(indices), width)."""
    out = torch.zeros(len(indices), width, device=device)
    for row, i in enumerate(indices):
        v = torch.as_tensor(values[i], dtype=torch.float32, device=device)
        out[row, : len(v)] = v
    return out


def shared_prefix_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) boolean attention mask for rows that pack one shared prefix and several continuations
    (`collate` with --share-prompt, `reward.RewardModel(share_prefix=True)`). seg (B, L): 0 on the prefix, k + 1
    on continuation k, -1 on padding. A token sees the prefix and the earlier tokens of its own continuation
    only; every row also sees itself, because a fully masked row (padding) would give NaN."""
    L = seg.shape[1]
    q, kv = seg[:, :, None], seg[:, None, :]
    mask = torch.ones(L, L, dtype=torch.bool).tril() & (kv >= 0) & ((kv == 0) | (kv == q))
    return (mask | torch.eye(L, dtype=torch.bool))[:, None]


def shared_prefix_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, shared_prefix_slots=None, **kwargs
):
    """Equals sdpa with the whole `shared_prefix_mask`, for rows laid out as [prefix: P columns | S slots of C
    columns] (tests/test_reward.py compares the two).

    That mask is False everywhere except three kinds of blocks: prefix x prefix, slot k x prefix and slot k x
    slot k. sdpa with the whole (L, L) mask still scores every pair, about 3x the needed work for 4 slots of
    64 tokens after a 47-token prompt. Here the prefix and the slots get one sdpa call each, a slot's queries
    attending over P + C keys (its row's prefix, then itself) instead of L, so only the skipped, fully masked
    blocks differ from plain sdpa, and they contributed nothing. The caller passes shared_prefix_slots=(S, C)
    to the model's forward; any forward without it (HF generate, a 2-D mask) is plain sdpa.
    query (B, H, L, D); key, value (B, H_kv, L, D); attention_mask (B, 1, L, L) bool. Returns (B, L, H, D)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if shared_prefix_slots is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    S, C = shared_prefix_slots
    B, H, L, D = query.shape
    P = L - S * C
    key, value = repeat_kv(key, H // key.shape[1]), repeat_kv(value, H // value.shape[1])  # GQA: one per head
    sdpa = functools.partial(
        torch.nn.functional.scaled_dot_product_attention, scale=scaling, dropout_p=dropout if module.training else 0.0
    )
    mask = attention_mask[:, 0]  # (B, L, L)
    out_prefix = sdpa(query[:, :, :P], key[:, :, :P], value[:, :, :P], attn_mask=mask[:, None, :P, :P])  # (B, H, P, D)

    def by_slot(x):  # (B, H, L, D) -> (B*S, H, C, D): slot k of row b becomes row b*S + k
        return x[:, :, P:].unflatten(2, (S, C)).transpose(1, 2).flatten(0, 1)

    def prefix_then_slot(x):  # (B, H, L, D) -> (B*S, H, P + C, D)
        prefix = x[:, None, :, :P].expand(B, S, H, P, D).flatten(0, 1)
        return torch.cat([prefix, by_slot(x)], dim=2)

    rows = mask[:, P:].unflatten(1, (S, C))  # (B, S, C, L): the mask rows of slot k's queries
    own = rows[..., P:].unflatten(-1, (S, C)).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, S, C, C): k x k
    slot_mask = torch.cat([rows[..., :P], own], dim=-1).flatten(0, 1)[:, None]  # (B*S, 1, C, P + C)
    out = sdpa(by_slot(query), prefix_then_slot(key), prefix_then_slot(value), attn_mask=slot_mask)  # (B*S, H, C, D)
    out = out.unflatten(0, (B, S)).transpose(1, 2).flatten(2, 3)  # (B, H, S*C, D)
    return torch.cat([out_prefix, out], dim=2).transpose(1, 2).contiguous(), None


SHARED_PREFIX_ATTENTION = "grlo_shared_prefix"  # registered by use_shared_prefix_attention, on first use


def use_shared_prefix_attention(model, name: str) -> None:
    """Switch a model loaded with sdpa attention to `shared_prefix_attention` (registering it with transformers on
    first use), for --share-prompt rows: the policy and reference, and RewardModel(share_prefix=True). Other
    attentions would misread the bool mask (eager adds it as 0/1), so they are refused, naming the model."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if model.config._attn_implementation not in ("sdpa", SHARED_PREFIX_ATTENTION):
        raise ValueError(
            f"{name}: --share-prompt needs sdpa attention, the model uses "
            f"{model.config._attn_implementation!r}: use --no-share-prompt"
        )
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)  # 2-D masks: built as for sdpa
    model.set_attn_implementation(SHARED_PREFIX_ATTENTION)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS. Used on CPU only.

    Every step frees gigabytes of activations and allocates them again. By default glibc gives large blocks
    back to the OS (munmap, heap trim), so the next step writes to fresh pages, and each fresh page costs a
    page fault plus zeroing: 1-4 GiB/s on our VMs, against ~12 GiB/s for memory that is reused. With this
    setting every block comes from the heap (M_MMAP_MAX 0: no block gets a mapping of its own, not even the
    400 MB logits) and the heap is never trimmed (M_TRIM_THRESHOLD -1), so once the heap has grown to a
    step's peak (a step or two later than that, where small objects left between the big blocks fragment
    it), a step reuses the pages of the last one. The process keeps its peak memory until it exits.
    Measured on the cpu-smollm2 preset in docs/train_grlo.md "Speed on CPU". Equals: nothing changes
    but where freed memory goes (tests/test_train_grlo.py counts the page faults). Returns False where the C library
    has no mallopt (not glibc), or if GRLO_KEEP_FREED_MEMORY=0 (glibc's defaults, for an A/B)."""
    if os.environ.get("GRLO_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # constants from glibc's <malloc.h>
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
