"""``python -m aiokvpipe.bench blocks``: paged KV block transfers against today's API.

Workload (issue 13): ``--layers`` (8) layers in vLLM's CPU layout, bf16
blocks of 16 tokens x 8 kv heads x 128 dims for K and V (64 KiB a block per
layer), a request of ``--blocks`` (256) scattered blocks: 128 MiB. Two
spawned processes per event loop (:mod:`aiokvpipe.bench.blocks_workers`).

Figures, each beside a baseline measured in the same processes:

* pull of the request vs ``index_select`` gather -> Pipe send -> recv ->
  ``index_copy_`` scatter (target: >= 1.5x faster);
* pull throughput vs the Pipe's throughput for one contiguous tensor of the
  same bytes (target: >= 0.8x);
* layer-wise push with ``--compute-ms`` (2 ms) of simulated compute per
  layer vs max(compute alone, transfer alone) (target: <= 1.15x), and the
  same time vs the pipeline's floor (context, same target): with ``L``
  layers of compute ``C`` each and ``T`` to transfer them all, the first
  layer's transfer cannot start before its compute ends and the last one's
  cannot overlap any, so no schedule beats ``max(L*C + T/L, C + T)``
  (= ``max(L*C, T) + min(C, T/L)``); for the default workload that floor is
  a few percent above max(compute, transfer), so the 1.15x target stands;
* the layer-wise push's time over the whole write's, beside the same
  ratio for a bare socket (tcp, :mod:`.raw_push`) or a bare shared-memory
  ring (shm, :mod:`.raw_ring_push`) in the same processes (context: what
  the kernel, the copies and the loop cost a layer-wise push here);
* a 16-block read, p50, vs a Pipe round trip of the same bytes (target:
  <= 2x);
* context: one core copying the request's scattered blocks through a
  ring-sized chunk (the shm path's own copy loops, the slower of gather and
  scatter) against the same bytes as one contiguous tensor: the ceiling the
  memory puts on shm pull throughput against the Pipe's contiguous copy.

Each figure is measured per ``--transport``: ``tcp`` (block payloads go
``sendmsg`` / ``recvmsg_into`` on the blocks themselves) and ``shm`` (one
copy per side through a shared-memory ring per connection direction); the
Endpoint and the Pipe baselines are forced onto the same transport.
"""

from __future__ import annotations

import argparse
import secrets

from ..ports import free_port
from .blocks_workers import BLOCK, worker
from .procs import percentile, run_pair
from .report import Progress, Result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=8, help="registered layers (default 8)")
    parser.add_argument(
        "--blocks", type=int, default=0, help="blocks in the request (default 256, 32 --quick)"
    )
    parser.add_argument(
        "--iters", type=int, default=0, help="large transfers per figure (default 10, 2 --quick)"
    )
    parser.add_argument(
        "--small-iters", type=int, default=0, help="16-block reads (default 300, 20 --quick)"
    )
    parser.add_argument("--compute-ms", type=float, default=2.0, help="simulated compute/layer")
    parser.add_argument("--transport", choices=("tcp", "shm", "both"), default="both")


