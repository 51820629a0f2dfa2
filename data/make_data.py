"""Write the small data sets bundled with GRLO, in the official GRLO verl JSONL format.

Every line is one JSON object with the keys of the official release, in its order:
    {"data_source": str, "prompt": [{"role": "user", "content": str}], "ability": str,
     "reward_model": {"style": str, "ground_truth": str}, "extra_info": {"split": str, "index": int}}
`reward_model.style` routes the reward: "model" = score with the reward model, "rule" = check `ground_truth`.

Files written next to this script:
1. open_prompts.jsonl         64 hand-written open-ended chat prompts (style "model"), for GRLO smoke runs.
2. arith_train.jsonl          1000 arithmetic word problems (style "rule", integer answer), for RLVR.
3. arith_test.jsonl           200 more, sharing no prompt text with the train set, for evaluation.
4. code_tasks.jsonl           10 small Python function tasks (style "rule", asserts as ground truth).
5. code_tasks_solutions.jsonl one canonical solution per code task, so tests can check the code evaluator.

The script is deterministic and uses only the standard library:
`python data/make_data.py` rewrites all five files byte-identically.
"""

import json
import os
import random

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
# Measured on SmolLM2-135M-Instruct (see docs/train_rlvr.md): with "Put your final answer in \\boxed{}." it copies an empty
# `\boxed{}` every time, so a boxed-only grader sees 0% correct. Naming a placeholder makes it fill the box.
BOXED_INSTRUCTION = "Give the final answer as \\boxed{answer}, replacing answer with the number."
ARITH_SEED = 1234
ARITH_TRAIN_SIZE = 1000
ARITH_TEST_SIZE = 200
ARITH_RM_SIZE = 800  # prompts for reward-model preference pairs (make_preferences.py), disjoint from both


