"""grpo_speech.py: GRPO for speech-aware language models, in one readable file.

A speech-aware LM (SALLM) takes audio plus a text instruction and writes text. This file
fine-tunes one, Granite Speech (a conformer encoder, a window Q-Former projector and a Granite
LM, as transformers' `GraniteSpeechForConditionalGeneration`), with Group Relative Policy
Optimisation and a BLEU reward, following Elmakies et al., "Advancing Speech Understanding in
Speech-Aware Language Models with GRPO" (arXiv 2509.16990). It also holds the SFT baseline,
MP-GRPO (the reference answer as an off-policy group member), evaluation, and the recipe
that pre-trains the tiny Granite Speech shipped in data/tiny-granite-speech.

Read it top to bottom: config, audio, text, data sets, model, sampling, rewards, advantages,
losses, distributed, evaluation, checkpoints, training loops, pre-training, main.

Where this file departs from the paper (each is a flag or a stated default):
  * The default model is a ~3M-parameter Granite Speech trained by this project on espeak-ng
    speech (data/), not the 2B/8B checkpoints; `--model ibm-granite/granite-speech-3.3-2b`
    runs the same code on the real one.
  * Rollouts, GRPO log-probs and SFT run with the model in eval mode (no dropout, BatchNorm
    on running statistics): otherwise the ratio s_{i,t} is not 1 on-policy.
  * Each utterance is encoded alone (transformers' feature extractor pads a batch, and the
    conformer, which has no padding mask, hears the padding): an answer never depends on its
    batch mates, so batch size, process count and resumption leave results unchanged.
  * MP-GRPO keeps the KL term on the reference answer's tokens too.
  * The audio encoder is frozen by default (`--train-encoder` trains it); projector and LM train.
  * Defaults are sized for a 2-core CPU: 4 prompts x G=8 per step, completions of at most
    48 tokens (the paper: 200), 300 steps at lr 1e-4, dev evaluation every 30 steps with
    greedy decoding (the paper decodes with temperature 0.9, top-p 0.9: `--eval-decoding sample`).
  * Unstated in the paper and chosen here: epsilon 0.2, the k3 KL estimator, mu = 1.

First commands:
  python grpo_speech.py --task ast --mode eval          # score the shipped start model
  python grpo_speech.py --task ast --mode grpo          # GRPO with a BLEU reward, then test
  python grpo_speech.py --task ast --mode sft           # the SFT baseline
  python grpo_speech.py --help                          # every option, with its default
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# No network at run time: transformers loads from local paths unless the user opts in
# (HF_HUB_OFFLINE=0) to fetch a hub id such as ibm-granite/granite-speech-3.3-2b.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import sacrebleu
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16_000
AUDIO_TOKEN = "<|audio|>"
TASKS = ("ast", "asr", "sqa")
MODES = ("eval", "sft", "grpo", "mp-grpo", "pretrain")


class InputError(Exception):
    """Bad input found before or during a run: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- config ----


def opt(default, help, **kw):
    """A config field that carries its own --help text."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to run
    task: str = opt("ast", "ast (speech translation en->de), asr (transcription) or sqa (spoken QA)", choices=TASKS)
    mode: str = opt("grpo", "eval, sft, grpo, mp-grpo (GRPO + reference as off-policy sample) or pretrain", choices=MODES)
    model: str = opt("data/tiny-granite-speech", "local Granite Speech directory or hub id (hub needs HF_HUB_OFFLINE=0)")
    data: str = opt("", "data directory: <data>/<task>/{train,dev,test}.jsonl, a directory of jsonl splits, "
                        "a CoVoST2 TSV directory or LibriSQA JSON directory (default: data/<task>)")
    out: str = opt("", "run directory (default: runs/<task>-<mode>)")
    # the GRPO objective
    max_steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(4, "B: prompts per step (each gets a group of G completions)")
    group_size: int = opt(8, "G: completions per prompt (the paper: 8)")
    beta: float = opt(0.02, "KL coefficient (the paper: 0.02; 0 diverged there)")
    epsilon: float = opt(0.2, "lower clip range of the ratio s_{i,t}")
    epsilon_high: float | None = opt(None, "upper clip range (DAPO clip-higher); default: epsilon")
    loss_type: str = opt("dapo", "dapo: token mean over the group (the paper); grpo: per-sequence mean; "
                                 "dr_grpo: sum / (N * T)", choices=("dapo", "grpo", "dr_grpo"))
    num_iterations: int = opt(1, "mu: policy updates per rollout (old log-probs reused)")
    scale_rewards: bool = opt(True, "divide advantages by the group's std (off: Dr. GRPO)")
    reward: str = opt("bleu", "reward: bleu (the paper), chrf, or bleu+chrf (their mean)", choices=("bleu", "chrf", "bleu+chrf"))
    temperature: float = opt(1.0, "sampling temperature for rollouts (the paper: 1)")
    top_p: float = opt(1.0, "nucleus sampling for rollouts")
    max_new_tokens: int = opt(48, "longest completion in tokens (the paper: 200)")
    # optimisation
    lr: float = opt(1e-4, "peak learning rate (AdamW)")
    warmup_ratio: float = opt(0.1, "share of steps with linear warm-up; cosine decay to 10% after")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    grad_accum: int = opt(1, "split each step's prompts into this many micro-batches")
    train_encoder: bool = opt(False, "also train the audio encoder (default: projector + LM)")
    sft_batch_size: int = opt(32, "SFT: references per step (default B x G: the same sequences per update as GRPO)")
    # evaluation
    eval_every: int = opt(30, "steps between dev evaluations; the best-on-dev weights go to best/")
    eval_limit: int = opt(200, "test utterances scored for results.json (0: all)")
    dev_limit: int = opt(100, "dev utterances scored every --eval-every steps (0: all)")
    eval_decoding: str = opt("greedy", "greedy, or sample (the paper: temperature 0.9, top-p 0.9)", choices=("greedy", "sample"))
    eval_batch_size: int = opt(32, "utterances per evaluation batch")
    # machinery
    seed: int = opt(0, "seed; every random draw derives from (seed, step, index)")
    device: str = opt("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    bf16: bool = opt(False, "bf16 autocast for forward passes (log-probs stay fp32)")
    compile: bool = opt(False, "torch.compile the language model")
    resume: bool = opt(False, "continue from <out>/checkpoint")
    overwrite: bool = opt(False, "replace an existing run in --out")
    max_audio_seconds: float = opt(30.0, "reject longer audio files before training starts")
    audio_cache_mb: float = opt(1024, "MiB of decoded training audio kept in memory, least "
                                      "recently used dropped first (0: none); evaluation adds none")
    max_bad_steps: int = opt(3, "abort after this many non-finite losses in a row")
    # pre-training the tiny model (--mode pretrain)
    pretrain_steps: str = opt("300,600,400,2000", "steps of the 4 stages: char CTC, word CTC, LM on stretched text, joint")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: )" where the help text says what empty means
        return action.help if action.default in ("", None) else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage, then exit code 2
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """argparse from the dataclass, so --help lists every field with its default and meaning."""
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    for f in dataclasses.fields(Config):
        name = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        text = meta["help"].replace("%", "%%")  # argparse %-formats help texts
        if f.type in ("bool", bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            kind = {"int": int, "float": float, "str": str, "float | None": float}[f.type]
            p.add_argument(name, type=kind, default=f.default, help=text, choices=meta.get("choices"))
    return p


def resolve_config(cfg: Config) -> Config:
    """Fill the defaults that depend on other fields; paths relative to this file work from anywhere."""
    cfg = copy.copy(cfg)
    if cfg.mode == "pretrain":
        cfg.data = cfg.data or str(HERE / "data")
        cfg.out = cfg.out or str(HERE / "data" / "tiny-granite-speech")
    cfg.data = cfg.data or str(HERE / "data" / cfg.task)
    cfg.out = cfg.out or f"runs/{cfg.task}-{cfg.mode}"
    if not Path(cfg.model).exists() and (HERE / cfg.model).exists():
        cfg.model = str(HERE / cfg.model)
    if cfg.epsilon_high is None:
        cfg.epsilon_high = cfg.epsilon
    if cfg.mode in ("grpo", "mp-grpo") and cfg.group_size < 2:
        raise InputError(f"--group-size {cfg.group_size}: a group needs at least 2 completions to have an advantage")
    if cfg.batch_size < 1 or cfg.batch_size % cfg.grad_accum:
        raise InputError(f"--batch-size {cfg.batch_size} must be a positive multiple of --grad-accum {cfg.grad_accum}")
    return cfg


# ----------------------------------------------------------------------------- audio ----
# Granite Speech hears 16 kHz mono. Features are log-mel frames stacked in pairs: 160 numbers
# every 20 ms. The window Q-Former then turns every 15 frames into 3 LM embeddings (10 a second).


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int, lowpass_width: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited polyphase resampling with a Hann-windowed sinc (the algorithm torchaudio uses).

    After dividing both rates by their gcd, output phase j of every block of `new` samples is a
    dot product of the input with a sinc centred at j * orig / new, low-passed at the lower
    Nyquist frequency (times `rolloff`) so that nothing above it aliases.
    """
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
    kernel = torch.where(t == 0, 1.0, torch.sin(t * math.pi) / (t * math.pi)) * window * cutoff / orig
    x = F.pad(wave.double()[None, None], (width, width + orig))
    y = F.conv1d(x, kernel[:, None], stride=orig)             # (1, new, blocks)
    y = y[0].t().reshape(-1)[: math.ceil(new * wave.numel() / orig)]
    return y.to(wave.dtype)


