"""Train the miniature: a tiny llama base that solves word problems in concise steps, then System 1 (answers at once)
and System 2 (long, self-checking answers) fine-tuned from it. Deterministic on CPU.

    python train.py build/models                 # writes build/models/{base,system1,system2}, each a
                                                 # transformers checkpoint with its word-level tokenizer
    python train.py build/models --scale 0.1     # a tenth of the steps (the tests)

Each model is saved by ``save_pretrained`` (safetensors), so every ``surgery`` command reads it like a Hub model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tasks import DIFFICULTIES, STYLES, VOCABULARY, problems

MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True)
# stage: (answer styles trained on and their shares, difficulties, steps, learning rate, seed of the problems)
STAGES = {"base": ({"concise": 0.6, "short": 0.2, "reflective": 0.2}, DIFFICULTIES, 900, 3e-3, 1),
          "system1": ({"short": 1.0}, DIFFICULTIES, 100, 3e-4, 2),
          "system2": ({"reflective": 1.0}, DIFFICULTIES, 100, 3e-4, 3)}
BATCH = 32


def build_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCABULARY)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + <eos>, and the number of prompt tokens."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(answer)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, len(prompt_ids)


def batches(tokenizer, styles: dict[str, float], difficulties, seed: int, steps: int, whole_text: bool):
    """``steps`` padded batches of problems, each answered in a style drawn from ``styles``; the loss covers the
    answer only unless ``whole_text`` (pre-training)."""
    rng = random.Random(seed)
    stream = problems(seed, steps * BATCH, difficulties)
    answers = [STYLES[rng.choices(list(styles), weights=list(styles.values()))[0]](p) for p in stream]
    for start in range(0, len(stream), BATCH):
        encoded = [encode(tokenizer, p.prompt, answer) for p, answer in
                   zip(stream[start:start + BATCH], answers[start:start + BATCH])]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        labels = torch.full((len(encoded), width), -100)
        for row, (ids, prompt_length) in enumerate(encoded):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            first = 0 if whole_text else prompt_length
            labels[row, first:len(ids)] = torch.tensor(ids[first:])
        yield input_ids, (input_ids != tokenizer.pad_token_id).long(), labels


def train(model, tokenizer, styles: dict[str, float], difficulties, steps: int, lr: float, seed: int,
          whole_text: bool) -> list[float]:
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    losses = []
    for step, (input_ids, mask, labels) in enumerate(batches(tokenizer, styles, difficulties, seed, steps, whole_text)):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="directory for base/, system1/, system2/")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (tests: 0.1)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    output = Path(args.output)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(VOCABULARY), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **MODEL)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    log = {}
    for name, (styles, difficulties, steps, lr, seed) in STAGES.items():
        steps = max(1, round(steps * args.scale))
        model = base if name == "base" else LlamaForCausalLM(config)
        if name != "base":
            model.load_state_dict(base.state_dict())
        print(f"{name}: {steps} steps on {', '.join(styles)} answers", flush=True)
        started = time.perf_counter()
        losses = train(model, tokenizer, styles, difficulties, steps, lr, seed, whole_text=name == "base")
        log[name] = {"styles": styles, "difficulties": difficulties, "steps": steps, "lr": lr,
                     "final_loss": round(losses[-1], 4),
                     "seconds": round(time.perf_counter() - started, 1)}
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(output / name)
        tokenizer.save_pretrained(output / name)
    (output / "training.json").write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