# ---- 1. open-ended prompts (reward-model scored) ----
# Written by us in the style of the GRLO release ("write a detailed guide / analysis of ..."), but kept to
# 1-2 short sentences so they fit the ~128-token prompt limit of CPU smoke runs with tiny models.
OPEN_PROMPTS = [
    # science
    "Write a detailed explanation of how vaccines train the immune system, suitable for a curious high-school student.",
    "Explain in detail why the sky is blue during the day and red at sunset, including the physics of light scattering.",
    "Write a clear guide to how photosynthesis works, from sunlight hitting a leaf to sugar being stored in the plant.",
    "Give a detailed analysis of how plate tectonics shapes mountains, earthquakes and volcanoes.",
    "Explain how black holes form and what happens to matter that falls into one, using everyday analogies.",
    "Write a detailed explanation of how CRISPR gene editing works and what its main risks and benefits are.",
    "Explain the difference between weather and climate, with examples of how each is measured.",
    "Write a beginner's guide to the periodic table: how it is organized and what its patterns tell us.",
    # cooking
    "Write a detailed guide to baking a first loaf of sourdough bread, from feeding the starter to cooling the loaf.",
    "Explain the science of caramelization and the Maillard reaction, and how home cooks can use them.",
    "Write a step-by-step guide to planning and cooking a week of healthy lunches on a small budget.",
    "Give a detailed guide to knife skills for beginners, including how to hold a knife and the basic cuts.",
    "Explain how to make a rich vegetable stock at home and how to use it in soups, sauces and risotto.",
    "Write a guide to stocking a pantry for quick weeknight dinners, with example meals for each staple.",
    # software
    "Write a detailed guide to using Git branches for a small team, including merging, rebasing and resolving conflicts.",
    "Explain how a hash table works, including collisions, load factor and resizing, with a small example.",
    "Write a practical guide to writing good unit tests in Python, with advice on what to test and what to avoid.",
    "Explain the difference between processes and threads, and when to use each in a web server.",
    "Give a detailed analysis of the trade-offs between SQL and NoSQL databases for a growing startup.",
    "Write a beginner's guide to REST APIs: what resources, verbs and status codes are, with examples.",
    "Explain how to profile and speed up a slow Python script, step by step.",
    "Write a guide to choosing good variable and function names, with examples of bad names and better ones.",
    # history
    "Write a detailed analysis of the main causes of the fall of the Western Roman Empire.",
    "Explain how the printing press changed European society in the fifteenth and sixteenth centuries.",
    "Give an overview of the Silk Road: what was traded, who traveled it and why it declined.",
    "Write a detailed explanation of the causes and consequences of the Industrial Revolution in Britain.",
    "Explain how the ancient Egyptians built the pyramids, based on what historians know today.",
    "Write an analysis of how the invention of writing changed early civilizations in Mesopotamia.",
    # travel
    "Write a detailed guide to planning a two-week backpacking trip through Southeast Asia on a budget.",
    "Explain how to pack light for a ten-day trip with only a carry-on bag, with a sample packing list.",
    "Write a guide to staying safe and healthy while traveling alone for the first time.",
    "Give a detailed guide to planning a family road trip, including routes, breaks and keeping children busy.",
    "Explain how to deal with jet lag before, during and after a long flight.",
    # personal finance
    "Write a detailed guide to building a monthly budget for a first job, including savings and an emergency fund.",
    "Explain how compound interest works and why starting to save early matters, with a worked example.",
    "Write a beginner's guide to index funds: what they are, their costs and their risks.",
    "Give a detailed guide to paying off credit card debt, comparing the avalanche and snowball methods.",
    "Explain the pros and cons of renting versus buying a home for someone in their late twenties.",
    "Write a guide to reading a pay slip and understanding taxes, deductions and net pay.",
    # writing
    "Write a detailed guide to structuring a persuasive essay, with an example outline.",
    "Explain how to write a clear and friendly professional email, with a before-and-after example.",
    "Write a guide to creating believable characters in a short story, with practical exercises.",
    "Give detailed advice on editing your own writing: what to look for in each pass.",
    "Explain how to write a strong cover letter for a first job application, with a sample paragraph.",
    # health
    "Write a detailed guide to building a sustainable exercise routine for a busy adult with no gym.",
    "Explain how sleep affects memory and mood, and give practical tips for sleeping better.",
    "Write a guide to reading nutrition labels and using them to make healthier food choices.",
    "Give a detailed explanation of how stress affects the body and evidence-based ways to manage it.",
    "Explain how to start running safely as a complete beginner, with an eight-week plan.",
    "Write a guide to setting up a healthy desk workspace to avoid back, neck and eye strain.",
    # gardening, home and environment
    "Write a detailed guide to starting a small vegetable garden on a balcony.",
    "Explain how composting works and how to start composting kitchen scraps at home.",
    "Write a practical guide to lowering a household's energy use without major renovations.",
    "Give a step-by-step guide to fixing a leaking tap, including the tools needed.",
    # education, careers and productivity
    "Write a detailed guide to studying effectively for exams using active recall and spaced repetition.",
    "Explain how to prepare for a job interview, including common questions and how to answer them.",
    "Write a guide to learning a new language as an adult, with a realistic daily routine.",
    "Give a detailed analysis of the pros and cons of remote work for employees and employers.",
    "Write a guide to running an effective one-hour team meeting, from agenda to follow-up.",
    # arts, music, pets, sports
    "Explain the basics of music theory for a beginner guitarist: notes, scales and chords.",
    "Write a beginner's guide to landscape photography with a smartphone, covering light and composition.",
    "Write a detailed guide to caring for a new puppy during its first month at home.",
    "Explain the rules and basic strategy of chess for someone who has never played.",
    "Write a guide to training for a first 10 km race, including nutrition and rest days.",
]


# ---- 2. arithmetic word problems (rule scored, integer answer) ----
# Difficulty is chosen for a 135M instruct model: one or two operations on numbers up to 20 (products of
# one-digit numbers), so a small model gets some right zero-shot and RL has a signal to improve on.
NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Nina"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "stamps", "balloons", "shells"]


def arith_problem(rng):
    """Draw one word problem; return (question, integer answer)."""
    kind = rng.choice(["add", "sub", "mul", "add_sub", "mul_add"])
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return q, a + b
    if kind == "sub":
        a = rng.randint(5, 20)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?"
        return q, a - b
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in total?"
        return q, a * b
    if kind == "add_sub":
        a, b = rng.randint(3, 15), rng.randint(2, 10)
        c = rng.randint(1, a + b - 1)
        q = f"{name} has {a} {item}, buys {b} more, and then gives away {c}. How many {item} does {name} have now?"
        return q, a + b - c
    a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 10)
    q = f"{name} has {a} boxes with {b} {item} in each box, and {c} loose {item}. How many {item} does {name} have?"
    return q, a * b + c


