"""The Hugging Face ``Trainer`` with ``Newt`` from six initial rates: with and without the loss.

The plain ``Trainer`` calls ``optimizer.step()`` without the loss, so ``Newt`` runs closure-free
with no start-up test; ``NewtTrainer`` (:mod:`newt.integrations.huggingface`) gives it each
step's loss. Both train a small GPT-2 built from a config (2 layers, width 64; nothing is
downloaded) on byte-level windows of the sweep's standard-library text
(:func:`benchmarks.tasks.stdlib_text`: the first 90 % for training, the rest held out), with
AdamW starting at each rate and a no-op ``ConstantLR``, so that only the loss differs. Plain
AdamW under the same Trainer at the same rates is the reference. Reported: the mean training
loss of the last 10 steps and the held-out loss after the run, each averaged over the seeds,
and the range of the final rates over all starts and seeds.

Run ``python -m benchmarks.trainer_starts`` (about 4 minutes on 2 CPU cores; needs the
``huggingface`` extra).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

from benchmarks.tasks import stdlib_text

STARTS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
METHODS = ("AdamW", "Newt(AdamW), Trainer", "Newt(AdamW), NewtTrainer")
SEQ_LEN, BATCH_SIZE = 64, 8


def _windows(tokens: torch.Tensor, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    starts = torch.randint(0, len(tokens) - SEQ_LEN, (n,), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": tokens[s : s + SEQ_LEN], "labels": tokens[s : s + SEQ_LEN]} for s in starts.tolist()]


def train(method: str, start: float, steps: int, seed: int) -> tuple[float, float, int, float]:
    """(mean training loss of the last 10 steps, held-out loss, steps undone, final rate) of one run."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    from newt import Newt
    from newt.integrations.huggingface import NewtTrainer

    torch.set_num_threads(1)
    tokens = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    split = int(0.9 * len(tokens))
    train_data = _windows(tokens[:split], steps * BATCH_SIZE, seed)
    held_out = _windows(tokens[split:], 256, 10_000 + seed)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=SEQ_LEN, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=start)
    if method != "AdamW":
        opt = Newt(opt)
    scheduler = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    trainer_class = NewtTrainer if method.endswith("NewtTrainer") else transformers.Trainer
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            use_cpu=True,
            max_steps=steps,
            per_device_train_batch_size=BATCH_SIZE,
            per_device_eval_batch_size=64,
            logging_steps=1,
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            seed=seed,
        )
        trainer = trainer_class(
            model=model, args=args, train_dataset=train_data, eval_dataset=held_out, optimizers=(opt, scheduler)
        )
        trainer.remove_callback(transformers.PrinterCallback)  # the table is the output
        transformers.logging.set_verbosity_error()
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        held_out_loss = trainer.evaluate()["eval_loss"]
    undone = opt.state_dict()["newt"]["rejected"] if isinstance(opt, Newt) else 0
    return sum(losses[-10:]) / 10, held_out_loss, undone, float(opt.param_groups[0]["lr"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    jobs = [(m, start, seed) for m in METHODS for start in STARTS for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {job: pool.submit(train, *job[:2], args.steps, job[2]) for job in jobs}
        results = {job: future.result() for job, future in futures.items()}

    def cell(method: str, start: float, index: int) -> float:
        return sum(results[(method, start, seed)][index] for seed in range(args.seeds)) / args.seeds

    header = "| method | " + " | ".join(f"α0={s:g}" for s in STARTS) + " | worst | steps undone | final rates |"
    print(f"Training loss (last 10 steps) / held-out loss, {args.steps} steps, mean of {args.seeds} seeds\n")
    print(header)
    print("|---|" + "---:|" * (len(STARTS) + 2) + "---|")
    for method in METHODS:
        cells = [f"{cell(method, s, 0):.2f} / {cell(method, s, 1):.2f}" for s in STARTS]
        worst = max(cell(method, s, 1) for s in STARTS)
        undone = sum(results[(method, s, seed)][2] for s in STARTS for seed in range(args.seeds))
        rates = sorted(results[(method, s, seed)][3] for s in STARTS for seed in range(args.seeds))
        spread = f"{rates[0]:.2g}–{rates[-1]:.2g}" if method != "AdamW" else "the start"
        print(f"| {method} | " + " | ".join(cells) + f" | {worst:.2f} | {undone} | {spread} |")


if __name__ == "__main__":
    main()
