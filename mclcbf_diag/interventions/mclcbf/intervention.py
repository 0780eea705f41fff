"""MC-LCBF: a control-barrier-function step that pushes the decision token's image attention up.

At each steered layer, h = the decision query's head-mean attention mass on the image keys,
computed as a look-ahead from the layer's own norm, projections and RoPE
(:mod:`.math`). If h < τ the step ``α·θ*`` (``θ* = scale·∇ₓh``) is added to the residual
before the layer runs (``site=resid_pre``, the seed), to the normalised input (``ln1_out``),
or, instead of a step, the image-key logits are shifted so each head's mass reaches τ
(``attn_logits``). The knobs, presets and targets are in :mod:`.config`.

Records (per steered layer, see :data:`METRICS`): h before the step, τ, whether it fired,
‖g‖ in the gradient dtype and in float32, Σg², the unclamped and applied scale, ‖θ*‖ and
‖θ*‖/‖x‖, Δh predicted (first order), recomputed (same keys) and realised (the model's own
attention), and, at layer −1, how the configured image span overlaps the detected image.

Two checks on every run, printed as warnings by ``trace`` and ``explain`` and put on the page
(:mod:`.report`): the configured span against the detected image tokens and the decision token
(``span_flagged``, :func:`mclcbf_diag.models.tokens.span_problem`: the seed's known 4-token offset
is not flagged), and, in the measuring run, the look-ahead h against the image mass the layer then
computed (``lookahead_miss``, beyond its noise floor ``lookahead_miss_floor``), at the prompt's forward and,
with ``--generate``, at every generated token (:func:`.report.decode_warnings`).

Two computations, two dtypes. The *controller* (h, ∇h, the scale and the step) runs in the
gradient dtype, as the seed does (``grad_dtype=model``: the model's dtype, so its rounding
is part of what is diagnosed). The *measurements* (the recorded h, Δh predicted and
recomputed) run in float32 (:func:`mclcbf_diag.measurements.noise.measure_dtype`) from the model's own
residual and keys, whatever the model's dtype: in bfloat16 an h summed in bfloat16 moves in
steps of ~2⁻⁹, so a Δh of 1e-5 would read 0. Each Δh is recorded with its noise floor
(``dh_*_floor``, :mod:`mclcbf_diag.measurements.noise`); ``dh_realised`` compares the model's own
attention, computed in its dtype, with the float32 h, so its floor is the model dtype's.
"""

from __future__ import annotations

import math

import torch

from ...errors import UserError
from ...measurements import noise
from ...measurements.probes import fit_mask
from ...models.tokens import span_problem
from ..attention_edits import shift_image_logits
from ..base import Intervention, Row, Site
from ..catalog import SPECS
from . import rules
from .config import (
    PRESETS,
    BarrierConfig,
    image_span_mask,
    phase_params,
    resolve_grad_dtype,
    steered_layers,
    target_positions,
)
from .math import barrier_value, guard_share, step
from .report import decode_warnings, figures, headline, nothing_fired_reason, summary_fields, summary_lines

