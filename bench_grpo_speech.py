"""Benchmarks of grpo_speech.py: the paper's comparison at small scale, and the hot loop's speed.

  python bench_grpo_speech.py --compare           # start, SFT, GRPO, MP-GRPO, SFT -> X; 3 seeds
  python bench_grpo_speech.py --compare --quick   # one seed, fewer steps
  python bench_grpo_speech.py --ablation          # GRPO on sqa with 5 rewards; 3 seeds
  python bench_grpo_speech.py --voices            # --compare's test BLEU by voice set, no training
  python bench_grpo_speech.py --speed             # same process, same model, same inputs
  python bench_grpo_speech.py --memory            # bytes per parameter, the 2B/8B and Qwen2-Audio-7B memory table
  python bench_grpo_speech.py --full-size 2b      # 3 GRPO steps on a random model of the released 2B's shape
  python bench_grpo_speech.py --contention        # the default command, alone and beside a busy core
  python bench_grpo_speech.py --kill-soak 20      # SIGKILL a short run 20 times, resume, compare
  python bench_grpo_speech.py --gpu-check         # every README configuration on one GPU (--dry-run: the plan)

Each option is one function below (TABLES, at the end, maps them); its docstring says what it runs and
writes.
"""

import argparse
import collections
import contextlib
import copy
import functools
import importlib.util
import itertools
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sacrebleu
import torch
from torch.utils.flop_counter import FlopCounterMode

import grpo_speech as gs

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "data" / "tiny-granite-speech"
QWEN = HERE / "data" / "tiny-qwen2-audio"


def per_completion_logprobs(model, batch, completions, group_size, temperature=1.0,
                            train_encoder=False, encoded=None):
    """The teacher-forced pass as it was before the prompt was shared: every one of the N = B*G
    rows runs [prompt + completion] through the LM. The reference that tests and --speed hold
    gs.completion_logprobs to."""
    N, T = completions.shape
    prompt = gs.prompt_embeddings(model, batch, train_encoder, encoded).repeat_interleave(group_size, 0)
    embeds = torch.cat([prompt, model.get_input_embeddings()(completions)], dim=1)
    mask = torch.cat([batch.attention_mask.repeat_interleave(group_size, 0),
                      torch.ones_like(completions)], dim=1)
    hidden = model.model(inputs_embeds=embeds, attention_mask=mask,
                         position_ids=gs.positions(mask), use_cache=False).last_hidden_state
    logits = gs.lm_logits(model, hidden[:, -(T + 1):-1]).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, completions[..., None]).squeeze(-1)


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


def saved_bytes(fn, model) -> int:
    """Bytes of the distinct non-parameter tensors that autograd keeps for fn's backward."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            kept[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


# The lengths behind prompt_sharing_table, each a mean, with where it comes from:
#   CoVoST 2 en clips: 430 h of train audio in 289,430 clips (Wang et al. 2020, Table 1): 5.3 s;
#   LibriSQA part I: LibriSpeech utterances, 960 h in 281,241 (Panayotov et al. 2015): 12.3 s;
#   audio tokens: 10 a second (window Q-Former: 15 frame pairs -> 3 embeddings; the released config.json);
#   text: the model card's system turn, the role markers and the paper's instruction, counted at
#   4 characters a BPE token (an estimate: no Granite tokenizer here); SQA questions ~12 tokens;
#   answers (NOT published; assumed): German translations 20 tokens, LibriSQA answers 30, + EOS.
PROMPT_TASKS = {"AST": dict(seconds=430 * 3600 / 289_430, text=gs.PROMPTS["ast"], answer=21),
                "SQA": dict(seconds=960.9 * 3600 / 281_241, text=gs.PROMPTS["sqa"], answer=31,
                            question=12)}


def prompt_sharing_table(G: int) -> str:
    """For the released 2B and 8B on AST and SQA: the share of the per-completion pass's tokens
    that are copies of a prompt, and the predicted cut in the teacher-forced LM pass's FLOPs
    (layers: 2 x the weights a token meets, plus attention over its context; the head runs on
    completion tokens either way; the encoder runs once per prompt either way)."""
    rows = ["| model | task | prompt tokens P | answer tokens T | prompt copies in the per-completion "
            "pass | LM FLOPs per group, per-completion / shared |", "|---|---|---|---|---|---|"]
    for size, lm in GRANITE_LM.items():
        h, mlp, layers, kv = lm["hidden_size"], lm["intermediate_size"], 40, 8 / 32
        per_token = 2 * layers * (h * h * (2 + 2 * kv) + 3 * h * mlp)   # q, o, k, v; SwiGLU MLP
        attention = lambda tokens, context: 4 * layers * h * tokens * context   # QK^T and AV
        for task, t in PROMPT_TASKS.items():
            text = len(gs.CARD_SYSTEM) + len(t["text"].replace("{question}", "")) + 4 * 8   # roles
            P = round(10 * t["seconds"] + text / 4 + t.get("question", 0))
            T = t["answer"]
            each = G * (per_token * (P + T) + attention(P + T, (P + T) / 2))
            shared = per_token * (P + G * T) + attention(P, P / 2) + G * attention(T, P + T / 2)
            rows.append(f"| {size} | {task} | {P} | {T} | {100 * (G - 1) * P / (G * (P + T)):.0f}% "
                        f"| {each / shared:.2f}x |")
    return "\n".join(rows)


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
        cmd = [sys.executable, str(HERE / "grpo_speech.py"), "--task", task, "--mode", mode,
               "--seed", str(seed), "--max-steps", str(steps), "--out", str(out),
               "--overwrite"] + (["--model", model] if model else []) + list(options)
        t0 = time.time()
        env = dict(os.environ, TQDM_DISABLE="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
        (out / "stdout.txt").write_text(p.stdout)      # what the console showed, bars aside
        print(f"  {task} {mode} seed {seed}{' from ' + model if model else ''}: "
              f"{time.time() - t0:.0f} s", flush=True)
    return json.loads((out / "results.json").read_text())


def replace_readme_block(name: str, text: str) -> None:
    """Put `text` between README.md's <!-- name:begin --> and <!-- name:end --> markers, if any."""
    readme = HERE / "README.md"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = readme.read_text()
    if begin in old:
        readme.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end),
                                 lambda _: f"{begin}\n{text}{end}", old, flags=re.S))


def md_table(header: list[str], rows: list[list]) -> str:
    return "\n".join([f"| {' | '.join(header)} |", "|---" * len(header) + "|"] +
                     [f"| {' | '.join(map(str, row))} |" for row in rows])


def mean_std(xs: list[float]) -> str:
    return (f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1
            else f"{xs[0]:.1f}")


# (label, mode, starts from the same seed's SFT best checkpoint)
METHODS = [("SFT", "sft", False), ("GRPO", "grpo", False), ("MP-GRPO", "mp-grpo", False),
           ("SFT → GRPO", "grpo", True), ("SFT → SFT", "sft", True)]


def method_seeds(args, seeds: list, from_sft: bool) -> list:
    """The seeds a --compare method runs: all of them, or --continued-seeds K's first K for SFT -> X."""
    return seeds[:args.continued_seeds] if from_sft and args.continued_seeds else seeds


def run_dir(root: Path, task: str, label: str, seed: int) -> Path:
    """root/<task>-<mode>-s<seed>, the mode prefixed by sft- for SFT -> X: e.g. ast-sft-grpo-s0."""
    _, mode, from_sft = next(m for m in METHODS if m[0] == label)
    return root / f"{task}-{'sft-' * from_sft}{mode}-s{seed}"


