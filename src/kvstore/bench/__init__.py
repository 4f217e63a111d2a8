"""``kvstore bench``: store/retrieve throughput of each tier against a raw baseline.

For every tier and layout the bench opens a store with that tier alone, then
per repeat stores N fresh chunks (``store`` + ``flush``) and retrieves them
into a preallocated tensor, interleaved with a raw baseline that moves the
same bytes with no store in between:

- cpu: ``dst.copy_(src)`` per chunk between pre-touched host tensors;
- nvme: O_DIRECT ``pwrite``/``pread`` of one file per chunk, from and into
  pre-touched page-aligned ``mmap`` buffers, on as many threads as the
  driver's ``io_threads``, in the same directory as the store's files;
- a remote tier given with ``--url``: the raw client its driver ships as
  ``<driver package>.baseline.RawClientBaseline`` (redis-py pipelined
  SET/GET, botocore put/get, fsspec pipe/cat, Mooncake put_from/get_into),
  talking to the same server with the same settings.

Throughput is KV payload bytes (``layout.nbytes(chunk_tokens) * N``) over
wall time, in GB/s (10**9 bytes); the ratio is kvstore over baseline. Each
figure is the median of the timed repeats, after untimed warm-up repeats that
fault in the store's pooled buffers. Retrieve runs with payload verification
on (the default) and off (``TierConfig(verify=False)``); a store digests its
chunks unless the tier neither verifies nor writes through (docs/chunk-format.md).
The targets are printed next to each ratio, never enforced.

The package: ``options`` (the command line, torch-free so ``--help`` is fast),
``rows`` (settings and result rows), ``baselines``, ``measure`` (one cell
timed against its baseline), ``command`` (the run, its table and report),
``codecs`` (``kvstore bench codecs``) and ``lmcache`` (``--compare lmcache``).
It ships in the wheel because ``kvstore bench`` is a command every install
has; nothing in the library imports it.
"""