def load_audio(path: str | Path, sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read a sound file as 1-D float32: channels averaged, resampled to `sampling_rate`."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types; the user needs the file name
        raise InputError(f"{path}: cannot read audio ({str(e).splitlines()[0][:120]})") from None
    if data.shape[0] == 0:
        raise InputError(f"{path}: audio file has 0 samples")
    wave = torch.from_numpy(data).mean(dim=1)                # stereo -> mono
    return resample(wave, sr, sampling_rate)


def mel_filterbank(n_freqs: int = 257, n_mels: int = 80, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular HTK-scale mel filters with no area normalisation, (n_freqs, n_mels)."""
    hz_to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    mels = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10 ** (mels / 2595.0) - 1.0)             # band edges in Hz
    freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    slopes = f_pts[None, :] - freqs[:, None]                  # (n_freqs, n_mels + 2)
    f_diff = f_pts[1:] - f_pts[:-1]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0).float()


_MEL = mel_filterbank()


def log_mel_batch(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Granite Speech features for a batch: (B, F, 160) features and (B,) audio-token counts.

    Exactly GraniteSpeechFeatureExtractor: zero-pad the waves, power spectrogram (n_fft 512,
    400-sample periodic Hann window, hop 160, reflect-padded centred frames), 80 HTK mel bands,
    log10 clamped at 1e-10, floored at (utterance max - 8), /4 + 1, an odd last frame dropped,
    frame pairs stacked. The padding is real silence to the encoder, which takes no mask.
    """
    lengths = torch.tensor([w.numel() for w in waves])
    x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)               # (B, S)
    spec = torch.stft(x, n_fft=512, hop_length=160, win_length=400, window=torch.hann_window(400),
                      center=True, pad_mode="reflect", return_complex=True).abs() ** 2   # (B, 257, frames)
    mel = (_MEL.T @ spec).transpose(1, 2)                                      # (B, frames, 80)
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


# ------------------------------------------------------------------------------ text ----
# Prompts are the task instruction in the model's chat template; the one <|audio|> in it is
# expanded to as many copies as the projector makes embeddings, which replace them in the LM.


def encode_prompt(tokenizer, text: str, n_audio: int, audio_token_id: int) -> list[int]:
    """Chat-template `text` as the user turn and expand its <|audio|> token to n_audio copies."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False).input_ids
    if ids.count(audio_token_id) != 1:
        raise InputError(f"prompt {text!r} must contain {AUDIO_TOKEN} exactly once")
    k = ids.index(audio_token_id)
    return ids[:k] + [audio_token_id] * n_audio + ids[k + 1:]


def encode_target(tokenizer, text: str) -> list[int]:
    """A reference completion: its tokens and the end-of-text token, which is an action too."""
    return tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


# ------------------------------------------------------------------------- data sets ----
# One example is {"id", "audio", "task", "text", "target"}: audio path, the instruction (or
# question) with <|audio|> in it, and the reference. Our own manifests are JSON Lines; the
# real CoVoST2 and LibriSQA layouts are read into the same dicts.

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
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        missing = [k for k in FIELDS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise InputError(f"{path}:{n}: missing or non-string field(s) {', '.join(missing)}")
        if not row["target"].strip():
            raise InputError(f"{path}:{n}: empty reference (target)")
        row["audio"] = str((path.parent / row["audio"]).resolve())
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: manifest is empty")
    return check_audio_files(rows, path, max_seconds)


def check_audio_files(rows: list[dict], source: Path, max_seconds: float = float("inf")) -> list[dict]:
    """Fail fast, before training, on audio that is missing, unreadable, empty or too long.

    Each row also gets "num_samples", its length at 16 kHz, read from the header: evaluation
    orders utterances by it without decoding (and keeping) the whole split.
    """
    converted = 0
    for row in rows:
        audio = Path(row["audio"])
        if not audio.is_file():
            raise InputError(f"{audio}: audio file not found (listed in {source})")
        try:
            info = sf.info(str(audio))
        except Exception:
            raise InputError(f"{audio}: not a readable audio file (listed in {source})") from None
        if info.frames == 0:
            raise InputError(f"{audio}: audio file has 0 samples (listed in {source})")
        if info.duration < 0.025:
            raise InputError(f"{audio}: {info.frames} samples is shorter than one 25 ms analysis window (listed in {source})")
        if info.duration > max_seconds:
            raise InputError(f"{audio}: {info.duration:.1f} s is longer than --max-audio-seconds {max_seconds}")
        converted += info.samplerate != SAMPLE_RATE or info.channels != 1
        # exactly resample()'s output length, ceil(16000 * frames / sr), in integers
        row["num_samples"] = -(-SAMPLE_RATE * info.frames // info.samplerate)
    if converted:
        print(f"note: {converted} audio files in {source} are not 16 kHz mono; they are resampled / down-mixed on load",
              file=sys.stderr)
    return rows


def read_covost2(tsv: Path, task: str, max_seconds: float = float("inf")) -> list[dict]:
    """CoVoST2 en-de TSV (columns path, sentence, translation, client_id), clips in <dir>/clips/."""
    import csv
    with open(tsv, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        need = {"path", "sentence", "translation"}
        if not need <= set(reader.fieldnames or ()):
            raise InputError(f"{tsv}: CoVoST2 TSV needs columns {sorted(need)}, has {reader.fieldnames}")
        rows = [{"id": r["path"], "audio": str(tsv.parent / "clips" / r["path"]), "task": task,
                 "text": PROMPTS[task], "target": r["translation"] if task == "ast" else r["sentence"]}
                for r in reader]
    if not rows:
        raise InputError(f"{tsv}: manifest is empty")
    return check_audio_files(rows, tsv, max_seconds)


def read_librisqa(path: Path, max_seconds: float = float("inf")) -> list[dict]:
    """LibriSQA part I JSON: a list of {speech_path, question, answer, text, duration}."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg})") from None
    rows = []
    for n, it in enumerate(items):
        if not all(k in it for k in ("speech_path", "question", "answer")):
            raise InputError(f"{path}: item {n} lacks speech_path, question or answer")
        rows.append({"id": str(it["speech_path"]), "audio": str(path.parent / it["speech_path"]), "task": "sqa",
                     "text": PROMPTS["sqa"].format(question=it["question"]), "target": it["answer"]})
    if not rows:
        raise InputError(f"{path}: manifest is empty")
    return check_audio_files(rows, path, max_seconds)


