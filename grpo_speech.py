"""grpo_speech.py: GRPO for speech-aware language models, in one readable file.

A speech-aware LM takes audio plus a text instruction and writes text. This file fine-tunes one,
Granite Speech (transformers' `GraniteSpeechForConditionalGeneration`), with Group Relative Policy
Optimisation and a BLEU reward, after Elmakies et al., "Advancing Speech Understanding in
Speech-Aware Language Models with GRPO" (arXiv 2509.16990), beside the SFT baseline, MP-GRPO (the
reference answer as an off-policy group member) and evaluation. Part I is the lesson, in the order
data flows; Part II is the machinery: a second family (Qwen2-Audio), LoRA, released checkpoints,
data layouts and input checks, processes (torchrun), checkpoints and faults, beam search, the CLI.

Where this file departs from the paper (each is a flag or a stated default):
  * The default model is a ~3M-parameter Granite Speech trained by data/make_model.py on
    espeak-ng speech; `--model ibm-granite/granite-speech-3.3-2b` runs the real one.
  * Rollouts, log-probs and SFT run in eval mode (no dropout, BatchNorm frozen), so that the
    ratio s_{i,t} is exactly 1 on-policy.
  * Each utterance is encoded alone (the conformer has no padding mask), so on CPU no answer
    depends on batch size, process count or resumption.
  * MP-GRPO keeps the KL term on the reference answer's tokens, and cuts the reference to the
    completion budget like a sample.
  * best/ is chosen by greedy dev BLEU (step 0 included); test is scored greedy and with the
    paper's sampling (T 0.9, top-p 0.9); BLEU, chrF, ROUGE and WER, not METEOR or BERTScore.
  * The audio encoder is frozen unless --train-encoder; --lora R trains a LoRA on the LM instead.
  * Defaults fit a 2-core CPU: 4 prompts x G=8, completions of 48 tokens (the paper: 200).
  * Not stated in the paper, chosen here: epsilon 0.2, the k3 KL estimator, mu = 1.

First commands:
  python grpo_speech.py --task ast --mode eval          # score the shipped start model
  python grpo_speech.py --task ast --mode grpo          # GRPO with a BLEU reward, then test
  python grpo_speech.py --task ast --mode sft           # the SFT baseline
  python grpo_speech.py --help                          # every option, with its default
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import errno
import fcntl
import functools
import io
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# No network at run time unless the user opts in (HF_HUB_OFFLINE=0) to fetch a hub id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import sacrebleu
import soundfile as sf
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import DynamicCache
from transformers.audio_utils import mel_filter_bank

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16_000
AUDIO_TOKEN = "<|audio|>"
TASKS = ("ast", "asr", "sqa")
MODES = ("eval", "sft", "grpo", "mp-grpo")


class InputError(Exception):
    """Bad input found before or during a run: printed as one line, exit code 2."""


class Interrupted(Exception):
    """SIGINT or SIGTERM outside the training loop (which finishes its step instead): exit 130."""


# ------------------------------------------------------------------------------ config ----


def opt(default, help, **kw):
    """A config field that carries its own --help text."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to run
    task: str = opt("ast", "ast (speech translation en->de), asr (transcription) or sqa "
                           "(spoken QA)", choices=TASKS)
    mode: str = opt("grpo", "eval, sft, grpo or mp-grpo (GRPO + reference as off-policy sample)",
                    choices=MODES)
    model: str = opt("data/tiny-granite-speech", "local directory or hub id of a Granite Speech "
                     "or Qwen2-Audio checkpoint (hub needs HF_HUB_OFFLINE=0)")
    data: str = opt("", "data directory (default: data/<task>) holding {train,dev,test}.jsonl, "
                        "CoVoST2 TSVs or LibriSQA JSON")
    out: str = opt("", "run directory (default: runs/<task>-<mode>)")
    # the GRPO objective
    max_steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(4, "B: prompts per step (each gets a group of G completions)")
    group_size: int = opt(8, "G: completions per prompt (the paper: 8)")
    beta: float = opt(0.02, "KL coefficient (the paper: 0.02; 0 diverged there)")
    epsilon: float = opt(0.2, "lower clip range of the ratio s_{i,t}")
    epsilon_high: float | None = opt(None, "upper clip range (DAPO clip-higher); default: epsilon")
    loss_type: str = opt("dapo", "dapo: token mean over the group (the paper); grpo: "
                                 "per-sequence mean; dr_grpo: sum / (N * --max-new-tokens)",
                         choices=("dapo", "grpo", "dr_grpo"))
    num_iterations: int = opt(1, "mu: policy updates per rollout, sharing the step's learning "
                                 "rate (old log-probs reused; metrics average them)")
    scale_rewards: bool = opt(True, "divide advantages by the group's std (off: Dr. GRPO)")
    reward: str = opt("bleu", "reward: bleu (the paper), chrf, bleu+chrf (their mean), or a "
                              "ROUGE F-measure: rouge-1, rouge-2, rouge-l (the paper's ablation)",
                      choices=("bleu", "chrf", "bleu+chrf", "rouge-1", "rouge-2", "rouge-l"))
    temperature: float = opt(1.0, "sampling temperature for rollouts, > 0 (the paper: 1)")
    top_p: float = opt(1.0, "nucleus sampling for rollouts")
    max_new_tokens: int = opt(48, "longest completion in tokens (the paper: 200)")
    system_prompt: str = opt("auto", "system turn before each prompt. auto: the model card's, "
                             "dated April 9, 2025, when the chat template writes a system turn "
                             "of its own (released Granite 3.x), else none; none; or the text. "
                             "Qwen2-Audio's template writes 'You are a helpful assistant.' "
                             "wherever no system turn is given (auto and none alike)")
    # optimisation
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    warmup_ratio: float = opt(0.1, "share of steps with linear warm-up; cosine decay to 10% after")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    grad_accum: int = opt(1, "split each step's prompts into this many micro-batches")
    train_encoder: bool = opt(False, "also train the audio encoder (default: projector + LM)")
    lora: int = opt(0, "R: train a rank-R LoRA on the LM's --lora-targets and the whole projector, "
                       "the LM frozen (0: every LM weight trains)")
    lora_alpha: float = opt(32.0, "LoRA scale alpha / R (the released adapter: R 64, alpha 32)")
    lora_targets: str = opt("auto", "comma list of Linear names in the LM's decoder layers. auto: "
                            "Granite Speech q_proj,v_proj (the released adapter's); Qwen2-Audio "
                            "all seven (q,k,v,o,gate,up,down_proj: ms-swift's all-linear)")
    sft_batch_size: int | None = opt(None, "SFT: references per step (default B x G, the "
                                           "sequences of a GRPO update)")
    # evaluation
    eval_every: int = opt(30, "steps between dev evaluations; the best-on-dev weights go to best/")
    eval_limit: int = opt(200, "test utterances scored for results.json (0: all)")
    dev_limit: int = opt(0, "dev utterances scored every --eval-every steps (0: all)")
    eval_decoding: str = opt("greedy", "dev decoding that selects best/: greedy, sample (T 0.9, "
                                       "top-p 0.9, the paper's) or beam; test is scored greedy "
                                       "and sampled, and beam when chosen",
                             choices=("greedy", "sample", "beam"))
    num_beams: int = opt(4, "beams of --eval-decoding beam (the model card's 4)")
    eval_batch_size: int = opt(32, "utterances per evaluation batch")
    # machinery
    seed: int = opt(0, "seed; every random draw derives from (seed, step, index)")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    threads: str = opt("auto", "CPU threads: auto (1 for an LM narrower than 512, which a second "
                               "thread slows down on a busy machine; else every core), a number, "
                               "or torch (its own default); OMP_NUM_THREADS, if set, wins")
    bf16: bool = opt(False, "bf16 autocast for forward passes (log-probs stay fp32)")
    compile: bool = opt(False, "torch.compile the language model")
    grad_checkpointing: bool = opt(False, "recompute each LM layer in the backward instead of "
                                          "keeping its activations (less memory, more compute)")
    resume: bool = opt(False, "continue from <out>/checkpoint")
    overwrite: bool = opt(False, "replace an existing run in --out")
    max_audio_seconds: float = opt(30.0, "reject longer audio files before training starts")
    max_bad_steps: int = opt(3, "abort after this many non-finite losses in a row")

    @property
    def grpo(self) -> bool:
        """The modes that sample groups and reward them: grpo and mp-grpo (not sft, not eval)."""
        return self.mode in ("grpo", "mp-grpo")


# ------------------------------------------------------------------------------- audio ----
# Granite Speech hears 16 kHz mono. Features are log-mel frames stacked in pairs: 160 numbers
# every 20 ms. The window Q-Former then turns every 15 frames into 3 LM embeddings (10 a second).


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int, lowpass_width: int = 6,
             rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited polyphase resampling with a Hann-windowed sinc, torchaudio's algorithm."""
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    cutoff = min(orig, new) * rolloff                        # in units of the reduced rates
    width = math.ceil(lowpass_width * orig / cutoff)          # kernel half-width, input samples
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx) * cutoff
    t = t.clamp(-lowpass_width, lowpass_width)
    window = torch.cos(t * math.pi / lowpass_width / 2) ** 2
    kernel = torch.where(t == 0, 1.0,
                         torch.sin(t * math.pi) / (t * math.pi)) * window * cutoff / orig
    x = F.pad(wave.double()[None, None], (width, width + orig))
    y = F.conv1d(x, kernel[:, None], stride=orig)             # (1, new, blocks)
    y = y[0].t().reshape(-1)[: math.ceil(new * wave.numel() / orig)]
    return y.to(wave.dtype)


def load_audio(path: str | Path, sampling_rate: int = SAMPLE_RATE, where: str = "") -> torch.Tensor:
    """Read a sound file as 1-D float32: channels averaged, resampled to `sampling_rate`."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types; the user needs the file name
        raise InputError(f"{path}: cannot read audio ({str(e).splitlines()[0][:120]})") from None
    if data.shape[0] == 0:
        raise InputError(f"{path}: audio file has 0 samples")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: {(~np.isfinite(data)).sum()} non-finite samples"
                         + (f" ({where})" if where else ""))
    wave = torch.from_numpy(data).mean(dim=1)                # stereo -> mono
    return resample(wave, sr, sampling_rate)


@functools.cache
def granite_mel_filters() -> torch.Tensor:
    """(257, 80) HTK mel triangles, 0-8 kHz, unnormalised: GraniteSpeechFeatureExtractor's."""
    return torch.from_numpy(mel_filter_bank(
        num_frequency_bins=257, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE, norm=None, mel_scale="htk")).float()


def log_mel_batch(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Granite Speech features, (B, F, 160), and (B,) audio-token counts: exactly
    GraniteSpeechFeatureExtractor (log10 mel power floored at max - 8, frame pairs stacked)."""
    lengths = torch.tensor([w.numel() for w in waves])
    x = pad_sequence(waves, batch_first=True)                                  # (B, S)
    spec = torch.stft(x, n_fft=512, hop_length=160, win_length=400, window=torch.hann_window(400),
                      center=True, pad_mode="reflect",
                      return_complex=True).abs() ** 2                          # (B, 257, frames)
    mel = (granite_mel_filters().T @ spec).transpose(1, 2)                     # (B, frames, 80)
    logmel = mel.clamp(min=1e-10).log10()
    logmel = torch.maximum(logmel, logmel.amax(dim=(1, 2), keepdim=True) - 8.0) / 4 + 1
    if logmel.shape[1] % 2:
        logmel = logmel[:, :-1]
    feats = logmel.reshape(len(waves), -1, 160)                                # (B, F, 160)
    return feats, torch.tensor([num_audio_tokens(int(n)) for n in lengths])


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """Granite Speech features of one utterance, (frames, 160)."""
    return log_mel_batch([wave])[0][0]


def num_audio_tokens(num_samples: int, window_size: int = 15, downsample_rate: int = 5) -> int:
    """How many <|audio|> embeddings the window Q-Former makes from `num_samples` samples."""
    mel_frames = num_samples // 160 + 1
    encoder_frames = mel_frames // 2                          # frame pairs are stacked
    return math.ceil(encoder_frames / window_size) * (window_size // downsample_rate)


# -------------------------------------------------------------------------------- text ----
# Prompts are the task instruction in the model's chat template; the one <|audio|> in it is
# expanded to as many copies as the projector makes embeddings, which replace them in the LM.


# The model card's system turn with its example date: Granite 3.x templates otherwise write
# today's date into every prompt, and no run would be reproducible from one day to the next.
CARD_SYSTEM = ("Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
               "You are Granite, developed by IBM. You are a helpful AI assistant")


def system_turn(tokenizer, system_prompt: str, config) -> str | None:
    """The system turn for --system-prompt (None: none). auto gives the family's card_system
    only when the chat template writes a dated system turn of its own (released Granite 3.x)."""
    if system_prompt != "auto":
        return None if system_prompt in ("", "none") else system_prompt
    card = family(config).card_system
    if card is None:
        return None
    mark = "\x00system\x00"
    try:
        turns = [{"role": "system", "content": mark}, {"role": "user", "content": "u"}]
        with_system = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # a template that rejects system turns cannot want one
        return None
    header = with_system[:with_system.find(mark)]     # <|start_of_role|>system<|end_of_role|>
    user_only = tokenizer.apply_chat_template([{"role": "user", "content": "u"}], tokenize=False)
    return card if mark in with_system and header.strip() and header in user_only else None


def encode_prompt(tokenizer, user_turn: str | list, n_audio: int, audio_token_id: int,
                  system: str | None = None) -> list[int]:
    """The chat's token ids, its one audio token expanded to n_audio copies."""
    turns = [{"role": "system", "content": system}] if system is not None else []
    turns.append({"role": "user", "content": user_turn})
    chat = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False).input_ids
    if ids.count(audio_token_id) != 1:
        raise InputError(f"prompt {user_turn!r} must contain {AUDIO_TOKEN} exactly once")
    k = ids.index(audio_token_id)
    return ids[:k] + [audio_token_id] * n_audio + ids[k + 1:]


def encode_target(tokenizer, text: str, eos_id: int) -> list[int]:
    """A reference completion's ids, ending in the stop token (an action too)."""
    return tokenizer(text, add_special_tokens=False).input_ids + [eos_id]


# ---------------------------------------------------------------------- model families ----
# What differs between speech LM families, and nothing else, chosen by the config's model_type:
# the rest of the file asks family(config), never which one it has. All share a causal LM at
# model.model.language_model, its head at model.lm_head, an audio token whose embeddings the audio
# replaces, and 1-D RoPE positions. Part II holds the second family, Qwen2-Audio.


