"""The tables `bench_train.py` prints: every stack against hf-lean, liger and unsloth of the same run, then the
issue's targets as ratios, or (long mode) seconds per step and peak memory by length with the memory slope."""

from __future__ import annotations

PEAK_FLOPS = 989e12


def flops_per_token(config, seq: int) -> float:
    """Model FLOPs per token of one training step; a mixture of experts counts the router and the experts a token
    is routed to (num_experts_per_tok of width moe_intermediate_size)."""
    h, L = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    experts = getattr(config, "num_experts", 0)
    mlp = 3 * h * config.moe_intermediate_size * config.num_experts_per_tok + h * experts if experts else \
        3 * h * config.intermediate_size
    linear = L * (2 * h * q + 2 * h * kv + mlp) + h * config.vocab_size
    attention = 3 * 2 * L * seq * q  # QK^T and PV, causal half, forward + 2x for backward
    return 4 * linear + attention


def _find(rows, name):
    return next((r for r in rows if r["stack"] == name and "tok_s" in r), None)


def _ratio(a, b, key="tok_s"):
    return f"{a[key] / b[key]:.2f}x" if a and b else "-"


def _loss_diff(r, ref) -> str:
    if not ref or ref is r:
        return "-"
    return f"{max(abs(a - b) / abs(b) for a, b in zip(r['losses'], ref['losses'])):.2%}"


def main_table(rows, config, args, warmup: int, title: str) -> str:
    rows = [r for r in rows if "tok_s" in r]
    fpt = flops_per_token(config, args.seq)
    lean, liger, uns = _find(rows, "hf-lean"), _find(rows, "liger"), _find(rows, "unsloth")
    ref_plain = next((r for r in rows if not r["stack"].endswith("@packed")), None)
    ref_packed = next((r for r in rows if r["stack"].endswith("@packed")), None)
    out = [f"\n{title}; {args.batch} x {args.seq} tokens, {args.steps} steps (timed from step {warmup + 1})",
           f"| stack | tok/s | peak GiB | LoRA-MFU | max rel. loss diff | speed vs hf-lean | memory vs hf-lean | "
           "speed vs liger | speed vs unsloth | memory vs unsloth |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = ref_packed if r["stack"].endswith("@packed") else ref_plain
        out.append(f"| {r['stack']} | {r['tok_s']:.0f} | {r['peak_gib']:.2f} | {r['tok_s'] * fpt / PEAK_FLOPS:.1%} | "
                   f"{_loss_diff(r, ref)} vs {ref['stack']} | {_ratio(r, lean)} | {_ratio(r, lean, 'peak_gib')} | "
                   f"{_ratio(r, liger)} | {_ratio(r, uns)} | {_ratio(r, uns, 'peak_gib')} |")
    out += _targets(rows, lean, uns)
    return "\n".join(out)


def _targets(rows, lean, uns) -> list[str]:
    ours = _find(rows, "ours")
    if not ours:
        return []
    lines = ["", "targets (issue 13), measured in this run:"]

    def check(what, value, goal, ok):
        lines.append(f"  {what}: {value} (target {goal}) {'MET' if ok else 'not met'}")

    if lean:
        s, m = ours["tok_s"] / lean["tok_s"], ours["peak_gib"] / lean["peak_gib"]
        check("ours / hf-lean tokens/s", f"{s:.2f}x", ">= 1.5x", s >= 1.5)
        check("ours / hf-lean peak memory", f"{m:.2f}x", "<= 0.5x", m <= 0.5)
        d = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], lean["losses"]))
        check(f"ours vs hf-lean per-step loss over {len(ours['losses'])} steps", f"{d:.2%}", "<= 1%", d <= 0.01)
    if uns:
        s = ours["tok_s"] / uns["tok_s"]
        check("ours / unsloth tokens/s", f"{s:.2f}x", ">= 1.15x", s >= 1.15)
    packed = _find(rows, "ours@packed")
    if packed:
        s = packed["tok_s"] / ours["tok_s"]
        check("ours packed / ours unpacked tokens/s", f"{s:.2f}x", ">= 1.0x", s >= 1.0)
    gptq = next((r for r in rows if "base.quantization=gptq" in r["stack"]), None)
    if gptq:
        s = gptq["tok_s"] / ours["tok_s"]
        check("ours GPTQ / ours NF4 tokens/s", f"{s:.2f}x", ">= 0.9x", s >= 0.9)
    return lines


def fit_length(points: list[dict], total_gib: float) -> str:
    """The largest length whose peak fits `total_gib`, by the slope of peak memory over the last two lengths."""
    ok = [p for p in points if not p.get("oom")]
    if len(ok) < 2:
        return "-"
    a, b = ok[-2], ok[-1]
    slope = (b["peak_gib"] - a["peak_gib"]) / (b["tokens"] - a["tokens"])
    if slope <= 0:
        return "-"
    n = b["tokens"] + (total_gib - b["peak_gib"]) / slope
    return f"~{int(n) // 1024}k tokens ({slope * 1024:.3f} GiB per 1k tokens)"


