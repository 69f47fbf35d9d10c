#!/usr/bin/env python3
"""Build the tiny Qwen2-Audio shipped in data/tiny-qwen2-audio (random weights, offline).

Qwen2-Audio-7B-Instruct's structure in miniature, for tests of grpo_speech.py's second model
family: transformers' `Qwen2AudioForConditionalGeneration` with the released audio front end
(Whisper log-mel, 128 mel bins, every clip padded to 30 s = 3000 frames; the encoder's 1500
source positions), the Instruct chat template verbatim, the special tokens <|endoftext|>,
<|im_start|>, <|im_end|>, <|AUDIO|>, <|audio_bos|>, <|audio_eos|> in the released order, an
untied LM head, and a Qwen2Tokenizer (byte-level BPE) trained small on this project's text.
The dimensions are tiny (encoder 2 x 16, LM 2 x 32 with 4 query and 2 key/value heads), the
weights random: it does not listen. The LM head is drawn wider than the other weights so that
greedy decoding has clear winners (tests compare token choices with transformers' own).

  python data/make_tiny_qwen2_audio.py --overwrite      # rebuild data/tiny-qwen2-audio
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# chat_template.json of Qwen/Qwen2-Audio-7B-Instruct, verbatim
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and "
    "message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or message['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}Audio {{ audio_count.value }}: "
    "<|audio_bos|><|AUDIO|><|audio_eos|>\n{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
# released ids 151643..151648, in this order after the BPE vocabulary
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
           "<|audio_eos|>"]


def project_texts() -> list[str]:
    """Every instruction and reference of the shipped data, and the template's own words."""
    texts = ["You are a helpful assistant.", "system user assistant Audio 1: "]
    manifests = sorted(p for task in ("ast", "asr", "sqa") for p in HERE.glob(f"{task}/*.jsonl"))
    for manifest in manifests:
        for line in manifest.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["text"].replace("<|audio|>", " "), row["target"]]
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 700):
    """A Qwen2Tokenizer: Qwen2's pre-tokenizer (its split regex, then byte-level), BPE merges
    learnt here; the six special tokens follow the vocabulary, as in the release."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    learnt = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    vocab = learnt["vocab"] | {t: len(learnt["vocab"]) + k for k, t in enumerate(SPECIAL)}
    return Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", unk_token=None,
                          extra_special_tokens=SPECIAL[1:], model_max_length=32768)


def tiny_config(tokenizer):
    from transformers import Qwen2AudioConfig
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    assert list(ids.values()) == list(range(ids[SPECIAL[0]], ids[SPECIAL[0]] + 6)), ids
    # the release's vocabulary (156032) runs past its tokenizer too: rows nobody can decode
    vocab = 64 * (len(tokenizer) // 64 + 2)
    text = dict(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                tie_word_embeddings=False, use_sliding_window=False,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=16,
                 encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                 max_source_positions=1500, activation_function="gelu", scale_embedding=False)
    return Qwen2AudioConfig(audio_config=audio, text_config=text,
                            audio_token_index=ids["<|AUDIO|>"])


def build(out: Path, seed: int = 0) -> None:
    from transformers import (Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(project_texts())
    config = tiny_config(tokenizer)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    with torch.no_grad():
        # weights drawn wide enough that the answer depends on the audio and the prompt (at
        # transformers' 0.02 every prompt gives the same tokens), and the head wider still:
        # clear greedy winners, logits spread over several units
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed_positions" not in name:
                p.normal_(0, 1.0 / math.sqrt(p.shape[-1]))
        model.model.audio_tower.embed_positions.weight.normal_(0, 0.5)
        model.lm_head.weight.normal_(0, 1.0)
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16_000, hop_length=160,
                                       chunk_length=30, n_fft=400, padding_value=0.0,
                                       return_attention_mask=True)
    processor = Qwen2AudioProcessor(features, tokenizer, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "tiny-qwen2-audio"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    if out.exists():
        if not args.overwrite:
            print(f"error: {out} exists (pass --overwrite to rebuild it)", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    build(out, args.seed)
    print(f"wrote {out}: " + ", ".join(f"{f.name} {f.stat().st_size:,} B"
                                        for f in sorted(out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