def run(args: argparse.Namespace) -> list[Result]:
    count = args.blocks or (32 if args.quick else 256)
    iters = args.iters or (2 if args.quick else 10)
    small_iters = args.small_iters or (20 if args.quick else 300)
    layers = args.layers
    num_blocks = 2 * count  # room to scatter the request
    nbytes = count * layers * 2 * BLOCK[0] * BLOCK[1] * BLOCK[2] * 2
    small_bytes = nbytes * 16 // count
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    chosen = getattr(args, "transport", "both")
    transports = ["tcp", "shm"] if chosen == "both" else [chosen]
    progress = Progress(len(loops) * len(transports), "blocks")
    results: list[Result] = []
    for loop_name, transport in ((lp, tr) for tr in transports for lp in loops):
        got = run_pair(
            worker,
            (free_port(), free_port()),
            secrets.token_hex(16),
            loop_name,
            layers,
            num_blocks,
            count,
            iters,
            small_iters,
            args.compute_ms,
            transport,
        )
        progress.step(f"{transport}, {loop_name}")
        extra = {"loop": loop_name, "transport": transport, "bytes": nbytes, "blocks": count}
        mib = nbytes / (1 << 20)
        what = f"{count} blocks x {layers} layers ({mib:.0f} MiB), {transport}, {loop_name}"
        pull, gather = percentile(got["pull"], 0.5), percentile(got["gather"], 0.5)
        contig = percentile(got["contig"], 0.5)
        transfer = percentile(got["transfer"], 0.5)
        compute = percentile(got["compute"], 0.5)
        overlap = percentile(got["overlap"], 0.5)
        small, pipe_small = percentile(got["small"], 0.5), percentile(got["pipe_small"], 0.5)
        bound = max(compute, transfer)
        per_layer = compute / layers
        floor = max(compute + transfer / layers, per_layer + transfer)
        results += [
            Result(
                "blocks",
                f"pull p50, {what}",
                pull * 1e3,
                "ms",
                "index_select -> Pipe -> index_copy_",
                gather * 1e3,
                ">= 1.5x faster",
                pull * 1.5 <= gather,
                extra,
            ),
            Result(
                "blocks",
                f"pull throughput, {what}",
                nbytes / pull / 1e9,
                "GB/s",
                "Pipe, one contiguous tensor of the same bytes",
                nbytes / contig / 1e9,
                ">= 0.80x",
                pull * 0.8 <= contig,
                extra,
            ),
            Result(
                "blocks",
                f"layer-wise push, {args.compute_ms:g} ms compute/layer, {what}",
                overlap * 1e3,
                "ms",
                f"max(compute {compute * 1e3:.1f} ms, transfer {transfer * 1e3:.1f} ms)",
                bound * 1e3,
                "<= 1.15x",
                overlap <= 1.15 * bound,
                {**extra, "floor_over_bound": floor / bound},
            ),
            Result(
                "blocks",
                f"layer-wise push vs the pipeline floor, {what}",
                overlap * 1e3,
                "ms",
                f"floor max(L*C + T/L, C + T) = {floor / bound:.2f}x max(compute, transfer)",
                floor * 1e3,
                "<= 1.15x",
                overlap <= 1.15 * floor,
                extra,
            ),
        ]
        if "raw_wise" in got:
            bare = "a bare socket" if transport == "tcp" else "a bare shared-memory ring"
            results.append(
                Result(
                    "blocks",
                    f"layer-wise push / max(compute, whole write), {what}",
                    _over_bound(got["overlap"], got["transfer"], compute),
                    "x",
                    f"{bare}'s layer-wise push / max(compute, its whole send), same bytes",
                    _over_bound(got["raw_wise"], got["raw_whole"], compute),
                    "context",
                    None,
                    {
                        **extra,
                        "floor_over_bound": floor / bound,
                        # p50s, ms: whether the bare copy is bound by its send or the compute
                        "bare_whole_ms": percentile(got["raw_whole"], 0.5) * 1e3,
                        "bare_wise_ms": percentile(got["raw_wise"], 0.5) * 1e3,
                        "compute_ms": compute * 1e3,
                    },
                )
            )
        if "copy_gather" in got:
            # One core's copy through a ring-sized chunk: the slower direction
            # bounds a pipelined two-sided copy (what the shm path does).
            blocks_copy = max(
                percentile(got["copy_gather"], 0.5), percentile(got["copy_scatter"], 0.5)
            )
            flat_copy = max(
                percentile(got["copy_contig_in"], 0.5), percentile(got["copy_contig_out"], 0.5)
            )
            results.append(
                Result(
                    "blocks",
                    f"one-core copy of the request's blocks (slower of gather, scatter), {what}",
                    nbytes / blocks_copy / 1e9,
                    "GB/s",
                    "the same bytes as one contiguous tensor",
                    nbytes / flat_copy / 1e9,
                    "context",
                    None,
                    extra,
                )
            )
        results += [
            Result(
                "blocks",
                f"16-block read p50 ({small_bytes >> 20} MiB), {transport}, {loop_name}",
                small * 1e6,
                "us",
                "Pipe round trip of the same bytes",
                pipe_small * 1e6,
                "<= 2x",
                small <= 2 * pipe_small,
                {**extra, "bytes": small_bytes, "blocks": 16},
            ),
        ]
    return results


def _over_bound(wise: list[float], whole: list[float], compute: float) -> float:
    """p50 of per-round layer-wise / max(compute, that round's whole send).

    The issue's bound: where a bare copy is faster than the compute (a ring
    copying contiguous bytes), the compute bounds its push, not its whole send.
    """
    return percentile([w / max(compute, t) for w, t in zip(wise, whole, strict=True)], 0.5)
