"""Benchmarks of grpo_speech.py: the paper's comparison at small scale, and the hot loop's speed.

  python bench_grpo_speech.py --compare           # start, SFT, GRPO, MP-GRPO, SFT -> X; 3 seeds
  python bench_grpo_speech.py --compare --quick   # one seed, fewer steps
  python bench_grpo_speech.py --speed             # same process, same model, same inputs
  python bench_grpo_speech.py --default-runs      # the README's first command, seeds 0-2
  python bench_grpo_speech.py --memory            # bytes per parameter, the 2B/8B memory table

--compare runs the real command line once per (task, method, seed) into runs/compare/ (SFT,
GRPO, MP-GRPO, then SFT -> GRPO and SFT -> SFT from each seed's SFT best/), writes
runs/compare/table.md (corpus BLEU and chrF on the test split, greedy and sampled, mean +- std
over seeds, of each method's best-on-dev checkpoint) and puts it into README.md between the compare markers, with
the command and its wall time; with matplotlib installed it also draws runs/compare/curves.png.
SFT and GRPO get an equal budget of updates and sequences: the same number of steps, each
step pushing B x G = 32 sequences through the policy (SFT: 32 references; GRPO: 4 prompts x 8
samples; MP-GRPO: 4 x (7 samples + the reference)).

Each ratio is (baseline time) / (our time), median of --repeats runs after a warm-up:
  * group sampling (B prompts x G samples, every row forced to the same length) against
    transformers' generate(num_return_sequences=G, do_sample=True), printed last;
  * the GRPO policy forward + backward with the audio encoder run once per group against
    running it for every completion;
  * bf16 autocast and torch.compile against eager fp32 for that forward + backward;
  * achieved FLOP/s of the update against this machine's dense matmul peak, and peak memory;
  * a step-time breakdown: sampling, reward, reference log-probs, policy update.
"""

import argparse
import copy
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import grpo_speech as gs


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, dtype=torch.float32, n=1024, repeats=5) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
    return 2 * n**3 / timed(lambda: a @ b, repeats)


def run_method(task: str, mode: str, seed: int, steps: int, out: Path, threads: int,
               model: str | None = None, options: tuple = ()) -> dict:
    """One training run through the real command line (resumed if already done), with
    `options` added to it; its results.json."""
    if (not (out / "results.json").exists()
            or "final" not in json.loads((out / "results.json").read_text())):
        cmd = [sys.executable, str(gs.HERE / "grpo_speech.py"), "--task", task, "--mode", mode,
               "--seed", str(seed), "--max-steps", str(steps), "--out", str(out),
               "--overwrite"] + (["--model", model] if model else []) + list(options)
        t0 = time.time()
        env = dict(os.environ, TQDM_DISABLE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
        print(f"  {task} {mode} seed {seed}{' from ' + model if model else ''}: "
              f"{time.time() - t0:.0f} s", flush=True)
    return json.loads((out / "results.json").read_text())


def replace_readme_block(name: str, text: str) -> None:
    """Put `text` between README.md's <!-- name:begin --> and <!-- name:end --> markers, if any."""
    readme = gs.HERE / "README.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = readme.read_text()
    if begin in old:
        readme.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end),
                                 lambda _: f"{begin}\n{text}{end}", old, flags=re.S))


def mean_std(xs: list[float]) -> str:
    return (f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1
            else f"{xs[0]:.1f}")


# (label, mode, starts from the same seed's SFT best checkpoint)
METHODS = [("SFT", "sft", False), ("GRPO", "grpo", False), ("MP-GRPO", "mp-grpo", False),
           ("SFT → GRPO", "grpo", True), ("SFT → SFT", "sft", True)]


def run_dir(root: Path, task: str, label: str, seed: int) -> Path:
    name = {"SFT": "sft", "GRPO": "grpo", "MP-GRPO": "mp-grpo", "SFT → GRPO": "sft-grpo",
            "SFT → SFT": "sft-sft"}[label]
    return root / f"{task}-{name}-s{seed}"


