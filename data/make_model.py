#!/usr/bin/env python3
"""Pre-train the tiny Granite Speech shipped in data/tiny-granite-speech.

A ~3M-parameter Granite Speech, the same transformers classes as the 2B/8B models, trained in
four stages on the `pretrain` split (asr + ast, no sqa) that data/make_data.py writes. Trained
jointly from scratch the LM ignores the audio: the encoder's single-frame character spikes
reach it as an unordered bag through each 15-frame Q-Former window. So:
  1. encoder: character CTC on its own mid-layer head (encoder.out);
  2. encoder: word CTC through a temporary head on its last layer (thrown away after);
  3. LM: "stretched text", the transcript's words repeated 2-5 times with fillers placed in
     the audio slot, so the LM learns to read its prefix for both tasks;
  4. encoder frozen: projector + LM on asr + ast, with an auxiliary word CTC on the projector
     outputs against the tied embeddings.

The audio features, prompts, data sets, losses, evaluation and saving are grpo_speech.py's own,
imported from it, so the model hears and reads exactly what GRPO later feeds it.

  OMP_NUM_THREADS=1 python data/make_model.py --overwrite     # rebuild the shipped model
  OMP_NUM_THREADS=1 python data/make_model.py --out /tmp/m --steps 5,5,5,5 --dev-limit 4  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import grpo_speech as gs  # noqa: E402  (sets HF_HUB_OFFLINE before transformers loads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

# ------------------------------------------------------------------------- tokenizer ----

CHARS = " abcdefghijklmnopqrstuvwxyz'"
SPECIAL_TOKENS = ["<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>",
                  gs.AUDIO_TOKEN, "<|unk|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>"
                 "{{ m['content'] }}<|end_of_text|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>"
                 "{% endif %}")


def train_tokenizer(texts: list[str], vocab_size: int = 640):
    """A small BPE tokenizer (Metaspace, like SentencePiece) whose merges cover whole words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                   eos_token="<|end_of_text|>", bos_token="<|end_of_text|>",
                                   unk_token="<|unk|>",
                                   additional_special_tokens=SPECIAL_TOKENS[2:5])
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------- model ----


