"""Tests of grpo_speech.py.

Two layers:
  * unit tests of the pure functions (audio features, resampling, readers, rewards, advantages,
    the GRPO loss), each checked against an independent computation written here;
  * short runs of the real command line (`python grpo_speech.py ...`) on a tiny copy of data/
    and a throw-away model that the real `data/make_model.py` builds once per session.

Run: .venv/bin/python -m pytest test_grpo_speech.py --durations=10   (about 2-3 minutes on 2 CPU cores)

Every subprocess and this process use one intra-op thread: with another job busy on a 2-core
machine, torch's 2 spinning threads made the tiny conformer ~20x slower.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import errno
import functools
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import soundfile as sf
import torch

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import grpo_speech as gs  # noqa: E402

nullamp = contextlib.nullcontext    # evaluate's autocast factory, for fp32 runs
DATA = REPO / "data"
SHIPPED_MODEL = DATA / "tiny-granite-speech"
QWEN_MODEL = DATA / "tiny-qwen2-audio"
# Subprocess timeouts only catch hangs: generous, because a loaded 2-core machine runs a CLI test
# several times slower than an idle one.
HANG = 600
TINY = ["--max-steps", "2", "--eval-limit", "4", "--dev-limit", "4", "--eval-every", "2", "--batch-size", "2",
        "--group-size", "3", "--sft-batch-size", "4", "--max-new-tokens", "8"]


# ------------------------------------------------------------------------- helpers ----


def run_cli(*args, cwd: Path, timeout: float = HANG) -> subprocess.CompletedProcess:
    """`python grpo_speech.py ARGS` in `cwd`, one thread, output captured: grpo_speech.main in this
    process (a new interpreter costs seconds a run; the suite starts dozens), or a real
    subprocess with GRPO_TEST_SUBPROCESS=1. Tests of signals, torchrun and the console start
    their own processes."""
    cmd = [sys.executable, str(REPO / "grpo_speech.py"), *map(str, args)]
    if os.environ.get("GRPO_TEST_SUBPROCESS") == "1":
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
        env.pop("RANK", None)
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = gs.main([str(a) for a in args])
            except SystemExit as e:         # argparse, or the training loop stopped by a signal
                code = e.code
            except Exception:               # what the interpreter would print, exit code 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


def run_main(*args, cwd: Path) -> tuple[int, list[str]]:
    """run_cli for a path that stops with an error: its exit code and the lines on stderr."""
    p = run_cli(*args, cwd=cwd)
    return p.returncode, p.stderr.strip().splitlines()


def run_torchrun(*args, cwd: Path, timeout: float = HANG, max_file_bytes: int = 0) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 grpo_speech.py ARGS`, as run_cli runs one process; with
    max_file_bytes, writes past that size fail as on a full disk (RLIMIT_FSIZE)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "grpo_speech.py"), *map(str, args)]

    def limit():
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if max_file_bytes else None)


def run_make_model(*args, cwd: Path, timeout: float = HANG) -> subprocess.CompletedProcess:
    """`python data/make_model.py ARGS` in `cwd`, as run_cli runs grpo_speech.py."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(DATA / "make_model.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    """The checkpoints in directories a and b hold the same tensors, bit for bit."""
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _copy_rows(src_manifest: Path, n: int, root: Path, task: str, split: str) -> None:
    rows = [json.loads(line) for line in src_manifest.read_text(encoding="utf-8").splitlines()[:n]]
    (root / task).mkdir(parents=True, exist_ok=True)
    for r in rows:
        audio = (src_manifest.parent / r["audio"]).resolve()
        dst = root / "audio" / split / audio.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy(audio, dst)
        r["audio"] = f"../audio/{split}/{audio.name}"
    (root / task / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")


def build_tiny_data(root: Path, n_pretrain: int = 24, n_split: int = 4) -> Path:
    """A tiny copy of data/ in its own layout (manifests + copied audio, relative paths).

    asr/ast rows are the first n of each manifest, so ast and asr share utterances as in data/.
    The audio is copied, not linked: data/ may be regenerated while the tests run. Retries for a
    couple of minutes if a file vanishes under a data-generation run.
    """
    deadline = time.time() + 180
    while True:
        try:
            shutil.rmtree(root, ignore_errors=True)
            for task in gs.TASKS:
                for split in ("pretrain", "train", "dev", "test"):
                    m = DATA / task / f"{split}.jsonl"
                    if split == "pretrain" and task == "sqa":
                        continue
                    _copy_rows(m, n_pretrain if split == "pretrain" else n_split, root, task, split)
            return root
        except (FileNotFoundError, json.JSONDecodeError):
            if time.time() > deadline:
                raise
            time.sleep(5)


def write_wav(path: Path, seconds: float = 0.5, sr: int = 16_000, channels: int = 1, freq: float = 440.0,
              subtype: str | None = None) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([x * (c + 1) / channels for c in range(channels)], 1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype=subtype)
    return data


def manifest_line(audio: str, target: str = "hello world", **kw) -> str:
    row = {"id": "u1", "audio": audio, "task": "asr", "text": gs.PROMPTS["asr"], "target": target, **kw}
    return json.dumps(row)


# ------------------------------------------------------------------------ fixtures ----


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return build_tiny_data(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="session")
def fixture_model_dir(tiny_data, tmp_path_factory) -> Path:
    """A throw-away model made by the real pre-training script (2 steps per stage)."""
    work = tmp_path_factory.mktemp("pretrain")
    p = run_make_model("--steps", "2,2,2,2", "--data", tiny_data, "--out", work / "model",
                       "--dev-limit", "2", cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    return work / "model"


@pytest.fixture(scope="session")
def model_tok(fixture_model_dir):
    model, tok = gs.load_model(str(fixture_model_dir), torch.device("cpu"))
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def ast_test(tiny_data) -> gs.SpeechData:
    return gs.SpeechData(gs.read_manifest(tiny_data / "ast" / "test.jsonl"))


def make_batch(model, tok, data: gs.SpeechData, idx) -> gs.Batch:
    return gs.collate(data, list(idx), tok, model.config.audio_token_id, config=model.config)


# --------------------------------------------------------------------------- audio ----


def numpy_log_mel(wave: np.ndarray) -> np.ndarray:
    """Granite Speech features from their definition, in float64 NumPy."""
    n_fft, hop, win_len, n_mels, sr = 512, 160, 400, 80, 16_000
    x = np.pad(np.asarray(wave, dtype=np.float64), n_fft // 2, mode="reflect")
    n_frames = 1 + (len(x) - n_fft) // hop
    window = np.zeros(n_fft)
    k = np.arange(win_len)
    off = (n_fft - win_len) // 2
    window[off:off + win_len] = 0.5 - 0.5 * np.cos(2 * np.pi * k / win_len)          # periodic Hann
    frames = np.stack([x[i * hop:i * hop + n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2                                  # (frames, 257)
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    pts = 700 * (10 ** (np.linspace(mel(0), mel(sr / 2), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        for j, f in enumerate(freqs):
            if lo < f <= c:
                fb[j, m] = (f - lo) / (c - lo)
            elif c < f < hi:
                fb[j, m] = (hi - f) / (hi - c)
    logmel = np.log10(np.maximum(power @ fb, 1e-10))
    logmel = np.maximum(logmel, logmel.max() - 8) / 4 + 1
    if len(logmel) % 2:
        logmel = logmel[:-1]
    return logmel.reshape(-1, 2 * n_mels)


def _assert_close_features(ours: torch.Tensor, ref: np.ndarray):
    assert tuple(ours.shape) == ref.shape
    np.testing.assert_allclose(ours.double().numpy(), ref, atol=2e-4, rtol=1e-4)


def test_log_mel_matches_numpy_definition_on_noise():
    rng = np.random.default_rng(0)
    for n in (16_000, 16_321, 480):                       # even and odd frame counts
        wave = (rng.standard_normal(n) * 0.1).astype(np.float32)
        _assert_close_features(gs.log_mel(torch.from_numpy(wave)), numpy_log_mel(wave))


def test_log_mel_matches_numpy_definition_on_real_file(tiny_data):
    wave = gs.load_audio(tiny_data / "audio" / "test" / sorted(os.listdir(tiny_data / "audio" / "test"))[0])
    ref = numpy_log_mel(wave.numpy())
    assert ref.std() > 0.05                               # real speech, not a flat floor
    _assert_close_features(gs.log_mel(wave), ref)


def test_log_mel_matches_transformers_feature_extractor():
    pytest.importorskip("torchaudio", reason="GraniteSpeechFeatureExtractor needs torchaudio")
    from transformers import GraniteSpeechFeatureExtractor
    rng = np.random.default_rng(1)
    waves = [torch.from_numpy((rng.standard_normal(n) * 0.1).astype(np.float32)) for n in (16_000, 9_000)]
    fe = GraniteSpeechFeatureExtractor()
    hf = fe(waves)                                    # transformers 5.24: tensors, no return_tensors
    ours, n_audio = gs.log_mel_batch(waves)
    torch.testing.assert_close(ours, hf["input_features"].float(), atol=2e-4, rtol=1e-4)
    assert n_audio.tolist() == [gs.num_audio_tokens(16_000), gs.num_audio_tokens(9_000)]


def _tone(freq, sr, seconds=1.0, amp=0.5):
    t = np.arange(int(sr * seconds)) / sr
    return torch.from_numpy(amp * np.sin(2 * np.pi * freq * t)).float()


def _peak_and_amplitude(y: np.ndarray, sr: int):
    core = y[len(y) // 8: -len(y) // 8]                   # away from the edges of the kernel
    core = core * np.hanning(len(core))
    spec = np.abs(np.fft.rfft(core))
    peak = np.argmax(spec) * sr / len(core)
    amp = np.sqrt(2) * np.sqrt(np.mean(y[len(y) // 8: -len(y) // 8] ** 2))
    return peak, amp


@pytest.mark.parametrize("orig,new,freqs", [(44_100, 16_000, (1000, 5000)), (48_000, 16_000, (1000, 5000)),
                                            (8_000, 16_000, (1000, 3000))])
def test_resample_keeps_tones_below_new_nyquist(orig, new, freqs):
    for f in freqs:
        x = _tone(f, orig)
        y = gs.resample(x, orig, new).numpy()
        assert len(y) == math.ceil(len(x) * new / orig)
        peak, amp = _peak_and_amplitude(y, new)
        assert abs(peak - f) <= 2.0, (f, peak)
        assert abs(amp - 0.5) / 0.5 < 0.02, (f, amp)


def test_resample_suppresses_tone_above_new_nyquist():
    x = _tone(10_000, 44_100)
    y = gs.resample(x, 44_100, 16_000).numpy()
    core = y[len(y) // 8: -len(y) // 8]
    ratio_db = 20 * np.log10(np.sqrt(np.mean(core ** 2)) / np.sqrt(np.mean(x.numpy() ** 2)))
    assert ratio_db < -20, ratio_db


@pytest.mark.parametrize("n", [1, 999, 1234, 16_000, 16_001, 44_100])
def test_resample_output_length(n):
    for orig, new in ((44_100, 16_000), (48_000, 16_000), (8_000, 16_000), (22_050, 16_000)):
        assert gs.resample(torch.zeros(n), orig, new).numel() == math.ceil(n * new / orig)


def test_num_audio_tokens_hand_formula_and_log_mel_batch():
    for n in (480, 4_799, 4_800, 16_000, 24_000, 47_999, 48_000, 100_000):
        mel_frames = n // 160 + 1
        pairs = mel_frames // 2
        expected = math.ceil(pairs / 15) * 3
        assert gs.num_audio_tokens(n) == expected
        feats, counts = gs.log_mel_batch([torch.randn(n) * 0.1])
        assert counts.tolist() == [expected]
        assert feats.shape[1] == pairs


def test_num_audio_tokens_equals_projector_outputs(model_tok):
    model, _ = model_tok
    for n in (4_800, 16_000, 23_456):
        feats, counts = gs.log_mel_batch([torch.randn(n) * 0.1])
        with torch.no_grad():
            out = model.model.projector(model.model.encoder(feats).last_hidden_state)
        assert out.shape[1] == counts.item() == gs.num_audio_tokens(n)


def test_load_audio_stereo_44k_is_averaged_and_resampled(tmp_path):
    sr = 44_100
    t = np.arange(sr // 2) / sr
    left, right = 0.4 * np.sin(2 * np.pi * 1000 * t), 0.2 * np.sin(2 * np.pi * 1000 * t)
    sf.write(str(tmp_path / "st.wav"), np.stack([left, right], 1), sr, subtype="FLOAT")
    w = gs.load_audio(tmp_path / "st.wav")
    assert w.dtype == torch.float32 and w.ndim == 1
    assert w.numel() == math.ceil(len(t) * 16_000 / sr)
    expected = gs.resample(torch.from_numpy((left + right) / 2).float(), sr, 16_000)
    torch.testing.assert_close(w, expected, atol=1e-5, rtol=0)
    peak, amp = _peak_and_amplitude(w.numpy(), 16_000)
    assert abs(peak - 1000) <= 4 and abs(amp - 0.3) < 0.01


def test_load_audio_bad_files_raise_input_error_naming_the_file(tmp_path):
    bad = tmp_path / "notaudio.wav"
    bad.write_text("this is not audio")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0), 16_000)
    for path in (bad, empty, tmp_path / "missing.wav"):
        with pytest.raises(gs.InputError, match=str(path).replace(".", r"\.")):
            gs.load_audio(path)


# ----------------------------------------------------------------------- manifests ----


def test_read_manifest_errors_name_manifest_line_or_audio(tmp_path):
    write_wav(tmp_path / "a.wav")
    m = tmp_path / "m.jsonl"
    with pytest.raises(gs.InputError, match="m.jsonl: manifest not found"):
        gs.read_manifest(m)
    cases = {
        "": "m.jsonl: manifest is empty",
        "\n\n": "m.jsonl: manifest is empty",
        manifest_line("a.wav") + "\n{not json\n": r"m.jsonl:2: not valid JSON",
        json.dumps({"id": "x", "audio": "a.wav", "task": "asr", "text": "t"}): r"m.jsonl:1: .*target",
        manifest_line("a.wav", target="  "): r"m.jsonl:1: empty reference",
        manifest_line("a.wav") + "\n" + manifest_line("gone.wav"): r"gone.wav: audio file not found .*m.jsonl",
    }
    for text, pattern in cases.items():
        m.write_text(text)
        with pytest.raises(gs.InputError, match=pattern):
            gs.read_manifest(m)
    m.write_text(manifest_line("a.wav") + "\n")
    rows = gs.read_manifest(m)
    assert rows[0]["audio"] == str((tmp_path / "a.wav").resolve())


def test_read_manifest_unreadable_or_empty_audio(tmp_path):
    (tmp_path / "junk.wav").write_text("junk")
    sf.write(str(tmp_path / "zero.wav"), np.zeros(0), 16_000)
    m = tmp_path / "m.jsonl"
    for name in ("junk.wav", "zero.wav"):
        m.write_text(manifest_line(name))
        with pytest.raises(gs.InputError, match=name):
            gs.read_manifest(m)


def test_covost2_reader_targets_prompts_and_48k_audio(tmp_path):
    clips = tmp_path / "clips"
    sents = {"train": [("a.wav", "the dog runs", "Der Hund läuft"), ("b.ogg", "a cat \"sleeps\"", "Eine Katze schläft")],
             "dev": [("c.wav", "hello there", "Hallo da")], "test": [("d.wav", "good day", "Guten Tag")]}
    for split, rows in sents.items():
        lines = ["path\tsentence\ttranslation\tclient_id"]
        for path, en, de in rows:
            write_wav(clips / path, sr=48_000, subtype="VORBIS" if path.endswith(".ogg") else None)
            lines.append(f"{path}\t{en}\t{de}\tclient{split}")
        (tmp_path / f"covost_v2.en_de.{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for task, col in (("ast", 2), ("asr", 1)):
        splits = gs.load_splits(tmp_path, task)
        for split, rows in sents.items():
            got = splits[split]
            assert [r["target"] for r in got] == [r[col] for r in rows]
            assert all(r["text"] == gs.PROMPTS[task] and r["task"] == task for r in got)
            assert [Path(r["audio"]).name for r in got] == [r[0] for r in rows]
    w = gs.SpeechData(gs.load_splits(tmp_path, "ast")["train"]).wave(0)
    assert w.numel() == 8_000                             # 0.5 s at 48 kHz -> 16 kHz


def test_librisqa_reader_prompts_and_dev_split(tmp_path):
    items = {"train": [], "test": []}
    for split, n in (("train", 10), ("test", 3)):
        for i in range(n):
            rel = f"{split}/spk{i}/utt{i}.wav"
            write_wav(tmp_path / rel, seconds=0.1)
            items[split].append({"speech_path": rel, "question": f"what is {split} {i}?", "answer": f"answer {split} {i}",
                                 "text": f"spoken {i}", "duration": 0.1})
        (tmp_path / f"LibriSQA-PartI-{split}.json").write_text(json.dumps(items[split]))
    s = gs.load_splits(tmp_path, "sqa")
    assert len(s["dev"]) == 2 and len(s["train"]) == 8 and len(s["test"]) == 3
    train_ids, dev_ids = {r["id"] for r in s["train"]}, {r["id"] for r in s["dev"]}
    assert not train_ids & dev_ids and train_ids | dev_ids == {it["speech_path"] for it in items["train"]}
    by_path = {it["speech_path"]: it for it in items["train"] + items["test"]}
    for rows in s.values():
        for r in rows:
            it = by_path[r["id"]]
            assert r["target"] == it["answer"] and r["task"] == "sqa"
            assert r["text"] == gs.PROMPTS["sqa"].format(question=it["question"])
            assert "<|audio|>" in r["text"] and it["question"] in r["text"]
            assert Path(r["audio"]).resolve() == (tmp_path / it["speech_path"]).resolve()
    # deterministic: a second read gives the same split
    assert [r["id"] for r in gs.load_splits(tmp_path, "sqa")["dev"]] == [r["id"] for r in s["dev"]]


# ------------------------------------------------------------------------- rewards ----


PAIRS = [("Der Hund läuft im Park", "Der Hund läuft im Park"), ("Der Hund", "Der Hund läuft im Park"),
         ("", "Der Hund läuft"), ("Katze schläft heute", "Die Katze schläft"), ("a b c d", "e f g h")]


def test_bleu_reward_is_sentence_bleu_over_100():
    c, r = zip(*PAIRS)
    got = gs.bleu_reward(list(c), list(r))
    expected = [sacrebleu.sentence_bleu(ci, [ri]).score / 100 for ci, ri in PAIRS]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[0] == pytest.approx(1.0) and got[2] == 0


def test_chrf_reward_is_sentence_chrf_over_100():
    c, r = zip(*PAIRS)
    got = gs.chrf_reward(list(c), list(r))
    expected = [sacrebleu.sentence_chrf(ci, [ri]).score / 100 for ci, ri in PAIRS]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert 0 < got[3] < 1


# repeats (clipped counts), empty sides, German (non-ASCII letters split words), punctuation and
# case, no overlap, one-word texts (no bigram), a subsequence that is not a substring
ROUGE_CASES = [*PAIRS, ("the the the the", "the cat the mat"), ("the cat the cat", "the cat sat on the mat"),
               ("cat cat", "cat"), ("", ""),
               ("Das Mädchen läuft schnell.", "das MÄDCHEN läuft!"), ("größer, älter", "grosser alter"),
               ("Hello, world!! It's 3pm.", "hello world it s 3 pm"), ("Ja", "ja"), ("Nein", "Ja"),
               ("a x b y c", "a b c"), ("Der Hund", "")]


def test_rouge_equals_the_rouge_score_package():
    """ROUGE-1/2/L F-measures as Google's rouge-score computes them (no stemmer): its score() takes
    (target, prediction)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    diffs = [abs(gs.rouge(h, r)[k] - scorer.score(r, h)[k].fmeasure)
             for h, r in ROUGE_CASES for k in gs.ROUGE_KEYS]
    assert max(diffs) <= 1e-12
    assert gs.rouge_tokens("Das Mädchen, 2x!") == ["das", "m", "dchen", "2x"]   # ASCII only
    # by hand: unigrams min(2, 2) + min(2, 1) = 3 of 4 and 6, bigrams 1 of 3 and 5, LCS "the cat the"
    assert gs.rouge("the cat the cat", "the cat sat on the mat") == pytest.approx(
        {"rouge1": 0.6, "rouge2": 0.25, "rougeL": 0.6})
    assert gs.rouge("a x b y c", "a b c")["rougeL"] == pytest.approx(2 * 0.6 * 1 / 1.6)
    assert gs.rouge("", "") == gs.rouge("Der Hund", "") == {k: 0.0 for k in gs.ROUGE_KEYS}


@pytest.mark.parametrize("name,key", [("rouge-1", "rouge1"), ("rouge-2", "rouge2"), ("rouge-l", "rougeL")])
def test_rouge_rewards_are_sentence_f_measures(name, key):
    h, r = zip(*ROUGE_CASES)
    got = gs.REWARDS[name](list(h), list(r))
    assert got.tolist() == pytest.approx([gs.rouge(hi, ri)[key] for hi, ri in ROUGE_CASES])
    assert got[0] == 1 and got[2] == 0 and ((0 < got) & (got < 1)).any()
    assert name in gs.Config.__dataclass_fields__["reward"].metadata["choices"]


def test_top_p_filter_keeps_smallest_set_reaching_top_p():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda p: torch.isfinite(gs.top_p_filter(logits, p))[0].tolist()
    assert kept(0.45) == [False, True, False, False]
    assert kept(0.75) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(1.0) == [True] * 4


# ---------------------------------------------------------------------- advantages ----


def test_group_advantages_hand_worked():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.6])
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / 1.0001
    # group 2: mean 0.2, deviations (-0.2, -0.2, 0.4), unbiased var (0.04+0.04+0.16)/2 = 0.12
    s2 = math.sqrt(0.12) + 1e-4
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, -0.2 / s2, -0.2 / s2, 0.4 / s2]
    assert gs.group_advantages(r, 3).tolist() == pytest.approx(expected, abs=1e-6)
    assert gs.group_advantages(r, 3, scale_rewards=False).tolist() == pytest.approx([-1, 0, 1, -0.2, -0.2, 0.4], abs=1e-6)
    assert gs.group_advantages(torch.full((6,), 0.7), 3).tolist() == [0.0] * 6
    assert gs.group_advantages(torch.full((4,), 0.7), 2, scale_rewards=False).abs().max() < 1e-7


# ---------------------------------------------------------------------------- loss ----

MAX_LEN = 7  # --max-new-tokens in the loss tests: wider than any batch below, as in a real run


def reference_grpo_loss(logp, old, ref, A, lengths, beta, eps_lo, eps_hi, loss_type, off=None, max_len=MAX_LEN):
    """The objective written token by token: -mean of min(s A, clip(s) A) - beta k3, per loss_type.
    dr_grpo divides by N * max_len, the run's completion budget (TRL's max_completion_length)."""
    N, T = logp.shape
    per_row = []
    for i in range(N):
        terms = []
        for t in range(int(lengths[i])):
            if off is not None and bool(off[i]):
                surrogate = torch.exp(logp[i, t]) * A[i]
            else:
                s = torch.exp(logp[i, t] - old[i, t])
                s_clip = torch.minimum(torch.maximum(s, torch.tensor(1 - eps_lo)), torch.tensor(1 + eps_hi))
                surrogate = torch.minimum(s * A[i], s_clip * A[i])
            d = ref[i, t] - logp[i, t]
            k3 = torch.exp(d) - d - 1
            terms.append(-(surrogate - beta * k3))
        per_row.append(terms)
    if loss_type == "dapo":
        return sum(sum(ts) for ts in per_row) / sum(len(ts) for ts in per_row)
    if loss_type == "grpo":
        return sum(sum(ts) / len(ts) for ts in per_row) / N
    return sum(sum(ts) for ts in per_row) / (N * max_len)


def _loss_inputs(seed=0, N=6, T=5, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(N, T, generator=g) * 3 - 0.1
    logp = (old + torch.randn(N, T, generator=g) * spread).requires_grad_()   # ratios 0.4..2.5: clipped both sides
    ref = old + torch.randn(N, T, generator=g) * 0.3
    A = torch.randn(N, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])[:N]
    mask = torch.arange(T)[None] < lengths[:, None]
    return logp, old, ref, A, lengths, mask


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_hi", [None, 0.28])
@pytest.mark.parametrize("with_off", [False, True])
def test_grpo_loss_value_and_gradient_match_reference(loss_type, beta, eps_hi, with_off):
    logp, old, ref, A, lengths, mask = _loss_inputs()
    ratio = torch.exp(logp - old)[mask]
    assert (ratio > 1.28).any() and (ratio < 0.8).any()   # clipping is exercised on both sides
    off = torch.tensor([False, False, True, False, False, True]) if with_off else None
    loss, metrics = gs.grpo_loss(logp, old, ref, A, mask, beta=beta, epsilon=0.2, epsilon_high=eps_hi,
                                 loss_type=loss_type, off_policy=off, max_completion_length=MAX_LEN)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_()
    expected = reference_grpo_loss(logp2, old, ref, A, lengths, beta, 0.2, 0.2 if eps_hi is None else eps_hi,
                                   loss_type, off)
    (grad2,) = torch.autograd.grad(expected, logp2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, grad2, atol=1e-6, rtol=1e-5)


def test_grpo_loss_clip_higher_changes_which_tokens_are_clipped():
    logp, old, ref, A, lengths, mask = _loss_inputs()
    A = torch.ones(6)
    ratio = torch.exp(logp - old).detach()
    _, m_sym = gs.grpo_loss(logp, old, ref, A, mask, beta=0, epsilon=0.2, loss_type="dapo")
    _, m_hi = gs.grpo_loss(logp, old, ref, A, mask, beta=0, epsilon=0.2, epsilon_high=0.5, loss_type="dapo")
    n = mask.sum().item()
    assert m_sym["loss/clip_high"] == pytest.approx(((ratio > 1.2) & mask).sum().item() / n)
    assert m_hi["loss/clip_high"] == pytest.approx(((ratio > 1.5) & mask).sum().item() / n)
    assert m_hi["loss/clip_high"] < m_sym["loss/clip_high"]
    # with A > 0, a token above 1 + eps_high gets no gradient; one between 1.2 and 1.5 does under clip-higher
    loss, _ = gs.grpo_loss(logp, old, ref, A, mask, beta=0, epsilon=0.2, epsilon_high=0.5, loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logp)
    assert (grad[(ratio > 1.5) & mask] == 0).all()
    mid = (ratio > 1.2) & (ratio < 1.5) & mask
    assert mid.any() and (grad[mid] != 0).all()


def test_grpo_loss_on_policy_dapo_gradient_is_reinforce():
    logp, _, ref, A, lengths, mask = _loss_inputs(seed=3)
    loss, metrics = gs.grpo_loss(logp, logp.detach(), ref, A, mask, beta=0.0, loss_type="dapo")
    (grad,) = torch.autograd.grad(loss, logp)
    expected = -A[:, None] * mask.float() / mask.sum()
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=1e-6)
    assert metrics["loss/ratio_mean"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(-(A[:, None] * mask).sum().item() / mask.sum().item(), abs=1e-6)


def test_grpo_loss_k3_is_zero_when_reference_equals_policy():
    logp, old, _, A, lengths, mask = _loss_inputs(seed=4)
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        l0, _ = gs.grpo_loss(logp, old, logp.detach(), A, mask, beta=0.0, loss_type=loss_type, max_completion_length=7)
        l1, m1 = gs.grpo_loss(logp, old, logp.detach(), A, mask, beta=0.04, loss_type=loss_type,
                              max_completion_length=7)
        assert m1["kl/mean"] == 0.0
        assert l1.item() == pytest.approx(l0.item(), abs=1e-7)
    _, m = gs.grpo_loss(logp, old, old, A, mask, beta=0.04)
    assert m["kl/mean"] > 0                                # and it is not always 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_ignores_tokens_beyond_each_length(loss_type):
    logp, old, ref, A, lengths, mask = _loss_inputs(seed=5)
    off = torch.tensor([False, True, False, False, False, False])
    loss, _ = gs.grpo_loss(logp, old, ref, A, mask, beta=0.04, epsilon_high=0.3, loss_type=loss_type, off_policy=off, max_completion_length=MAX_LEN)
    (grad,) = torch.autograd.grad(loss, logp)
    g = torch.Generator().manual_seed(9)
    noise = lambda: torch.where(mask, 0.0, torch.randn(mask.shape, generator=g) * 5)
    logp_b = (logp.detach() + noise()).requires_grad_()
    loss_b, _ = gs.grpo_loss(logp_b, old + noise(), ref + noise(), A, mask, beta=0.04, epsilon_high=0.3,
                             loss_type=loss_type, off_policy=off, max_completion_length=MAX_LEN)
    (grad_b,) = torch.autograd.grad(loss_b, logp_b)
    assert loss_b.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(grad_b, grad)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


def test_dr_grpo_normaliser_is_a_constant_not_the_batch_width():
    """Dr. GRPO divides by N * max_new_tokens: padding columns (a longer batch mate, or another
    process's width) change neither the loss nor any token's gradient."""
    logp, old, ref, A, lengths, mask = _loss_inputs(seed=6)
    kw = dict(beta=0.04, epsilon=0.2, loss_type="dr_grpo", max_completion_length=48)
    loss, _ = gs.grpo_loss(logp, old, ref, A, mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    wide = lambda x, fill: torch.cat([x, torch.full((x.shape[0], 40), fill)], dim=1)   # T 5 -> 45
    logp_w = wide(logp.detach(), -1.0).requires_grad_()
    loss_w, _ = gs.grpo_loss(logp_w, wide(old, -1.0), wide(ref, -1.0), A, wide(mask, False), **kw)
    (grad_w,) = torch.autograd.grad(loss_w, logp_w)
    assert loss_w.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(grad_w[:, :5], grad)
    assert (grad_w[:, 5:] == 0).all()
    # the value is sum / (N * max_new_tokens), token by token
    expected = reference_grpo_loss(logp.detach(), old, ref, A, lengths, 0.04, 0.2, 0.2, "dr_grpo", max_len=48)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError):
        gs.grpo_loss(logp, old, ref, A, mask, beta=0.04, loss_type="dr_grpo")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "sft"])
def test_micro_batch_losses_over_the_batch_normaliser_add_up_to_the_batch_loss(loss_type):
    """Given the whole batch's normaliser (loss_normaliser over all its rows), two micro-batches'
    losses, padded to their own widths, sum to the one-batch loss, and their gradients to its
    gradient; without it each is its own batch's (a different number)."""
    logp, old, ref, A, lengths, mask = _loss_inputs(seed=7)
    off = torch.tensor([False, True, False, False, True, False])

    def loss_of(lp, rows, normaliser=None):
        w = int(lengths[rows].max())
        if loss_type == "sft":
            return gs.sft_loss(lp[rows, :w], mask[rows, :w], normaliser)
        return gs.grpo_loss(lp[rows, :w], old[rows, :w], ref[rows, :w], A[rows], mask[rows, :w],
                            beta=0.04, epsilon_high=0.3, loss_type=loss_type, off_policy=off[rows],
                            max_completion_length=MAX_LEN, normaliser=normaliser)[0]
    whole = loss_of(logp, slice(0, 6))
    (g_whole,) = torch.autograd.grad(whole, logp)
    norm = gs.loss_normaliser(mask, "dapo" if loss_type == "sft" else loss_type, MAX_LEN)
    parts = [loss_of(logp, rows, norm) for rows in (slice(0, 2), slice(2, 6))]
    (g_parts,) = torch.autograd.grad(parts[0] + parts[1], logp)
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(g_parts, g_whole, atol=1e-7, rtol=1e-6)
    alone = loss_of(logp, slice(0, 2)) + loss_of(logp, slice(2, 6))
    assert alone.item() != pytest.approx(whole.item(), rel=1e-3)


def test_batch_indices_walk_each_epochs_permutation():
    """Step s takes places s*size..(s+1)*size-1 of the epochs' permutations laid end to end: a
    step that spans two epochs takes the end of one and the start of the next."""
    data = gs.SpeechData([{"id": str(i)} for i in range(7)])
    stream = data.order(5, 0) + data.order(5, 1) + data.order(5, 2)
    assert data.order(5, 0) != data.order(5, 1) and sorted(data.order(5, 1)) == list(range(7))
    for step in range(5):                         # size 3: step 2 spans epochs 0 and 1
        assert data.batch_indices(5, step, 3) == stream[step * 3:(step + 1) * 3]
    assert data.batch_indices(5, 1, 10) == stream[10:20]   # larger than an epoch: three of them


def test_dr_grpo_two_processes_sum_to_the_one_process_gradient():
    """Two halves of a batch, each padded to its own width, normalised over its own rows and
    weighted by its share of the prompts (1 / B each), give the summed gradient of the whole batch:
    what torchrun's all-reduce adds."""
    G, B = 3, 2
    logp, old, ref, A, _, _ = _loss_inputs(seed=7, N=6, T=5)
    lengths = torch.tensor([2, 3, 1, 4, 5, 2])                 # widths 3 and 5 on the two processes
    mask = torch.arange(5)[None] < lengths[:, None]
    kw = dict(beta=0.04, epsilon=0.2, loss_type="dr_grpo", max_completion_length=9)
    loss, _ = gs.grpo_loss(logp, old, ref, A, mask, **kw)
    (full,) = torch.autograd.grad(loss, logp)
    summed = torch.zeros_like(full)
    for rows in (slice(0, G), slice(G, 2 * G)):
        width = int(lengths[rows].max())                       # each process pads to its own width
        lp = logp.detach()[rows, :width].clone().requires_grad_()
        part, _ = gs.grpo_loss(lp, old[rows, :width], ref[rows, :width], A[rows], mask[rows, :width], **kw)
        (g,) = torch.autograd.grad(part * (1 / B), lp)
        summed[rows, :width] = g
    torch.testing.assert_close(summed, full)


def _rollout_cfg(**kw) -> gs.Config:
    return gs.resolve_config(gs.Config(**{"group_size": 3, "batch_size": 2, **kw}))


@pytest.mark.parametrize("budget", [3, 40])
def test_mp_grpo_reference_is_scored_as_trained_and_kept_out_of_reward_metrics(model_tok, ast_test, budget):
    """MP-GRPO's off-policy member is the reference cut to the budget, and its reward is that of
    the cut text; reward/* metrics average the on-policy samples only."""
    model, tok = model_tok
    cfg = _rollout_cfg(mode="mp-grpo", max_new_tokens=budget)
    batch = make_batch(model, tok, ast_test, [0, 1])
    suppress = gs.suppressed_ids(tok, model.config)
    r, m = gs.rollout(cfg, model, None, tok, batch, 0, [0, 1], suppress, nullamp)
    completions, lengths, rewards, off = r.completions, r.mask.sum(1), r.rewards, r.off_policy
    assert off.tolist() == [False, False, True] * 2
    assert torch.equal(r.advantages, gs.group_advantages(rewards, 3))
    for b, target in enumerate(batch.targets):
        full = gs.encode_target(tok, target, tok.eos_token_id)
        assert len(full) > 3                                   # so budget 3 truncates every reference
        i = 3 * b + 2
        row = completions[i, :lengths[i]].tolist()
        assert row == full[:budget]
        text = tok.decode(row, skip_special_tokens=True).strip()
        assert rewards[i].item() == pytest.approx(sacrebleu.sentence_bleu(text, [target]).score / 100)
        if budget == 3:
            assert rewards[i].item() < 1.0
    on = rewards[~off]
    assert m["reward/mean"] == pytest.approx(on.mean().item())
    assert m["reward/ref_mean"] == pytest.approx(rewards[off].mean().item())
    assert m["reward/ref_truncated_frac"] == (1.0 if budget == 3 else 0.0)


class _RecordingOptimizer:
    """Keeps the gradient that policy_update hands to step()."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class _OtherProcess(gs.Dist):
    """One process of two: the all-reduce of the (float) loss normaliser adds the other process's;
    integer flags and gradients come back as they are (the other process agrees, adds zeros)."""

    def __init__(self, other_normaliser: float = 0.0):
        super().__init__()
        self.other = other_normaliser

    def sum(self, x):
        return x + self.other if x.dim() == 0 and x.is_floating_point() else x


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_policy_update_micro_batches_and_processes_give_the_batch_gradient(model_tok, ast_test, loss_type):
    """Micro-batch losses over the whole batch's normaliser: --grad-accum 2, and two processes that
    each pad to their own width, sum to the gradient of the whole MP-GRPO batch in one pass."""
    model, tok = model_tok
    params = [p for n, p in model.named_parameters() if not n.startswith("model.encoder.")]
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.encoder."))
    G, B = 3, 4
    cfg = gs.resolve_config(gs.Config(mode="mp-grpo", group_size=G, batch_size=B, max_new_tokens=6,
                                      loss_type=loss_type, max_grad_norm=1e9, beta=0.04))
    batch = make_batch(model, tok, ast_test, range(B))
    lengths = torch.tensor([6, 2, 3, 1, 4, 6, 2, 2, 1, 5, 3, 2])
    g = torch.Generator().manual_seed(0)
    completions = torch.randint(5, 50, (B * G, 6), generator=g)
    mask = torch.arange(6)[None] < lengths[:, None]
    off = torch.tensor([False, False, True] * B)
    advantages = torch.randn(B * G, generator=g)
    with torch.no_grad():
        ref = gs.completion_logprobs(model, batch, completions, G) + 0.1 * torch.randn(B * G, 6, generator=g)

    def grads(cfg, rows, dist):
        opt = _RecordingOptimizer(params)
        w = int(lengths[rows].max())
        r = gs.Rollout(completions[rows, :w], mask[rows, :w], G, None, advantages[rows], None, ref[rows, :w],
                       off[rows])
        gs.policy_update(cfg, model, params, opt, batch.select(rows.start // G, rows.stop // G), r, B,
                         gs.TrainState(), nullamp, dist)
        return opt.grads

    whole = grads(cfg, slice(0, B * G), gs.Dist())
    accum = grads(dataclasses.replace(cfg, grad_accum=2), slice(0, B * G), gs.Dist())
    halves = [grads(cfg, rows, _OtherProcess(float(gs.loss_normaliser(mask[other], loss_type, 6))))
              for rows, other in ((slice(0, 2 * G), slice(2 * G, B * G)),
                                  (slice(2 * G, B * G), slice(0, 2 * G)))]
    for w, a, h0, h1 in zip(whole, accum, *halves):
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(h0 + h1, w, atol=1e-6, rtol=1e-4)
    assert any(w.abs().max() > 0 for w in whole)


@pytest.fixture(scope="session")
def qwen():
    """The shipped tiny Qwen2-Audio (random weights, the released structure)."""
    model, tok = gs.load_model(str(QWEN_MODEL), torch.device("cpu"))
    return model.eval(), tok


@pytest.fixture(scope="session")
def shipped():
    model, tok = gs.load_model(str(SHIPPED_MODEL), torch.device("cpu"))
    return model.eval(), tok


@pytest.fixture(scope="session")
def qwen_no_gqa(tmp_path_factory) -> Path:
    """The tiny Qwen2-Audio with the 7B's kinds (the shipped one has GQA, 4 heads / 2): as many
    key-value heads as heads, their new rows drawn at random (copies would hide a head paired with
    the wrong key), an untied head, a vocabulary larger than the tokenizer; the processor files."""
    from transformers import Qwen2AudioForConditionalGeneration
    model = Qwen2AudioForConditionalGeneration.from_pretrained(QWEN_MODEL)
    config = copy.deepcopy(model.config)
    text = config.text_config
    text.num_key_value_heads = text.num_attention_heads
    g = torch.Generator().manual_seed(3)
    rows = model.model.language_model.layers[0].self_attn.q_proj.out_features      # heads x head_dim
    state = {k: torch.randn((rows,) + tuple(v.shape[1:]), generator=g) * v.std()
             if "language_model." in k and k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias",
                                                       "v_proj.bias")) else v
             for k, v in model.state_dict().items()}
    released = Qwen2AudioForConditionalGeneration(config)
    released.load_state_dict(state)
    assert not text.tie_word_embeddings and text.vocab_size > len(gs.Qwen2Audio().tokenizer(QWEN_MODEL))
    dst = tmp_path_factory.mktemp("qwen-no-gqa")
    for f in QWEN_MODEL.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    released.save_pretrained(dst)
    return dst


def _released_kind(model):
    """The trained shipped network with the released 2B's kinds of values (GQA: half the key and
    value heads kept; logits_scaling 8, embedding multiplier 12, residual 0.22): the tiny model's
    1.0 multipliers and full heads would hide a pass that skips or repeats one of them."""
    from transformers import GraniteSpeechForConditionalGeneration
    config = copy.deepcopy(model.config)
    text = config.text_config
    text.num_key_value_heads, text.logits_scaling = text.num_attention_heads // 2, 8.0
    text.embedding_multiplier, text.residual_multiplier = 12.0, 0.22
    kv_rows = text.num_key_value_heads * text.hidden_size // text.num_attention_heads
    state = {k: v[:kv_rows] if k.endswith(("k_proj.weight", "v_proj.weight")) else v
             for k, v in model.state_dict().items()}
    released = GraniteSpeechForConditionalGeneration(config)
    released.load_state_dict(state)
    return released.eval()


def _grads_of(model, fn, batch, completions, G, mask, **kw):
    """fn's log-probs and the gradient of a fixed weighting of them, for every parameter."""
    model.zero_grad(set_to_none=True)
    logp = fn(model, batch, completions, G, **kw)
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=logp.dtype)
    (logp * weights * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), grads


@pytest.mark.parametrize("variant", ["shipped", "released", "checkpointing", "lora", "qwen2-audio",
                                     "qwen2-audio-lora", "qwen2-audio-no-gqa"])
def test_shared_prompt_pass_equals_the_per_completion_pass(shipped, qwen, qwen_no_gqa, ast_test, variant):
    """completion_logprobs runs each prompt once for its G completions: log-probs equal running
    every [prompt + completion] (bench's per_completion_logprobs) within 1e-5 in fp32, and in fp64
    every gradient that is not zero in exact arithmetic within 1e-4 relative; left-padded prompts
    of different lengths, completions of different lengths. Granite Speech and Qwen2-Audio."""
    import bench_grpo_speech as bench
    model, tok = qwen if variant.startswith("qwen") else shipped
    if variant == "qwen2-audio-no-gqa":
        model, tok = gs.load_model(str(qwen_no_gqa), torch.device("cpu"))
    model = _released_kind(model) if variant == "released" else copy.deepcopy(model).eval()
    model.requires_grad_(True)
    if variant.endswith("lora"):
        gs.add_lora(model, gs.Config(lora=4))
        for _, layer in gs.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))
    if variant == "checkpointing":
        gs.checkpoint_layers(model)
    batch = make_batch(model, tok, ast_test, [0, 1, 2])
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1        # prompts of different lengths
    G, T = 3, 7
    g = torch.Generator().manual_seed(0)
    completions = torch.randint(5, len(tok), (3 * G, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([7, 1, 4, 2, 7, 5, 3, 6, 7])[:, None]
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        model.to(dtype)
        b = dataclasses.replace(batch, features=batch.features.to(dtype))
        shared, g_shared = _grads_of(model, gs.completion_logprobs, b, completions, G, mask,
                                     train_encoder=True)
        every, g_every = _grads_of(model, bench.per_completion_logprobs, b, completions, G, mask,
                                   train_encoder=True)
        torch.testing.assert_close(shared[mask], every[mask], atol=tol, rtol=0)
    # the key biases of an attention over a softmax get exactly zero gradient: skip those
    assert g_shared.keys() == g_every.keys() and len(g_every) > 20
    scale = max(g.abs().max() for g in g_every.values())
    for name, grad in g_every.items():
        if grad.abs().max() > 1e-12 * scale:
            torch.testing.assert_close(g_shared[name], grad, atol=1e-4 * grad.abs().max(), rtol=0,
                                       msg=name)


def test_encoder_states_given_change_nothing(shipped, ast_test):
    """train() runs a frozen encoder once a step and passes its states down (encoded=): sampling,
    pi_ref's pass and the update's micro-batches (their rows of it) compute what running it would."""
    model, tok = shipped
    batch = make_batch(model, tok, ast_test, [0, 1, 2, 3])
    encoded = gs.encoder_states(model, batch)
    completions = torch.randint(5, len(tok), (8, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(gs.completion_logprobs(model, batch, completions, 2, encoded=encoded),
                           gs.completion_logprobs(model, batch, completions, 2))
        part = batch.select(2, 4)
        assert torch.equal(gs.completion_logprobs(model, part, completions[4:], 2, encoded=encoded[2:4]),
                           gs.completion_logprobs(model, part, completions[4:], 2))
        # the states are used, not recomputed: another clip's states change the answer
        swapped = encoded[[1, 0, 2, 3]]
        assert not torch.equal(gs.completion_logprobs(model, batch, completions, 2, encoded=swapped),
                               gs.completion_logprobs(model, batch, completions, 2))
    samples = [gs.sample_groups(model, batch, 2, max_new_tokens=6, eos_id=tok.eos_token_id,
                                pad_id=tok.pad_token_id, uniforms=gs.row_uniforms(0, 0, range(4), 2, 6),
                                encoded=e)
               for e in (encoded, None)]
    assert torch.equal(samples[0].tokens, samples[1].tokens)
    assert torch.equal(samples[0].sampler_logp, samples[1].sampler_logp)


def test_shared_prompt_pass_under_bf16_is_as_close_as_bf16_itself(shipped, ast_test):
    """Under bf16 autocast the shared and per-completion passes round differently. Tolerance: the
    two differ by no more than bf16 autocast already moves the per-completion pass from fp32."""
    import bench_grpo_speech as bench
    model, tok = shipped
    model = _released_kind(model)
    batch = make_batch(model, tok, ast_test, [0, 1, 2])
    completions = torch.randint(5, len(tok), (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = bench.per_completion_logprobs(model, batch, completions, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            shared = gs.completion_logprobs(model, batch, completions, 2)
            every = bench.per_completion_logprobs(model, batch, completions, 2)
    assert shared.dtype == torch.float32
    bf16_error = (every - fp32).abs().max()
    assert bf16_error > 0 and (shared - every).abs().max() <= bf16_error


# ---------------------------------------------------------------- model: sampling ----


def test_completion_logprobs_holds_two_vocabulary_sized_tensors_forward_three_backward(model_tok, ast_test):
    """At paper scale an fp32 (N, T, V) tensor is 2.5 GB at N = 64 (315 MB a group): logits, log-softmax,
    exp and their product for the entropy were all alive at once. Counted with a dispatch mode that tracks
    which storages made inside completion_logprobs (then its backward) are alive after each op; the README's
    memory arithmetic uses these counts."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    class MostAlive(TorchDispatchMode):
        def __init__(self, nbytes):
            super().__init__()
            self.nbytes, self.live, self.most = nbytes, {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.live = {k: ref for k, ref in self.live.items() if not ref.expired()}
            for x in torch.utils._pytree.tree_leaves(out):
                if isinstance(x, torch.Tensor) and x.untyped_storage().nbytes() == self.nbytes:
                    self.live.setdefault(x.untyped_storage().data_ptr(), StorageWeakRef(x.untyped_storage()))
            self.most = max(self.most, len(self.live))
            return out

    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0, 1])
    G, T, V = 4, 12, model.config.text_config.vocab_size
    completions = torch.randint(0, 200, (2 * G, T), generator=torch.Generator().manual_seed(0))
    trained = copy.deepcopy(model).requires_grad_(True)
    with MostAlive(2 * G * T * V * 4) as counter:
        logp, entropy = gs.completion_logprobs(trained, batch, completions, G, with_entropy=True)
    assert counter.most == 2                       # log-softmax's input and output, then its output alone
    assert logp.shape == entropy.shape == (2 * G, T) and bool((entropy > 0).all())
    with MostAlive(2 * G * T * V * 4) as counter:  # gather's gradient, log-softmax's output, its input's gradient
        (logp * torch.linspace(-1, 1, T)).sum().backward()
    assert counter.most == 3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_teacher_forced(model_tok, ast_test, temperature):
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0, 1])
    suppress = gs.suppressed_ids(tok, model.config)
    s = gs.sample_groups(model, batch, 3, max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         temperature=temperature, suppress=suppress, uniforms=gs.row_uniforms(0, 0, [0, 1], 3, 8))
    with torch.no_grad():
        tf = gs.completion_logprobs(model, batch, s.tokens, 3, temperature)
    mask = torch.arange(s.tokens.shape[1])[None] < s.lengths[:, None]
    assert s.tokens.shape[0] == 6 and mask.sum() > 6
    torch.testing.assert_close(s.sampler_logp[mask], tf[mask], atol=1e-4, rtol=0)


def test_greedy_sampler_equals_transformers_generate(model_tok, ast_test):
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0, 2])
    assert (batch.attention_mask == 0).any()              # left padding is exercised
    eos, pad = tok.eos_token_id, tok.pad_token_id
    s = gs.sample_groups(model, batch, 1, max_new_tokens=8, eos_id=eos, pad_id=pad, temperature=0.0, suppress=None)
    for b, i in enumerate([0, 2]):                        # generate one prompt at a time: its encoder takes no mask
        one = make_batch(model, tok, ast_test, [i])
        with torch.no_grad():
            out = model.generate(input_ids=one.input_ids, input_features=one.features,
                                 input_features_mask=one.features_mask, attention_mask=one.attention_mask,
                                 max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        ref = out[0, one.input_ids.shape[1]:].tolist()
        ref_n = ref.index(eos) + 1 if eos in ref else len(ref)
        n = int(s.lengths[b])
        assert n == ref_n and s.tokens[b, :n].tolist() == ref[:ref_n]


def test_lengths_stop_at_first_eos_and_pad_follows(model_tok, ast_test):
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0, 1])
    pad = tok.pad_token_id
    u = gs.row_uniforms(1, 0, [0, 1], 3, 8)
    free = gs.sample_groups(model, batch, 3, max_new_tokens=8, eos_id=-1, pad_id=pad, temperature=1.0, uniforms=u)
    assert free.lengths.tolist() == [8] * 6               # no EOS: every row runs to max_new_tokens
    eos = int(free.tokens[0, 2])                           # a token the sampler does produce, used as EOS
    s = gs.sample_groups(model, batch, 3, max_new_tokens=8, eos_id=eos, pad_id=pad, temperature=1.0, uniforms=u)
    assert s.lengths[0] <= 3
    for row, n, lp in zip(s.tokens.tolist(), s.lengths.tolist(), s.sampler_logp):
        first = row.index(eos) + 1 if eos in row else None
        assert n == (first if first is not None else 8)
        assert all(t == pad for t in row[n:])
        assert (lp[n:] == 0).all() and (lp[:n] < 0).all()
    assert s.tokens.shape[1] == s.lengths.max()


def test_completion_does_not_depend_on_batch_mates(model_tok, ast_test):
    model, tok = model_tok
    kw = dict(max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0)
    both = gs.sample_groups(model, make_batch(model, tok, ast_test, [0, 3]), 2,
                            uniforms=gs.row_uniforms(0, 5, [0, 3], 2, 8), **kw)
    alone = gs.sample_groups(model, make_batch(model, tok, ast_test, [3]), 2,
                             uniforms=gs.row_uniforms(0, 5, [3], 2, 8), **kw)
    for k in range(2):
        n = int(alone.lengths[k])
        assert int(both.lengths[2 + k]) == n
        assert both.tokens[2 + k, :n].tolist() == alone.tokens[k, :n].tolist()
        torch.testing.assert_close(both.sampler_logp[2 + k, :n], alone.sampler_logp[k, :n], atol=1e-4, rtol=0)


def _nan_on_rows_with_no_key(module, query, key, value, attention_mask, **kw):
    """transformers' SDPA attention, but NaN on a query row that may attend to no key, as some CUDA kernels
    give (CPU gives zeros there)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)   # (B, Q, H, d)
    if attention_mask is not None:
        empty = ~attention_mask[..., :key.shape[-2]].any(-1)                                # (B, 1, Q)
        out = out.masked_fill(empty.transpose(1, 2)[..., None], float("nan"))
    return out, weights


@pytest.mark.parametrize("variant", ["granite-released-kind", "qwen2-audio", "qwen2-audio-no-gqa"])
def test_left_padded_prompts_under_eager_attention_equal_each_prompt_alone(shipped, qwen, qwen_no_gqa, ast_test,
                                                                           variant):
    """Eager attention adds a 4D mask to its scores (transformers passes a caller's 4D mask through
    unchanged), so a boolean one would add 0 or 1: prompt_mask gives it the additive form. Granite's
    released-kind copy and the tiny Qwen2-Audio (GQA, and the 7B's full heads) on eager: a left-padded
    batch's log-probs, greedy completions and beams equal each prompt's alone, and the log-probs equal SDPA's."""
    if variant.startswith("granite"):
        model, tok = shipped
        sdpa, eager = _released_kind(model), _released_kind(model)
    else:
        model, tok = qwen if variant == "qwen2-audio" else gs.load_model(str(qwen_no_gqa), torch.device("cpu"))
        sdpa, eager = model, copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert eager.model.language_model.config._attn_implementation == "eager"
    assert sdpa.model.language_model.config._attn_implementation == "sdpa"
    idx = [0, 1, 2, 3]
    batch = make_batch(model, tok, ast_test, idx)
    assert len(set(batch.attention_mask.sum(1).tolist())) > 1          # left padding of different lengths
    completions = torch.randint(5, len(tok), (8, 6), generator=torch.Generator().manual_seed(0))
    eos_id = gs.family(model.config).stop_id(model.config)
    # rtol: the random Qwen2-Audio's log-probs reach ~-16, where fp32 rounds at ~1e-6 relative (a mask that
    # lets a prompt see its padding moves them past 1e-4: the GPU check probe's test)
    kw = dict(max_new_tokens=10, eos_id=eos_id, pad_id=tok.pad_token_id, temperature=0.0)
    with torch.no_grad():
        padded = gs.completion_logprobs(eager, batch, completions, 2)
        torch.testing.assert_close(padded, gs.completion_logprobs(sdpa, batch, completions, 2), atol=1e-5, rtol=1e-5)
        greedy = gs.sample_groups(eager, batch, 1, **kw).token_lists()
        beams = gs.beam_search(eager, batch, num_beams=3, max_new_tokens=10, eos_id=eos_id)
        for k, i in enumerate(idx):
            one = make_batch(model, tok, ast_test, [i])
            alone = gs.completion_logprobs(eager, one, completions[2 * k:2 * k + 2], 2)
            torch.testing.assert_close(padded[2 * k:2 * k + 2], alone, atol=1e-5, rtol=1e-5)
            assert greedy[k] == gs.sample_groups(eager, one, 1, **kw).token_lists()[0]
            assert beams[k] == gs.beam_search(eager, one, num_beams=3, max_new_tokens=10, eos_id=eos_id)[0]


def test_left_padded_prompts_have_no_query_without_keys(model_tok, ast_test):
    """Under an attention kernel that gives NaN where a row has no key, a left-padded batch gives the same
    finite log-probs and greedy completions as each prompt alone."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register("nan_rows", _nan_on_rows_with_no_key)
    ALL_MASK_ATTENTION_FUNCTIONS.register("nan_rows", sdpa_mask)
    model, tok = model_tok
    strict = copy.deepcopy(model)
    strict.set_attn_implementation("nan_rows")
    assert strict.model.language_model.config._attn_implementation == "nan_rows"
    idx = [0, 3]
    batch = make_batch(model, tok, ast_test, idx)
    assert not batch.attention_mask.all()                              # one prompt is left-padded
    completions = torch.randint(0, 200, (4, 6), generator=torch.Generator().manual_seed(0))
    padded = gs.completion_logprobs(strict, batch, completions, 2)
    kw = dict(max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0.0)
    greedy = gs.sample_groups(strict, batch, 1, **kw).token_lists()
    for k, i in enumerate(idx):
        one = make_batch(model, tok, ast_test, [i])
        alone = gs.completion_logprobs(model, one, completions[2 * k:2 * k + 2], 2)
        torch.testing.assert_close(padded[2 * k:2 * k + 2], alone, atol=1e-5, rtol=0)
        assert greedy[k] == gs.sample_groups(model, one, 1, **kw).token_lists()[0]


def test_sampler_inverse_cdf_follows_the_distribution(model_tok, ast_test):
    """A token is drawn where the uniform falls in the CDF: u just above cdf[k-1] gives token k."""
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0])
    kw = dict(max_new_tokens=1, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0)
    with torch.no_grad():
        logits = model(inputs_embeds=gs.prompt_embeddings(model, batch), attention_mask=batch.attention_mask,
                       position_ids=gs.positions(batch.attention_mask)).logits[0, -1].double()
    cdf = torch.softmax(logits, -1).cumsum(-1)
    for k in (3, 50, int(torch.softmax(logits, -1).argmax())):
        u = ((cdf[k - 1] + cdf[k]) / 2).item()             # the middle of token k's interval
        s = gs.sample_groups(model, batch, 1, uniforms=torch.tensor([[u]]), **kw)
        assert s.tokens[0, 0].item() == k


def test_sampler_never_draws_a_suppressed_token_even_at_u_zero(model_tok, ast_test):
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0])
    suppress = gs.suppressed_ids(tok, model.config)
    assert 0 in suppress.tolist()
    s = gs.sample_groups(model, batch, 2, max_new_tokens=4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         temperature=1.0, suppress=suppress, uniforms=torch.zeros(2, 4))
    n = int(s.lengths[0])
    assert not set(s.tokens[0, :n].tolist()) & set(suppress.tolist())


def test_decode_cuts_at_lengths(model_tok):
    _, tok = model_tok
    word = tok("dog", add_special_tokens=False).input_ids
    other = tok("cat", add_special_tokens=False).input_ids
    eos = tok.eos_token_id
    filler = word[0]                                      # a real word where pad would be: must be cut
    tokens = torch.tensor([other + [eos] + [filler] * 3])
    samples = gs.Samples(tokens, torch.tensor([len(other) + 1]), torch.zeros_like(tokens, dtype=torch.float))
    assert samples.token_lists() == [other + [eos]]
    assert gs.decode(tok, samples.token_lists()) == [tok.decode(other, skip_special_tokens=True).strip()]
    assert gs.decode(tok, samples.token_lists())[0] == "cat"


def test_model_listens_shipped_model():
    if not (SHIPPED_MODEL / "config.json").is_file():
        pytest.skip(f"{SHIPPED_MODEL} does not exist yet (it is being trained)")
    model, tok = gs.load_model(str(SHIPPED_MODEL), torch.device("cpu"))
    model.eval()
    rows = gs.read_manifest(DATA / "asr" / "test.jsonl")[:2]
    data = gs.SpeechData(rows)
    suppress = gs.suppressed_ids(tok, model.config)
    hyps = []
    for i in range(2):
        b = make_batch(model, tok, data, [i])
        s = gs.sample_groups(model, b, 1, max_new_tokens=48, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             temperature=0.0, suppress=suppress)
        hyps.append(gs.decode(tok, s.token_lists())[0])
    ref = rows[0]["target"]
    own, _ = gs.word_errors(hyps[0], ref)
    other, _ = gs.word_errors(hyps[1], ref)
    assert own < other, (hyps, ref)


def test_word_errors_hand_examples():
    assert gs.word_errors("a b c", "a b c") == (0, 3)
    assert gs.word_errors("a x c", "a b c") == (1, 3)
    assert gs.word_errors("a c", "a b c") == (1, 3)
    assert gs.word_errors("a b b c d", "a b c") == (2, 3)
    assert gs.word_errors("", "a b") == (2, 2)


# -------------------------------------------------------------------- command line ----


def test_source_lines_fit_in_100_columns():
    """The file is read as a tutorial, side by side with the paper: no line over 100 characters."""
    long = [n for n, line in enumerate((REPO / "grpo_speech.py").read_text().splitlines(), 1)
            if len(line) > 100]
    assert long == [], f"grpo_speech.py lines over 100 characters: {long[:10]}"


def test_readme_symbol_map_points_at_the_code():
    """README's map from the paper's symbols to grpo_speech.py: each row's line holds its code."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- symbol-map:begin -->")[1].split("<!-- symbol-map:end -->")[0]
    source = (REPO / "grpo_speech.py").read_text().splitlines()
    rows = [r for r in block.strip().splitlines()[2:]]
    assert len(rows) >= 12
    lines = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        function, line, code = cells[-3].strip("`"), int(cells[-2]), cells[-1].strip("`")
        assert source[line - 1].strip().startswith(code.removesuffix("...")), (row, source[line - 1])
        defs = [n for n, l in enumerate(source[:line], 1) if l.startswith(("def ", "class "))]
        assert source[defs[-1] - 1].split("(")[0].split()[1] == function, row
        lines.append(line)
    assert lines == sorted(lines)                              # in the order the file defines them


def test_help_lists_every_option(tmp_path):
    p = run_cli("--help", cwd=tmp_path)
    assert p.returncode == 0
    for opt in ("--task", "--mode", "--model", "--data", "--out", "--max-steps", "--batch-size", "--group-size",
                "--beta", "--epsilon", "--epsilon-high", "--loss-type", "--num-iterations", "--reward", "--lr",
                "--eval-limit", "--seed", "--bf16", "--compile", "--device", "--resume"):
        assert opt in p.stdout.split() or f"{opt}," in p.stdout or f"[{opt}" in p.stdout, opt


@pytest.fixture(scope="session")
def mode_runs(tiny_data, fixture_model_dir, tmp_path_factory):
    """One tiny run of every mode (ast eval/sft/grpo/mp-grpo, asr and sqa eval, sqa grpo with a ROUGE-L
    reward): {name: (process, out dir)}."""
    work = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, task, mode, *extra in (("eval", "ast", "eval"), ("sft", "ast", "sft"), ("grpo", "ast", "grpo"),
                                     ("mp-grpo", "ast", "mp-grpo"), ("asr-eval", "asr", "eval"),
                                     ("sqa-eval", "sqa", "eval"),
                                     ("sqa-rouge-l", "sqa", "grpo", "--reward", "rouge-l")):
        out = work / name
        p = run_cli("--task", task, "--mode", mode, "--model", fixture_model_dir, "--data", tiny_data / task,
                    "--out", out, *TINY, *extra, cwd=work)
        runs[name] = (p, out)
    return runs


def _check_ok(p):
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_cli_eval_writes_base_only(mode_runs):
    p, out = mode_runs["eval"]
    _check_ok(p)
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["base", "base_sample"] and res["base"]["n"] == res["base_sample"]["n"] == 4
    assert {"bleu", "chrf"} <= set(res["base"]) and {"bleu", "chrf"} <= set(res["base_sample"])
    assert (res["base"]["decoding"], res["base_sample"]["decoding"]) == ("greedy", "sample")
    assert "nrefs:1" in res["base"]["signature"]
    assert (out / "hyps_base.jsonl").is_file() and (out / "hyps_base_sample.jsonl").is_file()
    assert not (out / "final").exists()


@pytest.mark.parametrize("name", ["eval", "sqa-eval"])
def test_cli_eval_results_carry_rouge_the_mean_sentence_f_measure(mode_runs, name):
    """results.json's rouge1/2/L (ast and sqa, greedy and sampled): 100 x the mean over utterances of
    rouge-score's F-measure on the hypotheses file, as `evaluate`'s rouge computes it; on the console too."""
    from rouge_score import rouge_scorer
    p, out = mode_runs[name]
    _check_ok(p)
    res = json.loads((out / "results.json").read_text())
    scorer = rouge_scorer.RougeScorer(list(gs.ROUGE_KEYS))
    for key in ("base", "base_sample"):
        rows = [json.loads(l) for l in (out / f"hyps_{key}.jsonl").read_text().splitlines()]
        for k in gs.ROUGE_KEYS:
            mean = 100 * sum(scorer.score(r["ref"], r["hyp"])[k].fmeasure for r in rows) / len(rows)
            assert res[key][k] == round(mean, 2), (key, k)
    line = next(l for l in p.stdout.splitlines() if l.startswith("start model on test:"))
    assert all(f"{m} {res['base'][k]}" in line for m, k in (("ROUGE-1", "rouge1"), ("ROUGE-L", "rougeL")))
    assert f"sampled: BLEU {res['base_sample']['bleu']}" in line


def test_cli_grpo_trains_with_a_rouge_l_reward(mode_runs):
    p, out = mode_runs["sqa-rouge-l"]
    _check_ok(p)
    assert json.loads((out / "config.json").read_text())["reward"] == "rouge-l"
    res = json.loads((out / "results.json").read_text())
    assert set(gs.ROUGE_KEYS) <= set(res["final"]) and set(gs.ROUGE_KEYS) <= set(res["final_sample"])
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(steps) == 2 and all(0 <= m["reward/mean"] <= 1 and math.isfinite(m["loss/total"])
                                   for m in steps)


def test_cli_asr_eval_reports_wer(mode_runs):
    p, out = mode_runs["asr-eval"]
    _check_ok(p)
    res = json.loads((out / "results.json").read_text())
    assert "wer" in res["base"] and res["base"]["wer"] >= 0


@pytest.mark.parametrize("mode", ["sft", "grpo", "mp-grpo"])
def test_cli_training_modes_complete(mode_runs, mode):
    p, out = mode_runs[mode]
    _check_ok(p)
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"base", "base_sample", "final", "final_sample", "selection"}
    assert {"bleu", "chrf"} <= set(res["final"]) and {"bleu", "chrf"} <= set(res["final_sample"])
    assert "greedy decoding, 4 dev utterances" in res["selection"]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        assert ("reward/mean" in m) == (mode != "sft")
        assert ("loss/sft" in m) == (mode == "sft")
    assert (out / "final" / "model.safetensors").is_file() and (out / "best" / "model.safetensors").is_file()


def test_checkpoint_saved_by_save_model_loads_back(model_tok, tmp_path):
    model, tok = model_tok
    gs.save_model(model, tok, tmp_path / "checkpoint", {"step": 7})
    other = type(model)(model.config).eval()
    state = gs.load_checkpoint(other, tmp_path / "checkpoint")
    assert state["step"] == 7
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_cli_resume_continues_without_duplicate_steps(tiny_data, fixture_model_dir, tmp_path):
    args = ["--task", "ast", "--mode", "grpo", "--model", fixture_model_dir, "--data", tiny_data / "ast", "--out",
            tmp_path / "run", *TINY, "--eval-every", "1"]
    _check_ok(run_cli(*args, cwd=tmp_path))
    p = run_cli(*args, "--max-steps", "3", "--resume", cwd=tmp_path)
    _check_ok(p)
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_cli_final_reloads_with_transformers_and_evaluates_the_same(mode_runs, tiny_data, tmp_path):
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration
    p, out = mode_runs["grpo"]
    _check_ok(p)
    final = out / "final"
    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    cfg = gs.Config(task="ast", eval_limit=4, max_new_tokens=8)
    scores, hyps = gs.evaluate(model, tok, gs.SpeechData(gs.read_manifest(tiny_data / "ast" / "test.jsonl")), cfg,
                               4, nullamp)
    q = run_cli("--task", "ast", "--mode", "eval", "--model", final, "--data", tiny_data / "ast", "--out",
                tmp_path / "ev", *TINY, cwd=tmp_path)
    _check_ok(q)
    cli = json.loads((tmp_path / "ev" / "results.json").read_text())["base"]
    assert cli["bleu"] == scores["bleu"] and cli["chrf"] == scores["chrf"]
    cli_hyps = [json.loads(l) for l in (tmp_path / "ev" / "hyps_base.jsonl").read_text().splitlines()]
    assert cli_hyps == hyps


def test_sampled_evaluation_is_seeded_and_independent_of_batch_size(model_tok, ast_test):
    """The paper's decoding (T 0.9, top-p 0.9) draws utterance i's tokens from (seed, i): the same
    hypotheses for any eval batch size, other hypotheses for another seed."""
    model, tok = model_tok
    hyps = {}
    for seed, bs in ((0, 1), (0, 4), (0, 3), (5, 4)):
        cfg = gs.Config(task="ast", max_new_tokens=8, eval_batch_size=bs, seed=seed)
        scores, rows = gs.evaluate(model, tok, ast_test, cfg, 0, nullamp, decoding="sample")
        hyps[seed, bs] = [r["hyp"] for r in rows]
        assert scores["n"] == len(ast_test)                    # limit 0: every utterance
    assert hyps[0, 1] == hyps[0, 4] == hyps[0, 3]
    assert hyps[5, 4] != hyps[0, 4]
    greedy, _ = gs.evaluate(model, tok, ast_test, gs.Config(task="ast", max_new_tokens=8), 2, nullamp)
    assert greedy["n"] == 2


def test_dev_selection_scores_every_dev_row_by_default(tiny_data, fixture_model_dir, tmp_path):
    assert gs.Config().dev_limit == 0
    data = tmp_path / "ast"
    shutil.copytree(tiny_data / "ast", data)
    shutil.copytree(tiny_data / "audio", tmp_path / "audio")                # manifests point at ../audio
    dev = (data / "dev.jsonl").read_text().splitlines()
    (data / "dev.jsonl").write_text("\n".join(dev + dev[:2]) + "\n")      # 6 dev rows
    for row in (json.loads(l) for l in dev):
        assert (data / row["audio"]).resolve().is_file()
    p = run_cli("--task", "ast", "--mode", "sft", "--model", fixture_model_dir, "--data", data, "--out",
                tmp_path / "run", "--max-steps", "1", "--eval-limit", "2", "--sft-batch-size", "2",
                "--max-new-tokens", "8", cwd=tmp_path)
    _check_ok(p)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "6 dev utterances" in res["selection"]


def test_cli_pretrain_writes_a_plain_transformers_checkpoint(fixture_model_dir):
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (fixture_model_dir / name).is_file(), name
    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(fixture_model_dir))
    tok = AutoTokenizer.from_pretrained(str(fixture_model_dir))
    assert model.config.model_type == "granite_speech"
    assert tok.convert_tokens_to_ids(gs.AUDIO_TOKEN) == model.config.audio_token_id
    assert len(tok) <= model.config.text_config.vocab_size
    # data/make_model.py ran each of its four stages for its 2 steps, then scored dev
    log = json.loads((fixture_model_dir / "pretrain_log.json").read_text())
    stages = ["1_char_ctc", "2_word_ctc", "3_lm_stretched", "4_joint"]
    assert [k for k in log if k[0].isdigit()] == stages
    for stage in stages:
        curve = log[stage]["curve"]
        assert len(curve) == 2 and all(math.isfinite(x) and x > 0 for x in curve), (stage, curve)
    assert log["dev_asr"]["n"] == 2 and "wer" in log["dev_asr"] and log["dev_ast"]["n"] == 2


def test_make_model_guards_its_output_and_checks_its_input(tiny_data, tmp_path):
    sys.path.insert(0, str(DATA))
    import make_model
    # the default --out is the shipped model, so an existing --out is refused before any work
    assert make_model.build_parser().parse_args([]).out == str(SHIPPED_MODEL)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.safetensors").write_bytes(b"keep me")
    ok = ["--steps", "1,1,1,1", "--dev-limit", "1"]
    cases = [  # (args, what the message names)
        (["--data", tiny_data, "--out", taken, *ok], [str(taken), "--overwrite"]),
        (["--data", tiny_data, "--out", tmp_path / "m", "--steps", "1,1,1"], ["--steps"]),
        (["--data", tiny_data, "--out", tmp_path / "m", "--steps", "1,x,1,1"], ["--steps"]),
        (["--data", tmp_path / "nodata", "--out", tmp_path / "m", *ok], [str(tmp_path / "nodata")]),
    ]
    for args, culprits in cases:
        p = run_make_model(*args, cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, p.stderr)
        assert all(c in lines[0] for c in culprits), (args, p.stderr)
        assert not (tmp_path / "m").exists(), args
    assert (taken / "model.safetensors").read_bytes() == b"keep me"
    p = run_make_model("--help", cwd=tmp_path)
    assert p.returncode == 0
    for opt in ("--data", "--out", "--steps", "--seed", "--device", "--dev-limit", "--overwrite"):
        assert opt in p.stdout, opt


def _bad_data(tiny_data: Path, root: Path, kind: str) -> Path:
    d = root / kind
    d.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        lines = (tiny_data / "ast" / f"{split}.jsonl").read_text().splitlines()
        rows = [json.loads(l) for l in lines]
        for r in rows:
            r["audio"] = str((tiny_data / "ast" / r["audio"]).resolve())
        text = [json.dumps(r) for r in rows]
        if split == "test" and kind == "malformed":
            text[1] = "{oops"
        if split == "test" and kind == "missing-audio":
            rows[2]["audio"] = str(root / "nowhere.ogg")
            text[2] = json.dumps(rows[2])
        (d / f"{split}.jsonl").write_text("\n".join(text) + "\n")
    return d


def test_cli_bad_input_exits_2_with_one_line(tiny_data, fixture_model_dir, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "results.json").write_text("{}")
    data = tiny_data / "ast"
    cases = [  # (args, culprit in the message, out dir that must not be created)
        (["--model", tmp_path / "no-such-model"], str(tmp_path / "no-such-model"), True),
        (["--model", tmp_path / "bert"], str(tmp_path / "bert"), True),
        (["--data", _bad_data(tiny_data, tmp_path, "malformed")], "test.jsonl:2", True),
        (["--data", _bad_data(tiny_data, tmp_path, "missing-audio")], str(tmp_path / "nowhere.ogg"), True),
        (["--mode", "grpo", "--group-size", "1"], "--group-size", True),
        (["--mode", "grpo", "--temperature", "0"], "--temperature 0", True),
        (["--mode", "mp-grpo", "--top-p", "0"], "--top-p 0", True),
        (["--mode", "grpo", "--num-iterations", "0"], "--num-iterations 0", True),
        (["--mode", "sft", "--max-new-tokens", "0"], "--max-new-tokens 0", True),
        (["--threads", "0"], "--threads 0", True),
        (["--threads", "many"], "--threads many", True),
        (["--out", taken], str(taken), False),
    ]
    for extra, culprit, fresh_out in cases:
        args = {"--model": fixture_model_dir, "--data": data, "--out": tmp_path / "out", "--mode": "eval"}
        for k, v in zip(extra[::2], extra[1::2]):
            args[k] = v
        flat = [x for kv in args.items() for x in kv]
        code, lines = run_main("--task", "ast", *flat, "--eval-limit", "2", cwd=tmp_path)
        assert code == 2 and len(lines) == 1 and culprit in lines[0], (extra, lines)
        if fresh_out:
            assert not (tmp_path / "out").exists(), extra


def test_cli_unknown_task_is_an_argparse_error(tmp_path):
    p = run_cli("--task", "mt", "--out", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 2 and "--task" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_cli_mode_pretrain_is_gone_to_data_make_model(tmp_path):
    p = run_cli("--mode", "pretrain", "--out", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert "--mode" in p.stderr and "pretrain" in p.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------- robustness: audio, resume, faults, DDP ----


def _one_row_data(root: Path, tiny_data: Path, audio: Path, target: str = "ein Hund") -> Path:
    """tiny_data/ast with the first test row's audio (and target) replaced."""
    d = _bad_data(tiny_data, root, audio.stem)
    rows = [json.loads(l) for l in (d / "test.jsonl").read_text().splitlines()]
    rows[0].update(audio=str(audio), target=target)
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_cli_bad_audio_and_references_exit_2_naming_the_file(tiny_data, fixture_model_dir, tmp_path):
    empty, long, junk = tmp_path / "empty.wav", tmp_path / "long.wav", tmp_path / "junk.wav"
    sf.write(str(empty), np.zeros(0), 16_000)
    write_wav(long, seconds=3.0)
    junk.write_bytes(b"RIFF not really a wave file")
    cases = [(["--data", _one_row_data(tmp_path / "a", tiny_data, empty)], str(empty)),
             (["--data", _one_row_data(tmp_path / "b", tiny_data, long), "--max-audio-seconds", "2"], str(long)),
             (["--data", _one_row_data(tmp_path / "c", tiny_data, junk)], str(junk)),
             (["--data", _one_row_data(tmp_path / "d", tiny_data, empty, target=" ")], "empty reference")]
    for extra, culprit in cases:
        code, lines = run_main("--task", "ast", "--mode", "eval", "--model", fixture_model_dir, "--out",
                               tmp_path / "out", "--eval-limit", "2", *extra, cwd=tmp_path)
        assert code == 2 and len(lines) == 1 and culprit in lines[0], (extra, lines)
        assert not (tmp_path / "out").exists()


def test_cli_stereo_44k_audio_is_converted_with_a_note(tiny_data, fixture_model_dir, tmp_path):
    src = tiny_data / "audio" / "test"
    wave, sr = sf.read(str(sorted(src.iterdir())[0]))
    stereo = tmp_path / "stereo.wav"
    sf.write(str(stereo), np.stack([wave, wave], 1), sr)        # 16 kHz stereo
    up = tmp_path / "up.wav"
    sf.write(str(up), gs.resample(torch.tensor(wave, dtype=torch.float32), sr, 44_100).numpy(), 44_100)
    d = _one_row_data(tmp_path / "s", tiny_data, stereo)
    rows = [json.loads(l) for l in (d / "test.jsonl").read_text().splitlines()]
    rows[1]["audio"] = str(up)
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_cli("--task", "ast", "--mode", "eval", "--model", fixture_model_dir, "--data", d, "--out",
                tmp_path / "out", "--eval-limit", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "2 audio files" in p.stderr and "resampled" in p.stderr


def _step_metrics(out: Path) -> dict[int, dict]:
    """metrics.jsonl by step, timings dropped (they differ run to run)."""
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("perf/") or k == "perf/grad_norm"} for r in rows}


def _sigint_after_first_step(args, out: Path, cwd: Path) -> None:
    """`python grpo_speech.py ARGS --out OUT`, Ctrl-C once its first training step is logged; it
    must stop with exit code 130."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, str(REPO / "grpo_speech.py"), *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + HANG
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        done = m.read_text().split("\n")[:-1] if m.exists() else []   # whole lines only
        if any(json.loads(l)["step"] >= 1 for l in done):
            break
        time.sleep(0.05)
    proc.send_signal(__import__("signal").SIGINT)
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 130, err[-2000:]


def test_sigint_then_resume_reaches_the_uninterrupted_run_bit_for_bit(tiny_data, fixture_model_dir, tmp_path):
    args = ["--task", "ast", "--mode", "grpo", "--model", fixture_model_dir, "--data", tiny_data / "ast",
            "--max-steps", "5", "--eval-every", "100", "--eval-limit", "2", "--dev-limit", "2", "--batch-size", "2",
            "--group-size", "3", "--max-new-tokens", "8", "--lr", "1e-3", "--reward", "chrf"]
    straight = run_cli(*args, "--out", tmp_path / "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    cut = tmp_path / "cut"
    _sigint_after_first_step(args, cut, tmp_path)
    stopped_at = max(_step_metrics(cut))
    assert 1 <= stopped_at < 5, "the run finished before it could be interrupted"
    assert not (cut / "final").exists()

    resumed = run_cli(*args, "--out", cut, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _step_metrics(tmp_path / "straight"), _step_metrics(cut)
    assert sorted(a) == sorted(b) == list(range(6))
    assert a == b                                                            # bit-identical on CPU
    assert _same_weights(tmp_path / "straight" / "final", cut / "final")


def test_non_finite_losses_are_skipped_then_abort(tiny_data, fixture_model_dir, tmp_path, monkeypatch):
    real = gs.grpo_loss

    def poisoned(*a, **kw):
        loss, m = real(*a, **kw)
        return loss * float("nan"), m
    monkeypatch.setattr(gs, "grpo_loss", poisoned)
    cfg = gs.Config(task="ast", mode="grpo", model=str(fixture_model_dir), data=str(tiny_data / "ast"),
                    out=str(tmp_path / "run"), max_steps=5, eval_every=100, eval_limit=2, dev_limit=2, batch_size=2,
                    group_size=3, max_new_tokens=6, max_bad_steps=2)
    with pytest.raises(gs.InputError, match="non-finite"):
        gs.run(cfg)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss/skipped") for r in rows[1:]] == [1.0]          # step 1 logged as skipped, step 2 aborts
    ckpt = tmp_path / "run" / "checkpoint"
    assert not ckpt.exists()                                             # nothing poisoned was saved


def test_torchrun_two_processes_match_one_process(tiny_data, fixture_model_dir, tmp_path):
    # SFT: the split batch, the summed gradients and the gathered evaluation, without sampling. (GRPO
    # matched to ~1e-7 too, but a float difference at the 1e-7 level can flip one sampled token of
    # an untrained model, which then changes that step's reward: a flaky test.)
    args = ["--task", "ast", "--mode", "sft", "--model", fixture_model_dir, "--data", tiny_data / "ast",
            "--max-steps", "2", "--eval-every", "2", "--eval-limit", "4", "--dev-limit", "4", "--batch-size", "4",
            "--sft-batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-3"]
    one = run_cli(*args, "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_torchrun(*args, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _step_metrics(tmp_path / "one"), _step_metrics(tmp_path / "two")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for step in (1, 2):
        for key in ("loss/sft", "perf/grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert a[2]["eval/dev_chrf"] == b[2]["eval/dev_chrf"]
    # a global batch that does not split into whole prompts per process is refused
    bad = run_torchrun(*args, "--out", tmp_path / "bad", "--batch-size", "3", cwd=tmp_path)
    assert bad.returncode != 0 and "--batch-size 3" in bad.stderr
    # a full disk at the first save (best/ at step 0): both processes stop at once with rank 0's line
    # (exit code 2), no traceback from either, no partial best/
    full = run_torchrun(*args, "--out", tmp_path / "full", cwd=tmp_path, max_file_bytes=1 << 20)
    best = tmp_path / "full" / "best"
    assert f"error: {best}: cannot write it (File too large" in full.stderr, full.stderr[-3000:]
    assert full.returncode != 0 and "]: Traceback" not in full.stderr, full.stderr[-3000:]
    assert "exitcode  : 2" in full.stderr and "exitcode  : 1" not in full.stderr, full.stderr[-3000:]
    assert not best.exists() and not list((tmp_path / "full").glob("best.*"))


GPU_GROUP_SCRIPT = """
import datetime, sys, torch, torch.distributed as td
sys.path.insert(0, {repo!r})
import grpo_speech as gs
# this CPU plays a GPU node whose launcher leaves each rank one visible GPU; the group keeps the
# device map the file asks for, with gloo serving NCCL's part (NCCL itself needs GPUs)
torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda device: None)
gs.pick_device = lambda name: torch.device("cuda")
seen, real_init = {{}}, td.init_process_group
def init(backend, **kw):
    seen.update(kw)
    return real_init("cuda:gloo" if backend == "nccl" else backend.replace("nccl", "gloo"), **kw)
td.init_process_group = init
if sys.argv[1:] == ["fail"]:   # a refused input (rank 0) and a signal (rank 1) once the group exists
    def run(cfg):
        dist, _ = gs.init_distributed(cfg)
        raise gs.InputError("x.jsonl: line 3: not JSON") if dist.rank == 0 else gs.Interrupted("stopped")
    gs.run = run
    rc = gs.main(["--task", "ast"])
    sys.stdout.write(f"returned {{rc}}\\n")   # one write: two ranks share the pipe
    sys.stdout.flush()
    sys.exit(rc)
dist, device = gs.init_distributed(gs.Config())
# the CPU tensors the trainer all-reduces: the stop flag, bad_loss, the step's metrics
assert dist.sum(torch.tensor(float(dist.rank))).item() == 1.0
assert gs.over_processes({{"reward/mean": float(dist.rank)}}, {{"loss/total": 1.0}}, dist) == \\
    {{"reward/mean": 0.5, "loss/total": 2.0}}
p = torch.nn.Parameter(torch.ones(2))
p.grad = torch.ones(2)
loss = float("nan") if dist.rank else 0.0    # one rank's non-finite loss skips it on both
_, skipped = gs.optimizer_step(gs.Config(), [p], torch.optim.SGD([p], lr=0.1), loss,
                               gs.TrainState(), dist)
assert skipped and p.tolist() == [1.0, 1.0]
assert device == torch.device("cuda", 0), device              # the one visible GPU, not LOCAL_RANK
assert seen.get("timeout", datetime.timedelta(minutes=10)) >= datetime.timedelta(hours=1), seen
sys.stdout.write(f"ok {{dist.rank}}\\n"); sys.stdout.flush()   # one write: two ranks share the pipe
gs.close_distributed(True)
"""


def test_gpu_process_group_serves_cpu_collectives_one_visible_gpu_and_slow_saves(tmp_path):
    """torchrun on GPUs: the trainer all-reduces CPU tensors (stop flag, bad_loss, metrics), which a
    pure "nccl" group refuses ("No backend type associated with device type cpu"); a launcher that
    leaves each rank one GPU makes LOCAL_RANK 1 a device that does not exist; the others wait on
    rank 0's checkpoint write past NCCL's 10-minute watchdog. Shown here on a CPU through gloo
    given the same device map. A run that fails once that group exists ends with its own exit code
    (2 for a refused input, 130 for a signal), not a traceback from the teardown's barrier."""
    script = tmp_path / "group.py"
    script.write_text(GPU_GROUP_SCRIPT.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 0 and p.stdout.count("ok ") == 2, (p.stdout + p.stderr)[-3000:]
    fail = subprocess.run([*cmd, "fail"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG)
    assert {"returned 2", "returned 130"} <= set(fail.stdout.splitlines()), (fail.stdout + fail.stderr)[-3000:]
    assert "exitcode  : 2" in fail.stderr and "exitcode  : 130" in fail.stderr, fail.stderr[-3000:]
    assert "]: Traceback" not in fail.stderr and "error: x.jsonl: line 3: not JSON" in fail.stderr


def test_a_gpu_checkpoint_resumes_on_this_cpu(straight_fault_run, tmp_path):
    """A checkpoint written on GPUs (its tensors tagged cuda:0, CUDA generator states of two GPUs) resumes
    on a machine with fewer GPUs or none, exactly as the same checkpoint saved on the CPU does."""
    args, straight = straight_fault_run
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    shutil.copytree(straight, cpu)
    shutil.copytree(straight, gpu)
    state_file = gpu / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["rng"]["cuda"] = [state["rng"]["torch"][:16]] * 2
    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)   # every storage says cuda:0
    torch.serialization._package_registry.insert(0, entry)
    try:
        torch.save(state, state_file)
    finally:
        torch.serialization._package_registry.remove(entry)
    with pytest.raises(RuntimeError, match="CUDA"):     # what a load without map_location meets here
        torch.load(state_file, weights_only=True)
    sizes = {f.name: f.stat().st_size for f in (gpu / "checkpoint").iterdir() if f.name != "complete.json"}
    (gpu / "checkpoint" / "complete.json").write_text(json.dumps(sizes))
    for out in (cpu, gpu):
        _check_ok(run_cli(*args, "--out", out, "--resume", "--max-steps", "4", cwd=tmp_path))
    assert _step_metrics(gpu) == _step_metrics(cpu) and sorted(_step_metrics(gpu)) == [0, 1, 2, 3, 4]
    assert _same_weights(gpu / "final", cpu / "final")


def test_a_filesystem_without_flock_runs_with_a_note(tiny_data, fixture_model_dir, tmp_path):
    """flock raises ENOLCK on Lustre mounted without -o flock: the run goes on, unguarded, saying so."""
    no_flock = ("import errno, fcntl\n"
                "def flock(fd, op):\n"
                "    raise OSError(errno.ENOLCK, 'No locks available')\n"
                "fcntl.flock = flock")
    p = _cli_with(no_flock, ["--task", "ast", "--mode", "eval", "--model", fixture_model_dir, "--data",
                             tiny_data / "ast", "--eval-limit", "2", "--max-new-tokens", "4",
                             "--out", tmp_path / "run"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "cannot be locked (No locks available)" in p.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["base"]["n"] == 2


def test_gpu_check_dry_run_lists_every_configuration_and_refuses_without_cuda(tmp_path):
    import bench_grpo_speech as bench
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / "bench_grpo_speech.py"), "--gpu-check"]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, env=env, timeout=HANG)
    assert dry.returncode == 0, dry.stderr[-2000:]
    listed = [line[2:].split(": ", 1)[0] for line in dry.stdout.splitlines() if line.startswith("- ")]
    assert listed == [name for name, _ in bench.GPU_CHECKS] and len(listed) == 15
    for flags in ("--bf16", "--lora 8 --bf16", "--grad-checkpointing", "TORCH_LOGS=graph_breaks,recompiles",
                  "--compile", "--eval-decoding beam", "tiny-qwen2-audio --lora 8 --bf16 --reward chrf",
                  "data/tiny-granite-speech: ", "data/tiny-qwen2-audio: ", "--nproc_per_node 1",
                  "--nproc_per_node 2", "SIGINT", "SDPA", "--lora 64 --bf16", "full training"):
        assert flags in dry.stdout, flags
    real = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=HANG)
    assert real.returncode == 2 and real.stderr.count("\n") == 1 and "needs a CUDA GPU" in real.stderr, real.stderr


def test_bench_speed_refuses_a_non_granite_model_in_one_line():
    """--speed times generate with Granite's audio keywords (Qwen2-Audio's generate wants others): refused."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, str(REPO / "bench_grpo_speech.py"), "--speed", "--model", str(QWEN_MODEL)],
                       capture_output=True, text=True, env=env, timeout=HANG)
    assert p.returncode == 2 and "--speed times Granite Speech only" in p.stderr.strip().splitlines()[-1], p.stderr


def test_gpu_check_probe_and_2b_rows_run_on_this_cpu(monkeypatch, tmp_path):
    """The GPU check's in-process rows, run here with device "cpu" so a crash in them shows before a GPU is
    lent: the left-padding probe (padded vs each prompt collated alone, within its tolerance; a mask that
    lets the prompts attend to their padding puts it over), on both shipped models, and both 2B rows at small
    sizes (a narrow LM, one layer each). And the command-line rows' check of metrics.jsonl: a skipped update or a
    non-finite loss fails a row that exited 0."""
    import bench_grpo_speech as bench
    for model_dir in (bench.SHIPPED, bench.QWEN):
        probe = bench.gpu_padding_probe(tmp_path, device="cpu", model_dir=model_dir)
        assert probe["ok"] and probe["note"].count("/MATH: max |diff| ") == 2, (model_dir, probe)
        with monkeypatch.context() as m:
            m.setattr(gs, "prompt_mask", lambda model, mask, P: torch.ones_like(mask))
            wrong = bench.gpu_padding_probe(tmp_path, device="cpu", model_dir=model_dir)
        assert not wrong["ok"] and "**over**" in wrong["note"], (model_dir, wrong)
    good = {"step": 1, "loss/total": 0.5, "reward/mean": 0.1}
    for lines, trouble in (([good], ""), ([good, dict(good, step=2, **{"loss/skipped": 1.0})], "loss/skipped"),
                           ([dict(good, **{"loss/total": None})], "loss/total None"), ([], "no step")):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in [{"step": 0}, *lines]))
        assert trouble in bench.step_trouble(tmp_path) and bool(trouble) == bool(bench.step_trouble(tmp_path))
    assert bench.step_trouble(tmp_path, train=False) == ""   # an eval run logs no loss
    monkeypatch.setitem(bench.GRANITE_LM, "2B", dict(bench.GRANITE_LM["2B"], hidden_size=256, intermediate_size=512))
    for lora in (True, False):
        row = bench.gpu_2b(tmp_path, lora, layers=(1, 1), device="cpu", B=2, G=2, T=4, sample_tokens=4)
        assert row["ok"] and "completion length 4" in row["note"], row
        assert ("generate" in row["note"]) == lora


# ---------------------------------------- released checkpoints: adapter, scaling, prompt ----
# Fixtures re-save the shipped model with the released checkpoints' kinds of settings (no hub
# here): a LoRA adapter in peft's format with release-era names, logits_scaling 8, a Granite 3.x
# chat template that dates its own system turn.

LORA_R, LORA_ALPHA = 4, 8


def _lora_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-4 adapter on every q_proj / v_proj of the shipped LM, B non-zero (peft starts it at 0)."""
    g = torch.Generator().manual_seed(seed)
    n_layers = json.loads((SHIPPED_MODEL / "config.json").read_text())["text_config"]["num_hidden_layers"]
    out = {}
    for i in range(n_layers):
        for proj in ("q_proj", "v_proj"):
            stem = f"base_model.model.language_model.model.layers.{i}.self_attn.{proj}"
            out[f"{stem}.lora_A.weight"] = torch.randn(LORA_R, 192, generator=g) * 0.3
            out[f"{stem}.lora_B.weight"] = torch.randn(192, LORA_R, generator=g) * 0.3
    return out


def _save_variant(dst: Path, weights: dict, **config_changes) -> Path:
    """The shipped model's files with other weights and config.json values (text_config.* too)."""
    from safetensors.torch import save_file
    shutil.copytree(SHIPPED_MODEL, dst)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in config_changes.items():
        if k.startswith("text_config."):
            cfg["text_config"][k.split(".", 1)[1]] = v
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _write_adapter(dst: Path, tensors: dict, **config_changes) -> None:
    from safetensors.torch import save_file
    acfg = {"peft_type": "LORA", "r": LORA_R, "lora_alpha": LORA_ALPHA, "target_modules": ["q_proj", "v_proj"],
            "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False,
            "lora_dropout": 0.0, "task_type": None, "base_model_name_or_path": None, **config_changes}
    (dst / "adapter_config.json").write_text(json.dumps(acfg))
    save_file(tensors, str(dst / "adapter_model.safetensors"))


@pytest.fixture(scope="session")
def released_dirs(tmp_path_factory) -> dict[str, Path]:
    """released: shipped weights + adapter (has_lora_adapter true); merged: the same adapter merged
    by this test's own arithmetic into a plain checkpoint, on the checkpoint's own tensor names."""
    root = tmp_path_factory.mktemp("released")
    base = _weights(SHIPPED_MODEL)
    lora = _lora_tensors()
    released = _save_variant(root / "released", base, has_lora_adapter=True)
    _write_adapter(released, lora)
    merged_w = dict(base)
    for key in lora:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            B, A = lora[key.replace("lora_A", "lora_B")], lora[key]
            merged_w[name] = (base[name].double() + LORA_ALPHA / LORA_R * B.double() @ A.double()).float()
    merged = _save_variant(root / "merged", merged_w, has_lora_adapter=False)
    return {"released": released, "merged": merged}


def _greedy(model, tok, data: gs.SpeechData, n: int = 4, max_new_tokens: int = 12) -> list[list[int]]:
    b = make_batch(model, tok, data, range(n))
    s = gs.sample_groups(model, b, 1, max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id, temperature=0.0)
    return [row[:k] for row, k in zip(s.tokens.tolist(), s.lengths.tolist())]


def test_released_adapter_is_merged_at_load(released_dirs, ast_test):
    from transformers import GraniteSpeechForConditionalGeneration
    model, tok = gs.load_model(str(released_dirs["released"]), torch.device("cpu"))
    assert model.config.has_lora_adapter is False and not getattr(model, "_hf_peft_config_loaded", False)
    own = GraniteSpeechForConditionalGeneration.from_pretrained(str(released_dirs["merged"])).eval()
    bare, _ = gs.load_model(str(SHIPPED_MODEL), torch.device("cpu"))
    mine, theirs = model.eval().state_dict(), own.state_dict()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=1e-6, rtol=0, msg=k)
    ours = _greedy(model, tok, ast_test)
    assert ours == _greedy(own, tok, ast_test)
    assert ours != _greedy(bare.eval(), tok, ast_test)          # the adapter changes what is decoded


def test_merge_lora_adapter_transformers5_names_and_rslora(released_dirs, tmp_path):
    """The same adapter under transformers 5's module names, with use_rslora (scale alpha/sqrt(r))."""
    model, _ = gs.load_model(str(SHIPPED_MODEL), torch.device("cpu"))
    before = model.model.language_model.layers[1].self_attn.v_proj.weight.clone()
    lora = {k.replace("language_model.model.", "model.language_model."): v for k, v in _lora_tensors().items()}
    _write_adapter(tmp_path, lora, use_rslora=True)
    merged = gs.merge_lora_adapter(model, tmp_path)
    assert len(merged) == 6 and "model.language_model.layers.1.self_attn.v_proj" in merged
    stem = "base_model.model.model.language_model.layers.1.self_attn.v_proj"
    expected = before.double() + LORA_ALPHA / math.sqrt(LORA_R) * lora[f"{stem}.lora_B.weight"].double() @ \
        lora[f"{stem}.lora_A.weight"].double()
    torch.testing.assert_close(model.model.language_model.layers[1].self_attn.v_proj.weight, expected.float())


def test_cli_grpo_on_released_checkpoint_saves_plain_weights_and_resumes_exactly(released_dirs, tiny_data,
                                                                                  tmp_path):
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration
    args = ["--task", "ast", "--mode", "grpo", "--model", released_dirs["released"], "--data", tiny_data / "ast",
            *TINY, "--eval-every", "1", "--lr", "1e-3"]
    straight = run_cli(*args, "--out", tmp_path / "straight", cwd=tmp_path)
    _check_ok(straight)
    assert "peft" not in straight.stderr and "adapter" not in straight.stderr     # nothing dropped, no warning
    for d in ("final", "best", "checkpoint"):
        saved = tmp_path / "straight" / d
        assert json.loads((saved / "config.json").read_text())["has_lora_adapter"] is False, d
        assert not list(saved.glob("adapter_*")), d
    # final/ in plain transformers, in a fresh process: no warning, and it decodes as the trained
    # model did at step 2 (the dev scores logged in memory, just before final/ was written)
    final = tmp_path / "straight" / "final"
    code = ("import sys; from transformers import GraniteSpeechForConditionalGeneration as G; "
            "G.from_pretrained(sys.argv[1])")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code, str(final)], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and [l for l in p.stderr.splitlines() if "Loading weights" not in l] == [], p.stderr
    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    cfg = gs.Config(task="ast", max_new_tokens=8)
    scores, _ = gs.evaluate(model, tok, gs.SpeechData(gs.read_manifest(tiny_data / "ast" / "dev.jsonl")), cfg, 4,
                            nullamp)
    logged = _step_metrics(tmp_path / "straight")
    assert (scores["bleu"], scores["chrf"]) == (logged[2]["eval/dev_bleu"], logged[2]["eval/dev_chrf"])
    # stop after step 1, then --resume to step 2: the same metrics and the same final weights
    _check_ok(run_cli(*args, "--out", tmp_path / "cut", "--max-steps", "1", cwd=tmp_path))
    _check_ok(run_cli(*args, "--out", tmp_path / "cut", "--resume", cwd=tmp_path))
    assert _step_metrics(tmp_path / "cut") == logged
    assert _same_weights(final, tmp_path / "cut" / "final")


def test_cli_bad_adapters_exit_2_with_one_line(released_dirs, tiny_data, tmp_path, capsys):
    from safetensors.torch import load_file
    rel = released_dirs["released"]
    lora = load_file(str(rel / "adapter_model.safetensors"))
    stray = "base_model.model.language_model.model.layers.0.self_attn.no_proj.lora_A.weight"
    cases = {  # name: (adapter tensors or None for no adapter files, adapter_config changes, culprit)
        "no-adapter-files": (None, {}, "has_lora_adapter"),
        "stray-tensor": ({**lora, stray: torch.ones(LORA_R, 192)}, {}, stray),
        "dora": (lora, {"use_dora": True}, "use_dora"),
        "bias": (lora, {"bias": "lora_only"}, "bias"),
        "fan-in-fan-out": (lora, {"fan_in_fan_out": True}, "fan_in_fan_out"),
    }
    for n, (name, (tensors, changes, culprit)) in enumerate(cases.items()):
        bad = tmp_path / name
        shutil.copytree(rel, bad)
        for f in bad.glob("adapter_*"):
            f.unlink()
        if tensors is not None:
            _write_adapter(bad, tensors, **changes)
        args = ["--task", "ast", "--mode", "eval", "--model", str(bad), "--data", str(tiny_data / "ast"),
                "--out", str(tmp_path / "out"), "--eval-limit", "2"]
        if n == 0:  # the real command line once; in-process (faster) for the others
            p = run_cli(*args, cwd=tmp_path)
            code, err = p.returncode, p.stderr
        else:
            code, err = gs.main(args), capsys.readouterr().err
            err = "\n".join(l for l in err.splitlines() if "Loading weights" not in l)  # a progress bar
        lines = err.strip().splitlines()
        assert code == 2 and "Traceback" not in err, (name, err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], (name, err)
        assert str(bad) in lines[0], (name, lines[0])
        assert not (tmp_path / "out").exists(), name


@pytest.fixture(scope="session")
def scaled_dir(tmp_path_factory) -> Path:
    """The shipped network with logits_scaling 8, exactly equivalent: the tied embedding matrix
    is x8 (so the head's logits are x8 before the division), embedding_multiplier /8 brings the
    text inputs back, and the projector's output layer x8 does the same for the audio (Granite
    multiplies every inputs_embeds, audio included, by embedding_multiplier). Powers of 2: exact."""
    w = _weights(SHIPPED_MODEL)
    for k in ("language_model.model.embed_tokens.weight", "projector.linear.weight", "projector.linear.bias"):
        w[k] = w[k] * 8
    m = json.loads((SHIPPED_MODEL / "config.json").read_text())["text_config"]["embedding_multiplier"]
    return _save_variant(tmp_path_factory.mktemp("scaled") / "scaled8", w, **{
        "text_config.logits_scaling": 8.0, "text_config.embedding_multiplier": m / 8})


def test_logits_scaling_8_equivalent_network_samples_the_same(scaled_dir, ast_test):
    shipped, tok = gs.load_model(str(SHIPPED_MODEL), torch.device("cpu"))
    scaled, _ = gs.load_model(str(scaled_dir), torch.device("cpu"))
    assert scaled.config.text_config.logits_scaling == 8.0
    batch = make_batch(shipped, tok, ast_test, [0, 1, 2])
    first = {}
    with torch.no_grad():
        for name, m in (("shipped", shipped.eval()), ("scaled", scaled.eval())):
            hidden = m.model(inputs_embeds=gs.prompt_embeddings(m, batch), attention_mask=batch.attention_mask,
                             position_ids=gs.positions(batch.attention_mask)).last_hidden_state[:, -1]
            first[name] = torch.log_softmax(gs.lm_logits(m, hidden), -1)                  # (B, V)
            first[name + "/unscaled"] = torch.log_softmax(m.lm_head(hidden), -1)
    torch.testing.assert_close(first["scaled"], first["shipped"], atol=1e-5, rtol=0)
    # the test can fail: without the division the scaled network's distribution is far sharper
    assert (first["scaled/unscaled"] - first["shipped"]).abs().max() > 1.0
    u = gs.row_uniforms(0, 0, [0, 1, 2], 8, 10)
    s = {name: gs.sample_groups(m, batch, 8, max_new_tokens=10, eos_id=tok.eos_token_id,
                                pad_id=tok.pad_token_id, temperature=1.0, uniforms=u)
         for name, m in (("shipped", shipped), ("scaled", scaled))}
    assert torch.equal(s["scaled"].tokens, s["shipped"].tokens)
    assert len(set(map(tuple, s["shipped"].tokens.tolist()))) > 3              # T=1 draws differ
    mask = torch.arange(s["shipped"].tokens.shape[1])[None] < s["shipped"].lengths[:, None]
    torch.testing.assert_close(s["scaled"].sampler_logp[mask], s["shipped"].sampler_logp[mask], atol=1e-4, rtol=0)
    with torch.no_grad():
        tf = gs.completion_logprobs(scaled, batch, s["scaled"].tokens, 8)
    torch.testing.assert_close(tf[mask], s["scaled"].sampler_logp[mask], atol=1e-4, rtol=0)


def test_logits_scaling_applied_once_as_in_granite_for_causal_lm(scaled_dir, ast_test):
    """lm_logits and the teacher-forced pass against GraniteForCausalLM's own logits (which divide
    by logits_scaling) on the same LM weights: twice or not at all would be off by x8."""
    from transformers import GraniteForCausalLM
    model, tok = gs.load_model(str(scaled_dir), torch.device("cpu"))
    model.eval()
    causal = GraniteForCausalLM(model.config.text_config).eval()
    causal.model.load_state_dict(model.model.language_model.state_dict())
    causal.lm_head.weight = causal.model.embed_tokens.weight
    ids = torch.randint(5, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = gs.lm_logits(model, model.model.language_model(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(ours, causal(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        batch = make_batch(model, tok, ast_test, [0, 1])
        completions = torch.randint(5, len(tok), (4, 5), generator=torch.Generator().manual_seed(1))
        logp = gs.completion_logprobs(model, batch, completions, 2)
        embeds = torch.cat([gs.prompt_embeddings(model, batch).repeat_interleave(2, 0),
                            model.get_input_embeddings()(completions)], 1)
        mask = torch.cat([batch.attention_mask.repeat_interleave(2, 0), torch.ones_like(completions)], 1)
        ref = causal(inputs_embeds=embeds, attention_mask=mask, position_ids=gs.positions(mask)).logits
    ref_logp = torch.log_softmax(ref[:, -6:-1], -1).gather(-1, completions[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)


GRANITE3_TEMPLATE = (  # the Granite 3.x chat template's system-turn logic, as released
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = \"Knowledge Cutoff Date: "
    "April 2024.\\nToday's Date: \" + strftime_now('%B %d, %Y') + \".\\nYou are Granite, developed by IBM. "
    "You are a helpful AI assistant.\" %}{%- set loop_messages = messages %}{%- endif %}"
    "<|start_of_role|>system<|end_of_role|>{{ system_message }}<|end_of_text|>\n"
    "{%- for m in loop_messages %}<|start_of_role|>{{ m['role'] }}<|end_of_role|>{{ m['content'] }}"
    "<|end_of_text|>\n{%- endfor %}{%- if add_generation_prompt %}<|start_of_role|>assistant<|end_of_role|>"
    "{%- endif %}")


def test_system_prompt_default_by_template(tmp_path):
    from transformers import AutoTokenizer
    import datetime
    from transformers import AutoConfig
    tok = AutoTokenizer.from_pretrained(str(SHIPPED_MODEL))
    granite, qwen = AutoConfig.from_pretrained(SHIPPED_MODEL), AutoConfig.from_pretrained(QWEN_MODEL)
    audio = tok.convert_tokens_to_ids(gs.AUDIO_TOKEN)
    text = gs.PROMPTS["ast"]
    # the shipped model: no system turn by default, prompts byte-identical to its template's format
    assert gs.system_turn(tok, "auto", granite) is None
    literal = f"<|start_of_role|>user<|end_of_role|>{text}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"
    ids = tok(literal, add_special_tokens=False).input_ids
    k = ids.index(audio)
    assert gs.encode_prompt(tok, text, 3, audio) == ids[:k] + [audio] * 3 + ids[k + 1:]
    assert gs.encode_prompt(tok, text, 3, audio, gs.system_turn(tok, "auto", granite)) == ids[:k] + [audio] * 3 + ids[k + 1:]
    # a released Granite 3.x template dates a system turn of its own: auto gives the card's, fixed
    tok.chat_template = GRANITE3_TEMPLATE
    today = datetime.date.today().strftime("%B %d, %Y")
    assert today in tok.apply_chat_template([{"role": "user", "content": "u"}], tokenize=False)
    system = gs.system_turn(tok, "auto", granite)
    assert system == gs.CARD_SYSTEM and "Today's Date: April 9, 2025." in system
    turns = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    rendered = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\n"
                               "Today's Date: April 9, 2025.\nYou are Granite")
    assert today not in rendered and rendered.count("<|start_of_role|>system") == 1
    ids = tok(rendered, add_special_tokens=False).input_ids
    k = ids.index(audio)
    assert gs.encode_prompt(tok, text, 2, audio, system) == ids[:k] + [audio] * 2 + ids[k + 1:]
    assert gs.system_turn(tok, "none", granite) is None and gs.system_turn(tok, "Be brief.", granite) == "Be brief."
    # the card's turn is Granite's alone: a Qwen2-Audio config never gets IBM's (bench called it bare)
    assert gs.system_turn(tok, "auto", qwen) is None
    help_text = " ".join(gs.build_parser().format_help().split())
    assert "--system-prompt" in help_text and "'You are a helpful assistant.' wherever no system turn" in help_text


def test_audio_token_count_follows_the_model_config(model_tok, ast_test):
    """window_size / downsample_rate from the config: a projector built with other values makes as
    many embeddings as collate reserves <|audio|> tokens for."""
    model, tok = model_tok
    cfg = model.config.__class__.from_dict({**model.config.to_dict(), "window_size": 10, "downsample_rate": 5})
    other = type(model)(cfg).eval()
    batch = gs.collate(ast_test, [0, 1], tok, cfg.audio_token_id, config=cfg)
    default = gs.collate(ast_test, [0, 1], tok, cfg.audio_token_id, config=model.config)
    assert not torch.equal(batch.features_mask.sum(1), default.features_mask.sum(1))
    with torch.no_grad():
        for b, n in enumerate(batch.frames.tolist()):
            out = other.model.projector(other.model.encoder(batch.features[b:b + 1, :n]).last_hidden_state)
            assert out.shape[1] == int(batch.features_mask[b].sum())

# ---------------------------------------------------------------------------- LoRA ----


LORA_RUN = dict(task="ast", mode="grpo", max_steps=3, eval_every=3, eval_limit=4, dev_limit=4,
                batch_size=2, group_size=3, max_new_tokens=8, lr=1e-2, reward="chrf", lora=4)


@pytest.fixture(scope="module")
def lora_run(tiny_data, fixture_model_dir, tmp_path_factory):
    """One in-process `--lora 4` GRPO run (lr 1e-2, so the policy moves). Every call of
    completion_logprobs is recorded: the reference's (LoRA paths off) against the same call on
    an untouched copy of the start model, the policy's to see that it moved away from it."""
    start, _ = gs.load_model(str(fixture_model_dir), torch.device("cpu"))
    start.eval()
    real = gs.completion_logprobs
    seen = {"ref_equal": [], "policy_equal": [], "policy": None}

    def recording(model, batch, completions, group_size, *a, **kw):
        out = real(model, batch, completions, group_size, *a, **kw)
        layers = [m for m in model.modules() if isinstance(m, gs.LoRALinear)]
        assert layers, "train() ran a model without LoRA layers"
        with torch.no_grad():
            expected = real(start, batch, completions, group_size, *a, **kw)
        first = lambda x: x[0] if isinstance(x, tuple) else x      # (logp, entropy) or logp
        if layers[0].enabled:
            seen["policy"] = model
            seen["policy_equal"].append(torch.equal(first(out).detach(), first(expected)))
        else:
            seen["ref_equal"].append(torch.equal(first(out), first(expected)))
        return out

    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = gs.Config(model=str(fixture_model_dir), data=str(tiny_data / "ast"), out=str(out),
                    **LORA_RUN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gs, "completion_logprobs", recording)
        gs.run(cfg)
    return seen, start, out


def test_lora_reference_is_the_start_model_at_every_step(lora_run):
    seen, _, _ = lora_run
    assert len(seen["ref_equal"]) == LORA_RUN["max_steps"]            # one reference pass per step
    assert all(seen["ref_equal"])                                      # bit for bit, every step
    assert seen["policy_equal"][0] and not all(seen["policy_equal"])  # while the policy moved


def test_lora_trains_only_lora_and_projector(lora_run):
    from safetensors.torch import load_file
    seen, start, out = lora_run
    policy, base = dict(seen["policy"].named_parameters()), dict(start.named_parameters())
    assert set(base) <= set(policy)                                    # base names kept under LoRA
    lora = {n for n in policy if n not in base}
    assert lora and all(n.endswith((".lora_A", ".lora_B")) for n in lora)
    assert {n.rsplit(".", 2)[-2] for n in lora} == {"q_proj", "v_proj"}    # the default targets
    for n, p in base.items():
        changed = not torch.equal(p, policy[n])
        assert changed == n.startswith("model.projector."), n       # LM and encoder untouched
    # A and B both trained: B left zero, A its seeded kaiming-uniform start (rebuilt here)
    fresh = copy.deepcopy(start)
    gs.add_lora(fresh, gs.Config(lora=LORA_RUN["lora"]))
    fresh = dict(fresh.named_parameters())
    assert all(torch.equal(fresh[n], torch.zeros_like(fresh[n])) for n in lora if n.endswith("_B"))
    assert all(not torch.equal(policy[n], fresh[n]) for n in lora)
    # checkpoint/ holds exactly what trains, unmerged, as the live model has it
    saved = load_file(out / "checkpoint" / "trainable.safetensors")
    assert set(saved) == lora | {n for n in base if n.startswith("model.projector.")}
    assert all(torch.equal(saved[n], policy[n]) for n in saved)
    assert not (out / "checkpoint" / "model.safetensors").exists()


def test_lora_final_is_a_plain_checkpoint_that_decodes_like_the_lora_model(lora_run, tiny_data):
    from transformers import GraniteSpeechForConditionalGeneration
    seen, start, out = lora_run
    policy = seen["policy"]
    for name in ("final", "best"):
        _, info = GraniteSpeechForConditionalGeneration.from_pretrained(
            str(out / name), output_loading_info=True)
        kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
        assert not any(info[k] for k in kinds), info
    final = GraniteSpeechForConditionalGeneration.from_pretrained(str(out / "final")).eval()
    assert not any(isinstance(m, gs.LoRALinear) for m in final.modules())
    live = dict(policy.named_parameters())
    for n, p in final.named_parameters():
        if n.rsplit(".", 2)[-2] in ("q_proj", "v_proj"):    # W + (alpha / r) B A, here in float64
            prefix = n.rsplit(".", 1)[0]
            A, B = live[prefix + ".lora_A"].double(), live[prefix + ".lora_B"].double()
            merged = live[n].double() + gs.Config().lora_alpha / LORA_RUN["lora"] * B @ A
            assert torch.allclose(p.double(), merged, atol=1e-6), n
            assert not torch.equal(p, live[n])                   # the update is in there
        else:
            assert torch.equal(p, live[n]), n
    # decoding: the merged plain model answers as the trained LoRA model does
    _, tok = gs.load_model(str(out / "final"), torch.device("cpu"))
    data = gs.SpeechData(gs.read_manifest(tiny_data / "ast" / "test.jsonl"))
    cfg = gs.Config(task="ast", max_new_tokens=8)
    _, hyps_final = gs.evaluate(final, tok, data, cfg, 4, nullamp)
    _, hyps_lora = gs.evaluate(policy, tok, data, cfg, 4, nullamp)
    assert hyps_final == hyps_lora
    batch = make_batch(final, tok, data, range(4))
    s = gs.sample_groups(policy, batch, 2, max_new_tokens=8, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id)
    with torch.no_grad():
        a = gs.completion_logprobs(final, batch, s.tokens, 2)
        b = gs.completion_logprobs(policy, batch, s.tokens, 2)
    assert torch.allclose(a, b, atol=1e-5)


def test_lora_sigint_then_resume_is_bit_identical_and_a_changed_lora_is_refused(
        tiny_data, fixture_model_dir, tmp_path, capsys):
    args = ["--task", "ast", "--mode", "grpo", "--model", fixture_model_dir, "--data",
            tiny_data / "ast", "--max-steps", "4", "--eval-every", "100", "--eval-limit", "2",
            "--dev-limit", "2", "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "8",
            "--lr", "1e-2", "--reward", "chrf", "--lora", "4"]
    straight = run_cli(*args, "--out", tmp_path / "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "trainable parameters:" in straight.stdout and "AdamW state" in straight.stdout

    cut = tmp_path / "cut"
    _sigint_after_first_step(args, cut, tmp_path)
    assert 1 <= max(_step_metrics(cut)) < 4, "the run finished before it could be interrupted"

    # resuming with another LoRA setting is refused before anything in the run is touched
    before = {p: p.read_bytes() for p in cut.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert gs.main([*map(str, args), "--lora", "0", "--out", str(cut), "--resume"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: {cut / 'config.json'}: trained with --lora 4"), last
    assert before == {p: p.read_bytes() for p in cut.rglob("*") if p.is_file() and p.name != ".lock"}

    resumed = run_cli(*args, "--out", cut, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _step_metrics(tmp_path / "straight"), _step_metrics(cut)
    assert sorted(a) == sorted(b) == list(range(5))
    assert a == b                                                            # bit-identical on CPU
    assert _same_weights(tmp_path / "straight" / "final", cut / "final")


def test_lora_bad_settings_exit_2_before_the_run_directory_is_touched(
        tiny_data, fixture_model_dir, tmp_path, capsys):
    base = ["--task", "ast", "--mode", "grpo", "--model", str(fixture_model_dir), "--data",
            str(tiny_data / "ast"), *TINY]
    for bad, words in ((["--lora", "4", "--lora-targets", "q_proj,nope"], ["nope", "v_proj"]),
                       (["--lora", "-1"], ["--lora -1"]),
                       (["--lora", "4", "--lora-alpha", "0"], ["--lora-alpha 0.0"])):
        assert gs.main([*base, *bad, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err          # in-process: transformers' loading bar comes first
        last = err.splitlines()[-1]
        assert last.startswith("error: ") and err.count("error") == 1, err
        assert all(w in last for w in words), last
        assert not (tmp_path / "out").exists()
    # a run trained with one LoRA setting is resumed with that setting only
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "complete.json").write_text("{}")              # a whole (empty) checkpoint
    # config.json as run() writes it: --lora-targets auto resolved to the family's (Granite's q_proj,v_proj)
    cfg = gs.resolve_config(gs.Config(out=str(run), resume=True, lora=4, lora_targets=gs.GraniteSpeech.lora_targets))
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    gs.check_resume(cfg)
    gs.check_resume(gs.resolve_config(dataclasses.replace(cfg, lora_targets=" v_proj,q_proj")))
    for change in (dict(lora=0), dict(lora=8), dict(lora_alpha=16.0), dict(lora_targets="q_proj")):
        with pytest.raises(gs.InputError, match="config.json: trained with --lora"):
            gs.check_resume(gs.resolve_config(dataclasses.replace(cfg, **change)))
    full = dataclasses.replace(cfg, lora=0)                          # a full-training run
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(full)))
    gs.check_resume(dataclasses.replace(full, lora_alpha=8.0))       # alpha means nothing there
    with pytest.raises(gs.InputError, match="trained with --lora 0"):
        gs.check_resume(cfg)
    for change in (dict(bf16=True), dict(lora=4, bf16=True)):                # bf16 storage under LoRA
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        with pytest.raises(gs.InputError, match="--bf16"):
            gs.check_resume(dataclasses.replace(cfg, **change))


def test_bf16_full_training_reference_is_stored_in_bf16_with_fp32_rope(model_tok, ast_test):
    model, tok = model_tok
    ref = gs.frozen_reference(model, gs.Config(bf16=True))
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    rope, rope0 = ref.model.language_model.rotary_emb, model.model.language_model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, rope0.inv_freq)
    assert {p.dtype for p in model.parameters()} == {torch.float32}        # the policy untouched
    full = gs.frozen_reference(model, gs.Config())
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    batch = make_batch(model, tok, ast_test, range(2))
    s = gs.sample_groups(model, batch, 2, max_new_tokens=8, eos_id=tok.eos_token_id,
                         pad_id=tok.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        light = gs.completion_logprobs(ref, batch, s.tokens, 2)
        full = gs.completion_logprobs(model, batch, s.tokens, 2)
    mask = torch.arange(s.tokens.shape[1])[None] < s.lengths[:, None]
    assert light.dtype == torch.float32                                     # log-probs in fp32
    assert not torch.equal(light, full) and (light - full)[mask].abs().max() < 0.5


# ------------------------------------------------------ scale: audio lengths, torchrun exits ----


def test_num_samples_from_the_header_equals_the_decoded_length(tiny_data, tmp_path):
    """Evaluation orders by num_samples: it must order exactly as the decoded lengths did."""
    files = [(tmp_path / "a.wav", 0.5, 16_000, 1), (tmp_path / "b.wav", 0.37, 44_100, 2),
             (tmp_path / "c.flac", 1.03, 8_000, 1), (tmp_path / "d.wav", 0.2, 22_050, 1)]
    for path, seconds, sr, ch in files:
        write_wav(path, seconds=seconds, sr=sr, channels=ch)
    rows = gs.read_manifest(tiny_data / "ast" / "test.jsonl")
    rows += [{"audio": str(f[0])} for f in files]
    gs.check_audio_files(rows, tmp_path)
    data = gs.SpeechData(rows)
    decoded = [gs.load_audio(r["audio"]).numel() for r in rows]
    assert [data.num_samples(i) for i in range(len(rows))] == decoded
    del rows[0]["num_samples"]                          # a row that skipped the check is decoded
    assert data.num_samples(0) == decoded[0]


def test_torchrun_bad_input_exits_2_on_every_rank_with_one_line(tiny_data, fixture_model_dir, tmp_path):
    """The error is raised after the process group is up: each rank tears it down and exits 2 (no
    SIGABRT from gloo's destructors, no traceback), its one line in its own log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", str(REPO / "grpo_speech.py"), "--task", "ast",
           "--mode", "sft", "--model", str(fixture_model_dir), "--data", str(tmp_path / "nowhere"),
           "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG)
    assert p.returncode != 0
    codes = [line.split(":")[1].split()[0] for line in p.stderr.splitlines()
             if line.strip().startswith("exitcode")]
    assert codes == ["2", "2"], p.stderr[-3000:]
    errs = sorted(logs.rglob("stderr.log"))
    assert len(errs) == 2
    for f in errs:
        lines = f.read_text().strip().splitlines()
        assert lines == [f"error: {tmp_path / 'nowhere'}: data directory not found"], (f, lines)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lora", [0, 4])
def test_grad_checkpointing_recomputes_each_layer_and_keeps_the_gradient(model_tok, ast_test, lora):
    """checkpoint_layers: a training forward keeps fewer activations for the backward and runs each
    decoder layer a second time there; loss and every gradient stay bit for bit; no-grad passes
    (sampling, pi_ref) run each layer once."""
    import bench_grpo_speech as bench
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0, 1])
    completions = torch.randint(5, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    start = copy.deepcopy(model).requires_grad_(True)
    if lora:  # B = 0 at the start would give A no gradient: set B as training would have
        gs.add_lora(start, gs.Config(lora=lora))
        for _, layer in gs.lora_layers(start):
            torch.nn.init.normal_(layer.lora_B, std=0.1, generator=torch.Generator().manual_seed(1))

    def run(m):
        calls, out = [], []
        hook = m.model.language_model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
        # distinct activation storage kept for the backward
        kept = bench.saved_bytes(lambda: out.append(gs.completion_logprobs(m, batch, completions, 2)), m)
        logp = out[0]
        (logp * torch.linspace(-1, 1, 6)).sum().backward()
        with torch.no_grad():
            gs.completion_logprobs(m, batch, completions, 2)
        hook.remove()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return logp.detach(), grads, len(calls), kept

    plain, ckpt = copy.deepcopy(start), copy.deepcopy(start)
    unwrap = gs.checkpoint_layers(ckpt)
    lp0, g0, calls0, kept0 = run(plain)
    lp1, g1, calls1, kept1 = run(ckpt)
    # the prompts' and the completions' passes, with and without grad; + their two recomputes
    assert (calls0, calls1) == (4, 6)
    unwrap()   # the class's forward again: no wrapper left, no recompute
    assert not any("forward" in vars(layer) for layer in ckpt.model.language_model.layers)
    ckpt.zero_grad(set_to_none=True)
    assert run(ckpt)[2] == 4
    assert kept1 < 0.7 * kept0, (kept0, kept1)
    assert torch.equal(lp0, lp1) and g0.keys() == g1.keys() and len(g0) > (10 if lora else 30)
    assert all(torch.equal(g0[k], g1[k]) for k in g0)
    assert any("lora_A" in k for k in g0) == bool(lora)


def test_compile_with_grad_checkpointing_traces_every_layer_without_a_graph_break(model_tok, ast_test, monkeypatch):
    """--compile --grad-checkpointing: Dynamo cannot trace a checkpoint around transformers' layer (a side
    effect inside it), so a compiled LM graph-broke at every layer and ran them eager; each layer is now
    compiled inside its checkpoint. Dynamo's counters over one update (its eager backend: tracing, not
    code generation), and the log-probs and gradients equal the uncompiled ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0, 1])
    completions = torch.randint(5, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", torch._dynamo.config.recompile_limit)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit",
                        torch._dynamo.config.accumulated_recompile_limit)
    results = []
    for compiled in (False, True):
        policy = copy.deepcopy(model)
        cfg = gs.Config(mode="grpo", beta=0.0, grad_checkpointing=True, compile=compiled)
        gs.setup_training(cfg, policy, gs.Dist())
        unwrap = gs.checkpoint_layers(policy, cfg.compile)      # as train() does under --grad-checkpointing
        torch._dynamo.reset()
        counters.clear()
        try:
            logp = gs.completion_logprobs(policy, batch, completions, 2)
            (logp * torch.linspace(-1, 1, 6)).sum().backward()
            breaks, frames = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
        finally:
            unwrap()
            torch._dynamo.reset()
        results.append((logp.detach(), {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}))
    assert breaks == 0 and frames >= 3, (dict(counters["graph_break"]), frames)   # a graph per layer at least
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6, rtol=0)
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.allclose(results[0][1][k], results[1][1][k], atol=1e-6, rtol=1e-5) for k in results[0][1])


def test_cli_grad_checkpointing_gives_the_same_run(mode_runs, tiny_data, fixture_model_dir, tmp_path):
    _, plain = mode_runs["grpo"]
    p = run_cli("--task", "ast", "--mode", "grpo", "--model", fixture_model_dir, "--data", tiny_data / "ast",
                "--out", tmp_path / "ckpt", *TINY, "--grad-checkpointing", cwd=tmp_path)
    _check_ok(p)
    assert _step_metrics(tmp_path / "ckpt") == _step_metrics(plain)         # bit for bit on CPU
    assert _same_weights(plain / "final", tmp_path / "ckpt" / "final")


# ------------------------------------------ the way out: the model card's code, beam search ----


def test_checkpoints_carry_the_source_processor_files_verbatim(fixture_model_dir, tiny_data, tmp_path):
    """best/, final/ and checkpoint/ hold the source's processor and generation files byte for byte;
    a source without processor files gets processor_config.json of this file's front end."""
    src = tmp_path / "src"
    shutil.copytree(fixture_model_dir, src)
    written = json.loads((src / "processor_config.json").read_text())   # make_model's save_model wrote it
    config = gs.load_model(str(src), torch.device("cpu"))[0].config
    assert written == gs.family(config).processor_config(config)
    assert written["audio_processor"]["projector_window_size"] == 15 and written["audio_token"] == "<|audio|>"
    files = {"preprocessor_config.json": '{"feature_extractor_type": "GraniteSpeechFeatureExtractor", "x": 1}\n',
             "processor_config.json": '{"processor_class": "GraniteSpeechProcessor",  "y": [1, 2]}\n',
             "generation_config.json": '{"num_beams": 4, "max_new_tokens": 200, "eos_token_id": 1}\n'}
    for name, text in files.items():
        (src / name).write_text(text)
    p = run_cli("--task", "ast", "--mode", "grpo", "--model", src, "--data", tiny_data / "ast",
                "--out", tmp_path / "run", *TINY, cwd=tmp_path)
    _check_ok(p)
    for d in ("best", "final", "checkpoint"):
        for name, text in files.items():
            assert (tmp_path / "run" / d / name).read_text() == text, (d, name)
    (src / "preprocessor_config.json").unlink()
    (src / "processor_config.json").unlink()
    model, tok = gs.load_model(str(src), torch.device("cpu"))
    gs.save_model(model, tok, tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "processor_config.json").read_text()) == written
    assert not (tmp_path / "plain" / "preprocessor_config.json").exists()


def test_model_card_snippet_on_final_gives_the_project_greedy_outputs(fixture_model_dir, tiny_data, tmp_path):
    """The model card's own code (AutoProcessor, AutoModelForSpeechSeq2Seq, processor(prompt, wav),
    generate) on final/ of a 2-step run from a model whose processor files transformers wrote."""
    pytest.importorskip("torchaudio")
    from transformers import (AutoModelForSpeechSeq2Seq, AutoProcessor, GraniteSpeechFeatureExtractor,
                              GraniteSpeechProcessor)
    src = tmp_path / "src"
    shutil.copytree(fixture_model_dir, src)
    (src / "processor_config.json").unlink()
    tok = gs.load_model(str(src), torch.device("cpu"))[1]
    GraniteSpeechProcessor(GraniteSpeechFeatureExtractor(), tok).save_pretrained(src)
    p = run_cli("--task", "ast", "--mode", "grpo", "--model", src, "--data", tiny_data / "ast",
                "--out", tmp_path / "run", *TINY, "--eval-every", "100", cwd=tmp_path)
    _check_ok(p)
    final = tmp_path / "run" / "final"
    processor = AutoProcessor.from_pretrained(final)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(final).eval()
    rows = {r["id"]: r for r in gs.read_manifest(tiny_data / "ast" / "test.jsonl")}
    hyps = [json.loads(l) for l in (tmp_path / "run" / "hyps_final.jsonl").read_text().splitlines()]
    assert len(hyps) == 4
    for h in hyps:
        row = rows[h["id"]]
        chat = [{"role": "user", "content": row["text"]}]
        prompt = processor.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        inputs = processor(prompt, gs.load_audio(row["audio"])[None], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
        assert text.strip() == h["hyp"], (h, text)


def test_beam_search_with_one_beam_is_greedy(model_tok, ast_test):
    model, tok = model_tok
    suppress = gs.suppressed_ids(tok, model.config)
    batch = make_batch(model, tok, ast_test, range(4))
    greedy = gs.sample_groups(model, batch, 1, max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                              temperature=0.0, suppress=suppress).token_lists()
    beam = gs.beam_search(model, batch, num_beams=1, max_new_tokens=12, eos_id=tok.eos_token_id, suppress=suppress)
    assert beam == greedy


def test_beam_search_equals_transformers_generate_num_beams_4():
    """On the shipped model (logits_scaling 1, where transformers' generate is right), token for
    token, every test utterance alone (a batched generate pads the audio, which the encoder hears)."""
    model, tok = gs.load_model(str(SHIPPED_MODEL), torch.device("cpu"))
    model.eval()
    assert model.config.text_config.logits_scaling == 1.0
    data = gs.SpeechData(gs.read_manifest(DATA / "ast" / "test.jsonl")[:10])
    suppress = gs.suppressed_ids(tok, model.config)
    batch = make_batch(model, tok, data, range(10))
    ours = gs.beam_search(model, batch, num_beams=4, max_new_tokens=24, eos_id=tok.eos_token_id, suppress=suppress)
    differs_from_greedy = 0
    for b in range(10):
        one = make_batch(model, tok, data, [b])
        with torch.no_grad():
            out = model.generate(input_ids=one.input_ids, attention_mask=one.attention_mask,
                                 input_features=one.features, input_features_mask=one.features_mask,
                                 num_beams=4, do_sample=False, max_new_tokens=24, suppress_tokens=suppress.tolist())
        theirs = out[0, one.input_ids.shape[1]:].tolist()
        if tok.eos_token_id in theirs:
            theirs = theirs[:theirs.index(tok.eos_token_id) + 1]
        assert ours[b] == theirs, b
        greedy = gs.sample_groups(model, one, 1, max_new_tokens=24, eos_id=tok.eos_token_id,
                                  pad_id=tok.pad_token_id, temperature=0.0, suppress=suppress).token_lists()[0]
        differs_from_greedy += greedy != theirs
    assert differs_from_greedy >= 1        # the comparison exercises beam search, not greedy


def test_an_unsupported_adapter_is_refused_before_any_weight_is_read(released_dirs, tmp_path, monkeypatch):
    import safetensors.torch
    bad = tmp_path / "dora"
    shutil.copytree(released_dirs["released"], bad)
    acfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**acfg, "use_dora": True}))

    def tripwire(*a, **k):
        raise AssertionError("weights were read before the adapter was checked")
    monkeypatch.setattr(safetensors.torch, "load_file", tripwire)
    with pytest.raises(gs.InputError, match="use_dora"):
        gs.load_model(str(bad), torch.device("cpu"))


def test_console_shows_our_progress_bars_and_nothing_from_transformers(fixture_model_dir, tiny_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TQDM_DISABLE", None)
    cmd = [sys.executable, str(REPO / "grpo_speech.py"), "--task", "ast", "--mode", "grpo", "--model",
           str(fixture_model_dir), "--data", str(tiny_data / "ast"), "--out", str(tmp_path / "run"), *TINY]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG)
    _check_ok(p)
    assert "grpo: 100%" in p.stderr                                   # our training bar
    for theirs in ("Loading weights", "Writing model shards", "LOAD REPORT"):
        assert theirs not in p.stderr, (theirs, p.stderr[-3000:])


def test_thread_policy(model_tok, monkeypatch):
    """--threads auto: one thread for the shipped model's narrow LM, every core for a wide one; a
    number as given; torch, a GPU run or the user's OMP_NUM_THREADS leave torch's setting alone."""
    model, _ = model_tok
    wide = copy.deepcopy(model.config)
    wide.text_config.hidden_size = 2048
    cores = len(os.sched_getaffinity(0))
    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS")
    try:
        for threads, config, device, expect in (("auto", model.config, cpu, 1), ("auto", wide, cpu, cores),
                                                ("3", model.config, cpu, 3), ("torch", model.config, cpu, 5),
                                                ("auto", model.config, torch.device("cuda"), 5)):
            torch.set_num_threads(5)
            gs.set_threads(gs.Config(threads=threads), type("M", (), {"config": config}), device)
            assert torch.get_num_threads() == expect, (threads, device)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        gs.set_threads(gs.Config(threads="auto"), model, cpu)
        assert torch.get_num_threads() == 5
    finally:
        torch.set_num_threads(1)


# ------------------------------------------------------- paper scale: memory of a LoRA run ----


def test_lora_bf16_stores_the_frozen_base_in_bf16_and_final_is_the_hand_merge(fixture_model_dir, tiny_data,
                                                                              tmp_path):
    """--lora --bf16: the frozen LM lives in bf16, LoRA's A, B, the projector and (--train-encoder) the encoder
    with its BatchNorm statistics in fp32 (AdamW too); final/ holds W + (alpha / r) B A computed from the stored
    bf16 W, stored as W is."""
    from safetensors.torch import load_file
    args = ["--task", "ast", "--mode", "grpo", "--model", fixture_model_dir, "--data", tiny_data / "ast",
            *TINY, "--lora", "4", "--bf16", "--train-encoder", "--lr", "1e-2", "--out", tmp_path / "run"]
    _check_ok(run_cli(*args, cwd=tmp_path))
    trained = load_file(tmp_path / "run" / "checkpoint" / "trainable.safetensors")   # after the last step
    assert {t.dtype for t in trained.values()} == {torch.float32}
    assert any(".lora_A" in k for k in trained) and any(k.startswith("model.projector.") for k in trained)
    assert any(k.startswith("model.encoder.") for k in trained)
    base, final = _weights(fixture_model_dir), _weights(tmp_path / "run" / "final")
    scale = gs.Config().lora_alpha / 4
    merged = 0
    for k, w in final.items():
        live = next((new + k.removeprefix(old) for old, new in gs.RELEASE_NAMES if k.startswith(old)), k)
        stem = live.removesuffix(".weight")
        if stem + ".lora_A" in trained:
            A, B = trained[stem + ".lora_A"], trained[stem + ".lora_B"]
            hand = (base[k].to(torch.bfloat16).float() + scale * (B @ A)).to(torch.bfloat16)
            assert w.dtype == torch.bfloat16 and torch.equal(w, hand), k
            merged += 1
        elif live in trained:                                    # projector, encoder: trained, fp32
            assert torch.equal(w, trained[live]), k
        elif "running_" in k:                                    # BatchNorm of the trained encoder
            assert w.dtype == torch.float32, k
        elif w.is_floating_point():                              # the frozen rest, as stored: bf16
            assert w.dtype == torch.bfloat16 and torch.equal(w, base[k].to(torch.bfloat16)), k
    assert merged == 2 * 3                                       # q_proj and v_proj of 3 layers


def test_bf16_base_weights_move_the_first_step_loss_little(model_tok, fixture_model_dir, ast_test):
    """The frozen base in bf16 against fp32, both under bf16 autocast, LoRA at its start (B = 0): per-token
    log-probs within 0.05 nats, the SFT loss within 1%."""
    _, tok = model_tok
    cfg = gs.resolve_config(gs.Config(lora=4, bf16=True, mode="sft"))
    losses, logps = [], []
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = gs.load_model(str(fixture_model_dir), torch.device("cpu"), dtype)
        gs.setup_training(cfg, model, gs.Dist())
        batch = make_batch(model, tok, ast_test, range(4))
        refs = [gs.encode_target(tok, t, tok.eos_token_id) for t in batch.targets]
        width = max(map(len, refs))
        completions = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in refs])
        mask = torch.tensor([[i < len(r) for i in range(width)] for r in refs])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logp = gs.completion_logprobs(model, batch, completions, 1)
        assert logp.dtype == torch.float32
        logps.append(logp[mask])
        losses.append(gs.sft_loss(logp, mask).item())
    assert (logps[0] - logps[1]).abs().max() < 0.05, (logps[0] - logps[1]).abs().max()
    assert abs(losses[0] - losses[1]) < 0.01 * losses[0], losses


def test_nothing_of_the_trained_model_outlives_train_with_grad_checkpointing(fixture_model_dir, tiny_data,
                                                                            tmp_path, monkeypatch):
    """train() wraps each LM layer in a checkpoint for the update (and only then: sampling and pi_ref
    run without gradients), and nothing of the model outlives it: the wrappers are undone."""
    import weakref
    calls = []
    checkpointed = gs.checkpointed
    monkeypatch.setattr(gs, "checkpointed", lambda *a, **k: calls.append(torch.is_grad_enabled())
                        or checkpointed(*a, **k))
    cfg = gs.resolve_config(gs.Config(model=str(fixture_model_dir), data=str(tiny_data / "ast"),
                                      out=str(tmp_path), mode="grpo", max_steps=1, eval_every=1,
                                      dev_limit=1, batch_size=2, group_size=2, max_new_tokens=4,
                                      grad_checkpointing=True))
    model, tok = gs.load_model(cfg.model, torch.device("cpu"))
    splits = {k: gs.SpeechData(v) for k, v in gs.load_splits(cfg.data, "ast", ("train", "dev")).items()}
    gs.train(cfg, model, tok, splits, tmp_path, nullamp, torch.device("cpu"))
    layers = len(model.model.language_model.layers)
    # the update's two passes (the prompts, then the completions on their cache) checkpointed, each layer
    assert calls.count(True) == 2 * layers and len(calls) > 2 * layers
    assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)
    alive = [weakref.ref(t) for t in [*model.parameters(), *model.buffers()]]
    del model
    assert [r for r in alive if r() is not None] == []          # no cycle: freed without gc.collect()


# ------------------------------------------------------------- faults: nothing lost, ever ----

FAULT_RUN = ["--task", "ast", "--mode", "grpo", "--max-steps", "3", "--eval-every", "1", "--eval-limit", "2",
             "--dev-limit", "2", "--batch-size", "2", "--group-size", "3", "--max-new-tokens", "8", "--lr", "1e-3",
             "--reward", "chrf"]


def _strict_json_lines(path: Path) -> list[dict]:
    def no_constants(c):
        raise ValueError(f"{path}: {c} is not strict JSON")
    return [json.loads(l, parse_constant=no_constants) for l in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli_with(code: str, args, cwd: Path) -> subprocess.CompletedProcess:
    """grpo_speech.main(ARGS) in a fresh process after `code` (a fault injected at a chosen instant)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    script = (f"import os, sys, signal, pathlib; sys.path.insert(0, {str(REPO)!r}); import grpo_speech as gs\n"
              f"{code}\nsys.exit(gs.main({[str(a) for a in args]!r}))")
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=HANG)


@pytest.fixture(scope="module")
def straight_fault_run(tiny_data, fixture_model_dir, tmp_path_factory):
    args = [*FAULT_RUN, "--model", fixture_model_dir, "--data", tiny_data / "ast"]
    out = tmp_path_factory.mktemp("faults") / "straight"
    _check_ok(run_cli(*args, "--out", out, cwd=out.parent))
    return args, out


def test_a_kill_between_the_two_renames_of_a_save_loses_nothing(straight_fault_run, tmp_path):
    """kill -9 right after the old copy stepped aside and before the new one is in place: --resume finds the
    last complete one and ends bit-identical to the uninterrupted run."""
    args, straight = straight_fault_run
    out = tmp_path / "run"
    kill = ("real = pathlib.Path.rename\n"
            "def rename(self, dst):\n"
            "    if self.name == 'checkpoint.tmp' and (self.parent / 'checkpoint.old').exists():\n"
            "        os._exit(137)\n"
            "    return real(self, dst)\n"
            "pathlib.Path.rename = rename")
    p = _cli_with(kill, [*args, "--out", out], tmp_path)
    assert p.returncode == 137, p.stderr[-2000:]
    assert not (out / "checkpoint").exists() and (out / "checkpoint.old" / "complete.json").exists()
    assert (out / "checkpoint.tmp" / "complete.json").exists()              # step 2's, never published
    _check_ok(run_cli(*args, "--out", out, "--resume", cwd=tmp_path))
    assert _step_metrics(out) == _step_metrics(straight)
    assert _same_weights(out / "final", straight / "final") and _same_weights(out / "best", straight / "best")
    assert not list(out.glob("*.old")) and not list(out.glob("*.tmp"))
    assert _strict_json_lines(out / "metrics.jsonl")


def test_save_model_publishes_best_so_that_a_kill_at_any_rename_keeps_one(model_tok, tmp_path, monkeypatch):
    model, tok = model_tok
    best = tmp_path / "best"
    gs.save_model(model, tok, best)
    first = _files(best)
    real = Path.rename
    for n in (1, 2):                             # the kill before the 1st rename, then before the 2nd
        calls = []

        def rename(self, dst):
            calls.append(self)
            if len(calls) == n:
                raise KeyboardInterrupt          # where a kill -9 would stop the process
            return real(self, dst)
        monkeypatch.setattr(Path, "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            gs.save_model(model, tok, best)
        monkeypatch.setattr(Path, "rename", real)
        assert _files(gs.recover(best)) == first and not best.with_name("best.old").exists()
        gs.load_model(str(best), torch.device("cpu"))


@pytest.mark.parametrize("damage", ["truncated weights", "truncated trainer state", "garbage json",
                                    "deleted trainer state", "deleted config", "no complete.json"])
def test_a_damaged_checkpoint_is_refused_in_one_line_changing_nothing(straight_fault_run, tmp_path, damage):
    args, straight = straight_fault_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpt = out / "checkpoint"
    if damage.startswith("truncated"):
        f = ckpt / ("model.safetensors" if "weights" in damage else "trainer_state.pt")
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    elif damage == "garbage json":
        (ckpt / "config.json").write_text("{not json" + " " * (len((ckpt / "config.json").read_text()) - 9))
    else:
        (ckpt / {"deleted trainer state": "trainer_state.pt", "deleted config": "config.json",
                 "no complete.json": "complete.json"}[damage]).unlink()
    before = _files(out)
    code, lines = run_main(*args, "--out", out, "--resume", "--max-steps", "4", cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {ckpt}: damaged"), lines
    assert {k: v for k, v in _files(out).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("fails", ["weights", "trainer state"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_files(straight_fault_run, tmp_path, fails):
    """Writes past a size fail as on a full disk (RLIMIT_FSIZE): 1 MB (the weights fail first) or a size
    between the checkpoint's weights and its trainer state (torch.save fails, a RuntimeError in torch).
    The first save of --resume that fails stops the run: exit 2, one line, checkpoint/ intact, best/
    intact or whole, no .tmp left, nothing logged past the failed step (logged before its checkpoint: a
    --resume from checkpoint/ trims its line)."""
    args, straight = straight_fault_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = _files(out)
    sizes = [(out / "checkpoint" / f).stat().st_size for f in ("model.safetensors", "trainer_state.pt")]
    size = 1 << 20 if fails == "weights" else sum(sizes) // 2
    assert fails == "weights" or sizes[0] < size < sizes[1]
    limit = ("import resource; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size}))")
    p = _cli_with(limit, [*args, "--out", out, "--resume", "--max-steps", "4"], tmp_path)
    errors = [l for l in p.stderr.splitlines() if "error" in l.lower()]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "cannot write it" in errors[0], errors
    if fails == "trainer state":
        assert errors == [f"error: {out / 'checkpoint'}: cannot write it (torch.save failed; is the disk "
                          "full?); the previous one is kept"]
    after = _files(out)
    assert {k: v for k, v in after.items() if k.startswith("checkpoint")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoint")}
    gs.check_checkpoint(out / "best")                                      # the old one or a whole new one
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))
    assert sorted(_step_metrics(out)) == [0, 1, 2, 3, 4]                   # step 4 failed at its checkpoint


def test_a_full_disk_while_logging_leaves_the_log_as_it_was(straight_fault_run, tmp_path):
    """The file size limit set just above metrics.jsonl: the first step logged after --resume cannot be
    written whole. Exit 2 in one line naming the file, metrics.jsonl byte for byte as before (no torn
    line), checkpoint/ and best/ untouched, no .tmp left."""
    args, straight = straight_fault_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = _files(out)
    limit = len(before["metrics.jsonl"]) + 100                             # less than one step's line
    # set at the first log call, not at start-up: torch itself may write small files when it imports
    # lazily (torch 2.9 writes generated code for torch.distributed)
    code = ("import resource; signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "real = gs.Logger.__call__\n"
            "def call(self, step, metrics):\n"
            f"    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "    return real(self, step, metrics)\n"
            "gs.Logger.__call__ = call")
    p = _cli_with(code, [*args, "--out", out, "--resume", "--max-steps", "5", "--eval-every", "100"], tmp_path)
    errors = [l for l in p.stderr.splitlines() if "error" in l.lower()]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert errors == [f"error: {out / 'metrics.jsonl'}: cannot write it (File too large)"], errors
    after = _files(out)
    assert {k: after[k] for k in before if k not in ("config.json", ".lock")} == \
        {k: v for k, v in before.items() if k not in ("config.json", ".lock")}
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))


def test_write_json_on_a_full_disk_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    gs.write_json(path, {"base": {"bleu": 1.0}})
    real = Path.write_text

    def half_then_full(self, text, **kw):                                 # half a file, then ENOSPC
        real(self, text[: len(text) // 2], **kw)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(gs.InputError, match=r"results.json: cannot write it \(No space left on device\); "
                                            r"the previous one is kept"):
        gs.write_json(path, {"base": {"bleu": 2.0}})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"base": {"bleu": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_resume_without_a_checkpoint_with_other_settings_or_a_torn_log(straight_fault_run, tmp_path):
    args, straight = straight_fault_run
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    code, lines = run_main(*args, "--out", out, "--resume", "--task", "asr", cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and "trained with --task ast" in lines[0], lines
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/me')                                 # a line cut by a kill
    _check_ok(run_cli(*args, "--out", out, "--resume", "--max-steps", "4", cwd=tmp_path))
    assert sorted(_step_metrics(out)) == [0, 1, 2, 3, 4]
    shutil.rmtree(out / "checkpoint")
    code, lines = run_main(*args, "--out", out, "--resume", cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and "no checkpoint to resume from" in lines[0], lines


@pytest.mark.parametrize("instant", ["checkpoint", "line"])
def test_a_kill_between_a_steps_checkpoint_and_its_line_loses_no_step(straight_fault_run, tmp_path, instant):
    """SIGKILL right after checkpoint/ of step 2 is published, or right after step 2's line is appended:
    every step the surviving checkpoint has seen is in metrics.jsonl, and --resume ends with every step
    once, as the uninterrupted run."""
    args, straight = straight_fault_run
    out = tmp_path / "run"
    kill = ("save, call = gs.save_model, gs.Logger.__call__\n"
            "def save_model(model, tok, path, extra=None):\n"
            "    save(model, tok, path, extra)\n"
            f"    if {instant == 'checkpoint'} and path.name == 'checkpoint' and extra['step'] == 2:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "def log(self, step, metrics):\n"
            "    call(self, step, metrics)\n"
            f"    if {instant == 'line'} and step == 2:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "gs.save_model, gs.Logger.__call__ = save_model, log")
    p = _cli_with(kill, [*args, "--out", out], tmp_path)
    assert p.returncode == -9, p.stderr[-2000:]
    seen = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["step"]
    assert seen == (2 if instant == "checkpoint" else 1)
    assert set(range(seen + 1)) <= set(_step_metrics(out))              # on disk, before any resume
    _check_ok(run_cli(*args, "--out", out, "--resume", cwd=tmp_path))
    assert _step_metrics(out) == _step_metrics(straight)
    assert _same_weights(out / "final", straight / "final") and _same_weights(out / "best", straight / "best")


def test_a_refused_run_leaves_its_directory_as_it_was(straight_fault_run, tmp_path):
    """No lock, no directory, no rewritten file where the run is refused, whichever check refuses it."""
    args, straight = straight_fault_run
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / ".lock").write_text("12345")                                   # a finished run's lock
    dirs = {d: _files(d) for d in (notes, run)}
    for out, extra, words in ((notes, ["--overwrite"], "not a run directory"),
                              (notes, [], "holds another run"),
                              (notes, ["--resume"], "no checkpoint to resume from"),
                              (tmp_path / "new" / "run", ["--resume"], "no checkpoint to resume from"),
                              (run, ["--resume", "--group-size", "2"], "trained with --group-size 3")):
        code, lines = run_main(*args, "--out", out, *extra, cwd=tmp_path)
        assert code == 2 and len(lines) == 1 and words in lines[0], (out, extra, lines)
    assert not (tmp_path / "new").exists()
    assert {d: _files(d) for d in (notes, run)} == dirs
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"]


def test_out_must_be_usable_hold_a_run_to_be_overwritten_and_serve_one_run(tiny_data, fixture_model_dir, tmp_path):
    args = [*FAULT_RUN, "--model", fixture_model_dir, "--data", tiny_data / "ast", "--max-steps", "50"]
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "thesis.tex").write_text("precious")
    for out, words in ((tmp_path / "a-file", "cannot be the run directory"),
                       (Path("/proc/version/run"), "cannot be the run directory"),
                       (tmp_path / "not-a-run", "not a run directory")):
        code, lines = run_main(*args, "--out", out, "--overwrite", cwd=tmp_path)
        assert code == 2 and len(lines) == 1 and str(out) in lines[0] and words in lines[0], lines
    assert (tmp_path / "not-a-run" / "thesis.tex").read_text() == "precious"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    first = subprocess.Popen([sys.executable, str(REPO / "grpo_speech.py"), *map(str, args), "--out",
                              str(tmp_path / "busy")], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + HANG
        while not (tmp_path / "busy" / "config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, lines = run_main(*args, "--out", tmp_path / "busy", *extra, cwd=tmp_path)
            assert code == 2 and len(lines) == 1, (extra, lines)
            assert f"another run is using it (pid {first.pid})" in lines[0], lines
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("fault", ["not utf-8", "no audio token", "two audio tokens", "nan audio"])
def test_manifest_problems_are_found_before_the_run_directory(tiny_data, fixture_model_dir, tmp_path, fault):
    d = _bad_data(tiny_data, tmp_path, fault.replace(" ", "-"))
    manifest = d / "train.jsonl"
    rows = manifest.read_text().splitlines()
    row = json.loads(rows[1])
    if fault == "not utf-8":
        manifest.write_bytes(manifest.read_bytes().replace(b"listen", b"listen\xff", 1))
        culprit = f"{manifest}: not UTF-8"
    elif fault == "nan audio":
        wav = tmp_path / "nan.wav"
        sf.write(str(wav), np.array([0.1, float("nan"), 0.2] * 4000, dtype=np.float32), 16_000, subtype="FLOAT")
        rows[1] = json.dumps({**row, "audio": str(wav)})
        manifest.write_text("\n".join(rows) + "\n")
        culprit = f"{wav}: 4000 non-finite samples (listed in {manifest}:2)"
    else:
        text = row["text"].replace(gs.AUDIO_TOKEN, "" if fault == "no audio token" else gs.AUDIO_TOKEN * 2)
        rows[1] = json.dumps({**row, "text": text})
        manifest.write_text("\n".join(rows) + "\n")
        culprit = f"{manifest}:2: text must hold {gs.AUDIO_TOKEN} exactly once"
    code, lines = run_main("--task", "ast", "--model", fixture_model_dir, "--data", d, "--out", tmp_path / "out",
                           cwd=tmp_path)
    assert code == 2 and len(lines) == 1 and culprit in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_the_start_model_scoring_exits_130_with_one_line(tiny_data, fixture_model_dir, tmp_path,
                                                                          sig):
    code = (f"real = gs.evaluate\n"
            f"def evaluate(*a, **k):\n"
            f"    os.kill(os.getpid(), signal.{sig})\n"
            f"    return real(*a, **k)\n"
            f"gs.evaluate = evaluate")
    out = tmp_path / "run"
    p = _cli_with(code, ["--task", "ast", "--model", fixture_model_dir, "--data", tiny_data / "ast", "--out", out,
                         *TINY], tmp_path)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == f"stopped by {sig}; no checkpoint yet"
    for f in out.glob("*.json"):
        json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"{f}: {c}"))



# ------------------------------------------------------------------- Qwen2-Audio ----
# The second family, on data/tiny-qwen2-audio (random weights, the released structure), held to
# transformers' own WhisperFeatureExtractor, Qwen2AudioProcessor and Qwen2AudioForConditionalGeneration.

QWEN_TINY = ["--eval-limit", "3", "--dev-limit", "2", "--batch-size", "2", "--group-size", "3",
             "--sft-batch-size", "4", "--max-new-tokens", "8", "--max-steps", "2", "--eval-every", "1",
             "--reward", "chrf"]   # random weights write no BLEU-scoring 4-gram: chrF spreads a group


# Qwen2-Audio-7B-Instruct's chat_template.json, its "chat_template" string written out
QWEN2_AUDIO_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if 'audio' in content or 'audio_url' "
    "in content or message['type'] == 'audio' %}{% set audio_count.value = audio_count.value + 1 %}Audio "
    "{{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _card_inputs(processor, row: dict):
    """The model card's snippet up to generate: chat template on audio then instruction, processor."""
    text = " ".join(row["text"].replace("<|audio|>", " ").split())
    chat = [{"role": "user", "content": [{"type": "audio", "audio_url": row["audio"]},
                                         {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    wave = gs.load_audio(row["audio"]).numpy()
    return processor(text=prompt, audio=[wave], return_tensors="pt", padding=True, sampling_rate=16_000)


def _card_generate(path: Path, rows: list[dict], max_new_tokens: int = 8, **kw) -> list[str]:
    """The card's snippet on a checkpoint directory: AutoProcessor, the model, generate, decode;
    greedy, stopping where transformers' own defaults stop (the checkpoint's generation_config),
    with the suppressed tokens written out here: specials but that stop token, the audio token,
    ids past the tokenizer."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration
    processor = AutoProcessor.from_pretrained(path)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    tok, config = processor.tokenizer, model.config
    stop = model.generation_config.eos_token_id
    stop = set(stop) if isinstance(stop, list) else {stop}
    suppress = ((set(tok.all_special_ids) | {config.audio_token_id}
                 | set(range(len(tok), config.text_config.vocab_size))) - stop)
    texts = []
    for row in rows:
        inputs = _card_inputs(processor, row)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 suppress_tokens=sorted(suppress), **kw)
        new = out[:, inputs["input_ids"].shape[1]:]
        texts.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
    return texts


def test_tiny_qwen2_audio_has_the_released_structure(qwen):
    model, tok = qwen
    c = model.config
    assert c.model_type == "qwen2_audio" and type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert (c.audio_config.num_mel_bins, c.audio_config.max_source_positions) == (128, 1500)
    assert c.text_config.tie_word_embeddings is False and model.lm_head.weight is not model.get_input_embeddings().weight
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                                     "<|audio_eos|>"])
    assert ids == list(range(ids[0], ids[0] + 6)) and ids[3] == c.audio_token_id and tok.eos_token_id == ids[2]
    assert type(tok).__name__ == "Qwen2Tokenizer"
    template = json.loads((DATA / "tiny-qwen2-audio" / "processor_config.json").read_text())
    assert template["audio_token"] == "<|AUDIO|>"
    assert tok.chat_template == QWEN2_AUDIO_TEMPLATE               # the Instruct checkpoint's, verbatim
    assert sum(f.stat().st_size for f in QWEN_MODEL.iterdir()) < 2e6


@pytest.mark.parametrize("seconds", [0.025, 1.0, 3.7, 31.0])   # 0.025: the shortest accepted
def test_whisper_log_mel_equals_the_whisper_feature_extractor(seconds):
    """(128, 3000) features within 1e-5 of transformers' WhisperFeatureExtractor (128 mels), its
    attention mask's sum l, and the processor's audio-token count; a clip over 30 s is cut."""
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    wave = (np.random.default_rng(1).standard_normal(int(seconds * 16_000)) * 0.1).astype(np.float32)
    ref = fe(wave, sampling_rate=16_000, return_attention_mask=True, return_tensors="np")
    feats, frames = gs.whisper_log_mel(torch.from_numpy(wave))
    assert tuple(feats.shape) == (128, 3000) == ref["input_features"].shape[1:]
    np.testing.assert_allclose(feats.numpy(), ref["input_features"][0], atol=1e-5, rtol=0)
    l = int(ref["attention_mask"].sum())
    assert frames == l and gs.whisper_audio_tokens(frames) == (((l - 1) // 2 + 1) - 2) // 2 + 1
    assert gs.whisper_audio_tokens(frames) == {0.025: 1, 1.0: 25, 3.7: 92, 31.0: 750}[seconds]   # 25 a second


def test_whisper_log_mel_on_speech_equals_the_whisper_feature_extractor(tiny_data):
    """On a real utterance. (The filters are transformers' mel_filter_bank, as the extractor's:
    comparing those two would compare a function with itself.)"""
    from transformers import WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    wave = gs.load_audio(tiny_data / "audio" / "test" / sorted(os.listdir(tiny_data / "audio" / "test"))[0])
    ref = fe(wave.numpy(), sampling_rate=16_000, return_tensors="np")["input_features"][0]
    assert ref.std() > 0.1
    np.testing.assert_allclose(gs.whisper_log_mel(wave)[0].numpy(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["shipped", "no-gqa"])
def test_qwen2_audio_prompt_and_logits_equal_transformers_processor_and_forward(qwen, qwen_no_gqa, ast_test,
                                                                                 variant):
    """Our prompt ids are the processor's (the checkpoint's template on audio then instruction, each
    <|AUDIO|> expanded), and the LM logits over the prompt equal Qwen2AudioForConditionalGeneration's
    own forward on the processor's inputs within 1e-5: features, encoder mask, splice, no scaling.
    The shipped tiny model (GQA) and the 7B's kind (no GQA)."""
    from transformers import AutoProcessor
    model, tok = qwen if variant == "shipped" else gs.load_model(str(qwen_no_gqa), torch.device("cpu"))
    model.eval()
    processor = AutoProcessor.from_pretrained(QWEN_MODEL if variant == "shipped" else qwen_no_gqa)
    batch = make_batch(model, tok, ast_test, [0, 1, 2])
    assert (batch.attention_mask == 0).any()               # left padding exercised
    with torch.no_grad():
        hidden = model.model(inputs_embeds=gs.prompt_embeddings(model, batch), attention_mask=batch.attention_mask,
                             position_ids=gs.positions(batch.attention_mask)).last_hidden_state
        ours = gs.lm_logits(model, hidden)
    for b in range(3):
        inputs = _card_inputs(processor, ast_test.rows[b])
        real = batch.attention_mask[b].bool()
        assert batch.input_ids[b, real].tolist() == inputs["input_ids"][0].tolist()
        with torch.no_grad():
            theirs = model(**inputs).logits[0]
        torch.testing.assert_close(ours[b, real], theirs, atol=1e-5, rtol=0)


def test_qwen2_audio_eval_greedy_and_beam_equal_transformers_generate(qwen, tiny_data, tmp_path):
    """`--mode eval` on the tiny Qwen2-Audio: greedy hypotheses are transformers' processor + generate
    (greedy, the same suppressed tokens), every test utterance, exactly; beam (K = 3) too."""
    p = run_cli("--model", QWEN_MODEL, "--task", "ast", "--mode", "eval", "--data", tiny_data / "ast",
                "--out", tmp_path / "ev", "--eval-limit", "4", "--max-new-tokens", "8", "--eval-decoding", "beam",
                "--num-beams", "3", cwd=tmp_path)
    _check_ok(p)
    assert "system turn" not in p.stdout                   # the template's own default, no card
    rows = {r["id"]: r for r in gs.read_manifest(tiny_data / "ast" / "test.jsonl")}
    for key, kw in (("base", {}), ("base_beam", dict(num_beams=3))):
        hyps = [json.loads(l) for l in (tmp_path / "ev" / f"hyps_{key}.jsonl").read_text().splitlines()]
        assert len(hyps) == 4 and len({h["hyp"] for h in hyps}) > 1
        assert [h["hyp"] for h in hyps] == _card_generate(QWEN_MODEL, [rows[h["id"]] for h in hyps], **kw), key


@pytest.fixture(scope="module")
def qwen_runs(tiny_data, tmp_path_factory):
    """grpo, mp-grpo, sft, grpo --lora 4 and grpo --bf16 --lora 4 --grad-checkpointing on the tiny
    Qwen2-Audio; grpo also cut after step 1 and resumed."""
    work = tmp_path_factory.mktemp("qwen")
    runs = {}
    for name, mode, *extra in (("grpo", "grpo"), ("mp-grpo", "mp-grpo"), ("sft", "sft"),
                               ("lora", "grpo", "--lora", "4", "--lr", "1e-2"),
                               ("bf16", "grpo", "--bf16", "--lora", "4", "--grad-checkpointing", "--lr", "1e-2")):
        out = work / name
        p = run_cli("--model", QWEN_MODEL, "--task", "ast", "--mode", mode, "--data", tiny_data / "ast",
                    "--out", out, *QWEN_TINY, *extra, cwd=work)
        runs[name] = (p, out)
    args = ["--model", QWEN_MODEL, "--task", "ast", "--mode", "grpo", "--data", tiny_data / "ast", "--out",
            work / "cut", *QWEN_TINY]
    runs["cut"] = (run_cli(*args, "--max-steps", "1", cwd=work), work / "cut")
    runs["resumed"] = (run_cli(*args, "--resume", cwd=work), work / "cut")
    return runs


@pytest.mark.parametrize("mode", ["grpo", "mp-grpo", "sft"])
def test_qwen2_audio_training_modes_save_a_final_that_runs_in_the_card_snippet(qwen_runs, tiny_data, mode):
    p, out = qwen_runs[mode]
    _check_ok(p)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    assert all(math.isfinite(m["loss/sft" if mode == "sft" else "loss/total"]) for m in lines[1:])
    for d in ("best", "final", "checkpoint"):             # the source's processor files, verbatim
        for name in ("processor_config.json", "chat_template.jinja"):
            assert (out / d / name).read_bytes() == (QWEN_MODEL / name).read_bytes(), (d, name)
    hyps = [json.loads(l) for l in (out / "hyps_final.jsonl").read_text().splitlines()]
    rows = {r["id"]: r for r in gs.read_manifest(tiny_data / "ast" / "test.jsonl")}
    assert [h["hyp"] for h in hyps] == _card_generate(out / "best", [rows[h["id"]] for h in hyps])
    # final/: the card's snippet decodes as this file decodes the trained weights
    model, tok = gs.load_model(str(out / "final"), torch.device("cpu"))
    data = gs.SpeechData([rows[h["id"]] for h in hyps])
    _, ours = gs.evaluate(model, tok, data, gs.Config(task="ast", max_new_tokens=8), 0, nullamp)
    assert [r["hyp"] for r in ours] == _card_generate(out / "final", data.rows)
    assert not _same_weights(out / "final", QWEN_MODEL)


def test_qwen2_audio_resume_is_bit_identical(qwen_runs):
    for name in ("grpo", "cut", "resumed"):
        _check_ok(qwen_runs[name][0])
    (_, straight), (_, cut) = qwen_runs["grpo"], qwen_runs["cut"]
    assert _step_metrics(cut) == _step_metrics(straight) and sorted(_step_metrics(cut)) == [0, 1, 2]
    assert _same_weights(straight / "final", cut / "final")


def test_qwen2_audio_lora_trains_its_targets_and_the_projector_only(qwen_runs):
    p, out = qwen_runs["lora"]
    _check_ok(p)
    config = json.loads((out / "config.json").read_text())
    assert config["lora_targets"] == gs.Qwen2Audio.lora_targets
    start, final = _weights(QWEN_MODEL), _weights(out / "final")
    changed = {k for k in start if not torch.equal(start[k], final[k])}
    targets = set(gs.Qwen2Audio.lora_targets.split(","))
    # the checkpoint's own (release) names: language_model.model.layers..., multi_modal_projector...
    assert changed and all(k.startswith("multi_modal_projector.")
                           or (k.startswith("language_model.model.layers.") and k.split(".")[-2] in targets)
                           for k in changed)
    assert {k.split(".")[-2] for k in changed if ".layers." in k} == targets      # every target moved
    saved = _weights_file(out / "checkpoint" / "trainable.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in saved} == {"lora_A", "lora_B", "weight", "bias"}
    assert all(k.startswith("model.multi_modal_projector.") for k in saved if not k.endswith(("lora_A", "lora_B")))


def test_qwen2_audio_without_a_config_eos_stops_on_generation_configs_or_is_refused(tiny_data, tmp_path):
    """Qwen2Config defaults eos_token_id to None (the release writes 151645, a derivative may not):
    the stop token is then generation_config.json's, the one transformers' generate stops on; with
    neither, load refuses in one line naming the file."""
    src = tmp_path / "no-eos"
    shutil.copytree(QWEN_MODEL, src)
    config = json.loads((src / "config.json").read_text())
    del config["text_config"]["eos_token_id"]
    (src / "config.json").write_text(json.dumps(config))
    eos = json.loads((QWEN_MODEL / "generation_config.json").read_text())["eos_token_id"]
    model, tok = gs.load_model(str(src), torch.device("cpu"))
    assert gs.family(model.config).stop_id(model.config) == eos == tok.convert_tokens_to_ids("<|im_end|>")
    p = run_cli("--model", src, "--task", "ast", "--mode", "sft", "--data", tiny_data / "ast", "--out",
                tmp_path / "sft", *QWEN_TINY, "--max-steps", "1", cwd=tmp_path)
    _check_ok(p)
    generation = json.loads((src / "generation_config.json").read_text())
    del generation["eos_token_id"]
    (src / "generation_config.json").write_text(json.dumps(generation))
    code, err = run_main("--model", src, "--task", "ast", "--mode", "eval", "--data", tiny_data / "ast",
                         "--out", tmp_path / "eval", cwd=tmp_path)
    assert code == 2 and len(err) == 1 and "generation_config.json" in err[0] and "eos_token_id" in err[0]


def test_qwen2_audio_bf16_lora_grad_checkpointing_trains(qwen_runs):
    """--bf16 --lora 4 --grad-checkpointing (the README's Qwen GPU command's kinds, on the CPU): the frozen
    LM and Whisper tower stored in bf16, its encoder mask in bf16, checkpointed layers; every step's losses
    finite, no update skipped, the targets moved."""
    p, out = qwen_runs["bf16"]
    _check_ok(p)
    config = json.loads((out / "config.json").read_text())
    assert config["bf16"] and config["grad_checkpointing"] and config["lora"] == 4
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2] and not any(m.get("loss/skipped") for m in lines)
    assert all(isinstance(m["loss/total"], float) and math.isfinite(m["loss/total"]) for m in lines[1:])
    start, final = _weights(QWEN_MODEL), _weights(out / "final")
    assert any(not torch.equal(start[k], final[k]) for k in start if k.endswith("q_proj.weight"))


def _weights_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


def test_another_model_family_is_refused_in_one_line(tmp_path):
    src = tmp_path / "whisper"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    code, err = run_main("--model", src, "--mode", "eval", "--out", tmp_path / "o", cwd=tmp_path)
    assert code == 2 and len(err) == 1
    assert "'whisper'" in err[0] and "'granite_speech'" in err[0] and "'qwen2_audio'" in err[0]


def test_qwen2_audio_source_without_processor_files_gets_a_working_one(qwen, tmp_path):
    """save_model writes processor_config.json of this file's Whisper front end where the source had
    none: AutoProcessor loads it and makes our features and prompt."""
    from transformers import AutoProcessor
    model, tok = qwen
    src = tmp_path / "src"
    shutil.copytree(QWEN_MODEL, src)
    (src / "processor_config.json").unlink()
    model, tok = gs.load_model(str(src), torch.device("cpu"))
    gs.save_model(model, tok, tmp_path / "saved")
    processor = AutoProcessor.from_pretrained(tmp_path / "saved")
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    row = {"text": gs.PROMPTS["asr"], "audio": str(next((DATA / "audio" / "test").glob("*.ogg")))}
    inputs = _card_inputs(processor, row)
    feats, frames, n_audio = gs.Qwen2Audio().features(gs.load_audio(row["audio"]), model.config)
    torch.testing.assert_close(inputs["input_features"][0], feats, atol=1e-5, rtol=0)
    assert int(inputs["feature_attention_mask"].sum()) == frames
    assert inputs["input_ids"][0].tolist().count(model.config.audio_token_id) == n_audio


def test_qwen2_audio_prompt_uses_the_processors_chat_template_json(tmp_path):
    """As released: chat_template.json (the processor's, which places the audio) beside a tokenizer
    whose own template is text-only ChatML. The processor's writes the prompt and is saved verbatim."""
    src = tmp_path / "src"
    shutil.copytree(QWEN_MODEL, src)
    template = (src / "chat_template.jinja").read_text()
    (src / "chat_template.jinja").unlink()
    (src / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    tok_config = json.loads((src / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))
    model, tok = gs.load_model(str(src), torch.device("cpu"))
    assert tok.chat_template == template
    gs.save_model(model, tok, tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.json").read_bytes() == (src / "chat_template.json").read_bytes()


def test_qwen2_audio_completion_does_not_depend_on_batch_mates(qwen, ast_test):
    """Each clip is padded to 30 s and encoded alone: a prompt's samples are the same beside a batch mate
    (a longer prompt left-pads it) as alone."""
    model, tok = qwen
    kw = dict(max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=1.0)
    pair = make_batch(model, tok, ast_test, [3, 0])
    assert (pair.attention_mask[0] == 0).any() or (pair.attention_mask[1] == 0).any()
    both = gs.sample_groups(model, pair, 2, uniforms=gs.row_uniforms(0, 5, [3, 0], 2, 8), **kw)
    alone = gs.sample_groups(model, make_batch(model, tok, ast_test, [0]), 2,
                             uniforms=gs.row_uniforms(0, 5, [0], 2, 8), **kw)
    for k in range(2):
        n = int(alone.lengths[k])
        assert both.tokens[2 + k, :n].tolist() == alone.tokens[k, :n].tolist()
        torch.testing.assert_close(both.sampler_logp[2 + k, :n], alone.sampler_logp[k, :n], atol=1e-4, rtol=0)


def test_qwen2_audio_no_gqa_greedy_equals_transformers_generate(qwen_no_gqa, ast_test):
    """Greedy evaluation on the 7B's kind of network (no GQA, untied head, vocabulary past the
    tokenizer) writes what the card's processor + generate writes, every utterance."""
    model, tok = gs.load_model(str(qwen_no_gqa), torch.device("cpu"))
    data = gs.SpeechData(ast_test.rows[:4])
    _, ours = gs.evaluate(model, tok, data, gs.Config(task="ast", max_new_tokens=8), 0, nullamp)
    assert len({r["hyp"] for r in ours}) > 1
    rows = {r["id"]: r for r in data.rows}
    assert [r["hyp"] for r in ours] == _card_generate(qwen_no_gqa, [rows[r["id"]] for r in ours])


def _qwen_copy(dst: Path, tokenizer: dict | None = None) -> Path:
    """The tiny Qwen2-Audio's files in dst, tokenizer_config.json entries replaced."""
    shutil.copytree(QWEN_MODEL, dst)
    if tokenizer:
        config = json.loads((dst / "tokenizer_config.json").read_text())
        (dst / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer}))
    return dst


def test_qwen2_audio_stops_on_the_checkpoints_eos_when_the_tokenizers_differs(qwen, ast_test, tmp_path):
    """A Qwen2 tokenizer may name <|endoftext|> its eos while the chat ends on <|im_end|> (the
    config's and generation_config's eos, where generate stops). Here <|im_end|> wins wherever a
    token the model writes would: greedy completions end on it as generate's do, it is never
    suppressed, and SFT / MP-GRPO references end in it."""
    from safetensors.torch import load_file, save_file
    model, tok = qwen
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    V = model.config.text_config.vocab_size
    suppress = torch.tensor(sorted((set(tok.all_special_ids) | {model.config.audio_token_id}
                                    | set(range(len(tok), V))) - {im_end}))
    written = gs.sample_groups(model, make_batch(model, tok, ast_test, range(4)), 1, max_new_tokens=8,
                               eos_id=-1, pad_id=0, temperature=0.0, suppress=suppress)
    boosted = collections.Counter(written.tokens[:, 1:].flatten().tolist()).most_common(1)[0][0]  # written, not first
    src = _qwen_copy(tmp_path / "eot", tokenizer={"eos_token": "<|endoftext|>"})
    weights = load_file(src / "model.safetensors")
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[head][im_end] = weights[head][boosted] * 1.02
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    model, tok = gs.load_model(str(src), torch.device("cpu"))
    assert tok.eos_token == "<|endoftext|>" and model.config.text_config.eos_token_id == im_end
    data = gs.SpeechData(ast_test.rows[:4])
    _, ours = gs.evaluate(model, tok, data, gs.Config(task="ast", max_new_tokens=8), 0, nullamp)
    rows = {r["id"]: r for r in data.rows}
    assert [r["hyp"] for r in ours] == _card_generate(src, [rows[r["id"]] for r in ours])
    assert len({r["hyp"] for r in ours}) > 1
    cfg = _rollout_cfg(mode="sft")
    batch = make_batch(model, tok, data, [0, 1])
    greedy = gs.sample_groups(model, batch, 1, max_new_tokens=8, eos_id=im_end, pad_id=0, temperature=0.0)
    assert (greedy.lengths < 8).any()                               # the boost makes it end early
    r, _ = gs.rollout(cfg, model, None, tok, batch, 0, [0, 1], None, nullamp)
    for b in range(2):
        n = int(r.mask[b].sum())
        assert r.completions[b, n - 1] == im_end and r.completions[b, :n - 1].tolist() == tok(
            batch.targets[b], add_special_tokens=False).input_ids


def test_qwen2_audio_train_encoder_keeps_what_transformers_freezes(qwen):
    """Qwen2AudioEncoder makes its sinusoidal positions non-trainable: --train-encoder trains the
    rest of the encoder, never them (Granite's class freezes nothing: its every weight trains)."""
    model = copy.deepcopy(qwen[0])
    gs.setup_training(gs.Config(mode="sft", train_encoder=True), model, gs.Dist())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.audio_tower.embed_positions.weight"}


def _qwen_refused(tiny_data, src: Path, tmp_path: Path, *extra, data: Path | None = None) -> str:
    """The one line a Qwen2-Audio eval on src stops with (exit 2), no run directory made."""
    code, lines = run_main("--model", src, "--task", "ast", "--mode", "eval", "--data", data or tiny_data / "ast",
                           "--out", tmp_path / "out", "--eval-limit", "2", "--max-new-tokens", "4", *extra,
                           cwd=tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert not (tmp_path / "out").exists()
    return lines[0]


@pytest.mark.parametrize("template", ["text-only ChatML", "none"])
def test_qwen2_audio_without_an_audio_chat_template_is_refused_at_load(tiny_data, tmp_path, template):
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    src = _qwen_copy(tmp_path / "src", tokenizer={"chat_template": chatml} if template != "none" else None)
    (src / "chat_template.jinja").unlink()
    line = _qwen_refused(tiny_data, src, tmp_path)
    assert line.startswith(f"error: {src}: the chat template does not place the audio token <|AUDIO|> once")


def test_qwen2_audio_tokenizer_without_a_pad_token_pads_with_the_stop_token(qwen, ast_test, tmp_path):
    src = _qwen_copy(tmp_path / "src", tokenizer={"pad_token": None})
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(src).pad_token is None
    model, tok = gs.load_model(str(src), torch.device("cpu"))
    assert tok.pad_token_id == model.config.text_config.eos_token_id
    batch = make_batch(model, tok, ast_test, [3, 0])
    assert (batch.attention_mask == 0).any()                        # padding needed and made
    shipped = make_batch(*qwen, ast_test, [3, 0])
    assert torch.equal(batch.input_ids[batch.attention_mask.bool()], shipped.input_ids[shipped.attention_mask.bool()])


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"template": "x"}'])
def test_qwen2_audio_malformed_chat_template_json_is_one_line(tiny_data, tmp_path, content):
    src = _qwen_copy(tmp_path / "src")
    (src / "chat_template.json").write_text(content)
    line = _qwen_refused(tiny_data, src, tmp_path)
    assert line == f"error: {src / 'chat_template.json'}: not a JSON object with a \"chat_template\" string"


def test_qwen2_audio_with_a_peft_adapter_is_told_to_merge_it(tiny_data, tmp_path):
    src = _qwen_copy(tmp_path / "src")
    _write_adapter(src, _lora_tensors())
    line = _qwen_refused(tiny_data, src, tmp_path)
    assert f"{src}: holds a peft adapter" in line and "merge_and_unload" in line and "has_lora_adapter" not in line


def test_qwen2_audio_clip_over_30_s_is_refused_whatever_max_audio_seconds(tiny_data, tmp_path):
    wav = tmp_path / "long.wav"
    write_wav(wav, seconds=31.0)
    d = _one_row_data(tmp_path, tiny_data, wav)
    line = _qwen_refused(tiny_data, QWEN_MODEL, tmp_path, "--max-audio-seconds", "60", data=d)
    assert line == f"error: {wav}: 31.0 s is longer than the 30 s Qwen2-Audio hears: cut it or leave it out"


def test_families_state_the_interface_and_the_refusal_lists_them(tmp_path, monkeypatch):
    """Every family has every name and method Family lists; a third FAMILIES entry is named in the
    refusal with no other edit."""
    names = set(gs.Family.__annotations__)
    methods = {n for n, v in vars(gs.Family).items() if callable(v) and not n.startswith("_")}
    assert len(names) == 7 and len(methods) == 8
    for fam in gs.FAMILIES.values():
        assert all(hasattr(fam, n) for n in names)
        assert all(getattr(type(fam), m) is not getattr(gs.Family, m) for m in methods - {"stop_id"})
    monkeypatch.setitem(gs.FAMILIES, "voxtral", type("Voxtral", (gs.Family,), {"name": "Voxtral"})())
    src = tmp_path / "whisper"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(gs.InputError, match=r"supported: Granite Speech \('granite_speech'\), Qwen2-Audio "
                                            r"\('qwen2_audio'\), Voxtral \('voxtral'\)"):
        gs.model_files(str(src))


def test_bench_voices_scores_each_voice_set_of_the_comparison_runs(tmp_path):
    """--voices on a compare root of synthetic hypotheses: exact on voice set A, empty on C, the first k words of
    the reference on B (k by method and seed). Each cell against sacrebleu's corpus BLEU of the set computed here
    (voices from synthesis.jsonl by id, the sets as data/README.md lists them), mean ± std over the seeds; the
    gains table from those means; README untouched under --out; a missing run is one line, exit 2."""
    import statistics
    sets = {"B": ["en-gb-scotland", "en-029+f1", "en-us+klatt2"],
            "C": ["en-gb-x-gbclan+m2", "en-gb-x-gbcwmd+f5", "en-029+klatt"]}
    voice = {r["id"]: r["voice"] for r in map(json.loads, (DATA / "audio" / "synthesis.jsonl").open())}
    set_of = lambda i: next((k for k, v in sets.items() if voice[i] in v), "A")
    runs = {"start model": "sft", "SFT": "sft", "GRPO": "grpo", "MP-GRPO": "mp-grpo", "SFT → GRPO": "sft-grpo",
            "SFT → SFT": "sft-sft"}
    seeds = (0, 1)
    expected, counts = {}, {}
    for task in ("ast", "sqa"):
        rows = [json.loads(l) for l in (DATA / task / "test.jsonl").read_text().splitlines()]
        counts[task] = collections.Counter(set_of(r["id"]) for r in rows)
        for m, (method, name) in enumerate(runs.items()):
            kind = "base" if method == "start model" else "final"
            for decoding, suffix in (("greedy", ""), ("sampled", "_sample")):
                for seed in seeds:
                    k = 1 + m + 2 * seed + len(suffix) // 7
                    hyps = [{"id": r["id"], "ref": r["target"],
                             "hyp": {"A": r["target"], "B": " ".join(r["target"].split()[:k]), "C": ""}[
                                 set_of(r["id"])]} for r in rows]
                    run = tmp_path / f"{task}-{name}-s{seed}"
                    run.mkdir(exist_ok=True)
                    (run / f"hyps_{kind}{suffix}.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hyps))
                    for s in "ABC":
                        H = [h["hyp"] for h in hyps if set_of(h["id"]) == s]
                        R = [h["ref"] for h in hyps if set_of(h["id"]) == s]
                        expected.setdefault((task, method, decoding, s), []).append(
                            sacrebleu.corpus_bleu(H, [R]).score)
    assert all(counts[t][s] for t in counts for s in "ABC")
    readme = (REPO / "README.md").read_bytes()
    cmd = [sys.executable, str(REPO / "bench_grpo_speech.py"), "--voices", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (REPO / "README.md").read_bytes() == readme
    text = (tmp_path / "voices.md").read_text()
    assert text in p.stdout
    lines = [l.strip("| ").split(" | ") for l in text.splitlines() if l.startswith("| ")]
    header, cells = lines[0], {tuple(l[:3]): l[3:] for l in lines[1:] if l[2] in ("greedy", "sampled")}
    for s, col in zip("ABC", header[3:]):
        assert col.endswith(f"({counts['ast'][s]} / {counts['sqa'][s]})"), col
    fmt = lambda xs: f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"
    assert len(cells) == 2 * len(runs) * 2
    for (task, method, decoding, s), xs in expected.items():
        assert cells[task, method, decoding]["ABC".index(s)] == fmt(xs), (task, method, decoding, s)
    assert {round(xs[0], 9) for (_, _, _, s), xs in expected.items() if s != "B"} == {100.0, 0.0}
    gains = {tuple(l[:2]): l[2:] for l in lines if len(l) == 8 and l[1].endswith(("start model", "GRPO"))
             and l[0] in ("ast", "sqa")}
    for task in ("ast", "sqa"):
        for method, base in [*((m, "start model") for m in list(runs)[1:]), ("SFT", "GRPO")]:
            want = [f"{statistics.mean(expected[task, method, d, s]) - statistics.mean(expected[task, base, d, s]):+.1f}"
                    for d in ("greedy", "sampled") for s in "ABC"]
            assert gains[task, f"{method} over {base}"] == want, (task, method)
    (tmp_path / "sqa-sft-sft-s1" / "hyps_final_sample.jsonl").unlink()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "sqa-sft-sft-s1/hyps_final_sample.jsonl: missing" in p.stderr, p.stderr


def test_bench_full_size_phases_name_functions_of_grpo_speech():
    """--full-size times a run by wrapping these grpo_speech functions (a rename would stop its worker)."""
    import bench_grpo_speech as bench
    assert all(callable(getattr(gs, name, None)) for name in [*bench.PHASES, "train"])
    assert set(bench.ORDER) == {p for phases in bench.PHASES.values() for p in phases.values()} | {"other"}


def test_grpo_loss_refuses_an_unknown_loss_type_with_or_without_a_normaliser():
    logp, old, ref, A, _, mask = _loss_inputs(seed=3, N=4, T=3)
    for normaliser in (None, torch.tensor(5.0)):
        with pytest.raises(ValueError, match="unknown loss_type 'bnpo'"):
            gs.grpo_loss(logp, old, ref, A, mask, loss_type="bnpo", normaliser=normaliser)
