"""``tokenrelay bench``: a bounded load generator for streaming chat servers, as a library.

```python
from tokenrelay.bench import BenchConfig, run_bench

result = await run_bench(BenchConfig("http://127.0.0.1:8080", concurrency=50, requests=500))
print(result.to_dict()["ttft_ms"]["p99"])
```
"""

from __future__ import annotations

from tokenrelay.bench.config import BenchConfig, StreamFormat, load_request_mix
from tokenrelay.bench.results import BenchResult, BenchSnapshot
from tokenrelay.bench.runner import ProgressCallback, run_bench

__all__ = [
    "BenchConfig",
    "BenchResult",
    "BenchSnapshot",
    "ProgressCallback",
    "StreamFormat",
    "load_request_mix",
    "run_bench",
]