def load_splits(data: str | Path, task: str, splits=("train", "dev", "test"),
                max_seconds: float = float("inf")) -> dict[str, list[dict]]:
    """Find and read the splits under --data, recognising the layout from its files.

    <data>/<split>.jsonl (ours); covost_v2.en_de.<split>.tsv (CoVoST2); LibriSQA-PartI-<split>.json
    (LibriSQA has no dev split: the paper holds out 20% of train, and so do we, by a fixed seed).
    """
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
            raise InputError(f"{data}: no {split} split ({jsonl.name}, {tsv.name} or {sqa_json.name})")
    return out


class AudioCache:
    """Decoded waves by path, at most `max_bytes` of samples, least recently used dropped first.

    A CoVoST2-size train split is ~430 h: ~100 GB as float32, so keeping every wave is not an
    option; decoding one clip again costs milliseconds. One object may serve several SpeechData.
    """

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._waves: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def __len__(self):
        return len(self._waves)

    def get(self, path: str) -> torch.Tensor | None:
        w = self._waves.get(path)
        if w is not None:
            self._waves.move_to_end(path)                    # now the most recently used
        return w

    def put(self, path: str, wave: torch.Tensor) -> None:
        if path in self._waves or wave.nbytes > self.max_bytes:
            return
        self._waves[path] = wave
        self.nbytes += wave.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._waves.popitem(last=False)
            self.nbytes -= old.nbytes


class SpeechData:
    """Examples with a bounded cache of their decoded audio, and a seeded, resumable order."""

    def __init__(self, rows: list[dict], max_seconds: float = float("inf"), cache_mb: float = 1024):
        self.rows = rows
        self.max_seconds = max_seconds
        self._waves = AudioCache(cache_mb * 2**20)  # pretrain() shares one between two SpeechData

    def __len__(self):
        return len(self.rows)

    def wave(self, i: int, cache: bool = True) -> torch.Tensor:
        """Utterance i at 16 kHz. cache=False (evaluation) reads through the cache without adding
        to it: a test split scored once would otherwise push the training audio out."""
        path = self.rows[i]["audio"]
        w = self._waves.get(path)
        if w is None:
            w = load_audio(path)
            if w.numel() / SAMPLE_RATE > self.max_seconds:
                raise InputError(f"{path}: longer than --max-audio-seconds {self.max_seconds}")
            if cache:
                self._waves.put(path, w)
        return w

    def num_samples(self, i: int) -> int:
        """Length of utterance i at 16 kHz, from the header read at startup (rows that did not
        pass check_audio_files are decoded, uncached)."""
        n = self.rows[i].get("num_samples")
        return n if n is not None else self.wave(i, cache=False).numel()

    def order(self, seed: int, epoch: int) -> list[int]:
        """The epoch's permutation, a pure function of (seed, epoch): resuming needs no saved state."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def batch_indices(self, seed: int, step: int, size: int) -> list[int]:
        """The prompts of optimizer step `step`, walking through shuffled epochs."""
        start = step * size
        out = []
        while len(out) < size:
            epoch, k = divmod(start + len(out), len(self.rows))
            out.append(self.order(seed, epoch)[k])
        return out


@dataclass
class Batch:
    """B prompts ready for the model. Prompts are left-padded so that completions line up."""
    features: torch.Tensor        # (B, F, 160) log-mel frame pairs, each utterance's own, zero-padded
    frames: torch.Tensor          # (B,) frame pairs of each utterance
    features_mask: torch.Tensor   # (B, A) which projector outputs are real audio
    input_ids: torch.Tensor       # (B, P) chat-templated prompts, <|audio|> expanded
    attention_mask: torch.Tensor  # (B, P) 0 on left padding
    targets: list[str]            # references
    rows: list[dict]

    def to(self, device):
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in
                                            ("features", "frames", "features_mask", "input_ids", "attention_mask")})

    def select(self, b0: int, b1: int) -> "Batch":
        """Prompts b0..b1-1 (a micro-batch)."""
        return Batch(self.features[b0:b1], self.frames[b0:b1], self.features_mask[b0:b1], self.input_ids[b0:b1],
                     self.attention_mask[b0:b1], self.targets[b0:b1], self.rows[b0:b1])


def collate(data: SpeechData, idx: list[int], tokenizer, audio_token_id: int,
            cache: bool = True) -> Batch:
    """Features of each utterance alone: the encoder has no padding mask, so batch padding would
    leak into the audio embeddings and make an answer depend on its batch mates."""
    waves = [data.wave(i, cache) for i in idx]
    feats = [log_mel(w) for w in waves]
    frames = torch.tensor([f.shape[0] for f in feats])
    n_audio = torch.tensor([num_audio_tokens(w.numel()) for w in waves])
    prompts = [encode_prompt(tokenizer, data.rows[i]["text"], int(n), audio_token_id) for i, n in zip(idx, n_audio)]
    P = max(map(len, prompts))
    input_ids = torch.full((len(idx), P), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(idx), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, P - len(p):] = torch.tensor(p)
        attention_mask[b, P - len(p):] = 1
    features_mask = torch.arange(int(n_audio.max()))[None] < n_audio[:, None]
    return Batch(torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), frames, features_mask, input_ids,
                 attention_mask, [data.rows[i]["target"] for i in idx], [data.rows[i] for i in idx])


# ----------------------------------------------------------------------------- model ----


def load_model(name: str, device: torch.device):
    """Granite Speech and its tokenizer by local path or hub id, fp32 master weights.

    The same call loads the shipped tiny model and ibm-granite/granite-speech-3.3-2b: the real
    checkpoints carry a LoRA adapter that transformers attaches when peft is installed.
    """
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration
    path = Path(name)
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            raise InputError(f"{path}: not a model directory (no config.json)")
        kind = json.loads(config.read_text()).get("model_type")
        if kind != "granite_speech":
            raise InputError(f"{path}: model_type is {kind!r}, not a Granite Speech checkpoint ('granite_speech')")
    elif name.startswith((".", "/")) or name.count("/") != 1:
        raise InputError(f"{name}: model directory not found")
    try:
        model = GraniteSpeechForConditionalGeneration.from_pretrained(name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        hint = " (hub ids need HF_HUB_OFFLINE=0 and a network)" if not path.exists() else ""
        raise InputError(f"{name}: cannot load model{hint}: {str(e).splitlines()[0][:160]}") from None
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise InputError(f"{name}: tokenizer has {len(tokenizer)} tokens, the model's vocabulary {model.config.text_config.vocab_size}")
    return model.to(device), tokenizer


def suppressed_ids(tokenizer, vocab_size: int, audio_token_id: int) -> torch.Tensor:
    """Tokens a completion must never contain: specials but EOS, <|audio|>, ids past the tokenizer.
    A sampled <|audio|> id would be replaced by audio features in the next forward and crash it."""
    bad = set(tokenizer.all_special_ids) | {audio_token_id} | set(range(len(tokenizer), vocab_size))
    bad.discard(tokenizer.eos_token_id)
    return torch.tensor(sorted(bad), dtype=torch.long)


def audio_embeddings(model, batch: Batch, train_encoder: bool = False) -> torch.Tensor:
    """Encoder + projector, each utterance alone on its own frames (no padding reaches the
    encoder): (B, A, D), zero rows past each utterance's audio tokens. A frozen encoder runs
    without autograd, so none of its activations are kept."""
    audio = []
    for feats, n in zip(batch.features, batch.frames.tolist()):
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):
            encoded = model.model.encoder(feats[None, :n]).last_hidden_state   # (1, F_b, H)
        audio.append(model.model.projector(encoded)[0])                         # (A_b, D)
    audio = torch.nn.utils.rnn.pad_sequence(audio, batch_first=True)            # (B, A_b max, D)
    return F.pad(audio, (0, 0, 0, batch.features_mask.shape[1] - audio.shape[1]))   # (B, A, D)


def prompt_embeddings(model, batch: Batch, train_encoder: bool = False) -> torch.Tensor:
    """The LM's input embeddings for B prompts, with the audio spliced in: (B, P, D).

    The encoder runs once per prompt; the G completions of a group share its output (repeat the
    result, not the encoder).
    """
    audio = audio_embeddings(model, batch, train_encoder)
    return model.model.get_merged_audio_embeddings(batch.input_ids, audio, batch.features_mask)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions that start at 0 on each row's first real token (prompts are left-padded)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(model, batch: Batch, completions: torch.Tensor, group_size: int,
                        temperature: float = 1.0, train_encoder: bool = False, with_entropy: bool = False):
    """Teacher-forced log pi(o_{i,t} | q, o_{i,<t}) of N = B*G completions, fp32 (N, T).

    Only the last T+1 positions go through the LM head. Log-probs are taken in fp32: under bf16,
    ratios of two nearly equal probabilities drift from 1.
    """
    N, T = completions.shape
    prompt = prompt_embeddings(model, batch, train_encoder).repeat_interleave(group_size, 0)   # (N, P, D)
    embeds = torch.cat([prompt, model.get_input_embeddings()(completions)], dim=1)             # (N, P+T, D)
    mask = torch.cat([batch.attention_mask.repeat_interleave(group_size, 0),
                      torch.ones_like(completions)], dim=1)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask),
                   logits_to_keep=T + 1).logits[:, :-1].float() / temperature                  # (N, T, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, completions[..., None]).squeeze(-1)                              # (N, T)
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)                                          # (N, T)
    return logp, entropy


# -------------------------------------------------------------------------- sampling ----


@dataclass
class Samples:
    tokens: torch.Tensor    # (N, T) completion ids, EOS included, pad after it
    lengths: torch.Tensor   # (N,) tokens up to and including the first EOS
    logps: torch.Tensor     # (N, T) behaviour log-probs log pi_old(o_{i,t}), fp32


@torch.no_grad()
def sample_groups(model, batch: Batch, group_size: int, *, max_new_tokens: int, eos_id: int, pad_id: int,
                  temperature: float = 1.0, top_p: float = 1.0, suppress: torch.Tensor | None = None,
                  uniforms: torch.Tensor | None = None) -> Samples:
    """G completions for each of B prompts from one shared prefill, decoded with a KV cache.

    The audio encoder and the prompt prefill run once per prompt; the cache is then repeated
    G times (generate(num_return_sequences=G) would run the encoder G times). temperature 0
    decodes greedily. Returned log-probs are those of the tempered, unsuppressed softmax, which
    is what the teacher-forced pass computes; top-p and suppression only choose the token.
    Token t of row i is drawn by inverting the CDF at uniforms[i, t] (N, max_new_tokens): pass
    draws seeded per prompt (row_uniforms) and a completion does not depend on its batch mates.
    """
    from transformers import StaticCache
    (B, P), G = batch.input_ids.shape, group_size
    N = B * G
    # A static cache: K/V buffers of P + max_new_tokens positions, written in place. A growing
    # (dynamic) cache copies itself whole at every token; on CPU that copy was 40% of sampling.
    # Positions past the current token are hidden by the causal mask, so attn can be all ones there.
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    attn = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(B, max_new_tokens)], dim=1)
    pos = positions(batch.attention_mask)
    out = model(inputs_embeds=prompt_embeddings(model, batch), attention_mask=attn, position_ids=pos,
                cache=cache, use_cache=True, logits_to_keep=1)
    for layer in cache.layers:                                             # (B, ...) -> (N, ...)
        layer.keys, layer.values = layer.keys.repeat_interleave(G, 0), layer.values.repeat_interleave(G, 0)
    attn = attn.repeat_interleave(G, 0)                                    # (N, P + max_new_tokens)
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)             # (N, V)
    device = logits.device
    next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1                     # (N, 1)
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
    if suppress is not None:
        banned[suppress.to(device)] = True
    tokens = torch.full((N, max_new_tokens), pad_id, device=device)
    logps = torch.zeros(N, max_new_tokens, device=device)
    lengths = torch.full((N,), max_new_tokens, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    if uniforms is None:
        uniforms = torch.rand(N, max_new_tokens)
    uniforms = uniforms.to(device)
    lm, lm_head = model.model.language_model, model.lm_head                # decode steps skip the audio plumbing
    for t in range(max_new_tokens):
        logits = logits / temperature if temperature > 0 else logits
        logp_all = torch.log_softmax(logits, dim=-1)                       # (N, V)
        if temperature <= 0:
            token = logits.masked_fill(banned, -float("inf")).argmax(-1)
        else:
            if top_p < 1.0:
                probs = torch.softmax(top_p_filter(logits.masked_fill(banned, -float("inf")), top_p), -1)
            else:
                probs = logp_all.exp().masked_fill(banned, 0.0)
            cdf = probs.cumsum(-1)                                          # (N, V)
            # right=True: u = 0 must not land on a leading zero-probability (suppressed) token
            u = uniforms[:, t:t + 1] * cdf[:, -1:]
            token = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
        token = torch.where(done, pad_id, token)
        tokens[:, t] = token
        logps[:, t] = torch.where(done, 0.0, logp_all.gather(1, token[:, None]).squeeze(1))
        finished_now = ~done & (token == eos_id)
        lengths = torch.where(finished_now, t + 1, lengths)
        done |= finished_now
        if bool(done.all()):
            break
        out = lm(input_ids=token[:, None], attention_mask=attn, position_ids=next_pos, cache=cache, use_cache=True)
        logits, next_pos = lm_head(out.last_hidden_state[:, -1]).float(), next_pos + 1
    T = int(lengths.max())
    return Samples(tokens[:, :T], lengths, logps[:, :T])


def row_uniforms(seed: int, step: int, prompts: list[int], group_size: int, length: int) -> torch.Tensor:
    """(len(prompts) * G, length) uniform draws, a pure function of (seed, step, prompt): the same
    completions whatever the batch size, the number of processes or the point of resumption."""
    draws = [torch.rand(group_size, length, generator=torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + p))
             for p in prompts]
    return torch.cat(draws)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the best one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cum - sorted_logits.softmax(-1) >= top_p                # mass before this token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -float("inf"))


def decode(tokenizer, samples: Samples) -> list[str]:
    """Completion texts, cut at their lengths (never at the first pad id)."""
    return [tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            for row, n in zip(samples.tokens.tolist(), samples.lengths.tolist())]


# --------------------------------------------------------------------------- rewards ----


def bleu_reward(completions: list[str], references: list[str]) -> torch.Tensor:
    """r_i = sentence BLEU in [0, 1], sacrebleu's defaults (13a tokens, exp smoothing)."""
    return torch.tensor([sacrebleu.sentence_bleu(c, [r]).score / 100 for c, r in zip(completions, references)])


