"""Model-body helpers that both the sampler (rollout/prefix_decode, the hf engine) and the learner
(learner/logprobs) use: the body of a causal LM, an empty KV cache, and the keyword that passes one.
"""

from __future__ import annotations

import inspect


def decoder(model):
    """The body of a causal LM: everything before the lm_head (returns hidden states)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def dynamic_cache(config):
    """An empty transformers DynamicCache for a model of `config` (which gives its layer types)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers
        return DynamicCache()


def with_cache(module, cache) -> dict:
    """{keyword: cache} for calling a model (its forward, or its generate) with a KV cache.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns on every call) in
    forward and generate together; earlier versions, which vLLM pins, only know `past_key_values`.
    Read from the model's forward signature (generate's takes **kwargs); a `torch.compile`d module is
    read through the module it wraps."""
    module = getattr(module, "_orig_mod", module)
    try:
        names = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        names = {}
    return {"cache" if "cache" in names else "past_key_values": cache}


def select_rows(cache, index) -> None:
    """Repeat/select the cache's batch rows by `index` in place (transformers' `batch_select_indices`).

    By `index_select`, whose backward adds each row's gradient into its source row with `index_add_`;
    the tensor indexing `batch_select_indices` does backs up through an accumulating `index_put_`,
    ~20x slower on CPU (the learner's shared prompt passes: 4% of the ~10M bench model's update)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # an older cache layout
        cache.batch_select_indices(index)
        return
    for layer in layers:
        if type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        else:  # layers with state of their own (sliding windows, indexers) select it themselves
            layer.batch_select_indices(index)
