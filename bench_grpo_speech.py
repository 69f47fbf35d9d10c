"""Speed benchmark of grpo_speech.py's hot loop: prints figures and ratios, asserts nothing.

  python bench_grpo_speech.py --speed      # same process, same model, same inputs

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
import resource
import statistics
import time

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
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--speed", action="store_true", help="run the speed benchmark")
    p.add_argument("--model", default=str(gs.HERE / "data" / "tiny-granite-speech"))
    p.add_argument("--data", default=str(gs.HERE / "data" / "ast" / "train.jsonl"))
    p.add_argument("--batch-size", type=int, default=4, help="B prompts")
    p.add_argument("--group-size", type=int, default=8, help="G samples per prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per sample (EOS disabled)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if not args.speed:
        p.error("nothing to do: pass --speed")
    torch.manual_seed(0)
    device = gs.pick_device(args.device)
    model, tok = gs.load_model(args.model, device)
    model.eval()
    B, G, T = args.batch_size, args.group_size, args.new_tokens
    data = gs.SpeechData(gs.read_manifest(args.data)[:B])
    batch = gs.collate(data, list(range(B)), tok, model.config.audio_token_id).to(device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"B={B} G={G} T={T}, model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")

    # 1. group sampling against generate(num_return_sequences=G)
    ours = lambda: gs.sample_groups(model, batch, G, max_new_tokens=T, eos_id=-1, pad_id=tok.pad_token_id,
                                    temperature=1.0)
    def hf():
        with torch.no_grad():
            model.generate(input_ids=batch.input_ids, input_features=batch.features,
                           input_features_mask=batch.features_mask, attention_mask=batch.attention_mask,
                           do_sample=True, num_return_sequences=G, max_new_tokens=T, min_new_tokens=T,
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
    expanded = gs.Batch(batch.features.repeat_interleave(G, 0), batch.frames.repeat_interleave(G, 0),
                        batch.features_mask.repeat_interleave(G, 0),
                        batch.input_ids.repeat_interleave(G, 0), batch.attention_mask.repeat_interleave(G, 0),
                        [], [])
    t_once = timed(lambda: update(model, batch, G), args.repeats)
    t_per = timed(lambda: update(model, expanded, 1), args.repeats)

    # 3. bf16 autocast and torch.compile against eager fp32 (encoder frozen, as in training)
    t_fp32 = timed(lambda: update(model, batch, G, False), args.repeats)
    def bf16():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            update(model, batch, G, False)
    t_bf16 = timed(bf16, args.repeats)
    compiled = torch.compile(model, dynamic=True)
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
    texts = gs.decode(tok, s)
    t_reward = timed(lambda: gs.bleu_reward(texts, refs), args.repeats)
    with torch.no_grad():
        t_ref = timed(ref, args.repeats)

    print(f"update fp32: {flops / 1e9:.2f} GFLOP in {t_fp32 * 1e3:.0f} ms = {flops / t_fp32 / 1e9:.1f} GFLOP/s, "
          f"{100 * flops / t_fp32 / peak:.1f}% of the measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"peak memory: {mem:.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'process max RSS'})")
    print(f"step breakdown (s): sample {t_ours:.3f}, reward {t_reward:.3f}, reference log-probs {t_ref:.3f}, "
          f"policy update {t_fp32:.3f}")
    print(f"encoder once per group vs per completion (fwd+bwd, encoder trained): {t_per / t_once:.2f}x")
    print(f"bf16 autocast vs fp32 (fwd+bwd): {t_fp32 / t_bf16:.2f}x")
    print(f"torch.compile vs eager (fwd+bwd): {t_fp32 / t_compile:.2f}x")
    print(f"group sampling vs generate(num_return_sequences={G}): {t_hf * 1e3:.0f} ms / {t_ours * 1e3:.0f} ms")
    print(f"{t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
