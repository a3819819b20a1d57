"""Synthetic arithmetic word problems of graded difficulty, and the three answer styles of the long-to-short study.

    problem = make_problem(random.Random(0), steps=2)
    problem.prompt   # "question : ann has 2 cards . she finds 9 more . she finds 5 more . how many cards does ann
                     #  have now ? answer :"
    problem.answer              # 16
    short_answer(problem)       # System 1: "the answer is 16 ."
    concise_answer(problem)     # the base's habit: "2 + 9 = 11 . 11 + 5 = 16 . the answer is 16 ."
    reflective_answer(problem)  # System 2: "2 + 9 = 11 . wait , let me double-check : 2 + 9 = 11 . 11 + 5 = 16 .
                                #  wait , let me double-check : 11 + 5 = 16 . the answer is 16 ."

Difficulty is the number of operations (1 to 4). Every word is one token of the word-level tokenizer built from
``VOCABULARY``, so lengths are counted in words.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = [("tom", "he", "him"), ("sam", "he", "him"), ("max", "he", "him"),
         ("ann", "she", "her"), ("mia", "she", "her"), ("lily", "she", "her")]
ITEMS = ["apples", "pens", "coins", "cards", "books", "shells"]
GAINS = ["{he} buys {n} more .", "{he} finds {n} more .", "a friend gives {him} {n} more ."]
LOSSES = ["{he} gives away {n} .", "{he} loses {n} .", "{he} sells {n} ."]
MAX_VALUE = 30
DIFFICULTIES = (1, 2, 3, 4)
REFLECTION = "wait , let me double-check : {step}"

WORDS = ("question answer : . , ? + - = how many does have now the is let me think step by wait double-check "
         "recap more a friend gives away loses sells buys finds").split()
VOCABULARY = ["<pad>", "<eos>", "<unk>", *WORDS, *(name for triple in NAMES for name in triple), *ITEMS,
              *(str(n) for n in range(MAX_VALUE + 1))]


@dataclass
class Problem:
    prompt: str
    answer: int
    difficulty: int
    steps: list[tuple[int, str, int, int]]  # (left, "+" or "-", operand, result)


def make_problem(rng: random.Random, steps: int) -> Problem:
    name, he, him = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    value = rng.randint(2, 15)
    sentences = [f"{name} has {value} {item} ."]
    done = []
    for _ in range(steps):
        if value < 2 or (value + 1 <= MAX_VALUE and rng.random() < 0.5):
            operand = rng.randint(1, min(9, MAX_VALUE - value))
            template, op, result = rng.choice(GAINS), "+", value + operand
        else:
            operand = rng.randint(1, min(9, value))
            template, op, result = rng.choice(LOSSES), "-", value - operand
        sentences.append(template.format(he=he, him=him, n=operand))
        done.append((value, op, operand, result))
        value = result
    question = f"how many {item} does {name} have now ?"
    prompt = " ".join(["question :", *sentences, question, "answer :"])
    return Problem(prompt, value, steps, done)


def _equation(step: tuple[int, str, int, int]) -> str:
    left, op, operand, result = step
    return f"{left} {op} {operand} = {result} ."


def short_answer(problem: Problem) -> str:
    return f"the answer is {problem.answer} ."


def concise_answer(problem: Problem) -> str:
    return " ".join([*map(_equation, problem.steps), short_answer(problem)])


def reflective_answer(problem: Problem) -> str:
    parts = []
    for step in problem.steps:
        parts += [_equation(step), REFLECTION.format(step=_equation(step))]
    parts.append(short_answer(problem))
    return " ".join(parts)


STYLES = {"short": short_answer, "concise": concise_answer, "reflective": reflective_answer}


def problems(seed: int, count: int, difficulties=DIFFICULTIES) -> list[Problem]:
    """``count`` problems, difficulties in turn, drawn from ``seed``."""
    rng = random.Random(seed)
    return [make_problem(rng, difficulties[i % len(difficulties)]) for i in range(count)]


def write_tasks(path: str | Path, items: list[Problem]) -> None:
    """The evaluation file ``surgery eval length`` reads: one JSON object per line."""
    with open(path, "w") as handle:
        for problem in items:
            handle.write(json.dumps({"prompt": problem.prompt, "answer": str(problem.answer),
                                     "difficulty": problem.difficulty}) + "\n")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the evaluation tasks and the AIM calibration text.")
    parser.add_argument("--tasks", required=True, help="JSONL file of evaluation problems")
    parser.add_argument("--count", type=int, default=400, help="evaluation problems (difficulties in turn)")
    parser.add_argument("--calibration", required=True, help="text file: questions with short answers")
    args = parser.parse_args()
    write_tasks(args.tasks, problems(seed=1000, count=args.count))
    # the study calibrated AIM on questions with short answers
    Path(args.calibration).write_text("\n".join(f"{p.prompt} {short_answer(p)}" for p in problems(2000, 64)) + "\n")


if __name__ == "__main__":
    main()