def make_arith():
    """Return (train_rows, test_rows, rm_rows) of unique problems; no prompt appears in two splits. The rm split
    is drawn after the other two from the same stream, so adding it left train and test byte for byte as they were."""
    rng = random.Random(ARITH_SEED)
    seen, problems = set(), []
    while len(problems) < ARITH_TRAIN_SIZE + ARITH_TEST_SIZE + ARITH_RM_SIZE:
        question, answer = arith_problem(rng)
        content = f"{question} {BOXED_INSTRUCTION}"
        if content not in seen:  # dedupe so the two splits cannot share a prompt
            seen.add(content)
            problems.append((content, answer))
    n = ARITH_TRAIN_SIZE + ARITH_TEST_SIZE
    train, test, rm = problems[:ARITH_TRAIN_SIZE], problems[ARITH_TRAIN_SIZE:n], problems[n:]
    splits = [{c for c, _ in part} for part in (train, test, rm)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2]), "two splits share a prompt"
    train_rows = [row("grlo/arith", c, "math", "rule", str(a), "train", i) for i, (c, a) in enumerate(train)]
    test_rows = [row("grlo/arith", c, "math", "rule", str(a), "test", i) for i, (c, a) in enumerate(test)]
    rm_rows = [row("grlo/arith", c, "math", "rule", str(a), "rm", i) for i, (c, a) in enumerate(rm)]
    return train_rows, test_rows, rm_rows


# ---- 3. code tasks (rule scored by running asserts) ----
# (entry point, signature, what it does, canonical solution, asserts)
CODE_TASKS = [
    (
        "reverse_string",
        "reverse_string(s)",
        "returns the string `s` reversed",
        "def reverse_string(s):\n    return s[::-1]\n",
        [
            "assert reverse_string('abc') == 'cba'",
            "assert reverse_string('') == ''",
            "assert reverse_string('racecar') == 'racecar'",
            "assert reverse_string('Hello, World') == 'dlroW ,olleH'",
        ],
    ),
    (
        "fizzbuzz",
        "fizzbuzz(n)",
        "returns a list of strings for the numbers 1 to `n`: 'Fizz' for multiples of 3, 'Buzz' for multiples of 5, "
        "'FizzBuzz' for multiples of both, and the number itself otherwise",
        "def fizzbuzz(n):\n    out = []\n    for i in range(1, n + 1):\n        if i % 15 == 0:\n"
        "            out.append('FizzBuzz')\n        elif i % 3 == 0:\n            out.append('Fizz')\n"
        "        elif i % 5 == 0:\n            out.append('Buzz')\n        else:\n            out.append(str(i))\n"
        "    return out\n",
        [
            "assert fizzbuzz(1) == ['1']",
            "assert fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']",
            "assert fizzbuzz(15)[-1] == 'FizzBuzz'",
            "assert fizzbuzz(0) == []",
        ],
    ),
    (
        "is_prime",
        "is_prime(n)",
        "returns True if the integer `n` is a prime number and False otherwise",
        "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
        "        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
        [
            "assert is_prime(2) == True",
            "assert is_prime(1) == False",
            "assert is_prime(17) == True",
            "assert is_prime(21) == False",
            "assert is_prime(0) == False",
        ],
    ),
    (
        "gcd",
        "gcd(a, b)",
        "returns the greatest common divisor of two positive integers `a` and `b`",
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
        ["assert gcd(12, 18) == 6", "assert gcd(7, 5) == 1", "assert gcd(10, 10) == 10", "assert gcd(100, 75) == 25"],
    ),
    (
        "count_vowels",
        "count_vowels(s)",
        "returns how many vowels (a, e, i, o, u, upper or lower case) are in the string `s`",
        "def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in 'aeiou')\n",
        [
            "assert count_vowels('hello') == 2",
            "assert count_vowels('') == 0",
            "assert count_vowels('AEIOU') == 5",
            "assert count_vowels('rhythm') == 0",
        ],
    ),
    (
        "flatten",
        "flatten(lst)",
        "takes a list that may contain nested lists at any depth and returns a flat list of all the elements in order",
        "def flatten(lst):\n    out = []\n    for x in lst:\n        if isinstance(x, list):\n"
        "            out.extend(flatten(x))\n        else:\n            out.append(x)\n    return out\n",
        [
            "assert flatten([1, [2, 3], [4, [5]]]) == [1, 2, 3, 4, 5]",
            "assert flatten([]) == []",
            "assert flatten([[[]]]) == []",
            "assert flatten([1, 2, 3]) == [1, 2, 3]",
        ],
    ),
    (
        "running_sum",
        "running_sum(nums)",
        "returns a list where element i is the sum of the first i + 1 numbers of the list `nums`",
        "def running_sum(nums):\n    out, total = [], 0\n    for x in nums:\n        total += x\n"
        "        out.append(total)\n    return out\n",
        [
            "assert running_sum([1, 2, 3, 4]) == [1, 3, 6, 10]",
            "assert running_sum([]) == []",
            "assert running_sum([5]) == [5]",
            "assert running_sum([1, -1, 1]) == [1, 0, 1]",
        ],
    ),
    (
        "is_palindrome",
        "is_palindrome(s)",
        "returns True if the string `s` reads the same forwards and backwards, ignoring case and any character "
        "that is not a letter or digit",
        "def is_palindrome(s):\n    t = [ch.lower() for ch in s if ch.isalnum()]\n    return t == t[::-1]\n",
        [
            "assert is_palindrome('racecar') == True",
            "assert is_palindrome('A man, a plan, a canal: Panama') == True",
            "assert is_palindrome('hello') == False",
            "assert is_palindrome('') == True",
        ],
    ),
    (
        "word_frequency",
        "word_frequency(text)",
        "returns a dict mapping each word of `text` (split on whitespace, lower-cased) to how many times it occurs",
        "def word_frequency(text):\n    counts = {}\n    for w in text.lower().split():\n"
        "        counts[w] = counts.get(w, 0) + 1\n    return counts\n",
        [
            "assert word_frequency('the cat the dog') == {'the': 2, 'cat': 1, 'dog': 1}",
            "assert word_frequency('') == {}",
            "assert word_frequency('A a A') == {'a': 3}",
        ],
    ),
    (
        "second_largest",
        "second_largest(nums)",
        "returns the second largest distinct value in the list `nums`, or None if there is no such value",
        "def second_largest(nums):\n    values = sorted(set(nums))\n    return values[-2] if len(values) >= 2 else None\n",
        [
            "assert second_largest([1, 2, 3, 4]) == 3",
            "assert second_largest([5, 5, 4]) == 4",
            "assert second_largest([7]) is None",
            "assert second_largest([3, 3]) is None",
            "assert second_largest([-1, -5, -3]) == -3",
        ],
    ),
]


