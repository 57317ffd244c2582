"""A short demonstration: gather_logprobs against plain PyTorch on this machine.

    python -m rlhf_fast.demo [--tokens 2048] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rlhf_fast
from rlhf_fast.reference import gather_logprobs_ref


def _median_ms(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description="gather_logprobs vs plain PyTorch")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args(argv)

    print(f"rlhf_fast {rlhf_fast.__version__}, torch {torch.__version__}")
    for name, reasons in rlhf_fast.backends_available().items():
        print(f"  backend {name:7s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    if rlhf_fast.cpu_capability():
        print(f"  CPU kernels: {rlhf_fast.cpu_capability()}")

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nper-token log-probs + entropy of {args.tokens} tokens over a {args.vocab}-word vocabulary "
          f"({device}), forward + backward")
    print(f"{'dtype':10s} {'backend':8s} {'max |err| logp':>15s} {'max |err| grad':>15s} {'ours ms':>9s} "
          f"{'PyTorch ms':>11s} {'speed-up':>9s}")
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(args.tokens, args.vocab, device=device) * 2).to(dtype)
        labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
        backend = rlhf_fast.select_backend("gather_logprobs", logits)

        def ours(logits=logits, labels=labels):
            x = logits.detach().requires_grad_(True)
            lp, ent = rlhf_fast.gather_logprobs(x, labels, return_entropy=True)
            (lp.sum() + 0.01 * ent.sum()).backward()
            return lp, x.grad

        def plain(logits=logits, labels=labels):
            x = logits.detach().requires_grad_(True)
            logp = torch.log_softmax(x.float(), dim=-1)
            lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            (lp.sum() + 0.01 * ent.sum()).backward()
            return lp, x.grad

        lp, grad = ours()
        x = logits.detach().requires_grad_(True)
        lp_r, ent_r, _ = gather_logprobs_ref(x, labels, return_entropy=True)
        (lp_r.sum() + 0.01 * ent_r.sum()).backward()
        err_lp = (lp - lp_r).abs().max().item()
        err_g = (grad.float() - x.grad.float()).abs().max().item()
        t_ours, t_plain = _median_ms(ours), _median_ms(plain)
        print(f"{str(dtype).replace('torch.', ''):10s} {backend:8s} {err_lp:15.2e} {err_g:15.2e} "
              f"{t_ours:9.1f} {t_plain:11.1f} {t_plain / t_ours:8.1f}x")


if __name__ == "__main__":
    main()