class Family(Protocol):
    """What a family writes: seven names and eight methods. A new family subclasses it and adds
    one FAMILIES entry (Part II, beside Qwen2-Audio)."""
    name: str                   # for messages: "Granite Speech"
    model_class: str            # the transformers class that loads it
    encoder_prefix: str         # parameter names frozen unless --train-encoder
    lora_targets: str           # --lora-targets auto
    card_system: str | None     # --system-prompt auto, when the template dates a turn of its own
    max_seconds: float          # the longest clip its encoder hears (longer: refused at start)
    released_adapter: bool      # ships a peft adapter that load_model merges (else: refused)

    def tokenizer(self, path: Path):
        """The tokenizer whose chat template writes the prompt."""

    def features(self, wave: torch.Tensor, config) -> tuple[torch.Tensor, int, int]:
        """One clip's features, its real frames F, and its audio embeddings A."""

    def user_turn(self, text: str) -> str | list:
        """The user turn's content for the chat template, holding the audio once."""

    def encode(self, model, feats: torch.Tensor, frames: int) -> torch.Tensor:
        """(1, F', H): the audio encoder on one clip."""

    def project(self, model, states: torch.Tensor, frames: int) -> torch.Tensor:
        """(1, A, D): the clip's audio embeddings in the LM's space."""

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the LM's last hidden states."""

    def processor_config(self, config) -> dict:
        """processor_config.json for a checkpoint whose source had none."""

    def stop_id(self, config) -> int:
        """The token that ends a completion: the LM config's eos, which generate stops on (the
        tokenizer's may differ: a Qwen2 tokenizer's is <|endoftext|>)."""
        eos = config.text_config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos


class GraniteSpeech(Family):
    """Granite Speech 3.x (GraniteSpeechForConditionalGeneration): conformer encoder, window
    Q-Former projector, Granite LM whose logits are divided by logits_scaling."""
    name = "Granite Speech"
    model_class = "GraniteSpeechForConditionalGeneration"
    encoder_prefix = "model.encoder."
    lora_targets = "q_proj,v_proj"           # the released adapter's
    card_system = CARD_SYSTEM                # the model card's, dated
    max_seconds = float("inf")               # the conformer has no position table to outrun
    released_adapter = True                  # the 3.3 releases' LoRA, merged at load

    def tokenizer(self, path: Path):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)

    def features(self, wave: torch.Tensor, config) -> tuple[torch.Tensor, int, int]:
        """One clip's features (F, 160), its frames F, and its audio embeddings A."""
        feats = log_mel(wave)
        n_audio = num_audio_tokens(wave.numel(), config.window_size, config.downsample_rate)
        return feats, feats.shape[0], n_audio

    def user_turn(self, text: str) -> str:
        """The instruction as written: <|audio|> stands where the manifest puts it."""
        return text

    def encode(self, model, feats: torch.Tensor, frames: int) -> torch.Tensor:
        """(1, F, H): the encoder on the clip's own frames (the conformer has no padding mask)."""
        return model.model.encoder(feats[None, :frames]).last_hidden_state

    def project(self, model, states: torch.Tensor, frames: int) -> torch.Tensor:
        """(1, A, D): the clip's audio embeddings, one Q-Former window of 15 frames -> 3."""
        return model.model.projector(states[:, :frames])

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """Divided by logits_scaling (8 for the 3.3 2B), which transformers 5's class forgets:
        unscaled logits sample nearly greedy at temperature 1 and give a wrong KL."""
        return model.lm_head(hidden) / model.config.text_config.logits_scaling

    def processor_config(self, config) -> dict:
        """processor_config.json as GraniteSpeechProcessor.save_pretrained writes it."""
        mel = {"hop_length": 160, "n_fft": 512, "n_mels": 80, "sample_rate": SAMPLE_RATE,
               "win_length": 400}
        return {"audio_processor": {
            "feature_extractor_type": "GraniteSpeechFeatureExtractor", "feature_size": 80,
            "melspec_kwargs": mel, "padding_side": "right", "padding_value": 0.0,
            "projector_downsample_rate": config.downsample_rate,
            "projector_window_size": config.window_size, "return_attention_mask": True,
            "sampling_rate": SAMPLE_RATE}, "audio_token": AUDIO_TOKEN,
            "processor_class": "GraniteSpeechProcessor"}


def family(config) -> Family:
    """The family of a model's config (FAMILIES, in Part II, lists every one)."""
    return FAMILIES[config.model_type]


# -------------------------------------------------------------------------------- data ----
# An example is {"id", "audio", "task", "text", "target"}: the instruction (or question) holds
# <|audio|>; target is the reference. JSON Lines manifests, CoVoST2 and LibriSQA all read to it.


PROMPTS = {  # the paper's instruction templates; CoVoST2 / LibriSQA readers use the first
    "ast": "<|audio|> listen to the speech and translate it into German.",
    "asr": "<|audio|> can you transcribe the speech into a written format?",
    "sqa": "Listen to the audio <|audio|> and answer the following question: {question}",
}


FIELDS = ("id", "audio", "task", "text", "target")


def read_manifest(path: str | Path, max_seconds: float = float("inf")) -> list[dict]:
    """Read and validate a JSON Lines manifest; audio paths become absolute. Raises InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        missing = [k for k in FIELDS
                   if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise InputError(f"{path}:{n}: missing or non-string field(s) {', '.join(missing)}")
        if not row["target"].strip():
            raise InputError(f"{path}:{n}: empty reference (target)")
        if row["text"].count(AUDIO_TOKEN) != 1:
            raise InputError(f"{path}:{n}: text must hold {AUDIO_TOKEN} exactly once")
        row["audio"], row["line"] = str((path.parent / row["audio"]).resolve()), n
        rows.append(row)
    return check_audio_files(rows, path, max_seconds)   # Part II: every audio file, checked


class SpeechData:
    """Examples and a seeded, resumable order; audio is decoded when a batch needs it."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def wave(self, i: int) -> torch.Tensor:
        return load_audio(self.rows[i]["audio"])

    def num_samples(self, i: int) -> int:
        """Length of utterance i at 16 kHz, from the header read by check_audio_files."""
        n = self.rows[i].get("num_samples")
        return n if n is not None else self.wave(i).numel()

    def order(self, seed: int, epoch: int) -> list[int]:
        """The epoch's permutation, a function of (seed, epoch): resuming needs no saved state."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def batch_indices(self, seed: int, step: int, size: int) -> list[int]:
        """The prompts of optimizer step `step`, walking through shuffled epochs."""
        n = len(self.rows)
        stream = range(step * size, (step + 1) * size)      # places in the endless epoch stream
        orders = {epoch: self.order(seed, epoch) for epoch in {k // n for k in stream}}
        return [orders[k // n][k % n] for k in stream]


@dataclass
class Batch:
    """B prompts ready for the model. Prompts are left-padded so that completions line up."""
    features: torch.Tensor        # (B, F, 160) Granite's log-mel frame pairs, zero-padded;
    #                               (B, 128, 3000) Qwen2-Audio's 30 s of Whisper log-mel
    frames: torch.Tensor          # (B,) real frames of each utterance
    features_mask: torch.Tensor   # (B, A) which projector outputs are real audio
    input_ids: torch.Tensor       # (B, P) chat-templated prompts, <|audio|> expanded
    attention_mask: torch.Tensor  # (B, P) 0 on left padding
    targets: list[str]            # references
    rows: list[dict]

    def to(self, device):
        return Batch(*(v.to(device) if torch.is_tensor(v) else v for v in vars(self).values()))

    def select(self, b0: int, b1: int) -> "Batch":
        """Prompts b0..b1-1 (a micro-batch)."""
        return Batch(*(v[b0:b1] for v in vars(self).values()))


def collate(data: SpeechData, idx: list[int], tokenizer, audio_token_id: int, *, config,
            system: str | None = None) -> Batch:
    """B prompts with each utterance's features made alone, by the family of the model's
    `config`: batch padding would make an answer depend on its batch mates."""
    fam = family(config)
    feats, frames, n_audio = zip(*(fam.features(data.wave(i), config) for i in idx))
    frames, n_audio = torch.tensor(frames), torch.tensor(n_audio)
    prompts = [encode_prompt(tokenizer, fam.user_turn(data.rows[i]["text"]), int(n),
                             audio_token_id, system) for i, n in zip(idx, n_audio)]
    input_ids = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True,
                             padding_value=tokenizer.pad_token_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones(len(p), dtype=torch.long) for p in prompts],
                                  batch_first=True, padding_side="left")
    features_mask = torch.arange(int(n_audio.max()))[None] < n_audio[:, None]
    return Batch(pad_sequence(feats, batch_first=True), frames, features_mask,
                 input_ids, attention_mask, [data.rows[i]["target"] for i in idx],
                 [data.rows[i] for i in idx])


# ------------------------------------------------------------------------------- model ----


def load_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """A speech LM and its tokenizer by local path or hub id, frozen (setup_training says what
    trains). Part II finds and checks the files, and merges a released LoRA adapter first."""
    import transformers
    path, config, weights = model_files(name)                 # Part II: checks, hub, shards
    fam = family(config)
    try:
        model, info = getattr(transformers, fam.model_class).from_pretrained(
            None, config=config, state_dict=weights, dtype=dtype, output_loading_info=True)
        tokenizer = fam.tokenizer(path)
    except OSError as e:
        raise cannot_load(name, e) from None
    del weights
    for m in model.modules():   # buffers kept as loaded would keep the file mapped
        m._buffers.update({k: b.clone() for k, b in m._buffers.items() if b is not None})
    check_loaded(model, tokenizer, info, name, path)   # Part II: the adapter merged, the template
    if tokenizer.pad_token is None:   # pads are masked by lengths: any real id serves
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(fam.stop_id(config))
    model.name_or_path, model.source_dir = str(name), path   # save_model copies its files
    return model.to(device).requires_grad_(False), tokenizer


def suppressed_ids(tokenizer, config) -> torch.Tensor:
    """Tokens a completion must never contain: specials but the stop token, ids past the
    tokenizer, and <|audio|>, which the next forward would replace by audio features."""
    vocab_size = config.text_config.vocab_size
    bad = (set(tokenizer.all_special_ids) | {config.audio_token_id}
           | set(range(len(tokenizer), vocab_size)))
    bad.discard(family(config).stop_id(config))
    return torch.tensor(sorted(bad), dtype=torch.long)


def encoder_states(model, batch: Batch, train_encoder: bool = False) -> torch.Tensor:
    """(B, F, H): the family's encoder on each utterance alone, zero-padded to the longest. A
    frozen encoder runs without autograd, so none of its activations are kept."""
    fam = family(model.config)
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):
        return pad_sequence([fam.encode(model, feats, n)[0]
                             for feats, n in zip(batch.features, batch.frames.tolist())],
                            batch_first=True)


def audio_embeddings(model, batch: Batch, train_encoder: bool = False,
                     encoded: torch.Tensor | None = None) -> torch.Tensor:
    """(B, A, D): encoder + projector on each utterance, zero rows past its audio tokens.
    `encoded` is the frozen encoder's states when the caller has them (train() runs it once a
    step)."""
    if encoded is None:
        encoded = encoder_states(model, batch, train_encoder)                  # (B, F, H)
    fam = family(model.config)
    audio = [fam.project(model, encoded[b:b + 1], n)[0]                        # (A_b, D)
             for b, n in enumerate(batch.frames.tolist())]
    audio = pad_sequence(audio, batch_first=True)                               # (B, A_b max, D)
    return F.pad(audio, (0, 0, 0, batch.features_mask.shape[1] - audio.shape[1]))   # (B, A, D)


def prompt_embeddings(model, batch: Batch, train_encoder: bool = False,
                      encoded: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P, D): the LM's input embeddings for B prompts, the audio spliced in at the audio
    token's positions, as the transformers classes do it."""
    audio = audio_embeddings(model, batch, train_encoder, encoded)            # (B, A, D)
    is_audio = batch.input_ids == model.config.audio_token_id                  # (B, P)
    embeds = model.get_input_embeddings()(torch.where(is_audio, 0, batch.input_ids))
    # row-major: utterance b's A_b real embeddings fill its A_b audio positions in order
    return embeds.masked_scatter(is_audio[..., None], audio.to(embeds.dtype)[batch.features_mask])


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that start at 0 on each row's first real token (prompts are left-padded)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def prompt_mask(model, attention_mask: torch.Tensor, P: int) -> torch.Tensor:
    """The attention mask of a pass over P left-padded prompt positions: (B, K) as given when
    no row is padded, else (B, 1, P, K), causal over the real keys, each pad position also seeing
    itself. transformers 5.25 leaves a pad query with no key, where some CUDA kernels give NaN
    that the next layer carries into every real row. Boolean for SDPA, additive for eager."""
    # one host sync per prompt pass (a step's, a micro-batch's), never per token
    if bool(attention_mask.all()):  # transformers' own causal path: kept, no mask made
        return attention_mask
    q = torch.arange(P, device=attention_mask.device)[:, None]                     # (P, 1)
    k = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]  # (1, K)
    real = attention_mask.bool()[:, None]                                          # (B, 1, K)
    mask = ((k <= q) & (real | (k == q)))[:, None]                                 # (B, 1, P, K)
    if model.model.language_model.config._attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo().min)


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from the LM's last hidden states, by the family (Granite scales them):
    the one place they are computed, so no caller reads model(...).logits."""
    # contiguous: a strided (N, T, D) slice sends the bf16 head to a batched matmul that expands
    # the (V, D) weight N times (README: memory)
    return family(model.config).logits(model, hidden.contiguous())


class PromptCache(DynamicCache):
    """The keys and values of B prompts: the prompts' pass writes them and the completions'
    pass reads them through for_groups(G), each repeated for its group. Neither appends, so a
    layer rerun in the backward by --grad-checkpointing sees the same tensors again."""
    group_size = 0                                          # 0: this cache is written

    def update(self, keys, values, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not self.group_size:                                 # (B, H_kv, P, d), kept
            layer.keys, layer.values, layer.is_initialized = keys, values, True
            return keys, values
        G = self.group_size                                     # (N, H_kv, P + T, d)
        return (torch.cat([layer.keys.repeat_interleave(G, 0), keys], dim=-2),
                torch.cat([layer.values.repeat_interleave(G, 0), values], dim=-2))

    def for_groups(self, group_size: int) -> "PromptCache":
        reader = copy.copy(self)                                # the same layers
        reader.group_size = group_size
        return reader


def completion_logprobs(model, batch: Batch, completions: torch.Tensor, group_size: int,
                        temperature: float = 1.0, train_encoder: bool = False,
                        with_entropy: bool = False, encoded: torch.Tensor | None = None):
    """Teacher-forced log pi(o_{i,t} | q, o_{i,<t}) of N = B*G completions, (N, T), in fp32
    (under bf16 the ratio of two nearly equal probabilities drifts from 1). A causal LM's states
    at the prompt q do not depend on what follows it, so the LM reads the B prompts once and each
    of the G completions attends to its prompt's keys and values (README: Speed)."""
    P, T = batch.attention_mask.shape[1], completions.shape[1]
    cache = PromptCache(config=model.config)
    prompt = model.model(inputs_embeds=prompt_embeddings(model, batch, train_encoder, encoded),
                         attention_mask=prompt_mask(model, batch.attention_mask, P),
                         position_ids=positions(batch.attention_mask), cache=cache,
                         use_cache=True).last_hidden_state[:, -1:]             # (B, 1, D)
    mask = torch.cat([batch.attention_mask.repeat_interleave(group_size, 0),
                      torch.ones_like(completions)], dim=1)                    # (N, P+T)
    hidden = model.model.language_model(input_ids=completions, attention_mask=mask,
                                        position_ids=positions(mask)[:, -T:],
                                        cache=cache.for_groups(group_size),
                                        use_cache=True).last_hidden_state      # (N, T, D)
    # the prompt's last position predicts o_{i,1}; completion position t-1 predicts o_{i,t}
    hidden = torch.cat([prompt.repeat_interleave(group_size, 0), hidden[:, :-1]], dim=1)
    # the step's largest tensors, fp32 (N, T, V): two alive in this line, one after it, three in
    # the backward (README: memory)
    logp_all = torch.log_softmax(lm_logits(model, hidden).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, completions[..., None]).squeeze(-1)            # (N, T)
    if not with_entropy:
        return logp
    with torch.no_grad():   # a completion at a time: exp and product are (T, V), not (N, T, V)
        entropy = torch.stack([-(row.exp() * row).sum(-1) for row in logp_all])   # (N, T)
    return logp, entropy


