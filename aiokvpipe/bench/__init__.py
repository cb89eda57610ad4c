"""Benchmarks: ``python -m aiokvpipe.bench {pipe,ring,cuda,kv,all}``.

Every figure is printed beside a baseline measured in the same run on the
same machine (raw sockets, memcpy, gloo...), because the machines this runs on
are noisy: ratios travel, absolute numbers do not.
"""