def chrf_reward(completions: list[str], references: list[str]) -> torch.Tensor:
    """Character n-gram F-score in [0, 1]: smoother than BLEU on short, partly right answers."""
    return torch.tensor([sacrebleu.sentence_chrf(c, [r]).score / 100 for c, r in zip(completions, references)])


REWARDS = {
    "bleu": bleu_reward,
    "chrf": chrf_reward,
    "bleu+chrf": lambda c, r: (bleu_reward(c, r) + chrf_reward(c, r)) / 2,
}


# ------------------------------------------------------------------------ advantages ----


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / std(r) within each group of G, shared by all tokens of o_i.

    std is torch's unbiased one, +1e-4 so an all-equal group gives A = 0, not 0/0. Without
    scaling (Dr. GRPO) A_i = r_i - mean(r): easy and hard prompts are not re-weighted.
    """
    r = rewards.view(-1, group_size)                                        # (B, G)
    advantages = r - r.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (r.std(dim=1, keepdim=True) + 1e-4)
    return advantages.view(-1)                                              # (N,)


# ---------------------------------------------------------------------------- losses ----


def sft_loss(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the reference tokens (EOS included), averaged over tokens."""
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, beta=0.02, epsilon=0.2, epsilon_high=None,
              loss_type="dapo", off_policy=None):
    """The KL-regularised clipped GRPO objective, negated (PAPER.md), and its metrics.

    logp, old_logp, ref_logp: (N, T) log-probs of the policy, the behaviour policy and the frozen
    reference; advantages (N,); mask (N, T) from completion lengths. off_policy (N,) marks MP-GRPO
    rows whose tokens came from the reference answer, not from pi_old.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.float()
    A = advantages[:, None]                                                 # (N, 1)
    # ratio s_{i,t} = pi_theta / pi_theta_old, and the clipped surrogate
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    surrogate = torch.min(ratio * A, clipped * A)
    # MP-GRPO (LUFFY): the off-policy weight is pi_theta / pi_phi with pi_phi = 1, never clipped
    if off_policy is not None:
        surrogate = torch.where(off_policy[:, None], torch.exp(logp) * A, surrogate)
    # k3 estimator of KL[pi_theta || pi_ref]: exp(ref - logp) - (ref - logp) - 1 >= 0
    if beta != 0 and ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    else:
        kl = torch.zeros_like(logp)
    per_token = -(surrogate - beta * kl)                                    # -l_{i,t}
    per_token = torch.where(mask.bool(), per_token, 0.0)   # padding never reaches the loss, not even as inf * 0
    # normalisation: dapo averages over every completion token of the group (the paper's)
    if loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / mask.numel()
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    with torch.no_grad():
        on = mask if off_policy is None else mask * (~off_policy[:, None]).float()
        n_on = on.sum().clamp(min=1)
        metrics = {
            "kl/mean": ((kl * mask).sum() / mask.sum().clamp(min=1)).item(),
            "loss/clip_low": (((ratio < 1 - epsilon) & (A < 0)).float() * on).sum().item() / n_on.item(),
            "loss/clip_high": (((ratio > 1 + eps_high) & (A > 0)).float() * on).sum().item() / n_on.item(),
            "loss/ratio_mean": ((ratio * on).sum() / n_on).item(),
        }
    return loss, metrics


# ---------------------------------------------------------------------- distributed ----
# `torchrun --nproc_per_node N grpo_speech.py ...` runs N processes. Each takes B/N whole
# prompts (a group never straddles two processes), gradients are summed over processes after
# every backward, and only rank 0 writes files. Without torchrun, world = 1 and all of this is
# a no-op.


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

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(cfg: Config) -> tuple[Dist, torch.device]:
    """gloo on CPU, nccl on GPU, one GPU per process (LOCAL_RANK); torchrun sets the variables."""
    device = pick_device(cfg.device)
    if "RANK" not in os.environ:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


def close_distributed(ok: bool) -> None:
    """Tear the process group down on every exit path (main's `finally`). Left to the interpreter's
    exit, gloo's threads can die in their destructors: "terminate called without an active
    exception", SIGABRT, and torchrun reports the run failed.

    ok (run() returned): a barrier first, so every rank finishes together. Otherwise (bad input,
    Ctrl-C, a crash) the other ranks may never arrive, being stuck in a collective or already
    gone, so wait at most 30 s for them (monitored_barrier; gloo only, NCCL has no per-call
    timeout) and then leave: a rank that exits non-zero makes torchrun stop the rest.
    """
    if not torch.distributed.is_initialized():
        return
    if not ok:
        # torchrun SIGTERMs the other ranks the moment one exits non-zero; a rank that is itself
        # on its way out (a tenth of a second behind) would die as -15 instead of reporting its
        # own exit code. This process is leaving, so SIGTERM has nothing left to stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if ok:
            torch.distributed.barrier()
        elif torch.distributed.get_backend() == "gloo":
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    except RuntimeError:  # a peer timed out or has gone: nothing left to wait for
        pass
    finally:
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------ evaluation ----


def word_errors(hyp: str, ref: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): Levenshtein over words."""
    h, r = hyp.split(), ref.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, start=1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1], len(r)