def compare(args) -> None:
    seeds = [0] if args.quick else [0, 1, 2]
    steps = args.steps or (100 if args.quick else 300)
    # --quick is a smoke test of the whole pipeline in under 10 minutes: dev scored twice
    # (every dev utterance), the test split's first 100 utterances
    every = max(1, steps // 2) if args.quick else min(30, max(1, steps // 4))
    options = ("--eval-every", str(every)) + (("--eval-limit", "100") if args.quick else ())
    root = (Path(args.out) if args.out else
            gs.HERE / "runs" / ("compare-quick" if args.quick else "compare"))
    tasks = ("ast", "sqa")
    t0 = time.time()
    # two phases: the SFT -> X runs start from the best/ checkpoint of a finished SFT run
    jobs = [(task, m, seed) for task in tasks for m in METHODS for seed in seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def job(j):
        task, (label, mode, from_sft), seed = j
        model = str(run_dir(root, task, "SFT", seed) / "best") if from_sft else None
        return run_method(task, mode, seed, steps, run_dir(root, task, label, seed), threads, model,
                          options)
    done = {}
    for phase in ([j for j in jobs if not j[1][2]], [j for j in jobs if j[1][2]]):
        with ThreadPoolExecutor(args.jobs) as pool:  # independent runs side by side, a core each
            done |= {(t, m[0], s): r for (t, m, s), r in zip(phase, pool.map(job, phase))}
    minutes = (time.time() - t0) / 60
    rows = []
    for task in tasks:
        sft = [done[(task, "SFT", s)] for s in seeds]
        rows.append((task, "start model", f"{sft[0]['base']['bleu']:.1f}",
                     f"{sft[0]['base']['chrf']:.1f}",
                     mean_std([r["base_sample"]["bleu"] for r in sft]),
                     mean_std([r["base_sample"]["chrf"] for r in sft])))
        for label, _, _ in METHODS:
            rs = [done[(task, label, s)] for s in seeds]
            rows.append((task, label, *(mean_std([r[k][m] for r in rs])
                                        for k in ("final", "final_sample")
                                        for m in ("bleu", "chrf"))))
    command = "python bench_grpo_speech.py --compare" + (" --quick" if args.quick else "") + \
        (f" --jobs {args.jobs}" if args.jobs != 2 else "") + \
        (f" --steps {args.steps}" if args.steps else "")
    table = "\n".join(["| task | method | greedy BLEU | greedy chrF | sampled BLEU | "
                       "sampled chrF |",
                       "|---|---|---|---|---|---|"] + [f"| {' | '.join(r)} |" for r in rows])
    n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    test = "its first 100 utterances" if args.quick else "200 ast / 150 sqa utterances"
    text = (f"`{command}` ({n}: {', '.join(map(str, seeds))}; {steps} steps per run; "
            f"{minutes:.1f} min on this machine, {os.cpu_count()} CPU cores, {args.jobs} runs side "
            f"by side). Each cell: the best-on-dev checkpoint (greedy dev BLEU over every dev "
            f"utterance, step 0 and every {every} steps), corpus score on "
            f"the test split ({test}), mean ± std over seeds; greedy, and "
            f"sampled with the paper's decoding (temperature 0.9, top-p 0.9, utterance i drawn "
            f"from seeds (run seed, i)). SFT → X starts from the same seed's SFT best checkpoint "
            f"and runs {steps} more steps of X (fresh optimizer and schedule, reference model = "
            f"that checkpoint).\n\n{table}\n")
    (root / "table.md").write_text(text)
    print(text)
    if not args.out:
        replace_readme_block("compare-quick" if args.quick else "compare", text)
    plot_curves(root, tasks, seeds, args.quick or bool(args.out))


def plot_curves(root: Path, tasks, seeds, scratch: bool) -> None:
    """Sampled reward, policy entropy and greedy dev BLEU against step, each the mean over seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no curves.png")
        return
    fig, axes = plt.subplots(3, len(tasks), figsize=(11, 10))
    n = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
    smooth = lambda ys, k=20: [statistics.mean(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
    for col, task in enumerate(tasks):
        for label, mode, _ in METHODS:
            runs = [[json.loads(l) for l in
                     (run_dir(root, task, label, s) / "metrics.jsonl").open()] for s in seeds]
            mean_of = lambda key: [statistics.mean(v) for v in
                                   zip(*[[r[key] for r in run if key in r] for run in runs])]
            if mode != "sft":  # SFT samples nothing: no reward
                ys = smooth(mean_of("reward/mean"))
                axes[0, col].plot(range(1, len(ys) + 1), ys, label=label)
            ys = smooth(mean_of("perf/entropy"))
            axes[1, col].plot(range(1, len(ys) + 1), ys, label=label)
            xs = [r["step"] for r in runs[0] if "eval/dev_bleu" in r]
            axes[2, col].plot(xs, mean_of("eval/dev_bleu"), marker="o", label=label)
        axes[0, col].set(title=f"{task}: reward of the on-policy samples ({n}, 20-step mean)",
                         xlabel="step", ylabel="sentence BLEU / 100")
        axes[1, col].set(title=f"{task}: policy entropy on the trained tokens (nats/token)",
                         xlabel="step")
        axes[2, col].set(title=f"{task}: greedy dev BLEU (mean of {n})", xlabel="step",
                         ylabel="corpus BLEU")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "curves.png", dpi=75)
    print(f"wrote {root / 'curves.png'}")
    if not scratch:  # the README shows it; runs/ is not in git
        shutil.copy(root / "curves.png", gs.HERE / "data" / "compare-curves.png")


def default_runs(args) -> None:
    """The README's first command for seeds 0, 1, 2 at torch's default thread count, one at a
    time."""
    root = Path(args.out) if args.out else gs.HERE / "runs" / "default"
    rows, times = [], []
    for seed in (0, 1, 2):
        t0 = time.time()
        r = run_method("ast", "grpo", seed, 300, root / f"s{seed}", 0)
        times.append(time.time() - t0)
        rows.append(r)
    base = rows[0]["base"]
    gains = [r["final"]["bleu"] - base["bleu"] for r in rows]
    table = "\n".join(["| | greedy test BLEU | greedy test chrF | sampled test BLEU |",
                       "|---|---|---|---|",
                       f"| start model | {base['bleu']:.2f} | {base['chrf']:.2f} | "
                       f"{mean_std([r['base_sample']['bleu'] for r in rows])} |"] +
                      [f"| GRPO seed {s} | {r['final']['bleu']:.2f} | {r['final']['chrf']:.2f} | "
                       f"{r['final_sample']['bleu']:.2f} |" for s, r in enumerate(rows)] +
                      [f"| GRPO mean ± std | {mean_std([r['final']['bleu'] for r in rows])} | "
                       f"{mean_std([r['final']['chrf'] for r in rows])} | "
                       f"{mean_std([r['final_sample']['bleu'] for r in rows])} |"])
    text = (f"`python grpo_speech.py --task ast --mode grpo --seed S`, S = 0, 1, 2, one after "
            f"another with torch's default threads ({torch.get_num_threads()} here), through "
            f"`python bench_grpo_speech.py --default-runs`: {min(times):.0f}-{max(times):.0f} s "
            f"a run. Every seed above the start model: {'yes' if min(gains) > 0 else 'no'} "
            f"(greedy BLEU gains {', '.join(f'{g:+.2f}' for g in gains)}).\n\n"
            f"{table}\n")
    print(text)
    (root / "table.md").write_text(text)
    if not args.out:
        replace_readme_block("default-table", text)


# --memory: bytes per parameter measured on the shipped model through the training code, scaled
# by the released models' parameter counts (RELEASED.md), counted on the meta device.
GRANITE_LM = {"2B": dict(hidden_size=2048, intermediate_size=8192), "8B": dict(hidden_size=4096, intermediate_size=12800)}


def granite_speech_meta(size: str):
    """granite-speech-3.3-{2b,8b} as shapes only: built on the meta device, no weights, no files."""
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration
    text = dict(model_type="granite", num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=49160, tie_word_embeddings=True, **GRANITE_LM[size])
    encoder = dict(num_layers=16, hidden_dim=1024, num_heads=8, dim_head=128, feedforward_mult=4,
                   conv_kernel_size=15, context_size=200, output_dim=256, input_dim=160)
    projector = dict(model_type="blip_2_qformer", num_hidden_layers=2, hidden_size=1024, num_attention_heads=16,
                     intermediate_size=4096, encoder_hidden_size=1024, cross_attention_frequency=1)
    config = GraniteSpeechConfig(text_config=text, encoder_config=encoder, projector_config=projector,
                                 window_size=15, downsample_rate=5, audio_token_index=49159, tie_word_embeddings=True,
                                 has_lora_adapter=False)   # the adapter adds no parameters: merged at load
    with torch.device("meta"):
        return GraniteSpeechForConditionalGeneration(config)


def state_bytes(model, params, optimizer, ref_model) -> dict:
    """Bytes held after an optimizer step: policy weights, gradients, AdamW moments, and the
    reference's tensors that the policy does not share (found by data_ptr)."""
    size = lambda ts: sum(t.element_size() * t.numel() for t in ts)
    ptrs = {p.data_ptr() for p in model.parameters()}
    ref_own = [p for p in ref_model.parameters() if p.data_ptr() not in ptrs]
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return dict(weights=size(model.parameters()), gradients=size(p.grad for p in params if p.grad is not None),
                adamw=size(moments), reference=size(ref_own),
                n_weights=sum(p.numel() for p in model.parameters()), n_trained=sum(p.numel() for p in params),
                n_reference=sum(p.numel() for p in ref_own))


def memory(args) -> None:
    torch.manual_seed(0)
    device = torch.device("cpu")
    rows = gs.read_manifest(args.data)[:2]
    measured = {}
    for name, extra in (("full", {}), ("full --bf16", dict(bf16=True)), ("--lora 64", dict(lora=64, lora_alpha=32.0))):
        model, tok = gs.load_model(args.model, device)
        cfg = gs.resolve_config(gs.Config(model=args.model, mode="grpo", **extra))
        params, optimizer, _, ref_model = gs.setup_training(cfg, model, gs.Dist())
        batch = gs.collate(gs.SpeechData(rows), [0, 1], tok, model.config.audio_token_id,
                           system=gs.system_turn(tok), config=model.config)
        completions = torch.randint(0, model.config.text_config.vocab_size, (2 * 2, 8))   # B=2, G=2, T=8
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            gs.completion_logprobs(model, batch, completions, 2).mean().backward()
        optimizer.step()                                 # AdamW's moments exist from the first step
        measured[name] = b = state_bytes(model, params, optimizer, ref_model)
        print(f"measured, {name}: weights {b['weights'] / b['n_weights']:.2f} B/param, gradients "
              f"{b['gradients'] / b['n_trained']:.2f} and AdamW {b['adamw'] / b['n_trained']:.2f} B/trained param, "
              f"reference {b['reference'] / max(1, b['n_reference']):.2f} B/param over {b['n_reference']:,} "
              f"unshared parameters ({b['n_reference'] / b['n_weights']:.1%} of the policy's)")
    per = lambda name, k, n: measured[name][k] / measured[name][n]
    w, g, a = per("full", "weights", "n_weights"), per("full", "gradients", "n_trained"), per("full", "adamw", "n_trained")
    ref16, ref_lora = per("full --bf16", "reference", "n_reference"), per("--lora 64", "reference", "n_reference")
    lw, lg, la = (per("--lora 64", "weights", "n_weights"), per("--lora 64", "gradients", "n_trained"),
                  per("--lora 64", "adamw", "n_trained"))

    counts, cols = {}, []
    for size in ("2B", "8B"):
        m = granite_speech_meta(size)
        n = lambda mod: sum(p.numel() for p in mod.parameters())
        lm = m.model.language_model
        attn = lm.layers[0].self_attn
        lora = 64 * sum(l.in_features + l.out_features for l in (attn.q_proj, attn.v_proj)) * len(lm.layers)
        c = dict(total=n(m), encoder=n(m.model.encoder), projector=n(m.model.projector), lm=n(lm), lora=lora)
        counts[size] = c
        print(f"counted, {size}: {c['total'] / 1e9:.3f}B parameters = encoder {c['encoder'] / 1e6:.1f}M + projector "
              f"{c['projector'] / 1e6:.1f}M + LM {c['lm'] / 1e9:.3f}B (tied head); LoRA r64 q/v {c['lora'] / 1e6:.1f}M")
    GB = 1e9
    for size in ("2B", "8B"):      # full training under --bf16: fp32 weights, bf16-stored reference
        c = counts[size]
        trained = c["total"] - c["encoder"]
        cols.append((f"full, 1 GPU, {size}", [w * c["total"], g * trained, a * trained, ref16 * c["total"]]))
    for size in ("2B", "8B"):      # --lora 64: frozen fp32 weights, the reference copies the projector
        c = counts[size]
        trained = c["lora"] + c["projector"]
        cols.append((f"`--lora 64`, 1 GPU, {size}",
                     [lw * (c["total"] + c["lora"]), lg * trained, la * trained, ref_lora * c["projector"]]))
    names = ["weights", "gradients", "AdamW moments", "reference pi_ref"]
    fmt = lambda x: f"{x / GB:.1f}" if x >= GB else f"{x / GB:.2f}"
    lines = ["| GB (1e9 bytes) | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(v[i]) for _, v in cols) + " |" for i, name in enumerate(names)]
    lines += ["| **total before activations** | " + " | ".join(f"**{fmt(sum(v))}**" for _, v in cols) + " |"]
    print()
    print("\n".join(lines))
    print(f"\nmeasured bytes per parameter (fp32 master weights): weights {w:.0f}, gradients {g:.0f}, AdamW {a:.0f} "
          f"(two moments), reference {per('full', 'reference', 'n_reference'):.0f} (fp32) or {ref16:.0f} (--bf16); "
          f"--lora: the reference shares the LM and copies only the projector ({ref_lora:.0f} B/param).")
    print("full columns are --bf16 runs (reference stored in bf16; without --bf16 it is fp32, twice that); the "
          "encoder is frozen, so it has no gradients or AdamW moments.")
    tokens = 8 * 450
    for size in ("2B", "8B"):
        h = GRANITE_LM[size]["hidden_size"]
        print(f"activations, NOT measured (an estimate): one group, G = 8 x ~450 tokens, {size}: "
              f"~{34 * tokens * h * 40 / GB:.0f} GB (34 bytes x tokens x hidden x 40 layers, 16-bit activations "
              f"without recomputation, Korthikanti et al. 2022) plus fp32 logits and log-softmax "
              f"{2 * 4 * 8 * 200 * 49160 / GB:.1f} GB")
    act = {size: (34 * tokens * GRANITE_LM[size]["hidden_size"] * 40 + 2 * 4 * 8 * 200 * 49160) / GB
           for size in ("2B", "8B")}
    print("total with that estimate (an estimate): " + "; ".join(
        f"{h.replace('`', '')} ~{sum(v) / GB + act[h[-2:]]:.0f} GB" for h, v in cols))
    B, G, world = 8, 8, 4
    print(f"--grad-accum: policy_update splits each process's B / processes prompts into --grad-accum micro-batches "
          f"of whole groups, so one group (G = {G}) a micro-batch at --batch-size {B} needs --grad-accum {B} on one "
          f"GPU, or --grad-accum {B // world} with torchrun --nproc_per_node {world} ({B // world} prompts a process)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed", action="store_true", help="run the speed benchmark")
    p.add_argument("--compare", action="store_true",
                   help="run the base/SFT/GRPO/MP-GRPO comparison")
    p.add_argument("--memory", action="store_true",
                   help="bytes per parameter measured on --model, scaled to the released 2B and 8B")
    p.add_argument("--quick", action="store_true", help="with --compare: one seed, 100 steps")
    p.add_argument("--steps", type=int, default=0,
                   help="with --compare: steps per run (default 300, --quick 100)")
    p.add_argument("--out", default="",
                   help="with --compare / --default-runs: run root (then README untouched)")
    p.add_argument("--default-runs", action="store_true",
                   help="the README's first command, seeds 0-2, at torch's default threads")
    p.add_argument("--jobs", type=int, default=2,
                   help="with --compare: runs side by side (one thread each on 2 cores)")
    p.add_argument("--model", default=str(gs.HERE / "data" / "tiny-granite-speech"))
    p.add_argument("--data", default=str(gs.HERE / "data" / "ast" / "train.jsonl"))
    p.add_argument("--batch-size", type=int, default=4, help="B prompts")
    p.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per sample (EOS disabled)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.compare:
        return compare(args)
    if args.default_runs:
        return default_runs(args)
    if args.memory:
        return memory(args)
    if not args.speed:
        p.error("nothing to do: pass --speed, --compare or --memory")
    torch.manual_seed(0)
    device = gs.pick_device(args.device)
    model, tok = gs.load_model(args.model, device)
    model.eval()
    B, G, T = args.batch_size, args.group_size, args.new_tokens
    data = gs.SpeechData(gs.read_manifest(args.data)[:B])
    batch = gs.collate(data, list(range(B)), tok, model.config.audio_token_id,
                       system=gs.system_turn(tok), config=model.config).to(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, B={B} "
          f"G={G} T={T}, model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")

    # 1. group sampling against generate(num_return_sequences=G)
    ours = lambda: gs.sample_groups(model, batch, G, max_new_tokens=T, eos_id=-1,
                                    pad_id=tok.pad_token_id, temperature=1.0)
    def hf():
        with torch.no_grad():
            model.generate(input_ids=batch.input_ids, input_features=batch.features,
                           input_features_mask=batch.features_mask,
                           attention_mask=batch.attention_mask, do_sample=True,
                           num_return_sequences=G, max_new_tokens=T, min_new_tokens=T,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, top_k=0)
    t_ours, t_hf = timed(ours, args.repeats), timed(hf, args.repeats)
    s = ours()

    # 2. policy forward + backward: encoder once per group vs once per completion
    completions = s.tokens
    mask = torch.ones_like(completions, dtype=torch.bool)
    adv = torch.randn(B * G, device=device)
    def update(m, b, g, train_encoder=True):
        logp = gs.completion_logprobs(m, b, completions, g, train_encoder=train_encoder)
        loss, _ = gs.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
        loss.backward()
        m.zero_grad(set_to_none=True)
    expanded = gs.Batch(batch.features.repeat_interleave(G, 0),
                        batch.frames.repeat_interleave(G, 0),
                        batch.features_mask.repeat_interleave(G, 0),
                        batch.input_ids.repeat_interleave(G, 0),
                        batch.attention_mask.repeat_interleave(G, 0),
                        [], [])
    t_once = timed(lambda: update(model, batch, G), args.repeats)
    t_per = timed(lambda: update(model, expanded, 1), args.repeats)

    # 3. bf16 autocast and torch.compile against eager fp32 (encoder frozen, as in training)
    t_fp32 = timed(lambda: update(model, batch, G, False), args.repeats)
    def bf16():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            update(model, batch, G, False)
    t_bf16 = timed(bf16, args.repeats)
    compiled = copy.deepcopy(model)
    compiled.model.language_model.compile(dynamic=True)  # as train() does under --compile
    t_compile = timed(lambda: update(compiled, batch, G, False), args.repeats)

    # 4. FLOP/s of the update against the matmul peak, and peak memory
    with FlopCounterMode(display=False) as fc:
        update(model, batch, G, False)
    flops = fc.get_total_flops()
    peak = matmul_peak(device)
    mem = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    # 5. one GRPO step, piece by piece
    ref = lambda: gs.completion_logprobs(model, batch, completions, G)
    refs = [t for t in batch.targets for _ in range(G)]
    texts = gs.decode(tok, s.token_lists())
    t_reward = timed(lambda: gs.bleu_reward(texts, refs), args.repeats)
    with torch.no_grad():
        t_ref = timed(ref, args.repeats)

    print(f"update fp32: {flops / 1e9:.2f} GFLOP in {t_fp32 * 1e3:.0f} ms = "
          f"{flops / t_fp32 / 1e9:.1f} GFLOP/s, {100 * flops / t_fp32 / peak:.1f}% of the "
          f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"peak memory: {mem:.0f} MiB "
          f"({'CUDA allocated' if device.type == 'cuda' else 'process max RSS'})")
    print(f"step breakdown (s): sample {t_ours:.3f}, reward {t_reward:.3f}, "
          f"reference log-probs {t_ref:.3f}, policy update {t_fp32:.3f}")
    print(f"encoder once per group vs per completion (fwd+bwd, encoder trained): "
          f"{t_per / t_once:.2f}x")
    print(f"bf16 autocast vs fp32 (fwd+bwd): {t_fp32 / t_bf16:.2f}x")
    print(f"torch.compile vs eager (fwd+bwd): {t_fp32 / t_compile:.2f}x")
    print(f"group sampling vs generate(num_return_sequences={G}): {t_hf * 1e3:.0f} ms / "
          f"{t_ours * 1e3:.0f} ms")

    print(f"{t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