# ---------------------------------------------------------------------------- sampling ----


@dataclass
class Samples:
    tokens: torch.Tensor    # (N, T) completion ids, EOS included, pad after it
    lengths: torch.Tensor   # (N,) tokens up to and including the first EOS
    # (N, T) fp32 log-probs of the drawn tokens under the tempered softmax, as in TRL; training
    # recomputes them teacher-forced, and tests hold the two equal
    sampler_logp: torch.Tensor

    def token_lists(self) -> list[list[int]]:
        """Each completion's ids, cut at its length (never at the first pad id)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


def prefill(model, batch: Batch, copies: int, max_new_tokens: int, suppress=None,
            encoded: torch.Tensor | None = None):
    """Prefill B prompts once and repeat the cache `copies` times, since a group shares its
    prompt. Returns the static cache (written in place, where a dynamic one copies itself every
    token), the (N, P + max_new_tokens) attention mask, the (N, 1) next positions, the (N, V)
    first logits, and the (V,) mask of suppressed tokens."""
    from transformers import StaticCache
    B, P = batch.input_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    attn = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(B, max_new_tokens)],
                     dim=1)
    pos = positions(batch.attention_mask)
    out = model.model(inputs_embeds=prompt_embeddings(model, batch, encoded=encoded),
                      attention_mask=prompt_mask(model, attn, P),
                      position_ids=pos, cache=cache, use_cache=True)
    cache.reorder_cache(torch.arange(B, device=attn.device).repeat_interleave(copies))
    logits = lm_logits(model, out.last_hidden_state[:, -1]).float().repeat_interleave(copies, 0)
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    if suppress is not None:
        banned[suppress.to(logits.device)] = True
    return (cache, attn.repeat_interleave(copies, 0),
            pos[:, -1:].repeat_interleave(copies, 0) + 1, logits, banned)


@torch.no_grad()
def sample_groups(model, batch: Batch, group_size: int, *, max_new_tokens: int, eos_id: int,
                  pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
                  suppress: torch.Tensor | None = None, uniforms: torch.Tensor | None = None,
                  encoded: torch.Tensor | None = None) -> Samples:
    """G completions o_i ~ pi(. | q) for each of B prompts, decoded in lock-step from one
    prefill (temperature 0: greedy). Token t of row i inverts the CDF at uniforms[i, t], seeded
    per prompt (row_uniforms), so batch mates cannot change a completion."""
    N = batch.input_ids.shape[0] * group_size
    cache, attn, next_pos, logits, banned = prefill(model, batch, group_size, max_new_tokens,
                                                    suppress, encoded)
    device = logits.device
    tokens = torch.full((N, max_new_tokens), pad_id, device=device)
    sampler_logp = torch.zeros(N, max_new_tokens, device=device)
    lengths = torch.full((N,), max_new_tokens, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    uniforms = (torch.rand(N, max_new_tokens) if uniforms is None else uniforms).to(device)
    lm = model.model.language_model                   # decode steps skip the audio plumbing
    for t in range(max_new_tokens):
        # pi_old(. | q, o_<t) at the training temperature: the ratio's denominator must be the
        # distribution the teacher-forced pass will compute, or s_{i,t} != 1 on-policy
        logits = logits / temperature if temperature > 0 else logits
        logp_all = torch.log_softmax(logits, dim=-1)                       # (N, V)
        token = choose_tokens(logits, logp_all, banned, temperature, top_p, uniforms[:, t])
        token = torch.where(done, pad_id, token)                           # finished rows only pad
        tokens[:, t] = token
        sampler_logp[:, t] = torch.where(done, 0.0,
                                         logp_all.gather(1, token[:, None]).squeeze(1))
        # lengths count the first EOS: it is an action the policy took, and the loss keeps it
        finished_now = ~done & (token == eos_id)
        lengths = torch.where(finished_now, t + 1, lengths)
        done |= finished_now
        if bool(done.all()):
            break
        out = lm(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos, cache=cache,
                 use_cache=True)
        logits, next_pos = lm_logits(model, out.last_hidden_state[:, -1]).float(), next_pos + 1
    T = int(lengths.max())
    return Samples(tokens[:, :T], lengths, sampler_logp[:, :T])


def choose_tokens(logits, logp_all, banned, temperature: float, top_p: float, u: torch.Tensor):
    """One token per row: the argmax at temperature 0, else the (top-p) distribution without the
    banned tokens, its CDF inverted at the (N,) uniforms u (unlike torch.multinomial, seeded)."""
    if temperature <= 0:
        return logits.masked_fill(banned, -float("inf")).argmax(-1)
    if top_p < 1.0:
        probs = torch.softmax(top_p_filter(logits.masked_fill(banned, -float("inf")), top_p), -1)
    else:
        probs = logp_all.exp().masked_fill(banned, 0.0)
    cdf = probs.cumsum(-1)                                                  # (N, V)
    # right=True: u = 0 must not land on a leading zero-probability (suppressed) token
    token = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1)
    return token.clamp(max=cdf.shape[1] - 1)


def row_uniforms(seed: int, step: int, prompts: list[int], group_size: int,
                 length: int) -> torch.Tensor:
    """(len(prompts) * G, length) uniforms, a function of (seed, step, prompt) alone."""
    seeds = [(seed * 1_000_003 + step) * 1_000_003 + p for p in prompts]
    return torch.cat([torch.rand(group_size, length, generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the best one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum - sorted_logits.softmax(-1) >= top_p                # mass before this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


def decode(tokenizer, completions: list[list[int]]) -> list[str]:
    """Completion texts: what the reward and the metrics read."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]


# ----------------------------------------------------------------------------- rewards ----


# The paper's reward is sentence BLEU against the one reference. Sentence BLEU is smoothed:
# without smoothing a completion with no matching 4-gram scores 0 however close it is, and a
# group whose samples all score 0 has no spread, hence no advantage and no learning signal.


def bleu_reward(completions: list[str], references: list[str]) -> torch.Tensor:
    """r_i = sentence BLEU in [0, 1], sacrebleu's defaults (13a tokens, exp smoothing)."""
    return torch.tensor([sacrebleu.sentence_bleu(c, [r]).score / 100
                         for c, r in zip(completions, references)])


def chrf_reward(completions: list[str], references: list[str]) -> torch.Tensor:
    """Character n-gram F-score in [0, 1]: smoother than BLEU on short, partly right answers."""
    return torch.tensor([sacrebleu.sentence_chrf(c, [r]).score / 100
                         for c, r in zip(completions, references)])


def rouge_reward(completions: list[str], references: list[str], key: str) -> torch.Tensor:
    """Sentence ROUGE F-measure in [0, 1] (key: rouge1, rouge2 or rougeL), the paper's ablation."""
    return torch.tensor([rouge(c, r)[key] for c, r in zip(completions, references)])


REWARDS = {  # --reward; only the ranking within a group matters once advantages are normalised
    "bleu": bleu_reward,
    "chrf": chrf_reward,
    "bleu+chrf": lambda c, r: (bleu_reward(c, r) + chrf_reward(c, r)) / 2,
    "rouge-1": functools.partial(rouge_reward, key="rouge1"),
    "rouge-2": functools.partial(rouge_reward, key="rouge2"),
    "rouge-l": functools.partial(rouge_reward, key="rougeL"),
}


# -------------------------------------------------------------------------- advantages ----


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale_rewards: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + 1e-4) within each group of G, shared by all tokens of
    o_i; a group whose rewards tie gets A = 0. Unscaled (Dr. GRPO) it is r_i - mean(r)."""
    r = rewards.view(-1, group_size)                                        # (B, G)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (r.std(dim=1, keepdim=True) + 1e-4)
    return advantages.view(-1)                                              # (N,)


# ------------------------------------------------------------------------------ losses ----


# GRPO is PPO without a value network: the group's mean reward is the baseline, so A_i says
# how much better o_i was than its siblings. Each token of o_i is pushed by A_i, weighted by how
# much more likely the policy now makes it (the ratio s), clipped so that one update cannot move
# a token's probability far from the policy that sampled it, and held near pi_ref by a KL term.


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, normaliser=None) -> torch.Tensor:
    """Cross-entropy of the reference tokens (EOS included), divided by `normaliser`, the whole
    batch's token count as in grpo_loss (default: this batch's)."""
    if normaliser is None:
        normaliser = loss_normaliser(mask)
    return -(logp * mask).sum() / normaliser


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta=0.02, epsilon=0.2,
              epsilon_high=None, loss_type="dapo", off_policy=None, max_completion_length=None,
              normaliser=None):
    """The paper's objective (section 2), negated: the clipped surrogate minus beta KL, with
    DAPO's token mean; and its metrics. logp, old_logp and ref_logp are (N, T) log-probs of the
    policy, the behaviour policy and the reference; advantages (N,); mask (N, T) from lengths;
    off_policy (N,) marks MP-GRPO's reference rows. The sum is divided by `normaliser`, counted
    by loss_normaliser over the whole batch (every micro-batch, every process, as TRL's
    num_items_in_batch), so micro-batch losses add up to the batch's; default: this batch."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.float()
    A = advantages[:, None]                                                 # (N, 1)
    # ratio s_{i,t} = pi_theta / pi_theta_old, and the clipped surrogate. With mu = 1 old_logp is
    # logp.detach(): s = 1 in value, but its gradient is grad log pi, the policy gradient
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    surrogate = torch.min(ratio * A, clipped * A)  # pessimistic: the clip only ever removes gain
    # MP-GRPO (LUFFY): the off-policy weight is pi_theta / pi_phi with pi_phi = 1, never clipped
    if off_policy is not None:
        surrogate = torch.where(off_policy[:, None], torch.exp(logp) * A, surrogate)
    # k3 estimator of KL[pi_theta || pi_ref]: exp(ref - logp) - (ref - logp) - 1 >= 0. Unbiased
    # on samples from pi_theta and never negative, unlike the plain log-ratio (k1)
    if beta != 0 and ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    else:
        kl = torch.zeros_like(logp)
    # a group whose rewards tie (A = 0) adds no surrogate but keeps its KL and its denominator
    per_token = -(surrogate - beta * kl)                                    # -l_{i,t}
    # padding never reaches the loss, not even as inf * 0
    per_token = torch.where(mask.bool(), per_token, 0.0)
    # dapo sums every token (the paper's), so a long answer's tokens weigh as much as a short
    # one's; grpo averages each sequence first, which gives a short answer's tokens more
    if normaliser is None:
        normaliser = loss_normaliser(mask, loss_type, max_completion_length)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    elif loss_type in ("dapo", "dr_grpo"):
        loss = (per_token * mask).sum() / normaliser
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    with torch.no_grad():
        on = mask if off_policy is None else mask * (~off_policy[:, None]).float()
        n_on = on.sum().clamp(min=1)
        metrics = {
            "kl/mean": ((kl * mask).sum() / mask.sum().clamp(min=1)).item(),
            "loss/clip_low":
                (((ratio < 1 - epsilon) & (A < 0)).float() * on).sum().item() / n_on.item(),
            "loss/clip_high":
                (((ratio > 1 + eps_high) & (A > 0)).float() * on).sum().item() / n_on.item(),
            "loss/ratio_mean": ((ratio * on).sum() / n_on).item(),
        }
    return loss, metrics


def loss_normaliser(mask: torch.Tensor, loss_type: str = "dapo",
                    max_completion_length: int | None = None) -> torch.Tensor:
    """What the loss's sum is divided by, counted over the (N, T) completions of `mask`: dapo's
    (and SFT's) completion tokens, grpo's completions N, dr_grpo's N * max_completion_length."""
    if loss_type == "dapo":
        return mask.sum().float().clamp(min=1)
    if loss_type == "grpo":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    if loss_type == "dr_grpo":
        # a constant, never this batch's longest completion: that would bring back the length
        # bias Dr. GRPO removes, and differ between processes
        if max_completion_length is None:
            raise ValueError("dr_grpo needs max_completion_length (the run's --max-new-tokens)")
        return torch.tensor(float(mask.shape[0] * max_completion_length), device=mask.device)
    raise ValueError(f"unknown loss_type {loss_type!r}")


# ---------------------------------------------------------------------------- one step ----
# One step: rollout (sample G completions per prompt, reward them, normalise the rewards into
# advantages, take pi_ref's log-probs), then policy_update (the GRPO loss, backward) and its last
# act, optimizer_step (AdamW). SFT takes the same path with the reference answers as completions.