def tiny_config(tokenizer):
    """Granite Speech in miniature; the real 2B: encoder 10 x 1024, Q-Former 2 x 1024,
    LM 40 x 2048."""
    from transformers import GraniteSpeechConfig
    vocab = 8 * math.ceil(len(tokenizer) / 8)
    head_dim = 192 // 4
    text = dict(model_type="granite", vocab_size=vocab, hidden_size=192, intermediate_size=512,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=1024,
                # Granite's default attention_multiplier 1.0 is not 1/sqrt(d)
                attention_multiplier=1 / math.sqrt(head_dim),
                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    encoder = dict(input_dim=160, num_layers=4, hidden_dim=128, feedforward_mult=2, num_heads=4,
                   output_dim=32, context_size=200, max_pos_emb=512, dropout=0.1,
                   conv_kernel_size=15)
    projector = dict(model_type="blip_2_qformer", hidden_size=128, num_hidden_layers=1,
                     num_attention_heads=4, intermediate_size=256, encoder_hidden_size=128,
                     cross_attention_frequency=1, max_position_embeddings=64, vocab_size=2)
    return GraniteSpeechConfig(text_config=text, encoder_config=encoder, projector_config=projector,
                               audio_token_index=tokenizer.convert_tokens_to_ids(gs.AUDIO_TOKEN),
                               has_lora_adapter=False, window_size=15, downsample_rate=5)


# -------------------------------------------------------------------------- training ----


def bucketed(data: gs.SpeechData, size: int, seed: int):
    """Endless batches of similar-length utterances (the encoder sees padding as silence)."""
    order = sorted(range(len(data)), key=lambda i: data.wave(i).numel())
    chunks = [order[k:k + size] for k in range(0, len(order), size)]
    for epoch in range(10**9):
        random.Random(seed * 7919 + epoch).shuffle(chunks)
        yield from chunks


def fit(params, steps: int, lr: float, loss_fn, batches, desc: str) -> list[float]:
    """A plain AdamW loop with warm-up and cosine decay; returns the loss curve (per 10% of
    steps)."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = gs.lr_lambda(gs.Config(warmup_ratio=0.05), steps)  # grpo_speech's, 5% warm-up
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curve, recent = [], []
    bar = tqdm(range(steps), desc=desc, mininterval=5)
    for step in bar:
        loss = loss_fn(next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        recent.append(loss.item())
        bar.set_postfix(loss=f"{sum(recent[-20:]) / len(recent[-20:]):.3f}")
        if (step + 1) % max(1, steps // 10) == 0:
            curve.append(round(sum(recent[-20:]) / len(recent[-20:]), 3))
    return curve


def ctc(logits: torch.Tensor, frames: torch.Tensor, targets: list[list[int]],
        blank: int) -> torch.Tensor:
    """CTC loss of (B, F, C) logits with per-item valid frame counts."""
    lp = torch.log_softmax(logits.float(), -1).transpose(0, 1)            # (F, B, C)
    flat = torch.tensor([t for ts in targets for t in ts], dtype=torch.long)
    return F.ctc_loss(lp, flat, frames, torch.tensor([len(t) for t in targets]), blank=blank,
                      zero_infinity=True)


def pretrain(data: str | Path, out: str | Path, steps: list[int], *, seed: int = 0, device="cpu",
             dev_limit: int = 100) -> dict:
    """Build, train and save the tiny Granite Speech (the four stages of the module docstring);
    returns the log that goes to <out>/pretrain_log.json."""
    from transformers import GraniteSpeechForConditionalGeneration
    device = torch.device(device)
    torch.manual_seed(seed)
    root, out = Path(data), Path(out)
    rows = {t: gs.read_manifest(root / t / "pretrain.jsonl") for t in ("asr", "ast")}
    texts = [r[k] for t in gs.TASKS for split in ("pretrain", "train")
             if (root / t / f"{split}.jsonl").exists()
             for r in gs.read_manifest(root / t / f"{split}.jsonl") for k in ("text", "target")]
    # dev is scored only at the end; read it now so that a bad manifest fails before training
    devs = {t: gs.read_manifest(root / t / "dev.jsonl") for t in ("asr", "ast")
            if (root / t / "dev.jsonl").exists()}
    tokenizer = train_tokenizer(texts)
    model = GraniteSpeechForConditionalGeneration(tiny_config(tokenizer)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Granite Speech: {n_params / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)}")
    asr = gs.SpeechData(rows["asr"])
    both = gs.SpeechData(rows["asr"] + rows["ast"])  # ast rows share asr's files
    pad, audio_id = tokenizer.pad_token_id, model.config.audio_token_id
    words = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    encoder = model.model.encoder
    mid = {}
    encoder.out.register_forward_hook(lambda mod, inp, outp: mid.__setitem__("logits", outp))
    log, t_start = {}, time.time()

    def encode(idx):
        feats, _ = gs.log_mel_batch([asr.wave(i) for i in idx])
        frames = torch.tensor([(asr.wave(i).numel() // 160 + 1) // 2 for i in idx])
        return encoder(feats.to(device)).last_hidden_state, frames

    def char_ids(i):
        return [CHARS.index(c) + 1 for c in asr.rows[i]["target"] if c in CHARS]

    # stage 1: character CTC on the mid-layer head
    def char_loss(idx):
        _, frames = encode(idx)
        return ctc(mid["logits"], frames, [char_ids(i) for i in idx], 0)
    encoder.train()
    t0 = time.time()
    log["1_char_ctc"] = {"curve": fit(encoder.parameters(), steps[0], 2e-3, char_loss,
                                      bucketed(asr, 32, seed), "1 char CTC")}
    log["1_char_ctc"]["minutes"] = round((time.time() - t0) / 60, 1)

    # stage 2: word CTC through a temporary head on the last layer, char CTC kept as an aid
    vocab = model.config.text_config.vocab_size
    head = torch.nn.Linear(encoder.config.hidden_dim, vocab).to(device)
    def word_loss(idx):
        hidden, frames = encode(idx)
        chars = [char_ids(i) for i in idx]
        return (ctc(head(hidden), frames, [words(asr.rows[i]["target"]) for i in idx], pad)
                + 0.3 * ctc(mid["logits"], frames, chars, 0))
    t0 = time.time()
    log["2_word_ctc"] = {"curve": fit([*encoder.parameters(), *head.parameters()], steps[1], 2e-3,
                                      word_loss, bucketed(asr, 32, seed + 1), "2 word CTC")}
    log["2_word_ctc"]["minutes"] = round((time.time() - t0) / 60, 1)
    encoder.eval().requires_grad_(False)

    # stage 3: the LM reads stretched text in the audio slot, for both tasks
    lm_rows = rows["asr"] + rows["ast"]
    english = {r["audio"]: r["target"] for r in rows["asr"]}
    def stretched(text, rng):
        seq = []
        for w in words(text):
            seq += [pad] * rng.randint(0, 2) + [w] * rng.randint(2, 5)
        return seq + [pad] * rng.randint(0, 2)
    def lm_batches(batch_seed):
        rng = random.Random(batch_seed)
        while True:
            yield [lm_rows[rng.randrange(len(lm_rows))] for _ in range(32)], rng
    def lm_loss(item):
        batch_rows, rng = item
        seqs, starts = [], []
        for r in batch_rows:
            slot = stretched(english[r["audio"]], rng)
            prompt = gs.encode_prompt(tokenizer, r["text"], len(slot), audio_id)
            k = prompt.index(audio_id)
            prompt[k:k + len(slot)] = slot
            starts.append(len(prompt))
            seqs.append(prompt + gs.encode_target(tokenizer, r["target"], tokenizer.eos_token_id))
        L = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (L - len(s)) for s in seqs], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        labels = torch.tensor([[-100] * (st - 1) + s[st:] + [-100] * (L - len(s))
                               for s, st in zip(seqs, starts)], device=device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)
    model.train()
    model.model.encoder.eval()
    t0 = time.time()
    log["3_lm_stretched"] = {"curve": fit(model.model.language_model.parameters(), steps[2], 2e-3,
                                          lm_loss, lm_batches(seed + 2), "3 LM stretched")}
    log["3_lm_stretched"]["minutes"] = round((time.time() - t0) / 60, 1)

    # stage 4: projector + LM on asr + ast, with word CTC on the projector outputs
    embed = model.get_input_embeddings()
    with torch.no_grad():  # audio embeddings start ~10x the norm of text ones: scale them down
        b = gs.collate(both, list(range(8)), tokenizer, audio_id, config=model.config).to(device)
        audio = gs.audio_embeddings(model, b)
        scale = embed.weight.norm(dim=-1).mean() / audio.norm(dim=-1).mean()
        model.model.projector.linear.weight *= scale
    def joint_loss(idx):
        batch = gs.collate(both, idx, tokenizer, audio_id, config=model.config).to(device)
        refs = [gs.encode_target(tokenizer, t, tokenizer.eos_token_id) for t in batch.targets]
        lengths = torch.tensor([len(r) for r in refs], device=device)
        width = int(lengths.max())
        completions = torch.tensor([r + [pad] * (width - len(r)) for r in refs], device=device)
        logp = gs.completion_logprobs(model, batch, completions, 1)
        mask = torch.arange(completions.shape[1], device=device)[None] < lengths[:, None]
        audio = gs.audio_embeddings(model, batch)                                      # (B, A, D)
        ctc_logits = audio @ embed.weight.T
        n_audio = batch.features_mask.sum(1).cpu()
        transcripts = [words(english[r["audio"]]) for r in batch.rows]
        return gs.sft_loss(logp, mask) + 0.5 * ctc(ctc_logits, n_audio, transcripts, pad)
    t0 = time.time()
    trainable = [*model.model.projector.parameters(), *model.model.language_model.parameters()]
    log["4_joint"] = {"curve": fit(trainable, steps[3], 1e-3, joint_loss,
                                   bucketed(both, 24, seed + 3), "4 joint")}
    log["4_joint"]["minutes"] = round((time.time() - t0) / 60, 1)
    log["total_minutes"] = round((time.time() - t_start) / 60, 1)

    model.eval()
    for task, dev in devs.items():
        cfg = gs.Config(task=task, seed=seed)  # its greedy decoding and lengths, as after GRPO
        scores, _ = gs.evaluate(model, tokenizer, gs.SpeechData(dev), cfg, dev_limit, contextlib.nullcontext,
                                desc=f"dev {task}")
        log[f"dev_{task}"] = scores
        print(f"dev {task}: {scores}")
    gs.save_model(model, tokenizer, out)
    record = {"command": " ".join(sys.argv), **log}
    (out / "pretrain_log.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(log))
    return log


# ------------------------------------------------------------------------------ main ----


def stage_steps(text: str) -> list[int]:
    """--steps: four non-negative step counts, one per stage."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        steps = []
    if len(steps) != 4 or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: want four non-negative integers, "
                                         "e.g. 300,600,400,2000")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = gs.OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=gs.HelpFormatter)
    p.add_argument("--data", default=str(REPO / "data"), help="data directory holding "
                   "{asr,ast}/pretrain.jsonl (tokenizer text also from */train.jsonl; dev scored)")
    p.add_argument("--out", default=str(REPO / "data" / "tiny-granite-speech"),
                   help="where the model goes; the default is the shipped model, so an existing "
                        "--out is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (it is replaced only once training is done)")
    p.add_argument("--steps", type=stage_steps, default="300,600,400,2000",
                   help="steps of the 4 stages: char CTC, word CTC, LM on stretched text, joint")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and of the batch order")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--dev-limit", type=int, default=100,
                   help="dev utterances scored per task at the end (0: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        # checked before minutes of training; the old model stays until the new one is saved
        if out.exists() and not out.is_dir():
            raise gs.InputError(f"{out}: --out is a file, not a directory")
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise gs.InputError(f"{out}: holds a model; pass --overwrite to replace it")
        pretrain(args.data, out, args.steps, seed=args.seed, device=gs.pick_device(args.device),
                 dev_limit=args.dev_limit)
    except gs.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