def sweep_plan(args, name: str):
    """--compare's and --ablation's seeds, steps, dev interval, grpo_speech.py options, run root
    and the command line that names them."""
    seeds = [0] if args.quick else [0, 1, 2]
    steps = args.steps or (100 if args.quick else 300)
    # --quick is a smoke test of the whole pipeline in under 10 minutes: dev scored twice
    # (every dev utterance), the test split's first 100 utterances
    every = max(1, steps // 2) if args.quick else min(30, max(1, steps // 4))
    options = ("--eval-every", str(every)) + (("--eval-limit", "100") if args.quick else ())
    root = (Path(args.out) if args.out else
            HERE / "runs" / (f"{name}-quick" if args.quick else name))
    command = f"python bench_grpo_speech.py --{name}" + (" --quick" if args.quick else "") + \
        (f" --jobs {args.jobs}" if args.jobs != 2 else "") + \
        (f" --steps {args.steps}" if args.steps else "")
    return seeds, steps, every, options, root, command


def side_by_side(args, jobs: list, job) -> dict:
    """{j: job(j)} for each j of jobs, args.jobs independent runs at a time."""
    with ThreadPoolExecutor(args.jobs) as pool:
        return dict(zip(jobs, pool.map(job, jobs)))


def sweep_header(args, command: str, seeds: list, steps: int, t0: float) -> str:
    # runs already done are kept, so the wall time is of this call's runs only (none: every run was there)
    return (f"`{command}` ({seeds_phrase(seeds)}; {steps} steps per run; {os.cpu_count()} CPU cores, "
            f"{args.jobs} runs side by side; {(time.time() - t0) / 60:.1f} min for the runs this call made).")


def seeds_phrase(seeds: list) -> str:
    return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {', '.join(map(str, seeds))}"


def publish(path: Path, text: str, block: str | None) -> None:
    """Print a table's text, write it to path and, where block names one, into README.md."""
    print(text)
    path.write_text(text)
    if block:
        replace_readme_block(block, text)


def compare(args) -> None:
    """--compare runs the real command line once per (task, method, seed) into runs/compare/ (SFT,
    GRPO, MP-GRPO, then SFT -> GRPO and SFT -> SFT from each seed's SFT best/), writes
    runs/compare/table.md (corpus BLEU and chrF on the test split, greedy and sampled, mean +- std
    over seeds, of each method's best-on-dev checkpoint) and puts it into README.md between the compare markers, with
    the command and its wall time; with matplotlib installed it also draws runs/compare/curves.png.
    SFT and GRPO get an equal budget of updates and sequences: the same number of steps, each
    step pushing B x G = 32 sequences through the policy (SFT: 32 references; GRPO: 4 prompts x 8
    samples; MP-GRPO: 4 x (7 samples + the reference))."""
    seeds, steps, every, options, root, command = sweep_plan(args, "compare")
    tasks = ("ast", "sqa")
    t0 = time.time()
    # two phases: the SFT -> X runs start from the best/ checkpoint of a finished SFT run
    methods = [m for m in METHODS if not (args.no_continued and m[2])]
    jobs = [(task, m, seed) for task in tasks for m in methods for seed in method_seeds(args, seeds, m[2])]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def job(j):
        task, (label, mode, from_sft), seed = j
        model = str(run_dir(root, task, "SFT", seed) / "best") if from_sft else None
        return run_method(task, mode, seed, steps, run_dir(root, task, label, seed), threads, model,
                          options)
    done = {}
    for phase in ([j for j in jobs if not j[1][2]], [j for j in jobs if j[1][2]]):
        done |= {(t, m[0], s): r for (t, m, s), r in side_by_side(args, phase, job).items()}
    rows = []
    for task in tasks:
        sft = [done[(task, "SFT", s)] for s in seeds]
        rows.append((task, "start model", f"{sft[0]['base']['bleu']:.1f}", f"{sft[0]['base']['chrf']:.1f}",
                     *(mean_std([r["base_sample"][m] for r in sft]) for m in ("bleu", "chrf"))))
        for label, _, from_sft in methods:
            ss = method_seeds(args, seeds, from_sft)
            rows.append((task, label + (f" ({seeds_phrase(ss)})" if ss != seeds else ""),
                         *(mean_std([done[(task, label, s)][k][m] for s in ss])
                           for k in ("final", "final_sample") for m in ("bleu", "chrf"))))
    command += " --no-continued" if args.no_continued else ""
    command += f" --continued-seeds {args.continued_seeds}" if args.continued_seeds else ""
    table = md_table(["task", "method", "greedy BLEU", "greedy chrF", "sampled BLEU", "sampled chrF"], rows)
    test = "its first 100 utterances" if args.quick else "200 ast / 150 sqa utterances"
    text = (f"{sweep_header(args, command, seeds, steps, t0)} Each cell: the best-on-dev checkpoint (greedy dev "
            f"BLEU over every dev "
            f"utterance, step 0 and every {every} steps), corpus score on "
            f"the test split ({test}), mean ± std over seeds; greedy, and "
            f"sampled with the paper's decoding (temperature 0.9, top-p 0.9, utterance i drawn "
            f"from seeds (run seed, i))." + ("" if args.no_continued else
            f" SFT → X starts from the same seed's SFT best checkpoint and runs {steps} more steps "
            f"of X (fresh optimizer and schedule, reference model = that checkpoint).") +
            f"\n\n{table}\n")
    publish(root / "table.md", text, None if args.out else "compare-quick" if args.quick else "compare")
    plot_curves(root, tasks, seeds, args.quick or bool(args.out), methods,
                lambda from_sft: method_seeds(args, seeds, from_sft))


ABLATION_REWARDS = ("bleu", "rouge-1", "rouge-2", "rouge-l", "chrf")
ABLATION_METRICS = (("BLEU", "bleu"), ("chrF", "chrf"), ("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"),
                    ("ROUGE-L", "rougeL"))


def ablation(args) -> None:
    """--ablation is the paper's reward ablation (BLEU, ROUGE-1/2/L and METEOR rewards on LibriSQA, 2B) at small
    scale: GRPO on sqa from the shipped start model
    with each reward of ABLATION_REWARDS, 3 seeds, --compare's budget and selection, into
    runs/ablation/; its table (test BLEU, chrF, ROUGE-1/2/L and their average, greedy and sampled,
    mean +- std over seeds) goes to runs/ablation/table.md and into README.md between the ablation
    markers. --quick: one seed, 100 steps."""
    seeds, steps, every, options, root, command = sweep_plan(args, "ablation")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(reward, seed) for reward in ABLATION_REWARDS for seed in seeds]
    t0 = time.time()

    def job(j):
        reward, seed = j
        return run_method("sqa", "grpo", seed, steps, root / f"sqa-{reward}-s{seed}", threads,
                          options=options + ("--reward", reward))
    done = side_by_side(args, jobs, job)

    def cells(scores: list[dict]) -> list[str]:
        """Each metric, then the per-run average of all five, as mean +- std over the runs."""
        per_metric = [[s[k] for s in scores] for _, k in ABLATION_METRICS]
        return [mean_std(xs) for xs in per_metric] + [mean_std(list(map(statistics.mean,
                                                                        zip(*per_metric))))]
    rows = []
    for decoding, suffix in (("greedy", ""), ("sampled", "_sample")):
        start = [done[(ABLATION_REWARDS[0], s)]["base" + suffix] for s in seeds]
        rows.append(("start model", decoding, *cells(start)))
        rows += [(f"GRPO, `--reward {reward}`", decoding,
                  *cells([done[(reward, s)]["final" + suffix] for s in seeds]))
                 for reward in ABLATION_REWARDS]
    table = md_table(["reward", "decoding", *(name for name, _ in ABLATION_METRICS), "average"], rows)
    test = f"{'its first ' if args.quick else ''}{done[jobs[0]]['final']['n']} utterances"
    text = (f"{sweep_header(args, command, seeds, steps, t0)} GRPO on sqa from the shipped start model with each "
            f"reward, everything else the default. Each cell: the best-on-dev checkpoint (greedy dev BLEU over "
            f"every dev utterance, whatever the reward; step 0 and every {every} steps), scored on the sqa "
            f"test split ({test}), mean ± std over seeds: corpus BLEU and chrF, ROUGE as the mean "
            f"sentence F-measure x 100; average: of the five, per run. Sampled: the paper's "
            f"decoding (temperature 0.9, top-p 0.9, utterance i drawn from seeds (run seed, i)).\n\n"
            f"{table}\n")
    publish(root / "table.md", text, None if args.out else "ablation-quick" if args.quick else "ablation")


def plot_curves(root: Path, tasks, seeds, scratch: bool, methods, seeds_of=None) -> None:
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
        for label, mode, from_sft in methods:
            runs = [[json.loads(l) for l in (run_dir(root, task, label, s) / "metrics.jsonl").open()]
                    for s in (seeds_of(from_sft) if seeds_of else seeds)]
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
        shutil.copy(root / "curves.png", HERE / "data" / "compare-curves.png")


def voice_sets(task: str) -> dict[str, str]:
    """Test utterance id -> its speaker's voice set: A (pre-training and train voices), B (train only), C (unseen);
    data/make_data.py's VOICES, data/audio/synthesis.jsonl's voice of each file, matched by the audio path."""
    spec = importlib.util.spec_from_file_location("make_data", HERE / "data" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)            # definitions only: its work is under __main__
    set_of = {voice: name for name, voices in make_data.VOICES.items() for voice in voices}
    synthesis = HERE / "data" / "audio" / "synthesis.jsonl"
    voice = {(synthesis.parent.parent / r["audio"]).resolve(): r["voice"]
             for r in map(json.loads, synthesis.read_text().splitlines())}
    manifest = HERE / "data" / task / "test.jsonl"
    sets = {}
    for row in gs.read_manifest(manifest):
        v = voice.get(Path(row["audio"]).resolve())
        if v not in set_of:
            raise gs.InputError(f"{synthesis}: no voice of a known set for {row['id']} ({row['audio']} in {manifest})")
        sets[row["id"]] = set_of[v]
    return sets


def voices(args) -> None:
    """--voices scores --compare's runs again (no training) by the speaker's voice set: A, the start model's
    pre-training voices (also in train), B, voices of train only, C, voices of the test split only (data/make_data.py's
    VOICES, data/audio/synthesis.jsonl). Corpus BLEU of each set, as evaluate() scores the whole split, from each run's
    hyps_final.jsonl and hyps_final_sample.jsonl (the start model: the SFT runs' hyps_base*), mean +- std over seeds;
    then each method's gain over the start model per set, and SFT's over GRPO: is SFT's lead the acoustic shift
    (voices B and C) or also on the voices the start model was trained on (A)? Into runs/compare/voices.md and
    README.md between the voices markers (--out: another compare root, README untouched)."""
    root = Path(args.out) if args.out else HERE / "runs" / "compare"
    seeds = sorted(int(m[1]) for p in root.glob("ast-sft-s*") if (m := re.fullmatch(r"ast-sft-s(\d+)", p.name)))
    if not seeds:
        raise gs.InputError(f"{root}: no --compare runs (python bench_grpo_speech.py --compare writes them)")
    # (method, the run whose hyps_<kind>*.jsonl it is scored by)
    methods = [("start model", "SFT", "base")] + [(label, label, "final") for label, _, _ in METHODS]
    from_sft = {label: f for label, _, f in METHODS} | {"start model": False}
    decodings = (("greedy", ""), ("sampled", "_sample"))
    bleu, ids = collections.defaultdict(list), {}
    for task in ("ast", "sqa"):
        sets = voice_sets(task)
        for (method, run, kind), (decoding, suffix), seed in itertools.product(methods, decodings, seeds):
            if seed not in method_seeds(args, seeds, from_sft[method]):
                continue
            path = run_dir(root, task, run, seed) / f"hyps_{kind}{suffix}.jsonl"
            if not path.is_file():
                raise gs.InputError(f"{path}: missing (--compare writes it; seeds {seeds} found)")
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            got = sorted(r["id"] for r in rows)
            if not set(got) <= set(sets) or got != ids.setdefault(task, got):
                raise gs.InputError(f"{path}: not the test utterances of data/{task}/test.jsonl that "
                                    f"{run_dir(root, task, 'SFT', seeds[0])} scored")
            for s in "ABC":   # corpus BLEU as evaluate() scores the whole split, on the set's utterances
                H, R = [r["hyp"] for r in rows if sets[r["id"]] == s], [r["ref"] for r in rows if sets[r["id"]] == s]
                bleu[task, method, decoding, s].append(sacrebleu.BLEU().corpus_score(H, [R]).score if H else math.nan)
        ids[task] = collections.Counter(sets[i] for i in ids[task])   # utterances per voice set
    cell = lambda *key: "–" if math.isnan(bleu[key][0]) else mean_std(bleu[key])
    head = lambda s, name: f"{name} ({' / '.join(str(ids[t][s]) for t in ids)})"
    table = md_table(["task", "method", "decoding", head("A", "voices A: pre-training + train"),
                      head("B", "B: train only"), head("C", "C: unseen")],
                     [[t, m, d, *(cell(t, m, d, s) for s in "ABC")]
                      for t in ids for m, _, _ in methods for d, _ in decodings])
    # what the split shows: each method's gain over the start model, and SFT's lead over GRPO, per voice set
    mean = lambda *key: statistics.mean(bleu[key])
    gain = lambda t, m, d, s, base: f"{mean(t, m, d, s) - mean(t, base, d, s):+.1f}".replace("+nan", "–")
    gains = md_table(["task", "gain", *(f"{d} {s}" for d, _ in decodings for s in "ABC")],
                     [[t, f"{m} over {base}", *(gain(t, m, d, s, base) for d, _ in decodings for s in "ABC")]
                      for t in ids for m, base in [*((m, "start model") for m, _, _ in methods[1:]), ("SFT", "GRPO")]])
    command = "python bench_grpo_speech.py --voices" + (f" --continued-seeds {args.continued_seeds}"
                                                        if args.continued_seeds else "")
    text = (f"`{command}`: the comparison's test hypotheses (hyps_final*.jsonl of "
            f"each run, the start model's hyps_base*.jsonl of the SFT runs), corpus BLEU per voice set of the "
            f"speaker (data/audio/synthesis.jsonl; utterances ast / sqa in each header), mean ± std over "
            f"{seeds_phrase(seeds)}"
            + (f" (SFT → X: the first {args.continued_seeds})" if args.continued_seeds else "")
            + f".\n\n{table}\n\nDifferences of the means (BLEU points):\n\n{gains}\n")
    publish(root / "voices.md", text, None if args.out else "voices")


