"""Run the fp32 reference model and record every node of the canonical graph with forward hooks.

The model runs on ``device`` (the side resolves ``reference.device`` and sets torch's numerics first:
actdiff.reference_device); ids go to the device and every captured node comes back to the host as float32
or int64 numpy arrays. Prompts run at batch 1 by default. With a larger batch, prompts of similar length are
grouped (see :meth:`ReferenceRunner.run`), sequences are padded on the right with the model's pad id and an attention
mask; only each prompt's real tokens are kept, so the values equal the batch-1 values within float32
rounding of the padded attention and GEMM blocking (tests/test_reference_model.py checks 1e-6).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .batching import MAX_BATCH_TOKENS, batched_in_order, window_tokens_for
from .models.pooling import MeanPoolNormalize
from .nodes import ARCH_BERT, Graph

log = logging.getLogger(__name__)


class ReferenceRunner:
    def __init__(self, model: torch.nn.Module, graph: Graph, device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.graph = graph
        # a model that pools in its own forward (NomicBertMoeModel.pool) is tapped there; a plain HF encoder
        # (BertModel) returns token states only, so the runner pools with the same module class after it
        own = getattr(model, "pooling", None)
        self.pools_in_forward = isinstance(own, MeanPoolNormalize)
        self.pooling = own if self.pools_in_forward else MeanPoolNormalize().to(self.device)
        self._captured: dict[str, torch.Tensor] = {}
        self._emit = None  # while streaming: where a hook hands a node's value (run_batch_into)
        self._handles = []
        modules = dict(model.named_modules())
        modules.update({f"pooling.{k}": m for k, m in self.pooling.named_modules() if k})
        missing = [n.name for n in graph if n.tap[0] not in modules]
        if missing:
            raise RuntimeError(f"reference model has no module for node(s) {missing[:5]}: graph and model disagree")
        by_tap: dict[tuple[str, str], list[str]] = {}
        for n in graph:
            by_tap.setdefault(tuple(n.tap), []).append(n.name)
        for (path, kind), names in by_tap.items():
            mod = modules[path]
            if kind == "output":
                h = mod.register_forward_hook(self._out_hook(names))
            else:
                h = mod.register_forward_pre_hook(self._in_hook(names))
            self._handles.append(h)

    def _out_hook(self, names):
        def hook(_mod, _args, output):
            t = output[0] if isinstance(output, tuple) else output
            for n in names:
                self._take(n, t.detach())

        return hook

    def _in_hook(self, names):
        def hook(_mod, args):
            for n in names:
                self._take(n, args[0].detach())

        return hook

    def _take(self, name: str, t: torch.Tensor) -> None:
        """A node's value as its hook sees it: held until the batch's forward ends, or, while streaming
        (:meth:`run_batch_into`), handed on now."""
        if self._emit is None:
            self._captured[name] = t
        else:
            self._emit(name, t)

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _forward(self, batch_ids: list[list[int]]) -> int:
        """The model on prompts (token id lists) as one right-padded batch, the hooks taking every node; returns
        the padded length."""
        B = len(batch_ids)
        S = max(len(x) for x in batch_ids)
        pad = self.graph.dims.pad_token_id
        ids = torch.full((B, S), pad, dtype=torch.long)
        mask = torch.zeros((B, S), dtype=torch.long)
        for b, seq in enumerate(batch_ids):
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra = {"token_type_ids": torch.zeros_like(ids)} if self.graph.dims.arch == ARCH_BERT else {}
        hidden = self.model(input_ids=ids, attention_mask=mask, **extra)[0]  # a ModelOutput: last_hidden_state
        if not self.pools_in_forward:
            self.pooling(hidden, mask)
        return S

    def _per_prompt(self, name: str, t: torch.Tensor, batch_ids: list[list[int]], S: int) -> list[np.ndarray]:
        """A node's batch value as each prompt's numpy array (float32 or int64), its real tokens only, as views."""
        n, B = self.graph[name], len(batch_ids)
        trailing = self.graph.trailing_shape(name)
        # MoE nodes are captured flat as (B*S, ...)
        t = t.reshape(B, 1, *trailing) if n.axis == "prompt" else t.reshape(B, S, *trailing)
        arr = t.to(torch.int64 if n.kind == "index" else torch.float32).cpu().numpy()
        return [arr[b] if n.axis == "prompt" else arr[b, : len(seq)] for b, seq in enumerate(batch_ids)]

    @torch.inference_mode()
    def run_batch(self, batch_ids: list[list[int]]) -> list[dict[str, np.ndarray]]:
        """Run prompts (token id lists) as one right-padded batch; return per-prompt node values."""
        self._captured.clear()
        S = self._forward(batch_ids)
        out: list[dict[str, np.ndarray]] = [{} for _ in batch_ids]
        for n in self.graph:
            for b, a in enumerate(self._per_prompt(n.name, self._captured[n.name], batch_ids, S)):
                out[b][n.name] = a
        return out

    @torch.inference_mode()
    def run_batch_into(self, batch_ids: list[list[int]], put) -> None:
        """:meth:`run_batch`'s values handed to ``put(b, name, value)`` (``b``: the prompt's place in the batch) as
        each node's hook fires: no batch's values are held (actdiff.batching.stream_batches)."""
        S = max(len(x) for x in batch_ids)

        def emit(name, t):
            for b, a in enumerate(self._per_prompt(name, t, batch_ids, S)):
                put(b, name, a)

        self._emit = emit
        try:
            self._forward(batch_ids)
        finally:
            self._emit = None

    def run(
        self,
        prompts: Iterable[tuple[str, list[int]]],
        batch_size: int = 1,
        progress_every: int = 100,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
        """Stream (prompt_id, node values) for prompts in their input order, a batch at a time.

        With batch_size > 1, prompts are taken a window of 8 batches at a time and sorted by length inside
        the window, so a batch pads little (the shard order is a hash order, lengths are random); a batch
        holds at most ``batch_size`` prompts and ``max_batch_tokens`` padded tokens (so a batch of 512-token
        prompts is smaller than one of short prompts: memory per batch is bounded, not per prompt count).
        Results are yielded in the input order, so memory is bounded by the window, not the corpus, and a
        window closes at 2 GiB of results (actdiff.batching: the engine side batches the same way)."""
        t0 = time.perf_counter()
        total = len(prompts) if hasattr(prompts, "__len__") else None
        window = window_tokens_for(self.graph)  # as the engines' (actdiff.batching)
        for done, item in enumerate(batched_in_order(prompts, self.run_batch, batch_size, max_batch_tokens, window), 1):
            yield item
            if done % progress_every == 0:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                of = f"/{total}" if total is not None else ""
                log.info("reference: %d%s prompts done (%.1f prompts/s)", done, of, rate)