def clock(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work: CUDA is asynchronous, and a perf/*_s
    timer that does not wait times the kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Rollout:
    """What one step trains on: N = B*G completions (SFT: the B references, G = 1)."""
    completions: torch.Tensor                # (N, T) token ids, pad after each length
    mask: torch.Tensor                       # (N, T) True on tokens up to and including EOS
    group_size: int                          # G
    rewards: torch.Tensor | None = None      # (N,) r_i; None for SFT
    advantages: torch.Tensor | None = None   # (N,) A_i
    old_logp: torch.Tensor | None = None     # (N, T) pi_old, only when mu > 1 (else logp.detach())
    ref_logp: torch.Tensor | None = None     # (N, T) pi_ref, for the KL term
    off_policy: torch.Tensor | None = None   # (N,) MP-GRPO's reference rows


def rollout(cfg: Config, policy, ref_model, tokenizer, batch: Batch, step: int,
            prompt_ids: list[int], suppress, autocast,
            encoded: torch.Tensor | None = None) -> tuple[Rollout, dict]:
    """Everything one update holds fixed: the completions (GRPO: G samples a prompt; MP-GRPO:
    G-1 samples and the reference answer; SFT: the references), their rewards and advantages,
    and the reference's (and, when mu > 1, the old policy's) log-probs."""
    device = batch.input_ids.device
    eos_id = family(policy.config).stop_id(policy.config)
    G = cfg.group_size if cfg.grpo else 1
    rewards = advantages = off_policy = None                        # SFT has none of them
    metrics = {}
    if not cfg.grpo:
        groups = [encode_target(tokenizer, t, eos_id) for t in batch.targets]
    else:
        n = G - 1 if cfg.mode == "mp-grpo" else G                   # on-policy samples a prompt
        # o_1..o_n ~ pi_old(. | q) at the training temperature (the paper: 1): the group must be
        # diverse, or all its rewards tie and the advantages vanish
        t0 = clock(device)
        with autocast():
            samples = sample_groups(
                policy, batch, n, max_new_tokens=cfg.max_new_tokens,
                eos_id=eos_id, pad_id=tokenizer.pad_token_id,
                temperature=cfg.temperature, top_p=cfg.top_p, suppress=suppress,
                uniforms=row_uniforms(cfg.seed, step, prompt_ids, n, cfg.max_new_tokens),
                encoded=encoded)
        t1 = clock(device)
        groups = samples.token_lists()
        references = [t for t in batch.targets for _ in range(n)]
        rewards = score_completions(cfg, tokenizer, groups, references).view(-1, n)  # (B, n)
        metrics = reward_metrics(rewards)
        if cfg.mode == "mp-grpo":
            groups, rewards, mixed_metrics = with_reference_member(cfg, tokenizer, batch, groups,
                                                                   rewards, eos_id)
            metrics |= mixed_metrics
            off_policy = (torch.arange(len(groups), device=device) % G) == G - 1    # (N,)
        rewards = rewards.reshape(-1).to(device)                                     # (N,)
        advantages = group_advantages(rewards, G, cfg.scale_rewards)
        metrics.update({"perf/completion_len": samples.lengths.float().mean().item(),
                        "perf/sample_s": t1 - t0, "perf/reward_s": clock(device) - t1})
    completions, mask = pad_completions(groups, tokenizer.pad_token_id, device)     # (N, T)
    t0 = clock(device)
    ref_logp, old_logp = fixed_logprobs(cfg, policy, ref_model, batch, completions, G, autocast,
                                        encoded)
    metrics["perf/ref_logp_s"] = clock(device) - t0
    return (Rollout(completions, mask, G, rewards, advantages, old_logp, ref_logp, off_policy),
            metrics)


def pad_completions(groups: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(N, T) token ids padded after each completion, and the (N, T) mask of its real tokens.
    The mask comes from lengths, never from == pad_id: the first EOS is an action and stays."""
    lengths = torch.tensor([len(o) for o in groups], device=device)                  # (N,)
    completions = pad_sequence([torch.tensor(o) for o in groups], batch_first=True,
                               padding_value=pad_id).to(device)                      # (N, T)
    return completions, torch.arange(completions.shape[1], device=device) < lengths[:, None]


def score_completions(cfg: Config, tokenizer, completions: list[list[int]],
                      references: list[str]) -> torch.Tensor:
    """(N,) r_i = reward(o_i, reference) of --reward, on the decoded text."""
    return torch.nan_to_num(REWARDS[cfg.reward](decode(tokenizer, completions), references),
                            nan=0.0)


def with_reference_member(cfg: Config, tokenizer, batch: Batch, groups: list[list[int]],
                          rewards: torch.Tensor, eos_id: int):
    """MP-GRPO's groups: each prompt's n = G-1 samples, then its reference answer as the G-th,
    off-policy member, cut to the completion budget like a sample and scored as cut (the same
    tokens never score 1 as the reference and less as a sample). Returns the N groups, their
    (B, G) rewards and metrics."""
    n = rewards.shape[1]
    full = [encode_target(tokenizer, t, eos_id) for t in batch.targets]
    refs = [f[:cfg.max_new_tokens] for f in full]
    ref_r = score_completions(cfg, tokenizer, refs, batch.targets)                   # (B,)
    groups = [o for b, ref in enumerate(refs) for o in groups[b * n:(b + 1) * n] + [ref]]
    rewards = torch.cat([rewards, ref_r[:, None]], dim=1)                            # (B, G)
    # reward/std and reward/zero_std_frac become the mixed groups', whose spread the advantages see
    metrics = {k: v for k, v in reward_metrics(rewards).items() if k != "reward/mean"}
    metrics["reward/ref_mean"] = ref_r.mean().item()
    metrics["reward/ref_truncated_frac"] = sum(len(f) > cfg.max_new_tokens
                                               for f in full) / len(full)
    return groups, rewards, metrics


def reward_metrics(r: torch.Tensor) -> dict:
    """Of (B, n) rewards: their mean, the mean within-group std, and the share of groups whose
    rewards tie (no advantage)."""
    return {"reward/mean": r.mean().item(), "reward/std": r.std(dim=1).mean().item(),
            "reward/zero_std_frac": (r.std(dim=1) == 0).float().mean().item()}


@torch.no_grad()
def fixed_logprobs(cfg: Config, policy, ref_model, batch: Batch, completions: torch.Tensor,
                   G: int, autocast, encoded: torch.Tensor | None = None):
    """The (N, T) log-probs the update holds constant: pi_ref's (None when beta = 0) and, when
    mu > 1, pi_old's (else None: the update's own logp.detach() is pi_old)."""
    ref_logp = old_logp = None
    with autocast():
        if ref_model is not None:
            ref_logp = completion_logprobs(ref_model, batch, completions, G, cfg.temperature,
                                           encoded=encoded)
        if cfg.grpo and cfg.num_iterations > 1:
            old_logp = completion_logprobs(policy, batch, completions, G, cfg.temperature,
                                           encoded=encoded)
    return ref_logp, old_logp


def policy_update(cfg: Config, policy, params, optimizer, batch: Batch, rollout: Rollout,
                  B: int, state: TrainState, autocast, dist: Dist,
                  encoded: torch.Tensor | None = None) -> tuple[dict, float]:
    """mu AdamW steps on one rollout (SFT: one), each over micro-batches of whole groups whose
    losses share the whole batch's normaliser, so their gradients sum to the batch loss's.
    Returns the metrics (mean over the mu passes) and the grad norm."""
    G = rollout.group_size
    # mu > 1 reuses one rollout for several updates (PPO's epochs): the clip is what keeps the
    # later passes honest, since the policy has moved away from pi_old that sampled the tokens
    mu = cfg.num_iterations if cfg.grpo else 1
    loss_type = cfg.loss_type if cfg.grpo else "dapo"                   # SFT: a token mean
    normaliser = dist.sum(loss_normaliser(rollout.mask, loss_type, cfg.max_new_tokens))
    update_metrics: dict[str, float] = {}
    for _ in range(mu):
        pass_loss = 0.0
        for chunk in torch.arange(len(batch.targets)).chunk(cfg.grad_accum):
            b0, b1 = int(chunk[0]), int(chunk[-1]) + 1
            rows = slice(b0 * G, b1 * G)
            mb_mask = rollout.mask[rows]
            # log pi_theta(o_{i,t}) with gradient, one teacher-forced pass over the micro-batch
            with autocast():
                logp, entropy = completion_logprobs(
                    policy, batch.select(b0, b1), rollout.completions[rows], G,
                    cfg.temperature if cfg.grpo else 1.0, cfg.train_encoder, with_entropy=True,
                    encoded=None if encoded is None else encoded[b0:b1])
            if cfg.grpo:  # mu = 1: pi_old is the policy itself, logp.detach() (the ratio is 1)
                old_logp = logp.detach() if rollout.old_logp is None else rollout.old_logp[rows]
                ref_logp = None if rollout.ref_logp is None else rollout.ref_logp[rows]
                off_policy = None if rollout.off_policy is None else rollout.off_policy[rows]
                loss, loss_metrics = grpo_loss(
                    logp, old_logp, ref_logp, rollout.advantages[rows], mb_mask, beta=cfg.beta,
                    epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_new_tokens, off_policy=off_policy,
                    normaliser=normaliser)
            else:
                loss, loss_metrics = sft_loss(logp, mb_mask, normaliser), {}
            loss.backward()
            pass_loss += loss.item()
            # the other metrics are micro-batch means, weighted here by the micro-batch's share
            share = float(mb_mask.sum() / normaliser) if loss_type == "dapo" else (b1 - b0) / B
            loss_metrics["perf/entropy"] = ((entropy * mb_mask).sum()
                                            / mb_mask.sum().clamp(min=1)).item()
            for k, v in loss_metrics.items():
                update_metrics[k] = update_metrics.get(k, 0.0) + v * share / mu
            update_metrics["loss/total"] = update_metrics.get("loss/total", 0.0) + loss.item() / mu
        grad_norm, skipped = optimizer_step(cfg, params, optimizer, pass_loss, state, dist)
        if skipped:
            update_metrics["loss/skipped"] = update_metrics.get("loss/skipped", 0.0) + 1.0 / mu
    return update_metrics, grad_norm


def optimizer_step(cfg: Config, params, optimizer, pass_loss: float, state,
                   dist: Dist) -> tuple[float, bool]:
    """One AdamW step on the processes' summed gradients, clipped to --max-grad-norm; skipped if
    the loss or a gradient is non-finite. Returns the grad norm and whether it was skipped."""
    for p in params:
        dist.sum(p.grad)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    # every process takes the same decision, or their weights would part ways
    bad_loss = dist.sum(torch.tensor(0 if math.isfinite(pass_loss) else 1))
    skipped = not (torch.isfinite(grad_norm) and bad_loss == 0)
    if not skipped:
        optimizer.step()
        state.bad_steps = 0
    else:  # a non-finite loss or gradient never reaches the weights
        state.bad_steps += 1
        if state.bad_steps >= cfg.max_bad_steps:
            raise InputError(f"aborting: {state.bad_steps} non-finite losses/gradients in a "
                             f"row at step {state.step}")
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), skipped


def over_processes(metrics: dict, update: dict, dist: Dist) -> dict:
    """The step's metrics over processes: update terms summed (batch-weighted), rollout averaged."""
    names = sorted(update)
    totals = dist.sum(torch.tensor([update[k] for k in names], dtype=torch.float64))
    stats = sorted(k for k in metrics if k.startswith(("reward/", "perf/completion")))
    means = dist.sum(torch.tensor([metrics[k] for k in stats], dtype=torch.float64)) / dist.world
    return metrics | dict(zip(names, totals.tolist())) | dict(zip(stats, means.tolist()))


# ------------------------------------------------------------------- the training loop ----


def setup_training(cfg: Config, policy, dist: Dist):
    """What trains (projector and LM, or LoRA; --train-encoder adds the encoder), AdamW, the
    schedule, and pi_ref (None when beta = 0)."""
    encoder = family(policy.config).encoder_prefix
    # what the class itself freezes (Qwen2-Audio's sinusoidal positions) stays frozen under
    # --train-encoder: from_pretrained forgets which those are, a meta-device build knows
    fixed = set()
    if cfg.train_encoder:
        with torch.device("meta"):
            skeleton = type(policy)(policy.config)
        fixed = {n for n, p in skeleton.named_parameters() if not p.requires_grad}
    for name, p in policy.named_parameters():
        p.requires_grad_((cfg.train_encoder or not name.startswith(encoder)) and name not in fixed)
    if cfg.lora:  # the LM frozen, a rank-R path on its --lora-targets (see the LoRA section)
        add_lora(policy, cfg)                               # (Part II)
    # what trains keeps fp32 weights, buffers and AdamW state (under --lora --bf16 the frozen
    # rest stays bf16)
    for module in policy.modules():
        trained = [p for p in module.parameters(recurse=False) if p.requires_grad]
        for p in trained:
            p.data = p.data.float()
        if trained:
            module._buffers.update({k: b.float() for k, b in module._buffers.items()
                                    if b is not None and b.is_floating_point()})
    ref_model = frozen_reference(policy, cfg) if cfg.grpo and cfg.beta != 0 else None
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(0.9, 0.99))
    if dist.main:  # the trainable share, and AdamW's two moments per trained number
        n, total = sum(p.numel() for p in params), sum(p.numel() for p in policy.parameters())
        adam = 2 * sum(p.numel() * p.element_size() for p in params)
        print(f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.2f}%); "
              f"AdamW state {adam / 2**20:.2f} MB")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.max_steps))
    if cfg.compile:  # Part II (memory): with --grad-checkpointing, each layer is compiled instead
        compile_lm(policy, whole=not cfg.grad_checkpointing)
    policy.eval()  # dropout off and BatchNorm frozen, so the on-policy ratio is exactly 1
    return params, optimizer, scheduler, ref_model


def frozen_reference(model, cfg: Config):
    """pi_ref: a frozen deep copy of the start policy, in bf16 under --bf16 as autocast rounds
    the policy's. With LoRA the LM never changes, so Part II's lora_reference shares it."""
    if cfg.lora:
        return lora_reference(model)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.bf16:
        ref.to(torch.bfloat16)
        # RoPE's frequencies stay fp32: rounded to bf16 they shift the angle of every position
        rope = model.model.language_model.rotary_emb
        ref.model.language_model.rotary_emb = copy.deepcopy(rope)
    return ref


def lr_lambda(cfg: Config, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warm = max(1, int(cfg.warmup_ratio * total))
    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return f


@dataclass
class TrainState:
    """Where a run is, besides its weights and optimizer: what checkpoint/ stores and resumes."""
    step: int = 0
    bad_steps: int = 0          # non-finite updates in a row
    best_dev: float = -1.0      # best dev BLEU so far (best/ holds its weights)


def train(cfg: Config, policy, tokenizer, splits: dict[str, SpeechData], out: Path, autocast,
          device, dist: Dist | None = None) -> Path:
    """SFT or (MP-)GRPO for cfg.max_steps, evaluating on dev every cfg.eval_every steps.
    Returns best/, the best-on-dev weights, which results.json reports."""
    dist = dist or Dist()
    B = cfg.batch_size if cfg.grpo else cfg.sft_batch_size         # prompts a step
    B_local = B // dist.world                                       # this process's share
    params, optimizer, scheduler, ref_model = setup_training(cfg, policy, dist)
    audio_id = policy.config.audio_token_id
    suppress = suppressed_ids(tokenizer, policy.config)
    system = system_turn(tokenizer, cfg.system_prompt, policy.config)
    state = restore(cfg, policy, optimizer, scheduler, out, dist)   # Part II (checkpoints)
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.mode, disable=not dist.main)
    log = functools.partial(dist.on_main, Logger(out / "metrics.jsonl", bar))   # Part II
    # SIGINT / SIGTERM ask the loop to finish its step, checkpoint and exit (Part II)
    stop = threading.Event()
    restore_signals = handle_signals(lambda signum, frame: stop.set())
    # the policy's layers recompute in the backward until the loop ends (Part II: memory)
    unwrap_layers = checkpoint_layers(policy, cfg.compile) if cfg.grad_checkpointing else None
    try:
        if state.step == 0:  # the start model is a candidate too: best-on-dev may be step 0
            log(0, evaluate_and_keep_best(cfg, policy, tokenizer, splits["dev"], autocast, state,
                                          out, dist))
        while state.step < cfg.max_steps and not dist.sum(torch.tensor(float(stop.is_set()))):
            t_step = clock(device)
            first = dist.rank * B_local
            idx = splits["train"].batch_indices(cfg.seed, state.step, B)[first:first + B_local]
            batch = collate(splits["train"], idx, tokenizer, audio_id, system=system,
                            config=policy.config).to(device)
            # a frozen encoder is pi_ref's too: one pass serves sampling, pi_ref and the update
            encoded = None
            if not cfg.train_encoder:
                with autocast():
                    encoded = encoder_states(policy, batch)                    # (B, F, H)
            step_rollout, metrics = rollout(cfg, policy, ref_model, tokenizer, batch, state.step,
                                            list(range(first, first + B_local)), suppress,
                                            autocast, encoded)
            t0 = clock(device)
            update, grad_norm = policy_update(cfg, policy, params, optimizer, batch, step_rollout,
                                              B, state, autocast, dist, encoded)
            metrics = over_processes(metrics, update, dist)
            if not cfg.grpo:
                metrics["loss/sft"] = metrics.pop("loss/total")
            metrics.update({"perf/update_s": clock(device) - t0, "perf/grad_norm": grad_norm,
                            "lr": scheduler.get_last_lr()[0],
                            "perf/step_s": clock(device) - t_step})
            scheduler.step()
            state.step += 1
            saves = state.step % cfg.eval_every == 0 or state.step == cfg.max_steps
            if saves:
                metrics.update(evaluate_and_keep_best(cfg, policy, tokenizer, splits["dev"],
                                                      autocast, state, out, dist))
            # the line before checkpoint/: resuming trims a line past the checkpoint, but could
            # not restore a step the checkpoint holds and the log lacks
            log(state.step, metrics)
            if saves:   # Part II (checkpoints)
                save_checkpoint(policy, tokenizer, optimizer, scheduler, state, out, dist)
    finally:
        bar.close()
        restore_signals()
        if unwrap_layers is not None:
            unwrap_layers()
    if state.step < cfg.max_steps:  # a process was asked to stop
        save_checkpoint(policy, tokenizer, optimizer, scheduler, state, out, dist)
        dist.print(f"stopped at step {state.step}; checkpoint in {out / 'checkpoint'} "
                   "(continue with --resume)")
        raise SystemExit(130)
    dist.on_main(save_model, policy, tokenizer, out / "final")   # Part II (checkpoints)
    return out / "best"


def evaluate_and_keep_best(cfg: Config, policy, tokenizer, dev: SpeechData, autocast,
                           state: TrainState, out: Path, dist: Dist) -> dict:
    """Dev BLEU under --eval-decoding; a new best goes to best/ (what the paper reports)."""
    scores, _ = evaluate(policy, tokenizer, dev, cfg, cfg.dev_limit, autocast, "dev", dist)
    if scores["bleu"] > state.best_dev:
        state.best_dev = scores["bleu"]
        dist.on_main(save_model, policy, tokenizer, out / "best")
    return {f"eval/dev_{k}": v for k, v in scores.items() if k not in ("n", "signature")} | \
        {"eval/best_dev_bleu": state.best_dev}


# -------------------------------------------------------------------------- evaluation ----


def word_errors(hyp: str, ref: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): Levenshtein over words."""
    h, r = hyp.split(), ref.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, start=1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1], len(r)


# ROUGE as Google's rouge-score package computes it with its defaults (no stemmer), which is what
# the field's `evaluate` rouge calls: the paper reports ROUGE-1, ROUGE-2 and ROUGE-L F-measures.
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer: lowercase, every run outside [a-z0-9] becomes a space. It keeps
    ASCII letters and digits only, so German "Mädchen" is two tokens, "m" and "dchen"."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge(hyp: str, ref: str) -> dict[str, float]:
    """F-measures in [0, 1]: ROUGE-N from clipped n-gram counts, ROUGE-L from the longest common
    subsequence; F = 2PR / (P + R), 0 when nothing matches (an empty side included)."""
    h, r = rouge_tokens(hyp), rouge_tokens(ref)

    def f_measure(overlap: int, n_hyp: int, n_ref: int) -> float:
        precision, recall = overlap / max(n_hyp, 1), overlap / max(n_ref, 1)
        return 2 * precision * recall / (precision + recall) if overlap else 0.0
    scores = {}
    for n in (1, 2):
        h_grams, r_grams = (Counter(zip(*(t[k:] for k in range(n)))) for t in (h, r))
        overlap = sum((h_grams & r_grams).values())       # & keeps the smaller count: clipping
        scores[f"rouge{n}"] = f_measure(overlap, sum(h_grams.values()), sum(r_grams.values()))
    row = [0] * (len(h) + 1)        # LCS lengths of r[:i] against each prefix of h, row by row
    for rw in r:
        prev = 0
        for j, hw in enumerate(h, start=1):
            prev, row[j] = row[j], prev + 1 if rw == hw else max(row[j], row[j - 1])
    scores["rougeL"] = f_measure(row[-1], len(h), len(r))
    return scores


@torch.no_grad()
def evaluate(model, tokenizer, data: SpeechData, cfg: Config, limit: int, autocast,
             desc: str = "eval", dist: Dist | None = None,
             decoding: str | None = None) -> tuple[dict, list[dict]]:
    """Decode the first `limit` utterances greedy, with the paper's sampling (T 0.9, top-p 0.9,
    seeded per utterance) or by beam search, and score them; under torchrun each process decodes
    every world-th utterance."""
    dist = dist or Dist()
    model.eval()
    idx = list(range(len(data) if limit <= 0 else min(limit, len(data))))[dist.rank::dist.world]
    idx.sort(key=data.num_samples)             # similar lengths batch well; no audio decoded for it
    audio_id = model.config.audio_token_id
    eos_id = family(model.config).stop_id(model.config)
    suppress = suppressed_ids(tokenizer, model.config)
    decoding = decoding or cfg.eval_decoding
    greedy = decoding == "greedy"
    system = system_turn(tokenizer, cfg.system_prompt, model.config)
    hyps: dict[int, str] = {}
    batches = [idx[k:k + cfg.eval_batch_size] for k in range(0, len(idx), cfg.eval_batch_size)]
    for b_idx in tqdm(batches, desc=desc, leave=False, disable=None if dist.main else True):
        batch = collate(data, b_idx, tokenizer, audio_id, system=system,
                        config=model.config).to(model.device)
        with autocast():
            if decoding == "beam":   # Part II
                completions = beam_search(model, batch, num_beams=cfg.num_beams,
                                          max_new_tokens=cfg.max_new_tokens,
                                          eos_id=eos_id, suppress=suppress)
            else:
                completions = sample_groups(
                    model, batch, 1, max_new_tokens=cfg.max_new_tokens,
                    eos_id=eos_id, pad_id=tokenizer.pad_token_id,
                    temperature=0.0 if greedy else 0.9, top_p=1.0 if greedy else 0.9,
                    suppress=suppress, uniforms=None if greedy else
                    row_uniforms(cfg.seed, -1, b_idx, 1, cfg.max_new_tokens)).token_lists()
        hyps.update(zip(b_idx, decode(tokenizer, completions)))
    hyps = dict(dist.gather(list(hyps.items())))
    rows = [{"id": data.rows[i]["id"], "hyp": hyps[i], "ref": data.rows[i]["target"]}
            for i in sorted(hyps)]
    # corpus BLEU and chrF (sacrebleu, 0-100); ROUGE, the mean of sentence F-measures x 100 as
    # `evaluate` reports it (not a corpus score); and WER (%) for asr
    H, R = [r["hyp"] for r in rows], [r["ref"] for r in rows]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    rouges = [rouge(h, r) for h, r in zip(H, R)]
    scores = {"bleu": round(bleu.corpus_score(H, [R]).score, 2),
              "chrf": round(chrf.corpus_score(H, [R]).score, 2),
              **{k: round(100 * sum(s[k] for s in rouges) / max(len(H), 1), 2) for k in ROUGE_KEYS},
              "n": len(H), "signature": f"{bleu.get_signature()} | {chrf.get_signature()}"}
    if cfg.task == "asr":
        errs, words = map(sum, zip(*(word_errors(h, r) for h, r in zip(H, R))))
        scores["wer"] = round(100 * errs / max(words, 1), 2)
    return scores, rows


# =========================================================================================
# === Part II: the machinery (Qwen2-Audio, LoRA, released checkpoints, data, processes, faults, CLI)
# =========================================================================================


# -------------------------------------------------------- a second family: Qwen2-Audio ----
# Qwen2-Audio (`--model Qwen/Qwen2-Audio-7B-Instruct`) runs the same Part I through its Family.
# It hears Whisper's features: 128 Slaney-scale mel bands every 10 ms, each clip padded with
# silence to 30 s (3000 frames). The encoder halves the frames twice (a stride-2 convolution, then
# average pooling): 25 LM embeddings a second. A third family is one more section like this one
# and a FAMILIES entry; Qwen2.5-Omni's thinker would also need M-RoPE positions, a hook there.
WHISPER_SAMPLES = 30 * SAMPLE_RATE                  # every clip is cut or padded to 30 s


@functools.cache
def whisper_mel_filters() -> torch.Tensor:
    """(201, 128) Slaney mel filters with Slaney area normalisation, 0-8 kHz: transformers'
    mel_filter_bank builds exactly WhisperFeatureExtractor's, so it is used, not rewritten."""
    return torch.from_numpy(mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")).float()


def whisper_log_mel(wave: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Qwen2-Audio features of one utterance, (128, 3000), and its real frames l: exactly
    WhisperFeatureExtractor's, the clip zero-padded to 30 s before the log10 is floored at its
    max - 8 (the silence counts, so a clip's features depend on the clip alone)."""
    wave = wave[:WHISPER_SAMPLES]
    x = F.pad(wave, (0, WHISPER_SAMPLES - wave.numel()))                     # (480000,)
    spec = torch.stft(x, n_fft=400, hop_length=160, window=torch.hann_window(400),
                      return_complex=True)[:, :-1].abs() ** 2                  # (201, 3000)
    logmel = (whisper_mel_filters().T @ spec).clamp(min=1e-10).log10()         # (128, 3000)
    logmel = (torch.maximum(logmel, logmel.max() - 8.0) + 4.0) / 4.0
    return logmel, math.ceil(wave.numel() / 160)    # the feature mask's sum: frames with audio


def whisper_encoder_frames(frames: int) -> int:
    """Encoder positions that hold audio after the stride-2 convolution, of l real frames."""
    return (frames - 1) // 2 + 1


def whisper_audio_tokens(frames: int) -> int:
    """<|AUDIO|> embeddings Qwen2-Audio makes from l real frames (Qwen2AudioProcessor's count)."""
    return (whisper_encoder_frames(frames) - 2) // 2 + 1    # the stride-2 average pooling


class Qwen2Audio(Family):
    """Qwen2-Audio (Qwen2AudioForConditionalGeneration): a Whisper-large encoder on 30 s of
    log-mel, one Linear projector, a Qwen2 LM; no adapter, no logits scaling."""
    name = "Qwen2-Audio"
    model_class = "Qwen2AudioForConditionalGeneration"
    encoder_prefix = "model.audio_tower."
    # no released adapter: every Linear of the LM's layers (ms-swift's all-linear default)
    lora_targets = "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
    card_system = None                       # the template writes its own default system turn
    max_seconds = WHISPER_SAMPLES / SAMPLE_RATE   # 30: longer clips would be cut, not heard
    released_adapter = False

    def tokenizer(self, path: Path):
        """With the processor's chat template where the checkpoint has it (chat_template.json):
        the tokenizer's own, if any, is a text-only ChatML that does not place the audio."""
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (template := Path(path) / "chat_template.json").is_file():
            try:
                tokenizer.chat_template = json.loads(template.read_text())["chat_template"]
            except (ValueError, TypeError, KeyError):   # not JSON, not an object, no key
                raise InputError(f"{template}: not a JSON object with a \"chat_template\" "
                                 "string") from None
        return tokenizer

    def features(self, wave: torch.Tensor, config) -> tuple[torch.Tensor, int, int]:
        """(128, 3000) Whisper features, the real frames l, and 25 audio embeddings a second."""
        feats, frames = whisper_log_mel(wave)
        return feats, frames, whisper_audio_tokens(frames)

    def user_turn(self, text: str) -> list[dict]:
        """The audio, then the instruction without its <|audio|>: the template writes
        'Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>' before the text, as the model card."""
        # the template asks for an 'audio' (or 'audio_url') key; it never reads its value
        return [{"type": "audio", "audio": "clip"},
                {"type": "text", "text": " ".join(text.replace(AUDIO_TOKEN, " ").split())}]

    def encode(self, model, feats: torch.Tensor, frames: int) -> torch.Tensor:
        """(1, 750, H): the encoder on all 3000 frames (it refuses fewer), its attention kept
        off the padding after the stride-2 convolution, as Qwen2AudioModel builds the mask."""
        from transformers.masking_utils import create_bidirectional_mask
        tower = model.model.audio_tower
        positions = feats.shape[-1] // 2                                        # 1500
        keep = torch.arange(positions, device=feats.device) < whisper_encoder_frames(frames)
        like = tower.conv1.weight.new_zeros(1, positions, 1)        # the mask's dtype and size
        mask = create_bidirectional_mask(config=tower.config, attention_mask=keep[None].long(),
                                         inputs_embeds=like)
        return tower(feats[None], attention_mask=mask).last_hidden_state

    def project(self, model, states: torch.Tensor, frames: int) -> torch.Tensor:
        """(1, A, D): the first A = whisper_audio_tokens(l) states, projected."""
        return model.model.multi_modal_projector(states[:, :whisper_audio_tokens(frames)])

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """The head alone: Qwen has no logits scaling (its head is untied from the embeddings)."""
        return model.lm_head(hidden)

    def processor_config(self, config) -> dict:
        """processor_config.json as Qwen2AudioProcessor.save_pretrained writes it (5.x)."""
        from transformers import WhisperFeatureExtractor
        whisper = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
        return {"audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                "audio_token": "<|AUDIO|>", "feature_extractor": whisper.to_dict(),
                "processor_class": "Qwen2AudioProcessor"}


FAMILIES: dict[str, Family] = {"granite_speech": GraniteSpeech(), "qwen2_audio": Qwen2Audio()}


# -------------------------------------------------------------------------------- LoRA ----
# Full training of the 8B needs ~20 bytes a parameter (weights, gradients, AdamW, pi_ref). With
# `--lora R` each targeted Linear W learns a rank-R update, W x + (alpha / R) B A x (Hu et al.
# 2021), as IBM trained the released adapter; the projector still trains in full. Gradients and
# AdamW exist only for A, B and the projector, and pi_ref is the same LM with LoRA off.


class LoRALinear(torch.nn.Module):
    """A frozen Linear W plus a trainable rank-r path: y = W x + b + (alpha / r) B (A x). B
    starts at zero, so the layer starts as exactly W; the state dict keeps W's own keys."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, generator=None):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device     # A and B in fp32 whatever W is stored in
        self.lora_A = torch.nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, r, device=device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.enabled = True                     # off: the layer is W alone (the reference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)           # what nn.Linear computes, bit for bit
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)   # B (A x): r wide


def lora_sites(model, targets: str) -> list[tuple[torch.nn.Module, str]]:
    """(parent, attribute) of every Linear named in `targets` inside the LM's decoder layers
    (auto: the family's)."""
    targets = family(model.config).lora_targets if targets == "auto" else targets
    names = [t.strip() for t in targets.split(",") if t.strip()]
    sites, found = [], set()
    for layer in model.model.language_model.layers:
        for parent in layer.modules():
            for attr, child in parent.named_children():
                if isinstance(child, (torch.nn.Linear, LoRALinear)):
                    found.add(attr)
                    if attr in names:
                        sites.append((parent, attr))
    unknown = [n for n in names if n not in found]
    if unknown or not names:
        raise InputError(f"--lora-targets {targets!r}: {', '.join(unknown) or 'empty'} is not a "
                         f"Linear of the LM's decoder layers in {model.name_or_path} "
                         f"({', '.join(sorted(found))})")
    return sites


def add_lora(model, cfg: Config) -> None:
    """Wrap the --lora-targets Linears of the LM in LoRALinear and freeze the rest of the LM.
    A's draws come from their own generator, so adding LoRA moves no other random draw."""
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)   # frozen with the LM (Granite's is tied to the embeddings)
    generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    for parent, attr in lora_sites(model, cfg.lora_targets):
        base = getattr(parent, attr)
        setattr(parent, attr, LoRALinear(base, cfg.lora, cfg.lora_alpha, generator))


def lora_layers(model) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_reference(model):
    """pi_ref under LoRA, exactly the start model: every frozen tensor shared (deepcopy's memo),
    what trains in full (the projector) copied, and the LoRA paths off."""
    lora = {id(t) for _, m in lora_layers(model) for t in (m.lora_A, m.lora_B)}
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]
              if id(t) in lora or not t.requires_grad}
    ref = copy.deepcopy(model, memo=shared).eval()
    for _, m in lora_layers(ref):
        m.enabled = False
    for p in ref.parameters():
        if id(p) not in shared:
            p.requires_grad_(False)     # the copied projector; the shared LoRA tensors still train
    return ref


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """A plain checkpoint: each LoRA layer's W + (alpha / r) B A under W's key, in new tensors
    (merging into the live W and subtracting later would not give W back in float)."""
    state = model.state_dict()
    for name, m in lora_layers(model):
        W = m.weight.float() + m.scale * (m.lora_B @ m.lora_A)
        state[f"{name}.weight"] = W.to(m.weight.dtype).cpu()   # stored as W is
        del state[f"{name}.lora_A"], state[f"{name}.lora_B"]
    return state


# ---------------------------------------------------------------- released checkpoints ----


def model_files(name: str):
    """(directory, config, weights) of a checkpoint of a known family: a local directory, or a
    hub id's files from the cache or (HF_HUB_OFFLINE=0) the hub. Refused in one line: no
    directory, another model_type, an adapter that config.json does not announce or one we
    cannot merge (before any weight is read), no weights."""
    from transformers import AutoConfig
    from safetensors.torch import load_file
    path = Path(name)
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            raise InputError(f"{path}: not a model directory (no config.json)")
        unknown_family(path, json.loads(config.read_text()).get("model_type"))
    elif name.startswith((".", "/")) or name.count("/") != 1:
        raise InputError(f"{name}: model directory not found")
    try:
        if not path.exists():
            from huggingface_hub import snapshot_download
            files = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
            path = Path(snapshot_download(name, allow_patterns=files))
        config = AutoConfig.from_pretrained(path)
        unknown_family(path, config.model_type)
        adapter = path / "adapter_config.json"
        if adapter.is_file() and not family(config).released_adapter:
            raise InputError(f"{path}: holds a peft adapter (adapter_config.json); "
                             f"{family(config).name} loads merged weights only: merge it first "
                             "(peft's merge_and_unload, then save_pretrained)")
        announced = getattr(config, "has_lora_adapter", False)     # Granite's field
        if announced != adapter.is_file():
            has, state = ("true", "missing") if announced else ("false", "there")
            raise InputError(f"{path}: has_lora_adapter is {has} in config.json but "
                             f"adapter_config.json is {state}")
        if adapter.is_file():
            adapter_scale(path)
        if announced:
            config.has_lora_adapter = False   # merged at load: what is loaded and saved is plain
        if config.text_config.eos_token_id is None:   # Qwen2Config's default; generate reads
            config.text_config.eos_token_id = generation_eos(path)  # generation_config's
        index = path / "model.safetensors.index.json"
        shards = (sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
                  if index.is_file() else
                  sorted(f for f in path.glob("*.safetensors")
                         if not f.name.startswith("adapter_")))
        if not shards:
            raise InputError(f"{path}: no *.safetensors weights")
        return path, config, {k: v for f in shards for k, v in load_file(f).items()}
    except OSError as e:
        raise cannot_load(name, e) from None


def generation_eos(path: Path) -> int:
    """The stop token of a checkpoint whose config.json's LM has none: generation_config.json's
    eos_token_id (the first of a list), else refused: a completion could never end."""
    file = path / "generation_config.json"
    try:
        eos = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    except (OSError, ValueError, AttributeError):   # unreadable, not JSON, not an object
        eos = None
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise InputError(f"{file}: no eos_token_id (and none in config.json's text_config): "
                         "no token would end a completion")
    return eos


def unknown_family(path: Path, model_type) -> None:
    if model_type not in FAMILIES:
        known = ", ".join(f"{fam.name} ({key!r})" for key, fam in FAMILIES.items())
        raise InputError(f"{path}: model_type is {model_type!r}; supported: {known}")


def cannot_load(name: str, e: OSError) -> InputError:
    hint = " (hub ids need HF_HUB_OFFLINE=0 and a network)" if not Path(name).exists() else ""
    return InputError(f"{name}: cannot load model{hint}: {str(e).splitlines()[0][:160]}")


def check_loaded(model, tokenizer, info: dict, name: str, path: Path) -> None:
    """Refuse what transformers only logs (a missing weight filled with random values), merge the
    adapter, and check that the tokenizer fits the vocabulary and that its chat template places
    the audio token once in a user turn (else every manifest line would seem at fault)."""
    bad = ([f"missing {k}" for k in info["missing_keys"]]
           + [f"unexpected {k}" for k in info["unexpected_keys"]])
    if bad:
        raise InputError(f"{path}: weights do not match config.json ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''})")
    if (path / "adapter_config.json").is_file():
        merge_lora_adapter(model, path)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise InputError(f"{name}: tokenizer has {len(tokenizer)} tokens, the model's vocabulary "
                         f"{model.config.text_config.vocab_size}")
    audio_id = model.config.audio_token_id
    turn = [{"role": "user", "content": family(model.config).user_turn(f"{AUDIO_TOKEN} hi")}]
    try:
        chat = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        found = tokenizer(chat, add_special_tokens=False).input_ids.count(audio_id)
        why = f"it writes it {found} times: a text-only template?"
    except Exception as e:  # no template (ValueError), or one that fails on an audio part
        found, why = 0, str(e).splitlines()[0][:100] if tokenizer.chat_template else "it has none"
    if found != 1:
        raise InputError(f"{path}: the chat template does not place the audio token "
                         f"{tokenizer.convert_ids_to_tokens(audio_id)} once in a user turn ({why})")


def adapter_scale(path: Path) -> tuple[int, float]:
    """The rank r and scale of the peft LoRA adapter in `path`: lora_alpha / r (/ sqrt(r) with
    use_rslora). Plain LoRA only: DoRA, biases, fan_in_fan_out and per-layer ranks are refused."""
    cfg_file = path / "adapter_config.json"
    if not (path / "adapter_model.safetensors").is_file():
        raise InputError(f"{path / 'adapter_model.safetensors'}: missing (adapter_config.json "
                         "names an adapter)")
    try:
        acfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{cfg_file}: not readable JSON ({e})") from None
    plain = {"peft_type": "LORA", "use_dora": False, "bias": "none", "fan_in_fan_out": False,
             "rank_pattern": {}, "alpha_pattern": {}}
    bad = [k for k, v in plain.items() if (acfg.get(k) or v) != v]
    if bad:
        raise InputError(f"{cfg_file}: unsupported adapter setting {bad[0]}={acfg.get(bad[0])!r} "
                         "(only plain LoRA merges exactly)")
    if not {"r", "lora_alpha"} <= set(acfg):
        raise InputError(f"{cfg_file}: needs r and lora_alpha")
    r, alpha = acfg["r"], acfg["lora_alpha"]
    return r, alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r


# Module names in the two layouts: release-era checkpoints (and their adapters) name the LM
# `language_model.model.layers...`; transformers 5 modules are `model.language_model.layers...`.
RELEASE_NAMES = (("language_model.model.", "model.language_model."),
                 ("language_model.lm_head", "lm_head"),
                 ("encoder.", "model.encoder."), ("projector.", "model.projector."))


@torch.no_grad()
def merge_lora_adapter(model, path: str | Path) -> list[str]:
    """W += scale * B @ A for the peft LoRA adapter in `path`; returns the merged modules. Exact:
    the released adapter is for audio turns, and every prompt here carries audio."""
    from safetensors.torch import load_file
    path = Path(path)
    r, scale = adapter_scale(path)
    weights_file = path / "adapter_model.safetensors"
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_file).items():
        # base_model.model.<module>.lora_A.weight (peft in memory: lora_A.default.weight)
        stem, _, tail = key.removeprefix("base_model.model.").partition(".lora_")
        part = tail.split(".")[0]
        name = next((new + stem.removeprefix(old) for old, new in RELEASE_NAMES
                     if stem.startswith(old)), stem)
        linear = isinstance(modules.get(name), torch.nn.Linear)
        if part not in ("A", "B") or not tail.endswith("weight") or not linear:
            raise InputError(f"{weights_file}: adapter tensor {key} matches no weight of the model")
        pairs.setdefault(name, {})[part] = tensor
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    for name, ab in pairs.items():
        layer = modules[name]
        shapes = {"A": (r, layer.in_features), "B": (layer.out_features, r)}
        if any(k not in ab or tuple(ab[k].shape) != v for k, v in shapes.items()):
            raise InputError(f"{weights_file}: {name}: needs lora_A {shapes['A']} "
                             f"and lora_B {shapes['B']}")
        if tied and layer is model.lm_head:
            raise InputError(f"{weights_file}: {name}: a LoRA on the tied LM head "
                             "would change the embeddings too")
        W = layer.weight
        delta = scale * ab["B"].double() @ ab["A"].double()     # (out, in), merged in fp64
        W.copy_((W.double() + delta.to(W.device)).to(W.dtype))
    return sorted(pairs)


# ------------------------------------------------------- data layouts and input checks ----


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def check_audio_files(rows: list[dict], source: Path,
                      max_seconds: float = float("inf")) -> list[dict]:
    """Fail fast on an empty manifest and on missing, unreadable, empty, too long or non-finite
    audio; note each row's length at 16 kHz from the header (evaluation orders by it)."""
    if not rows:
        raise InputError(f"{source}: manifest is empty")
    converted = 0
    for row in rows:
        audio, where = Path(row["audio"]), f"listed in {source}:{row.get('line', '')}".rstrip(":")
        if not audio.is_file():
            raise InputError(f"{audio}: audio file not found ({where})")
        try:
            info = sf.info(str(audio))
        except Exception:
            raise InputError(f"{audio}: not a readable audio file ({where})") from None
        if info.frames == 0:
            raise InputError(f"{audio}: audio file has 0 samples ({where})")
        if info.duration < 0.025:
            raise InputError(f"{audio}: {info.frames} samples is shorter than one 25 ms analysis "
                             f"window ({where})")
        if info.duration > max_seconds:
            raise InputError(f"{audio}: {info.duration:.1f} s is longer than "
                             f"--max-audio-seconds {max_seconds} ({where})")
        if info.subtype in ("FLOAT", "DOUBLE"):   # only float samples can be NaN or infinite
            load_audio(audio, where=where)
        converted += info.samplerate != SAMPLE_RATE or info.channels != 1
        # exactly resample()'s output length, ceil(16000 * frames / sr), in integers
        row["num_samples"] = -(-SAMPLE_RATE * info.frames // info.samplerate)
    if converted:
        print(f"note: {converted} audio files in {source} are not 16 kHz mono; they are "
              "resampled / down-mixed on load", file=sys.stderr)
    return rows


def read_covost2(tsv: Path, task: str, max_seconds: float = float("inf")) -> list[dict]:
    """CoVoST2 en-de TSV (columns path, sentence, translation, client_id), clips in <dir>/clips/."""
    import csv
    with io.StringIO(read_text(tsv), newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        need = {"path", "sentence", "translation"}
        if not need <= set(reader.fieldnames or ()):
            raise InputError(f"{tsv}: CoVoST2 TSV needs columns {sorted(need)}, "
                             f"has {reader.fieldnames}")
        rows = [{"id": r["path"], "audio": str(tsv.parent / "clips" / r["path"]), "task": task,
                 "text": PROMPTS[task],
                 "target": r["translation"] if task == "ast" else r["sentence"]}
                for r in reader]
    return check_audio_files(rows, tsv, max_seconds)


def read_librisqa(path: Path, max_seconds: float = float("inf")) -> list[dict]:
    """LibriSQA part I JSON: a list of {speech_path, question, answer, text, duration}."""
    try:
        items = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg})") from None
    rows = []
    for n, it in enumerate(items):
        if not all(k in it for k in ("speech_path", "question", "answer")):
            raise InputError(f"{path}: item {n} lacks speech_path, question or answer")
        rows.append({"id": str(it["speech_path"]), "audio": str(path.parent / it["speech_path"]),
                     "task": "sqa", "text": PROMPTS["sqa"].format(question=it["question"]),
                     "target": it["answer"]})
    return check_audio_files(rows, path, max_seconds)


def check_lengths(splits: dict[str, "SpeechData"], fam: Family) -> None:
    """Refuse a clip longer than the family's encoder hears (Qwen2-Audio: 30 s, the rest would be
    cut without a word), whatever --max-audio-seconds allows."""
    for data in splits.values():
        for row in data.rows:
            if row["num_samples"] > fam.max_seconds * SAMPLE_RATE:
                raise InputError(f"{row['audio']}: {row['num_samples'] / SAMPLE_RATE:.1f} s is "
                                 f"longer than the {fam.max_seconds:g} s {fam.name} hears: "
                                 "cut it or leave it out")


def load_splits(data: str | Path, task: str, splits=("train", "dev", "test"),
                max_seconds: float = float("inf")) -> dict[str, list[dict]]:
    """The splits under --data, by layout: <split>.jsonl (ours), covost_v2.en_de.<split>.tsv
    or LibriSQA-PartI-<split>.json (no dev split: 20% of train held out, as in the paper)."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"{data}: data directory not found")
    out = {}
    for split in splits:
        jsonl, tsv = data / f"{split}.jsonl", data / f"covost_v2.en_de.{split}.tsv"
        sqa_json = data / f"LibriSQA-PartI-{'train' if split == 'dev' else split}.json"
        if jsonl.exists():
            out[split] = read_manifest(jsonl, max_seconds)
        elif tsv.exists():
            out[split] = read_covost2(tsv, task, max_seconds)
        elif sqa_json.exists():
            rows = read_librisqa(sqa_json, max_seconds)
            if split in ("train", "dev"):
                random.Random(0).shuffle(rows)
                cut = len(rows) // 5
                rows = rows[:cut] if split == "dev" else rows[cut:]
            out[split] = rows
        else:
            raise InputError(f"{data}: no {split} split ({jsonl.name}, {tsv.name} or "
                             f"{sqa_json.name})")
    return out


# --------------------------------------------------------------------------- processes ----
# `torchrun --nproc_per_node N grpo_speech.py ...`: each process takes B/N whole prompts,
# gradients are summed over processes, rank 0 writes files. Without torchrun all is a no-op.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """In place: x summed over processes."""
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x

    def gather(self, items: list) -> list:
        """Every process's list, concatenated in rank order, on every process."""
        if self.world == 1:
            return items
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def print(self, *args) -> None:
        """print() on rank 0 only: one console line, not one per process."""
        if self.main:
            print(*args)

    def on_main(self, fn, *args):
        """fn(*args) on rank 0 (its result there; None elsewhere), then every process goes on
        together; an InputError on rank 0 (a full disk) is raised on all, so none waits."""
        result, error = None, []
        if self.main:
            try:
                result = fn(*args)
            except InputError as e:
                error = [str(e)]
        if errors := self.gather(error):
            raise InputError(errors[0])
        return result


def init_distributed(cfg: Config) -> tuple[Dist, torch.device]:
    """gloo on CPU; on GPU nccl for CUDA tensors (gradients) and gloo for CPU ones (the stop flag,
    bad_loss, metrics, objects): a pure "nccl" group maps only cuda and refuses a CPU tensor.
    One GPU per process: LOCAL_RANK, or the one a launcher left visible. torchrun sets RANK."""
    device = pick_device(cfg.device)
    if "RANK" not in os.environ:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))
                              % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # the others wait while rank 0 alone writes a checkpoint (2B full: ~33 GB) or best/:
        # NCCL's default 10 minutes would abort every rank on a slow filesystem
        torch.distributed.init_process_group(
            "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(hours=2))
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


def close_distributed(ok: bool) -> None:
    """Tear the process group down on every exit (gloo's threads can abort at interpreter exit);
    after a failure, peers may never arrive: wait at most 30 s."""
    if not torch.distributed.is_initialized():
        return
    if not ok:  # torchrun SIGTERMs the rest when one rank fails: report our own exit code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if ok:
            torch.distributed.barrier()
        elif torch.distributed.get_backend() == "gloo":   # a GPU run's "cpu:gloo,cuda:nccl" group
            # has no monitored barrier (ValueError): it skips the wait, as a pure nccl group did
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    except (RuntimeError, ValueError):  # a peer timed out or has gone: nothing left to wait for
        pass
    finally:
        torch.distributed.destroy_process_group()


# -------------------------------------------------------------- checkpoints and faults ----
# Each directory is written under a temporary name and renamed into place: a run killed
# mid-save keeps the previous one. The trainer state is loaded with weights_only=True.


def cannot_write(path: Path, e: Exception, kept: bool = True) -> InputError:
    """One line for a failed write (a full disk): which file, why, whether its last copy stays."""
    why = getattr(e, "strerror", None) or str(e).rsplit(": ", 1)[-1]
    return InputError(f"{path}: cannot write it ({why})"
                      + ("; the previous one is kept" if kept else ""))


def write_json(path: Path, obj, lines: bool = False) -> None:
    """obj as JSON (a list as JSON Lines), in place at once: never half a file, even on a full
    disk (then an InputError, and the previous file stays)."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in obj) if lines
                       else json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise cannot_write(path, e, kept=path.exists()) from None


def save_model(model, tokenizer, path: Path, extra: dict | None = None) -> None:
    """A plain transformers checkpoint (LoRA merged), or with `extra` (trainer state) checkpoint/,
    which under LoRA holds only the trained tensors, unmerged, for a bit-exact resume."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if extra is not None and lora_layers(model):
            tmp.mkdir(parents=True)
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}, tmp / "trainable.safetensors")
        else:
            model.save_pretrained(tmp, safe_serialization=True,
                                  state_dict=merged_state_dict(model))
        tokenizer.save_pretrained(tmp)
        # for the model card's AutoProcessor and generate: the source's files, or our front end's
        src = Path(getattr(model, "source_dir", ""))
        for name in PROCESSOR_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if not any((src / name).is_file() for name in PROCESSOR_FILES[:2]):
            front_end = family(model.config).processor_config(model.config)
            (tmp / "processor_config.json").write_text(
                json.dumps(front_end, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            try:
                torch.save(extra, tmp / "trainer_state.pt")
            except RuntimeError:   # how torch's writer reports a failed write (a full disk)
                raise OSError(errno.EIO, "torch.save failed; is the disk full?") from None
        # written last, so its presence says every file is whole; check_checkpoint reads it
        sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
        (tmp / "complete.json").write_text(json.dumps(sizes))
    except (OSError, SafetensorError) as e:   # a full disk: the previous copy stays, no partial
        shutil.rmtree(tmp, ignore_errors=True)
        raise cannot_write(path, e) from None
    recover(path)          # publish: the old copy steps aside and goes only once the new is in
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def recover(path: Path) -> Path:
    """`path` as last published: a kill between save_model's two renames left it as .old."""
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        old.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_checkpoint(path: Path) -> None:
    """A damaged or incomplete checkpoint is refused before anything is loaded or changed."""
    try:
        sizes = json.loads((path / "complete.json").read_text())
        for name, size in sizes.items():
            if (path / name).stat().st_size != size:
                raise ValueError(f"{name} has {(path / name).stat().st_size} bytes, not {size}")
            if name.endswith(".json"):
                json.loads((path / name).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: damaged or incomplete checkpoint ({e}); start again with "
                         "--overwrite") from None


# the model card's AutoProcessor reads these (Qwen2-Audio's chat template is the processor's)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "generation_config.json",
                   "chat_template.json")


def load_checkpoint(model, path: Path) -> dict:
    """Weights into `model` (in place) and the trainer state of <out>/checkpoint."""
    if not (path / "trainer_state.pt").is_file():
        raise InputError(f"{path}: no checkpoint to resume from")
    from safetensors.torch import load_file
    if lora_layers(model):  # the trained tensors only
        saved = load_file(path / "trainable.safetensors", device=str(model.device))
        live = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if saved.keys() != live.keys() or any(saved[n].shape != p.shape for n, p in live.items()):
            raise InputError(f"{path}: trained tensors do not match --model with these --lora "
                             "settings")
        model.load_state_dict(saved, strict=False)   # copied in place; the keys checked above
    else:  # from_pretrained maps the saved (hub) names back onto the module's; then copy in place
        saved = type(model).from_pretrained(path, dtype=torch.float32)
        try:
            model.load_state_dict(saved.state_dict())
        except RuntimeError as e:
            raise InputError(f"{path}: checkpoint does not match --model "
                             f"({str(e).splitlines()[1].strip()[:120]})") from None
    # on the CPU: a GPU run's tensors would otherwise return to the device that saved them
    # (rank 0's cuda:0, for every rank); load_state_dict moves AdamW's state to its parameters.
    # Memory-mapped (torch.save's zip format allows it, copy-on-write): each process reads the
    # pages it moves, not all of it at once (2B full: 20.6 GB a process)
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)


# What a run is: --resume with another of these would mix two runs in one results.json.
RUN_IDENTITY = ("task", "mode", "model", "data", "group_size", "lora", "lora_alpha",
                "lora_targets", "bf16")    # the last three matter under --lora only


def check_resume(cfg: Config) -> None:
    """--resume needs a whole checkpoint and keeps the settings that define the run."""
    saved_file, ckpt = Path(cfg.out) / "config.json", Path(cfg.out) / "checkpoint"
    if not cfg.resume or cfg.mode == "eval":
        return
    if saved_file.is_file():
        saved, now = json.loads(saved_file.read_text()), dataclasses.asdict(cfg)
        if not saved.get("lora"):  # full training: LoRA's settings (and storage) mean nothing
            saved |= {k: now[k] for k in RUN_IDENTITY[-3:]}
        changed = [k for k in RUN_IDENTITY if saved.get(k) != now[k]]
        if changed:
            flags = lambda d: " ".join(f"--{k.replace('_', '-')} {d.get(k)}" for k in changed)
            raise InputError(f"{saved_file}: trained with {flags(saved)}; resume it with the "
                             f"same, not {flags(now)}")
    old = ckpt.with_name("checkpoint.old")  # a kill between save_model's renames; read here,
    if not ckpt.exists() and not old.exists():  # recover()ed once the run is accepted
        raise InputError(f"{ckpt}: no checkpoint to resume from; start again with --overwrite")
    check_checkpoint(ckpt if ckpt.exists() else old)


def save_checkpoint(policy, tokenizer, optimizer, scheduler, state: TrainState, out: Path,
                    dist: Dist) -> None:
    # sampling and data order are functions of (seed, step, index); any other draw resumes too.
    # Nothing draws from a CUDA generator (uniforms are drawn on the CPU), so none is saved: a
    # resume with fewer visible GPUs would have no generator to restore it to
    rng = {"torch": torch.get_rng_state()}
    dist.on_main(save_model, policy, tokenizer, out / "checkpoint",
                 {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "rng": rng, **dataclasses.asdict(state)})


def restore(cfg: Config, policy, optimizer, scheduler, out: Path, dist: Dist) -> TrainState:
    """--resume: weights, optimizer, scheduler and RNG from <out>/checkpoint."""
    ckpt = out / "checkpoint"
    if not (cfg.resume and ckpt.exists()):
        return TrainState()
    saved = load_checkpoint(policy, ckpt)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    def trim_log():   # metrics.jsonl keeps the steps the checkpoint has seen: none lost or twice
        print(f"resumed from {ckpt} at step {saved['step']}")
        log, kept = out / "metrics.jsonl", []
        for line in log.read_text().splitlines() if log.exists() else []:
            try:
                row = json.loads(line)
            except ValueError:   # a line cut by a kill
                continue
            kept += [row] if row["step"] <= saved["step"] else []
        write_json(log, kept, lines=True)
    dist.on_main(trim_log)
    return TrainState(saved["step"], saved["bad_steps"], saved["best_dev"])


class Logger:
    """One call per step: a JSON line in metrics.jsonl and the numbers on the progress bar."""
    BAR = {"reward/mean": "reward", "kl/mean": "kl", "loss/total": "loss", "loss/sft": "loss",
           "eval/dev_bleu": "dev", "eval/best_dev_bleu": "best"}

    def __init__(self, path: Path, bar):
        self.path, self.bar, self.shown = path, bar, {}

    def __call__(self, step: int, metrics: dict) -> None:
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None   # strict JSON
                  for k, v in metrics.items()}
        line = (json.dumps({"step": step, **finite}, allow_nan=False) + "\n").encode()
        try:
            with open(self.path, "ab", buffering=0) as fh:   # unbuffered: a failed write shows here
                size = fh.tell()
                try:
                    rest = memoryview(line)
                    while rest:          # a short write is retried: the retry says why it failed
                        rest = rest[fh.write(rest):]
                except OSError:   # a full disk: the torn line goes, the log stays as it was
                    fh.truncate(size)
                    raise
        except OSError as e:
            raise cannot_write(self.path, e, kept=False) from None
        self.bar.n = step  # dev BLEU stays on the bar between evaluations
        self.shown.update({name: f"{metrics[k]:.{1 if k.startswith('eval') else 3}f}"
                           for k, name in self.BAR.items() if k in metrics})
        self.bar.set_postfix(self.shown)


def prepare_out(cfg: Config):
    """The run directory, made only after every input was checked and locked for this process
    (the lock goes with it): one run per directory, --overwrite replaces runs only, and a run
    refused here leaves the directory as it was (no .lock, no directory it made)."""
    out = Path(cfg.out)
    lock_path = out / ".lock"
    made, had_lock = [d for d in (out, *out.parents) if not d.exists()], lock_path.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:   # Lustre without -o flock, some NFS: run unguarded, and say so
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"note: {out} cannot be locked ({e.strerror}): nothing stops a second run "
                  "on it", file=sys.stderr)
        if not os.path.samestat(os.fstat(lock.fileno()), lock_path.stat()):
            raise BlockingIOError   # a refused run removed the file we locked: not the lock
    except BlockingIOError:   # the pid from our own handle: the path may be gone by now
        raise InputError(f"{out}: another run is using it (pid "
                         f"{os.pread(lock.fileno(), 32, 0).decode()})") from None
    except OSError as e:
        raise InputError(f"{out}: cannot be the run directory ({e.strerror})") from None
    # what --overwrite replaces; a kill inside config.json's write leaves config.tmp: no run yet
    held = [] if cfg.resume else [p for p in out.iterdir() if p.name not in (".lock", "config.tmp")]
    try:   # checked under the lock: another run may be writing here
        if held and not cfg.overwrite:
            raise InputError(f"{out}: holds another run; pass --resume to continue it or "
                             "--overwrite to replace it")
        if held and not (out / "config.json").is_file():
            raise InputError(f"{out}: not a run directory (no config.json): --overwrite only "
                             "replaces a run")
        check_resume(cfg)
    except InputError:
        if not had_lock:
            lock_path.unlink()
        for d in made:   # deepest first
            d.rmdir()
        lock.close()
        raise
    lock.truncate(0)
    print(os.getpid(), file=lock, end="", flush=True)
    for p in held:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for name in ("checkpoint", "best", "final"):
        recover(out / name)
    return lock


# ------------------------------------------------------------------------------ memory ----


def checkpoint_layers(model, compile: bool = False):
    """--grad-checkpointing: each LM layer keeps only its input and runs again in the backward
    (transformers' own switch acts in training mode only; the policy runs in eval mode). Under
    --compile the checkpoint wraps the compiled layer: Dynamo cannot trace a checkpoint around
    transformers' layer (a side effect inside it), so a compiled LM would run its layers eager.
    Returns what unwraps the layers again."""
    layers = model.model.language_model.layers
    for layer in layers:
        forward = torch.compile(layer.forward, dynamic=True) if compile else layer.forward
        layer.forward = functools.partial(checkpointed, forward)

    def unwrap():   # the class's forward again, and no wrapper left to refer to its layer
        for layer in layers:
            del layer.forward
    return unwrap


def compile_lm(model, whole: bool = True) -> None:
    """--compile: the LM compiled in place (state_dict names stay; every caller gets it), or its
    layers only (checkpoint_layers). A code object gets a graph per grad mode, cache kind, mask
    kind (the padded prompt's (B, 1, P, K), a decode step's (N, K)), batch of 1 and, per layer,
    its index: more than Dynamo's default limit of 8, past which it runs eager without a word."""
    layers, dynamo = len(model.model.language_model.layers), torch._dynamo.config
    # the names torch 2.6 has too; later ones call them recompile_limit, accumulated_recompile_limit
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 16 * layers)
    dynamo.accumulated_cache_size_limit = max(dynamo.accumulated_cache_size_limit, 32 * layers)
    if whole:
        model.model.language_model.compile(dynamic=True)


def checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # sampling, pi_ref and pi_old: no backward, nothing to keep
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


# ------------------------------------------------------------------------- beam search ----


@torch.no_grad()
def beam_search(model, batch: Batch, *, num_beams: int, max_new_tokens: int, eos_id: int,
                suppress: torch.Tensor | None = None) -> list[list[int]]:
    """Each prompt's best completion as transformers' generate(num_beams=K) finds it
    (length_penalty 1, early_stopping False), but on lm_logits: transformers 5.24 skips
    logits_scaling, which leaves greedy alone and changes beam scores. Each step the K beams
    propose their 2K best continuations by summed log-prob; those ranked in the top K that end
    (EOS or the last allowed token) become hypotheses, scored by sum / generated length, K kept
    a prompt; the K best others run on. A prompt is done once its best running beam, so
    normalised, cannot beat its worst hypothesis."""
    B = batch.input_ids.shape[0]
    K, T = num_beams, max_new_tokens
    device = batch.input_ids.device
    cache, attn, next_pos, logits, banned = prefill(model, batch, K, T, suppress)
    V = logits.shape[-1]
    running = torch.zeros(B, K, device=device)       # summed log-probs of the live beams
    running[:, 1:] = -1e9                            # at first the K copies are one beam
    seqs = torch.zeros(B, K, T, dtype=torch.long, device=device)
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]   # best first, <= K
    done = [False] * B
    for t in range(T):
        logp = torch.log_softmax(logits, dim=-1).masked_fill(banned, -float("inf"))  # (B*K, V)
        top, idx = (logp.view(B, K, V) + running[:, :, None]).view(B, K * V).topk(2 * K)
        beam, token = idx // V, idx % V                                              # (B, 2K)
        seqs = seqs.gather(1, beam[:, :, None].expand(-1, -1, T))
        seqs[:, :, t] = token
        ends = (token == eos_id) | (t == T - 1)
        keep = (top - 1e9 * ends.float()).topk(K).indices                            # (B, K)
        # the host reads the step in one transfer (a GPU sync), not one per beam; a step where
        # beams end reads their sequences in a second
        step = torch.cat([top[:, :K] / (t + 1), ends[:, :K].float(),
                          top.gather(1, keep[:, :1]) / (t + 1)], dim=1).tolist()    # (B, 2K + 1)
        scores = [row[:K] for row in step]         # sum / generated length
        ended = [row[K:2 * K] for row in step]     # 1.0 where the beam ends
        best = [row[-1] for row in step]           # the best running beam's score
        new = [(b, r) for b in range(B) if not done[b] for r in range(K) if ended[b][r]]
        if new:
            b_new, r_new = torch.tensor(new, device=device).T
            for (b, r), seq in zip(new, seqs[b_new, r_new, :t + 1].tolist()):
                hyps[b].append((scores[b][r], seq))
            for b in {b for b, _ in new}:
                hyps[b] = sorted(hyps[b], key=lambda h: -h[0])[:K]
        running, seqs = top.gather(1, keep), seqs.gather(1, keep[:, :, None].expand(-1, -1, T))
        done = [d or (len(h) == K and best[b] <= h[-1][0])
                for b, (d, h) in enumerate(zip(done, hyps))]
        if all(done) or t == T - 1:
            break
        cache.reorder_cache((beam.gather(1, keep) + K * torch.arange(B, device=device)[:, None])
                            .flatten())
        out = model.model.language_model(input_ids=seqs[:, :, t].reshape(-1, 1),
                                         attention_mask=attn, position_ids=next_pos, cache=cache,
                                         use_cache=True)
        logits, next_pos = lm_logits(model, out.last_hidden_state[:, -1]).float(), next_pos + 1
    return [h[0][1] for h in hyps]


# ------------------------------------------------------------------------ command line ----


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # no "(default: )" where the help text says what empty means
    def _get_help_string(self, action):
        return action.help if action.default in ("", None) else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage, then exit code 2
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """argparse from the dataclass, so --help lists every field with its default and meaning."""
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    types = {"int": int, "float": float, "str": str, "float | None": float, "int | None": int}
    for f in dataclasses.fields(Config):
        kind = (dict(action=argparse.BooleanOptionalAction) if f.type == "bool" else
                dict(type=types[f.type], choices=f.metadata.get("choices")))
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default,  # help is %-formatted
                       help=f.metadata["help"].replace("%", "%%"), **kind)
    return p


def resolve_config(cfg: Config) -> Config:
    """Defaults that depend on other fields; values the objective cannot use refused now."""
    cfg = copy.copy(cfg)
    cfg.data = cfg.data or str(HERE / "data" / cfg.task)
    cfg.out = cfg.out or f"runs/{cfg.task}-{cfg.mode}"
    if not Path(cfg.model).exists() and (HERE / cfg.model).exists():
        cfg.model = str(HERE / cfg.model)
    cfg.epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.sft_batch_size is None:
        cfg.sft_batch_size = cfg.batch_size * cfg.group_size
    cfg.lora_targets = ",".join(sorted({t.strip() for t in cfg.lora_targets.split(",")} - {""}))
    checks = [  # (holds, what the user is told)
        (not cfg.grpo or cfg.group_size >= 2, f"--group-size {cfg.group_size}: a group needs "
                                              "at least 2 completions to have an advantage"),
        *[(getattr(cfg, k) >= 1, f"--{k.replace('_', '-')} {getattr(cfg, k)} must be at least 1")
          for k in ("max_steps", "num_iterations", "max_new_tokens", "eval_every", "grad_accum",
                    "eval_batch_size", "sft_batch_size", "num_beams")],
        (cfg.lora >= 0 and (not cfg.lora or cfg.lora_alpha > 0),
         f"--lora {cfg.lora} --lora-alpha {cfg.lora_alpha}: the rank must be >= 0 and alpha > 0"),
        (cfg.batch_size >= 1 and cfg.batch_size % cfg.grad_accum == 0,
         f"--batch-size {cfg.batch_size} must be a positive multiple of --grad-accum "
         f"{cfg.grad_accum}"),
        (not cfg.grpo or cfg.temperature > 0, f"--temperature {cfg.temperature}: GRPO samples its "
         "groups, and the teacher-forced log-probs divide by the temperature; use a value > 0"),
        (0 < cfg.top_p <= 1, f"--top-p {cfg.top_p} must be in (0, 1]"),
        (min(cfg.beta, cfg.epsilon, cfg.epsilon_high) >= 0,
         "--beta, --epsilon and --epsilon-high must be >= 0"),
        (cfg.threads in ("auto", "torch") or cfg.threads.isdecimal() and int(cfg.threads) >= 1,
         f"--threads {cfg.threads}: auto, torch or a number >= 1"),
    ]
    for holds, message in checks:
        if not holds:
            raise InputError(message)
    return cfg


def handle_signals(handler):
    """SIGINT and SIGTERM go to handler(signum, frame); returns what puts the old ones back."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore_signals():
        for s, h in old.items():
            signal.signal(s, h)
    return restore_signals


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(cfg: Config, model, device: torch.device) -> None:
    """CPU threads (README: Speed). A narrow LM runs many small parallel regions; with a core
    busy, each waits for a descheduled sibling thread, so it gets one. Wide layers get all."""
    if device.type != "cpu" or cfg.threads == "torch" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    narrow = model.config.text_config.hidden_size < 512
    torch.set_num_threads(int(cfg.threads) if cfg.threads.isdecimal() else 1 if narrow else cores)


def run(cfg: Config) -> dict:
    """Everything `python grpo_speech.py` does; returns results.json's contents."""
    import huggingface_hub
    from transformers.utils import logging as hf_logging
    cfg = resolve_config(cfg)
    # our progress bars only: transformers' own and its advice off (the hub's download bars stay)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    huggingface_hub.utils.enable_progress_bars()
    dist, device = init_distributed(cfg)
    if cfg.batch_size % dist.world or (cfg.mode == "sft" and cfg.sft_batch_size % dist.world):
        raise InputError(f"--batch-size {cfg.batch_size} (or --sft-batch-size) is not divisible "
                         f"by the {dist.world} processes")
    torch.manual_seed(cfg.seed)
    # every input is checked before the run directory is made
    wanted = ("test",) if cfg.mode == "eval" else ("train", "dev", "test")
    splits = {k: SpeechData(v)
              for k, v in load_splits(cfg.data, cfg.task, wanted, cfg.max_audio_seconds).items()}
    # fp32 master weights; under --lora --bf16 the frozen LM and encoder are stored in bf16
    model_dtype = torch.bfloat16 if cfg.lora and cfg.bf16 else torch.float32
    model, tokenizer = load_model(cfg.model, device, model_dtype)
    check_lengths(splits, family(model.config))       # Part II: what the encoder hears
    set_threads(cfg, model, device)
    if cfg.lora:   # the targets must exist, and config.json names them (auto: the family's)
        cfg.lora_targets = ",".join(sorted({a for _, a in lora_sites(model, cfg.lora_targets)}))
    out = Path(cfg.out)
    # one run per directory: the lock is held until run() returns and frees its file
    lock = dist.on_main(prepare_out, cfg)  # noqa: F841
    # precision is decided here, once: bf16 autocast around forwards; fp32 weights and log-probs
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16,
                                 enabled=cfg.bf16)
    dist.print(f"{cfg.task} {cfg.mode}: model {cfg.model}, data {cfg.data}, out {out}, "
               f"device {device}, processes {dist.world}")
    if (system := system_turn(tokenizer, cfg.system_prompt, model.config)) is not None:
        dist.print(f"system turn: {system!r}")
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if cfg.resume and results_file.exists() else {}
    dist.on_main(write_json, out / "config.json", dataclasses.asdict(cfg))
    score_test(model, tokenizer, splits["test"], cfg, autocast, dist, "base", results, out)
    dist.print(f"sacrebleu: {results['base']['signature']}")
    dist.print(f"start model on test: {fmt(results, 'base')}")
    if cfg.mode == "eval":
        return results
    best = train(cfg, model, tokenizer, splits, out, autocast, device, dist)
    del model  # its weights are in final/; two 8B models at once may not fit
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dev_n = len(splits["dev"]) if cfg.dev_limit <= 0 else min(cfg.dev_limit, len(splits["dev"]))
    results["selection"] = (f"best dev BLEU ({cfg.eval_decoding} decoding, {dev_n} dev "
                            f"utterances) among step 0 and every {cfg.eval_every} steps")
    best_model, _ = load_model(str(best), device, model_dtype)
    score_test(best_model, tokenizer, splits["test"], cfg, autocast, dist, "final", results, out)
    dist.print(f"best-on-dev model on test: {fmt(results, 'final')}")
    return results


def score_test(model, tokenizer, test: SpeechData, cfg: Config, autocast, dist: Dist, tag: str,
               results: dict, out: Path) -> None:
    """results[tag] (greedy), [tag_sample] (the paper's decoding) and, with --eval-decoding beam,
    [tag_beam] on the test split, each with its hypotheses file."""
    for decoding in ("greedy", "sample", "beam")[:3 if cfg.eval_decoding == "beam" else 2]:
        key = tag if decoding == "greedy" else f"{tag}_{decoding}"
        if key in results:  # --resume: scored before the interruption
            continue
        results[key], hyps = evaluate(model, tokenizer, test, cfg, cfg.eval_limit, autocast,
                                      f"test {key}", dist, decoding=decoding)
        results[key]["decoding"] = decoding
        dist.on_main(write_json, out / f"hyps_{key}.jsonl", hyps, True)   # hypotheses first
        dist.on_main(write_json, out / "results.json", results)


def fmt(results: dict, tag: str) -> str:
    """The console's line of test scores: greedy, sampled, and beam when scored."""
    names = {"bleu": "BLEU", "chrf": "CHRF", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
             "rougeL": "ROUGE-L", "wer": "WER"}
    return "; ".join(name + ", ".join(f"{names[k]} {v}" for k, v in results[key].items()
                                      if k in names)
                     for name, key in (("", tag), ("sampled: ", f"{tag}_sample"),
                                       ("beam: ", f"{tag}_beam")) if key in results)


def main(argv: list[str] | None = None) -> int:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    ok = False

    def interrupted(signum, frame):   # the training loop has its own: it finishes its step
        ckpt = Path(cfg.out or f"runs/{cfg.task}-{cfg.mode}") / "checkpoint"
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; " + (
            f"{ckpt} is kept: continue with --resume" if ckpt.exists() else "no checkpoint yet"))
    restore_signals = handle_signals(interrupted)
    try:
        run(cfg)
        ok = True
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    finally:  # normal end, InputError, SystemExit(130) after a signal, or any crash
        restore_signals()
        close_distributed(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