# --memory: bytes per parameter measured on the shipped model through the training code, scaled
# by the released models' parameter counts (their config.json files), counted on the meta device.
GRANITE_LM = {"2B": dict(hidden_size=2048, intermediate_size=8192, attention_multiplier=0.015625, logits_scaling=8.),
              "8B": dict(hidden_size=4096, intermediate_size=12800, attention_multiplier=0.0078125, logits_scaling=16.)}


def granite_speech_config(size: str, layers=(40, 16), audio_token_id=49159, **token_ids):
    """granite-speech-3.3-{2b,8b}'s config (the released config.json); `layers` (LM, encoder) and the token ids
    may differ."""
    from transformers import GraniteSpeechConfig
    text = dict(model_type="granite", num_hidden_layers=layers[0], num_attention_heads=32, num_key_value_heads=8,
                vocab_size=49160, tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22,
                rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=1e7), **GRANITE_LM[size],
                **token_ids)
    encoder = dict(num_layers=layers[1], hidden_dim=1024, num_heads=8, dim_head=128, feedforward_mult=4,
                   conv_kernel_size=15, context_size=200, output_dim=256, input_dim=160)
    projector = dict(model_type="blip_2_qformer", num_hidden_layers=2, hidden_size=1024, num_attention_heads=16,
                     intermediate_size=4096, encoder_hidden_size=1024, cross_attention_frequency=1)
    return GraniteSpeechConfig(text_config=text, encoder_config=encoder, projector_config=projector,
                               window_size=15, downsample_rate=5, audio_token_index=audio_token_id,
                               tie_word_embeddings=True, has_lora_adapter=False)   # the adapter adds no parameters


def granite_speech_meta(size: str):
    """granite-speech-3.3-{2b,8b} as shapes only: built on the meta device, no weights, no files."""
    from transformers import GraniteSpeechForConditionalGeneration
    with torch.device("meta"):
        return GraniteSpeechForConditionalGeneration(granite_speech_config(size))


def qwen2_audio_meta():
    """Qwen2-Audio-7B(-Instruct) as shapes only: its config.json (the audio encoder's values are transformers'
    defaults, which equal it; the text config's unwritten ones filled as transformers' Qwen2Config would not:
    hidden 4096, 32 layers, 32 heads, 32 KV heads, untied head)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    text = dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1e4))
    with torch.device("meta"):
        return Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(text_config=text, audio_token_index=151646))


def state_bytes(model, params, optimizer, ref_model) -> dict:
    """Bytes held after an optimizer step: policy weights, gradients, AdamW moments, and the
    reference's tensors that the policy does not share (found by data_ptr)."""
    size = lambda ts: sum(t.element_size() * t.numel() for t in ts)
    ptrs = {p.data_ptr() for p in model.parameters()}
    ref_own = [p for p in ref_model.parameters() if p.data_ptr() not in ptrs]
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return dict(weights=size(model.parameters()), trained_weights=size(params),
                gradients=size(p.grad for p in params if p.grad is not None),
                adamw=size(moments), reference=size(ref_own),
                n_weights=sum(p.numel() for p in model.parameters()), n_trained=sum(p.numel() for p in params),
                n_reference=sum(p.numel() for p in ref_own))


def memory(args) -> None:
    torch.manual_seed(0)
    device = torch.device("cpu")
    rows = gs.read_manifest(args.data)[:2]
    measured = {}
    for name, extra in (("full", {}), ("full --bf16", dict(bf16=True)),
                        ("--lora 64 --bf16", dict(lora=64, lora_alpha=32.0, bf16=True))):
        # as run() loads it: under --lora --bf16 the frozen base is stored in bf16
        model, tok = gs.load_model(args.model, device, torch.bfloat16 if "lora" in extra else torch.float32)
        cfg = gs.resolve_config(gs.Config(model=args.model, mode="grpo", **extra))
        params, optimizer, _, ref_model = gs.setup_training(cfg, model, gs.Dist())
        batch = gs.collate(gs.SpeechData(rows), [0, 1], tok, model.config.audio_token_id,
                           system=gs.system_turn(tok, "auto", model.config), config=model.config)
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
    ref16, ref_lora = per("full --bf16", "reference", "n_reference"), per("--lora 64 --bf16", "reference", "n_reference")
    lg, la = per("--lora 64 --bf16", "gradients", "n_trained"), per("--lora 64 --bf16", "adamw", "n_trained")
    lb = measured["--lora 64 --bf16"]     # weights: frozen ones and trained ones, each at its own bytes/param
    l_frozen = (lb["weights"] - lb["trained_weights"]) / (lb["n_weights"] - lb["n_trained"])
    l_trained = lb["trained_weights"] / lb["n_trained"]

    counts, cols = {}, []
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    for size in ("2B", "8B"):
        m = granite_speech_meta(size)
        lm = m.model.language_model
        attn = lm.layers[0].self_attn
        lora = 64 * sum(l.in_features + l.out_features for l in (attn.q_proj, attn.v_proj)) * len(lm.layers)
        c = dict(total=n(m), encoder=n(m.model.encoder), projector=n(m.model.projector), lm=n(lm), lora=lora)
        counts[size] = c
        print(f"counted, {size}: {c['total'] / 1e9:.3f}B parameters = encoder {c['encoder'] / 1e6:.1f}M + projector "
              f"{c['projector'] / 1e6:.1f}M + LM {c['lm'] / 1e9:.3f}B (tied head); LoRA r64 q/v {c['lora'] / 1e6:.1f}M")
    m = qwen2_audio_meta()         # the second family: its LoRA default is every Linear of the LM's layers
    lm = m.model.language_model
    targets = gs.Qwen2Audio.lora_targets.split(",")
    lora = 64 * sum(mod.in_features + mod.out_features for name, mod in lm.layers[0].named_modules()
                    if name.split(".")[-1] in targets) * len(lm.layers)
    counts["Qwen2-Audio-7B"] = c = dict(total=n(m), encoder=n(m.model.audio_tower),
                                        projector=n(m.model.multi_modal_projector), lm=n(lm) + n(m.lm_head), lora=lora)
    print(f"counted, Qwen2-Audio-7B: {c['total'] / 1e9:.3f}B parameters = encoder {c['encoder'] / 1e6:.1f}M + "
          f"projector {c['projector'] / 1e6:.1f}M + LM {c['lm'] / 1e9:.3f}B (untied head); LoRA r64 on all seven "
          f"Linears of its layers {c['lora'] / 1e6:.1f}M")
    GB = 1e9
    sizes = ("2B", "8B", "Qwen2-Audio-7B")
    for size in sizes:             # full training under --bf16: fp32 weights, bf16-stored reference
        c = counts[size]
        trained = c["total"] - c["encoder"]
        cols.append((f"full, 1 GPU, {size}", [w * c["total"], g * trained, a * trained, ref16 * c["total"]]))
    for size in sizes:             # --lora 64 --bf16: frozen bf16 weights, the reference copies the projector
        c = counts[size]
        trained = c["lora"] + c["projector"]
        cols.append((f"`--lora 64 --bf16`, 1 GPU, {size}",
                     [l_frozen * (c["total"] - c["projector"]) + l_trained * trained, lg * trained, la * trained,
                      ref_lora * c["projector"]]))
    names = ["weights", "gradients", "AdamW moments", "reference pi_ref"]
    fmt = lambda x: f"{x / GB:.1f}" if x >= GB else f"{x / GB:.2f}"
    table = md_table(["GB (1e9 bytes)", *(h for h, _ in cols)],
                     [[name, *(fmt(v[i]) for _, v in cols)] for i, name in enumerate(names)] +
                     [["**total before activations**", *(f"**{fmt(sum(v))}**" for _, v in cols)]])
    print("\n" + table)
    if args.model == str(SHIPPED):   # bytes per parameter measured on the shipped model: README's table
        replace_readme_block("memory", table + "\n")
    print(f"\nmeasured bytes per parameter (fp32 master weights): weights {w:.0f}, gradients {g:.0f}, AdamW {a:.0f} "
          f"(two moments), reference {per('full', 'reference', 'n_reference'):.0f} (fp32) or {ref16:.0f} (--bf16); "
          f"--lora: the reference shares the LM and copies only the projector ({ref_lora:.0f} B/param); "
          f"--lora --bf16 stores the frozen base at {l_frozen:.0f} B/param, what trains at {l_trained:.0f}.")
    print("full columns are --bf16 runs (reference stored in bf16; without --bf16 it is fp32, twice that); the "
          "encoder is frozen, so it has no gradients or AdamW moments.")
    tokens = 8 * 450
    lm_shape = {"2B": (2048, 40, 49160), "8B": (4096, 40, 49160), "Qwen2-Audio-7B": (4096, 32, 156032)}
    act = {}
    for size, (h, layers, vocab) in lm_shape.items():
        # three fp32 (N, T, V) tensors alive in the backward (log-softmax's saved output, the gradients of its
        # output and input; README: memory), N = G = 8 completions of 200 tokens
        act[size] = (34 * tokens * h * layers + 3 * 4 * 8 * 200 * vocab) / GB
        print(f"activations, NOT measured (an estimate): one group, G = 8 x ~450 tokens, {size}: "
              f"~{34 * tokens * h * layers / GB:.0f} GB (34 bytes x tokens x hidden x {layers} layers, 16-bit "
              f"activations without recomputation, Korthikanti et al. 2022) plus three fp32 (8, 200, {vocab}) "
              f"tensors in the backward {3 * 4 * 8 * 200 * vocab / GB:.1f} GB")
    print("total with that estimate (an estimate): " + "; ".join(
        f"{h.replace('`', '')} ~{sum(v) / GB + act[h.rsplit(', ', 1)[-1]]:.0f} GB" for h, v in cols))
    B, G, world = 8, 8, 4
    print(f"--grad-accum: policy_update splits each process's B / processes prompts into --grad-accum micro-batches "
          f"of whole groups, so one group (G = {G}) a micro-batch at --batch-size {B} needs --grad-accum {B} on one "
          f"GPU, or --grad-accum {B // world} with torchrun --nproc_per_node {world} ({B // world} prompts a process)")


