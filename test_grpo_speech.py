"""Tests of grpo_speech.py.

Two layers:
  * unit tests of the pure functions (audio features, resampling, readers, rewards, advantages,
    the GRPO loss), each checked against an independent computation written here;
  * short runs of the real command line (`python grpo_speech.py ...`) on a tiny copy of data/
    and a throw-away model that the real `--mode pretrain` builds once per session.

Run: .venv/bin/python -m pytest test_grpo_speech.py --durations=10   (about 2-3 minutes on 2 CPU cores)

Every subprocess and this process use one intra-op thread: with another job busy on a 2-core
machine, torch's 2 spinning threads made the tiny conformer ~20x slower.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
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

DATA = REPO / "data"
SHIPPED_MODEL = DATA / "tiny-granite-speech"
TINY = ["--max-steps", "2", "--eval-limit", "4", "--dev-limit", "4", "--eval-every", "2", "--batch-size", "2",
        "--group-size", "3", "--sft-batch-size", "4", "--max-new-tokens", "8"]


# ------------------------------------------------------------------------- helpers ----


def run_cli(*args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python grpo_speech.py ARGS` in `cwd`, one thread, output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    cmd = [sys.executable, str(REPO / "grpo_speech.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


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
    """A throw-away model made by the real pretrain command (2 steps per stage)."""
    work = tmp_path_factory.mktemp("pretrain")
    p = run_cli("--mode", "pretrain", "--pretrain-steps", "2,2,2,2", "--data", tiny_data, "--out", work / "model",
                "--dev-limit", "2", cwd=work, timeout=300)
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
    return gs.collate(data, list(idx), tok, model.config.audio_token_id)


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
    hf = fe(waves, return_tensors="pt")
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


def reference_grpo_loss(logp, old, ref, A, lengths, beta, eps_lo, eps_hi, loss_type, off=None):
    """The objective written token by token: -mean of min(s A, clip(s) A) - beta k3, per loss_type."""
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
    return sum(sum(ts) for ts in per_row) / (N * T)


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
                                 loss_type=loss_type, off_policy=off)
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
        l0, _ = gs.grpo_loss(logp, old, logp.detach(), A, mask, beta=0.0, loss_type=loss_type)
        l1, m1 = gs.grpo_loss(logp, old, logp.detach(), A, mask, beta=0.04, loss_type=loss_type)
        assert m1["kl/mean"] == 0.0
        assert l1.item() == pytest.approx(l0.item(), abs=1e-7)
    _, m = gs.grpo_loss(logp, old, old, A, mask, beta=0.04)
    assert m["kl/mean"] > 0                                # and it is not always 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_ignores_tokens_beyond_each_length(loss_type):
    logp, old, ref, A, lengths, mask = _loss_inputs(seed=5)
    off = torch.tensor([False, True, False, False, False, False])
    loss, _ = gs.grpo_loss(logp, old, ref, A, mask, beta=0.04, epsilon_high=0.3, loss_type=loss_type, off_policy=off)
    (grad,) = torch.autograd.grad(loss, logp)
    g = torch.Generator().manual_seed(9)
    noise = lambda: torch.where(mask, 0.0, torch.randn(mask.shape, generator=g) * 5)
    logp_b = (logp.detach() + noise()).requires_grad_()
    loss_b, _ = gs.grpo_loss(logp_b, old + noise(), ref + noise(), A, mask, beta=0.04, epsilon_high=0.3,
                             loss_type=loss_type, off_policy=off)
    (grad_b,) = torch.autograd.grad(loss_b, logp_b)
    assert loss_b.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(grad_b, grad)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


# ---------------------------------------------------------------- model: sampling ----


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_teacher_forced(model_tok, ast_test, temperature):
    model, tok = model_tok
    batch = make_batch(model, tok, ast_test, [0, 1])
    suppress = gs.suppressed_ids(tok, model.config.text_config.vocab_size, model.config.audio_token_id)
    s = gs.sample_groups(model, batch, 3, max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         temperature=temperature, suppress=suppress, uniforms=gs.row_uniforms(0, 0, [0, 1], 3, 8))
    with torch.no_grad():
        tf = gs.completion_logprobs(model, batch, s.tokens, 3, temperature)
    mask = torch.arange(s.tokens.shape[1])[None] < s.lengths[:, None]
    assert s.tokens.shape[0] == 6 and mask.sum() > 6
    torch.testing.assert_close(s.logps[mask], tf[mask], atol=1e-4, rtol=0)


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
    for row, n, lp in zip(s.tokens.tolist(), s.lengths.tolist(), s.logps):
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
        torch.testing.assert_close(both.logps[2 + k, :n], alone.logps[k, :n], atol=1e-4, rtol=0)


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
    suppress = gs.suppressed_ids(tok, model.config.text_config.vocab_size, model.config.audio_token_id)
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
    assert gs.decode(tok, samples) == [tok.decode(other, skip_special_tokens=True).strip()]
    assert gs.decode(tok, samples)[0] == "cat"


def test_model_listens_shipped_model():
    if not (SHIPPED_MODEL / "config.json").is_file():
        pytest.skip(f"{SHIPPED_MODEL} does not exist yet (it is being trained)")
    model, tok = gs.load_model(str(SHIPPED_MODEL), torch.device("cpu"))
    model.eval()
    rows = gs.read_manifest(DATA / "asr" / "test.jsonl")[:2]
    data = gs.SpeechData(rows)
    suppress = gs.suppressed_ids(tok, model.config.text_config.vocab_size, model.config.audio_token_id)
    hyps = []
    for i in range(2):
        b = make_batch(model, tok, data, [i])
        s = gs.sample_groups(model, b, 1, max_new_tokens=48, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                             temperature=0.0, suppress=suppress)
        hyps.append(gs.decode(tok, s)[0])
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


def test_help_lists_every_option(tmp_path):
    p = run_cli("--help", cwd=tmp_path)
    assert p.returncode == 0
    for opt in ("--task", "--mode", "--model", "--data", "--out", "--max-steps", "--batch-size", "--group-size",
                "--beta", "--epsilon", "--epsilon-high", "--loss-type", "--num-iterations", "--reward", "--lr",
                "--eval-limit", "--seed", "--bf16", "--compile", "--device", "--resume"):
        assert opt in p.stdout.split() or f"{opt}," in p.stdout or f"[{opt}" in p.stdout, opt


@pytest.fixture(scope="session")
def mode_runs(tiny_data, fixture_model_dir, tmp_path_factory):
    """One tiny run of every mode (ast eval/sft/grpo/mp-grpo, asr eval): {name: (process, out dir)}."""
    work = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, task, mode in (("eval", "ast", "eval"), ("sft", "ast", "sft"), ("grpo", "ast", "grpo"),
                             ("mp-grpo", "ast", "mp-grpo"), ("asr-eval", "asr", "eval")):
        out = work / name
        p = run_cli("--task", task, "--mode", mode, "--model", fixture_model_dir, "--data", tiny_data / task,
                    "--out", out, *TINY, cwd=work)
        runs[name] = (p, out)
    return runs


def _check_ok(p):
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr


def test_cli_eval_writes_base_only(mode_runs):
    p, out = mode_runs["eval"]
    _check_ok(p)
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["base"] and {"bleu", "chrf"} <= set(res["base"]) and res["base"]["n"] == 4
    assert "nrefs:1" in res["base"]["signature"]
    assert not (out / "final").exists()


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
    assert set(res) == {"base", "final"} and {"bleu", "chrf"} <= set(res["final"])
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
                               4, gs.nullamp)
    q = run_cli("--task", "ast", "--mode", "eval", "--model", final, "--data", tiny_data / "ast", "--out",
                tmp_path / "ev", *TINY, cwd=tmp_path)
    _check_ok(q)
    cli = json.loads((tmp_path / "ev" / "results.json").read_text())["base"]
    assert cli["bleu"] == scores["bleu"] and cli["chrf"] == scores["chrf"]
    cli_hyps = [json.loads(l) for l in (tmp_path / "ev" / "hyps_base.jsonl").read_text().splitlines()]
    assert cli_hyps == hyps


def test_cli_pretrain_writes_a_plain_transformers_checkpoint(fixture_model_dir):
    from transformers import AutoTokenizer, GraniteSpeechForConditionalGeneration
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (fixture_model_dir / name).is_file(), name
    model = GraniteSpeechForConditionalGeneration.from_pretrained(str(fixture_model_dir))
    tok = AutoTokenizer.from_pretrained(str(fixture_model_dir))
    assert model.config.model_type == "granite_speech"
    assert tok.convert_tokens_to_ids(gs.AUDIO_TOKEN) == model.config.audio_token_id
    assert len(tok) <= model.config.text_config.vocab_size


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
        (["--out", taken], str(taken), False),
    ]
    for extra, culprit, fresh_out in cases:
        args = {"--model": fixture_model_dir, "--data": data, "--out": tmp_path / "out", "--mode": "eval"}
        for k, v in zip(extra[::2], extra[1::2]):
            args[k] = v
        flat = [x for kv in args.items() for x in kv]
        p = run_cli("--task", "ast", *flat, "--eval-limit", "2", cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (extra, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, extra
        assert len(lines) == 1 and culprit in lines[0], (extra, p.stderr)
        if fresh_out:
            assert not (tmp_path / "out").exists(), extra


def test_cli_unknown_task_is_an_argparse_error(tmp_path):
    p = run_cli("--task", "mt", "--out", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 2 and "--task" in p.stderr and "Traceback" not in p.stderr
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
        p = run_cli("--task", "ast", "--mode", "eval", "--model", fixture_model_dir, "--out", tmp_path / "out",
                    "--eval-limit", "2", *extra, cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "Traceback" not in p.stderr, (extra, p.stderr[-2000:])
        assert len(lines) == 1 and culprit in lines[0], (extra, p.stderr)
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


def test_sigint_then_resume_reaches_the_uninterrupted_run_bit_for_bit(tiny_data, fixture_model_dir, tmp_path):
    args = ["--task", "ast", "--mode", "grpo", "--model", fixture_model_dir, "--data", tiny_data / "ast",
            "--max-steps", "5", "--eval-every", "100", "--eval-limit", "2", "--dev-limit", "2", "--batch-size", "2",
            "--group-size", "3", "--max-new-tokens", "8", "--lr", "1e-3", "--reward", "chrf"]
    straight = run_cli(*args, "--out", tmp_path / "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(REPO / "grpo_speech.py"), *map(str, args), "--out", str(cut)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # interrupt once the first training step is logged
        m = cut / "metrics.jsonl"
        if m.exists() and any(json.loads(l)["step"] >= 1 for l in m.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(__import__("signal").SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    stopped_at = max(_step_metrics(cut))
    assert 1 <= stopped_at < 5, "the run finished before it could be interrupted"
    assert not (cut / "final").exists()

    resumed = run_cli(*args, "--out", cut, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _step_metrics(tmp_path / "straight"), _step_metrics(cut)
    assert sorted(a) == sorted(b) == list(range(6))
    assert a == b                                                            # bit-identical on CPU
    from safetensors.torch import load_file
    wa, wb = load_file(tmp_path / "straight" / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


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
    # SFT: the sharding, the summed gradients and the gathered evaluation, without sampling. (GRPO
    # matched to ~1e-7 too, but a float difference at the 1e-7 level can flip one sampled token of
    # an untrained model, which then changes that step's reward: a flaky test.)
    args = ["--task", "ast", "--mode", "sft", "--model", fixture_model_dir, "--data", tiny_data / "ast",
            "--max-steps", "2", "--eval-every", "2", "--eval-limit", "4", "--dev-limit", "4", "--batch-size", "4",
            "--sft-batch-size", "4", "--max-new-tokens", "8", "--lr", "1e-3"]
    one = run_cli(*args, "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "grpo_speech.py"), *map(str, args)]
    two = subprocess.run(cmd + ["--out", str(tmp_path / "two")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _step_metrics(tmp_path / "one"), _step_metrics(tmp_path / "two")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for step in (1, 2):
        for key in ("loss/sft", "perf/grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert a[2]["eval/dev_chrf"] == b[2]["eval/dev_chrf"]
    # a global batch that does not split into whole prompts per process is refused
    bad = subprocess.run(cmd + ["--out", str(tmp_path / "bad"), "--batch-size", "3"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--batch-size 3" in bad.stderr


# ------------------------------------------------ scale: bounded audio memory, torchrun exits ----


def test_audio_cache_keeps_at_most_max_bytes_dropping_least_recently_used():
    cache = gs.AudioCache(max_bytes=1000)
    waves = {k: torch.full((100,), float(i)) for i, k in enumerate("abcd")}    # 400 bytes each
    cache.put("a", waves["a"])
    cache.put("b", waves["b"])
    assert cache.get("a") is waves["a"]                 # a is now more recent than b
    cache.put("c", waves["c"])                          # 1200 bytes > 1000: the oldest, b, goes
    assert cache.get("b") is None and len(cache) == 2 and cache.nbytes == 800
    assert cache.get("a") is waves["a"] and cache.get("c") is waves["c"]
    cache.put("big", torch.zeros(300))                  # 1200 bytes alone: never cached
    assert cache.get("big") is None and cache.nbytes == 800
    assert gs.AudioCache(0).put("a", waves["a"]) is None and len(gs.AudioCache(0)) == 0


def test_speech_data_cache_is_bounded_and_uncached_reads_add_nothing(tiny_data):
    rows = gs.read_manifest(tiny_data / "ast" / "train.jsonl")
    sizes = [gs.load_audio(r["audio"]).nbytes for r in rows]
    budget = max(sizes[-2:]) + min(sizes[-2:])          # room for about two waves, never all four
    assert budget < sum(sizes)
    data = gs.SpeechData(rows, cache_mb=budget / 2**20)
    for i in range(len(rows)):
        assert torch.equal(data.wave(i), gs.load_audio(rows[i]["audio"]))
        assert data._waves.nbytes <= budget
    assert 1 <= len(data._waves) < len(rows)
    held = list(data._waves._waves)
    fresh = gs.SpeechData(rows, cache_mb=budget / 2**20)
    for i in range(len(rows)):
        assert torch.equal(fresh.wave(i, cache=False), data.wave(i, cache=False))
    assert len(fresh._waves) == 0 and list(data._waves._waves) == held


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
    assert len(data._waves) == 0
    del rows[0]["num_samples"]                          # a row that skipped the check is decoded
    assert data.num_samples(0) == decoded[0] and len(data._waves) == 0


def test_evaluate_adds_nothing_to_the_audio_cache(model_tok, tiny_data):
    model, tok = model_tok
    data = gs.SpeechData(gs.read_manifest(tiny_data / "ast" / "test.jsonl"))
    cfg = gs.Config(task="ast", eval_batch_size=2, max_new_tokens=4)
    scores, rows = gs.evaluate(model, tok, data, cfg, 0, gs.nullamp)
    assert scores["n"] == len(data) and len(rows) == len(data)
    assert len(data._waves) == 0 and data._waves.nbytes == 0


def test_torchrun_bad_input_exits_2_on_every_rank_with_one_line(tiny_data, fixture_model_dir, tmp_path):
    """The error is raised after the process group is up: each rank tears it down and exits 2 (no
    SIGABRT from gloo's destructors, no traceback), its one line in its own log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", str(REPO / "grpo_speech.py"), "--task", "ast",
           "--mode", "sft", "--model", str(fixture_model_dir), "--data", str(tmp_path / "nowhere"),
           "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
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