def check_solution(solution, test_list):
    """Exec a canonical solution and its asserts in a fresh namespace; raises AssertionError on failure."""
    namespace = {}
    exec(solution, namespace)
    for test in test_list:
        exec(test, namespace)


def make_code_tasks():
    """Return (task_rows, solution_rows); every canonical solution is checked against its asserts first."""
    tasks, solutions = [], []
    for i, (entry_point, signature, description, solution, test_list) in enumerate(CODE_TASKS):
        assert 3 <= len(test_list) <= 5 and all(t.startswith(f"assert {entry_point}(") for t in test_list)
        check_solution(solution, test_list)
        content = (
            f"Write a Python function `{signature}` that {description}. Return the code in a ```python code block."
        )
        ground_truth = json.dumps({"entry_point": entry_point, "test_list": test_list})
        tasks.append(row("grlo/code_tasks", content, "code", "rule", ground_truth, "test", i))
        solutions.append({"index": i, "solution": f"```python\n{solution}```"})
    return tasks, solutions


# ---- writing ----
def row(data_source, content, ability, style, ground_truth, split, index):
    """One record in the official GRLO verl format (same keys, same order)."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content}],
        "ability": ability,
        "reward_model": {"style": style, "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index},
    }


def write_jsonl(name, rows):
    # Same serialisation as the official release: json.dumps defaults, non-ASCII kept, "\n" line ends.
    path = os.path.join(OUT_DIR, name)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):5d} rows to {path}")


def main():
    assert len(OPEN_PROMPTS) == 64 and len(set(OPEN_PROMPTS)) == 64
    assert all(len(p) <= 200 for p in OPEN_PROMPTS), "open prompts must stay short for CPU prompt limits"
    open_rows = [row("grlo/open_prompts", p, "general", "model", "", "train", i) for i, p in enumerate(OPEN_PROMPTS)]
    arith_train, arith_test, arith_rm = make_arith()
    code_rows, code_solutions = make_code_tasks()

    write_jsonl("open_prompts.jsonl", open_rows)
    write_jsonl("arith_train.jsonl", arith_train)
    write_jsonl("arith_test.jsonl", arith_test)
    write_jsonl("arith_rm.jsonl", arith_rm)
    write_jsonl("code_tasks.jsonl", code_rows)
    write_jsonl("code_tasks_solutions.jsonl", code_solutions)


if __name__ == "__main__":
    main()