METRICS = {
    "barrier_h": "h: head-mean image mass of the target query under the configured span, before the step",
    "barrier_tau": "τ", "barrier_active": "1 if h < τ (the barrier asks for a step)",
    "grad_norm": "‖g‖ = ‖∇ₓh‖ of the gradient as computed in the gradient dtype",
    "grad_norm_f32": "‖g‖ recomputed in float32",
    "grad_norm_sq_dtype": "Σg² as computed in the gradient dtype (what the seed divides by)",
    "scale_unclamped": "(τ − h)/(Σg² + guard) (the seed's guard is 1e-6)", "scale": "applied scale (after the clamp)",
    "guard": "the guard added to Σg² before dividing (knob guard)",
    "guard_share": "guard/(Σg² + guard) in the gradient dtype: near 1 the guard, not the gradient, sets the scale",
    "guard_share_f32": "guard/(Σg² + guard) with Σg² in float32",
    "prefill_enabled": "1 if the prefill (the prompt, where the first answer token is decided) can be steered: "
                       "τ_prefill > 0 and α_prefill > 0",
    "decode_enabled": "1 if generated tokens can be steered: τ_decode > 0 and α_decode > 0",
    "clamp_active": "1 if the clamp bound the scale",
    "theta_norm": "‖θ*‖ (before α)", "theta_rel": "‖θ*‖/‖x‖ at the targets, x before the step",
    "applied_norm": "‖α θ*‖ over the target tokens (before any dose multiplier)",
    "barrier_h_dtype": "h as the controller computed it, in the gradient dtype (decides barrier_active and the "
                       "scale); recorded when that dtype is not float32 (barrier_h itself is computed in float32)",
    "dh_predicted": "g·(α θ*) (first order, g in float32); attn_logits site: target mass − h",
    "dh_recomputed": "h(x + αθ*) − h(x) in float32, same keys (the step as computed, before rounding into the "
                     "model dtype)",
    "dh_realised": "the model's own head-mean image mass (configured span) after the step − h",
    "dh_predicted_floor": "noise floor of dh_predicted: eps·√m·√16, m the larger of h and h + Δh, eps of "
                          "the dtype h is computed in (float32; attn_logits site: the model's); "
                          "see mclcbf_diag.measurements.noise. "
                          "Below it the figure is reported as 'below noise'",
    "dh_recomputed_floor": "noise floor of dh_recomputed (float32 h; the formula of dh_predicted_floor)",
    "dh_realised_floor": "noise floor of dh_realised: the formula of dh_predicted_floor with eps of the model dtype "
                         "(the model's own attention is computed in its dtype)",
    "grad_norm_floor": "noise floor of grad_norm − grad_norm_f32: eps(gradient dtype)·‖g‖_f32·√16",
    "span_configured_tokens": "positions in the configured span", "span_detected_tokens": "image tokens",
    "span_iou": "configured span vs detected image: intersection over union",
    "span_precision": "share of the configured span that is image",
    "span_recall": "share of the image inside the configured span",
    "span_flagged": "1 if the configured span (span=fixed) covers the decision token, or more non-image tokens or "
                    "misses more image tokens than the seed's known 4-token offset (mclcbf_diag.models.tokens."
                    "span_problem); trace and explain print it as a warning",
    "span_image_first": "position of the first detected image token (layer −1)",
    "span_image_last": "position of the last detected image token (layer −1)",
    "span_decision": "position of the decision token, the prompt's last (layer −1)",
    "lookahead_miss": "the model's own image mass (configured span; mean over heads and the target tokens, as h) "
                      "minus the barrier's look-ahead h of the same layer, in the measuring (baseline) run: 0 up to "
                      "rounding when the look-ahead computes what the layer computes",
    "lookahead_miss_floor": "noise floor of lookahead_miss (the formula of dh_realised_floor: eps of the model "
                            "dtype); beyond it trace and explain print a warning",
}

_STEP_METRICS = {"active": "barrier_active", "tau": "barrier_tau", "grad_norm": "grad_norm",
                 "grad_norm_sq_dtype": "grad_norm_sq_dtype", "scale_unclamped": "scale_unclamped",
                 "scale": "scale", "clamp_active": "clamp_active", "theta_norm": "theta_norm",
                 "theta_rel": "theta_rel", "applied_norm": "applied_norm"}

# knob → corrected value: each undoes one suspected cause (counterfactual fixes)
FIXES: dict[str, dict] = {
    "grad_dtype": {"grad_dtype": "float32"},
    "guard": {"guard": 0.0},
    "clamp": {"clamp": "none"},
    "span": {"span": "detected"},
    "site": {"site": "attn_logits"},
    "tokens": {"tokens": "after_image"},
}

# diagnosed cause → the fix that undoes it (explain's cause chain applies them one by one)
CAUSE_FIX = {
    "span_mismatch": "span",
    "lookahead_miss": "site",
    "gradient_underflow": "grad_dtype",
    "clamp_limited": "clamp",
    "rounding_absorbed": "site",
    "step_negligible": "clamp",
    "linearisation_failed": "site",
    "damped_downstream": "tokens",
    "guard_dominates": "guard",
    "margin_unmoved": "tokens",
    "barrier_not_decisive": "tokens",
    "decision_token_off_path": "tokens",
}


