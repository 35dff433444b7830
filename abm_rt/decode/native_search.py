"""Batched beam search on the native ops (``abm_rt._C``): the decode step and the beam bookkeeping run
as C++ (CPU) or CUDA kernels, with no host synchronisation inside the loop except the "all done?"
check every ``check_every`` steps. Same rules and results as ``batched.beam_search`` (the oracle),
and the same back-tracking (``backtrack``).

On CUDA, ``cuda_graph=True`` replays ``check_every`` consecutive steps from one CUDA graph, so that a
graph launch and one host check cover them (at batch 1 the eager loop is bound by ~17 + 3 launches
per step). The graph bakes pointers in: every step updates one set of static state tensors in place,
and ``beam_select`` reads the step index from a device counter (``BeamState.step_ptr``) and writes
row t of whole history arrays; steps past ``max_len`` change nothing, so the search is the same.
``SearchGraphs`` keeps captured searches across calls (grids rounded up to a bucket, so shapes repeat) and
replays them with a new batch's inputs copied in.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from ..data.vocab import EOS_ID, SOS_ID
from .backtrack import SearchHistory, backtrack
from .native import NativeDecoder, NativeFeatures, NativeStepOutput
from .types import DecodedSequence, default_max_len

# Eager steps before a capture (torch's recipe; also raises the attention kernels' shared-memory
# limits, so that no cudaFuncSetAttribute happens while capturing).
_WARMUP_STEPS = 3


@dataclass
class _SearchState:
    """The search state on the decoder's device, updated in place by every step (B images x k slots,
    N = B * k rows, L grid cells); static, so a CUDA graph can replay steps on it."""

    prev: torch.Tensor         # [N] int32 input token of each row
    hidden: torch.Tensor       # [N, n] h_{t-1}
    coverage: torch.Tensor     # [N, L] beta_t
    score: torch.Tensor        # [B, k] live slots' raw scores, +inf for empty slots
    dead: torch.Tensor         # [B] int32 finished count
    done: torch.Tensor         # [B] uint8
    fin_score: torch.Tensor    # [B, k]
    fin_step: torch.Tensor     # [B, k] int32
    fin_cand: torch.Tensor     # [B, k] int32
    words: torch.Tensor        # [T, B, k] int32 history
    parents: torch.Tensor      # [T, B, k] int32 history
    sources: torch.Tensor      # [T, B, k] int32 history
    parent_rows: torch.Tensor  # [N] int32 old row continued by each new row
    all_done: torch.Tensor     # [1] int32
    step: torch.Tensor         # [1] int32 step counter (BeamState.step_ptr; the CUDA graph path)
    h0: torch.Tensor           # [N, n] initial hidden state, for reset
    sos: int
    t0: int = 0                # step of history row 0 (a compacted state's history starts where it was made)

    @classmethod
    def allocate(cls, h0: torch.Tensor, sos: int, B: int, k: int, L: int, T: int) -> _SearchState:
        """State for a search of at most T steps, reset to its start."""
        N, dev = B * k, h0.device
        i32, f32 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.float32, device=dev)
        s = cls(prev=torch.empty(N, **i32), hidden=torch.empty_like(h0), coverage=torch.empty(N, L, **f32),
                score=torch.empty(B, k, **f32), dead=torch.empty(B, **i32),
                done=torch.empty(B, dtype=torch.uint8, device=dev), fin_score=torch.empty(B, k, **f32),
                fin_step=torch.empty(B, k, **i32), fin_cand=torch.empty(B, k, **i32),
                words=torch.empty(T, B, k, **i32), parents=torch.empty(T, B, k, **i32),
                sources=torch.empty(T, B, k, **i32), parent_rows=torch.empty(N, **i32),
                all_done=torch.empty(1, **i32), step=torch.empty(1, **i32), h0=h0, sos=sos)
        s.reset()
        return s

    def reset(self) -> None:
        """Back to the start of the search, in place (a captured graph keeps the pointers)."""
        for f in fields(self):
            t = getattr(self, f.name)
            if isinstance(t, torch.Tensor) and t is not self.h0:
                t.zero_()
        self.prev.fill_(self.sos)
        self.hidden.copy_(self.h0)
        self.score.fill_(float("inf"))
        self.score[:, 0] = 0.0                              # one live hypothesis: empty, score 0
        self.fin_score.fill_(float("inf"))
        self.sources.fill_(-1)

    _PER_IMAGE = ("score", "dead", "done", "fin_score", "fin_step", "fin_cand")
    _PER_ROW = ("prev", "hidden", "coverage")
    _HISTORY = ("words", "parents", "sources")

    def subset(self, images: torch.Tensor, t0: int) -> _SearchState:
        """The state of ``images`` (int64 indices) alone, rows renumbered, with a history from step t0 on.

        Compaction: finished images leave the batch, so the decode step runs on live rows only. The new
        history starts empty (rows before t0 are the caller's to keep, see ``scatter_into``)."""
        B, k = self.score.shape
        rows = (images[:, None] * k + torch.arange(k, device=images.device)).reshape(-1)
        T, n = self.words.shape[0] + self.t0 - t0, images.numel()
        i32 = dict(dtype=torch.int32, device=images.device)
        picked = {f: getattr(self, f).index_select(0, images) for f in self._PER_IMAGE}
        picked.update({f: getattr(self, f).index_select(0, rows) for f in self._PER_ROW})
        return _SearchState(**picked, words=torch.zeros(T, n, k, **i32), parents=torch.zeros(T, n, k, **i32),
                            sources=torch.full((T, n, k), -1, **i32), parent_rows=torch.zeros(n * k, **i32),
                            all_done=torch.zeros(1, **i32), step=torch.zeros(1, **i32), h0=picked["hidden"],
                            sos=self.sos, t0=t0)

    def scatter_into(self, full: _SearchState, images: torch.Tensor, t1: int) -> None:
        """Write this (compacted) state's per-image results and its history rows [t0, t1) back into
        ``full`` at ``images``. Rows of an image after it finished are never read by ``backtrack``."""
        for f in self._PER_IMAGE:
            getattr(full, f).index_copy_(0, images, getattr(self, f))
        for f in self._HISTORY:
            getattr(full, f)[self.t0:t1].index_copy_(1, images, getattr(self, f)[:t1 - self.t0])

    def beam_state(self, decoder: NativeDecoder, eos: int):
        """A ``_C.BeamState`` on these tensors; the caller sets log_probs and the step/history fields."""
        B, k = self.score.shape
        st = decoder.beam_state()
        st.B, st.k, st.V, st.eos = B, k, decoder.K, eos
        st.score, st.dead, st.done = self.score.data_ptr(), self.dead.data_ptr(), self.done.data_ptr()
        st.fin_score, st.fin_step = self.fin_score.data_ptr(), self.fin_step.data_ptr()
        st.fin_cand, st.parent_rows = self.fin_cand.data_ptr(), self.parent_rows.data_ptr()
        st.all_done, st.prev_token = self.all_done.data_ptr(), self.prev.data_ptr()
        return st

    def point_at(self, st, t: int) -> None:
        """Point ``st`` at step t of the eager loop: t itself and this step's history rows."""
        r = t - self.t0
        st.step = t
        st.words, st.parents = self.words[r].data_ptr(), self.parents[r].data_ptr()
        st.sources = self.sources[r].data_ptr()

    def history(self, steps: int, valid: torch.Tensor, alphas: list[torch.Tensor] | None) -> SearchHistory:
        """The host copy of the first ``steps`` steps, for ``backtrack``."""
        def host(t):
            return t.cpu().numpy()

        return SearchHistory(
            words=host(self.words[:steps]), parents=host(self.parents[:steps]), sources=host(self.sources[:steps]),
            fin_score=host(self.fin_score), fin_step=host(self.fin_step), fin_cand=host(self.fin_cand),
            dead=host(self.dead), score=host(self.score), steps=steps, valid=host(valid),
            alphas=host(torch.stack(alphas)) if alphas is not None else None)


def _search_step(decoder: NativeDecoder, feats: NativeFeatures, row_image: torch.Tensor, s: _SearchState,
                 st) -> NativeStepOutput:
    """One decode step and its bookkeeping, in place on ``s`` (what the CUDA graph captures).

    beam_select writes the next tokens over ``s.prev`` (st.prev_token): safe, the decode step has
    read it before (earlier on the stream, or synchronously on the CPU). ``st.log_probs`` is set per
    call: a captured launch copies the BeamState, so each captured step reads its own log_probs.
    """
    out = decoder.step(feats, s.prev, s.hidden, s.coverage, row_image)
    st.log_probs = out.log_probs.data_ptr()
    decoder.beam_select(st)
    decoder.gather_rows(out.hidden, s.parent_rows, out=s.hidden)
    decoder.gather_rows(out.coverage.view(s.coverage.shape), s.parent_rows, out=s.coverage)
    return out


def _eager_search(decoder: NativeDecoder, feats: NativeFeatures, row_image: torch.Tensor, s: _SearchState,
                  eos: int, max_len: int, check_every: int, alphas: list[torch.Tensor] | None,
                  compact: bool) -> int:
    """Step by step from the host, into ``s``; returns the number of steps run.

    With ``compact``, every ``check_every`` steps (when the host looks at the done flags anyway) the
    finished images leave the working batch once at least an eighth of it (and one image) has
    finished: the step's cost then follows the live images, not the slowest image of the batch. Each
    row's arithmetic does not depend on the other rows, so the results are the same."""
    B, k = s.score.shape
    work, images = s, torch.arange(B, device=s.score.device)       # the working batch and its images in s
    st = work.beam_state(decoder, eos)
    steps = 0
    for t in range(max_len):
        work.point_at(st, t)
        out = _search_step(decoder, feats, row_image, work, st)
        if alphas is not None:
            a = out.alpha.view(-1, k, *out.alpha.shape[1:])
            alphas.append(a if work is s else a.new_zeros((B, *a.shape[1:])).index_copy_(0, images, a))
        steps = t + 1
        if (t + 1) % check_every:
            continue
        if not compact:
            if int(work.all_done.item()):
                break
            continue
        live = torch.nonzero(work.done == 0).flatten()                 # synchronises, like all_done
        n_live, n_work = live.numel(), images.numel()
        if n_live == 0:
            break
        if n_work - n_live >= max(1, n_work // 8):
            if work is not s:
                work.scatter_into(s, images, steps)
            work, images = work.subset(live, steps), images.index_select(0, live)
            feats = feats.subset(live)
            row_image = torch.arange(n_live, dtype=torch.int32, device=live.device).repeat_interleave(k)
            st = work.beam_state(decoder, eos)
    if work is not s:
        work.scatter_into(s, images, steps)
    return steps


@dataclass
class _CapturedSearch:
    """A search captured as one CUDA graph of G steps, with the static tensors it reads and writes."""

    decoder: NativeDecoder        # kept alive: the graph bakes its weights' pointers (and the key uses its id)
    feats: NativeFeatures         # static inputs: a new batch of this shape is copied in (``load``)
    row_image: torch.Tensor
    s: _SearchState
    st: object                    # the _C.BeamState the captured kernels were given
    graph: torch.cuda.CUDAGraph
    outs: list                    # the captured steps' outputs: graph memory, kept with it

    def load(self, feats: NativeFeatures, h0: torch.Tensor) -> None:
        """Copy a new batch (same shapes) into the static inputs and reset the search state."""
        for name in ("feats", "uaf", "hv", "wv"):
            getattr(self.feats, name).copy_(getattr(feats, name))
        self.s.h0.copy_(h0)
        self.s.reset()


class SearchGraphs:
    """Captured CUDA-graph searches kept across calls, one per decoder and shape (images, beam, feature grid,
    max_len, check_every, feature dtype), least recently used first out.

    Capturing costs a few eager steps and a graph instantiation per call, which at batch 1 outweighed
    what the replay saves (29.8 vs 21.2 ms per image on an H200); a service sees the same few shapes again
    and again, so keeping the graphs makes that a one-off. To make shapes repeat, ``pad`` rounds each batch's
    feature grid up to a multiple of ``bucket`` (rows, columns); the padded cells are masked, as in any padded
    batch. Each kept search holds its batch's feature and state tensors on the GPU (``nbytes``: at batch 1
    a few MB, at batch 256 on a 10 x 50 grid about 0.3 GB in FP16); at most ``capacity`` searches and
    ``max_bytes`` are kept."""

    def __init__(self, capacity: int = 64, max_bytes: int = 2 << 30, bucket: tuple[int, int] = (2, 8)):
        if capacity < 1 or max_bytes < 1 or min(bucket) < 1:
            raise ValueError(f"capacity, max_bytes and bucket must be >= 1, got {capacity}, {max_bytes}, {bucket}")
        self.capacity, self.max_bytes, self.bucket = capacity, max_bytes, tuple(bucket)
        self._kept: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.captures = 0
        self.reuses = 0

    def pad(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, D, H, W] and mask [B, H, W] zero- / False-padded to the bucket's multiples."""
        H, W = features.shape[-2:]
        dh, dw = -H % self.bucket[0], -W % self.bucket[1]
        if dh == 0 and dw == 0:
            return features, mask
        return (torch.nn.functional.pad(features, (0, dw, 0, dh)),
                torch.nn.functional.pad(mask.bool(), (0, dw, 0, dh), value=False))

    def get(self, key: tuple):
        """The search kept for ``key`` (now the most recently used), or None."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        self._kept.move_to_end(key)
        self.reuses += 1
        return kept[0]

    def put(self, key: tuple, entry, nbytes: int = 0) -> None:
        """Keep ``entry`` (of ``nbytes``); the least recently used beyond ``capacity`` or ``max_bytes`` are
        dropped, their graphs freed (the newest stays even alone over ``max_bytes``)."""
        self.captures += 1
        self._kept[key] = (entry, nbytes)
        self._kept.move_to_end(key)
        while len(self._kept) > 1 and (len(self._kept) > self.capacity or self.nbytes > self.max_bytes):
            self._kept.popitem(last=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the kept searches hold."""
        return sum(n for _, n in self._kept.values())

    def __len__(self) -> int:
        return len(self._kept)

    def info(self) -> dict:
        """Counters for ``Recognizer.info()``."""
        return {"kept": len(self._kept), "capacity": self.capacity, "mib": round(self.nbytes / 2**20, 1),
                "max_mib": round(self.max_bytes / 2**20, 1), "bucket": list(self.bucket),
                "captures": self.captures, "reuses": self.reuses}


def _tensor_bytes(*objs) -> int:
    """Bytes of the tensors held by dataclass instances (or lists of them)."""
    total = 0
    for obj in objs:
        for o in obj if isinstance(obj, list) else [obj]:
            for f in fields(o):
                t = getattr(o, f.name)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def _capture_search(decoder: NativeDecoder, feats: NativeFeatures, row_image: torch.Tensor, s: _SearchState,
                    eos: int, max_len: int, G: int) -> _CapturedSearch:
    """Capture G steps of the search on ``s`` into one CUDA graph (after a few eager warm-up steps)."""
    device = decoder.device
    st = s.beam_state(decoder, eos)
    st.step_ptr, st.max_steps = s.step.data_ptr(), max_len
    st.words, st.parents, st.sources = s.words.data_ptr(), s.parents.data_ptr(), s.sources.data_ptr()

    def step():
        return _search_step(decoder, feats, row_image, s, st)

    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)     # warm-up and capture stream (explicit: the right device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        s.reset()                            # the warm-up advanced the search
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            outs = [step() for _ in range(G)]
        s.reset()                            # capturing runs nothing; reset anyway (cheap, safe)
    return _CapturedSearch(decoder, feats, row_image, s, st, graph, outs)


def _replay_search(c: _CapturedSearch, max_len: int, G: int) -> int:
    """Replays the graph until every image is done or max_len steps ran; returns the number of steps
    (s.words etc. hold G * ceil(max_len / G) rows; steps past max_len change nothing)."""
    replays = 0
    with torch.cuda.device(c.decoder.device):
        while replays * G < max_len:
            c.graph.replay()
            replays += 1
            if int(c.s.all_done.item()):     # synchronises: the replay has finished
                break
    return min(replays * G, max_len)


@torch.no_grad()
def native_beam_search(decoder: NativeDecoder, features: torch.Tensor, mask: torch.Tensor, beam_size: int = 10,
                       max_len: int | None = None, return_attention: bool = False, check_every: int = 4,
                       sos: int = SOS_ID, eos: int = EOS_ID, cuda_graph: bool = False,
                       compact: bool = True, graphs: SearchGraphs | None = None,
                       keep_candidates: bool = False) -> list[DecodedSequence]:
    """Beam search for a padded batch (see ``batched.beam_search`` for the arguments).

    Args:
        check_every: steps between host checks whether every image is done (>= 1).
        cuda_graph: replay ``check_every`` steps at a time from a CUDA graph captured for this call
            (CUDA decoders only, without ``return_attention``); same results as the eager loop.
        compact: (eager loop) drop finished images from the working batch every ``check_every`` steps
            (see ``_eager_search``); same results, less work for batches of unequal expressions.
        graphs: with ``cuda_graph``, keep the captured search there and replay a kept one for a batch of the
            same shape (its inputs copied in) instead of capturing again.
    Raises:
        ValueError: bad beam_size or check_every; cuda_graph on a CPU decoder or with return_attention.
    """
    dev = decoder.device
    max_len = default_max_len() if max_len is None else max_len
    B, k = features.shape[0], beam_size
    if not 1 <= k <= 64:
        raise ValueError(f"beam_size must be in 1..64 for the native search, got {k}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if cuda_graph and (dev.type != "cuda" or return_attention):
        raise ValueError("cuda_graph=True needs a CUDA decoder and return_attention=False "
                         f"(got device {dev}, return_attention={return_attention})")
    mask = mask.to(dev).bool()
    if cuda_graph and graphs is not None:        # grids rounded up to a bucket, so that kept graphs fit again
        features, mask = graphs.pad(features.to(dev), mask)
    # feats and row_image are read by every step (a captured graph bakes their pointers): they live
    # until this function returns, after the last replay.
    feats = decoder.prepare(features.to(dev), mask)
    row_image = torch.arange(B, dtype=torch.int32, device=dev).repeat_interleave(k)
    h0 = decoder.initial_state(features.to(dev), mask).index_select(0, row_image.long()).contiguous()
    if cuda_graph:
        key = (id(decoder), B, k, feats.H, feats.W, max_len, check_every, feats.feats.dtype, sos, eos)
        captured = graphs.get(key) if graphs is not None else None
        if captured is None:
            T = math.ceil(max_len / check_every) * check_every
            s = _SearchState.allocate(h0.clone(), sos, B, k, feats.H * feats.W, T)
            captured = _capture_search(decoder, feats, row_image, s, eos, max_len, check_every)
            if graphs is not None:
                graphs.put(key, captured, _tensor_bytes(feats, s, captured.outs))
        else:
            captured.load(feats, h0)
        steps = _replay_search(captured, max_len, check_every)
        return backtrack(captured.s.history(steps, mask, None), keep_candidates)
    s = _SearchState.allocate(h0, sos, B, k, feats.H * feats.W, max_len)
    alphas = [] if return_attention else None
    steps = _eager_search(decoder, feats, row_image, s, eos, max_len, check_every, alphas, compact)
    return backtrack(s.history(steps, mask, alphas), keep_candidates)