def long_table(rows, title: str, total_gib: float) -> str:
    out = [f"\n{title}; batch 1, long context; card {total_gib:.0f} GiB",
           "| stack | tokens | s/step | tok/s | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        for p in r.get("long", []):
            if p.get("oom"):
                out.append(f"| {r['stack']} | {p['tokens']} | OOM | - | - |")
            else:
                out.append(f"| {r['stack']} | {p['tokens']} | {p['s_step']:.2f} | {p['tokens'] / p['s_step']:.0f} | "
                           f"{p['peak_gib']:.2f} |")
    out.append("")
    for r in rows:
        out.append(f"{r['stack']}: largest length that fits by the memory slope: {fit_length(r.get('long', []), total_gib)}")
    by = {r["stack"]: {p["tokens"]: p for p in r.get("long", []) if not p.get("oom")} for r in rows}
    if "ours" in by and "unsloth" in by:
        for n in sorted(set(by["ours"]) & set(by["unsloth"])):
            o, u = by["ours"][n], by["unsloth"][n]
            out.append(f"  {n} tokens: ours/unsloth peak {o['peak_gib'] / u['peak_gib']:.2f}x (target <= 0.75x), "
                       f"s/step {o['s_step'] / u['s_step']:.2f}x (target <= 1.0x)")
    return "\n".join(out)


def e2e_table(rows, title: str) -> str:
    """bench_e2e.py's tables: each regime's stacks against our bare step and unsloth, our run's peak memory by
    phase, the issue's end-to-end targets as ratios, and the profile of our steps where one was taken."""
    # here, not at the top: bench_train imports this module, so bench_e2e's unsloth worker does, and unsloth must be
    # imported before transformers (bench_phases brings in the training run)
    from scripts.bench.bench_phases import profile_text

    out = [f"\n{title}", "| regime | stack | tok/s | peak GiB | vs bare step (packed) | vs bare step (plain rows) | "
           "speed vs unsloth | memory vs unsloth |", "|---|---|---|---|---|---|---|---|"]
    regimes = sorted({(r["batch"], r["seq"]) for r in rows}, key=lambda bs: bs[0] * bs[1])
    checks, phase_rows, profiles = [], [], []

    def check(what, value, goal, ok):
        checks.append(f"  {what}: {value} (target {goal}) {'MET' if ok else 'not met'}")

    for b, t in regimes:
        here = {r["stack"]: r for r in rows if (r["batch"], r["seq"]) == (b, t) and not r.get("oom")}
        ours, uns = here.get("ours"), here.get("unsloth")
        for r in here.values():
            bare = [r.get(f"bare {k}") for k in ("ours@packed", "ours")]
            out.append(f"| {b}x{t} | {r['stack']} | {r['tok_s']:.0f} | {r['peak_gib']:.2f} | "
                       + " | ".join(f"{r['tok_s'] / x['tok_s']:.2f}x" if x else "-" for x in bare)
                       + f" | {_ratio(r, uns)} | {_ratio(r, uns, 'peak_gib')} |")
        if ours:
            ph = ours["phases"]
            steps = max(ph.get("steps", 0), ph.get("first step", 0), 1e-9)
            others = {k: v for k, v in ph.items() if k not in ("steps", "first step")}
            worst = max(others, key=others.get) if others else None
            phase_rows.append(f"| {b}x{t} | " + " | ".join(f"{ph.get(k, 0):.2f}" for k in PHASES) +
                              f" | {worst}: {others[worst] / steps:.2f}x |" if worst else "")
            if "bare ours@packed" in ours:
                s = ours["tok_s"] / ours["bare ours@packed"]["tok_s"]
                check(f"{b}x{t} our loop / our bare step (packed)", f"{s:.2f}x", ">= 0.95x", s >= 0.95)
            if worst:
                m = others[worst] / steps
                check(f"{b}x{t} largest phase peak / step peak ({worst})", f"{m:.2f}x", "<= 1.0x", m <= 1.0)
            if "profile" in ours:
                profiles.append(f"\nprofile of our steps at {b}x{t}:\n" + profile_text(ours["profile"]))
        if ours and uns:
            s, m = ours["tok_s"] / uns["tok_s"], ours["peak_gib"] / uns["peak_gib"]
            check(f"{b}x{t} ours / unsloth tokens/s", f"{s:.2f}x", ">= 1.25x", s >= 1.25)
            check(f"{b}x{t} ours / unsloth peak memory", f"{m:.2f}x", "<= 1.0x", m <= 1.0)
    if phase_rows:
        out += ["", "our run's peak GiB by phase (max_memory_allocated while the phase ran)",
                "| regime | " + " | ".join(PHASES) + " | largest other phase / steps |",
                "|---" * (len(PHASES) + 2) + "|", *phase_rows]
    out += ["", "targets (issue 25, end to end), measured in this run:", *checks, *profiles]
    return "\n".join(out)


PHASES = ("set-up (load, data)", "evaluation", "samples", "first step", "steps", "checkpoint", "adapter")