class MCLCBF(Intervention, spec=SPECS["mclcbf"]):
    row_doses = True
    localised_causes = ("damped_downstream",)
    metrics = METRICS

    @property
    def config(self) -> BarrierConfig:
        return self.knobs

    def layers(self, n_layers: int) -> tuple[int, ...]:
        return steered_layers(self.knobs, n_layers)

    def open_sites(self, steer: bool) -> frozenset[str]:
        if self.knobs.site == "attn_logits":
            return frozenset({"attention", "pattern"} if steer else {"pattern"})
        return frozenset({"residual", "pattern"})

    def begin(self, rows: list[Row], n_layers: int) -> None:
        self.span = {r.index: image_span_mask(self.knobs, r.ids, 0) if self.knobs.span == "fixed" else r.image
                     for r in rows}
        self.targets = {r.index: target_positions(self.knobs, self.span[r.index]) for r in rows}
        self._stepped: set[int] = set()  # rows this run has stepped (a later NaN is the step's, not the model's)

    def first_edited(self, row: Row) -> int | None:
        span = image_span_mask(self.knobs, row.ids, 0) if self.knobs.span == "fixed" else row.image
        return int(target_positions(self.knobs, span).min())

    def _targets(self, site: Site, row: Row) -> torch.Tensor:
        return torch.tensor([site.current(row)]) if site.phase == "decode" else self.targets[row.index]

    # -- residual sites: the barrier step ------------------------------------------------------
    def residual(self, site: Site) -> None:
        cfg, x = self.knobs, site.tensor
        tau, alpha = phase_params(cfg, site.phase)
        gdt = resolve_grad_dtype(cfg, x.dtype)
        normalized = cfg.site == "ln1_out"
        # rows with as many targets are one vmapped group; in decode (the query lies just past its
        # cached keys, where a shorter row's padding would be) only rows with as many keys
        groups: dict[tuple, list] = {}
        for row in site.rows:
            t, keys = self._targets(site, row), site.keys(row)
            key = (len(t), keys.shape[-2] if site.phase == "decode" else None)
            groups.setdefault(key, []).append((row, keys, t))
        for members in groups.values():
            x_t = torch.stack([x[r.index, site.query_index(r, t)] for r, _, t in members])  # [G, n, d]
            bad = ~torch.isfinite(x_t).flatten(1).all(-1)
            if any(bool(bad[j]) and r.index not in self._stepped for j, (r, _, _) in enumerate(members)):
                raise UserError(f"the residual stream entering layer {site.layer} is NaN or inf at the steered "
                                f"token(s) (dtype {x.dtype}) before any step; the model overflowed or its weights "
                                "hold NaN/inf: try --dtype float32 or check the checkpoint")
            if bool(bad.any()):  # an earlier step overflowed the model: record it, steer nothing here
                for j, (r, _, _) in enumerate(members):
                    site.record(r, "residual_nonfinite", float(bad[j]))
                if bool(bad.all()):
                    continue
                members = [m for j, m in enumerate(members) if not bool(bad[j])]
                x_t = x_t[~bad]
            self._step_group(site, members, x_t, tau, alpha, gdt, normalized)

    def _step_group(self, site: Site, members: list, x_t: torch.Tensor, tau: float, alpha: float, gdt,
                    normalized: bool) -> None:
        """The barrier step of rows with as many targets, each row's h and ∇h one vmapped call.

        Each row's look-ahead sees its own keys (right-padded to the group's longest with zero
        keys, which its causal mask hides: they lie after its last position), its own RoPE
        angles, span and target positions, so rows of different prompts share a call.
        """
        w, x = site.weights, site.tensor
        x_t, keys, rest = self._group_inputs(site, members, x_t, normalized)
        mdt = noise.measure_dtype(x.dtype)  # the figures' dtype; the controller's is gdt
        weights = {dt: w.to(dt) for dt in {gdt, mdt}}

        def h_of(xt, k, c, s, m, p, dtype=gdt):
            return barrier_value(xt, k, weights[dtype], c.to(dtype), s.to(dtype), m, p, normalized=normalized)[0]

        def h_measured(xt, k, c, s, m, p):
            return h_of(xt, k, c, s, m, p, mdt)

        keys_m = keys.to(mdt)
        if not site.steer:  # measuring run: h only, as the steered run measures it
            h = torch.func.vmap(h_measured)(x_t.to(mdt), keys_m, *rest)
            for (r, _, _), v in zip(members, h.tolist()):
                site.record(r, "barrier_h", v)
            return
        g, h = _grad_and_value(h_of, x_t.to(gdt), keys.to(gdt), *rest)
        g32, h32 = (g, h) if gdt == mdt else _grad_and_value(h_measured, x_t.to(mdt), keys_m, *rest)
        if not torch.isfinite(g).all():
            raise UserError(f"the barrier gradient at layer {site.layer} is NaN or inf (dtype {gdt}); "
                            "try --set grad_dtype=float32 or a float32 model")
        steps = self._record_steps(site, members, x_t, (h, g), (h32, g32), (tau, alpha), (gdt, mdt))
        if not steps:
            return
        idx = [j for j, *_ in steps]
        with torch.no_grad():  # h after each step, same keys: one vmapped call
            moved = x_t[idx].to(mdt) + torch.stack([m for *_, m in steps])
            h_after_all = torch.func.vmap(h_measured)(moved, keys_m[idx], *(a[idx] for a in rest)).tolist()
        h_before_all = h32.tolist()
        for (j, st, dose, applied, _), h_after in zip(steps, h_after_all):
            r, _, t = members[j]
            h_before = h_before_all[j]
            pred = st.predicted_delta_h * dose if gdt == mdt else float(
                (g32[j].to(torch.float64) * st.applied.to(torch.float64)).sum()) * dose
            site.record(r, "dh_predicted", pred)
            site.record(r, "dh_predicted_floor", noise.mass_floor(mdt, h_before, h_before + pred))
            site.record(r, "dh_recomputed", h_after - h_before)
            site.record(r, "dh_recomputed_floor", noise.mass_floor(mdt, h_before, h_after))
            if st.active and dose != 0:
                site.add(r, t, applied, after_norm=normalized)
                self._stepped.add(r.index)

    def _group_inputs(self, site: Site, members: list, x_t: torch.Tensor, normalized: bool):
        """The group's targets, keys (right-padded with zero keys) and (cos, sin, span, query positions), on the
        device of the layer's weights (under a device map x may arrive elsewhere)."""
        dev = site.weights.q_weight.device
        x_t = x_t.to(dev)
        n_keys = max(k.shape[-2] for _, k, _ in members)
        k0 = members[0][1]
        keys = torch.zeros(len(members), *k0.shape[:-2], n_keys, k0.shape[-1], dtype=k0.dtype, device=dev)
        for j, (_, k, _) in enumerate(members):
            keys[j, ..., :k.shape[-2], :] = k
        if normalized:
            x_t = site.weights.norm(x_t)
        angles = [site.rotary(r, t) for r, _, t in members]
        cos = torch.stack([c for c, _ in angles]).to(dev)
        sin = torch.stack([s for _, s in angles]).to(dev)
        span = torch.stack([fit_mask(self.span[r.index], n_keys, dev) for r, _, _ in members])
        qpos = torch.stack([t for _, _, t in members]).to(dev)
        return x_t, keys, (cos, sin, span, qpos)

    def _record_steps(self, site: Site, members: list, x_t, hg, hg32, tau_alpha, dtypes) -> list:
        """Each row's step and its records; the finite ones as ``(member, step, dose, applied in x's dtype,
        the step in the figures' dtype)`` (an overflowing step is recorded, never applied)."""
        cfg, x = self.knobs, site.tensor
        (h, g), (h32, g32), (tau, alpha), (gdt, mdt) = hg, hg32, tau_alpha, dtypes
        x_norms = x_t.float().flatten(1).norm(dim=-1).tolist()
        g32f = g32.float().flatten(1)
        g32_norms, g32_sq = g32f.norm(dim=-1).tolist(), (g32f ** 2).sum(-1).tolist()
        h_before_all = h32.tolist()
        steps = []
        for j, (r, _, t) in enumerate(members):
            st = step(h[j], g[j], x_norms[j], tau, alpha, cfg)
            rec = st.to_record()
            site.record(r, "barrier_h", h_before_all[j])
            if gdt != mdt:
                site.record(r, "barrier_h_dtype", st.h)
            for f, metric in _STEP_METRICS.items():
                site.record(r, metric, rec[f])
            site.record(r, "grad_norm_f32", g32_norms[j])
            site.record(r, "grad_norm_floor", noise.grad_norm_floor(gdt, g32_norms[j]))
            site.record(r, "guard", cfg.guard)
            site.record(r, "guard_share", st.guard_share)
            site.record(r, "guard_share_f32", guard_share(g32_sq[j], cfg.guard))
            dose = site.dose_of(r)
            computed = st.applied * dose if dose != 1 else st.applied  # in gdt, before rounding
            applied = computed.to(x.dtype)
            finite = st.finite and bool(torch.isfinite(applied).all())
            site.record(r, "step_nonfinite", float(not finite))
            if finite:
                steps.append((j, st, dose, applied, computed.to(mdt)))
        return steps

    # -- the attention-logit site ------------------------------------------------------------------
    def attention(self, site: Site) -> None:
        tau, alpha = phase_params(self.knobs, site.phase)
        probs = site.tensor
        for row in site.rows:
            q = site.query_index(row, self._targets(site, row))
            rows_q, key_mask = probs[row.index][:, q], site.key_mask(row, self.span[row.index])
            h = float(rows_q.float()[..., key_mask].sum(-1).mean())
            site.record(row, "barrier_h", h)
            site.record(row, "barrier_tau", tau)
            site.record(row, "barrier_active", float(h < tau))
            dose = site.dose_of(row)
            if h >= tau or tau <= 0 or alpha * dose == 0:
                continue
            # τ = 1 is out of reach of a finite logit shift: aim at the largest mass below it
            edited, mass, delta, target = shift_image_logits(rows_q, key_mask, min(tau, 1 - 1e-6), alpha * dose)
            site.set_rows(row, self._targets(site, row), edited)
            site.record_heads(row, "logit_shift", delta.mean(-1))
            site.record(row, "dh_predicted", float(target.mean()) - h)
            # h is the model's own mass here (its dtype): the floor is that dtype's
            site.record(row, "dh_predicted_floor", noise.mass_floor(probs.dtype, h, float(target.mean())))

    def pattern(self, site: Site) -> None:
        """h as the model realised it: in a measuring run h "before", else Δh_realised."""
        for row in site.rows:
            p = site.tensor[row.index, :, -1].float()
            realised = float(p[:, site.key_mask(row, self.span[row.index])].sum(-1).mean())
            before = site.recorded(row, "barrier_h")
            if before is None:
                site.record(row, "barrier_h", realised)
            elif site.steer:
                site.record(row, "dh_realised", realised - before)
                site.record(row, "dh_realised_floor", noise.mass_floor(site.tensor.dtype, before, realised))
            else:  # the measuring run: the look-ahead h against the mass the layer computed at the same targets
                q = site.query_index(row, self._targets(site, row)).to(site.tensor.device)
                rows_q = site.tensor[row.index][:, q].float()  # [H, targets, K]
                mass = float(rows_q[..., site.key_mask(row, self.span[row.index])].sum(-1).mean())
                site.record(row, "lookahead_miss", mass - before)
                site.record(row, "lookahead_miss_floor", noise.mass_floor(site.tensor.dtype, before, mass))

    # -- whole-model records, summaries, fixes ------------------------------------------------------
    def row_records(self, row: Row) -> dict[str, float]:
        conf, det = self.span[row.index].bool(), row.image.bool()
        inter, union = int((conf & det).sum()), int((conf | det).sum())
        k = self.knobs
        image = torch.nonzero(det).flatten()
        problem = k.span == "fixed" and span_problem(k.fixed_span, image, row.decision) is not None
        return {"span_flagged": float(problem), "span_image_first": int(image.min()) if len(image) else -1,
                "span_image_last": int(image.max()) if len(image) else -1, "span_decision": row.decision,
                "prefill_enabled": float(k.tau_prefill > 0 and k.alpha_prefill > 0),
                "decode_enabled": float(k.tau_decode > 0 and k.alpha_decode > 0),
                "span_configured_tokens": int(conf.sum()), "span_detected_tokens": int(det.sum()),
                "span_iou": inter / union if union else 1.0,
                "span_precision": inter / int(conf.sum()) if conf.any() else 0.0,
                "span_recall": inter / int(det.sum()) if det.any() else 0.0}

    def row_summary(self, per_layer: dict[int, dict[str, float]]) -> dict:
        fired = [layer for layer, m in sorted(per_layer.items()) if m.get("barrier_active")]
        h = [m["barrier_h"] for m in per_layer.values() if m.get("barrier_h") is not None]
        rel = [per_layer[layer]["theta_rel"] for layer in fired if "theta_rel" in per_layer[layer]]
        dh = [per_layer[layer]["dh_predicted"] for layer in fired if "dh_predicted" in per_layer[layer]]
        return {"layers_fired": fired, "h_mean": sum(h) / len(h) if h else None,
                "mean_theta_rel": sum(rel) / len(rel) if rel else None, "max_dh_predicted": max(dh) if dh else None}

    def fixes(self) -> dict[str, dict]:
        return FIXES

    def trace_summary(self, steered, baseline) -> dict:
        """The barrier h before and after the step (mean over steered layers), where it fired, the largest
        ‖θ*‖/‖x‖, and Δh predicted, recomputed and realised with their noise floors."""
        return summary_fields(steered, baseline, self.knobs)

    def decode_summary(self, baselines: dict) -> dict:
        """The look-ahead check at every generated token (:func:`~.report.decode_warnings`)."""
        return decode_warnings(baselines)

    def summary_lines(self, summary: dict) -> list[str]:
        return summary_lines(summary)

    def headline(self, summary: dict, records) -> list[str]:
        return headline(summary, records)

    def summary_rows(self):
        return ([("h, mean over steered layers (share of attention)", "h_{}_mean")],
                [("steered layers", "layers_steered"), ("layers that fired", "layers_fired"),
                 ("largest ‖θ*‖/‖x‖", "max_theta_rel")])

    def figures(self, records, *, phase: str, decode_step: int, question_id, steered) -> dict:
        """The step's size per layer and the barrier against τ: :func:`~.report.figures` (its arguments and
        result)."""
        return figures(records, phase=phase, decode_step=decode_step, question_id=question_id, steered=steered)

    def idle_reason(self, records) -> str:
        return nothing_fired_reason(records)

    def dose_fields(self, layer_metrics: list[dict], k: float) -> dict:
        """h after the step (mean over steered layers) and the largest ‖kθ*‖/‖x‖ over the layers that fired."""
        layers = [m for m in layer_metrics if m.get("barrier_h") is not None]
        rel = [m["theta_rel"] * k for m in layers if m.get("barrier_active") and m.get("theta_rel") is not None]
        h_after = [m["barrier_h"] + (m.get("dh_realised") or 0.0) for m in layers]
        return {"h_mean": sum(h_after) / len(h_after) if h_after else math.nan,
                "theta_rel_max": max(rel) if rel else 0.0}

    def dose_detail(self, at: dict) -> str:
        return f"‖θ*‖/‖x‖ up to {at['theta_rel_max']:.3g}, margin {at['margin']:+.3g}, h {at['h_mean']:.3g}"

    def cause_fix(self, cause_id: str) -> str | None:
        return CAUSE_FIX.get(cause_id)

    def fix_applies(self, name: str, model_dtype) -> str | None:
        if name == "grad_dtype" and model_dtype == torch.float32:
            return "not applicable: the model computes in float32 already, so grad_dtype=float32 changes nothing"
        return None

    def rules(self) -> list:
        return rules.RULES

    def layer_sets(self, evidence):
        return rules.layer_sets(evidence)

    def no_step_explained_by(self) -> tuple[str, ...]:
        return rules.NO_STEP_EXPLAINED_BY


def _grad_and_value(fn, x, *rest):
    """``(∇ₓfn, fn)`` for every member of a group at once (vmap over every argument), outside inference mode."""
    def plain(t):  # a tensor made under inference mode cannot enter autograd: copy it out
        return t.detach().clone() if t.is_inference() else t.detach()

    with torch.inference_mode(False), torch.enable_grad():
        return torch.func.vmap(torch.func.grad_and_value(fn))(plain(x), *(plain(a) for a in rest))


__all__ = ["MCLCBF", "BarrierConfig", "PRESETS", "CAUSE_FIX", "FIXES", "METRICS"]