# --full-size: the project's own training run (a worker process running grpo_speech.main) on a randomly initialised
# model of the released 2B's shape, with peak RSS and seconds per phase of the run.


def shape(config: dict) -> list:
    t, e, p = config["text_config"], config["encoder_config"], config["projector_config"]
    return [t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"], t["num_key_value_heads"],
            t["vocab_size"], t["logits_scaling"], e["num_layers"], e["hidden_dim"], p["num_hidden_layers"],
            p["hidden_size"], config["audio_token_index"]]


def shipped_token_ids() -> dict:
    """The shipped model's special token ids (pad, bos, eos), which a random model of the 2B's shape takes over."""
    return {k: v for k, v in json.loads((SHIPPED / "config.json").read_text())["text_config"].items()
            if k.endswith("_token_id")}


def build_full_size(path: Path, layers=(40, 16)) -> None:
    """granite-speech-3.3-2b's shape with random weights, created and saved in bf16 (never fp32), and the shipped
    tokenizer (its <|audio|> id); kept when path/config.json already has that shape."""
    from transformers import AutoConfig, GraniteSpeechForConditionalGeneration
    added = json.loads((SHIPPED / "tokenizer.json").read_text())["added_tokens"]
    ids = shipped_token_ids()
    config = granite_speech_config("2B", layers, next(t["id"] for t in added if t["content"] == "<|audio|>"), **ids)
    with torch.device("meta"):
        n = sum(p.numel() for p in GraniteSpeechForConditionalGeneration(config).parameters())
    want = shape(config.to_dict())
    if (path / "config.json").is_file() and shape(AutoConfig.from_pretrained(path).to_dict()) == want:
        return print(f"{path}: {n / 1e9:.3f}B parameters, reused")
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = GraniteSpeechForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)   # safetensors, bf16
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SHIPPED / name, tmp / name)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    print(f"{path}: {n / 1e9:.3f}B parameters, built in {time.time() - t0:.0f} s")


# the phase of a call by the stage of the run (before, in, after train()); nested calls count to the outer one
PHASES = {"load_model": {"before": "load", "after": "best/ scoring"},
          "score_test": {"before": "start scoring", "after": "best/ scoring"},
          "evaluate": {"before": "start scoring", "train": "dev scoring", "after": "best/ scoring"},
          "sample_groups": {"train": "sampling"}, "policy_update": {"train": "update"},
          "save_model": {"train": "save", "after": "save"}}
ORDER = ["load", "start scoring", "dev scoring", "sampling", "update", "save", "best/ scoring", "other"]


def full_size_worker(argv: list[str], out: str) -> int:
    """gs.main(argv) with the peak RSS (a 0.1 s sampler, plus any rise of VmHWM) and the seconds of each phase;
    written to out/memory.json."""
    def status() -> dict:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":") for line in open("/proc/self/status"))
                if k in ("VmRSS", "VmHWM")}
    lock, now = threading.Lock(), dict(stage="before", phase=None, hwm=0)
    peak, secs, gpu = dict.fromkeys(ORDER, 0), dict.fromkeys(ORDER, 0.0), dict.fromkeys(ORDER, 0)
    cuda = torch.cuda.is_available()   # on a GPU the memory that matters: the allocator's peak per phase

    def sample(*switch):   # the RSS so far goes to the current phase; then switch phase
        with lock:
            s, name = status(), now["phase"] or "other"
            peak[name] = max(peak[name], s["VmRSS"], s["VmHWM"] if s["VmHWM"] > now["hwm"] else 0)
            now["hwm"] = s["VmHWM"]
            if cuda:
                gpu[name] = max(gpu[name], torch.cuda.max_memory_allocated())
            if switch:
                now["phase"] = switch[0]
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

    def wrap(name):
        fn = getattr(gs, name)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            phase = None if now["phase"] else PHASES.get(name, {}).get(now["stage"])
            now["stage"] = "train" if name == "train" else now["stage"]
            if phase:
                sample(phase)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if phase:
                    secs[phase] += time.perf_counter() - t0
                    sample(None)
                if name == "train":
                    now["stage"] = "after"
        setattr(gs, name, wrapped)
    for name in [*PHASES, "train"]:
        wrap(name)
    done = threading.Event()
    threading.Thread(target=lambda: [sample() for _ in iter(lambda: done.wait(0.1), True)], daemon=True).start()
    t0 = time.perf_counter()
    rc = 1
    try:
        rc = gs.main(argv)
    finally:
        done.set()
        sample()
        secs["other"] = time.perf_counter() - t0 - sum(secs.values())
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "memory.json").write_text(json.dumps(dict(
            argv=argv, grpo_speech=gs.__file__, rc=rc, whole_run_peak_gb=status()["VmHWM"] / 1e9,
            phases={k: dict(peak_rss_gb=peak[k] / 1e9, seconds=secs[k]) | (dict(peak_gpu_gb=gpu[k] / 1e9) if cuda
                                                                            else {}) for k in ORDER}), indent=1))
    return rc


def full_size(args) -> None:
    """--full-size 2b builds runs/full-size-2b/ once (granite-speech-3.3-2b's shape from its config.json, random bf16
    weights, the shipped tokenizer; ~3.0B parameters) and runs grpo_speech.main in a worker process (--lora 64 --bf16,
    B 1, G 4, 16 new tokens, --steps steps, 2 dev and 2 test utterances). It prints the peak RSS (GB; the most
    resident while in the phase, earlier phases' memory included), on a GPU also the peak of
    torch.cuda.max_memory_allocated within each phase, and seconds of each phase: load, start scoring, dev scoring,
    sampling, update, save, best/ scoring, other (the rest); and the whole run's VmHWM; also in
    runs/full-size-2b-run/memory.json.
    --full-size-model DIR runs it on DIR instead (nothing built); --full-size-extra="ARGS" appends arguments (the =
    form: ARGS start with --)."""
    model = Path(args.full_size_model).resolve() if args.full_size_model else HERE / "runs" / "full-size-2b"
    if not args.full_size_model:   # built in its own process: its 6 GB are gone before the run starts
        build = f"import bench_grpo_speech as b; b.build_full_size(b.Path({str(model)!r}))"
        subprocess.run([sys.executable, "-c", build], cwd=HERE, check=True)
    steps, out = str(args.steps or 3), HERE / "runs" / "full-size-2b-run"
    argv = ["--task", "ast", "--mode", "grpo", "--model", str(model), "--data", str(HERE / "data" / "ast"),
            "--lora", "64", "--lora-alpha", "32", "--bf16", "--batch-size", "1", "--group-size", "4",
            "--max-new-tokens", "16", "--max-steps", steps, "--eval-every", steps, "--dev-limit", "2",
            "--eval-limit", "2", "--out", str(out), "--overwrite", *shlex.split(args.full_size_extra)]
    print(f"grpo_speech.py {shlex.join(argv)}", flush=True)
    code = f"import sys, bench_grpo_speech as b; sys.exit(b.full_size_worker({argv!r}, {str(out)!r}))"
    rc = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=dict(os.environ, TQDM_DISABLE="1")).returncode
    m = json.loads((out / "memory.json").read_text())
    print(f"\n{m['grpo_speech']}, exit status {m['rc']}\n")
    phases = m["phases"].values()
    gpu = ["peak GPU GB"] * ("peak_gpu_gb" in m["phases"]["load"])   # torch.cuda.max_memory_allocated per phase
    print(md_table(["phase", "peak RSS GB (1e9 bytes)", "seconds", *gpu],
                   [[k, f"{v['peak_rss_gb']:.2f}", f"{v['seconds']:.1f}", *(f"{v['peak_gpu_gb']:.2f}" for _ in gpu)]
                    for k, v in m["phases"].items()] +
                   [["**whole run (VmHWM)**", f"**{m['whole_run_peak_gb']:.2f}**",
                     f"{sum(v['seconds'] for v in phases):.1f}",
                     *(f"**{max(v['peak_gpu_gb'] for v in phases):.2f}**" for _ in gpu)]]))
    if rc:
        sys.exit(rc)


# --gpu-check: each configuration the README promises, once, on the GPU, at the smallest size that exercises it.
# Under 5 minutes by estimate (README: the GPU check), not bounded in code: every row but the 2B-shaped model's
# runs side by side (small processes; a command-line row past GPU_ROW_LIMIT seconds, the resume row's three runs
# together, is stopped and reported), then the two 2B rows alone, in this process (for their peak memory and
# time) with no limit.
GPU_RUN = ["--task", "ast", "--mode", "grpo", "--model", str(SHIPPED), "--data", str(HERE / "data" / "ast"),
           "--max-steps", "3", "--eval-every", "3", "--dev-limit", "2", "--eval-limit", "2", "--batch-size", "2",
           "--group-size", "4", "--max-new-tokens", "12", "--overwrite"]