def corpus_scores(hyps: list[str], refs: list[str], task: str) -> dict:
    """Corpus BLEU and chrF (sacrebleu, 0-100), and WER (%) for asr."""
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    scores = {"bleu": round(bleu.corpus_score(hyps, [refs]).score, 2),
              "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2), "n": len(hyps),
              "signature": f"{bleu.get_signature()} | {chrf.get_signature()}"}
    if task == "asr":
        errs, words = map(sum, zip(*(word_errors(h, r) for h, r in zip(hyps, refs))))
        scores["wer"] = round(100 * errs / max(words, 1), 2)
    return scores


@torch.no_grad()
def evaluate(model, tokenizer, data: SpeechData, cfg: Config, limit: int, amp, desc: str = "eval",
             dist: Dist = Dist()) -> tuple[dict, list[dict]]:
    """Decode the first `limit` utterances (greedy, or the paper's T=0.9 top-p 0.9) and score them.
    Under torchrun each process decodes every world-th utterance; all get the gathered scores."""
    model.eval()
    idx = list(range(len(data) if limit <= 0 else min(limit, len(data))))[dist.rank::dist.world]
    idx.sort(key=data.num_samples)             # similar lengths batch well; no audio decoded for it
    audio_id = model.config.audio_token_id
    suppress = suppressed_ids(tokenizer, model.config.text_config.vocab_size, audio_id)
    greedy = cfg.eval_decoding == "greedy"
    hyps: dict[int, str] = {}
    for k in tqdm(range(0, len(idx), cfg.eval_batch_size), desc=desc, leave=False, disable=None if dist.main else True):
        b_idx = idx[k:k + cfg.eval_batch_size]
        batch = collate(data, b_idx, tokenizer, audio_id, cache=False).to(model.device)
        with amp():
            s = sample_groups(model, batch, 1, max_new_tokens=cfg.max_new_tokens, eos_id=tokenizer.eos_token_id,
                              pad_id=tokenizer.pad_token_id, temperature=0.0 if greedy else 0.9,
                              top_p=1.0 if greedy else 0.9, suppress=suppress,
                              uniforms=None if greedy else row_uniforms(cfg.seed, -1, b_idx, 1, cfg.max_new_tokens))
        hyps.update(zip(b_idx, decode(tokenizer, s)))
    hyps = dict(dist.gather(list(hyps.items())))
    order = sorted(hyps)
    rows = [{"id": data.rows[i]["id"], "hyp": hyps[i], "ref": data.rows[i]["target"]} for i in order]
    return corpus_scores([r["hyp"] for r in rows], [r["ref"] for r in rows], cfg.task), rows


# ----------------------------------------------------------------------- checkpoints ----
# Every directory is written under a temporary name and renamed into place, so a run killed
# mid-save leaves the previous checkpoint intact. Weights are safetensors; the trainer state
# (optimizer, scheduler, RNG, step) is loaded with weights_only=True.


