"""inferkit's bundled serving runtime: paged KV cache, continuous batching, quantized linears.

Stable API::

    from inferkit.runtime import LLM, SamplingParams
    llm = LLM("artifact/", kv_cache_gb=1.0)
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
"""

from inferkit.runtime.config import EngineConfig
from inferkit.runtime.engine import LLM, LLMEngine, RequestOutput
from inferkit.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "RequestOutput", "SamplingParams"]
