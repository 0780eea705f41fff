"""A seed-style steering loop, for benchmarks only: decoder-layer forward pre-hooks.

This mirrors how the original MC-LCBF experiment ran: it patches every steered decoder
layer so that, on each call, the layer re-projects the keys from its input (prefill) or
reads them from the cache (decode), computes θ* and adds it to the hidden states before
running. The math is the toolkit's own (:mod:`mclcbf_diag.barrier`); only the plumbing
(hooks instead of nnsight) differs. Benchmarks time the toolkit against it.
"""

from __future__ import annotations

import contextlib

import torch

from mclcbf_diag import barrier as B


@contextlib.contextmanager
def seed_hooks(lm, config: B.BarrierConfig, input_ids: torch.Tensor):
    span = B.image_span_mask(config, input_ids[0], lm.tokens.image_token_id)
    rotary = {}
    layers = lm.adapter.decoder_layers(lm.model)
    handles = [lm.model.get_submodule(lm.adapter.rotary_emb).register_forward_hook(
        lambda mod, args, out: rotary.update(cos=out[0], sin=out[1]))]

    def make_hook(i):
        w = lm.layer_weights(i)

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seq = x.shape[1]
            phase = "prefill" if seq > 1 else "decode"
            tau, alpha = B.phase_params(config, phase)
            cos, sin = rotary["cos"][0], rotary["sin"][0]
            if phase == "prefill":
                keys, qpos = B.project_keys(x[0], w, cos, sin), torch.tensor([seq - 1])
            else:
                cache = lm.adapter.layer_cache(lm.model, kwargs).layers[i]
                keys, qpos = cache.keys[0], torch.tensor([cache.keys.shape[-2]])
            x_t = x[0, -1:]
            h, g = B.barrier_gradient(x_t, keys, w, cos[-1:], sin[-1:], span, qpos,
                                      B.resolve_grad_dtype(config, x.dtype))
            st = B.step(h, g, float(x_t.float().norm()), tau, alpha, config)
            if st.active:
                x[0, -1:] += st.applied.to(x.dtype)
            return None

        return hook

    for i in B.steered_layers(config, lm.n_layers):
        handles.append(layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