GPU_ROW_LIMIT = 180
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
COMPILE_LOGS = dict(TORCH_LOGS="graph_breaks,recompiles")
# two ranks on one GPU: NCCL refuses that, so gloo serves NCCL's part of the group's device map
GLOO_AS_NCCL = ("import runpy, sys, torch.distributed as td\nreal = td.init_process_group\n"
                "td.init_process_group = lambda b, **k: real(b.replace('nccl', 'gloo'), **k)\n"
                "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")


def gpu_run(cmd: list, env=None, limit: float = GPU_ROW_LIMIT) -> tuple[int | str, str]:
    """cmd's exit code (or "timed out") and its stdout + stderr; past limit seconds its whole process group
    (torchrun's workers too) is killed."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env=dict(os.environ, TQDM_DISABLE="1", **(env or {})))
    try:
        log = p.communicate(timeout=max(limit, 1))[0]
        return p.returncode, log
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        return "timed out", p.communicate()[0]


def last_line(log: str) -> str:
    return (log.strip().splitlines() or [""])[-1][:150]


def step_trouble(out: Path, train: bool = True) -> str:
    """What is wrong with a run's logged steps ('' where nothing): a skipped update (loss/skipped), a loss/* not
    finite (the Logger writes null), or, for a training run, no step with a loss at all. Exit 0 alone would pass
    a NaN that the file caught and skipped."""
    file = out / "metrics.jsonl"
    lines = [json.loads(l) for l in file.read_text().splitlines()] if file.is_file() else []
    for m in lines:
        if m.get("loss/skipped"):
            return f"step {m['step']}: loss/skipped {m['loss/skipped']:g}"
        bad = [k for k, v in m.items() if k.startswith("loss/") and (v is None or not math.isfinite(v))]
        if bad:
            return f"step {m['step']}: {bad[0]} {m[bad[0]]}"
    if train and not any(isinstance(m.get("loss/total"), float) for m in lines):
        return f"no step with a loss/total in {file}"
    return ""


def gpu_cli(root: Path, name: str, *extra, launcher=(), env=None) -> dict:
    """grpo_speech.py GPU_RUN + extra into root/name (under launcher, e.g. torchrun); its test BLEU or why not.
    ok: exit 0 and every logged step's losses finite, none skipped (step_trouble)."""
    out = root / name.replace(" ", "_").replace("-", "")
    cmd = [*(launcher or [sys.executable]), str(HERE / "grpo_speech.py"), *GPU_RUN, "--out", str(out), *extra]
    if root.name == "dry-run":
        return dict(run=" ".join(f"{k}={v}" for k, v in (env or {}).items()) + " " * bool(env) + shlex.join(cmd))
    t0 = time.perf_counter()
    rc, log = gpu_run(cmd, env)
    row = dict(seconds=time.perf_counter() - t0, ok=rc == 0)
    (root / f"{out.name}.log").write_text(log)
    if rc:
        return row | dict(note=f"exit {rc}: " + last_line(log))
    if trouble := step_trouble(out, train="eval" not in extra):
        return row | dict(ok=False, note=trouble)
    res = json.loads((out / "results.json").read_text())
    row["note"] = f"test BLEU {res.get('final', res['base'])['bleu']}" + "".join(
        f", {k} {res[k]['bleu']}" for k in ("final_sample", "base_sample", "base_beam") if k in res)
    if env and "TORCH_LOGS" in env:
        row["note"] += (f"; {log.count('Graph break')} graph breaks, {log.count('Recompiling')} "
                        f"recompiles, {log.count('recompile_limit')} hit the limit (log: {out.name}.log)")
    return row