def save_model(model, tokenizer, path: Path, extra: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        torch.save(extra, tmp / "trainer_state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(model, path: Path) -> dict:
    """Weights into `model` (in place) and the trainer state of <out>/checkpoint."""
    if not (path / "trainer_state.pt").is_file():
        raise InputError(f"{path}: no checkpoint to resume from")
    # from_pretrained maps the saved (hub) names back onto the module's; then copy in place
    saved = type(model).from_pretrained(path, dtype=torch.float32)
    try:
        model.load_state_dict(saved.state_dict())
    except RuntimeError as e:
        raise InputError(f"{path}: checkpoint does not match --model ({str(e).splitlines()[1].strip()[:120]})") from None
    return torch.load(path / "trainer_state.pt", weights_only=True)


def rng_state() -> dict:
    """torch's generators. Sampling and data order need none of it (they are pure functions of
    (seed, step, index)); it is kept so that any other draw also resumes exactly."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# ----------------------------------------------------------------------------- train ----


class Logger:
    """One call per step: a JSON line in metrics.jsonl and the numbers on the progress bar."""

    def __init__(self, path: Path | None, bar):
        self.fh = open(path, "a", encoding="utf-8") if path else None
        self.bar = bar

    def __call__(self, step: int, metrics: dict) -> None:
        if self.fh:
            self.fh.write(json.dumps({"step": step, **metrics}) + "\n")
            self.fh.flush()
        if self.bar is not None:
            self.bar.n = step
            keys = [k for k in ("reward/mean", "kl/mean", "loss/total", "loss/sft") if k in metrics]
            self.bar.set_postfix({k.split("/")[-1] if k != "loss/total" else "loss": f"{metrics[k]:.3f}" for k in keys})


def lr_lambda(cfg: Config, total: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warm = max(1, int(cfg.warmup_ratio * total))
    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return f


class Stop:
    """SIGINT / SIGTERM ask the loop to finish its step, checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def grpo_rollout(cfg, raw_model, tokenizer, batch: Batch, step: int, prompt_ids: list[int], suppress, reward_fn):
    """Sample the groups (MP-GRPO: G-1 samples + the reference) and score them.

    Returns completions (N, T), lengths (N,), rewards (N,), off_policy (N,) or None, and metrics.
    """
    G = cfg.group_size
    mixed = cfg.mode == "mp-grpo"
    n = G - 1 if mixed else G
    uniforms = row_uniforms(cfg.seed, step, prompt_ids, n, cfg.max_new_tokens)
    t0 = time.perf_counter()
    s = sample_groups(raw_model, batch, n, max_new_tokens=cfg.max_new_tokens,
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, temperature=cfg.temperature,
                      top_p=cfg.top_p, suppress=suppress, uniforms=uniforms)
    t_sample = time.perf_counter() - t0
    texts, rows, lengths = decode(tokenizer, s), s.tokens.tolist(), s.lengths.tolist()
    off_policy = None
    if mixed:  # the reference answer as the G-th, off-policy, member of each group
        refs = [encode_target(tokenizer, t)[: cfg.max_new_tokens] for t in batch.targets]
        k = G - 1
        texts = sum(([*texts[b * k:(b + 1) * k], batch.targets[b]] for b in range(len(refs))), [])
        rows = sum(([*rows[b * k:(b + 1) * k], refs[b]] for b in range(len(refs))), [])
        lengths = sum(([*lengths[b * k:(b + 1) * k], len(refs[b])] for b in range(len(refs))), [])
        off_policy = torch.tensor([j == k for _ in refs for j in range(G)], device=batch.input_ids.device)
    T = max(lengths)
    completions = torch.full((len(rows), T), tokenizer.pad_token_id, device=batch.input_ids.device)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        completions[i, :n] = torch.tensor(r[:n])
    t0 = time.perf_counter()
    references = [t for t in batch.targets for _ in range(G)]
    rewards = torch.nan_to_num(reward_fn(texts, references), nan=0.0)      # empty text scores 0
    r = rewards.view(-1, G)
    metrics = {"reward/mean": r.mean().item(), "reward/std": r.std(dim=1).mean().item(),
               "reward/zero_std_frac": (r.std(dim=1) == 0).float().mean().item(),
               "perf/completion_len": s.lengths.float().mean().item(),
               "perf/sample_s": t_sample, "perf/reward_s": time.perf_counter() - t0}
    lengths = torch.tensor(lengths, device=completions.device)
    return completions, lengths, rewards.to(completions.device), off_policy, metrics


def train(cfg: Config, raw_model, tokenizer, splits: dict[str, SpeechData], out: Path, amp, device,
          dist: Dist = Dist()) -> Path:
    """SFT or (MP-)GRPO for cfg.max_steps, evaluating on dev every cfg.eval_every steps.

    Returns the directory of the best-on-dev weights (best/), which results.json reports.
    """
    grpo = cfg.mode in ("grpo", "mp-grpo")
    for name, p in raw_model.named_parameters():
        p.requires_grad_(cfg.train_encoder or not name.startswith("model.encoder."))
    params = [p for p in raw_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.max_steps))
    # the frozen reference pi_ref is copied from the start weights, before any compile
    ref_model = None
    if grpo and cfg.beta != 0:
        ref_model = copy.deepcopy(raw_model).eval().requires_grad_(False)
    policy = torch.compile(raw_model, dynamic=True) if cfg.compile else raw_model
    raw_model.eval()  # dropout off and BatchNorm frozen, so the on-policy ratio is exactly 1
    audio_id = raw_model.config.audio_token_id
    suppress = suppressed_ids(tokenizer, raw_model.config.text_config.vocab_size, audio_id)
    reward_fn = REWARDS[cfg.reward]
    G = cfg.group_size if grpo else 1
    B = cfg.batch_size if grpo else cfg.sft_batch_size
    B_local = B // dist.world                                   # this process's share of prompts
    ckpt, best = out / "checkpoint", out / "best"

    step, bad_steps, best_dev = 0, 0, -1.0
    if cfg.resume and ckpt.exists():
        state = load_checkpoint(raw_model, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, bad_steps, best_dev = state["step"], state["bad_steps"], state["best_dev"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if dist.main:
            print(f"resumed from {ckpt} at step {step}")
            # keep metrics.jsonl to the steps the checkpoint has seen: none lost, none twice
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            (out / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))

    def checkpoint():
        if dist.main:
            save_model(raw_model, tokenizer, ckpt, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                                     "step": step, "bad_steps": bad_steps, "best_dev": best_dev,
                                                     "rng": rng_state()})
        dist.barrier()

    def dev_eval():
        nonlocal best_dev
        scores, _ = evaluate(raw_model, tokenizer, splits["dev"], cfg, cfg.dev_limit, amp, desc="dev", dist=dist)
        if scores["bleu"] > best_dev:
            best_dev = scores["bleu"]
            if dist.main:
                save_model(raw_model, tokenizer, best)
            dist.barrier()
        return {f"eval/dev_{k}": v for k, v in scores.items() if k not in ("n", "signature")} | {"eval/best_dev_bleu": best_dev}

    stop = Stop()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.mode, disable=not dist.main)
    log = Logger(out / "metrics.jsonl", bar) if dist.main else (lambda step, metrics: None)
    if step == 0:
        log(0, dev_eval())  # the start model is a candidate too: best-on-dev may be step 0
    train_data = splits["train"]
    try:
        while step < cfg.max_steps and not dist.sum(torch.tensor(float(stop.requested))):
            t_step = time.perf_counter()
            first = dist.rank * B_local                          # this process's prompts of the step
            idx = train_data.batch_indices(cfg.seed, step, B)[first:first + B_local]
            batch = collate(train_data, idx, tokenizer, audio_id).to(device)
            metrics = {}
            if grpo:
                with amp():
                    completions, lengths, rewards, off_policy, metrics = grpo_rollout(
                        cfg, raw_model, tokenizer, batch, step, list(range(first, first + B_local)), suppress, reward_fn)
                advantages = group_advantages(rewards, G, cfg.scale_rewards)
            else:
                refs = [encode_target(tokenizer, t) for t in batch.targets]
                lengths = torch.tensor([len(r) for r in refs], device=device)
                completions = torch.full((len(refs), int(lengths.max())), tokenizer.pad_token_id, device=device)
                for i, r in enumerate(refs):
                    completions[i, :len(r)] = torch.tensor(r)
            mask = torch.arange(completions.shape[1], device=device)[None] < lengths[:, None]   # (N, T)
            t0 = time.perf_counter()
            ref_logp = old_logp = None
            with torch.no_grad(), amp():
                if ref_model is not None:
                    ref_logp = completion_logprobs(ref_model, batch, completions, G, cfg.temperature)
                if grpo and cfg.num_iterations > 1:
                    old_logp = completion_logprobs(policy, batch, completions, G, cfg.temperature)
            metrics["perf/ref_logp_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            # policy update: mu passes over the rollout, prompts split into micro-batches. Each
            # micro-batch's loss is weighted by its share of the global batch, so that summing the
            # gradients of every micro-batch and every process gives the full batch's gradient.
            n_tok = dist.sum(mask.sum().float()).clamp(min=1)
            for _ in range(cfg.num_iterations if grpo else 1):
                agg: dict[str, float] = {}
                for chunk in torch.arange(len(idx)).chunk(cfg.grad_accum):
                    b0, b1 = int(chunk[0]), int(chunk[-1]) + 1
                    rows = slice(b0 * G, b1 * G)
                    mb = batch.select(b0, b1)
                    mb_mask = mask[rows]
                    with amp():
                        logp, entropy = completion_logprobs(policy, mb, completions[rows], G, cfg.temperature if grpo else 1.0,
                                                            cfg.train_encoder, with_entropy=True)
                    if grpo:
                        loss, m = grpo_loss(logp, logp.detach() if old_logp is None else old_logp[rows],
                                            None if ref_logp is None else ref_logp[rows], advantages[rows], mb_mask,
                                            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                                            loss_type=cfg.loss_type, off_policy=None if off_policy is None else off_policy[rows])
                        weight = mb_mask.sum() / n_tok if cfg.loss_type == "dapo" else (b1 - b0) / B
                    else:
                        loss, m = sft_loss(logp, mb_mask), {}
                        weight = mb_mask.sum() / n_tok
                    (loss * weight).backward()
                    m["loss/total"] = loss.item()
                    m["perf/entropy"] = ((entropy * mb_mask).sum() / mb_mask.sum().clamp(min=1)).item()
                    for k, v in m.items():
                        agg[k] = agg.get(k, 0.0) + v * float(weight)
                for p in params:
                    dist.sum(p.grad)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if torch.isfinite(grad_norm) and math.isfinite(agg["loss/total"]):
                    optimizer.step()
                    bad_steps = 0
                else:  # a non-finite loss or gradient never reaches the weights
                    bad_steps += 1
                    agg["loss/skipped"] = 1.0
                    if bad_steps >= cfg.max_bad_steps:
                        raise InputError(f"aborting: {bad_steps} non-finite losses/gradients in a row at step {step}")
                optimizer.zero_grad(set_to_none=True)
            names = sorted(agg)
            totals = dist.sum(torch.tensor([agg[k] for k in names], dtype=torch.float64))
            rollout = sorted(k for k in metrics if k.startswith(("reward/", "perf/completion")))
            means = dist.sum(torch.tensor([metrics[k] for k in rollout], dtype=torch.float64)) / dist.world
            metrics.update(zip(names, totals.tolist()))
            metrics.update(zip(rollout, means.tolist()))
            if not grpo:
                metrics["loss/sft"] = metrics.pop("loss/total")
            metrics.update({"perf/update_s": time.perf_counter() - t0, "perf/grad_norm": float(grad_norm),
                            "lr": scheduler.get_last_lr()[0], "perf/step_s": time.perf_counter() - t_step})
            scheduler.step()
            step += 1
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                metrics.update(dev_eval())
                checkpoint()
            log(step, metrics)
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if step < cfg.max_steps:  # a process was asked to stop
        checkpoint()
        if dist.main:
            print(f"stopped at step {step}; checkpoint in {ckpt} (continue with --resume)")
        raise SystemExit(130)
    if dist.main:
        save_model(raw_model, tokenizer, out / "final")
    dist.barrier()
    return best


# ------------------------------------------------------------------------ pre-training ----
# How data/tiny-granite-speech was made (--mode pretrain): a ~3M-parameter Granite Speech, same
# classes as the 2B/8B models, trained in four stages on the `pretrain` split (asr + ast, no
# sqa). Trained jointly from scratch the LM ignores the audio: the encoder's single-frame
# character spikes reach it as an unordered bag through each 15-frame Q-Former window. So:
#   1. encoder: character CTC on its own mid-layer head (encoder.out);
#   2. encoder: word CTC through a temporary head on its last layer (thrown away after);
#   3. LM: "stretched text", the transcript's words repeated 2-5 times with fillers placed in
#      the audio slot, so the LM learns to read its prefix for both tasks;
#   4. encoder frozen: projector + LM on asr + ast, with an auxiliary word CTC on the projector
#      outputs against the tied embeddings.

CHARS = " abcdefghijklmnopqrstuvwxyz'"
SPECIAL_TOKENS = ["<|pad|>", "<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", AUDIO_TOKEN, "<|unk|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}"
                 "<|end_of_text|>\n{% endfor %}{% if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>{% endif %}")


def train_tokenizer(texts: list[str], vocab_size: int = 640):
    """A small BPE tokenizer (Metaspace, like SentencePiece) whose merges cover whole words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end_of_text|>",
                                   bos_token="<|end_of_text|>", unk_token="<|unk|>",
                                   additional_special_tokens=SPECIAL_TOKENS[2:5])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(tokenizer):
    """Granite Speech in miniature; the real 2B: encoder 10 x 1024, Q-Former 2 x 1024, LM 40 x 2048."""
    from transformers import GraniteSpeechConfig
    vocab = 8 * math.ceil(len(tokenizer) / 8)
    head_dim = 192 // 4
    text = dict(model_type="granite", vocab_size=vocab, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                attention_multiplier=1 / math.sqrt(head_dim),  # Granite's default 1.0 is not 1/sqrt(d)
                tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    encoder = dict(input_dim=160, num_layers=4, hidden_dim=128, feedforward_mult=2, num_heads=4, output_dim=32,
                   context_size=200, max_pos_emb=512, dropout=0.1, conv_kernel_size=15)
    projector = dict(model_type="blip_2_qformer", hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=256, encoder_hidden_size=128, cross_attention_frequency=1,
                     max_position_embeddings=64, vocab_size=2)
    return GraniteSpeechConfig(text_config=text, encoder_config=encoder, projector_config=projector,
                               audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
                               has_lora_adapter=False, window_size=15, downsample_rate=5)


def bucketed(data: SpeechData, size: int, seed: int):
    """Endless batches of similar-length utterances (the encoder sees padding as silence)."""
    order = sorted(range(len(data)), key=lambda i: data.wave(i).numel())
    chunks = [order[k:k + size] for k in range(0, len(order), size)]
    for epoch in range(10**9):
        random.Random(seed * 7919 + epoch).shuffle(chunks)
        yield from chunks


def fit(params, steps: int, lr: float, loss_fn, batches, desc: str) -> list[float]:
    """A plain AdamW loop with warm-up and cosine decay; returns the loss curve (per 10% of steps)."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(Config(warmup_ratio=0.05), steps))
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


def ctc(logits: torch.Tensor, frames: torch.Tensor, targets: list[list[int]], blank: int) -> torch.Tensor:
    """CTC loss of (B, F, C) logits with per-item valid frame counts."""
    lp = torch.log_softmax(logits.float(), -1).transpose(0, 1)            # (F, B, C)
    flat = torch.tensor([t for ts in targets for t in ts], dtype=torch.long)
    return F.ctc_loss(lp, flat, frames, torch.tensor([len(t) for t in targets]), blank=blank, zero_infinity=True)


def pretrain(cfg: Config, device) -> None:
    """--mode pretrain: build, train and save the tiny Granite Speech (see the banner above)."""
    from transformers import GraniteSpeechForConditionalGeneration
    torch.manual_seed(cfg.seed)
    root, out = Path(cfg.data), Path(cfg.out)
    rows = {t: read_manifest(root / t / "pretrain.jsonl") for t in ("asr", "ast")}
    texts = [r[k] for t in TASKS for split in ("pretrain", "train") if (root / t / f"{split}.jsonl").exists()
             for r in read_manifest(root / t / f"{split}.jsonl") for k in ("text", "target")]
    tokenizer = train_tokenizer(texts)
    model = GraniteSpeechForConditionalGeneration(tiny_config(tokenizer)).to(device)
    print(f"tiny Granite Speech: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)}")
    steps = [int(s) for s in cfg.pretrain_steps.split(",")]
    asr = SpeechData(rows["asr"])
    both = SpeechData(rows["asr"] + rows["ast"])
    both._waves = asr._waves                                               # same audio files
    pad, audio_id = tokenizer.pad_token_id, model.config.audio_token_id
    words = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    encoder = model.model.encoder
    mid = {}
    encoder.out.register_forward_hook(lambda mod, inp, outp: mid.__setitem__("logits", outp))
    log, t_start = {}, time.time()

    def encode(idx):
        feats, _ = log_mel_batch([asr.wave(i) for i in idx])
        frames = torch.tensor([(asr.wave(i).numel() // 160 + 1) // 2 for i in idx])
        return encoder(feats.to(device)).last_hidden_state, frames

    # stage 1: character CTC on the mid-layer head
    def char_loss(idx):
        _, frames = encode(idx)
        return ctc(mid["logits"], frames, [[CHARS.index(c) + 1 for c in asr.rows[i]["target"] if c in CHARS] for i in idx], 0)
    encoder.train()
    t0 = time.time()
    log["1_char_ctc"] = {"curve": fit(encoder.parameters(), steps[0], 2e-3, char_loss, bucketed(asr, 32, cfg.seed), "1 char CTC")}
    log["1_char_ctc"]["minutes"] = round((time.time() - t0) / 60, 1)

    # stage 2: word CTC through a temporary head on the last layer, char CTC kept as an aid
    head = torch.nn.Linear(encoder.config.hidden_dim, model.config.text_config.vocab_size).to(device)
    def word_loss(idx):
        hidden, frames = encode(idx)
        chars = [[CHARS.index(c) + 1 for c in asr.rows[i]["target"] if c in CHARS] for i in idx]
        return ctc(head(hidden), frames, [words(asr.rows[i]["target"]) for i in idx], pad) + 0.3 * ctc(mid["logits"], frames, chars, 0)
    t0 = time.time()
    log["2_word_ctc"] = {"curve": fit([*encoder.parameters(), *head.parameters()], steps[1], 2e-3, word_loss,
                                      bucketed(asr, 32, cfg.seed + 1), "2 word CTC")}
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
    def lm_batches(seed):
        rng = random.Random(seed)
        while True:
            yield [lm_rows[rng.randrange(len(lm_rows))] for _ in range(32)], rng
    def lm_loss(item):
        batch_rows, rng = item
        seqs, starts = [], []
        for r in batch_rows:
            slot = stretched(english[r["audio"]], rng)
            prompt = encode_prompt(tokenizer, r["text"], len(slot), audio_id)
            k = prompt.index(audio_id)
            prompt[k:k + len(slot)] = slot
            starts.append(len(prompt))
            seqs.append(prompt + encode_target(tokenizer, r["target"]))
        L = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (L - len(s)) for s in seqs], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        labels = torch.tensor([[-100] * (st - 1) + s[st:] + [-100] * (L - len(s)) for s, st in zip(seqs, starts)], device=device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    model.train()
    model.model.encoder.eval()
    t0 = time.time()
    log["3_lm_stretched"] = {"curve": fit(model.model.language_model.parameters(), steps[2], 2e-3, lm_loss,
                                          lm_batches(cfg.seed + 2), "3 LM stretched")}
    log["3_lm_stretched"]["minutes"] = round((time.time() - t0) / 60, 1)

    # stage 4: projector + LM on asr + ast, with word CTC on the projector outputs
    embed = model.get_input_embeddings()
    with torch.no_grad():  # audio embeddings start ~10x the norm of text ones: scale them down
        b = collate(both, list(range(8)), tokenizer, audio_id).to(device)
        audio = audio_embeddings(model, b)
        model.model.projector.linear.weight *= embed.weight.norm(dim=-1).mean() / audio.norm(dim=-1).mean()
    def joint_loss(idx):
        batch = collate(both, idx, tokenizer, audio_id).to(device)
        refs = [encode_target(tokenizer, t) for t in batch.targets]
        lengths = torch.tensor([len(r) for r in refs], device=device)
        completions = torch.tensor([r + [pad] * (int(lengths.max()) - len(r)) for r in refs], device=device)
        logp = completion_logprobs(model, batch, completions, 1)
        mask = torch.arange(completions.shape[1], device=device)[None] < lengths[:, None]
        audio = audio_embeddings(model, batch)                                         # (B, A, D)
        ctc_logits = audio @ embed.weight.T
        n_audio = batch.features_mask.sum(1).cpu()
        transcripts = [words(english[r["audio"]]) for r in batch.rows]
        return sft_loss(logp, mask) + 0.5 * ctc(ctc_logits, n_audio, transcripts, pad)
    t0 = time.time()
    trainable = [*model.model.projector.parameters(), *model.model.language_model.parameters()]
    log["4_joint"] = {"curve": fit(trainable, steps[3], 1e-3, joint_loss, bucketed(both, 24, cfg.seed + 3), "4 joint")}
    log["4_joint"]["minutes"] = round((time.time() - t0) / 60, 1)
    log["total_minutes"] = round((time.time() - t_start) / 60, 1)

    model.eval()
    for task in ("asr", "ast"):
        dev = root / task / "dev.jsonl"
        if dev.exists():
            scores, _ = evaluate(model, tokenizer, SpeechData(read_manifest(dev)), dataclasses.replace(cfg, task=task),
                                 cfg.dev_limit, nullamp, desc=f"dev {task}")
            log[f"dev_{task}"] = scores
            print(f"dev {task}: {scores}")
    save_model(model, tokenizer, out)
    (out / "pretrain_log.json").write_text(json.dumps({"command": " ".join(sys.argv), **log}, indent=1))
    print(json.dumps(log))


# ------------------------------------------------------------------------------ main ----


def nullamp():
    return torch.autocast("cpu", enabled=False)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_out(cfg: Config) -> Path:
    """Refuse to mix two runs in one directory; created only after every input was checked."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise InputError(f"{out}: holds another run; pass --resume to continue it or --overwrite to replace it")
    if cfg.overwrite and out.exists() and not cfg.resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(cfg: Config) -> dict:
    """Everything `python grpo_speech.py` does; returns results.json's contents."""
    cfg = resolve_config(cfg)
    dist, device = init_distributed(cfg)
    if cfg.batch_size % dist.world or (cfg.mode == "sft" and cfg.sft_batch_size % dist.world):
        raise InputError(f"--batch-size {cfg.batch_size} (or --sft-batch-size) is not divisible by the {dist.world} processes")
    torch.manual_seed(cfg.seed)
    if cfg.mode == "pretrain":
        pretrain(cfg, device)
        return {}
    # every input is checked before the run directory is made
    wanted = ("test",) if cfg.mode == "eval" else ("train", "dev", "test")
    splits = {k: SpeechData(v, cfg.max_audio_seconds, cache_mb=cfg.audio_cache_mb)
              for k, v in load_splits(cfg.data, cfg.task, wanted, cfg.max_audio_seconds).items()}
    model, tokenizer = load_model(cfg.model, device)
    out = Path(cfg.out)
    if dist.main:
        prepare_out(cfg)
    dist.barrier()
    say = print if dist.main else (lambda *a: None)
    # precision is decided here, once: bf16 autocast around forward passes, fp32 weights and log-probs
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    say(f"{cfg.task} {cfg.mode}: model {cfg.model}, data {cfg.data}, out {out}, device {device}, processes {dist.world}")
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if cfg.resume and results_file.exists() else {}
    if dist.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if "base" not in results:
        results["base"], hyps = evaluate(model, tokenizer, splits["test"], cfg, cfg.eval_limit, amp, "test (start)", dist)
        if dist.main:
            write_json(results_file, results)
            write_jsonl(out / "hyps_base.jsonl", hyps)
    say(f"sacrebleu: {results['base']['signature']}")
    say(f"start model on test: {fmt(results['base'])}")
    if cfg.mode == "eval":
        return results
    best = train(cfg, model, tokenizer, splits, out, amp, device, dist)
    best_model, _ = load_model(str(best), device)
    results["final"], hyps = evaluate(best_model, tokenizer, splits["test"], cfg, cfg.eval_limit, amp, "test (best)", dist)
    results["final"]["checkpoint"] = "best-on-dev"
    if dist.main:
        write_json(results_file, results)
        write_jsonl(out / "hyps_final.jsonl", hyps)
    say(f"best-on-dev model on test: {fmt(results['final'])}")
    return results


def fmt(scores: dict) -> str:
    return ", ".join(f"{k.upper()} {v}" for k, v in scores.items() if k in ("bleu", "chrf", "wer"))


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    tmp.replace(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    ok = False
    try:
        run(cfg)
        ok = True
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:  # normal end, InputError, SystemExit(130) after a signal, or any crash
        close_distributed(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