def gpu_resume(root: Path) -> dict:
    """SFT at --lr 1e-3 (no sampling: GPU noise stays noise), straight, then SIGINT after step 1 and --resume;
    ok where every loss/* and perf/grad_norm is within 1e-4 relative of the straight run's and the final
    weights within 2 x lr x steps (AdamW moves a weight at most about lr a step, noise-level gradients either way)"""
    import signal
    cmd = [sys.executable, str(HERE / "grpo_speech.py"), *GPU_RUN, "--mode", "sft", "--lr", "1e-3", "--out"]
    straight, out = root / "sft", root / "resumed"
    if root.name == "dry-run":
        return dict(run=f"{shlex.join(cmd + [str(straight)])}; the same into {out}, SIGINT after step 1, --resume; "
                        + " ".join(gpu_resume.__doc__.split()))
    t0 = time.perf_counter()
    deadline = t0 + GPU_ROW_LIMIT   # the three runs together, as one command-line row
    rc, log = gpu_run(cmd + [str(straight)])
    shutil.rmtree(out, ignore_errors=True)   # an old metrics.jsonl would trigger the signal at once
    p = subprocess.Popen(cmd + [str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    while p.poll() is None and time.perf_counter() < deadline and not (
            metrics.exists() and '"step": 1,' in metrics.read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    try:   # it saves a checkpoint and exits 130; one that does not within 30 s is killed
        stopped = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        stopped = f"killed ({p.wait()})"
    resumed, log = gpu_run(cmd + [str(out), "--resume"], limit=deadline - time.perf_counter())
    if rc or stopped != 130 or resumed:
        return dict(ok=False, seconds=time.perf_counter() - t0, note=f"exit {rc}, {stopped} then {resumed}: "
                    + last_line(log))
    rows = lambda d: {json.loads(l)["step"]: json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()}
    a, b = rows(straight), rows(out)
    rel = max((abs(a[k][m] - b[k][m]) / max(abs(a[k][m]), 1e-12) for k in a if k in b for m in a[k]
               if m.startswith("loss/") or m == "perf/grad_norm"), default=float("inf"))
    from safetensors.torch import load_file
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    wdiff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    steps = int(GPU_RUN[GPU_RUN.index("--max-steps") + 1])
    return dict(ok=sorted(a) == sorted(b) and rel <= 1e-4 and wdiff <= 2 * 1e-3 * steps,
                seconds=time.perf_counter() - t0,
                note=f"steps {sorted(b)}; vs straight: loss and grad norm max relative diff {rel:.2g}, "
                     f"final weights max |diff| {wdiff:.2g}")


# max |log-prob| difference, padded vs alone: fp32 catches a wrong mask (eager's boolean one was 0.07 off); bf16's
# own rounding moves this model's log-probs by 0.05 from fp32, so its rows catch NaN and gross errors only
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.25}


def gpu_padding_probe(root: Path, device="cuda", model_dir: Path = SHIPPED) -> dict:
    """model_dir (either shipped model), a left-padded batch of 2 against each prompt collated alone (unpadded):
    fp32 and bf16, each SDPA backend; ok where every backend that runs gives finite log-probs within 1e-4 (fp32)
    or 0.25 (bf16) of the prompt alone"""
    if root.name == "dry-run":
        return dict(run=f"data/{model_dir.name}: " + " ".join(gpu_padding_probe.__doc__.split()))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, tok = gs.load_model(str(model_dir), torch.device(device))
    data = gs.SpeechData(gs.read_manifest(HERE / "data" / "ast" / "test.jsonl"))
    idx = [0, 3]   # prompts of different lengths: the first is left-padded
    batch = gs.collate(data, idx, tok, model.config.audio_token_id, config=model.config).to(device)
    alone = [gs.collate(data, [i], tok, model.config.audio_token_id, config=model.config).to(device) for i in idx]
    assert not batch.attention_mask.all()
    comp = torch.randint(5, 200, (4, 8), generator=torch.Generator().manual_seed(0)).to(device)
    notes, ok = [], True
    for dtype, tol in PROBE_TOLERANCE.items():
        ran = 0
        for backend in (SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([backend]), torch.autocast(device, dtype, enabled=dtype != torch.float32), \
                        torch.no_grad():
                    padded = gs.completion_logprobs(model, batch, comp, 2)
                    single = torch.cat([gs.completion_logprobs(model, one, comp[2 * k:2 * k + 2], 2)
                                        for k, one in enumerate(alone)])
                    # the unguarded case: a query row with no key, as transformers 5.25 leaves it
                    q = torch.randn(1, 1, 2, 64, device=device, dtype=dtype)
                    raw = torch.nn.functional.scaled_dot_product_attention(
                        q, q, q, attn_mask=torch.tensor([[False, False], [True, True]], device=device))
            except RuntimeError as e:
                notes.append(f"{str(dtype)[6:]}/{backend.name}: unavailable ({str(e).splitlines()[0][:60]})")
                continue
            ran += 1
            diff = (padded - single).abs().max().item()
            within = bool(padded.isfinite().all()) and diff <= tol
            ok &= within
            notes.append(f"{str(dtype)[6:]}/{backend.name}: max |diff| {diff:.1g}{'' if within else ' **over**'}, "
                         f"keyless row {'NaN' if raw[0, 0, 0].isnan().any() else 'finite'}")
        ok &= ran > 0
    return dict(ok=ok, note="; ".join(notes))


def gpu_2b(root: Path, lora: bool, layers=(40, 16), device="cuda", B=8, G=8, T=200, sample_tokens=64) -> dict:
    """A random model of the released 2B's shape on the GPU (as --full-size 2b builds it), one GRPO step (rollout,
    pi_ref, update) at the README's single-GPU setting: B 8, G 8, 200-token completions (EOS suppressed),
    --grad-accum 8 (one group a micro-batch), --bf16, --lora 64 or full training; peak GPU memory and time.
    (A test runs it on the CPU at small sizes.)"""
    if root.name == "dry-run":
        return dict(run=f"{'--lora 64 --bf16' if lora else 'full training, --bf16'}: " + " ".join(
            gpu_2b.__doc__.split()) + (" Then sample_groups against generate(num_return_sequences=8), B 2, 64 "
                                       "tokens, tokens/s." if lora else ""))
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    ids = shipped_token_ids()
    config = granite_speech_config("2B", layers, tok.convert_tokens_to_ids(gs.AUDIO_TOKEN), **ids)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(device):   # as run() loads it: bf16 under --lora --bf16, else fp32 master weights
        torch.set_default_dtype(torch.bfloat16 if lora else torch.float32)
        try:
            model = GraniteSpeechForConditionalGeneration(config).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(torch.float32)
    cfg = gs.resolve_config(gs.Config(mode="grpo", bf16=True, batch_size=B, group_size=G, max_new_tokens=T,
                                      grad_accum=B, lr=1e-6, **(dict(lora=64, lora_alpha=32.0) if lora else {})))
    params, optimizer, _, ref_model = gs.setup_training(cfg, model, gs.Dist())
    autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16)
    data = gs.SpeechData(gs.read_manifest(HERE / "data" / "ast" / "train.jsonl")[:B])
    batch = gs.collate(data, list(range(B)), tok, config.audio_token_id, config=config).to(device)
    # EOS suppressed too: 200 tokens every completion, the worst case
    eos_id = gs.family(config).stop_id(config)
    suppress = torch.cat([gs.suppressed_ids(tok, config),
                          torch.tensor([eos_id])])
    t0 = gs.clock(torch.device(device))
    with autocast():
        encoded = gs.encoder_states(model, batch)
    rollout, metrics = gs.rollout(cfg, model, ref_model, tok, batch, 0, list(range(B)), suppress, autocast, encoded)
    _, grad_norm = gs.policy_update(cfg, model, params, optimizer, batch, rollout, B, gs.TrainState(), autocast,
                                    gs.Dist(), encoded)
    row = dict(ok=math.isfinite(grad_norm) and grad_norm > 0 and metrics["perf/completion_len"] == T,
               seconds=gs.clock(torch.device(device)) - t0,
               **(dict(peak_gb=torch.cuda.max_memory_allocated() / 1e9) if cuda else {}),
               note=f"sampling {metrics['perf/sample_s']:.1f} s, pi_ref {metrics['perf/ref_logp_s']:.1f} s, "
                    f"completion length {metrics['perf/completion_len']:.0f}")
    if lora:   # sampling speed against transformers' generate on the same model and prompts
        b2, n = batch.select(0, 2), sample_tokens
        ours = lambda: gs.sample_groups(model, b2, G, max_new_tokens=n, eos_id=-1, pad_id=tok.pad_token_id)
        hf = lambda: model.generate(input_ids=b2.input_ids, input_features=b2.features,
                                    input_features_mask=b2.features_mask, attention_mask=b2.attention_mask,
                                    do_sample=True, num_return_sequences=G, max_new_tokens=n, min_new_tokens=n,
                                    pad_token_id=tok.pad_token_id, top_k=0)
        with autocast(), torch.no_grad():
            t_ours, t_hf = timed(ours, 1), timed(hf, 1)
        row["note"] += f"; sampling B 2 x G {G} x {n}: {2 * G * n / t_ours:.0f} tokens/s, generate {2 * G * n / t_hf:.0f}"
    del model, ref_model, optimizer, params
    if cuda:
        torch.cuda.empty_cache()
    return row


GPU_CHECKS = [   # (configuration, function of the run root)
    ("shipped model, fp32", lambda r: gpu_cli(r, "fp32")),
    ("--bf16", lambda r: gpu_cli(r, "bf16", "--bf16")),
    ("--lora 8 --bf16", lambda r: gpu_cli(r, "lora", "--lora", "8", "--bf16")),
    ("--grad-checkpointing", lambda r: gpu_cli(r, "ckpt", "--grad-checkpointing")),
    ("--compile", lambda r: gpu_cli(r, "compile", "--compile", env=COMPILE_LOGS)),
    ("--compile --grad-checkpointing",
     lambda r: gpu_cli(r, "compile-ckpt", "--compile", "--grad-checkpointing", env=COMPILE_LOGS)),
    ("eval, greedy + sampled + beam", lambda r: gpu_cli(r, "beam", "--mode", "eval", "--eval-decoding", "beam")),
    # chrF: random weights write no BLEU-scoring 4-gram, so BLEU rewards tie and the update would be KL alone
    ("tiny Qwen2-Audio, --lora 8 --bf16 --reward chrf",
     lambda r: gpu_cli(r, "qwen2-audio", "--model", str(QWEN), "--lora", "8", "--bf16", "--reward", "chrf")),
    ("torchrun --nproc_per_node 1 (NCCL)", lambda r: gpu_cli(r, "torchrun1", launcher=[*TORCHRUN, "1"])),
    ("2 processes, 1 GPU, gloo with NCCL's device map",
     lambda r: gpu_cli(r, "two", launcher=[*TORCHRUN, "2", str(r / "gloo_as_nccl.py")])),
    ("interrupted at step 1, resumed", gpu_resume),
    ("left-padding probe", gpu_padding_probe),
    ("left-padding probe, tiny Qwen2-Audio", lambda r: gpu_padding_probe(r, model_dir=QWEN)),
    ("2B shape, --lora 64 --bf16 step; sampling vs generate", lambda r: gpu_2b(r, lora=True)),
    ("2B shape, full training step (--bf16, --grad-accum 8)", lambda r: gpu_2b(r, lora=False)),
]
GPU_PARALLEL = 13   # the first GPU_PARALLEL run side by side; the 2B rows alone after them, in order


def gpu_check(args) -> None:
    """--gpu-check runs GPU_CHECKS on one GPU, in under 5 minutes on an H100 by estimate (README: the GPU check; no
    GPU has run it yet; the 2B rows have no time limit): the shipped model through the command line (fp32, --bf16,
    --lora 8 --bf16, --grad-checkpointing, --compile with and without it, its graph breaks and recompiles counted from
    TORCH_LOGS, greedy/sampled/beam evaluation, torchrun on NCCL, two processes on the one GPU through gloo given
    NCCL's device map, an SFT run interrupted and resumed), the tiny Qwen2-Audio with --lora 8 --bf16 --reward chrf,
    the left-padding probe on both shipped models, all side by side (a command-line row stopped past GPU_ROW_LIMIT
    seconds), then a random model of the released 2B's shape in this process: a --lora 64 --bf16 step and a
    full-training step at B 8, G 8, 200 tokens, --grad-accum 8, each with peak GPU memory and time, and sampling
    tokens/s against generate. One table, also in runs/gpu-check/table.md, with the device and the torch and
    transformers that ran. --dry-run prints the plan; without CUDA it stops in one line (exit 2)."""
    import transformers
    if not args.dry_run and not torch.cuda.is_available():
        raise gs.InputError(f"--gpu-check needs a CUDA GPU; torch {torch.__version__} sees none (--dry-run prints "
                            "what it would run)")
    root = HERE / "runs" / ("dry-run" if args.dry_run else "gpu-check")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{device}; torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}, "
          f"python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "gloo_as_nccl.py").write_text(GLOO_AS_NCCL)
    if args.dry_run:
        for name, check in GPU_CHECKS:
            print(f"- {name}: {check(root)['run']}")
        return
    t0 = time.perf_counter()
    def row(check):
        try:
            return check[1](root)
        except Exception as e:   # one failed configuration is a row, not the end of the check
            return dict(ok=False, note=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    with ThreadPoolExecutor(GPU_PARALLEL) as pool:
        rows = list(pool.map(row, GPU_CHECKS[:GPU_PARALLEL]))
    rows += [row(check) for check in GPU_CHECKS[GPU_PARALLEL:]]
    table = md_table(["configuration", "ok", "s", "peak GPU GB", "note"],
                     [[name, "yes" if r.get("ok") else "**no**", f"{r.get('seconds', 0):.0f}",
                       f"{r['peak_gb']:.1f}" if "peak_gb" in r else "", r.get("note", "")]
                      for (name, _), r in zip(GPU_CHECKS, rows)])
    when = f"{time.strftime('%Y-%m-%d', time.gmtime())}: {time.perf_counter() - t0:.0f} s"
    publish(root / "table.md", f"{table}\n\n{device}, torch {torch.__version__}, transformers "
                               f"{transformers.__version__}, {when}\n", None)
    sys.exit(0 if all(r.get("ok") for r in rows) else 1)


@contextlib.contextmanager
def busy_core(busy: bool):
    """Inside: one more process busy-looping on a core, where busy."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        yield
    finally:
        if hog:
            hog.kill()
            hog.wait()


def contention(args) -> None:
    """--contention runs the README's default command for 20 steps four times, OMP_* unset: default (auto) threads and
    `--threads torch`, each alone and beside one `while True: pass` process; --contention-extra "ARGS" adds a row.
    It prints each run's mean perf/step_s and wall time, and a table of step seconds and busy / quiet, which a
    complete run puts into README.md between the contention markers."""
    steps = str(args.steps or 20)
    cmd = [sys.executable, str(HERE / "grpo_speech.py"), "--task", "ast", "--mode", "grpo", "--max-steps", steps,
           "--eval-every", steps, "--dev-limit", steps, "--eval-limit", steps, "--overwrite"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["TQDM_DISABLE"] = "1"
    rows = [("auto (default)", []), ("`--threads torch` (torch's default)", ["--threads", "torch"])] + \
        ([(f"`{args.contention_extra}`", shlex.split(args.contention_extra))] if args.contention_extra else [])
    step_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in rows:
            for busy in (False, True):
                run_cmd = cmd + ["--out", tmp] + extra
                print(f"$ {shlex.join(run_cmd)}{'  # beside a busy loop' if busy else ''}", flush=True)
                t0 = time.time()
                with busy_core(busy):
                    p = subprocess.run(run_cmd, capture_output=True, text=True, env=env, cwd=HERE)
                if p.returncode:
                    sys.exit(f"failed:\n{p.stderr[-3000:]}")
                s = [r["perf/step_s"] for r in map(json.loads, open(Path(tmp) / "metrics.jsonl"))
                     if "perf/step_s" in r]
                step_s[label, busy] = statistics.mean(s)
                print(f"  {step_s[label, busy]:.3f} s a step (mean of {len(s)}), {time.time() - t0:.0f} s wall")
    table = md_table(["threads", "quiet step s", "one core busy step s", "busy / quiet"],
                     [[label, f"{step_s[label, False]:.3f}", f"{step_s[label, True]:.3f}",
                       f"{step_s[label, True] / step_s[label, False]:.2f}"] for label, _ in rows])
    command = "python bench_grpo_speech.py --contention" + (f" --steps {steps}" if steps != "20" else "") + \
        (f" --contention-extra {shlex.quote(args.contention_extra)}" if args.contention_extra else "")
    text = (f"`{command}`: the README's default command for {steps} steps (mean `perf/step_s`), {os.cpu_count()} "
            f"CPU cores, alone and beside one busy-looping process.\n\n{table}\n")
    print(f"\n{text}")
    for name, (label, _) in zip(("auto", "torch"), rows):
        print(f"{name} busy / {name} quiet: {step_s[label, True] / step_s[label, False]:.2f}")
    text += "\n" + width_sweep()
    if steps == "20":
        replace_readme_block("contention", text)


# --kill-soak's run: checkpoints at steps 2, 4, 5, and (seed 1, sampled dev decoding) a new best/ at each
KILL_STEPS = 5
KILL_RUN = ["--task", "ast", "--mode", "grpo", "--seed", "1", "--lr", "1e-4", "--eval-decoding", "sample",
            "--max-steps", str(KILL_STEPS), "--eval-every", "2", "--eval-limit", "2", "--dev-limit", "4", "--batch-size", "2",
            "--group-size", "3", "--max-new-tokens", "8"]
# grpo_speech.main in a process that SIGKILLs itself where when(*args) holds, before or after the call
KILL_AT = """import os, signal, sys, pathlib
sys.path.insert(0, {here!r}); import grpo_speech as gs
Path = pathlib.Path
def at(owner, name, when, after):
    real = getattr(owner, name)
    def wrapped(*a, **k):
        if not after and when(*a, **k): os.kill(os.getpid(), signal.SIGKILL)
        result = real(*a, **k)
        if after and when(*a, **k): os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapped)
at({at})
sys.exit(gs.main(sys.argv[1:]))"""
# (what, at()'s arguments) per kill; a tuple of several: the resumed runs are killed too, in turn
KILL_POINTS = [
    ("config.tmp written, not yet config.json", "Path, 'replace', lambda p, d: p.name == 'config.tmp', False"),
    ("best/ of step 0, before its rename", "Path, 'rename', lambda p, d: p.name == 'best.tmp', False"),
    ("step 2's line appended, checkpoint/ not yet", "gs.Logger, '__call__', lambda s, step, m: step == 2, True"),
    ("checkpoint/ of step 2 whole in .tmp, not published",
     "gs, 'recover', lambda p: (p.parent / 'checkpoint.tmp' / 'complete.json').exists(), False"),
    ("checkpoint/ of step 2 published, step 3 not begun",
     "gs, 'save_model', lambda m, t, p, extra=None: p.name == 'checkpoint' and extra['step'] == 2, True"),
    (("checkpoint/ of step 4 between its two renames",
      "Path, 'rename', lambda p, d: p.name == 'checkpoint.tmp' and (p.parent / 'checkpoint.old').exists(), False"),
     ("--resume: inside the trim of metrics.jsonl", "Path, 'replace', lambda p, d: p.name == 'metrics.tmp', False")),
    ("best/ of step 4 between its two renames",
     "Path, 'rename', lambda p, d: p.name == 'best.tmp' and (p.parent / 'best.old').exists() and "
     "(p.parent / 'checkpoint').exists(), False"),
    ("final/ whole in .tmp, not published", "Path, 'rename', lambda p, d: p.name == 'final.tmp', False"),
    ("results.json of best/'s scoring, as .tmp",
     "Path, 'replace', lambda p, d: p.name == 'results.tmp' and (p.parent / 'final').exists(), False"),
]


def run_state(out: Path) -> str:
    """What a killed run left: its whole metrics lines, checkpoint step, final/, and leftovers."""
    if not out.exists():
        return "no run directory"
    log = out / "metrics.jsonl"
    steps = [json.loads(l)["step"] for l in log.read_text().split("\n")[:-1]] if log.exists() else []
    ckpt = next((c for c in (out / "checkpoint", out / "checkpoint.old") if (c / "complete.json").exists()), None)
    return ", ".join([f"log {steps[0]}-{steps[-1]}" if steps else "no log",
                      f"{ckpt.name} step {torch.load(ckpt / 'trainer_state.pt', weights_only=True)['step']}"
                      if ckpt else "no checkpoint"] +
                     [p.name for p in sorted(out.iterdir()) if p.name in ("final", "results.json")
                      or p.suffix in (".tmp", ".old")])


def soak_differences(out: Path, straight: Path) -> list[str]:
    """How a finished run differs from the uninterrupted one (timings aside)."""
    from safetensors.torch import load_file
    names = lambda d: sorted(p.name for p in d.iterdir() if p.name != ".lock")
    if names(out) != names(straight):
        return [f"files {names(out)}"]
    log = lambda d: [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/") or k == "perf/grad_norm"}
                     for line in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log(out)]
    diffs = [] if steps == list(range(KILL_STEPS + 1)) else [f"metrics.jsonl steps {steps}"]
    diffs += [] if diffs or log(out) == log(straight) else ["metrics.jsonl values"]
    for d in ("best", "final"):
        a, b = load_file(out / d / "model.safetensors"), load_file(straight / d / "model.safetensors")
        diffs += [] if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else [f"{d}/ weights"]
    if json.loads((out / "results.json").read_text()) != json.loads((straight / "results.json").read_text()):
        diffs.append("results.json")
    return diffs + [f.name for f in straight.glob("hyps_*.jsonl") if f.read_bytes() != (out / f.name).read_bytes()]


def kill_soak(args) -> None:
    """--kill-soak N runs a short GRPO run (KILL_RUN: 5 steps, checkpoints at 2, 4 and 5) uninterrupted, then N times
    kills it with SIGKILL: half of N at the fixed instants of KILL_POINTS (inside saves and renames, between a
    step's line and its checkpoint, inside --resume's trim of metrics.jsonl), the rest at seeded random times over
    the uninterrupted run's life (loading, scoring, sampling, the update, saving). Each killed run is resumed as a
    user would: the same command with --resume where there is a checkpoint to resume from, else (as --resume's
    refusal says) the command again with --overwrite. Each finished run must equal the uninterrupted one: the
    same files, metrics.jsonl's steps each once with the same values (perf/ timings aside), best/ and final/
    weights bit for bit, results.json and the hypotheses files. One line per kill (what it left on disk), then
    "K of N kills resumed exactly"."""
    n, t_all = args.kill_soak, time.time()
    root = Path(args.out) if args.out else HERE / "runs" / "kill-soak"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    plain = [sys.executable, str(HERE / "grpo_speech.py"), *KILL_RUN]
    run = lambda cmd: subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    t0 = time.time()
    if (p := run([*plain, "--out", str(root / "straight")])).returncode:
        sys.exit(f"the uninterrupted run failed:\n{p.stderr[-3000:]}")
    lives = [time.time() - t0]   # a run's life, and again each time a killed one is run whole (--overwrite)
    print(f"uninterrupted run, {lives[0]:.1f} s: grpo_speech.py {shlex.join(KILL_RUN)}", flush=True)
    trials, kills = [], 0     # per trial, its killed launches: (what, at()'s arguments or None, share of life)
    for point in KILL_POINTS[:n // 2]:
        point = point if isinstance(point[0], tuple) else (point,)
        if kills + len(point) <= n // 2:
            trials.append([(what, at, None) for what, at in point])
            kills += len(point)
    rng = random.Random(args.seed)
    trials += [[(None, None, rng.uniform(0.02, 0.95))] for _ in range(n - kills)]
    exact, i = 0, 0
    for t, trial in enumerate(trials):
        out, killed = root / f"kill-{t}", True
        for j, (what, at, share) in enumerate(trial):
            cmd = [*plain, "--out", str(out)] + (["--resume"] if j else [])
            if at:
                cmd = [sys.executable, "-c", KILL_AT.format(here=str(HERE), at=at), *cmd[2:]]
            life = statistics.median(lives)    # measured here and now: others' jobs beside us slow it
            delay = share * life if share else None
            p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            killed &= p.returncode == -9
            i += 1
            print(f"kill {i:2d}/{n}: {what or f'at {delay:.2f} s of a {life:.1f} s life':<52} "
                  f"{'' if p.returncode == -9 else f'NOT KILLED (exit {p.returncode}) '}left {run_state(out)}",
                  flush=True)
        # what a user does: the same command with --resume where there is a checkpoint to resume from (or the
        # .old a kill between two renames leaves, which --resume takes); else, as --resume's refusal says, the
        # command again with --overwrite (a refused --resume costs a start-up: it loads the model first)
        then = "--resume" if any((out / c).exists() for c in ("checkpoint", "checkpoint.old")) else "--overwrite"
        t0 = time.time()
        p = run([*plain, "--out", str(out), then])
        lives += [time.time() - t0] if then == "--overwrite" and p.returncode == 0 else []
        diffs = soak_differences(out, root / "straight") if p.returncode == 0 else [
            f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"]
        exact += len(trial) if killed and not diffs else 0
        print(f"    {then}: {'resumed exactly' if not diffs else 'DIFFERS: ' + ', '.join(diffs)}", flush=True)
        if not diffs:
            shutil.rmtree(out)
    print(f"{exact} of {n} kills resumed exactly ({time.time() - t_all:.0f} s; a run that differs is kept in "
          f"{root})")


def width_sweep() -> str:
    """Why --threads auto looks at the LM's width: forward + backward of a random Granite LM (8 sequences of
    300 tokens) at 1 and 2 threads, alone and beside a busy-looping process; median of 3 after a warm-up."""
    from transformers import GraniteConfig, GraniteModel
    rows = []
    for hidden, layers in ((192, 3), (512, 2), (1024, 2), (2048, 1)):
        torch.manual_seed(0)
        heads = max(3, hidden // 64)
        lm = GraniteModel(GraniteConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=heads, vocab_size=1000,
                                        num_key_value_heads=heads // 4 if heads % 4 == 0 else heads))
        x = torch.randn(8, 300, hidden, requires_grad=True)
        step = lambda: lm(inputs_embeds=x, use_cache=False).last_hidden_state.square().mean().backward()
        t = {}
        for busy in (False, True):
            with busy_core(busy):
                for n in (1, 2):
                    torch.set_num_threads(n)
                    t[n, busy] = timed(step, 3)
        rows.append([f"{hidden} ({layers} layers)", *(f"{t[k]:.2f}" for k in ((1, False), (2, False), (1, True), (2, True)))])
    table = md_table(["LM width", "1 thread", "2 threads", "1 thread, a core busy", "2 threads, a core busy"], rows)
    print(table)
    return table + "\n"


def speed(args) -> None:
    """--speed: the hot loop against transformers' own (generate, a forward per completion) in one process, on
    --model's first --batch-size utterances of --data. Each ratio is (baseline time) / (our time), median of
    --repeats runs after a warm-up:
      * group sampling (B prompts x G samples, every row forced to the same length) against
        transformers' generate(num_return_sequences=G, do_sample=True), printed last;
      * the GRPO policy forward + backward with the audio encoder run once per group against
        running it for every completion;
      * bf16 autocast and torch.compile against eager fp32 for that forward + backward;
      * achieved FLOP/s of the update against this machine's dense matmul peak, and peak memory;
      * a step-time breakdown: sampling, reward, reference log-probs, policy update."""
    torch.manual_seed(0)
    device = gs.pick_device(args.device)
    model, tok = gs.load_model(args.model, device)
    if not isinstance(gs.family(model.config), gs.GraniteSpeech):   # generate's audio keywords are Granite's
        raise gs.InputError(f"--speed times Granite Speech only; {args.model} is {gs.family(model.config).name}")
    model.eval().requires_grad_(True)        # the update timings train every weight
    B, G, T = args.batch_size, args.group_size, args.new_tokens
    data = gs.SpeechData(gs.read_manifest(args.data)[:B])
    batch = gs.collate(data, list(range(B)), tok, model.config.audio_token_id,
                       system=gs.system_turn(tok, "auto", model.config), config=model.config).to(device)
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
                           pad_token_id=tok.pad_token_id, eos_token_id=gs.family(model.config).stop_id(model.config),
                           top_k=0)
    t_ours, t_hf = timed(ours, args.repeats), timed(hf, args.repeats)
    s = ours()

    # 2. policy forward + backward: encoder once per group vs once per completion
    completions = s.tokens
    mask = torch.ones_like(completions, dtype=torch.bool)
    adv = torch.randn(B * G, device=device)
    def update(m, b, g, train_encoder=True, logprobs=gs.completion_logprobs, encoded=None):
        logp = logprobs(m, b, completions, g, train_encoder=train_encoder, encoded=encoded)
        loss, _ = gs.grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
        loss.backward()
        m.zero_grad(set_to_none=True)
    expanded = gs.Batch(batch.features.repeat_interleave(G, 0),
                        batch.frames.repeat_interleave(G, 0),
                        batch.features_mask.repeat_interleave(G, 0),
                        batch.input_ids.repeat_interleave(G, 0),
                        batch.attention_mask.repeat_interleave(G, 0),
                        [], [])
    each = functools.partial(update, logprobs=per_completion_logprobs)
    t_once = timed(lambda: each(model, batch, G), args.repeats)
    t_per = timed(lambda: each(model, expanded, 1), args.repeats)

    # 2b. the teacher-forced pass: the LM reads each prompt once per group vs once per completion,
    # the frozen encoder's states given, as train() gives them
    held = gs.encoder_states(model, batch)
    t_shared, t_each = (timed(lambda: f(model, batch, G, False, encoded=held), args.repeats)
                        for f in (update, each))
    with torch.no_grad():
        ng_shared, ng_each = (timed(lambda: f(model, batch, completions, G, encoded=held), args.repeats)
                              for f in (gs.completion_logprobs, per_completion_logprobs))
    kept = {name: saved_bytes(lambda: f(model, batch, G, False, encoded=held), model)
            for name, f in (("shared", update), ("each", each))}

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
    print(f"encoder once per group vs per completion (fwd+bwd, encoder trained, each prompt's LM "
          f"pass per completion in both): {t_per / t_once:.2f}x")
    print(f"teacher-forced pass, prompt once per group vs once per completion: fwd+bwd "
          f"{t_each * 1e3:.0f} / {t_shared * 1e3:.0f} ms = {t_each / t_shared:.2f}x; no-grad "
          f"{ng_each * 1e3:.0f} / {ng_shared * 1e3:.0f} ms = {ng_each / ng_shared:.2f}x; tensors "
          f"kept for the backward {kept['each'] / 2**20:.1f} / {kept['shared'] / 2**20:.1f} MiB")
    print(prompt_sharing_table(G))
    print(f"bf16 autocast vs fp32 (fwd+bwd): {t_fp32 / t_bf16:.2f}x")
    print(f"torch.compile vs eager (fwd+bwd): {t_fp32 / t_compile:.2f}x")
    print(f"group sampling vs generate(num_return_sequences={G}): {t_hf * 1e3:.0f} ms / "
          f"{t_ours * 1e3:.0f} ms")

    print(f"{t_hf / t_ours:.2f}x")
    ms = lambda base, ours: f"**{base / ours:.2f}x** ({base * 1e3:.0f} / {ours * 1e3:.0f} ms)"
    rows = [["teacher-forced pass, prompt once per group vs once per completion, forward + backward",
             ms(t_each, t_shared)],
            ["the same, no grad (pi_ref, pi_old)", ms(ng_each, ng_shared)],
            ["tensors kept for the backward, per completion / shared",
             f"{kept['each'] / 2**20:.1f} / {kept['shared'] / 2**20:.1f} MiB"],
            [f"group sampling, {B} prompts x {G} samples x {T} tokens, vs `generate("
             f"num_return_sequences={G}, do_sample=True)`", ms(t_hf, t_ours)],
            ["policy forward + backward, encoder once per group vs once per completion (encoder "
             "trained)", f"{t_per / t_once:.2f}x"],
            ["bf16 autocast vs fp32, forward + backward", f"{t_fp32 / t_bf16:.2f}x"],
            ["`torch.compile` of the LM vs eager, forward + backward", f"{t_fp32 / t_compile:.2f}x"],
            [f"achieved FLOP/s of the update ({flops / 1e9:.2f} GFLOP) vs the fp32 matmul peak",
             f"{flops / t_fp32 / 1e9:.0f} of {peak / 1e9:.0f} GFLOP/s"],
            ["one step, by part: sampling / reward / reference log-probs / policy update",
             f"{t_ours:.3f} / {t_reward:.3f} / {t_ref:.3f} / {t_fp32:.3f} s"]]
    text = (f"`python bench_grpo_speech.py --speed` on {device}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}: each ratio is baseline time / ours, median of {args.repeats} "
            f"after a warm-up, same process, same inputs.\n\n"
            + md_table(["", "measured"], rows) + "\n\nAt the paper's scale (computed, not measured):\n\n"
            + prompt_sharing_table(G) + "\n")
    (HERE / "runs").mkdir(exist_ok=True)
    publish(HERE / "runs" / "speed.md", text, "speed" if args.model == str(SHIPPED) else None)


# The README's tables, one option each (the first given runs): (flag, function, argparse keywords)
TABLES = [
    ("--compare", compare, dict(help="start model, SFT, GRPO, MP-GRPO, SFT -> GRPO, SFT -> SFT on ast and sqa")),
    ("--ablation", ablation, dict(help="GRPO on sqa with the rewards bleu, rouge-1, rouge-2, rouge-l, chrf")),
    ("--voices", voices, dict(help="the comparison's test BLEU by voice set (A, B, C), from its hypotheses")),
    ("--memory", memory, dict(help="bytes per parameter measured on --model, scaled to the released 2B and 8B")),
    ("--full-size", full_size, dict(action="store", choices=["2b"],
                                    help="3 GRPO steps of a random model of the released 2B's shape")),
    ("--gpu-check", gpu_check, dict(help="every configuration the README promises, on one GPU; one table")),
    ("--contention", contention, dict(help="the default command alone and beside a busy core")),
    ("--kill-soak", kill_soak, dict(action="store", type=int, nargs="?", const=20, default=0, metavar="N",
                                    help="SIGKILL a short run at N instants, resume each, compare with the "
                                         "uninterrupted run")),
    ("--speed", speed, dict(help="the hot loop against transformers' generate and a pass per completion")),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, _, keywords in TABLES:
        p.add_argument(flag, **{"action": "store_true", **keywords})
    p.add_argument("--quick", action="store_true", help="with --compare / --ablation: one seed, 100 steps")
    p.add_argument("--no-continued", action="store_true",
                   help="with --compare: SFT, GRPO and MP-GRPO only (no SFT -> X runs)")
    p.add_argument("--continued-seeds", type=int, default=0, metavar="K",
                   help="with --compare / --voices: SFT -> GRPO and SFT -> SFT on the first K seeds only (0: all)")
    p.add_argument("--steps", type=int, default=0,
                   help="steps per run: --compare, --ablation 300 (--quick 100), --full-size 3, --contention 20")
    p.add_argument("--jobs", type=int, default=2,
                   help="with --compare / --ablation: runs side by side (one thread each on 2 cores)")
    p.add_argument("--out", default="", help="with --compare / --ablation / --voices / --kill-soak: run root "
                                             "(then README untouched)")
    p.add_argument("--full-size-model", default="", help="with --full-size: this model instead (nothing built)")
    p.add_argument("--full-size-extra", default="", help="with --full-size: more grpo_speech.py arguments")
    p.add_argument("--dry-run", action="store_true", help="with --gpu-check: print what it would run, run nothing")
    p.add_argument("--contention-extra", default="", help="with --contention: a row with these arguments")
    p.add_argument("--seed", type=int, default=0, help="with --kill-soak: the seed of the random kill times")
    p.add_argument("--model", default=str(SHIPPED), help="with --speed / --memory")
    p.add_argument("--data", default=str(HERE / "data" / "ast" / "train.jsonl"), help="with --speed / --memory")
    p.add_argument("--batch-size", type=int, default=4, help="with --speed: B prompts")
    p.add_argument("--group-size", type=int, default=8, help="with --speed: G samples per prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="with --speed: tokens per sample (EOS disabled)")
    p.add_argument("--repeats", type=int, default=5, help="with --speed: timed runs, after a warm-up")
    p.add_argument("--device", default="auto", help="with --speed")
    args = p.parse_args(argv)
    table = next((fn for flag, fn, _ in TABLES if getattr(args, flag[2:].replace("-", "_"))), None)
    if table is None:
        p.error(f"nothing to do: pass one of {', '.join(flag for flag, _, _ in TABLES)}")
    try:
        table(args)
    except gs.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
